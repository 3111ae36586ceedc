"""Fisher files: `fisher.safetensors` beside a checkpoint, float32, under the checkpoint's tensor
names, so that merges read a Fisher like the weights (docs/design.md, "Data flow"); and the
recipe an estimate is saved with, by which a merge tells whether a saved estimate is current.
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

FISHER_NAME = "fisher.safetensors"


def fisher_path(checkpoint_dir: str | os.PathLike) -> Path:
    """Where the Fisher of a checkpoint lives: `fisher.safetensors` in its directory (a hub id
    resolves to its snapshot in the local HF cache)."""
    return beside(checkpoint_dir, FISHER_NAME)


def estimate_recipe(
    text_file: str | os.PathLike,
    *,
    estimator: str = "true",
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_batches: int | None = None,
    seed: int = 0,
) -> dict[str, str]:
    """Everything that decides a `checkpoint_fisher` estimate besides the model, as the text
    metadata it is saved with: the text by its SHA-256, and the settings.

    A saved estimate whose metadata holds the same recipe (`jkarcher.io.statistics_files.
    has_recipe`) need not be made again.
    """
    return text_recipe(
        text_file,
        estimator=estimator,
        seq_len=seq_len,
        batch_size=batch_size,
        num_batches=num_batches,
        seed=seed,
    )


def fisher_tensors(
    checkpoint_dir: str | os.PathLike, path: str | os.PathLike | None = None
) -> dict[str, TensorInfo]:
    """{HF tensor name: where its Fisher lies} of a checkpoint's Fisher file (headers only).

    `path` overrides the default `fisher_path(checkpoint_dir)`. Read one tensor with
    `jkarcher.io.read_tensor(info)`.
    """
    file = Path(path) if path is not None else fisher_path(checkpoint_dir)
    return saved_tensors(
        file,
        "no Fisher estimate; compute one with "
        f"`python scripts/fisher.py --checkpoint={checkpoint_dir} --text=...`",
    )


def load_fisher(checkpoint_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Any:
    """The Fisher of a checkpoint as a float32 pytree shaped like its `jkarcher.models` params.

    Every tensor the checkpoint's config needs must be in the file with its shape, and nothing
    else, so a Fisher of another model fails here, naming the file and the tensor.
    """
    from jkarcher import models  # the Flax model: only where a pytree meets tensor names

    directory = resolve_checkpoint_dir(checkpoint_dir)
    file = Path(path) if path is not None else directory / FISHER_NAME
    infos = fisher_tensors(directory, file)
    config = models.load_config(directory)
    expected = models.expected_tensors(config)
    missing = sorted(set(expected) - set(infos))
    extra = sorted(set(infos) - set(expected))
    if missing or extra:
        problem = f"lacks {missing[:3]}" if missing else f"has tensors the model lacks {extra[:3]}"
        raise CheckpointError(f"{file}: not the Fisher of {directory}: it {problem}")
    for name, shape in expected.items():
        if infos[name].shape != shape:
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {list(infos[name].shape)}, the model's is "
                f"{list(shape)}"
            )

    def read(keys, _):
        name = models.hf_name(tuple(key.key for key in keys))
        return jnp.asarray(read_tensor(infos[name]), jnp.float32)

    return jax.tree_util.tree_map_with_path(read, models.param_shapes(config))
