"""Read buffers: aligned, and large ones reused only once no array uses them."""

import gc

import jax
import numpy as np

from jkarcher.io.buffers import BUFFER_ALIGNMENT, MAP_BUFFER_BYTES, BufferPool, aligned_bytes

MIB = 2**20


def test_buffers_are_aligned_small_and_large():
    for nbytes in (1, 1000, MAP_BUFFER_BYTES + 5):
        buffer = aligned_bytes(nbytes)
        assert buffer.nbytes == nbytes and buffer.ctypes.data % BUFFER_ALIGNMENT == 0


def test_a_buffer_returns_only_when_its_last_view_is_gone():
    pool = BufferPool(max_free_bytes=200 * MIB)
    first = pool.take(40 * MIB)
    first[:] = 7
    address = first.ctypes.data
    rows = first.view(np.uint16).reshape(1024, -1)[3:]
    del first
    gc.collect()
    assert pool.free_bytes() == 0
    second = pool.take(40 * MIB)
    assert second.ctypes.data != address  # still in use by `rows`
    assert np.all(rows == 7 * 257)
    del rows
    gc.collect()
    assert pool.free_bytes() == 40 * MIB
    assert pool.take(30 * MIB).ctypes.data == address  # reused: 30 MiB fits a 40 MiB map
    del second


def test_a_buffer_that_jax_uses_in_place_returns_when_the_jax_array_is_gone():
    pool = BufferPool(max_free_bytes=200 * MIB)
    values = pool.take(64 * MIB).view(np.float32)
    values[:] = 1.5
    array = jax.device_put(values, may_alias=True)
    del values
    gc.collect()
    assert pool.free_bytes() == 0
    assert float(array[-1]) == 1.5
    del array
    gc.collect()
    assert pool.free_bytes() == 64 * MIB


def test_sizes_far_apart_do_not_share_and_the_pool_is_bounded():
    pool = BufferPool(max_free_bytes=100 * MIB)
    large = pool.take(90 * MIB)
    address = large.ctypes.data
    del large
    gc.collect()
    small = pool.take(40 * MIB)  # under half the free map: a map of its own
    assert small.ctypes.data != address
    del small
    gc.collect()
    assert pool.free_bytes() <= 100 * MIB
