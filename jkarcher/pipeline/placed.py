"""The leaf of a merge placed on a mesh (docs/design.md, "Data flow"): `placed_leaf` runs
`jkarcher.merge`'s leaf, or a stage of a merge in passes (`jkarcher.blocked`), on sources split
by rows over the devices as the pipeline reads them, and compiles with the method's compiler
options (`jkarcher.blocked.compiler_options`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jkarcher import blocked
from jkarcher.config import FISHER_INPUT
from jkarcher.merge import traced_leaf
from jkarcher.sharding import padded_shape, replicated, row_sharding


def _without_passes(leaf, sources, weights, base, key, tensors, traced, found, first_row):
    """The method's own leaf (`traced_leaf`) at stage MERGE, which takes nothing from
    passes."""
    del found, first_row
    return leaf(sources, weights, base, key, tensors, traced)


@functools.cache
def placed_leaf(
    method: str,
    static_params: tuple,
    shape: tuple[int, ...],
    out_dtype: np.dtype,
    mesh: Mesh,
    statistic: str | None = None,
    stage: str = blocked.MERGE,
    pass_round: int = 0,
) -> Callable:
    """`jkarcher.merge.traced_leaf(method, static_params)` for sources of `shape` split by rows
    over `mesh`, as `jkarcher.pipeline.read.read_task` places them (cached): (sources, weights,
    base, key, statistics, traced parameters) -> (merged, all-finite flags, merged all finite).
    `statistics` are the models' tensor input named `statistic` ("fisher", split by rows like
    the sources; "gram", whole), or () when the tensor has none.

    The padding rows are cut off before the leaf sees the sources (and the Fishers) and put
    back as zeros after it, so the leaf merges exactly the tensor (its whole-tensor statistics
    and random draws are those of one device);
    the result is cast to `out_dtype` and split like the sources, and the all-finite flags are
    on every device. It compiles with the method's `blocked.compiler_options`, as
    `jkarcher.merge` does. At `stage`
    (`jkarcher.blocked`), the leaf is that stage's (of round `pass_round`): it takes what the
    rounds before it found and the block's first row as last arguments (unused at MERGE), and
    the STATISTICS stage returns partials, replicated.
    """
    if stage == blocked.MERGE:
        leaf = traced_leaf(method, static_params, np.dtype(out_dtype))
        leaf = functools.partial(_without_passes, leaf)
    else:
        leaf = blocked.stage_leaf(method, static_params, np.dtype(out_dtype), stage, pass_round)
    padding = padded_shape(shape, mesh)[0] - shape[0] if shape else 0

    def cut(x: jax.Array) -> jax.Array:
        return x[: shape[0]] if padding else x

    def run(sources, weights, base, key, statistics, traced, found=None, first_row=0):
        base = None if base is None else cut(base)
        if statistic == FISHER_INPUT:
            statistics = tuple(map(cut, statistics))
        tensors = {statistic: tuple(statistics)} if statistics else None
        sources = tuple(map(cut, sources))
        merged, finite, merged_finite = leaf(
            sources, weights, base, key, tensors, traced, found, first_row
        )
        if padding and stage != blocked.STATISTICS:
            merged = jnp.pad(merged, [(0, padding)] + [(0, 0)] * (len(shape) - 1))
        return merged, finite, merged_finite

    flags = replicated(mesh)
    result = flags if stage == blocked.STATISTICS else row_sharding(mesh, len(shape))
    shardings = (result, flags, flags)
    options = blocked.compiler_options(method, static_params)
    return jax.jit(run, out_shardings=shardings, compiler_options=options)
