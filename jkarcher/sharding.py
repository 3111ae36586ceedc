"""Where tensors live on a device mesh: meshes from config, shardings, and each process's part.

A merge splits every tensor along its first axis (its rows) over all the devices of the mesh, and
never along the models' (experts') axis: each device holds the same rows of every model, so a
leaf function runs there as it would on one device, and XLA inserts the collectives that
whole-tensor statistics need (Karcher's Gram sums, TIES thresholds, Model Stock cosines). Rows
that do not divide by the number of devices are padded with zero rows up to the next multiple;
the pipeline slices the padding off before the leaf function sees the tensor.

Each process reads only the rows that its own devices hold (`jkarcher.pipeline`), and
`local_rows` gives the blocks of a result that a process writes, so that across all processes
every row is written exactly once. `with_auto_axes` lets a leaf function, which reshapes and
reduces freely, run on leaves of a mesh with Explicit axes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jkarcher.errors import JkarcherError

DEFAULT_AXIS = "devices"


class MeshError(JkarcherError):
    """A mesh's axes do not fit the devices there are."""


def make_mesh(axes: Sequence[tuple[str, int]] | None) -> Mesh:
    """A mesh from (axis name, size) pairs over the first devices; None: all on one axis.

    One size may be -1: that axis takes the devices that the others leave. With several
    processes the mesh must span every device, so that each process holds part of every tensor.
    """
    devices = jax.devices()
    axes = tuple(axes or ((DEFAULT_AXIS, -1),))
    sizes = _axis_sizes(axes, len(devices))
    count = math.prod(sizes)
    if jax.process_count() > 1 and count != len(devices):
        raise MeshError(
            f"axes {dict(axes)} span {count} of the {len(devices)} devices; with "
            f"{jax.process_count()} processes the mesh must span them all"
        )
    grid = np.array(devices[:count], dtype=object).reshape(sizes)
    names = tuple(name for name, _ in axes)
    return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def _axis_sizes(axes: Sequence[tuple[str, int]], n_devices: int) -> tuple[int, ...]:
    """Each axis's size, a -1 resolved to the devices left; MeshError when they do not fit."""
    fixed = math.prod(size for _, size in axes if size != -1)
    if any(size == -1 for _, size in axes):
        if n_devices % fixed:
            raise MeshError(f"axes {dict(axes)}: {n_devices} devices do not divide by {fixed}")
        return tuple(n_devices // fixed if size == -1 else size for _, size in axes)
    if fixed > n_devices:
        raise MeshError(f"axes {dict(axes)} need {fixed} devices, there are {n_devices}")
    return tuple(size for _, size in axes)


def padded_shape(shape: tuple[int, ...], mesh: Mesh) -> tuple[int, ...]:
    """`shape` with its rows rounded up to a multiple of the mesh's device count."""
    if not shape:
        return shape
    return (-(-shape[0] // mesh.size) * mesh.size, *shape[1:])


def row_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows split over every device of the mesh (all its axes together); a scalar replicated."""
    if ndim == 0:
        return replicated(mesh)
    return NamedSharding(mesh, PartitionSpec(_every_axis(mesh), *(None,) * (ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def even_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """An array of exactly `shape` split over every device along its first axis that divides
    evenly by the device count; replicated when no axis does."""
    for axis, size in enumerate(shape):
        if size % mesh.size == 0:
            spec = [None] * len(shape)
            spec[axis] = _every_axis(mesh)
            return NamedSharding(mesh, PartitionSpec(*spec))
    return replicated(mesh)


def _every_axis(mesh: Mesh) -> str | tuple[str, ...]:
    """The partition entry that splits one array axis over all of the mesh's axes."""
    return mesh.axis_names[0] if len(mesh.axis_names) == 1 else mesh.axis_names


def place_on_mesh(tree: Any, mesh: Mesh) -> Any:
    """Each leaf of `tree` that is not yet spread over several devices, placed by
    `even_sharding`; leaves that are (and traced values) are kept as they are."""

    def place(leaf):
        if isinstance(leaf, jax.core.Tracer):
            return leaf
        if isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) > 1:
            return leaf
        return jax.device_put(leaf, even_sharding(mesh, np.shape(leaf)))

    return jax.tree.map(place, tree)


def local_rows(array: jax.Array, rows: int) -> list[tuple[int, np.ndarray]]:
    """The blocks of `array` that this process writes, as (first row, block): its devices'
    shards whose replica id is 0 (so that across all processes each row comes once), without
    the padding rows from `rows` on. A scalar comes whole, as row 0."""
    blocks = []
    for shard in array.addressable_shards:
        if shard.replica_id != 0:
            continue
        data = np.asarray(shard.data)
        if array.ndim == 0:
            blocks.append((0, data))
            continue
        first = shard.index[0].start or 0
        stop = min(first + data.shape[0], rows)
        if stop > first:
            blocks.append((first, data[: stop - first]))
    return blocks


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
        out_sharding = jax.tree.map(
            lambda out: slice_sharding if out.shape == stacked.shape[1:] else replicated(mesh),
            jax.eval_shape(run, *map(_unsharded_shape, (stacked, *args))),
        )
        return jax.sharding.auto_axes(run, out_sharding=out_sharding)(stacked, *args)

    return wrapped


def _unsharded_shape(x):
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), x)
