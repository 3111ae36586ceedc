"""The weighted Karcher mean on the unit sphere, in Gram space: `karcher_mean` states the math."""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jkarcher import sphere
from jkarcher.karcher_fisher import fisher_fixed_point
from jkarcher.numerics import (
    COMPILER_OPTIONS,
    add_chunk_sums,
    chunk_sums,
    chunked,
    compute_dtype,
    sum_over_models,
    unchunked,
)
from jkarcher.sharding import with_auto_axes

DEFAULT_MAX_ITER = 100
DEFAULT_TOL = 1e-6
DEFAULT_EPS = 1e-12
BLOCKS = ("tensor", "row")


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
    """The weighted Karcher (Frechet) mean of N sources on the unit sphere, at their mean norm.

    A light proxy for the Fisher-Rao barycenter of the sources. Per block (the whole tensor, or
    each slice along the first axis), with sources x_i and weights w_i >= 0:

      n_i = ||x_i||,  u_i = x_i / n_i,  a_i = w_i / sum_{j valid} w_j   (valid: n_i > eps)
      u_0 = normalize(sum_i a_i u_i)   (the first valid u_i if that norm is < 4 sqrt(N eps))
      d_i = clip(<u_t, u_i>, -1, 1),  theta_i = arccos d_i
      T_t = step * sum_i a_i theta_i / sin(theta_i) (u_i - d_i u_t)    (0 where theta_i ~ 0)
      u_{t+1} = normalize(cos||T_t|| u_t + sin||T_t|| T_t / ||T_t||)

    until ||T_t|| < tol (the first-order condition sum_i a_i log_u(u_i) = 0) or max_iter
    updates; the merge is s u with s = sum_i w_i n_i / sum_i w_i, the weighted mean norm, which
    keeps the norm that Euclidean averages shrink.

    u stays in the span of the u_i, so the iteration runs on N coefficients through the N x N
    Gram matrix of the sources, and the data is read twice (one fused pass for every inner
    product, one to form the merge) however many iterations run. Computed in float32 (float64
    under x64) whatever the storage dtype and rounded once; traced, it joins the caller's program
    (there, stack 16 or more bfloat16 models inside it, as `jkarcher.merge` does: XLA:CPU holds
    a bfloat16 argument read that many ways whole in float32, see `slices_in_float32`).

    Args:
      stacked: [N, ...] the sources, any float dtype.
      weights: [N] non-negative weights (default equal); only their ratios matter.
      max_iter: the most fixed-point updates.
      tol: stop once the tangent norm ||T|| (radians) is below this.
      step: the step size (1 is the classical fixed point).
      block: "tensor" merges the whole tensor as one vector; "row" merges each slice along the
        first tensor axis (each row of a matrix) separately. 0-d and 1-d tensors are one block.
      eps: sources of norm <= eps take no part in the direction (their norm still counts in s).
      fisher: [N, ...] diagonal Fisher estimates of the sources (>= 0; negative entries count as
        0), for the Fisher-preconditioned mean (`jkarcher.karcher_fisher`); None for the plain.
      out_dtype: the dtype the result is rounded to, once; None for the sources' dtype.
      return_info: also return a `KarcherInfo` (one entry per block).

    Returns:
      The merged tensor, shaped like one source, in `out_dtype` (and the info if asked).

    References:
      Wang, Ye, Yin 2026, "Functionality-Oriented LLM Merging on the Fisher-Rao Manifold",
      Sec. 3.3-3.4: the first-order condition is eq. 4, the fixed point eq. 5.
    """
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
    if weights is None:
        weights = jnp.ones((stacked.shape[0],), compute_dtype())
    if fisher is not None and fisher.shape != stacked.shape:
        raise ValueError(f"fisher has shape {fisher.shape}, the sources {stacked.shape}")
    options = dict(max_iter=max_iter, tol=tol, step=step, block=block, eps=eps)
    out_dtype = jnp.dtype(stacked.dtype if out_dtype is None else out_dtype)
    # A nested jit inside a caller's would make XLA copy the stack the caller built.
    if isinstance(stacked, jax.core.Tracer):
        run = _karcher_mean
    else:
        run = _jitted_karcher_mean
        if slices_in_float32(stacked):
            stacked = _models_of(stacked)
    merged, info = run(stacked, weights, fisher, out_dtype=out_dtype, **options)
    return (merged, info) if return_info else merged


def slices_in_float32(stacked: jax.Array) -> bool:
    """Whether a program that reads `stacked` model by model would hold it whole in float32:
    a bfloat16 stack of 16 or more models on CPU.

    XLA:CPU computes a bfloat16 slice in float32, from the float32 conversion of the whole array.
    Up to 15 models, that conversion is fused into the loops that read the slices; from 16 on,
    XLA keeps it in memory (2x the stack's bytes), however the loops group the models. The
    Karcher mean of 16 bfloat16 sources of 4864 x 896 then takes 107 ms with 282 MB of scratch,
    where 15 take 13 ms with 2 MB and 16 float16 sources 18 ms with 3 MB. Passed as one array
    per model and stacked inside the program, the sources are read in place.
    """
    if isinstance(stacked, jax.Array):
        platforms = {device.platform for device in stacked.devices()}
    else:
        platforms = {jax.default_backend()}
    return stacked.dtype == jnp.bfloat16 and stacked.shape[0] >= 16 and platforms == {"cpu"}


def _karcher_mean(stacked, weights, fisher, *, out_dtype, **options):
    """`karcher_mean` of a stack, or of a tuple of models stacked here (`slices_in_float32`)."""
    if isinstance(stacked, tuple):
        stacked = jnp.stack(stacked)
    solve = functools.partial(_solve, **options)
    merged, info = with_auto_axes(solve)(stacked, jnp.asarray(weights), fisher)
    return merged.astype(out_dtype), info


_jitted_karcher_mean = jax.jit(
    _karcher_mean,
    static_argnames=("max_iter", "tol", "step", "block", "eps", "out_dtype"),
    compiler_options=COMPILER_OPTIONS,
)
_models_of = jax.jit(lambda stacked: tuple(stacked[i] for i in range(stacked.shape[0])))


def _solve(stacked, weights, fisher, *, block, **options) -> tuple[jax.Array, KarcherInfo]:
    """Either fixed point on each source cut into R blocks of chunks, [R, K, c]: for the plain
    mean a Gram pass, the fixed point on coefficients per block, and an output pass."""
    shape = stacked.shape[1:]
    rows = shape[0] if block == "row" and len(shape) >= 2 else 1
    sources = [chunked(stacked[i], rows) for i in range(stacked.shape[0])]
    if fisher is not None:
        fishers = [chunked(fisher[i], rows) for i in range(fisher.shape[0])]
        merged, *info = fisher_fixed_point(sources, fishers, weights, **options)
        return unchunked(merged, shape), KarcherInfo(*info)
    dtype = compute_dtype()
    gammas, *info = _block_coefficients(gram_matrices(sources, dtype), weights, **options)
    merged = sum_over_models(
        gammas[:, j, None, None] * x.astype(dtype) for j, x in enumerate(sources)
    )
    return unchunked(merged, shape), KarcherInfo(*info)


def coefficients_from_gram(
    gram: jax.Array, weights: jax.Array, *, max_iter: int, tol: float, step: float, eps: float
) -> jax.Array:
    """gamma [N], the merge being sum_j gamma_j x_j, from the whole tensor's [N, N] Gram
    matrix: the fixed point of `karcher_mean` on coefficients."""
    options = dict(max_iter=max_iter, tol=tol, step=step, eps=eps)
    return _coefficients(gram, weights.astype(compute_dtype()), **options)[0]


def gram_matrices(sources: list[jax.Array], dtype) -> jax.Array:
    """[R, N, N] inner products <x_i, x_j> per block: `gram_from_chunk_sums` of
    `gram_chunk_sums`."""
    return gram_from_chunk_sums(gram_chunk_sums(sources, dtype), len(sources))


def gram_from_chunk_sums(sums: jax.Array, n: int) -> jax.Array:
    """[R, N, N] Gram matrices from the [R, P, K] chunk sums of `gram_chunk_sums` (of the whole
    tensor), added by `add_chunk_sums`."""
    upper = add_chunk_sums(sums)
    upper_i, upper_j = np.triu_indices(n)
    gram = jnp.zeros((*upper.shape[:-1], n, n), upper.dtype).at[..., upper_i, upper_j].set(upper)
    return gram.at[..., upper_j, upper_i].set(upper)


def gram_chunk_sums(sources: list[jax.Array], dtype, base: jax.Array | None = None) -> jax.Array:
    """[R, P, K]: the sums over each chunk of the P = N (N + 1) / 2 products x_i x_j, i <= j (in
    the order of `np.triu_indices`), of `chunked` sources [R, K, c] (minus the base, chunked
    alike, with one).

    Each chunk's sum is its own reduction along the last axis, which XLA compiles alike for any
    number of chunks: rows cut into blocks give chunk sums that concatenate, along K, into the
    whole tensor's, bit for bit (the statistics pass of a merge in blocks of rows). The sums of
    the chunks are left to `gram_from_chunk_sums`, since XLA tiles a fused sum over many chunks
    after their number, and rounds it differently.

    A variadic reduction computes many products from one read of the data, where a matmul of the
    skinny [N, D] matrix is several times slower on CPU (a bfloat16 `dot_general` with float32
    accumulation: 69 against 2.4 ms for 8 sources of 4864 x 896). Models go in tiles of up to 8
    (`model_tiles`): each pair of tiles (at most 64 products of 16 sources) is one reduction, which
    vectorizes (with `COMPILER_OPTIONS`) and reads its sources once. On a 2-core AVX-512 x86
    machine, for bfloat16 sources of 4864 x 896, tiles of 8 took 2.6 ms at N = 8 and 9.6 ms at
    N = 16, tiles of 4 3.0 and 13.4 ms, tiles of 2 5.9 and 26.3 ms; one tile of 16 models
    (136 accumulators) spills its registers and takes 86 ms.
    """
    n = len(sources)
    if base is not None:
        sources = [x.astype(dtype) - base.astype(dtype) for x in sources]
    sums = {}
    tiles = model_tiles(n)
    for index, first in enumerate(tiles):
        for second in tiles[index:]:
            pairs = [(i, j) for i, j in itertools.product(first, second) if i <= j]
            products = [sources[i].astype(dtype) * sources[j].astype(dtype) for i, j in pairs]
            tile_sums = chunk_sums(products)
            sums.update((pair, tile_sums[..., t, :]) for t, pair in enumerate(pairs))
    return jnp.stack([sums[pair] for pair in zip(*np.triu_indices(n), strict=True)], axis=-2)


def model_tiles(n: int, most: int = 8) -> list[range]:
    """Models 0..n-1 in ceil(n / most) tiles of consecutive models, their sizes differing by at
    most one (5 models: 2 + 3, not 4 + 1).

    A tile of one model beside larger ones makes XLA keep that source's float32 copy in memory
    (its convert feeds several reductions): a [151936, 2048] embedding's 1.2 GB more per leaf.
    """
    count = -(-n // most)
    bounds = [round(k * n / count) for k in range(count + 1)]
    return [range(a, b) for a, b in itertools.pairwise(bounds)]


def _block_coefficients(grams, weights, **options):
    """`_coefficients` of each block's [N, N] Gram matrix in `grams` [R, N, N]: ([R, N],
    iterations [R], ||T|| [R])."""
    solve = functools.partial(_coefficients, **options)
    return jax.vmap(solve, in_axes=(0, None))(grams, weights.astype(compute_dtype()))


def _coefficients(gram, weights, *, max_iter, tol, step, eps):
    """The fixed point on coefficients: (gamma with merge = sum_j gamma_j x_j, iterations, ||T||).

    With u = sum_j c_j u_j and U the Gram matrix of the unit sources, <u, u_i> = (U c)_i and
    ||sum_j t_j u_j||^2 = t^T U t, so the iteration never touches the data.
    """
    n = gram.shape[0]
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    valid, inv_norms, alphas = sphere.direction_weights(norms, weights, eps)
    unit_gram = gram * inv_norms[:, None] * inv_norms[None, :]
    unit_gram = jnp.where(jnp.eye(n, dtype=bool), valid.astype(gram.dtype), unit_gram)

    def norm_of(coef):
        return jnp.sqrt(jnp.maximum(_dot(coef, _times(unit_gram, coef)), 0.0))

    # normalize(sum_i a_i u_i), or the first valid u_i where that sum has cancelled.
    floor = sphere.cancellation_floor(n, unit_gram.dtype)
    mean_norm = norm_of(alphas)
    first_valid = jnp.zeros((n,), alphas.dtype).at[jnp.argmax(valid)].set(1.0)
    first_valid = jnp.where(jnp.any(valid), first_valid, 0.0)
    start = sphere.divided_or(alphas, mean_norm, floor, first_valid)

    def keep_going(state):
        iteration, _, tangent_norm = state
        return (iteration < max_iter) & (tangent_norm >= tol)

    def update(state):
        iteration, coef, _ = state
        cosines = jnp.clip(_times(unit_gram, coef), -1.0, 1.0)
        scales = alphas * sphere.theta_over_sin(sphere.angle_from_cosine(cosines))
        tangent = step * (scales - _dot(scales, cosines) * coef)  # T, in coefficients
        tangent_norm = norm_of(tangent)
        moved = jnp.cos(tangent_norm) * coef + sphere.sin_over_theta(tangent_norm) * tangent
        moved = sphere.divided_or(moved, norm_of(moved), 0, coef)
        return iteration + 1, moved, tangent_norm

    state = (jnp.int32(0), start, jnp.asarray(jnp.inf, gram.dtype))
    iterations, coef, tangent_norm = lax.while_loop(keep_going, update, state)
    mean_norm = _dot(weights, norms) / sum_over_models(weights)
    return mean_norm * coef * inv_norms, iterations, tangent_norm


def _times(matrix: jax.Array, vector: jax.Array) -> jax.Array:
    """matrix [N, N] times vector [N], summed in the order of `sum_over_models`."""
    return sum_over_models(matrix[:, j] * vector[j] for j in range(vector.shape[0]))


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """<a, b> of two [N] vectors, summed in the order of `sum_over_models`."""
    return sum_over_models(a[j] * b[j] for j in range(a.shape[0]))
