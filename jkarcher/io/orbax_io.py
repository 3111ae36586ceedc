"""Orbax checkpoints of models: merge inputs read from them, merges written as them, and
conversion to and from Hugging Face checkpoints.

An Orbax model directory holds its weights as an Orbax PyTree checkpoint in `params/`, and the
model's other files (config.json, tokenizer, generation config, model card) beside it, as an HF
directory holds them beside its safetensors files. The pytree is nested dicts: a tensor's path is
its HF name split on "." with "layers.{i}" written "layers_{i}" (`jkarcher.models.checkpoint`),
the layout of jkarcher's Flax models, so that `params/` restores straight into them. A bare Orbax
PyTree checkpoint of nested dicts (what `orbax.checkpoint.StandardCheckpointer` writes from a
params dict) is read as a model too, its tensors named by their paths in the same way.

`OrbaxCheckpoint` and its `OrbaxTensor`s implement the checkpoint interface of
`jkarcher.io.checkpoint`, as the safetensors reader does. Only Orbax's public API is used:
`Checkpointer(PyTreeCheckpointHandler())` to save a whole pytree at once, its `metadata` for
names, shapes and dtypes, and partial restores (`args.PyTreeRestore(partial_restore=True)`) to
read one tensor at a time, whole as a NumPy array (`OrbaxTensor.read`) or as a global array of a
given sharding (`OrbaxTensor.read_placed`), of which Orbax reads only this process's shards.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.sharding import NamedSharding

from jkarcher.io.checkpoint import (
    CONFIG_NAME,
    CheckpointError,
    CheckpointReader,
    StoredTensor,
    load_model_config,
)
from jkarcher.io.hf import copy_files, resolve_checkpoint_dir
from jkarcher.io.output_dir import check_output_dir, staged_directory
from jkarcher.io.safetensors_io import INDEX_NAME, Checkpoint, map_tensor
from jkarcher.io.writer import OutputTensor, ShardWriter, natural_key, plan_shards, write_index

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

PARAMS_DIR = "params"
# The file Orbax writes into every PyTree checkpoint: the tree's structure and leaf metadata.
PYTREE_METADATA_FILE = "_METADATA"


@dataclasses.dataclass(frozen=True)
class OrbaxTensor(StoredTensor):
    """One tensor of an Orbax checkpoint: its name, its path in the pytree, dtype and shape.

    `first_row` and `shape[0]` select rows of the stored array (as `TensorInfo.rows` does for
    safetensors); `file` is the checkpoint directory, which error messages name.
    """

    name: str
    file: Path
    path: tuple[str, ...]
    dtype: np.dtype
    shape: tuple[int, ...]
    first_row: int = 0

    def rows(self, first: int, stop: int) -> OrbaxTensor:
        """The rows [first, stop) along axis 0, as a tensor of its own (no data is read)."""
        self._check_rows(first, stop)
        return dataclasses.replace(
            self, shape=(stop - first, *self.shape[1:]), first_row=self.first_row + first
        )

    def read(self) -> np.ndarray:
        """The tensor (its rows that this selects) into host memory."""
        array = np.asarray(_restore_one(self, _orbax().RestoreArgs(restore_type=np.ndarray)))
        return array[self.first_row : self.first_row + self.shape[0]] if self.shape else array

    def read_placed(
        self, shape: tuple[int, ...], sharding: NamedSharding, dtype: np.dtype
    ) -> jax.Array:
        """The tensor's first rows as a global array of `shape` (zero rows padded at the end, or
        rows beyond this one's cut off) and `sharding`, cast to `dtype`; Orbax reads only the
        shards that this process's devices hold."""
        if self.first_row:
            raise ValueError(f"tensor {self.name!r}: only rows from 0 on can be read onto a mesh")
        args = _orbax().ArrayRestoreArgs(
            sharding=sharding, global_shape=shape, strict=False, dtype=dtype
        )
        return _restore_one(self, args)


class OrbaxCheckpoint(CheckpointReader):
    """The weights of one Orbax model directory (or bare PyTree checkpoint), as `Checkpoint`
    offers those of an HF directory: names, shapes and dtypes from the metadata alone."""

    def __init__(self, path_or_id: str | os.PathLike):
        self.source = str(path_or_id)
        self.path = resolve_checkpoint_dir(path_or_id)
        self.params_dir = params_directory(self.path)
        if self.params_dir is None:
            raise CheckpointError(f"{self.path}: not an Orbax checkpoint (no {PARAMS_DIR}/)")
        self.config = load_model_config(self.path / CONFIG_NAME)
        tree = _reader().metadata(self.params_dir).item_metadata.tree
        self.tensors = {
            name: OrbaxTensor(name, self.params_dir, path, np.dtype(meta.dtype), tuple(meta.shape))
            for name, path, meta in _named_leaves(tree, self.params_dir)
        }

    @property
    def weights_dir(self) -> Path:
        return self.params_dir


def params_directory(path: Path) -> Path | None:
    """The Orbax PyTree checkpoint of a model directory: `path/params`, or `path` itself when it
    is a bare one; None when it is neither."""
    for candidate in (path / PARAMS_DIR, path):
        if (candidate / PYTREE_METADATA_FILE).is_file():
            return candidate
    return None


def open_checkpoint(path_or_id: str | os.PathLike) -> Checkpoint | OrbaxCheckpoint:
    """An HF checkpoint directory (safetensors) or an Orbax one, told apart by their files."""
    if params_directory(resolve_checkpoint_dir(path_or_id)) is not None:
        return OrbaxCheckpoint(path_or_id)
    return Checkpoint(path_or_id)


def save_params(directory: str | os.PathLike, tensors: Mapping[str, np.ndarray | jax.Array]):
    """Write {HF name: array} as the Orbax PyTree checkpoint `directory/params`.

    Global arrays sharded over several processes are written by each process for its own
    shards; every process of a run calls this with the same names.
    """
    tree: dict = {}
    for name, array in tensors.items():
        if not np.size(array):
            raise CheckpointError(f"tensor {name!r} has no elements; Orbax cannot store it")
        node = tree
        *parents, leaf = _tree_path(name)
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"tensor {name!r} lies inside another tensor's path")
        if leaf in node:
            raise CheckpointError(f"tensor {name!r} clashes with another tensor's path")
        node[leaf] = array
    params = Path(directory).absolute() / PARAMS_DIR
    _checkpointer().save(params, args=_orbax().args.PyTreeSave(tree))


def hf_to_orbax(
    source: str | os.PathLike, destination: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write an HF checkpoint as an Orbax model directory, tensor for tensor and bit for bit,
    with every other file of the source (config, tokenizer, card) copied beside `params/`.

    Tensors are memory-mapped, so only the page cache holds them while Orbax writes. The output
    appears only once complete.
    """
    checkpoint = Checkpoint(source)
    check_output_dir(destination, [checkpoint.path], overwrite)
    tensors = {name: map_tensor(checkpoint.info(name)) for name in checkpoint.names()}
    with staged_directory(destination, overwrite) as staging:
        save_params(staging, tensors)
        weight_files = {f.name for f in checkpoint.files} | {INDEX_NAME}
        _copy_other_files(checkpoint.path, staging, weight_files)
    return Path(destination)


def orbax_to_hf(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    max_shard_bytes: int = 5 * 10**9,
    overwrite: bool = False,
) -> Path:
    """Write an Orbax model directory as an HF checkpoint: safetensors shards of at most
    `max_shard_bytes` (with an index when there are several), every other file copied.

    Tensors are read and written one at a time. The output appears only once complete.
    """
    checkpoint = OrbaxCheckpoint(source)
    check_output_dir(destination, [checkpoint.path], overwrite)
    names = sorted(checkpoint.names(), key=natural_key)
    layout = [OutputTensor(n, checkpoint.info(n).dtype, checkpoint.info(n).shape) for n in names]
    shards = plan_shards(layout, max_shard_bytes)
    with staged_directory(destination, overwrite) as staging:
        with ShardWriter(staging, shards) as writer:
            for name in names:
                writer.write(name, checkpoint.read(name))
        if len(shards) > 1:
            write_index(staging, shards)
        _copy_other_files(checkpoint.path, staging, {PARAMS_DIR})
    return Path(destination)


@functools.cache
def _orbax():
    """`orbax.checkpoint`, imported on first use: importing it adds about 0.3 s to every start,
    and most merges neither read nor write an Orbax checkpoint."""
    import orbax.checkpoint

    return orbax.checkpoint


@functools.cache
def _checkpointer() -> ocp.Checkpointer:
    """Saves: every process of a run takes part (each writes its own shards)."""
    return _orbax().Checkpointer(_orbax().PyTreeCheckpointHandler())


@functools.cache
def _reader() -> ocp.Checkpointer:
    """Reads: each process on its own, with no barrier between processes, so that a process
    reads ahead in a thread of its own while the others merge."""
    alone = _orbax().options.MultiprocessingOptions(
        primary_host=jax.process_index(), active_processes={jax.process_index()}
    )
    return _orbax().Checkpointer(
        _orbax().PyTreeCheckpointHandler(multiprocessing_options=alone),
        multiprocessing_options=alone,
    )


def _restore_one(info: OrbaxTensor, args: ocp.RestoreArgs):
    """Restore the one array at `info.path` with `args` (a partial restore)."""
    restored = _reader().restore(
        info.file,
        args=_orbax().args.PyTreeRestore(
            item=_nested(info.path, 0), restore_args=_nested(info.path, args), partial_restore=True
        ),
    )
    for key in info.path:
        restored = restored[key]
    return restored


def _nested(path: tuple[str, ...], leaf) -> dict:
    """{path[0]: {path[1]: ... leaf}}."""
    for key in reversed(path):
        leaf = {key: leaf}
    return leaf


def _named_leaves(tree, directory: Path) -> Iterator[tuple[str, tuple[str, ...], object]]:
    """(HF name, path, metadata) of each leaf of a nested-dict metadata tree."""
    for key_path, meta in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not all(isinstance(k, jax.tree_util.DictKey) for k in key_path):
            raise CheckpointError(
                f"{directory}: holds a pytree that is not nested dicts (at {key_path}); "
                "only dicts of arrays are read as models"
            )
        path = tuple(str(k.key) for k in key_path)
        yield _hf_name(path), path, meta


def _tree_path(name: str) -> tuple[str, ...]:
    """A tensor's path in the pytree; the name must come back from it unchanged."""
    path = _model_names().param_path(name)
    if _hf_name(path) != name or not all(path):
        raise CheckpointError(f"tensor {name!r} cannot be written as a pytree path")
    return path


def _hf_name(path: tuple[str, ...]) -> str:
    return _model_names().hf_name(path)


def _model_names():
    """`jkarcher.models.checkpoint`, imported when first needed: it brings in Flax, which a merge
    of safetensors checkpoints does without."""
    from jkarcher.models import checkpoint

    return checkpoint


def _copy_other_files(source: Path, destination: Path, skipped: set[str]) -> None:
    """Copy each file of `source` (not its subdirectories) whose name is not in `skipped`."""
    names = [p.name for p in sorted(source.iterdir()) if p.is_file() and p.name not in skipped]
    copy_files(source, destination, names)
