"""Merges that combine the sources linearly, with coefficients from their Gram matrix: the
Karcher mean of whole tensors, SLERP, NuSLERP and multi-SLERP of whole tensors, Model Stock.

Each needs only the inner products G_ij = <x_i, x_j> of the sources (of the task vectors
x_i - base, with a base) to find coefficients gamma [N], and then merges

    merged = sum_j gamma_j x_j        (base + sum_j gamma_j (x_j - base) with a base),

so a tensor too large for the memory budget merges in two passes over blocks of rows
(`Passes`, docs/design.md, "Memory"): the first sums the products x_i x_j (i <= j) per chunk
of each line (`gram_chunk_sums`, which blocks concatenate into the whole tensor's bit for bit),
`finish` adds the chunks into G and solves for gamma, the second combines each block's rows.
A method's own leaf runs the same three steps in one program (`Passes.in_one_program`).
Variants that merge each line along the last axis as its own vector (`line_by_line`) take the
same coefficients of each line's Gram matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import numpy as np

from jkarcher.karcher import gram_chunk_sums, gram_from_chunk_sums
from jkarcher.methods.registry import Passes, Round
from jkarcher.numerics import (
    chunked,
    chunks_per_row,
    compute_dtype,
    sum_over_models,
    unchunked,
)

# The float32 scratch of a whole tensor's two passes in one program (`MergeMethod.scratch`):
# about one copy of a source, whatever N.
GRAM_SCRATCH = (0.1, 1.25)


def gram_passes(coefficients: Callable[..., jax.Array]) -> Passes:
    """The two passes of the merge sum_j gamma_j x_j with
    gamma = coefficients(gram [N, N], weights [N], **params)."""

    def finish(sums: jax.Array, weights: jax.Array, previous=None, *, shape, **params):
        del previous, shape
        return coefficients(gram_from_chunk_sums(sums, weights.shape[0]), weights, **params)

    def sums(shape: tuple[int, ...], n: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(gram_sums_shape(shape, n), compute_dtype())

    return Passes((Round(block_gram_sums, finish, sums),), combined_rows)


def block_gram_sums(
    stacked: jax.Array, weights=None, base=None, previous=None, *, key=None, first_row=0, **params
):
    """The first pass over a block of rows of the sources [N, rows, ...] (minus the base's rows,
    with a base): [P, K], the block's `gram_chunk_sums`, which blocks concatenate along K into
    the whole tensor's."""
    del weights, previous, key, first_row, params
    sources = [chunked(stacked[i], 1) for i in range(stacked.shape[0])]
    chunked_base = None if base is None else chunked(base, 1)
    return gram_chunk_sums(sources, compute_dtype(), chunked_base)[0]


def gram_sums_shape(shape: tuple[int, ...], n: int) -> tuple[int, int]:
    """The shape of `block_gram_sums` of N = n sources of `shape`: [P, K], P = N (N + 1) / 2
    products, K the chunks of `chunked` (each line along the last axis cut into its chunks)."""
    last = shape[-1] if shape else 1
    lines = int(np.prod(shape, dtype=np.int64)) // max(last, 1)
    return n * (n + 1) // 2, lines * chunks_per_row(last)


def combined_rows(stacked, weights, base, gammas, *, key=None, first_row=0, **params) -> jax.Array:
    """The second pass: sum_j gamma_j x_j over a block of rows [N, rows, ...] (of x_j - base,
    the base added back, with a base), in the compute dtype."""
    del weights, key, first_row, params
    dtype = compute_dtype()
    sources = [stacked[i].astype(dtype) for i in range(stacked.shape[0])]
    if base is not None:
        sources = [x - base.astype(dtype) for x in sources]
    merged = sum_over_models(gammas[j] * x for j, x in enumerate(sources))
    return merged if base is None else base.astype(dtype) + merged


def line_by_line(coefficients: Callable[..., jax.Array], stacked, weights, base=None, **params):
    """Each line along the last axis of the sources [N, ..., D] merged as its own vector:
    sum_j gamma_j x_j per line, gamma = coefficients(G, weights, **params) of the line's Gram
    matrix G (of the task vectors, the base added back, with a base), in the compute dtype.

    A line's Gram matrix is summed by chunks like a whole tensor's (`gram_chunk_sums`), and its
    coefficients are their own program's lanes: a line's result does not depend on how many
    lines are merged together, so blocks of rows give the bytes of the whole tensor. (Sums of
    each line by `jnp.sum` would not: XLA:CPU vectorizes a reduction, and fuses what uses it,
    after the number of lines.)
    """
    n, shape = stacked.shape[0], stacked.shape[1:]
    lines = math.prod(shape[:-1])
    dtype = compute_dtype()
    sources = [chunked(stacked[i], lines) for i in range(n)]
    chunked_base = None if base is None else chunked(base, lines)
    grams = gram_from_chunk_sums(gram_chunk_sums(sources, dtype, chunked_base), n)
    gammas = jax.vmap(lambda gram: coefficients(gram, weights, **params))(grams)
    if base is not None:
        sources = [x.astype(dtype) - chunked_base.astype(dtype) for x in sources]
    merged = sum_over_models(
        gammas[:, j, None, None] * x.astype(dtype) for j, x in enumerate(sources)
    )
    if base is not None:
        merged = chunked_base.astype(dtype) + merged
    return unchunked(merged, shape)
