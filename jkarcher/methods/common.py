"""Small helpers shared by the leaf functions of several method families."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def compute_dtype() -> jnp.dtype:
    """The dtype merges compute in: float64 where JAX's x64 mode is on, else float32.

    Storage dtypes such as bfloat16 are never used for arithmetic; results are cast back.
    """
    return jnp.dtype(jnp.float64) if jax.config.jax_enable_x64 else jnp.dtype(jnp.float32)


def sum_over_models(terms) -> jax.Array:
    """Sum of an iterable of same-shaped arrays, one per model, as a chain of adds.

    Reductions over the leading (model) axis of a stacked array are very slow on XLA's CPU backend
    (over 30x a fused elementwise chain); with N static, an unrolled chain fuses into one loop.
    """
    return functools.reduce(jnp.add, terms)


def weighted_sum(stacked: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_i w_i x_i over the leading axis, in the compute dtype."""
    dtype = compute_dtype()
    w = weights.astype(dtype)
    return sum_over_models(w[i] * stacked[i].astype(dtype) for i in range(stacked.shape[0]))
