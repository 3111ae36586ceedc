"""Numerics shared by every merge: the compute dtype, checked weights, all-finite flags.

Merges compute in float32 (float64 under JAX's x64 mode) whatever the storage dtype, and round
once, to the output dtype; weights are checked before they reach a leaf; every input and result
is checked finite in the same pass that reads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jkarcher.errors import MergeError


def compute_dtype() -> jnp.dtype:
    """The dtype merges compute in: float64 where JAX's x64 mode is on, else float32.

    Storage dtypes such as bfloat16 are never used for arithmetic. Leaf functions return their
    results in this dtype; `jkarcher.merge.leaf_function` rounds them once to the output dtype.
    """
    return jnp.dtype(jnp.float64) if jax.config.jax_enable_x64 else jnp.dtype(jnp.float32)


def check_weights(weights: Sequence[float] | jax.Array | None, n_models: int) -> jax.Array:
    """The weights as a float array [N] in the compute dtype.

    Errors for a wrong count, values that are not numbers, negative or not finite, that
    overflow the compute dtype (float32: beyond 3.4e38), or that sum to zero (or overflow). Traced
    weights (inside a caller's jit) can only be checked by `jax.experimental.checkify`: the same
    checks run there as `checkify.debug_check`s, which do nothing unless the caller's function
    is wrapped in `checkify.checkify`.
    """
    dtype = compute_dtype()
    if weights is None:
        return jnp.ones((n_models,), dtype)
    if isinstance(weights, jax.core.Tracer):
        if weights.shape != (n_models,):
            raise MergeError(f"got weights of shape {weights.shape} for {n_models} models")
        weights = weights.astype(dtype)
        total = jnp.sum(weights)
        checkify.debug_check(
            jnp.all(jnp.isfinite(weights) & (weights >= 0)) & jnp.isfinite(total) & (total > 0),
            "the weights must be finite, >= 0 and not all zero",
        )
        return weights
    try:
        values = np.asarray(weights, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise MergeError(f"weights must be numbers, got {weights!r}") from None
    if values.shape != (n_models,):
        raise MergeError(f"got {values.size} weights for {n_models} models")
    largest = float(jnp.finfo(dtype).max)
    for index, value in enumerate(values):
        if not np.isfinite(value) or value < 0:
            raise MergeError(f"weight of model {index} is {value}; weights must be finite and >= 0")
        if value > largest:
            raise MergeError(
                f"weight of model {index} is {value:g}, beyond the {dtype.name} range "
                f"({largest:.3g}) that merges compute in"
            )
    if values.sum() <= 0:
        raise MergeError("the weights sum to zero; at least one model needs a positive weight")
    if values.sum() > largest:
        raise MergeError(f"the weights sum to {values.sum():g}, beyond the {dtype.name} range")
    return jnp.asarray(values, dtype)


def all_finite(arrays: Sequence[jax.Array]) -> jax.Array:
    """[len(arrays)] flags: whether each array holds only finite values.

    x * 0 is 0 where x is finite and NaN where it is not, so one variadic sum over the last
    axis checks every array (all of one shape) in a single read of the data.
    """
    zeros = tuple(jnp.atleast_1d(a).astype(jnp.float32) * 0 for a in arrays)
    sums = jax.lax.reduce(
        zeros,
        (jnp.float32(0),) * len(zeros),
        lambda x, y: tuple(p + q for p, q in zip(x, y, strict=True)),
        (zeros[0].ndim - 1,),
    )
    return jnp.stack([jnp.sum(s) == 0 for s in sums])
