"""Arcee Fusion (Goddard et al. 2024, "Arcee's MergeKit", arXiv:2403.13257; method introduced in
mergekit): take the model's entries where they matter most, the base's elsewhere.

With the model x and the base b, the importance of entry j is

    s_j = |x_j - b_j| * KL(p || q),  p = softmax(x) + 1e-8,  q = softmax(b) + 1e-8,

the KL divergence taken along the last axis (one value per row of a matrix, one for a vector).
With Q1, Q2, Q3 the order statistics of s at ranks floor(q (D - 1)) for q = 1/4, 1/2, 3/4,
the threshold is Q2 + 1.5 (Q3 - Q1), and merged = b + (x - b) * [s >= threshold].

mergekit estimates the quartiles from a random sample (with replacement, from torch's unseeded
generator) of 10^6 entries when a tensor has more; here they are always exact, so the merge is
deterministic, and equal to mergekit's for tensors of up to 10^6 entries. Arcee Fusion is a
baseline of Wang, Ye, Yin (2026, Sec. 4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jkarcher.methods.registry import BASE_REQUIRED, MergeMethod, register
from jkarcher.methods.selection import order_statistic
from jkarcher.numerics import compute_dtype

# Added to both softmax distributions before the KL divergence.
PROBABILITY_EPS = 1e-8
# The threshold is the median plus this many interquartile ranges.
IQR_FACTOR = 1.5


def arcee_fusion(stacked, weights, base, *, key=None) -> jax.Array:
    """Arcee Fusion (Goddard et al. 2024): b + (x - b) [s >= Q2 + 1.5 (Q3 - Q1)] with the
    importance s = |x - b| KL(softmax x || softmax b) (module docstring)."""
    del weights, key
    dtype = compute_dtype()
    model = jnp.atleast_1d(stacked[0].astype(dtype))
    origin = jnp.atleast_1d(base.astype(dtype))
    importance = fusion_importance(model, origin)
    keep = importance >= fusion_threshold(importance)
    merged = origin + (model - origin) * keep
    return merged.reshape(stacked.shape[1:])


def fusion_importance(model: jax.Array, base: jax.Array) -> jax.Array:
    """|x - b| times KL(softmax(x) + eps || softmax(b) + eps) along the last axis."""
    p = jax.nn.softmax(model, axis=-1) + PROBABILITY_EPS
    q = jax.nn.softmax(base, axis=-1) + PROBABILITY_EPS
    divergence = jnp.sum(p * jnp.log(p / q), axis=-1, keepdims=True)
    return jnp.abs(model - base) * divergence


def fusion_threshold(importance: jax.Array) -> jax.Array:
    """Q2 + 1.5 (Q3 - Q1) with the exact order statistics at floor(q (D - 1))."""
    last = importance.size - 1
    ranks = (last // 4, last // 2, 3 * last // 4)
    q1, q2, q3 = (order_statistic(importance, rank) for rank in ranks)
    return q2 + IQR_FACTOR * (q3 - q1)


register(
    MergeMethod(
        name="arcee_fusion",
        scratch=(6.5, 1),
        leaf=arcee_fusion,
        base=BASE_REQUIRED,
        max_models=1,
        weighted=False,
        summary="the model's entries of outlying importance, the base's elsewhere",
        citation="https://arxiv.org/abs/2403.13257",
    )
)
