"""Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models",
arXiv:2403.19522).

Fine-tuned weights lie on a thin shell around the center that the merge should reach; from the
angle between the fine-tuning offsets delta_i = x_i - base the center is estimated as

    c = mean over pairs i < j of cos(delta_i, delta_j)    (|delta_i| |delta_j| floored at 1e-6)
    t = N c / (1 + (N - 1) c)                            (t = 0 where |1 + (N - 1) c| < 1e-6)
    merged = t * (1/N) sum_i x_i + (1 - t) * base,

for the whole tensor, or with `filter_wise` for each slice along the last axis (each row of a
matrix). The per-model weights take no part. Model Stock is a baseline of Wang, Ye, Yin (2026,
Sec. 4), which cites its thin-shell geometry as a motivation for geodesic merging.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jkarcher.methods.registry import BASE_REQUIRED, MergeMethod, Param, boolean, register
from jkarcher.methods.task_arithmetic import task_vectors
from jkarcher.numerics import sum_along, sum_over_models

# Floor of the product of two offsets' norms in a cosine.
NORM_PRODUCT_FLOOR = 1e-6
# Where |1 + (N - 1) c| is below this the base is kept (t = 0).
SINGULAR_EPS = 1e-6


def model_stock(stacked, weights, base, *, key=None, filter_wise: bool = False) -> jax.Array:
    """Model Stock (Jang et al. 2024, arXiv:2403.19522): t * mean(x) + (1 - t) * base with
    t = N c / (1 + (N - 1) c) from the offsets' mean pairwise cosine c. Weights are not used."""
    del weights, key
    n = stacked.shape[0]
    axis = -1 if filter_wise and stacked.ndim > 2 else None
    deltas = task_vectors(stacked, base)
    norms = [jnp.sqrt(sum_along(jnp.square(d), axis)) for d in deltas]
    cosines = [
        jnp.clip(
            sum_along(deltas[i] * deltas[j], axis)
            / jnp.maximum(norms[i] * norms[j], NORM_PRODUCT_FLOOR),
            -1.0,
            1.0,
        )
        for i in range(n)
        for j in range(i + 1, n)
    ]
    cosine = sum_over_models(cosines) / len(cosines)
    denominator = 1.0 + (n - 1) * cosine
    singular = jnp.abs(denominator) < SINGULAR_EPS
    t = jnp.where(singular, 0.0, n * cosine / jnp.where(singular, 1.0, denominator))
    dtype = cosine.dtype
    average = sum_over_models(stacked[i].astype(dtype) for i in range(n)) / n
    return t * average + (1.0 - t) * base.astype(dtype)


register(
    MergeMethod(
        name="model_stock",
        scratch=(1.5, 0.5),
        leaf=model_stock,
        params=(
            Param(
                "filter_wise",
                False,
                "one interpolation per slice along the last axis",
                check=boolean,
            ),
        ),
        base=BASE_REQUIRED,
        min_models=2,
        weighted=False,
        summary="interpolate the average toward the base by the offsets' angle",
        citation="https://arxiv.org/abs/2403.19522",
    )
)
