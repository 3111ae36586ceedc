"""Reading byte ranges: through the page cache or straight from the disk, the same bytes."""

import os

import numpy as np
import pytest

from jkarcher.io import file_io
from jkarcher.io.buffers import BUFFER_ALIGNMENT

SIZE = 5 * file_io.PIECE_BYTES // 2 + 12345  # pieces, and a last one that ends the file


@pytest.fixture
def data_file(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8)
    path = tmp_path / "data.bin"
    path.write_bytes(data.tobytes())
    return path, data


def _evict(path):
    """Drop the file from the page cache (written back first), as a cold disk would hold it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("start", [0, 8, 48, 4096, 4096 + 100, 3 * 2**20 + 1])
@pytest.mark.parametrize("cached", [True, False])
def test_a_range_reads_its_bytes_aligned_cached_or_not(data_file, start, cached, monkeypatch):
    path, data = data_file
    direct_reads = []
    read_direct = file_io._read_direct
    monkeypatch.setattr(
        file_io, "_read_direct", lambda *a: direct_reads.append(a) or read_direct(*a)
    )
    if not cached:
        _evict(path)
    nbytes = SIZE - start - 1000
    got = file_io.read_range(path, start, nbytes)
    np.testing.assert_array_equal(got, data[start : start + nbytes])
    assert got.ctypes.data % BUFFER_ALIGNMENT == 0
    # A cold range goes straight to the disk; a cached one never does.
    assert bool(direct_reads) == (not cached)


def test_a_range_past_the_end_of_the_file_io_what_is_there(data_file):
    path, data = data_file
    _evict(path)
    got = file_io.read_range(path, SIZE - 3 * 2**20, 4 * 2**20)
    np.testing.assert_array_equal(got, data[SIZE - 3 * 2**20 :])


def test_the_cached_fraction_follows_the_page_cache(data_file):
    path, _ = data_file
    with open(path, "rb") as f:
        f.read()
        assert file_io._cached_fraction(f.fileno(), 100, SIZE - 100) == 1.0
    _evict(path)
    with open(path, "rb") as f:
        assert file_io._cached_fraction(f.fileno(), 100, SIZE - 100) < 0.5


def test_a_file_system_without_direct_reads_is_read_through_the_cache(data_file, monkeypatch):
    path, data = data_file
    _evict(path)
    real_open = os.open

    def refusing_direct(file, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(file, flags, *args)

    monkeypatch.setattr(os, "open", refusing_direct)
    np.testing.assert_array_equal(file_io.read_range(path, 7, SIZE - 7), data[7:])


@pytest.mark.parametrize("offset", [0, 8, 4096, 4096 * 3 + 100])
@pytest.mark.parametrize("nbytes", [100, 2 * file_io.PIECE_BYTES + 4097])
def test_a_written_range_lands_between_its_neighbours_untouched(tmp_path, offset, nbytes):
    path = tmp_path / "out.bin"
    size = offset + nbytes + 5000
    before = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    path.write_bytes(before.tobytes())
    data = np.random.default_rng(2).integers(0, 256, nbytes, dtype=np.uint8)
    with open(path, "r+b") as f:
        file_io.write_range(f.fileno(), path, memoryview(data), offset)
    expected = before.copy()
    expected[offset : offset + nbytes] = data
    np.testing.assert_array_equal(np.fromfile(path, np.uint8), expected)
