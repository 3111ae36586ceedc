"""Checkpoint I/O (docs/design.md, "Data flow"): the checkpoint interface (`checkpoint`), its
safetensors reader in Hugging Face layout (`safetensors_io`) and its Orbax reader (`orbax_io`,
imported on its own: it brings in Orbax), the safetensors writer (`writer`), the output
directory (`output_dir`), Hugging Face's side files and hub cache (`hf`), the model card
(`model_card`)."""

from jkarcher.io.checkpoint import CheckpointError, CheckpointReader, StoredTensor
from jkarcher.io.hf import resolve_checkpoint_dir
from jkarcher.io.safetensors_io import (
    DTYPE_NAMES,
    DTYPES,
    Checkpoint,
    TensorInfo,
    read_header,
    read_tensor,
)

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "Checkpoint",
    "CheckpointError",
    "CheckpointReader",
    "StoredTensor",
    "TensorInfo",
    "read_header",
    "read_tensor",
    "resolve_checkpoint_dir",
]
