"""Merging whole parameter pytrees, leaf by leaf, with any registered method.

`merge(pytrees, weights)` takes N pytrees of one structure (nested dicts, flax nnx State, any
pytree) and applies the method's leaf function to each leaf stacked across the models. The
jitted leaf function is cached per method and parameters (and by jit per shape and dtype), and
it is the same function the checkpoint pipeline runs, so both give identical values. Each leaf
keeps its dtype and sharding. Called inside a user's `jax.jit`, the same code traces into the
user's computation.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.sharding import Mesh

from jkarcher import blocked, methods
from jkarcher.errors import MergeError
from jkarcher.numerics import all_finite, compute_dtype, first_disagreeing
from jkarcher.pytree_leaves import (
    check_leaf,
    flatten_base,
    flatten_models,
    flatten_tensor_input,
    leaf_tensor_inputs,
)
from jkarcher.sharding import place_on_mesh, with_auto_axes


def merge(
    pytrees: Sequence[Any],
    weights: Sequence[float] | jax.Array | None = None,
    *,
    method: str = "karcher",
    base: Any = None,
    key: jax.Array | None = None,
    mesh: Mesh | None = None,
    **params: Any,
) -> Any:
    """Merge N pytrees of one structure into one, leaf by leaf.

    Args:
      pytrees: the N models' parameters, all with the same tree structure, shapes and dtypes.
      weights: N weights (default: equal): >= 0 and not all zero, or of any sign for the methods
        that take signed weights (`jkarcher.methods.get(method).signed_weights`).
      method: a name from `jkarcher.methods.names()`.
      base: the base model's parameters, same structure, for methods that use one.
      key: a `jax.random` key, required by random methods; each leaf folds in its path.
      mesh: a device mesh for the leaves (of models, base and tensor inputs) that are not yet
        spread over several devices (NumPy arrays, single-device arrays): each is placed on it
        split along its first axis that the device count divides, or replicated when none does
        (`jkarcher.sharding.place_on_mesh`). Leaves already sharded keep their sharding.
      **params: the method's parameters (see `jkarcher.methods.get(method).params`), and its
        tensor inputs (`.tensor_inputs`, e.g. `fisher=[fisher_0, ..., fisher_N-1]`: N pytrees
        with the models' structure, each leaf shaped as `.tensor_input_shape(name, shape)` says
        for the model leaf's shape, like it unless the method says otherwise; a leaf may be
        None in all N where the method can do without it, e.g. regmean's `gram` of a tensor
        that is not a linear layer's weight).

    Returns:
      A pytree of the same structure whose leaves have the sources' dtypes and shardings (with
      `mesh`, those they were placed with).
    """
    pytrees = list(pytrees)
    if not pytrees:
        raise MergeError("merge needs at least one model")
    spec = methods.get(method)
    tensor_inputs = {name: params.pop(name) for name in spec.tensor_inputs if name in params}
    if mesh is not None:
        pytrees, base, tensor_inputs = place_on_mesh((pytrees, base, tensor_inputs), mesh)
    if spec.tensor_inputs_required and len(tensor_inputs) < len(spec.tensor_inputs):
        missing = [name for name in spec.tensor_inputs if name not in tensor_inputs]
        raise MergeError(f"method {method!r} needs {missing[0]}=[one pytree per model]")
    resolved = spec.resolve(params, len(pytrees), base is not None)
    if spec.random and key is None:
        raise MergeError(f"method {method!r} is random: pass key=jax.random.key(seed)")
    weight_array = spec.checked_weights(weights, len(pytrees), resolved)
    names, sources_per_leaf, treedef = flatten_models(pytrees)
    base_leaves = flatten_base(base, names, treedef)
    extra_leaves = {
        input_name: flatten_tensor_input(input_name, trees, len(pytrees), names, treedef)
        for input_name, trees in tensor_inputs.items()
    }
    labels = input_labels(len(pytrees), base is not None, tuple(extra_leaves))
    fn = leaf_function(method, resolved)
    merged = []
    for index, (name, sources) in enumerate(zip(names, sources_per_leaf, strict=True)):
        base_leaf = None if base_leaves is None else base_leaves[index]
        extras = leaf_tensor_inputs(name, extra_leaves, index, spec)
        check_leaf(name, sources, base_leaf, extras, spec)
        if not jnp.issubdtype(sources[0].dtype, jnp.floating):
            merged.append(_merge_non_float(name, sources))
            continue
        leaf_rng = None if key is None else leaf_key(key, name)
        result, finite, result_finite = fn(
            tuple(sources), weight_array, base_leaf, leaf_rng, extras or None
        )
        _raise_if_not_finite(name, finite, labels)
        _raise_if_result_not_finite(name, result_finite, method, resolved, weight_array)
        merged.append(_keep_sharding(result, sources[0]))
    return jax.tree_util.tree_unflatten(treedef, merged)


def input_labels(n_models: int, has_base: bool, tensor_inputs: Sequence[str]) -> list[str]:
    """What each all-finite flag of the leaf function refers to, in order."""
    labels = [f"model {i}" for i in range(n_models)]
    labels += ["the base model"] if has_base else []
    return labels + [f"{name} of model {i}" for name in tensor_inputs for i in range(n_models)]


def leaf_key(key: jax.Array, name: str) -> jax.Array:
    """The random key of one leaf: `key` folded with a stable hash of the leaf's name."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


@functools.cache
def traced_leaf(
    method: str, static_params: tuple[tuple[str, Any], ...], out_dtype: np.dtype | None
) -> Callable:
    """The leaf merge of `leaf_function` for the method's static parameters (cached), the traced
    ones an argument: (sources, weights, base, key, tensors, traced) -> the same triple. Not
    jitted: its callers compile it with the method's `blocked.compiler_options`, or trace it
    into a user's program.

    `traced` maps the names of the method's traced parameters (`Param.traced`) to their values
    as scalars (`traced_arguments`), so tensors that differ only in those values share a
    compilation.
    """
    spec = methods.get(method)
    leaf = with_auto_axes(functools.partial(spec.leaf, **dict(static_params)))

    def merge_one(sources, weights, base, key, tensors=None, traced=None):
        tensors = tensors or {}
        stacked_tensors = {name: jnp.stack(arrays) for name, arrays in tensors.items()}
        merged = leaf(jnp.stack(sources), weights, base, key=key, **stacked_tensors, **traced)
        merged = merged.astype(sources[0].dtype if out_dtype is None else out_dtype)
        checked = (*sources, *([base] if base is not None else []))
        checked += tuple(array for arrays in tensors.values() for array in arrays)
        finite = all_finite((*checked, merged))
        return merged, finite[:-1], finite[-1]

    return merge_one


@functools.cache
def _compiled_leaf(
    method: str, static_params: tuple[tuple[str, Any], ...], out_dtype: np.dtype | None
) -> Callable:
    """`traced_leaf` jitted with the method's compiler options (`COMPILER_OPTIONS`, or
    `blocked.compiler_options`), cached, for calls on concrete arrays."""
    options = blocked.compiler_options(method, static_params)
    return jax.jit(traced_leaf(method, static_params, out_dtype), compiler_options=options)


def split_params(
    method: str, params: Mapping[str, Any]
) -> tuple[tuple[tuple[str, Any], ...], dict[str, Any]]:
    """Resolved parameters as (the static ones, sorted (name, value) pairs that key a
    compilation; the traced ones, {name: value or tuple of N values}, as `traced_arguments`
    passes them to `traced_leaf`)."""
    spec = methods.get(method)
    static = {name: value for name, value in params.items() if not spec.param(name).traced}
    traced = {name: value for name, value in params.items() if spec.param(name).traced}
    return tuple(sorted(static.items())), traced


def traced_arguments(traced: Mapping[str, Any]) -> dict[str, Any]:
    """The traced parameters of `split_params` as scalars in the compute dtype (a tuple of N
    scalars where a parameter is given per model), the `traced` argument of `traced_leaf`."""
    return jax.tree.map(lambda value: jnp.asarray(value, compute_dtype()), dict(traced))


def leaf_function(
    method: str, params: Mapping[str, Any], out_dtype: np.dtype | None = None
) -> Callable:
    """The leaf merge for a method and resolved parameters: on arrays, compiled (with the
    method's `blocked.compiler_options`, once per shape and dtype); on tracers, traced into the
    caller's program.

    It maps (sources: tuple of N arrays, weights [N], base | None, key | None, tensor inputs:
    {name: tuple of N arrays} | None) to (merged array, all-finite flags of the sources, then
    the base, then each tensor input's N arrays (`input_labels` names them), whether the merged
    array is all finite). The leaf computes in float32 (float64 under x64); its result is
    rounded once, to `out_dtype` (None: the sources' dtype), and checked after that rounding,
    so a value that overflows the output dtype counts as not finite. One compilation serves
    every value of the method's traced parameters (`traced_leaf`). A method that merges in
    passes (`jkarcher.blocked`) runs them as the checkpoint pipeline does, on arrays.
    """
    dtype = None if out_dtype is None else np.dtype(out_dtype)
    static, traced = split_params(method, params)
    traced = traced_arguments(traced)
    inline, compiled = traced_leaf(method, static, dtype), _compiled_leaf(method, static, dtype)
    form = blocked.passes_of(method, static)
    in_passes = form is not None and not form.own_leaf_when_whole
    passes = blocked.eager_leaf(method, static, dtype) if in_passes else None

    def run(sources, weights, base, key, tensors=None):
        arguments = jax.tree.leaves((sources, weights, base, key, tensors, traced))
        if any(isinstance(argument, jax.core.Tracer) for argument in arguments):
            return inline(sources, weights, base, key, tensors, traced)
        chosen = passes if passes is not None and not tensors else compiled
        return chosen(sources, weights, base, key, tensors, traced)

    return run


def _merge_non_float(name: str, sources: tuple) -> Any:
    """Integer and boolean leaves (counters, masks) are copied when every model agrees."""
    if any(isinstance(s, jax.core.Tracer) for s in sources):
        return sources[0]
    index = first_disagreeing(sources)
    if index is not None:
        raise MergeError(
            f"leaf {name!r} is not floating point ({jnp.result_type(sources[0])}) and "
            f"model {index} differs from model 0, so it cannot be merged"
        )
    return sources[0]


def _raise_if_not_finite(name: str, finite: jax.Array, labels: Sequence[str]) -> None:
    """MergeError naming the first input that holds NaN or Inf; traced, a `debug_check`."""
    if isinstance(finite, jax.core.Tracer):
        for flag, label in zip(finite, labels, strict=True):
            checkify.debug_check(flag, _literal(f"leaf {name!r}: {label} holds NaN or Inf values"))
        return
    bad = np.flatnonzero(~np.asarray(finite))
    if bad.size:
        raise MergeError(f"leaf {name!r}: {labels[int(bad[0])]} holds NaN or Inf values")


def _raise_if_result_not_finite(
    name: str, finite: jax.Array, method: str, params: Mapping[str, Any], weights: jax.Array
) -> None:
    """MergeError when the merged leaf holds NaN or Inf; traced, a `debug_check`."""
    message = (
        f"leaf {name!r}: {describe_merge(method, params, weights)} gives NaN or Inf values "
        "(from finite sources)"
    )
    if isinstance(finite, jax.core.Tracer):
        checkify.debug_check(finite, _literal(message))
    elif not bool(finite):
        raise MergeError(message)


def _literal(message: str) -> str:
    """`message` as a checkify format string that prints as it is."""
    return message.replace("{", "{{").replace("}", "}}")


def describe_merge(method: str, params: Mapping[str, Any], weights: Any) -> str:
    """'method ties (density=0.5, lambda=1.0; weights 1, 0.5)': what a merge was asked to do."""
    settings = ", ".join(f"{key}={value!r}" for key, value in sorted(params.items()))
    if weights is not None and not isinstance(weights, jax.core.Tracer):
        shown = ", ".join(f"{w:g}" for w in np.asarray(weights, np.float64).reshape(-1))
        settings = f"{settings}; weights {shown}" if settings else f"weights {shown}"
    return f"method {method}" + (f" ({settings})" if settings else "")


def _keep_sharding(result: Any, source: Any) -> Any:
    """Place the result like the first source when XLA chose another sharding."""
    if isinstance(result, jax.core.Tracer) or not isinstance(source, jax.Array):
        return result
    if isinstance(source, jax.core.Tracer) or result.sharding == source.sharding:
        return result
    return jax.device_put(result, source.sharding)
