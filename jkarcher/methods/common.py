"""Small helpers shared by the leaf functions of several method families."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jkarcher.numerics import compute_dtype


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


def with_auto_axes(fn):
    """Run `fn(stacked, *args)` with a mesh's Explicit axes turned Auto for its duration.

    Leaf functions reshape and reduce freely; under explicit sharding every such reshape would
    need an output sharding. Inside, XLA's propagation places the work; outputs shaped like one
    slice of `stacked` are sharded like that slice (as a leaf of the models is), others replicated.
    """

    @functools.wraps(fn)
    def wrapped(stacked, *args, **kwargs):
        sharding = jax.typeof(stacked).sharding
        mesh = getattr(sharding, "mesh", None)
        if mesh is None or mesh.empty or AxisType.Explicit not in mesh.axis_types:
            return fn(stacked, *args, **kwargs)
        run = lambda s, *a: fn(s, *a, **kwargs)
        slice_sharding = NamedSharding(mesh, PartitionSpec(*sharding.spec[1:]))
        replicated = NamedSharding(mesh, PartitionSpec())
        out_sharding = jax.tree.map(
            lambda out: slice_sharding if out.shape == stacked.shape[1:] else replicated,
            jax.eval_shape(run, *map(_unsharded_shape, (stacked, *args))),
        )
        return jax.sharding.auto_axes(run, out_sharding=out_sharding)(stacked, *args)

    return wrapped


def _unsharded_shape(x):
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), x)
