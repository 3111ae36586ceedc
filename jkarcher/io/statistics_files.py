"""Files of per-model statistics saved beside a checkpoint (a diagonal Fisher, input Grams),
under the checkpoint's tensor names, and the recipe an estimate is saved with: the text it was
made on, by SHA-256, and the settings, by which a merge tells whether a saved estimate is
current."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jkarcher.io.checkpoint import CheckpointError
from jkarcher.io.hf import resolve_checkpoint_dir
from jkarcher.io.safetensors_io import TensorInfo, read_header


def beside(checkpoint_dir: str | os.PathLike, file_name: str) -> Path:
    """`file_name` in a checkpoint's directory (a hub id resolves to its snapshot in the local
    HF cache)."""
    return resolve_checkpoint_dir(checkpoint_dir) / file_name


def text_recipe(text_file: str | os.PathLike, **settings: Any) -> dict[str, str]:
    """The text by its SHA-256 and each setting as text (None, a count left open: "all"), the
    metadata an estimate is saved with."""
    digest = hashlib.sha256(Path(text_file).read_bytes()).hexdigest()
    shown = {name: "all" if value is None else str(value) for name, value in settings.items()}
    return {"text_sha256": digest} | shown


def has_recipe(path: str | os.PathLike, recipe: Mapping[str, str]) -> bool:
    """Whether `path` is a saved estimate made by `recipe` (`text_recipe`)."""
    if not Path(path).is_file():
        return False
    _, metadata = read_header(path)
    return all(metadata.get(key) == value for key, value in recipe.items())


def saved_tensors(file: str | os.PathLike, absent: str) -> dict[str, TensorInfo]:
    """{tensor name: where it lies} of a statistics file (headers only); a missing file is a
    CheckpointError '{file}: {absent}'."""
    if not Path(file).is_file():
        raise CheckpointError(f"{file}: {absent}")
    infos, _ = read_header(file)
    return infos
