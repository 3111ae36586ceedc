"""Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging").

Each model's posterior is approximated by a Gaussian whose precision is its diagonal Fisher F_i
(see `jkarcher.fisher`); the merge maximizes the weighted joint likelihood, which per coordinate
is the precision-weighted average

    merged = sum_i w_i F~_i x_i / sum_i w_i F~_i,      F~_i = max(F_i, fisher_floor).

The floor keeps the denominator positive: where every F_i is below it, all weigh fisher_floor and
the merge is the plain weighted average sum_i w_i x_i / sum_i w_i. Its default, 1e-6, is that of
the authors' code (github.com/mmatena/model_merging), which floors only the first ("target")
model's Fisher when favoring it; here every model is floored, so no model is favored. The floor
is absolute, in the Fisher's units (a mean over tokens of squared gradients).

With equal F_i the merge is `linear`. A base model changes nothing (the per-coordinate weights
sum to 1, so base + sum_i a_i (x_i - base) = sum_i a_i x_i), hence none is taken. Scaling model
i's Fisher by a constant c_i is the same as scaling its weight by c_i; the authors' option of
dividing each Fisher by its global L2 norm is therefore a choice of weights w_i / ||F_i||.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jkarcher.methods.registry import MergeMethod, Param, always_rows, positive, register
from jkarcher.numerics import compute_dtype, sum_over_models

DEFAULT_FISHER_FLOOR = 1e-6


def fisher_merging(
    stacked,
    weights,
    base=None,
    *,
    key=None,
    fisher: jax.Array,
    fisher_floor: float = DEFAULT_FISHER_FLOOR,
) -> jax.Array:
    """Fisher-weighted average  sum_i w_i F~_i x_i / sum_i w_i F~_i  with F~_i = max(F_i, floor).

    Args:
      stacked: [N, ...] the sources, any float dtype.
      weights: [N] non-negative weights, not all zero.
      fisher: [N, ...] the sources' diagonal Fisher estimates (negative entries count as 0).
      fisher_floor: the least value a Fisher entry counts as (> 0).

    Computed and returned in float32 (float64 under x64).
    """
    del base, key
    dtype = compute_dtype()
    w = weights.astype(dtype)
    shares = w / jnp.sum(w)  # scale-free weights keep the floor's meaning fixed
    precisions = [
        shares[i] * jnp.maximum(fisher[i].astype(dtype), fisher_floor)
        for i in range(stacked.shape[0])
    ]
    numerator = sum_over_models(p * stacked[i].astype(dtype) for i, p in enumerate(precisions))
    return numerator / sum_over_models(precisions)


register(
    MergeMethod(
        name="fisher_merging",
        scratch=(0.1, 0.5),
        blocked=always_rows,
        leaf=fisher_merging,
        params=(
            Param(
                "fisher_floor",
                DEFAULT_FISHER_FLOOR,
                "least value a Fisher entry counts as (where all are below: weighted average)",
                check=positive,
                traced=True,
            ),
        ),
        tensor_inputs=("fisher",),
        tensor_inputs_required=True,
        summary="average weighted per coordinate by each model's diagonal Fisher",
        citation="https://arxiv.org/abs/2111.09832",
    )
)
