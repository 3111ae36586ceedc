"""The selection order of `jkarcher.methods.selection` found over a tensor's blocks of rows: the
top-k trims (TIES, breadcrumbs) of tensors too large for the memory budget (docs/design.md,
"Memory").

A trim keeps, of each of M key arrays (one per model: the sortable keys of |delta_i|), the
entries at positions [start, stop) of the selection order (largest first, of equal keys the
lowest flat index first): the `stop` largest less the `start` largest. Each "k largest" (a cut)
is found exactly, in passes that hold a few histograms and one count per row, never the tensor:

1. digit rounds, one per 16 bits of the key (two for float32): each block counts its candidates,
   the keys that share the digits found so far, by their next digit, in histograms that the
   blocks add; `finish` takes the digit at which the cumulative count passes the cut's ascending
   rank D - k, as `selection.key_of_rank` does on a whole tensor. After the last, the boundary
   key T (the k-th largest) and how many keys lie above it are known;
2. a tie round: each block counts, row by row, its keys equal to T (concatenated in row order);
   `finish` finds the row R that holds the last tied key kept (of the tied keys,
   k - #above are kept, the lowest-index ones) and q, how many of R's tied keys are kept;
3. `kept`: the keys above T, and those equal to T in rows before R and the first q of row R.

Every count is an integer, so the masks are those of `selection.largest_mask` on the whole
tensor, whatever the blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jkarcher.methods.registry import Round
from jkarcher.methods.selection import DIGIT_BITS, digit_at_rank, digit_counts

_BINS = 1 << DIGIT_BITS


class Digits(NamedTuple):
    """What the digit rounds found so far, per key array and cut [M, C]: the cut's k, the
    boundary key's digits (`prefix`), its ascending rank among the candidates left
    (`remaining`), and how many keys lie above the candidates (`above`)."""

    cuts: jax.Array
    prefix: jax.Array
    remaining: jax.Array
    above: jax.Array


class Cut(NamedTuple):
    """Where each cut [M, C] falls: its boundary key T, the row R holding its last kept key
    equal to T, and how many keys equal to T row R keeps (q)."""

    boundary: jax.Array
    row: jax.Array
    in_row: jax.Array


def selection_rounds(
    keys_of: Callable[..., jax.Array],
    layout: Callable[[int], tuple[int, int]],
    cuts_of: Callable[[int, jax.Array], jax.Array],
    key_bits: int,
) -> tuple[Round, ...]:
    """The rounds that find the cuts of a tensor's keys.

    Args:
      keys_of: (stacked, base, **params) -> the block's keys [M, rows, ...], unsigned and
        `key_bits` wide.
      layout: n -> (M, C), the key arrays and cuts of n sources.
      cuts_of: (size, counts) -> the k of each cut [M, C] (0 <= k <= size, may be traced) of a
        whole tensor of `size` entries, given how many of each array's keys have each top digit
        (counts [M, 2^16]).
      key_bits: the width of the keys.

    Returns:
      The rounds; the last one's `finish` is a `Cut`, which `kept` turns into masks.
    """
    shifts = range(key_bits - DIGIT_BITS, -1, -DIGIT_BITS)
    digit_rounds = tuple(
        _digit_round(keys_of, layout, cuts_of, shift, key_bits) for shift in shifts
    )
    return (*digit_rounds, _tie_round(keys_of, layout))


def _digit_round(keys_of, layout, cuts_of, shift: int, key_bits: int) -> Round:
    """The round that finds the digit of each boundary key at bits [shift, shift + 16)."""
    first = shift + DIGIT_BITS == key_bits

    def statistics(stacked, weights, base, previous, *, key=None, first_row=0, **params):
        """[M, C, 2^16] (the first round: [M, 2^16], every key a candidate): the block's
        candidates counted by their digit."""
        del weights, key, first_row
        keys = keys_of(stacked, base, **params)
        flat = keys.reshape(keys.shape[0], -1)
        digits = ((flat >> shift) & (_BINS - 1)).astype(jnp.int32)
        if first:
            return jnp.stack([digit_counts(digits[m], 1) for m in range(flat.shape[0])])
        high = shift + DIGIT_BITS
        prefix = previous.prefix
        return jnp.stack(
            [
                jnp.stack(
                    [
                        digit_counts(digits[m], (flat[m] >> high) == (prefix[m, c] >> high))
                        for c in range(prefix.shape[1])
                    ]
                )
                for m in range(flat.shape[0])
            ]
        )

    def finish(sums, weights, previous, *, shape, **params) -> Digits:
        del params
        size = math.prod(shape)
        if first:
            cuts = jnp.asarray(cuts_of(size, sums), jnp.int32)
            counts = jnp.broadcast_to(sums[:, None, :], (*cuts.shape, _BINS))
            # The ascending rank of the k-th largest (any valid rank where k = 0: none is kept).
            rank = jnp.where(cuts == 0, 0, size - cuts)
            empty = jnp.zeros(cuts.shape, jnp.int32)
            previous = Digits(cuts, jnp.zeros(cuts.shape, _unsigned(key_bits)), rank, empty)
        digit, below, larger = digit_at_rank(counts if first else sums, previous.remaining)
        prefix = previous.prefix | (digit.astype(previous.prefix.dtype) << shift)
        above = previous.above + larger
        if shift == 0:
            # k = 0 keeps nothing: no key lies above the largest key, and none is tied with it.
            none = previous.cuts == 0
            prefix = jnp.where(none, ~jnp.zeros_like(prefix), prefix)
            above = jnp.where(none, 0, above)
        return Digits(previous.cuts, prefix, previous.remaining - below, above)

    def sums(shape, n) -> jax.ShapeDtypeStruct:
        leading = layout(n)[:1] if first else layout(n)
        return jax.ShapeDtypeStruct((*leading, _BINS), jnp.int32)

    return Round(statistics, finish, sums, added=True)


def _tie_round(keys_of, layout) -> Round:
    """The round that counts, row by row, the keys equal to each boundary key, and finds the
    row and count where the kept ones end."""

    def statistics(stacked, weights, base, previous, *, key=None, first_row=0, **params):
        """[M, C, rows]: how many keys of each row of the block equal each boundary key."""
        del weights, key, first_row
        keys = keys_of(stacked, base, **params)
        lines = _lines(keys)
        boundary = previous.prefix
        return jnp.stack(
            [
                jnp.stack(
                    [
                        jnp.sum(lines[m] == boundary[m, c], axis=-1, dtype=jnp.int32)
                        for c in range(boundary.shape[1])
                    ]
                )
                for m in range(lines.shape[0])
            ]
        )

    def finish(sums, weights, previous, *, shape, **params) -> Cut:
        del weights, shape, params
        needed = previous.cuts - previous.above
        cumulative = jnp.cumsum(sums, axis=-1, dtype=jnp.int32)
        row = jnp.sum(cumulative < needed[..., None], axis=-1, dtype=jnp.int32)
        before = jnp.take_along_axis(cumulative, jnp.maximum(row - 1, 0)[..., None], axis=-1)
        before = jnp.where(row > 0, before[..., 0], 0)
        return Cut(previous.prefix, row, needed - before)

    def sums(shape, n) -> jax.ShapeDtypeStruct:
        rows = shape[0] if shape else 1
        return jax.ShapeDtypeStruct((*layout(n), rows), jnp.int32)

    return Round(statistics, finish, sums)


def kept(keys: jax.Array, cut: Cut, first_row) -> jax.Array:
    """[M, C, rows, ...]: True at the keys of a block of rows [M, rows, ...] (its first row
    `first_row` of the whole tensor) that each cut keeps: those above its boundary key, and of
    those equal to it the ones in rows before `cut.row` and the first `cut.in_row` of that row."""
    lines = _lines(keys)
    rows = first_row + jnp.arange(lines.shape[1])
    masks = []
    for m in range(lines.shape[0]):
        per_cut = []
        for c in range(cut.boundary.shape[1]):
            boundary, last_row = cut.boundary[m, c], cut.row[m, c]
            tied = lines[m] == boundary
            local = jnp.clip(last_row - first_row, 0, lines.shape[1] - 1)
            line = lax.dynamic_index_in_dim(tied, local, axis=0, keepdims=False)
            line = line & (jnp.cumsum(line, dtype=jnp.int32) <= cut.in_row[m, c])
            keep = (
                (lines[m] > boundary)
                | (tied & (rows < last_row)[:, None])
                | ((rows == last_row)[:, None] & line[None, :])
            )
            per_cut.append(keep.reshape(keys.shape[1:]))
        masks.append(jnp.stack(per_cut))
    return jnp.stack(masks)


def _lines(keys: jax.Array) -> jax.Array:
    """Keys [M, rows, ...] as [M, rows, L] (a 0-d tensor's as one row of one key)."""
    rows = keys.shape[1] if keys.ndim > 1 else 1
    return keys.reshape(keys.shape[0], rows, -1)


def _unsigned(bits: int):
    return jnp.uint32 if bits == 32 else jnp.uint64
