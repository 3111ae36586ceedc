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

from jkarcher.methods.gram_passes import GRAM_SCRATCH, gram_passes, line_by_line
from jkarcher.methods.registry import (
    BASE_NONE,
    BASE_OPTIONAL,
    REQUIRED,
    ROWS,
    MergeMethod,
    Param,
    Passes,
    boolean,
    number,
    positive,
    register,
)
from jkarcher.numerics import compute_dtype

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


def slerp(stacked, weights, base=None, *, key=None, t) -> jax.Array:
    """SLERP (Shoemake 1985) of two whole tensors: slerp(x_0, x_1; t), linear where
    |cos theta| > 0.9995.

    t = 0 gives x_0 (mergekit's base model), t = 1 gives x_1. The cosine is of the tensors
    flattened, <x_0, x_1> / (|x_0| |x_1|) (norms <= 1e-8 count as 1). The weights take no part.
    Both passes of `SLERP` in one program.
    """
    del key, base
    return SLERP.in_one_program(stacked, weights, None, t=t)


def _slerp_gammas(gram, weights, *, t) -> jax.Array:
    """SLERP's coefficients of x_0 and x_1 from their Gram matrix."""
    del weights
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    norms = jnp.where(norms > NORM_EPS, norms, 1.0)
    cosine = jnp.clip(gram[0, 1] / (norms[0] * norms[1]), -1.0, 1.0)
    linear = jnp.abs(cosine) > DOT_THRESHOLD
    spherical = _slerp_coefficients(jnp.where(linear, 0.0, cosine), t)
    return jnp.where(linear, jnp.stack([1.0 - t, t]), jnp.stack(spherical))


# Tensors of any size: <x_0, x_1> and the norms over blocks of rows, then the combination.
SLERP = gram_passes(_slerp_gammas)


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
    tensor (`nuslerp_flatten`, the default: both passes of `NUSLERP` in one program), else the
    slices along axis 0 (`nuslerp_row_wise`, one vector per column of a matrix) or along the
    last axis (one per row). Norms are floored at 1e-7; linear where 1 - cos^2 <= 1e-16;
    t = 1/2 when the weights sum to less than 1e-6.
    """
    del key
    if nuslerp_flatten or stacked.ndim == 1:
        return NUSLERP.in_one_program(stacked, weights, base)
    if not nuslerp_row_wise:
        return line_by_line(_nuslerp_gammas, stacked, weights, base)
    dtype = compute_dtype()
    t = _nuslerp_t(weights.astype(dtype))
    v0, v1 = stacked[0].astype(dtype), stacked[1].astype(dtype)
    if base is not None:
        v0, v1 = v0 - base.astype(dtype), v1 - base.astype(dtype)
    u0, u1 = _clamped_columns(v0), _clamped_columns(v1)
    cosine = jnp.clip(jnp.sum(u0 * u1, axis=0, keepdims=True), -1.0, 1.0)
    collinear = 1.0 - jnp.square(cosine) <= NUSLERP_EPS**2
    coef_0, coef_1 = _slerp_coefficients(jnp.where(collinear, 0.0, cosine), t)
    merged = jnp.where(collinear, (1.0 - t) * v0 + t * v1, coef_0 * v0 + coef_1 * v1)
    if base is not None:
        merged = base.astype(dtype) + merged
    return merged


def _nuslerp_t(w: jax.Array) -> jax.Array:
    """t = w_1 / (w_0 + w_1), or 1/2 where the weights sum to less than 1e-6."""
    total = w[0] + w[1]
    return jnp.where(jnp.abs(total) < WEIGHT_SUM_EPS, 0.5, w[1] / jnp.where(total == 0, 1.0, total))


def _nuslerp_gammas(gram, weights, **params) -> jax.Array:
    """NuSLERP's coefficients of the two (task) vectors from their Gram matrix."""
    del params
    t = _nuslerp_t(weights.astype(gram.dtype))
    norms = jnp.maximum(jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0)), NUSLERP_NORM_FLOOR)
    cosine = jnp.clip(gram[0, 1] / (norms[0] * norms[1]), -1.0, 1.0)
    collinear = 1.0 - jnp.square(cosine) <= NUSLERP_EPS**2
    spherical = _slerp_coefficients(jnp.where(collinear, 0.0, cosine), t)
    return jnp.where(collinear, jnp.stack([1.0 - t, t]), jnp.stack(spherical))


# Whole tensors of any size (`nuslerp_flatten`), in two passes over blocks of rows.
NUSLERP = gram_passes(_nuslerp_gammas)


def _nuslerp_blocked(params) -> Passes | str | None:
    """Whole tensors in two passes; vectors along the last axis (rows) block by block; columns
    (`nuslerp_row_wise`) whole."""
    if params["nuslerp_flatten"]:
        return NUSLERP
    return None if params["nuslerp_row_wise"] else ROWS


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
    raises for more). One model is returned as it is. Both passes of `MULTISLERP` in one
    program: the norms and |m|^2 = sum_ij a_i a_j G_ij / ((n_i + eps)(n_j + eps)) come from the
    Gram matrix G, and merged = sum_i gamma_i x_i.
    """
    del key
    params = dict(normalize_weights=normalize_weights, eps=eps)
    return MULTISLERP.in_one_program(stacked, weights, base, **params)


def _multislerp_gammas(gram, weights, *, normalize_weights: bool, eps: float) -> jax.Array:
    """Multi-SLERP's coefficients gamma_i = a_i / (n_i + eps) * (sum_j a_j n_j) / |m| (a_i
    where |m| < eps) from the Gram matrix of the (task) vectors."""
    n = gram.shape[0]
    if n == 1:
        return jnp.ones((1,), gram.dtype)
    w = weights.astype(gram.dtype)
    if normalize_weights:
        w = w / jnp.sum(w)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    directions = w / (norms + eps)
    mean_norm = jnp.sqrt(jnp.maximum(directions @ gram @ directions, 0.0))
    scale = jnp.sum(w * norms)
    spherical = directions * (scale / jnp.where(mean_norm < eps, 1.0, mean_norm))
    return jnp.where(mean_norm < eps, w, spherical)


# Tensors of any size: the norms and the mean direction's norm over blocks of rows.
MULTISLERP = gram_passes(_multislerp_gammas)


def _slerp_coefficients(cosine: jax.Array, t) -> tuple[jax.Array, jax.Array]:
    """sin((1 - t) theta) / sin theta and sin(t theta) / sin theta, theta = arccos(cosine).

    Callers pass cosine 0 where they interpolate linearly instead, which keeps this branch finite.
    """
    theta = jnp.arccos(cosine)
    sin_theta = jnp.sin(theta)
    return jnp.sin((1.0 - t) * theta) / sin_theta, jnp.sin(t * theta) / sin_theta


def _clamped_columns(x: jax.Array) -> jax.Array:
    """x with each slice along axis 0 divided by its norm, floored at 1e-7."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=0, keepdims=True))
    return x / jnp.maximum(norm, NUSLERP_NORM_FLOOR)


register(
    MergeMethod(
        name="slerp",
        scratch=GRAM_SCRATCH,
        leaf=slerp,
        blocked=lambda params: SLERP,
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
        scratch=lambda params, inputs, shape: (
            GRAM_SCRATCH if params["nuslerp_flatten"] else (1.1, 0.5)
        ),
        leaf=nuslerp,
        blocked=_nuslerp_blocked,
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
        scratch=GRAM_SCRATCH,
        leaf=multislerp,
        blocked=lambda params: MULTISLERP,
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
