"""Fisher files: `fisher.safetensors` beside a checkpoint, float32, under the checkpoint's tensor
names, so that merges read a Fisher like the weights (docs/design.md, "Data flow"); and the
recipe an estimate is saved with, by which a merge tells whether a saved estimate is current.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jkarcher.config import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN
from jkarcher.io import (
    CheckpointError,
    TensorInfo,
    read_header,
    read_tensor,
    resolve_checkpoint_dir,
)

FISHER_NAME = "fisher.safetensors"


def fisher_path(checkpoint_dir: str | os.PathLike) -> Path:
    """Where the Fisher of a checkpoint lives: `fisher.safetensors` in its directory (a hub id
    resolves to its snapshot in the local HF cache)."""
    return resolve_checkpoint_dir(checkpoint_dir) / FISHER_NAME


def save_fisher(
    fisher: Any, path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a decoder-shaped Fisher pytree as float32 safetensors under the HF tensor names.

    The file is written to a temporary name in the same directory and renamed into place, so
    an interrupted run never leaves a partial `fisher.safetensors`.
    """
    from jkarcher import models  # the Flax model: only where a pytree meets tensor names

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: np.asarray(jax.device_get(leaf), np.float32)
        for name, leaf in models.params_to_hf(fisher).items()
    }
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        safetensors.numpy.save_file(tensors, temporary, dict(metadata or {}))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


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

    A saved estimate whose metadata holds the same recipe (`has_recipe`) need not be made again.
    """
    digest = hashlib.sha256(Path(text_file).read_bytes()).hexdigest()
    return {
        "text_sha256": digest,
        "estimator": estimator,
        "seq_len": str(seq_len),
        "batch_size": str(batch_size),
        "num_batches": "all" if num_batches is None else str(num_batches),
        "seed": str(seed),
    }


def has_recipe(path: str | os.PathLike, recipe: Mapping[str, str]) -> bool:
    """Whether `path` is a saved Fisher estimate made by `recipe` (`estimate_recipe`)."""
    if not Path(path).is_file():
        return False
    _, metadata = read_header(path)
    return all(metadata.get(key) == value for key, value in recipe.items())


def fisher_tensors(
    checkpoint_dir: str | os.PathLike, path: str | os.PathLike | None = None
) -> dict[str, TensorInfo]:
    """{HF tensor name: where its Fisher lies} of a checkpoint's Fisher file (headers only).

    `path` overrides the default `fisher_path(checkpoint_dir)`. Read one tensor with
    `jkarcher.io.read_tensor(info)`.
    """
    file = Path(path) if path is not None else fisher_path(checkpoint_dir)
    if not file.is_file():
        raise CheckpointError(
            f"{file}: no Fisher estimate; compute one with "
            f"`python scripts/fisher.py --checkpoint={checkpoint_dir} --text=...`"
        )
    infos, _ = read_header(file)
    return infos


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
