"""Checkpoint I/O: safetensors in Hugging Face layout (Orbax: `jkarcher.io.orbax_io`)."""

from jkarcher.io.safetensors_io import (
    DTYPE_NAMES,
    DTYPES,
    Checkpoint,
    CheckpointError,
    TensorInfo,
    read_header,
    read_tensor,
    resolve_checkpoint_dir,
)

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "Checkpoint",
    "CheckpointError",
    "TensorInfo",
    "read_header",
    "read_tensor",
    "resolve_checkpoint_dir",
]
