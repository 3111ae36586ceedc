"""Moving byte ranges between files and memory, past the page cache where that costs less.

Copying through the page cache costs the CPU more than the disk costs time: on this project's
2-core machine a `cat` of a 5 GB shard spent 12 s of system time (0.4 GB/s), and writing a 6 GB
merged model through the cache a fifth of all CPU time of the merge. So:

- `read_range` reads a range that the page cache mostly lacks with O_DIRECT (the disk writes
  into our buffer, nothing is copied), PARALLEL_REQUESTS pieces of PIECE_BYTES in flight, which
  kept the same disk at 1.2-1.6 GB/s for under 0.3 s of CPU; a range mostly in the cache (a warm
  rerun), or a small one, is copied from the cache.
- `write_range` writes the whole blocks of a range with O_DIRECT, each piece staged in an
  aligned buffer (O_DIRECT needs aligned memory), and the partial blocks at its ends, which it
  may share with its neighbours, through the cache.

A file system that refuses O_DIRECT (tmpfs, some network file systems) is read and written
through the cache.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import errno
import functools
import mmap
import os
import queue
from pathlib import Path

import numpy as np

from jkarcher.io.buffers import BUFFER_ALIGNMENT, aligned_bytes

# O_DIRECT needs file offsets, lengths and memory aligned to the device's logical block size;
# a page covers every block size in use.
DIRECT_ALIGNMENT = 4096
# Ranges smaller than this go through the page cache.
MIN_DIRECT_BYTES = 2**20
PIECE_BYTES = 8 * 2**20
PARALLEL_REQUESTS = 8


def read_range(path: Path, start: int, nbytes: int) -> np.ndarray:
    """The bytes [start, start + nbytes) of `path` as a uint8 array aligned to
    BUFFER_ALIGNMENT (`jkarcher.io.buffers`); fewer where the file ends first. OSError as the
    system raises it."""
    with open(path, "rb", buffering=0) as file:
        if nbytes >= MIN_DIRECT_BYTES and _cached_fraction(file.fileno(), start, nbytes) < 0.5:
            direct = _read_direct(path, start, nbytes)
            if direct is not None:
                return direct
        raw = aligned_bytes(nbytes)
        got = os.preadv(file.fileno(), [memoryview(raw)], start) if nbytes else 0
    return raw[:got]


def write_range(fd: int, path: Path, data: memoryview, offset: int) -> None:
    """Write `data` (bytes) at `offset` of `path`, open for writing as `fd`: its whole blocks
    with O_DIRECT, the rest through `fd`."""
    first = -(-offset // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
    stop = (offset + len(data)) // DIRECT_ALIGNMENT * DIRECT_ALIGNMENT
    if stop - first < MIN_DIRECT_BYTES or not _write_direct(
        path, data[first - offset :], first, stop
    ):
        _write_buffered(fd, data, offset)
        return
    _write_buffered(fd, data[: first - offset], offset)
    _write_buffered(fd, data[stop - offset :], stop)


def _write_buffered(fd: int, data: memoryview, offset: int) -> None:
    while data:  # one call writes at most about 2 GB
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _write_direct(path: Path, data: memoryview, first: int, stop: int) -> bool:
    """Write data[: stop - first] at `first` (both block-aligned) with O_DIRECT, in parallel
    pieces; False, having written nothing, where the file system refuses O_DIRECT."""
    fd = _open_direct(path, os.O_WRONLY)
    if fd is None:
        return False
    source = np.frombuffer(data, np.uint8)

    def write_piece(offset: int) -> None:
        length = min(PIECE_BYTES, stop - offset)
        staging = _staging_buffers().get()
        try:
            ctypes.memmove(staging.ctypes.data, source.ctypes.data + offset - first, length)
            _write_buffered(fd, memoryview(staging)[:length], offset)
        finally:
            _staging_buffers().put(staging)

    try:
        list(_pool().map(write_piece, range(first, stop, PIECE_BYTES)))
    finally:
        os.close(fd)
    return True


@functools.cache
def _staging_buffers() -> queue.SimpleQueue:
    """PARALLEL_REQUESTS aligned buffers of PIECE_BYTES, one per write in flight."""
    buffers = queue.SimpleQueue()
    for _ in range(PARALLEL_REQUESTS):
        buffers.put(aligned_bytes(PIECE_BYTES, DIRECT_ALIGNMENT))
    return buffers


def _read_direct(path: Path, start: int, nbytes: int) -> np.ndarray | None:
    """The range read with O_DIRECT into a buffer covering its aligned blocks, the data then
    moved to an aligned start if it is not on one; None where the file system refuses it."""
    first = start - start % DIRECT_ALIGNMENT
    stop = -(-(start + nbytes) // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
    fd = _open_direct(path, os.O_RDONLY)
    if fd is None:
        return None
    try:
        raw = aligned_bytes(stop - first, DIRECT_ALIGNMENT)
        pieces = [
            (offset, memoryview(raw)[offset - first : min(offset + PIECE_BYTES, stop) - first])
            for offset in range(first, stop, PIECE_BYTES)
        ]
        counts = _pool().map(lambda piece: os.preadv(fd, [piece[1]], piece[0]), pieces)
        got = _contiguous_bytes(pieces, counts)
    finally:
        os.close(fd)
    skip = start - first
    got = max(0, min(got - skip, nbytes))
    if skip % BUFFER_ALIGNMENT:
        ctypes.memmove(raw.ctypes.data, raw.ctypes.data + skip, got)
        skip = 0
    return raw[skip : skip + got]


def _open_direct(path: Path, flags: int) -> int | None:
    """`path` opened with O_DIRECT, or None where the platform or its file system has none."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError as err:
        if err.errno == errno.EINVAL:
            return None
        raise


def _contiguous_bytes(pieces, counts) -> int:
    """How many bytes from the first piece on were read without a gap (a short read is the end
    of the file)."""
    total = 0
    for (_, piece), got in zip(pieces, counts, strict=True):
        total += got
        if got < len(piece):
            break
    return total


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(PARALLEL_REQUESTS, "direct-io")


def _cached_fraction(fd: int, start: int, nbytes: int) -> float:
    """The fraction of the range's pages that the page cache holds (mincore on a mapping that
    is never touched); 1 where the platform cannot tell, so the range is read as before."""
    libc = _libc()
    if libc is None:
        return 1.0
    first = start - start % mmap.PAGESIZE
    length = start + nbytes - first
    address = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, first)
    if address in (None, ctypes.c_void_p(-1).value):
        return 1.0
    try:
        pages = -(-length // mmap.PAGESIZE)
        resident = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(address), length, resident) != 0:
            return 1.0
        return np.count_nonzero(np.frombuffer(resident, np.uint8) & 1) / pages
    finally:
        libc.munmap(ctypes.c_void_p(address), length)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """libc with mmap, mincore and munmap typed, or None where there is no O_DIRECT."""
    name = ctypes.util.find_library("c")
    if not name or not hasattr(os, "O_DIRECT"):
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    int_ = ctypes.c_int
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, int_, int_, int_, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc
