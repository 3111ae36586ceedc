"""The checkpoint interface that every reader implements (docs/design.md, "Data flow").

A checkpoint (`CheckpointReader`: the safetensors `Checkpoint`, the `OrbaxCheckpoint`) has a
`source` (the path or hub id given), a `path` (its directory), a `config` (its config.json, {}
when it has none), and tensors found by name: `names()`, `info(name)`, `name in checkpoint`.
Opening one reads headers or metadata only.

Each tensor (`StoredTensor`) says where it lies (`name`, `file`, `dtype`, `shape`, `nbytes`),
selects rows of itself without reading (`rows(first, stop)`), and reads itself: whole into host
memory (`read()`) or as a global array split over a mesh (`read_placed(shape, sharding, dtype)`),
of which this process reads only the rows its own devices hold. So code that merges never asks
which format a tensor came from.
"""

from __future__ import annotations

import abc
import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding

from jkarcher.errors import JkarcherError

CONFIG_NAME = "config.json"


class CheckpointError(JkarcherError):
    """A checkpoint is missing, unreadable, corrupt, truncated or in a refused format."""


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn an OSError while opening or reading `path` into a CheckpointError naming the file."""
    try:
        yield
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None


class StoredTensor(abc.ABC):
    """One tensor of a checkpoint, which reads itself.

    Every reader's tensors have a `name`, a `file` (the file or directory that error messages
    name), a `dtype` and a `shape`; they are hashable and equal when they select the same data,
    so a tensor wanted twice is read once.
    """

    name: str
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @abc.abstractmethod
    def rows(self, first: int, stop: int) -> StoredTensor:
        """The rows [first, stop) along axis 0, as a tensor of its own (no data is read)."""

    @abc.abstractmethod
    def read(self) -> np.ndarray:
        """The tensor (the rows it selects) in a new host array of its dtype and shape."""

    def read_placed(
        self, shape: tuple[int, ...], sharding: NamedSharding, dtype: np.dtype
    ) -> jax.Array:
        """The tensor as a global array of `shape` (its rows, then zero rows of padding) and
        `sharding`, cast to `dtype`; this process reads only the rows its own devices hold, each
        device's block with `rows(...).read()` (used in place on CPU), each distinct block once
        (a replicated array is read once, not once per device)."""
        blocks: dict[tuple[int, int], np.ndarray] = {}
        arrays = []
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            first, stop = (index[0].start or 0, index[0].stop or shape[0]) if shape else (0, 0)
            if (first, stop) not in blocks:
                blocks[first, stop] = self._block(shape, first, stop, dtype)
            arrays.append(jax.device_put(blocks[first, stop], device, may_alias=True))
        return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

    def _block(self, shape: tuple[int, ...], first: int, stop: int, dtype: np.dtype) -> np.ndarray:
        """Rows [first, stop) of the global array of `shape` (zero rows past the tensor's own), or
        the whole of a scalar, in `dtype`."""
        if shape:
            held = self.rows(min(first, self.shape[0]), min(stop, self.shape[0]))
            block = _padded_rows(held.read(), stop - first)
        else:
            block = self.read()
        return block if block.dtype == dtype else block.astype(dtype)

    def _check_rows(self, first: int, stop: int) -> None:
        """Raise ValueError unless [first, stop) are rows of this tensor."""
        if not self.shape or not 0 <= first <= stop <= self.shape[0]:
            raise ValueError(
                f"tensor {self.name!r} of shape {list(self.shape)} has no rows [{first}, {stop})"
            )


def _padded_rows(block: np.ndarray, rows: int) -> np.ndarray:
    """`block` with zero rows appended up to `rows` rows (itself when it has them all)."""
    if block.shape[0] == rows:
        return block
    padded = np.zeros((rows, *block.shape[1:]), block.dtype)
    padded[: block.shape[0]] = block
    return padded


class CheckpointReader:
    """The weights of one model directory: `source`, `path`, `config` and `tensors`, {name:
    StoredTensor}, which a reader sets when it opens the directory."""

    source: str
    path: Path
    config: dict
    tensors: dict[str, StoredTensor]

    @property
    def weights_dir(self) -> Path:
        """The directory that holds the weights (error messages name it)."""
        return self.path

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> StoredTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.weights_dir}: has no tensor {name!r}") from None

    def read(self, name: str) -> np.ndarray:
        return self.info(name).read()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} tensors)"


def load_model_config(path: Path) -> dict:
    """The model's `config.json` as a dict; {} when the checkpoint has none."""
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable model config ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the model config is not a JSON object")
    return config
