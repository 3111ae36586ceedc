"""Input integrity: a safetensors file is refused exactly when the `safetensors` library refuses
it (its byte ranges, sorted by offset, must start at 0, follow each other with no overlap or gap,
and end at the end of the file), with one line naming the file and the tensors; and a file that
cannot be opened or read is a CheckpointError naming it."""

import builtins
import errno
import json
import struct

import numpy as np
import pytest
from safetensors import SafetensorError, safe_open

from jkarcher.io import (
    Checkpoint,
    CheckpointError,
    file_io,
    read_header,
    read_tensor,
    safetensors_io,
)
from jkarcher.io.writer import save_checkpoint


def u8(begin, end):
    return {"dtype": "U8", "shape": [end - begin], "data_offsets": [begin, end]}


def write_raw(path, header: dict, data_bytes: int):
    """A safetensors file with this JSON header (padded to 8 bytes) and `data_bytes` data bytes."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = bytes(i % 251 for i in range(data_bytes))
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def library_accepts(path) -> bool:
    """The oracle: whether `safetensors.safe_open` reads every tensor of the file."""
    try:
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                f.get_tensor(name)
    except SafetensorError:
        return False
    return True


def we_accept(path) -> bool:
    try:
        read_header(path)
    except CheckpointError:
        return False
    return True


REFUSED = {
    "overlap": (
        {"a": u8(0, 8), "b": u8(4, 12)},
        12,
        "tensor 'b' (data_offsets [4, 12]) overlaps tensor 'a' (data_offsets [0, 8])",
    ),
    "listed out of data order, overlapping": (
        {"b": u8(2, 6), "a": u8(0, 4)},
        6,
        "tensor 'b' (data_offsets [2, 6]) overlaps tensor 'a' (data_offsets [0, 4])",
    ),
    "gap": (
        {"a": u8(0, 4), "b": u8(6, 10)},
        10,
        "data bytes [4, 6) between tensor 'a' and tensor 'b' belong to no tensor",
    ),
    "not starting at 0": (
        {"a": u8(2, 6), "b": u8(6, 8)},
        8,
        "tensor 'a', the first in the data, starts at data byte 2, not 0",
    ),
    "trailing bytes": (
        {"a": u8(0, 4), "b": u8(4, 8)},
        11,
        "3 bytes after the last tensor, 'b', belong to no tensor",
    ),
    "bytes after an empty header": (
        {},
        3,
        "3 bytes after a header that lists none belong to no tensor",
    ),
    "not ending at the end": ({"a": u8(0, 4), "b": u8(4, 8)}, 6, "truncated file: tensor 'b'"),
    "range ending before it starts": (
        {"a": u8(0, 4), "b": {"dtype": "U8", "shape": [0], "data_offsets": [8, 4]}},
        8,
        "tensor 'b' has data_offsets [8, 4], which end before they start",
    ),
    "fractional shape": (
        {"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}},
        4,
        "corrupt header entry for tensor 'a'",
    ),
}

ACCEPTED = {
    "contiguous": ({"a": u8(0, 4), "b": u8(4, 8)}, 8),
    "listed out of data order": ({"c": u8(8, 12), "a": u8(0, 4), "b": u8(4, 8)}, 12),
    "empty tensors": ({"a": u8(0, 0), "b": u8(0, 4), "c": u8(4, 4)}, 4),
    "no tensors": ({}, 0),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_as_the_library_refuses_with_one_line_naming_file_and_tensors(tmp_path, case):
    header, data_bytes, message = REFUSED[case]
    path = write_raw(tmp_path / "model.safetensors", header, data_bytes)
    assert not library_accepts(path)
    with pytest.raises(CheckpointError) as err:
        read_header(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_accepted_as_the_library_accepts_and_read_alike(tmp_path, case):
    """Header order does not matter, as the library sorts the ranges by offset."""
    header, data_bytes = ACCEPTED[case]
    path = write_raw(tmp_path / "model.safetensors", header, data_bytes)
    assert library_accepts(path)
    infos, _ = read_header(path)
    with safe_open(path, framework="numpy") as f:
        assert set(infos) == set(f.keys())
        for name, info in infos.items():
            np.testing.assert_array_equal(read_tensor(info), f.get_tensor(name))


def test_random_layouts_get_the_library_verdict(tmp_path):
    """Random small layouts (shuffled, shifted, shrunk or grown ranges, extra or missing data
    bytes) are accepted by read_header exactly when the library accepts them."""
    rng = np.random.default_rng(0)
    verdicts = set()
    for trial in range(150):
        sizes = rng.integers(0, 5, size=rng.integers(1, 5))
        ends = np.cumsum(sizes)
        ranges = [[int(e - s), int(e)] for s, e in zip(sizes, ends, strict=True)]
        if rng.random() < 0.6:
            entry = ranges[rng.integers(len(ranges))]
            entry[rng.integers(2)] += int(rng.choice([-2, -1, 1, 2]))
        header = {
            f"t{i}": {"dtype": "U8", "shape": [max(e - b, 0)], "data_offsets": [b, e]}
            for i, (b, e) in enumerate(ranges)
        }
        data_bytes = int(ends[-1]) + int(rng.choice([0, 0, 0, -1, 1]))
        path = write_raw(tmp_path / f"{trial}.safetensors", header, max(data_bytes, 0))
        verdict = library_accepts(path)
        assert we_accept(path) == verdict, header
        verdicts.add(verdict)
    assert verdicts == {True, False}


def test_a_file_jkarcher_writes_is_accepted_by_both(tmp_path):
    save_checkpoint(tmp_path, {"w": np.arange(6, dtype=np.float32), "b": np.ones(2, np.int8)})
    assert library_accepts(tmp_path / "model.safetensors")
    assert we_accept(tmp_path / "model.safetensors")


def test_a_directory_where_a_weight_file_is_expected(tmp_path):
    (tmp_path / "model-00001-of-00001.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="cannot read") as err:
        Checkpoint(tmp_path)
    assert str(tmp_path / "model-00001-of-00001.safetensors") in str(err.value)


@pytest.mark.parametrize(
    "error",
    [PermissionError(errno.EACCES, "Permission denied"), OSError(errno.EIO, "Input/output error")],
)
def test_a_file_that_cannot_be_opened_or_read_is_named(tmp_path, monkeypatch, error):
    save_checkpoint(tmp_path, {"w": np.arange(6, dtype=np.float32)})
    path = tmp_path / "model.safetensors"
    info = read_header(path)[0]["w"]

    def failing_open(file, *args, **kwargs):
        if str(file) == str(path):
            raise error
        return builtins.open(file, *args, **kwargs)

    for module in (safetensors_io, file_io):
        monkeypatch.setattr(module, "open", failing_open, raising=False)
    for read in (lambda: read_header(path), lambda: read_tensor(info)):
        with pytest.raises(CheckpointError, match=error.strerror) as err:
            read()
        assert str(err.value).startswith(f"{path}: ")


def test_a_file_that_vanished_after_its_header_was_read(tmp_path):
    save_checkpoint(tmp_path, {"w": np.arange(6, dtype=np.float32)})
    checkpoint = Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    for read in (checkpoint.read, lambda name: safetensors_io.map_tensor(checkpoint.info(name))):
        with pytest.raises(CheckpointError, match="No such file") as err:
            read("w")
        assert str(tmp_path / "model.safetensors") in str(err.value)
