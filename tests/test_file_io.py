"""Reading byte ranges: through the page cache or straight from the disk, the same bytes."""

import os

import numpy as np
import pytest
import safetensors.numpy
from helpers_checkpoints import merge_checkpoints, tiny_config, tiny_weights, write_tiny
from karcher_reference import karcher_reference, relative_error

import jkarcher
from jkarcher.io import file_io
from jkarcher.io.buffers import BUFFER_ALIGNMENT
from jkarcher.io.safetensors_io import read_header

SIZE = 5 * file_io.PIECE_BYTES // 2 + 12345  # pieces, and a last one that ends the file


@pytest.fixture
def data_file(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8)
    path = tmp_path / "data.bin"
    path.write_bytes(data.tobytes())
    return path, data


def _evict(path):
    """Drop the file from the page cache (written back first), as a cold disk would hold it;
    skip the test where the file system keeps it there (tmpfs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if file_io._cached_fraction(fd, 0, os.fstat(fd).st_size) >= 0.5:
            pytest.skip(f"{path.parent}: its file system keeps files in memory")
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


def test_bf16_checkpoints_merged_from_a_cold_disk_equal_jkarcher_merge(tmp_path, monkeypatch):
    """bf16 sources whose embeddings (1.3 MB) are read with O_DIRECT from files whose data
    starts off a 64-byte boundary, and written with O_DIRECT: the output, read back by the
    `safetensors` library, equals `jkarcher.merge` on the sources (read by that library too),
    and the embedding is within the stopping tolerance plus one bf16 rounding of the float64
    Karcher mean."""
    config = tiny_config(vocab_size=40960)
    models = [write_tiny(tmp_path / f"m{i}", tiny_weights(config, i), config) for i in range(3)]
    files = [path / "model.safetensors" for path in models]
    trees = [safetensors.numpy.load_file(f) for f in files]
    assert read_header(files[0])[0]["model.embed_tokens.weight"].start % BUFFER_ALIGNMENT
    for f in files:
        _evict(f)
    calls = {"_read_direct": 0, "_write_direct": 0}
    for name in calls:
        real = getattr(file_io, name)
        monkeypatch.setattr(
            file_io,
            name,
            lambda *a, real=real, name=name: calls.update({name: calls[name] + 1}) or real(*a),
        )
    merge_checkpoints(models, tmp_path / "out")
    assert calls["_read_direct"] >= 3 and calls["_write_direct"] >= 1
    got = safetensors.numpy.load_file(tmp_path / "out" / "model.safetensors")
    want = {k: np.asarray(v) for k, v in jkarcher.merge(trees).items()}
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    name = "model.embed_tokens.weight"
    stacked = np.stack([t[name].astype(np.float64) for t in trees])
    assert relative_error(got[name], karcher_reference(stacked, np.ones(3))) <= 1e-6 + 2.0**-8
