"""Spherical interpolation: SLERP of two models, NuSLERP (weighted, per row or column, with an
optional base) and multi-SLERP of N models.

SLERP (Shoemake 1985, "Animating rotation with quaternion curves") between vectors a and b at
angle theta = arccos <a/|a|, b/|b|> is

    slerp(a, b; t) = sin((1 - t) theta) / sin(theta) a + sin(t theta) / sin(theta) b,

which for unit vectors follows the great circle, and for vectors of other norms interpolates them
with those spherical coefficients (as mergekit does). (Multi-)SLERP is the spherical baseline of
Wang, Ye, Yin (2026, Sec. 4); their Karcher mean is the N-model generalization of SLERP (for two
models with weights (1-t, t) it is SLERP of the directions times the mean norm). Computation is in
float32 (float64 under x64), and so are the results; thresholds follow mergekit 0.1.5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jkarcher.methods.registry import (
    BASE_NONE,
    BASE_OPTIONAL,
    REQUIRED,
    MergeMethod,
    Param,
    boolean,
    number,
    positive,
    register,
)
from jkarcher.numerics import (
    accurate_norm,
    accurate_sum,
    compute_dtype,
    sum_along,
    sum_over_models,
)

# SLERP: above this |cosine| the sources are treated as collinear and interpolated linearly.
DOT_THRESHOLD = 0.9995
# SLERP: norms at or below this count as 1 when forming the cosine.
NORM_EPS = 1e-8
# NuSLERP: norms are clamped below at this when normalizing.
NUSLERP_NORM_FLOOR = 1e-7
# NuSLERP: linear interpolation where 1 - cos^2 <= NUSLERP_EPS^2.
NUSLERP_EPS = 1e-8
# NuSLERP: a weight sum below this gives t = 1/2.
WEIGHT_SUM_EPS = 1e-6


def slerp(stacked, weights, base=None, *, key=None, t: float) -> jax.Array:
    """SLERP (Shoemake 1985) of two whole tensors: slerp(x_0, x_1; t), linear where
    |cos theta| > 0.9995.

    t = 0 gives x_0 (mergekit's base model), t = 1 gives x_1. The cosine is of the tensors
    flattened, each divided by its norm (norms <= 1e-8 count as 1). The weights take no part.
    """
    del weights, base, key
    dtype = compute_dtype()
    a, b = stacked[0].astype(dtype), stacked[1].astype(dtype)
    norm_a, norm_b = _norm_or_one(a), _norm_or_one(b)
    cosine = jnp.clip(accurate_sum((a / norm_a) * (b / norm_b)), -1.0, 1.0)
    linear = jnp.abs(cosine) > DOT_THRESHOLD
    coef_a, coef_b = _slerp_coefficients(jnp.where(linear, 0.0, cosine), t)
    coef_a = jnp.where(linear, 1.0 - t, coef_a)
    coef_b = jnp.where(linear, t, coef_b)
    return coef_a * a + coef_b * b


def nuslerp(
    stacked,
    weights,
    base=None,
    *,
    key=None,
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
) -> jax.Array:
    """NuSLERP (mergekit's SLERP by weights): slerp(x_0, x_1; t) at t = w_1 / (w_0 + w_1), of
    task vectors with a base.

    With a base, base + slerp(x_0 - base, x_1 - base; t). The interpolated vectors are the whole
    tensor (`nuslerp_flatten`, the default), else the slices along axis 0 (`nuslerp_row_wise`,
    one vector per column of a matrix) or along the last axis (one per row). Linear where
    1 - cos^2 <= 1e-16; t = 1/2 when the weights sum to less than 1e-6.
    """
    del key
    dtype = compute_dtype()
    w = weights.astype(dtype)
    total = w[0] + w[1]
    t = jnp.where(jnp.abs(total) < WEIGHT_SUM_EPS, 0.5, w[1] / jnp.where(total == 0, 1.0, total))
    v0, v1 = stacked[0].astype(dtype), stacked[1].astype(dtype)
    if base is not None:
        v0, v1 = v0 - base.astype(dtype), v1 - base.astype(dtype)
    axis = None if nuslerp_flatten or stacked.ndim == 1 else (0 if nuslerp_row_wise else -1)
    u0, u1 = _clamped_unit(v0, axis), _clamped_unit(v1, axis)
    cosine = jnp.clip(sum_along(u0 * u1, axis), -1.0, 1.0)
    collinear = 1.0 - jnp.square(cosine) <= NUSLERP_EPS**2
    coef_0, coef_1 = _slerp_coefficients(jnp.where(collinear, 0.0, cosine), t)
    merged = jnp.where(collinear, (1.0 - t) * v0 + t * v1, coef_0 * v0 + coef_1 * v1)
    if base is not None:
        merged = base.astype(dtype) + merged
    return merged


def multislerp(
    stacked, weights, base=None, *, key=None, normalize_weights: bool = True, eps: float = 1e-8
) -> jax.Array:
    """Multi-SLERP (Goddard 2024): the weighted mean direction of the models, at the weighted
    mean norm, of task vectors x_i - base when a base is given.

    With a_i = w_i / sum w (or w_i without `normalize_weights`), n_i = |x_i| and
    u_i = x_i / (n_i + eps): merged = (sum_i a_i n_i) m / |m| with m = sum_i a_i u_i. mergekit
    phrases this as a tangent-space average at m / |m| mapped back by the exponential map; that
    tangent average, sum_i a_i (u_i - <u_i, m/|m|> m/|m|) = m - |m| m/|m|, is identically zero,
    so the exponential map returns m / |m|, which is what is computed here. Where |m| < eps
    (directions that cancel) the merge is sum_i a_i x_i, mergekit's fallback for two models (it
    raises for more). One model is returned as it is.
    """
    del key
    n = stacked.shape[0]
    dtype = compute_dtype()
    if n == 1:
        return stacked[0].astype(dtype)
    w = weights.astype(dtype)
    if normalize_weights:
        w = w / jnp.sum(w)
    vectors = [stacked[i].astype(dtype) for i in range(n)]
    if base is not None:
        vectors = [v - base.astype(dtype) for v in vectors]
    norms = [accurate_norm(v) for v in vectors]
    mean = sum_over_models(w[i] * (v / (norms[i] + eps)) for i, v in enumerate(vectors))
    mean_norm = accurate_norm(mean)
    scale = sum_over_models(w[i] * norms[i] for i in range(n))
    spherical = mean * (scale / jnp.where(mean_norm < eps, 1.0, mean_norm))
    linear = sum_over_models(w[i] * v for i, v in enumerate(vectors))
    merged = jnp.where(mean_norm < eps, linear, spherical)
    if base is not None:
        merged = base.astype(dtype) + merged
    return merged


def _slerp_coefficients(cosine: jax.Array, t) -> tuple[jax.Array, jax.Array]:
    """sin((1 - t) theta) / sin theta and sin(t theta) / sin theta, theta = arccos(cosine).

    Callers pass cosine 0 where they interpolate linearly instead, which keeps this branch finite.
    """
    theta = jnp.arccos(cosine)
    sin_theta = jnp.sin(theta)
    return jnp.sin((1.0 - t) * theta) / sin_theta, jnp.sin(t * theta) / sin_theta


def _norm_or_one(x: jax.Array) -> jax.Array:
    norm = accurate_norm(x)
    return jnp.where(norm > NORM_EPS, norm, 1.0)


def _clamped_unit(x: jax.Array, axis: int | None) -> jax.Array:
    norm = jnp.sqrt(sum_along(jnp.square(x), axis))
    return x / jnp.maximum(norm, NUSLERP_NORM_FLOOR)


register(
    MergeMethod(
        name="slerp",
        scratch=(1.1, 0.5),
        leaf=slerp,
        params=(
            Param(
                "t",
                REQUIRED,
                "position from model 0 (t=0) to model 1 (t=1)",
                check=number,
                traced=True,
            ),
        ),
        base=BASE_NONE,
        min_models=2,
        max_models=2,
        weighted=False,
        summary="spherical interpolation of two whole tensors",
        citation="Shoemake 1985, Animating rotation with quaternion curves",
    )
)

register(
    MergeMethod(
        name="nuslerp",
        scratch=(1.1, 0.5),
        leaf=nuslerp,
        params=(
            Param("nuslerp_row_wise", False, "interpolate the slices along axis 0", check=boolean),
            Param("nuslerp_flatten", True, "interpolate whole tensors", check=boolean),
        ),
        base=BASE_OPTIONAL,
        min_models=2,
        max_models=2,
        summary="SLERP at t = w_1 / (w_0 + w_1), of task vectors with a base",
        signed_weights=True,
        citation="Shoemake 1985, Animating rotation with quaternion curves",
    )
)

register(
    MergeMethod(
        name="multislerp",
        scratch=(1.1, 1.5),
        leaf=multislerp,
        params=(
            Param("normalize_weights", True, "divide the weights by their sum", check=boolean),
            Param("eps", 1e-8, "added to norms; below it directions cancel", check=positive),
        ),
        base=BASE_OPTIONAL,
        summary="weighted mean direction at the weighted mean norm",
        signed_weights=True,
        divides_by_weight_sum=lambda params: params["normalize_weights"],
        citation="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    )
)
