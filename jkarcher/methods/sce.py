"""SCE: Select, Calculate, Erase (Wan et al. 2024, "FuseChat", arXiv:2408.07990).

With task vectors delta_i = x_i - base:

1. select: with select_topk < 1, keep only the entries whose variance across the models,
   v = (1/N) sum_i (delta_i - mean delta)^2, is among the k = floor(select_topk * #{v != 0})
   largest (k computed in float32, as mergekit does; of equal variances the lowest-index entries,
   the selection order of `jkarcher.methods.selection`); the other entries of every delta are 0;
2. calculate: model weights a_i = mean(delta_i^2) / sum_j mean(delta_j^2), or 1/N when that sum
   is below 1e-6;
3. erase: TIES sign election on the (unweighted) deltas;

merged = base + sum_i c_i a_i delta_i / max(sum_i c_i a_i, 1e-6), with c_i the election mask.

The per-model weights take no part: SCE derives its own from the task vectors. Note the 1e-6
floor of step 2, taken from mergekit: fine-tuning deltas of typical size (entries ~1e-3, so
mean(delta^2) ~ 1e-6) fall below it and get equal weights. SCE is a baseline of Wang, Ye, Yin
(2026, Sec. 4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jkarcher.methods.registry import BASE_REQUIRED, MergeMethod, Param, fraction, register
from jkarcher.methods.selection import largest_mask
from jkarcher.methods.task_arithmetic import elect_signs, task_vectors
from jkarcher.numerics import accurate_sum, sum_over_models

# Below this sum of mean squared task vectors the models get equal weights.
WEIGHT_SUM_EPS = 1e-6
# The floor of the per-entry sum of the elected weights.
DIVISOR_FLOOR = 1e-6


def sce(stacked, weights, base, *, key=None, select_topk: float = 1.0) -> jax.Array:
    """SCE (Wan et al. 2024, arXiv:2408.07990) of the task vectors delta_i = x_i - base:
    base + sum_i c_i a_i delta_i / max(sum_i c_i a_i, 1e-6), after the variance top-k (module
    docstring). The weights are not used."""
    del weights, key
    deltas = task_vectors(stacked, base)
    if select_topk < 1:
        keep = variance_topk_mask(deltas, select_topk)
        deltas = [jnp.where(keep, d, 0.0) for d in deltas]
    agree = elect_signs(deltas)
    importance = model_weights(deltas)
    elected = [jnp.where(a, importance[i], 0.0) for i, a in enumerate(agree)]
    merged = sum_over_models(d * e for d, e in zip(deltas, elected, strict=True))
    merged = merged / jnp.maximum(sum_over_models(elected), DIVISOR_FLOOR)
    return base.astype(merged.dtype) + merged


def variance_topk_mask(deltas: list[jax.Array], select_topk: float) -> jax.Array:
    """True at the floor(select_topk * #nonzero) entries of largest variance across models.

    The mean is taken as delta_0 + mean(delta_i - delta_0), which is delta_0 exactly where every
    model agrees, so that the variance is exactly 0 there and the count of nonzero variances is
    mergekit's.
    """
    n = len(deltas)
    mean = deltas[0] + sum_over_models(d - deltas[0] for d in deltas) / n
    variance = sum_over_models(jnp.square(d - mean) for d in deltas) / n
    nonzero = jnp.sum(variance != 0)
    k = jnp.floor(nonzero.astype(jnp.float32) * jnp.float32(select_topk)).astype(jnp.int32)
    return (k > 0) & largest_mask(variance, jnp.maximum(k, 1))


def model_weights(deltas: list[jax.Array]) -> jax.Array:
    """a_i = mean(delta_i^2) / sum_j mean(delta_j^2), or 1/N when the sum is below 1e-6."""
    scores = jnp.stack([accurate_sum(jnp.square(d)) / d.size for d in deltas])
    total = jnp.sum(scores)
    equal = jnp.full_like(scores, 1.0 / len(deltas))
    proportional = scores / jnp.where(total == 0, 1.0, total)
    return jnp.where(jnp.abs(total) < WEIGHT_SUM_EPS, equal, proportional)


register(
    MergeMethod(
        name="sce",
        scratch=(1.25, 0.5),
        leaf=sce,
        params=(
            Param("select_topk", 1.0, "fraction of highest-variance entries kept", check=fraction),
        ),
        base=BASE_REQUIRED,
        weighted=False,
        summary="variance top-k, energy weights, sign election",
        citation="https://arxiv.org/abs/2408.07990",
    )
)
