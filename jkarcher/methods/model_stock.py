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
import numpy as np

from jkarcher.methods.gram_passes import GRAM_SCRATCH, gram_passes, line_by_line
from jkarcher.methods.registry import (
    BASE_REQUIRED,
    ROWS,
    MergeMethod,
    Param,
    Passes,
    boolean,
    register,
)
from jkarcher.numerics import sum_over_models

# Floor of the product of two offsets' norms in a cosine.
NORM_PRODUCT_FLOOR = 1e-6
# Where |1 + (N - 1) c| is below this the base is kept (t = 0).
SINGULAR_EPS = 1e-6


def model_stock(stacked, weights, base, *, key=None, filter_wise: bool = False) -> jax.Array:
    """Model Stock (Jang et al. 2024, arXiv:2403.19522): t * mean(x) + (1 - t) * base with
    t = N c / (1 + (N - 1) c) from the offsets' mean pairwise cosine c. Weights are not used.

    c comes from the offsets' Gram matrix, and the merge is base + sum_i (t / N) (x_i - base):
    of a whole tensor, both passes of `MODEL_STOCK` in one program; with `filter_wise`, of each
    line along the last axis (`line_by_line`).
    """
    del key
    if filter_wise and stacked.ndim > 2:
        return line_by_line(_gammas, stacked, weights, base)
    return MODEL_STOCK.in_one_program(stacked, weights, base)


def _interpolation(cosine: jax.Array, n: int) -> jax.Array:
    """t = N c / (1 + (N - 1) c), or 0 where |1 + (N - 1) c| < 1e-6."""
    denominator = 1.0 + (n - 1) * cosine
    singular = jnp.abs(denominator) < SINGULAR_EPS
    return jnp.where(singular, 0.0, n * cosine / jnp.where(singular, 1.0, denominator))


def _gammas(gram, weights, **params) -> jax.Array:
    """t / N for each offset, c the mean over pairs i < j of the offsets' cosines from their
    Gram matrix."""
    del weights, params
    n = gram.shape[0]
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    cosines = jnp.clip(
        gram / jnp.maximum(norms[:, None] * norms[None, :], NORM_PRODUCT_FLOOR), -1, 1
    )
    pairs = list(zip(*np.triu_indices(n, k=1), strict=True))
    t = _interpolation(sum_over_models(cosines[i, j] for i, j in pairs) / len(pairs), n)
    return jnp.full((n,), t / n)


# Whole tensors of any size: the offsets' Gram matrix over blocks of rows, then base plus the
# offsets' scaled sum.
MODEL_STOCK = gram_passes(_gammas)


def _blocked(params) -> Passes | str:
    """Whole tensors in two passes; slices along the last axis (`filter_wise`) block by block."""
    return ROWS if params["filter_wise"] else MODEL_STOCK


register(
    MergeMethod(
        name="model_stock",
        scratch=lambda params, inputs, shape: (1.5, 0.5) if params["filter_wise"] else GRAM_SCRATCH,
        leaf=model_stock,
        blocked=_blocked,
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
