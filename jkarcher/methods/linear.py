"""Linear interpolation (model soups; Wortsman et al. 2022, "Model soups")."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jkarcher.methods.registry import MergeMethod, Param, always_rows, boolean, register
from jkarcher.numerics import weighted_sum


def linear(stacked, weights, base=None, *, key=None, normalize: bool = True) -> jax.Array:
    """Weighted average  sum_i w_i x_i / sum_i w_i  (or the plain weighted sum if not normalize).

    The weights may be negative (a negative weight subtracts its model), as in mergekit; with
    normalize their sum must not be 0.

    Computed and returned in float32 (float64 under x64).
    """
    del base, key
    total = weighted_sum(stacked, weights)
    if normalize:
        total = total / jnp.sum(weights.astype(total.dtype))
    return total


register(
    MergeMethod(
        name="linear",
        scratch=(0.1, 0.5),
        blocked=always_rows,
        leaf=linear,
        params=(Param("normalize", True, "divide by the sum of the weights", check=boolean),),
        summary="weighted average of the models",
        signed_weights=True,
        divides_by_weight_sum=lambda params: params["normalize"],
        citation="https://arxiv.org/abs/2203.05482",
    )
)
