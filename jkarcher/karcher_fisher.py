"""The Fisher-preconditioned Karcher mean (Wang, Ye, Yin 2026, Sec. 3.4), iterated on whole blocks.

With diagonal Fisher estimates F_i of the sources (negative entries count as 0), the tangent
average weighs each coordinate k by

    W_ik = a_i F_ik / sum_j a_j F_jk        (a_i where every F_jk is 0),

and is projected onto the tangent space at u:

    d_i = clip(<u, u_i>, -1, 1),  theta_i = arccos d_i,
    T   = step * P_u[ sum_i W_i * theta_i / sin(theta_i) (u_i - d_i u) ],   P_u v = v - <v, u> u,
    u  <- normalize(cos||T|| u + sin||T|| T / ||T||),

from u = normalize(sum_i W_i * u_i) (the first valid u_i where that sum is ~0), until ||T|| < tol
in every block or max_iter updates; the merge is s u with s the weighted mean norm, as in the plain
mean (`jkarcher.karcher.karcher_mean`, which states the rest: u_i, a_i, valid sources, s). When
every F_i is the same constant, W_ik = a_i and this is the plain Karcher mean; for very close
sources it tends to normalize(sum_i W_i * u_i), Fisher-weighted averaging (Matena & Raffel 2022)
of the directions, rescaled to the weighted mean norm. The per-coordinate weights take u out of
the span of the sources, so each iteration reads the sources and the Fishers (no Gram shortcut).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jkarcher.numerics import add_chunk_sums, compute_dtype, sum_over_models
from jkarcher.sphere import (
    angle_from_cosine,
    cancellation_floor,
    direction_weights,
    divided_or,
    sin_over_theta,
    theta_over_sin,
)


def fisher_fixed_point(
    sources: list[jax.Array],
    fishers: list[jax.Array],
    weights: jax.Array,
    *,
    max_iter: int,
    tol: float,
    step: float,
    eps: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The fixed point of the module docstring on N sources cut into blocks of chunks.

    Args:
      sources: N arrays [R, K, c]: each source as R blocks of K chunks (`numerics.chunked`).
      fishers: the N sources' Fisher estimates in the same layout.
      weights: [N] non-negative weights.
      max_iter, tol, step, eps: as in `jkarcher.karcher_mean`.

    Returns:
      The merge [R, K, c], the iterations run (the same for every block: [R]) and each block's
      last tangent norm [R].
    """
    dtype = compute_dtype()
    xs = [x.astype(dtype) for x in sources]
    fs = [jnp.maximum(f.astype(dtype), 0.0) for f in fishers]
    norms = jnp.stack([jnp.sqrt(_block_sum(x * x)) for x in xs], axis=-1)  # [R, N]
    w = weights.astype(dtype)
    valid, inv_norms, alphas = direction_weights(norms, w, eps)

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
    start = _starting_point(spread, units, valid)

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
    return mean_norms[:, None, None] * u, jnp.full((rows,), iterations), tangent_norm


def _starting_point(spread, units, valid) -> jax.Array:
    """normalize(sum_i W_i * u_i) per block, or its first valid u_i where that sum is ~0."""
    mean = sum_over_models(c * u for c, u in zip(spread, units, strict=True))
    norm = jnp.sqrt(_block_sum(mean * mean))[:, None, None]
    floor = cancellation_floor(len(units), mean.dtype)
    first = jnp.argmax(valid, axis=-1)[:, None, None]
    fallback = sum_over_models(jnp.where(first == i, u, 0.0) for i, u in enumerate(units))
    return divided_or(mean, norm, floor, fallback)


def _block_sum(values: jax.Array) -> jax.Array:
    """The sum of an [R, K, c] array over each block: [R] (each chunk in one reduction)."""
    return add_chunk_sums(values.sum(axis=-1))


def _normalized_blocks(u: jax.Array) -> jax.Array:
    """Each block of an [R, K, c] array scaled to unit norm (zero blocks stay zero)."""
    norm = jnp.sqrt(_block_sum(u * u))[:, None, None]
    return divided_or(u, norm, 0, 0.0)
