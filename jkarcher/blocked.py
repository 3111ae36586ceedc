"""The leaf functions of a tensor merged in blocks of rows (docs/design.md, "Memory").

A tensor whose sources do not fit the memory budget is merged in blocks of rows, as its method
declares (`MergeMethod.blocked`). Where rows merge independently (ROWS), each block runs the
method's own leaf (`jkarcher.merge.traced_leaf`), stage MERGE. A method whose merge needs
whole-tensor statistics (`TwoPasses`) runs two passes: STATISTICS, each block's partial sums;
`finish`, the coefficients from every block's sums; APPLY, each block's rows from those
coefficients. Every stage's leaf has one signature,

    (sources, weights, base, key, tensors, traced, coefficients) -> (result, finite, finite)

as `jkarcher.merge.traced_leaf`'s with the coefficients added (None but at APPLY): the result
(a block's rows in the output dtype, or its partial sums in the compute dtype), the all-finite
flags of the inputs, and whether the result is finite.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jkarcher import methods
from jkarcher.merge import traced_leaf
from jkarcher.numerics import COMPILER_OPTIONS, all_finite

MERGE, STATISTICS, APPLY = "merge", "statistics", "apply"


@functools.cache
def stage_leaf(
    method: str, static_params: tuple[tuple[str, Any], ...], out_dtype: np.dtype, stage: str
) -> Callable:
    """The leaf of `stage` for a method and its static parameters (cached); not jitted."""
    if stage == MERGE:
        leaf = traced_leaf(method, static_params, out_dtype)
        return lambda sources, weights, base, key, tensors, traced, coefficients: leaf(
            sources, weights, base, key, tensors, traced
        )
    passes = methods.get(method).blocked(dict(static_params))
    params = dict(static_params)

    def statistics(sources, weights, base, key, tensors, traced, coefficients):
        del key, tensors, coefficients
        sums = passes.statistics(jnp.stack(sources), weights, base, **params, **traced)
        finite = all_finite((*sources, *([base] if base is not None else [])))
        return sums, finite, jnp.bool_(True)

    def apply(sources, weights, base, key, tensors, traced, coefficients):
        del key, tensors
        merged = passes.apply(jnp.stack(sources), weights, base, coefficients, **params, **traced)
        merged = merged.astype(out_dtype)
        finite = all_finite((*sources, *([base] if base is not None else []), merged))
        return merged, finite[:-1], finite[-1]

    return statistics if stage == STATISTICS else apply


@functools.cache
def finish(method: str, static_params: tuple[tuple[str, Any], ...]) -> Callable:
    """(the blocks' partial sums in row order, weights, traced parameters) -> the coefficients
    of the second pass: the sums concatenated along their last axis, then the method's
    `TwoPasses.finish` (cached, jitted)."""
    passes = methods.get(method).blocked(dict(static_params))
    params = dict(static_params)

    def run(partials: Sequence[jax.Array], weights: jax.Array, traced: dict) -> jax.Array:
        return passes.finish(jnp.concatenate(partials, axis=-1), weights, **params, **traced)

    return jax.jit(run, compiler_options=COMPILER_OPTIONS)
