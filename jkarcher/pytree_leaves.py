"""The N pytrees of a merge as leaves: flattened by path, checked to have one structure, and
each leaf's sources, base and tensor inputs checked against each other (`jkarcher.merge`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jkarcher import methods
from jkarcher.errors import MergeError


def path_name(path: tuple) -> str:
    """A leaf's key path as text: dict keys, indices and attributes joined by '/'."""
    parts = []
    for entry in path:
        for attribute in ("key", "idx", "name"):
            if hasattr(entry, attribute):
                parts.append(str(getattr(entry, attribute)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def flatten_models(pytrees: list) -> tuple[list[str], list[tuple], Any]:
    """Leaf names, the N sources of each leaf, and the tree structure; structures must agree."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(pytrees[0])
    names = [path_name(path) for path, _ in flat]
    per_model = [
        _leaves_like(tree, names, treedef, f"model {index}", "model 0")
        for index, tree in enumerate(pytrees)
    ]
    return names, list(zip(*per_model, strict=True)), treedef


def flatten_base(base: Any, names: list[str], treedef) -> list | None:
    if base is None:
        return None
    return _leaves_like(base, names, treedef, "the base model", "model 0")


def flatten_tensor_input(
    input_name: str, trees: Sequence[Any], n_models: int, names: list[str], treedef
) -> list[tuple]:
    """A tensor input's N pytrees, as one tuple of N arrays per leaf; structures must agree."""
    trees = list(trees)
    if len(trees) != n_models:
        raise MergeError(f"{input_name} has {len(trees)} pytrees for {n_models} models")
    per_model = [
        _leaves_like(
            tree, names, treedef, f"{input_name} of model {index}", "the models", none_leaves=True
        )
        for index, tree in enumerate(trees)
    ]
    return list(zip(*per_model, strict=True))


def leaf_tensor_inputs(
    name: str, extra_leaves: Mapping[str, list], index: int, spec: methods.MergeMethod
) -> dict:
    """The tensor inputs of leaf `index`: {input name: its N arrays}, leaving out the inputs that
    are None for all N models where the method can do without them; else None is an error."""
    can_do_without = spec.inputs_per_leaf_optional or not spec.tensor_inputs_required
    extras = {}
    for input_name, leaves in extra_leaves.items():
        arrays = leaves[index]
        missing = [i for i, array in enumerate(arrays) if array is None]
        if missing and not can_do_without:
            raise MergeError(
                f"leaf {name!r}: {input_name} of model {missing[0]} is None, and method "
                f"{spec.name!r} needs it for every leaf"
            )
        if missing and len(missing) < len(arrays):
            given = next(i for i, array in enumerate(arrays) if array is not None)
            raise MergeError(
                f"leaf {name!r}: {input_name} of model {missing[0]} is None, and that of model "
                f"{given} is not (give it for all models or for none)"
            )
        if not missing:
            extras[input_name] = arrays
    return extras


def _leaves_like(
    tree: Any, names: list[str], treedef, what: str, reference: str, none_leaves: bool = False
) -> list:
    """The leaves of `tree`, which must have the structure `treedef` with leaves `names`;
    with `none_leaves`, None counts as a leaf (an input a leaf does without) and is kept."""
    is_leaf = (lambda leaf: leaf is None) if none_leaves else None
    flat, tree_def = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    tree_names = [path_name(path) for path, _ in flat]
    if tree_def != treedef or tree_names != names:
        raise MergeError(
            f"{what} has a different structure from {reference}: "
            + _structure_difference(names, tree_names)
        )
    return [
        None if leaf is None else _as_array(leaf, name, what)
        for (_, leaf), name in zip(flat, names, strict=True)
    ]


def _as_array(leaf: Any, name: str, what: str) -> Any:
    """An array leaf as it is; a Python or NumPy number as a 0-d array (JAX's default dtypes)."""
    if isinstance(leaf, jax.Array | np.ndarray | jax.core.Tracer):
        return leaf
    if isinstance(leaf, bool | int | float | np.generic):
        return jnp.asarray(leaf)
    raise MergeError(
        f"leaf {name!r} of {what} is a {type(leaf).__name__}, not an array or a number"
    )


def _structure_difference(names: list[str], other: list[str]) -> str:
    missing = [n for n in names if n not in set(other)]
    extra = [n for n in other if n not in set(names)]
    if missing:
        return f"it lacks leaf {missing[0]!r}"
    if extra:
        return f"it has an extra leaf {extra[0]!r}"
    return "its containers differ (leaf order or node types)"


def check_leaf(
    name: str, sources: tuple, base: Any, extras: Mapping[str, tuple], spec: methods.MergeMethod
) -> None:
    shape, dtype = np.shape(sources[0]), jnp.result_type(sources[0])
    for index, source in enumerate(sources[1:], start=1):
        if np.shape(source) != shape:
            raise MergeError(
                f"leaf {name!r}: model {index} has shape {np.shape(source)}, model 0 has {shape}"
            )
        if jnp.result_type(source) != dtype:
            raise MergeError(
                f"leaf {name!r}: model {index} has dtype {jnp.result_type(source)}, "
                f"model 0 has {dtype}"
            )
    if base is not None and np.shape(base) != shape:
        raise MergeError(f"leaf {name!r}: the base has shape {np.shape(base)}, models {shape}")
    for input_name, arrays in extras.items():
        expected = spec.tensor_input_shape(input_name, shape)
        if expected is None:
            raise MergeError(
                f"leaf {name!r} of shape {shape} takes no {input_name} for method "
                f"{spec.name!r}: give None there"
            )
        for index, array in enumerate(arrays):
            if np.shape(array) != expected:
                raise MergeError(
                    f"leaf {name!r}: {input_name} of model {index} has shape {np.shape(array)}, "
                    f"it must be {expected} for the models' {shape}"
                )
