"""The host buffers that tensors are read into: aligned for JAX, and large ones reused.

Arrays are read into buffers aligned to BUFFER_ALIGNMENT bytes, so that `jax.device_put(array,
may_alias=True)` on CPU uses them in place. A fresh buffer costs the kernel a zeroed page per
4 KiB, at a few GB/s: reading the MLP matrices of a 3B model into fresh buffers spent more time
zeroing pages than copying data. Large buffers are therefore anonymous memory maps that go back
to a pool once the last array using them is gone, and are taken again by the next tensor of
about their size, with their pages already in place.
"""

from __future__ import annotations

import mmap
import threading
import weakref

import numpy as np

BUFFER_ALIGNMENT = 64
# Buffers at least this large are memory maps of their own, kept in the pool when freed.
MAP_BUFFER_BYTES = 32 * 2**20
# The pool keeps at most this many bytes of free buffers; it drops the oldest beyond that. (What a
# group of same-sized tensors reuses: a 3B model's MLP task, five 45 MB matrices, twice over.)
POOL_BYTES = 2**29


def aligned_bytes(nbytes: int, alignment: int = BUFFER_ALIGNMENT) -> np.ndarray:
    """A uint8 array of `nbytes` whose data starts on an `alignment` boundary (at most a page),
    its contents undefined (the caller fills it).

    Buffers of at least MAP_BUFFER_BYTES come from the pool (`BufferPool`); smaller ones from
    the heap, whose freed memory the allocator reuses without page faults.
    """
    if nbytes >= MAP_BUFFER_BYTES:
        return _POOL.take(nbytes)
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    offset = -raw.ctypes.data % alignment
    return raw[offset : offset + nbytes]


class BufferPool:
    """Anonymous memory maps handed out as arrays, and taken back when no array uses them.

    `take(nbytes)` returns a free map of nbytes to 2 nbytes (the smallest), or else releases
    every free map (a merge reads its tensors grouped by shape, so a size the pool cannot serve
    means the group that used them is done) and maps a new one, populated when mapped
    (MAP_POPULATE, where the platform has it: one system call instead of a page fault per page
    as a read first touches it). Every array made from the buffer, views included, holds one
    memoryview, its base; when that memoryview is freed, the map returns to the pool, which
    keeps at most `max_free_bytes` of free maps.
    """

    def __init__(self, max_free_bytes: int = POOL_BYTES):
        self._max_free_bytes = max_free_bytes
        self._free: list[mmap.mmap] = []
        # Reentrant: a buffer freed by a garbage collection inside `take` comes back at once.
        self._lock = threading.RLock()

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            fitting = [m for m in self._free if nbytes <= len(m) <= 2 * nbytes]
            mapped = min(fitting, key=len) if fitting else None
            if mapped is not None:
                self._free.remove(mapped)
            else:
                self._free.clear()  # unmapped once nothing refers to them
        if mapped is None:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
            mapped = mmap.mmap(-1, nbytes, flags=flags)
        array = np.frombuffer(memoryview(mapped)[:nbytes], dtype=np.uint8)
        # NumPy holds the buffer through a memoryview of its own, the base of every view of it.
        weakref.finalize(array.base, self._give_back, mapped)
        return array

    def limit(self, max_free_bytes: int) -> None:
        """Keep at most `max_free_bytes` of free maps from now on."""
        with self._lock:
            self._max_free_bytes = max_free_bytes
            self._trim()

    def free_bytes(self) -> int:
        """The bytes of the free maps that the pool holds."""
        with self._lock:
            return sum(len(m) for m in self._free)

    def _give_back(self, mapped: mmap.mmap) -> None:
        with self._lock:
            self._free.append(mapped)
            self._trim()

    def _trim(self) -> None:
        while sum(len(m) for m in self._free) > self._max_free_bytes:
            self._free.pop(0)  # unmapped once nothing refers to it


_POOL = BufferPool()


def limit_free_buffers(max_free_bytes: int) -> None:
    """Keep at most min(POOL_BYTES, `max_free_bytes`) of free read buffers (a run's budget)."""
    _POOL.limit(min(POOL_BYTES, max_free_bytes))
