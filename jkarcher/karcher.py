"""The weighted Karcher (Frechet) mean on the unit sphere, a proxy for the Fisher-Rao barycenter.

Wang, Ye, Yin (2026), "Functionality-Oriented LLM Merging on the Fisher-Rao Manifold", Sec. 3.3-3.4:
each block (a whole tensor, or each row) of the N sources x_i is split into a norm n_i = ||x_i||
and a direction u_i = x_i / n_i. The directions are averaged on the sphere by the fixed point
(eq. 5)

    d_i = clip(<u, u_i>, -1, 1),  theta_i = arccos d_i,
    T   = step * sum_i a_i theta_i / sin(theta_i) (u_i - d_i u),        a_i = w_i / sum_valid w,
    u  <- cos||T|| u + sin||T|| T / ||T||,  renormalized,

run until ||T|| < tol (the first-order condition sum_i a_i log_u(u_i) = 0, eq. 4) or max_iter, from
u = normalize(sum_i a_i u_i). The merge is s u with s = sum_i w_i n_i / sum_i w_i, the weighted mean
norm, which keeps the norm that Euclidean averages shrink.

u stays in the span of the u_i, so the iteration runs on coefficients: u = sum_j c_j u_j and every
inner product comes from the N x N Gram matrix of the unit sources. The data is read twice,
whatever the number of iterations: once for the Gram matrix (a fused reduction of all pairwise
products), once to form sum_j gamma_j x_j. Arithmetic is in float32 (float64 under x64) whatever
the storage dtype, and the result is rounded once, to the sources' dtype unless another is asked.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jkarcher.methods.common import sum_over_models, with_auto_axes
from jkarcher.numerics import compute_dtype
from jkarcher.sphere import angle_from_cosine, sin_over_theta, theta_over_sin

DEFAULT_MAX_ITER = 100
DEFAULT_TOL = 1e-6
DEFAULT_EPS = 1e-12
BLOCKS = ("tensor", "row")

# The longest contiguous run that one fused reduction sums; longer runs are split into chunks
# and their partial sums added pairwise, which keeps float32 sums accurate to ~1e-7 relative.
_CHUNK = 1024


class KarcherInfo(NamedTuple):
    """How the fixed point ended, per block: iterations run and the last tangent norm ||T||."""

    iterations: jax.Array
    tangent_norm: jax.Array


def karcher_mean(
    stacked: jax.Array,
    weights: jax.Array | None = None,
    *,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    step: float = 1.0,
    block: str = "tensor",
    eps: float = DEFAULT_EPS,
    fisher: jax.Array | None = None,
    out_dtype: jnp.dtype | None = None,
    return_info: bool = False,
) -> jax.Array | tuple[jax.Array, KarcherInfo]:
    """Weighted Karcher mean of the N sources stacked along axis 0, with the mean norm restored.

    Args:
      stacked: [N, ...] the sources, any float dtype.
      weights: [N] non-negative weights (default equal); only their ratios matter.
      max_iter: the most fixed-point updates.
      tol: stop once the tangent norm ||T|| (radians) is below this.
      step: the step size of eq. 5 (1 is the classical fixed point).
      block: "tensor" merges the whole tensor as one vector; "row" merges each slice along the
        first tensor axis (each row of a matrix) separately. 0-d and 1-d tensors are one block.
      eps: sources of norm <= eps take no part in the direction (their norm still counts in s).
      fisher: [N, ...] diagonal Fisher estimates of the sources (>= 0; negative entries count as
        0), for the Fisher-preconditioned mean (see `_solve_fisher`); None for the plain mean.
      out_dtype: the dtype the result is rounded to, once; None for the sources' dtype.
      return_info: also return a `KarcherInfo` (one entry per block).

    Returns:
      The merged tensor, shaped like one source, in `out_dtype` (and the info if asked).
    """
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
    if weights is None:
        weights = jnp.ones((stacked.shape[0],), compute_dtype())
    # Traced (inside a caller's jit), the computation joins the caller's program: a nested jit
    # here would make XLA copy the stack that the caller built from separate arrays.
    if fisher is not None and fisher.shape != stacked.shape:
        raise ValueError(f"fisher has shape {fisher.shape}, the sources {stacked.shape}")
    run = _karcher_mean if isinstance(stacked, jax.core.Tracer) else _jitted_karcher_mean
    merged, info = run(
        stacked,
        weights,
        fisher,
        max_iter=max_iter,
        tol=tol,
        step=step,
        block=block,
        eps=eps,
        out_dtype=jnp.dtype(stacked.dtype if out_dtype is None else out_dtype),
    )
    return (merged, info) if return_info else merged


def _karcher_mean(stacked, weights, fisher, *, max_iter, tol, step, block, eps, out_dtype):
    solver = _solve if fisher is None else _solve_fisher
    solve = functools.partial(solver, max_iter=max_iter, tol=tol, step=step, block=block, eps=eps)
    merged, info = with_auto_axes(solve)(stacked, jnp.asarray(weights), fisher)
    return merged.astype(out_dtype), info


_jitted_karcher_mean = jax.jit(
    _karcher_mean, static_argnames=("max_iter", "tol", "step", "block", "eps", "out_dtype")
)


def _solve(stacked, weights, fisher, *, max_iter, tol, step, block, eps):
    """Gram pass, fixed point on coefficients, output pass: (merged, KarcherInfo)."""
    del fisher
    n = stacked.shape[0]
    dtype = compute_dtype()
    chunks = _source_chunks(stacked, block)
    pair_sums = tuple(_accurate_sum(p) for p in _chunk_pair_sums(chunks, dtype))
    solve = functools.partial(
        _gram_space_coefficients, max_iter=max_iter, tol=tol, step=step, eps=eps
    )
    grams = _assemble_grams(pair_sums, n)
    gammas, info = jax.vmap(solve, in_axes=(0, None))(grams, weights.astype(dtype))
    merged = _combine(chunks, gammas, dtype)
    return _unchunked(merged, stacked), info


def _unchunked(merged: jax.Array, stacked: jax.Array) -> jax.Array:
    """An [R, K, c] result back in the shape of one source (padding dropped)."""
    last = (stacked.shape[1:] or (1,))[-1]
    padded = last + -last % _chunk_length(last)
    return merged.reshape(-1, padded)[:, :last].reshape(stacked.shape[1:])


def _source_chunks(stacked: jax.Array, block: str) -> list[jax.Array]:
    """Each source as [R, K, c]: R blocks (1, or the rows), each cut into K chunks of c.

    Chunks bound the length of every float32 running sum. They split only the last axis (a
    chunk length that divides it avoids padding; zeros change no inner product), so each view is
    a free reshape of the source, and the sources are taken one by one, so that XLA reads each
    from where it lies instead of copying the stack.
    """
    shape = stacked.shape[1:] or (1,)
    rows = shape[0] if block == "row" and len(shape) >= 2 else 1
    last = shape[-1]
    chunk = _chunk_length(last)
    pad = -last % chunk

    def chunked(source: jax.Array) -> jax.Array:
        source = source.reshape(-1, last)
        if pad:
            source = jnp.pad(source, ((0, 0), (0, pad)))
        return source.reshape(rows, -1, chunk)

    return [chunked(stacked[i]) for i in range(stacked.shape[0])]


def _chunk_length(length: int) -> int:
    """The length itself up to 2 _CHUNK, else its largest divisor in [_CHUNK/4, _CHUNK], else
    _CHUNK (with padding)."""
    if length <= 2 * _CHUNK:
        return length
    for chunk in range(_CHUNK, _CHUNK // 4 - 1, -1):
        if length % chunk == 0:
            return chunk
    return _CHUNK


def _chunk_pair_sums(chunks: list[jax.Array], dtype) -> tuple[jax.Array, ...]:
    """<x_i, x_j> per chunk for every pair i <= j (in np.triu_indices order): [R, K] arrays.

    Each variadic reduction computes many products from one read of the data, where a matmul
    of the skinny [N, D] matrix is several times slower on CPU. Up to 4 models form one
    reduction; beyond that, tiles of 3 x 3 models keep each fused loop small enough to vectorize
    (measured fastest on a 2-core x86 machine for N = 8 and 16).
    """
    n = len(chunks)
    tile = n if n <= 4 else 3
    sums = {}
    for first_row in range(0, n, tile):
        for second_row in range(first_row, n, tile):
            pairs = [
                (i, j)
                for i in range(first_row, min(first_row + tile, n))
                for j in range(second_row, min(second_row + tile, n))
                if i <= j
            ]
            products = tuple(chunks[i].astype(dtype) * chunks[j].astype(dtype) for i, j in pairs)
            zeros = tuple(jnp.zeros((), dtype) for _ in products)
            reduced = lax.reduce(products, zeros, _add_tuples, (2,))
            sums.update(zip(pairs, reduced, strict=True))
    return tuple(sums[pair] for pair in zip(*np.triu_indices(n), strict=True))


def _add_tuples(a: tuple, b: tuple) -> tuple:
    return tuple(p + q for p, q in zip(a, b, strict=True))


def _accurate_sum(values: jax.Array) -> jax.Array:
    """Sum over the last axis by blocks of _CHUNK, so rounding grows with log(length).

    A remainder shorter than _CHUNK is summed as one more block rather than padded: XLA:CPU can
    fuse a pad into the consumers of the sum and recompute it for each of them, which made one
    Fisher-Karcher iteration on a 4864 x 896 tensor take seconds instead of milliseconds.
    """
    while values.shape[-1] > _CHUNK:
        whole = values.shape[-1] - values.shape[-1] % _CHUNK
        sums = [values[..., :whole].reshape(*values.shape[:-1], -1, _CHUNK).sum(axis=-1)]
        if whole < values.shape[-1]:
            sums.append(values[..., whole:].sum(axis=-1, keepdims=True))
        values = jnp.concatenate(sums, axis=-1)
    return values.sum(axis=-1)


def _assemble_grams(pair_sums: tuple[jax.Array, ...], n: int) -> jax.Array:
    """The per-pair sums ([B] each, i <= j) as symmetric Gram matrices [B, N, N]."""
    first, second = np.triu_indices(n)
    upper = jnp.stack(pair_sums, axis=-1)
    gram = jnp.zeros((*upper.shape[:-1], n, n), upper.dtype)
    gram = gram.at[..., first, second].set(upper)
    return gram.at[..., second, first].set(upper)


def _gram_space_coefficients(
    gram: jax.Array, weights: jax.Array, *, max_iter: int, tol: float, step: float, eps: float
) -> tuple[jax.Array, KarcherInfo]:
    """The fixed point of eq. 5 on coefficients: returns gamma with merge = sum_j gamma_j x_j.

    With u = sum_j c_j u_j and U the Gram matrix of the unit sources, <u, u_i> = (U c)_i and
    ||sum_j t_j u_j||^2 = t^T U t, so the iteration never touches the data.
    """
    dtype = gram.dtype
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    valid = norms > eps
    inv_norms = jnp.where(valid, 1.0 / jnp.where(valid, norms, 1.0), 0.0)
    unit_gram = gram * inv_norms[:, None] * inv_norms[None, :]
    unit_gram = jnp.where(jnp.eye(gram.shape[0], dtype=bool), valid.astype(dtype), unit_gram)

    valid_weights = jnp.where(valid, weights, 0.0)
    total = jnp.sum(valid_weights)
    alphas = valid_weights / jnp.where(total > 0, total, 1.0)

    def norm_of(coef):
        return jnp.sqrt(jnp.maximum(coef @ unit_gram @ coef, 0.0))

    start = _starting_point(alphas, unit_gram, valid, norm_of)

    def keep_going(state):
        iteration, _, tangent_norm = state
        return (iteration < max_iter) & (tangent_norm >= tol)

    def update(state):
        iteration, coef, _ = state
        cosines = jnp.clip(unit_gram @ coef, -1.0, 1.0)
        scales = alphas * theta_over_sin(angle_from_cosine(cosines))
        # T = step * sum_i a_i theta_i/sin(theta_i) (u_i - d_i u), in coefficients.
        tangent = step * (scales - jnp.sum(scales * cosines) * coef)
        tangent_norm = norm_of(tangent)
        moved = jnp.cos(tangent_norm) * coef + sin_over_theta(tangent_norm) * tangent
        moved_norm = norm_of(moved)
        moved = jnp.where(moved_norm > 0, moved / jnp.where(moved_norm > 0, moved_norm, 1.0), coef)
        return iteration + 1, moved, tangent_norm

    state = (jnp.int32(0), start, jnp.asarray(jnp.inf, dtype))
    iterations, coef, tangent_norm = lax.while_loop(keep_going, update, state)

    mean_norm = jnp.sum(weights * norms) / jnp.sum(weights)
    gammas = mean_norm * coef * inv_norms
    return gammas, KarcherInfo(iterations, tangent_norm)


def _starting_point(alphas, unit_gram, valid, norm_of) -> jax.Array:
    """normalize(sum_i a_i u_i), or the first valid u_i where that sum is ~0 (e.g. antipodes).

    "~0" is below the level at which float rounding of the Gram matrix, about sqrt(N eps), could
    decide the direction.
    """
    n = alphas.shape[0]
    finfo = jnp.finfo(unit_gram.dtype)
    floor = 4.0 * jnp.sqrt(n * finfo.eps)
    mean_norm = norm_of(alphas)
    first_valid = jnp.zeros((n,), alphas.dtype).at[jnp.argmax(valid)].set(1.0)
    first_valid = jnp.where(jnp.any(valid), first_valid, 0.0)
    return jnp.where(
        mean_norm > floor, alphas / jnp.where(mean_norm > floor, mean_norm, 1.0), first_valid
    )


def _combine(chunks: list[jax.Array], gammas: jax.Array, dtype) -> jax.Array:
    """sum_j gamma_j x_j over the [R, K, c] chunks, with gammas [R, N]: an [R, K, c] array."""
    return sum_over_models(
        gammas[:, j, None, None] * chunk.astype(dtype) for j, chunk in enumerate(chunks)
    )


def _solve_fisher(stacked, weights, fisher, *, max_iter, tol, step, block, eps):
    """The Fisher-preconditioned fixed point (the paper's Sec. 3.4), iterated on whole blocks.

    With diagonal Fisher estimates F_i, the tangent average weighs each coordinate k by
    W_ik = a_i F_ik / sum_j a_j F_jk (a_i where every F_jk is 0):

        T = step * P_u[sum_i W_i * theta_i / sin(theta_i) (u_i - d_i u)],

    P_u the projection onto the tangent space at u, then the exp map and renormalization as in
    the plain mean, from u = normalize(sum_i W_i * u_i). When every F_i is the same constant,
    W_ik = a_i and this is the plain Karcher mean; when the sources are very close it tends to
    normalize(sum_i W_i * u_i), Fisher-weighted averaging (Matena & Raffel 2022) of the
    directions, rescaled to the weighted mean norm. The per-coordinate weights take u out of the
    span of the sources, so each iteration reads the sources and Fishers (no Gram shortcut).
    """
    dtype = compute_dtype()
    xs = [x.astype(dtype) for x in _source_chunks(stacked, block)]
    fs = [jnp.maximum(f.astype(dtype), 0.0) for f in _source_chunks(fisher, block)]
    norms = jnp.stack([jnp.sqrt(_block_sum(x * x)) for x in xs], axis=-1)  # [R, N]
    valid = norms > eps
    inv_norms = jnp.where(valid, 1.0 / jnp.where(valid, norms, 1.0), 0.0)
    w = weights.astype(dtype)
    valid_weights = jnp.where(valid, w, 0.0)
    totals = jnp.sum(valid_weights, axis=-1, keepdims=True)
    alphas = valid_weights / jnp.where(totals > 0, totals, 1.0)

    def per_block(values, i):
        return values[:, i, None, None]

    units = [x * per_block(inv_norms, i) for i, x in enumerate(xs)]
    denominator = sum_over_models(per_block(alphas, i) * f for i, f in enumerate(fs))
    spread = [
        jnp.where(
            denominator > 0,
            per_block(alphas, i) * f / jnp.where(denominator > 0, denominator, 1.0),
            per_block(alphas, i),
        )
        for i, f in enumerate(fs)
    ]
    start = _fisher_starting_point(spread, units, valid)

    def keep_going(state):
        iteration, _, tangent_norm = state
        return (iteration < max_iter) & jnp.any(tangent_norm >= tol)

    def update(state):
        iteration, u, _ = state
        cosines = jnp.clip(jnp.stack([_block_sum(u * v) for v in units], axis=-1), -1.0, 1.0)
        scales = theta_over_sin(angle_from_cosine(cosines))
        tangent = step * sum_over_models(
            per_block(scales, i) * c * (v - per_block(cosines, i) * u)
            for i, (c, v) in enumerate(zip(spread, units, strict=True))
        )
        tangent = tangent - _block_sum(tangent * u)[:, None, None] * u
        tangent_norm = jnp.sqrt(_block_sum(tangent * tangent))
        moved = (
            jnp.cos(tangent_norm)[:, None, None] * u
            + sin_over_theta(tangent_norm)[:, None, None] * tangent
        )
        return iteration + 1, _normalized_blocks(moved), tangent_norm

    rows = norms.shape[0]
    state = (jnp.int32(0), start, jnp.full((rows,), jnp.inf, dtype))
    iterations, u, tangent_norm = lax.while_loop(keep_going, update, state)
    mean_norms = jnp.sum(w * norms, axis=-1) / jnp.sum(w)
    merged = mean_norms[:, None, None] * u
    return _unchunked(merged, stacked), KarcherInfo(jnp.full((rows,), iterations), tangent_norm)


def _fisher_starting_point(spread, units, valid) -> jax.Array:
    """normalize(sum_i W_i * u_i) per block, or its first valid u_i where that sum is ~0."""
    mean = sum_over_models(c * u for c, u in zip(spread, units, strict=True))
    norm = jnp.sqrt(_block_sum(mean * mean))[:, None, None]
    floor = 4.0 * jnp.sqrt(len(units) * jnp.finfo(mean.dtype).eps)
    first = jnp.argmax(valid, axis=-1)[:, None, None]
    fallback = sum_over_models(jnp.where(first == i, u, 0.0) for i, u in enumerate(units))
    return jnp.where(norm > floor, mean / jnp.where(norm > floor, norm, 1.0), fallback)


def _block_sum(values: jax.Array) -> jax.Array:
    """Sum of an [R, K, c] array over each block: [R], accurate to float32 rounding."""
    return _accurate_sum(values.sum(axis=-1))


def _normalized_blocks(u: jax.Array) -> jax.Array:
    """Each block of an [R, K, c] array scaled to unit norm (zero blocks stay zero)."""
    norm = jnp.sqrt(_block_sum(u * u))[:, None, None]
    return jnp.where(norm > 0, u / jnp.where(norm > 0, norm, 1.0), 0.0)
