"""Geometry on the unit sphere S^{D-1}: normalization, geodesic distance, log/exp maps, SLERP.

These act on whole (flattened) vectors. The Karcher fixed point in `jkarcher.karcher` uses the same
formulas written in coordinates of the sources' span; the functions here are the reference forms
that the methods (SLERP, NuSLERP, multi-SLERP) and the tests use. All angles are in radians.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Below this angle theta / sin(theta) is replaced by its series 1 + theta^2 / 6 (exact to float64).
SMALL_ANGLE = 1e-4


def normalize(x: jax.Array, eps: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """(x / ||x||, ||x||); a vector of norm <= eps maps to 0."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x)))
    safe = jnp.where(norm > eps, norm, 1.0)
    return jnp.where(norm > eps, x / safe, jnp.zeros_like(x)), norm


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


def geodesic_distance(u: jax.Array, v: jax.Array) -> jax.Array:
    """Great-circle distance of unit vectors: 2 atan2(||u - v||, ||u + v||), stable at 0 and pi."""
    return 2.0 * jnp.arctan2(jnp.linalg.norm(u - v), jnp.linalg.norm(u + v))


def log_map(u: jax.Array, v: jax.Array) -> jax.Array:
    """log_u(v) = theta / sin(theta) * (v - cos(theta) u), the tangent at u pointing to v."""
    cosine = jnp.vdot(u, v)
    theta = geodesic_distance(u, v)
    return theta_over_sin(theta) * (v - cosine * u)


def exp_map(u: jax.Array, tangent: jax.Array) -> jax.Array:
    """exp_u(T) = cos(||T||) u + sin(||T||) T / ||T||."""
    norm = jnp.linalg.norm(tangent)
    return jnp.cos(norm) * u + sin_over_theta(norm) * tangent


def slerp(u: jax.Array, v: jax.Array, t: jax.Array | float) -> jax.Array:
    """Spherical interpolation between unit vectors: the point a fraction t along the geodesic.

    slerp(u, v, t) = sin((1-t) theta)/sin(theta) u + sin(t theta)/sin(theta) v, written as
    exp_u(t log_u(v)) so that it is stable for small theta.
    """
    return exp_map(u, t * log_map(u, v))
