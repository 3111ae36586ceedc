"""Exact order statistics of tensors, for top-k, trimming, rank and quantile masks.

The selection order. TIES, breadcrumbs, SCE and DELLA select entries by their place in one total
order: values largest first (-0.0 below +0.0) and, among equal values, the lowest flat (row-major)
index first. The position of an entry is its 0-based place in that order. `largest_mask(values, k)`
keeps positions < k, exactly k entries however many values tie at the k-th (the lowest-index ones
among the tied); `position_range_mask` keeps positions in [start, stop);
`positions_along_last_axis` gives each entry's position within its slice along the last axis.
Ties are common in bfloat16 checkpoints, and this rule keeps the counts that mergekit keeps (it
takes exactly k entries from a sort, in whatever order its sort leaves ties).

Speed. Sorting is the obvious way to select and a slow one for large tensors on XLA's CPU backend:
on a 4864 x 896 float32 tensor a full sort takes about 1.2 s and `lax.top_k` about 1.1 s, where
the exact top-k below takes about 0.03 s. Each value maps to an unsigned integer key of the same
order; the key at a given rank is found digit by digit, 16 bits at a time, from a histogram of the
candidates' next digit (radix selection). Up to 2^17 entries a sort of the keys is as fast (3 ms for
2^16) and compiles several times faster, so small tensors take that path. A top-k then keeps the
keys above the k-th largest and, of those equal to it, the first ones in index order, found from
per-block counts without a scan of the whole tensor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

DIGIT_BITS = 16
# Up to this many entries, keys are sorted instead (faster to compile, as fast to run).
_SORT_MAX = 1 << 17
# Tied entries are counted in blocks of this many before the one block holding the cut is scanned.
_COUNT_BLOCK = 1024
_UNSIGNED = {4: jnp.uint32, 8: jnp.uint64}


def sortable_keys(values: jax.Array) -> jax.Array:
    """Unsigned integer keys ordered as the float values are (-0.0 just below +0.0).

    Non-negative floats keep their bit pattern with the top bit set; negative floats have every
    bit flipped, which reverses their order and puts them below the non-negative ones.
    """
    if values.dtype not in (jnp.float32, jnp.float64):
        values = values.astype(jnp.float32)
    unsigned = _UNSIGNED[values.dtype.itemsize]
    bits = lax.bitcast_convert_type(values, unsigned)
    sign = unsigned(1) << (8 * values.dtype.itemsize - 1)
    return jnp.where(bits & sign, ~bits, bits | sign)


def key_of_rank(keys: jax.Array, rank: jax.Array | int) -> jax.Array:
    """The key at ascending 0-based `rank` (0 <= rank < size; may be traced) of a key array.

    Radix selection: for each 16-bit digit from the top, count the candidates (keys that share
    the digits chosen so far) by their next digit; the digit whose cumulative count first exceeds
    the remaining rank is the answer's, and the counts below it are subtracted from the rank.
    """
    keys = keys.reshape(-1)
    if keys.size <= _SORT_MAX:
        return jnp.sort(keys)[rank]
    total_bits = 8 * keys.dtype.itemsize
    answer = jnp.zeros((), keys.dtype)
    remaining = jnp.asarray(rank, jnp.int32)
    for shift in range(total_bits - DIGIT_BITS, -1, -DIGIT_BITS):
        digits = ((keys >> shift) & (2**DIGIT_BITS - 1)).astype(jnp.int32)
        if shift + DIGIT_BITS == total_bits:
            candidate = jnp.ones(keys.shape, jnp.int32)
        else:
            above = shift + DIGIT_BITS
            candidate = ((keys >> above) == (answer >> above)).astype(jnp.int32)
        digit, below, _ = digit_at_rank(digit_counts(digits, candidate), remaining)
        remaining = remaining - below
        answer = answer | (digit.astype(keys.dtype) << shift)
    return answer


def digit_counts(digits: jax.Array, weights) -> jax.Array:
    """[2^16]: how many of `digits` (int32 in [0, 2^16)) take each value, each counted with its
    weight (0 or 1 per entry, or 1)."""
    counts = jnp.zeros((2**DIGIT_BITS,), jnp.int32)
    return counts.at[digits].add(jnp.asarray(weights, jnp.int32), mode="promise_in_bounds")


def digit_at_rank(counts: jax.Array, rank: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Of candidates counted by their digit (`counts` [..., 2^16]), the digit of the one at
    ascending `rank` [...], how many candidates have a smaller digit, and how many a larger."""
    cumulative = jnp.cumsum(counts, axis=-1, dtype=jnp.int32)
    digit = jnp.sum(cumulative <= rank[..., None], axis=-1, dtype=jnp.int32)
    through = jnp.take_along_axis(cumulative, digit[..., None], axis=-1)[..., 0]
    below = jnp.take_along_axis(cumulative, jnp.maximum(digit - 1, 0)[..., None], axis=-1)
    below = jnp.where(digit > 0, below[..., 0], 0)
    return digit, below, cumulative[..., -1] - through


def largest_mask(values: jax.Array, k: jax.Array | int) -> jax.Array:
    """True at positions < k of the selection order (1 <= k <= size; k may be traced): the k
    largest values, and of the values tied with the k-th largest the lowest-index ones, so that
    exactly k entries are True."""
    keys = sortable_keys(values).reshape(-1)
    boundary = key_of_rank(keys, values.size - k)
    above = keys > boundary
    tied = keys == boundary
    needed = k - jnp.sum(above, dtype=jnp.int32)
    last_kept = _index_of_nth_true(tied, needed)
    keep = above | (tied & (lax.iota(jnp.int32, keys.size) <= last_kept))
    return keep.reshape(values.shape)


def position_range_mask(values: jax.Array, start: int, stop: int) -> jax.Array:
    """True at positions start <= p < stop of the selection order (static; exactly
    max(0, min(stop, size) - start) entries): the largest `stop` minus the largest `start`."""
    stop = min(stop, values.size)
    if stop <= start:
        return jnp.zeros(values.shape, bool)
    keep = largest_mask(values, stop) if stop < values.size else jnp.ones(values.shape, bool)
    return keep & ~largest_mask(values, start) if start > 0 else keep


def positions_along_last_axis(values: jax.Array) -> jax.Array:
    """Each entry's 0-based position in the selection order of its slice along the last axis.

    One sort (by descending key, then by index) carries the indices along, and a scatter inverts
    the permutation: about twice as fast on XLA's CPU backend as argsorting twice.
    """
    axis = values.ndim - 1
    indices = lax.broadcasted_iota(jnp.int32, values.shape, axis)
    descending = ~sortable_keys(values)
    _, order = lax.sort((descending, indices), dimension=axis, num_keys=2)
    positions = jnp.zeros(values.shape, jnp.int32)
    batch = jnp.indices(values.shape[:-1], sparse=True)
    return positions.at[(*(b[..., None] for b in batch), order)].set(indices, unique_indices=True)


def order_statistic(values: jax.Array, rank: int) -> jax.Array:
    """The value at ascending 0-based `rank` of all elements of `values` (float32 or float64)."""
    keys = sortable_keys(values)
    key = key_of_rank(keys, rank)
    sign = key.dtype.type(1) << (8 * key.dtype.itemsize - 1)
    bits = jnp.where(key & sign, key & ~sign, ~key)
    return lax.bitcast_convert_type(bits, _float_of(key.dtype))


def _index_of_nth_true(flags: jax.Array, n: jax.Array) -> jax.Array:
    """The flat index of the n-th True (1-based n, may be traced) of a 1-d boolean array.

    Counts per block of _COUNT_BLOCK entries locate the block holding it; a cumulative count
    within that one block locates the entry, so no scan runs over the whole array.
    """
    pad = -flags.size % _COUNT_BLOCK
    padded = jnp.pad(flags, (0, pad)) if pad else flags
    per_block = jnp.cumsum(padded.reshape(-1, _COUNT_BLOCK).sum(axis=1, dtype=jnp.int32))
    block = jnp.sum(per_block < n, dtype=jnp.int32)
    before = jnp.where(block > 0, per_block[jnp.maximum(block - 1, 0)], 0)
    within = lax.dynamic_slice(padded, (block * _COUNT_BLOCK,), (_COUNT_BLOCK,))
    offset = jnp.sum(jnp.cumsum(within, dtype=jnp.int32) < n - before, dtype=jnp.int32)
    return block * _COUNT_BLOCK + offset


def _float_of(unsigned) -> jnp.dtype:
    return jnp.float32 if jnp.dtype(unsigned).itemsize == 4 else jnp.float64
