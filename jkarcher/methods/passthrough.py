"""Passthrough: one model's tensor as it is, optionally scaled (mergekit's `passthrough`, used to
stack or copy layers; not a merge, and not among the baselines of Wang, Ye, Yin 2026)."""

from __future__ import annotations

import jax

from jkarcher.methods.registry import MergeMethod, Param, always_rows, number, optional, register
from jkarcher.numerics import compute_dtype


def passthrough(stacked, weights, base=None, *, key=None, scale: float | None = None) -> jax.Array:
    """x_0, or scale * x_0, in float32 (float64 under x64)."""
    del weights, base, key
    model = stacked[0].astype(compute_dtype())
    return model if scale is None else model * scale


register(
    MergeMethod(
        name="passthrough",
        scratch=(0.1, 0.5),
        blocked=always_rows,
        leaf=passthrough,
        params=(Param("scale", None, "factor applied to the tensor", check=optional(number)),),
        max_models=1,
        weighted=False,
        summary="one model's tensor, optionally scaled",
        citation="https://github.com/arcee-ai/mergekit",
    )
)
