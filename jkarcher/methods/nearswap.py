"""NearSwap (alchemonaut 2024, huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001): take the
model's value where it is near the base's, and stay with the base where they differ much.

With the base a and the model b, entry by entry

    w = clip(t / max(|a - b|, 1e-6), 0, 1),    merged = w b + (1 - w) a,

so entries that differ by at most t are the model's, and larger differences move toward the base
in proportion t / |a - b|. The per-model weights take no part. (Not among the baselines of
Wang, Ye, Yin 2026; here so that mergekit configurations using it run.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jkarcher.methods.registry import (
    BASE_REQUIRED,
    REQUIRED,
    MergeMethod,
    Param,
    always_rows,
    non_negative,
    register,
)
from jkarcher.numerics import compute_dtype

# The floor of |a - b| in the interpolation weight.
DIFFERENCE_FLOOR = 1e-6


def nearswap(stacked, weights, base, *, key=None, t: float) -> jax.Array:
    """NearSwap (alchemonaut 2024): w x + (1 - w) b with w = clip(t / max(|b - x|, 1e-6), 0, 1),
    entry by entry, for the model x and the base b."""
    del weights, key
    dtype = compute_dtype()
    a, b = base.astype(dtype), stacked[0].astype(dtype)
    w = jnp.clip(t / jnp.maximum(jnp.abs(a - b), DIFFERENCE_FLOOR), 0.0, 1.0)
    return w * b + (1.0 - w) * a


register(
    MergeMethod(
        name="nearswap",
        scratch=(0.5, 0.5),
        blocked=always_rows,
        leaf=nearswap,
        params=(
            Param(
                "t",
                REQUIRED,
                "distance below which the model's value is taken",
                check=non_negative,
                traced=True,
            ),
        ),
        base=BASE_REQUIRED,
        max_models=1,
        weighted=False,
        summary="the model where it is within t of the base, moving to the base beyond",
        citation="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    )
)
