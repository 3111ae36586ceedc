"""Writing Hugging Face checkpoints: safetensors shards streamed tensor by tensor, the index
and JSON files (the side files and the output's config.json: `jkarcher.io.hf`; where the output
directory may be and how it appears only when complete: `jkarcher.io.output_dir`).

The shard layout (which tensor goes to which file, at which offset) is fixed before the first tensor
is merged, from names, shapes and dtypes alone, so each shard's header is written first and each
tensor is written at its offset as soon as it is ready, in any order: no shard is ever held in
memory. The layout follows the safetensors format (an 8-byte little-endian header length, a JSON
header padded to 8 bytes, the raw data with contiguous offsets) and the HF names
`model.safetensors` or `model-00001-of-0000K.safetensors` plus `model.safetensors.index.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import struct
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jkarcher.io.file_io import write_range
from jkarcher.io.safetensors_io import DTYPE_NAMES, INDEX_NAME, SINGLE_NAME

SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
HEADER_ALIGNMENT = 8


@dataclasses.dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output: its name, dtype and shape."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Shard:
    """One output file and the tensors it holds, in the order their data follows the header."""

    file_name: str
    tensors: tuple[OutputTensor, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in the file (the header not included)."""
        return sum(t.nbytes for t in self.tensors)

    def header(self) -> bytes:
        """The safetensors header: length prefix and JSON (padded with spaces to 8 bytes)."""
        entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor in self.tensors:
            entries[tensor.name] = {
                "dtype": DTYPE_NAMES[np.dtype(tensor.dtype)],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + tensor.nbytes],
            }
            offset += tensor.nbytes
        text = json.dumps(entries, separators=(",", ":")).encode()
        text += b" " * (-len(text) % HEADER_ALIGNMENT)
        return struct.pack("<Q", len(text)) + text


def natural_key(name: str) -> tuple:
    """Sort key that orders numbers inside names by value: layers.2 before layers.10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def plan_shards(tensors: Sequence[OutputTensor], max_bytes: int) -> tuple[Shard, ...]:
    """Cut the tensors, in the given order, into files of at most `max_bytes` of data each.

    A tensor larger than `max_bytes` gets a file of its own. One file is named `model.safetensors`;
    several are `model-00001-of-0000K.safetensors` and need an index.
    """
    groups: list[list[OutputTensor]] = []
    size = 0
    for tensor in tensors:
        if not groups or (size + tensor.nbytes > max_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    if len(groups) <= 1:
        return (Shard(SINGLE_NAME, tuple(groups[0]) if groups else ()),)
    count = len(groups)
    return tuple(
        Shard(SHARD_NAME.format(index=i + 1, count=count), tuple(group))
        for i, group in enumerate(groups)
    )


def create_shard_files(directory: str | os.PathLike, shards: Sequence[Shard]) -> None:
    """Create the planned files, each with its header and its full length (data still zeros)."""
    for shard in shards:
        header = shard.header()
        with open(Path(directory) / shard.file_name, "wb") as file:
            file.write(header)
            file.truncate(len(header) + shard.nbytes)


class ShardWriter:
    """Writes planned tensors, in any order, at their planned places in the shard files.

    `write(name, *pieces)` puts one whole tensor at its offset: one array or consecutive blocks
    of rows (their concatenation along axis 0); `write_rows(name, first_row, block)` puts some
    of its rows (a scalar counts as one row). Dtypes and sizes are checked against the plan. The
    writer creates the files (`create_shard_files`) and `close` checks that every planned row
    was written; with `shared`, several processes write parts of the same files, created
    beforehand by one of them, and the completeness check is the caller's, across processes,
    with `rows_written`.
    """

    def __init__(self, directory: str | os.PathLike, shards: Sequence[Shard], shared: bool = False):
        if not shared:
            create_shard_files(directory, shards)
        self._shared = shared
        self._files = []
        self._places: dict[str, tuple[Path, int, int, OutputTensor]] = {}
        for shard in shards:
            path = Path(directory) / shard.file_name
            file = open(path, "r+b")
            self._files.append(file)
            offset = len(shard.header())
            for tensor in shard.tensors:
                self._places[tensor.name] = (path, file.fileno(), offset, tensor)
                offset += tensor.nbytes
        self._rows_written = dict.fromkeys(self._places, 0)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        self._close_files()

    def write(self, name: str, *pieces: np.ndarray) -> None:
        if self._rows_written.get(name):
            raise ValueError(f"tensor {name!r} was written already")
        _check_pieces(self._planned(name), pieces)
        first_row = 0
        for piece in pieces:
            self.write_rows(name, first_row, piece)
            first_row += piece.shape[0] if piece.ndim else 1

    def write_rows(self, name: str, first_row: int, block: np.ndarray) -> None:
        """Rows [first_row, first_row + len(block)) of a tensor (a scalar: all of it, row 0)."""
        planned = self._planned(name)
        path, descriptor, offset, _ = self._places[name]
        rows = _rows(planned)
        count = block.shape[0] if block.ndim else 1
        if block.dtype != np.dtype(planned.dtype):
            raise ValueError(f"tensor {name!r}: got dtype {block.dtype}, planned {planned.dtype}")
        if tuple(block.shape[1:]) != tuple(planned.shape[1:]) or not 0 <= first_row <= rows - count:
            raise ValueError(
                f"tensor {name!r}: a block of shape {list(block.shape)} at row {first_row} does "
                f"not fit {list(planned.shape)}"
            )
        data = memoryview(np.ascontiguousarray(block).reshape(-1).view(np.uint8))
        offset += first_row * (planned.nbytes // rows if rows else 0)
        self._rows_written[name] += count
        write_range(descriptor, path, data, offset)

    def rows_written(self) -> dict[str, int]:
        """Rows written so far, by tensor name."""
        return dict(self._rows_written)

    def close(self) -> None:
        """Close the files; every planned tensor must have been written (unless `shared`)."""
        missing = [n for n, t in self._places.items() if self._rows_written[n] < _rows(t[3])]
        if missing and not self._shared:
            first = min(missing, key=natural_key)
            raise ValueError(f"the output is incomplete: tensor {first!r} was never written")
        self._close_files()

    def _planned(self, name: str) -> OutputTensor:
        if name not in self._places:
            raise ValueError(f"tensor {name!r} was not planned")
        return self._places[name][3]

    def _close_files(self) -> None:
        for file in self._files:
            file.close()


def _rows(tensor: OutputTensor) -> int:
    """A tensor's rows (the length of its first axis); a scalar has one."""
    return tensor.shape[0] if tensor.shape else 1


def _check_pieces(planned: OutputTensor, pieces: Sequence[np.ndarray]) -> None:
    dtype = np.dtype(planned.dtype)
    total = 0
    for piece in pieces:
        if piece.dtype != dtype:
            raise ValueError(f"tensor {planned.name!r}: got dtype {piece.dtype}, planned {dtype}")
        if len(pieces) > 1 and tuple(piece.shape[1:]) != tuple(planned.shape[1:]):
            raise ValueError(
                f"tensor {planned.name!r}: a block of shape {list(piece.shape)} does not fit "
                f"{list(planned.shape)}"
            )
        total += piece.nbytes
    if total != planned.nbytes:
        raise ValueError(f"tensor {planned.name!r}: got {total} bytes, planned {planned.nbytes}")


def write_index(directory: str | os.PathLike, shards: Sequence[Shard]) -> None:
    """Write `model.safetensors.index.json`: total data size and the file of every tensor."""
    index = {
        "metadata": {"total_size": sum(shard.nbytes for shard in shards)},
        "weight_map": {t.name: shard.file_name for shard in shards for t in shard.tensors},
    }
    write_json(Path(directory) / INDEX_NAME, index)


def save_checkpoint(
    directory: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    max_shard_bytes: int | None = None,
) -> None:
    """Write in-memory arrays as HF safetensors weights (sharded, with an index, when needed).

    For small checkpoints (examples, tests); large merges stream through `ShardWriter` instead.
    """
    names = sorted(tensors, key=natural_key)
    layout = [OutputTensor(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names]
    shards = plan_shards(layout, max_shard_bytes or sum(t.nbytes for t in layout) + 1)
    Path(directory).mkdir(parents=True, exist_ok=True)
    with ShardWriter(directory, shards) as writer:
        for name in names:
            writer.write(name, tensors[name])
    if len(shards) > 1:
        write_index(directory, shards)


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Write a JSON file, indented like the files HF tools write."""
    Path(path).write_text(json.dumps(value, indent=2) + "\n")


class WriteBehind:
    """Writes to a `ShardWriter` from a background thread, so that writing overlaps merging.

    At most `depth` tensors wait to be written (each `write` blocks while the queue is full). An
    error in the thread is raised by the next `write`, or when the block ends; when the block ends
    with an error, tensors still waiting are dropped.
    """

    _DONE = object()

    def __init__(self, writer: ShardWriter, depth: int = 2):
        self._writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._write_all, name="write-behind", daemon=True)

    def __enter__(self) -> WriteBehind:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._cancelled = exc_type is not None
        self._queue.put(self._DONE)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error

    def write(self, name: str, *pieces: np.ndarray) -> None:
        self._put(self._writer.write, name, *pieces)

    def write_rows(self, name: str, first_row: int, block: np.ndarray) -> None:
        self._put(self._writer.write_rows, name, first_row, block)

    def _put(self, write, *args) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((write, args))

    def _write_all(self) -> None:
        while (item := self._queue.get()) is not self._DONE:
            if self._error is None and not self._cancelled:  # else drain, so no put blocks
                try:
                    write, args = item
                    write(*args)
                except BaseException as err:  # raised in the merging thread
                    self._error = err
