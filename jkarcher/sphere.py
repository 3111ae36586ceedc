"""Angles on the unit sphere S^{D-1}, and which sources take part in a mean direction.

The Karcher fixed points (`jkarcher.karcher` in coordinates of the sources' span,
`jkarcher.karcher_fisher` per block) take their angles and the log and exp maps' scales from here:
log_u(v) = theta / sin(theta) (v - cos(theta) u) and exp_u(T) = cos||T|| u + sin||T|| T / ||T||.
All angles are in radians.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Below this angle theta / sin(theta) is replaced by its series 1 + theta^2 / 6 (exact to float64).
SMALL_ANGLE = 1e-4


def direction_weights(
    norms: jax.Array, weights: jax.Array, eps: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(valid, inverse norms, a) for sources of `norms` [..., N] and `weights` [N].

    A source is valid, and takes part in a mean direction, where its norm is above eps; the others
    get inverse norm 0 and weight 0. The weights of the valid ones, a_i = w_i / sum_valid w, sum to
    1 along the last axis (all are 0 where no source is valid).
    """
    valid = norms > eps
    inv_norms = jnp.where(valid, 1.0 / jnp.where(valid, norms, 1.0), 0.0)
    valid_weights = jnp.where(valid, weights, 0.0)
    # Added model by model: a reduction's rounding would depend on how many rows are merged.
    total = functools.reduce(jnp.add, jnp.moveaxis(valid_weights, -1, 0))[..., None]
    return valid, inv_norms, valid_weights / jnp.where(total > 0, total, 1.0)


def divided_or(x: jax.Array, norm: jax.Array, floor, fallback) -> jax.Array:
    """x / norm where norm > floor, else `fallback`: a normalization that never divides by a
    norm at or below the floor."""
    return jnp.where(norm > floor, x / jnp.where(norm > floor, norm, 1.0), fallback)


def cancellation_floor(n: int, dtype: jnp.dtype) -> jax.Array:
    """4 sqrt(N eps): below this norm a weighted mean of N unit vectors has cancelled, and float
    rounding, about sqrt(N eps), could decide its direction."""
    return 4.0 * jnp.sqrt(n * jnp.finfo(dtype).eps)


def angle_from_cosine(cosine: jax.Array) -> jax.Array:
    """theta = arccos(clip(cosine, -1, 1))."""
    return jnp.arccos(jnp.clip(cosine, -1.0, 1.0))


def theta_over_sin(theta: jax.Array) -> jax.Array:
    """theta / sin(theta), the log map's scale: 1 + theta^2/6 near 0, finite for theta < pi.

    Near the cut locus (theta within 8 sqrt(eps) of pi, where float rounding of a cosine near -1
    already moves theta by about sqrt(eps)) the log map is undefined; there the factor is 0, so an
    antipodal source pulls in no direction.
    """
    cut_locus = jnp.pi - 8.0 * jnp.finfo(theta.dtype).eps ** 0.5
    series = 1.0 + jnp.square(theta) / 6.0
    regular = (theta >= SMALL_ANGLE) & (theta < cut_locus)
    ratio = theta / jnp.sin(jnp.where(regular, theta, 1.0))
    return jnp.where(theta < SMALL_ANGLE, series, jnp.where(regular, ratio, 0.0))


def sin_over_theta(theta: jax.Array) -> jax.Array:
    """sin(theta) / theta, the exp map's scale: 1 - theta^2/6 near 0."""
    safe = jnp.where(theta < SMALL_ANGLE, 1.0, theta)
    return jnp.where(theta < SMALL_ANGLE, 1.0 - jnp.square(theta) / 6.0, jnp.sin(safe) / safe)
