"""Reading Hugging Face checkpoints in safetensors layout, one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor name
to its dtype, shape and byte range, then the raw data. Names, shapes and dtypes come from the
headers alone, so a whole merge can be planned and checked before any tensor is read. Pickled `.bin`
checkpoints are refused and never unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from jkarcher.io.checkpoint import (
    CONFIG_NAME,
    CheckpointError,
    CheckpointReader,
    StoredTensor,
    load_model_config,
    reading,
)
from jkarcher.io.file_io import read_range
from jkarcher.io.hf import resolve_checkpoint_dir

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # the `safetensors` library's limit

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo(StoredTensor):
    """Where one tensor lives: its file, dtype, shape and absolute byte range [start, end) in the
    file; it reads itself with `read_tensor`."""

    name: str
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    def rows(self, first: int, stop: int) -> TensorInfo:
        """The rows [first, stop) along axis 0, as a tensor of its own (no data is read)."""
        self._check_rows(first, stop)
        row_bytes = self.nbytes // self.shape[0] if self.shape[0] else 0
        return dataclasses.replace(
            self,
            shape=(stop - first, *self.shape[1:]),
            start=self.start + first * row_bytes,
            end=self.start + stop * row_bytes,
        )

    def read(self) -> np.ndarray:
        return read_tensor(self)


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one safetensors file's header: ({name: TensorInfo}, metadata).

    Every byte range is checked against the declared dtype and shape, and the ranges must tile
    the data that follows the header exactly, as the `safetensors` library requires: sorted by
    offset, the first starts at 0, each starts where the previous one ends, and the last ends at
    the end of the file. A truncated or corrupt file fails here, naming the file and the tensor.
    """
    path = Path(path)
    with reading(path), open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file (header of {header_len} bytes "
                f"in a file of {size} bytes)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_start, size)
    _check_layout(path, list(tensors.values()), data_start, size)
    return tensors, metadata


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_info(path: Path, name: str, entry, data_start: int, size: int) -> TensorInfo:
    try:
        dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        shape = tuple(shape)
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
    if not all(_is_count(n) for n in (*shape, begin, end)):
        raise CheckpointError(
            f"{path}: corrupt header entry for tensor {name!r} (shape {entry['shape']}, "
            f"data_offsets {entry['data_offsets']}: need whole numbers >= 0)"
        )
    if dtype_name not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
    if end < begin:
        raise CheckpointError(
            f"{path}: corrupt header: tensor {name!r} has data_offsets [{begin}, {end}], which "
            "end before they start"
        )
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise CheckpointError(
            f"{path}: corrupt header: tensor {name!r} of shape {list(shape)} {dtype_name} "
            f"declares {end - begin} bytes, needs {expected}"
        )
    if data_start + end > size:
        raise CheckpointError(
            f"{path}: truncated file: tensor {name!r} ends at byte {data_start + end}, "
            f"the file has {size} bytes"
        )
    return TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)


def _check_layout(path: Path, infos: list[TensorInfo], data_start: int, size: int) -> None:
    """The byte ranges, sorted by (start, end), must tile [data_start, size) with no overlap or
    gap (each already ends within the file: `_tensor_info`)."""
    position, previous = data_start, None
    for info in sorted(infos, key=lambda i: (i.start, i.end)):
        if previous is None and info.start != data_start:
            raise CheckpointError(
                f"{path}: corrupt header: tensor {info.name!r}, the first in the data, starts at "
                f"data byte {info.start - data_start}, not 0"
            )
        if info.start < position:
            raise CheckpointError(
                f"{path}: corrupt header: tensor {info.name!r} (data_offsets "
                f"{_offsets(info, data_start)}) overlaps tensor {previous.name!r} (data_offsets "
                f"{_offsets(previous, data_start)})"
            )
        if info.start > position:
            raise CheckpointError(
                f"{path}: corrupt header: data bytes [{position - data_start}, "
                f"{info.start - data_start}) between tensor {previous.name!r} and tensor "
                f"{info.name!r} belong to no tensor"
            )
        position, previous = info.end, info
    if position != size:
        last = f"the last tensor, {previous.name!r}," if previous else "a header that lists none"
        raise CheckpointError(
            f"{path}: corrupt file: {size - position} bytes after {last} belong to no tensor"
        )


def _offsets(info: TensorInfo, data_start: int) -> list[int]:
    return [info.start - data_start, info.end - data_start]


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Read one tensor from disk into a new NumPy array of its dtype and shape.

    The array's data is aligned (`jkarcher.io.buffers`), so `jax.device_put(array,
    may_alias=True)` on CPU can use it in place.
    """
    with reading(info.file):
        raw = read_range(info.file, info.start, info.nbytes)
    if raw.nbytes != info.nbytes:
        raise CheckpointError(f"{info.file}: truncated while reading tensor {info.name!r}")
    return raw.view(info.dtype).reshape(info.shape)


def map_tensor(info: TensorInfo) -> np.ndarray:
    """A read-only memory map of one tensor: only the pages that are used get read."""
    if not info.nbytes:
        return np.zeros(info.shape, info.dtype)
    with reading(info.file):
        mapped = np.memmap(
            info.file, info.dtype, "r", offset=info.start, shape=info.nbytes // info.dtype.itemsize
        )
    return mapped.view(np.ndarray).reshape(info.shape)


class Checkpoint(CheckpointReader):
    """The safetensors weights of one HF checkpoint directory (single file or sharded + index).

    Opening one reads the headers and `config.json` only; tensors are read one at a time.
    """

    def __init__(self, path_or_id: str | os.PathLike):
        self.source = str(path_or_id)
        self.path = resolve_checkpoint_dir(path_or_id)
        self.config = load_model_config(self.path / CONFIG_NAME)
        self.files = _weight_files(self.path)
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            infos, _ = read_header(file)
            for name, info in infos.items():
                if name in self.tensors:
                    raise CheckpointError(
                        f"{self.path}: tensor {name!r} appears in both "
                        f"{self.tensors[name].file.name} and {file.name}"
                    )
                self.tensors[name] = info
        self._check_index()

    def _check_index(self) -> None:
        index = self.path / INDEX_NAME
        if not index.is_file():
            return
        for name, file_name in _load_index(index).items():
            info = self.tensors.get(name)
            if info is None or info.file.name != file_name:
                raise CheckpointError(
                    f"{index}: lists tensor {name!r} in {file_name}, but that file does not hold it"
                )


def _load_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index}: unreadable index ({err})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: 'weight_map' is not a mapping")
    return weight_map


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.is_file():
        files = sorted(set(_load_index(index).values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{index}: names shard files that are missing: {missing}")
        return [path / f for f in files]
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME]
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if pickled:
        raise CheckpointError(
            f"{path}: has only pickled weights ({', '.join(pickled[:3])}); pickled checkpoints "
            "are refused because loading them can run arbitrary code. Convert them to "
            "safetensors first (e.g. with transformers: model.save_pretrained(dir, "
            "safe_serialization=True))"
        )
    raise CheckpointError(f"{path}: no safetensors weights found")
