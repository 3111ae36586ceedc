"""Gram files: `grams.safetensors` beside a checkpoint, float32, each linear layer's input Gram
[in, in] under the name of the layer's weight, so that merges find a tensor's Gram by the
tensor's name; and the recipe an estimate is saved with, by which a merge tells whether a saved
estimate is current.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jkarcher.config import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN
from jkarcher.io import (
    CheckpointError,
    TensorInfo,
    read_tensor,
    resolve_checkpoint_dir,
)
from jkarcher.io.statistics_files import beside, saved_tensors, text_recipe

GRAMS_NAME = "grams.safetensors"


def grams_path(checkpoint_dir: str | os.PathLike) -> Path:
    """Where the Grams of a checkpoint live: `grams.safetensors` in its directory (a hub id
    resolves to its snapshot in the local HF cache)."""
    return beside(checkpoint_dir, GRAMS_NAME)


def gram_recipe(
    text_file: str | os.PathLike,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_batches: int | None = None,
) -> dict[str, str]:
    """Everything that decides a `checkpoint_grams` estimate besides the model, as the text
    metadata it is saved with: the text by its SHA-256, and the settings."""
    return text_recipe(
        text_file,
        statistic="input_grams",
        seq_len=seq_len,
        batch_size=batch_size,
        num_batches=num_batches,
    )


def gram_tensors(
    checkpoint_dir: str | os.PathLike, path: str | os.PathLike | None = None
) -> dict[str, TensorInfo]:
    """{weight name: where its Gram lies} of a checkpoint's Gram file (headers only); `path`
    overrides the default `grams_path(checkpoint_dir)`."""
    file = Path(path) if path is not None else grams_path(checkpoint_dir)
    return saved_tensors(
        file,
        "no input Grams; compute them with "
        f"`python scripts/grams.py --checkpoint={checkpoint_dir} --text=...`",
    )


def load_grams(checkpoint_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Any:
    """A checkpoint's Grams as `jkarcher.merge(..., method="regmean", gram=[...])` takes them: a
    pytree shaped like its `jkarcher.models` params, each linear weight's Gram [in, in]
    (float32) where the file has it, None elsewhere. A Gram of the wrong shape is an error
    naming the file and the tensor."""
    from jkarcher import models  # the Flax model: only where a pytree meets tensor names

    directory = resolve_checkpoint_dir(checkpoint_dir)
    infos = gram_tensors(directory, path)

    def read(keys, weight):
        name = models.hf_name(tuple(key.key for key in keys))
        if name not in infos:
            return None
        expected = (weight.shape[-1], weight.shape[-1])
        if len(weight.shape) != 2 or infos[name].shape != expected:
            raise CheckpointError(
                f"{infos[name].file}: the Gram of {name!r} has shape {list(infos[name].shape)}, "
                f"the weight's inputs need {list(expected)}"
            )
        return jnp.asarray(read_tensor(infos[name]), jnp.float32)

    shapes = models.param_shapes(models.load_config(directory))
    return jax.tree_util.tree_map_with_path(read, shapes)
