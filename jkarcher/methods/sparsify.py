"""Keep-masks for task vectors: magnitude (TIES), outlier trimming (breadcrumbs), random (DARE,
DELLA), and the L1 rescaling of what is kept.

Each function decides which elements of one model's task vector delta = x - base survive; the
merge itself (`jkarcher.methods.task_arithmetic`) is a deterministic function of the masks, so a
test can hand the same mask to this library and to another implementation. Element counts follow
mergekit's integer rounding exactly (Python floats, truncation), so a density means the same
number of elements in both. Magnitudes are ranked in the selection order of
`jkarcher.methods.selection`: largest first and, among equal magnitudes, the lowest flat index
first; every count is then exact, however many magnitudes tie (as they do in bfloat16 weights).
Random masks draw only from the explicit `jax.random` key, row by row (`uniforms`): a block of a
tensor's rows draws what the whole tensor draws there (`RowKey`).

These are the sparsifiers of the baselines that Wang, Ye, Yin (2026, Sec. 4) compare the Karcher
merge with.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jkarcher.methods.selection import (
    largest_mask,
    position_range_mask,
    positions_along_last_axis,
)
from jkarcher.numerics import add_chunk_sums, chunk_sums, chunked

# Below this L1 norm (of the task vector or of what is kept) no rescaling is done.
RESCALE_EPS = 1e-7


class RowKey(NamedTuple):
    """The random key of a tensor, for a leaf that merges its rows from `first_row` on (a block
    of rows, `jkarcher.pipeline.budget`): its draws are the whole tensor's there."""

    key: jax.Array
    first_row: jax.Array


def row_key(key: jax.Array | RowKey) -> RowKey:
    """`key` as a RowKey: a plain key is a whole tensor's (its first row 0)."""
    return key if isinstance(key, RowKey) else RowKey(key, jnp.int32(0))


def uniforms(key: jax.Array | RowKey, shape: tuple[int, ...]) -> jax.Array:
    """Uniform draws in [0, 1) for the entries of a tensor of `shape`, row by row: row r (of the
    whole tensor, along axis 0) from fold_in(key, r), and a 0-d or 1-d tensor as row 0."""
    key, first_row = row_key(key)
    if len(shape) < 2:
        return jax.random.uniform(jax.random.fold_in(key, first_row), shape)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, first_row + jnp.arange(shape[0]))
    return jax.vmap(lambda row: jax.random.uniform(row, shape[1:]))(keys)


def magnitude_mask(delta: jax.Array, density: float) -> jax.Array:
    """TIES trimming (Yadav et al. 2023, arXiv:2306.01708): keep the k = max(1, floor(density D))
    entries of largest |delta| out of D, of equal magnitudes the lowest-index ones; density >= 1
    keeps everything."""
    if density >= 1:
        return jnp.ones(delta.shape, bool)
    (k,) = magnitude_cuts(delta.size, density)
    return largest_mask(jnp.abs(delta), k)


def magnitude_cuts(size: int, density: float) -> tuple[int]:
    """The count kept by `magnitude_mask` of a task vector of `size` entries: its largest k."""
    return (size if density >= 1 else max(1, int(density * size)),)


def outlier_mask(delta: jax.Array, density: float, gamma: float) -> jax.Array:
    """Model Breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795): drop the largest
    floor(gamma D) magnitudes as outliers and the smallest, keeping floor(density D) entries.

    With m = floor(density D) and g = floor(gamma D), the kept entries are those at positions
    [o, o + m) of the magnitudes' selection order (largest first, then lowest index), with
    o = min(g, D - m): when density + gamma > 1 fewer outliers are dropped so that m entries
    remain. (mergekit counts the same slice from the smallest: ascending ranks [D - o - m, D - o).)
    density >= 1 keeps everything.
    """
    if density >= 1:
        return jnp.ones(delta.shape, bool)
    stop, start = outlier_cuts(delta.size, density, gamma)
    return position_range_mask(jnp.abs(delta), start, stop)


def outlier_cuts(size: int, density: float, gamma: float) -> tuple[int, int]:
    """The counts of `outlier_mask` of a task vector of `size` entries: it keeps its largest
    `stop` less its largest `start`, (stop, start) = (o + m, o)."""
    if density >= 1:
        return size, 0
    kept = int(density * size)
    outliers = min(int(gamma * size), size - kept)
    return outliers + kept, outliers


def bernoulli_mask(key: jax.Array | RowKey, delta: jax.Array, density: float) -> jax.Array:
    """DARE's drop (Yu et al. 2023, arXiv:2311.03099): keep each entry of delta independently
    with probability density (`uniforms` below it)."""
    if density >= 1:
        return jnp.ones(delta.shape, bool)
    return uniforms(key, delta.shape) < density


def della_keep_probabilities(delta: jax.Array, density: float, epsilon: float) -> jax.Array:
    """DELLA's MagPrune probabilities (Deep et al. 2024, arXiv:2406.11617), as mergekit ranks.

    Along axis 1 (the whole vector for 0-d and 1-d tensors), rank the magnitudes r = 1..n,
    smallest first, and keep with probability p = density - epsilon + 2 epsilon (r - 1) / (n - 1):
    from density - epsilon for the smallest to density + epsilon for the largest, density on
    average. Ranks follow the selection order reversed, r = n - position: of equal magnitudes the
    lowest-index one ranks highest, as a top-k would keep it first. A length-1 axis gets
    p = density (mergekit divides 0 by 0 there).
    """
    rows = delta.reshape(1, -1) if delta.ndim < 2 else jnp.moveaxis(delta, 1, -1)
    n = rows.shape[-1]
    ranks = (n - 1) - positions_along_last_axis(jnp.abs(rows))
    spread = ranks.astype(jnp.float32) / (n - 1) if n > 1 else jnp.full(rows.shape, 0.5)
    probabilities = (density - epsilon) + 2 * epsilon * spread
    if delta.ndim < 2:
        return probabilities.reshape(delta.shape)
    return jnp.moveaxis(probabilities, -1, 1)


def della_mask(
    key: jax.Array | RowKey, delta: jax.Array, density: float, epsilon: float
) -> jax.Array:
    """A DELLA keep-mask: draws of `della_keep_probabilities` (`uniforms` below them); density
    >= 1 keeps all."""
    if density >= 1:
        return jnp.ones(delta.shape, bool)
    return uniforms(key, delta.shape) < della_keep_probabilities(delta, density, epsilon)


def l1_chunk_sums(delta: jax.Array, keep: jax.Array) -> jax.Array:
    """[2, K]: the sums of |delta| and of |delta * keep| over each chunk of delta (`chunked`),
    the first pass of the L1 rescale; blocks of rows concatenate theirs along K."""
    kept = jnp.where(keep, delta, 0.0)
    return chunk_sums([chunked(jnp.abs(x), 1) for x in (delta, kept)])[0]


def l1_rescale(sums: jax.Array) -> jax.Array:
    """The factor |delta|_1 / |delta * keep|_1 from the whole tensor's `l1_chunk_sums` [2, K]:
    mergekit's `rescale` (the default of DARE and DELLA), not the papers' 1/density or 1/p, so
    each model keeps its total update size. 1 when either norm is below RESCALE_EPS."""
    before, after = add_chunk_sums(sums)
    return jnp.where((before < RESCALE_EPS) | (after < RESCALE_EPS), 1.0, before / after)
