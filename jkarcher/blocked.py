"""The two passes of a merge that needs whole-tensor statistics (docs/design.md, "Memory").

A method whose merge of a tensor needs statistics of the whole tensor (norms, inner products)
declares them as a `TwoPasses` (`MergeMethod.blocked`): STATISTICS, a block of rows' partial
sums; `finish`, the coefficients from every block's sums in row order; APPLY, a block's rows from
those coefficients. The pipeline runs a tensor that does not fit its memory budget pass by pass
over blocks of rows, and one that fits as BOTH, the two passes on the one read of the whole
tensor; `jkarcher.merge` runs the same three programs (`eager_leaf`). Each is compiled alone
with `COMPILER_OPTIONS`, so a tensor gives the same bytes in any number of blocks: the blocks'
sums are those of the whole tensor, and the fixed point, compiled once, sees the same numbers.
(Traced into a caller's program, the method's own leaf runs the three steps in one program
instead, where the compiler may round the float32 fixed point differently.)

Each stage's leaf has the signature of `jkarcher.merge.traced_leaf`'s, the coefficients added
(None at STATISTICS):

    (sources, weights, base, key, tensors, traced, coefficients) -> (result, finite, finite)

the result (a block's rows in the output dtype, or its partial sums in the compute dtype), the
all-finite flags of the sources and base, and whether the result is finite.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jkarcher import methods
from jkarcher.methods.registry import TwoPasses
from jkarcher.numerics import COMPILER_OPTIONS, all_finite
from jkarcher.sharding import with_auto_axes

# A task's stages: its rows merged by the method's leaf; a block's partial sums (the first pass);
# a block's rows from the coefficients of every block's sums (the second); both passes on one
# read of a whole tensor.
MERGE, STATISTICS, APPLY, BOTH = "merge", "statistics", "apply", "both"


def two_passes(method: str, params: Mapping[str, Any]) -> TwoPasses | None:
    """The method's `TwoPasses` for these (resolved or static) parameters, or None."""
    form = methods.get(method).blocked(dict(params))
    return form if isinstance(form, TwoPasses) else None


@functools.cache
def stage_leaf(
    method: str, static_params: tuple[tuple[str, Any], ...], out_dtype: np.dtype | None, stage: str
) -> Callable:
    """The leaf of STATISTICS or APPLY for a method and its static parameters (cached); not
    jitted. `out_dtype` None: the sources' dtype."""
    passes = two_passes(method, static_params)
    params = dict(static_params)
    gather, combine = (
        with_auto_axes(functools.partial(step, **params))
        for step in (passes.statistics, passes.apply)
    )

    def statistics(sources, weights, base, key, tensors, traced, coefficients):
        del tensors, coefficients
        sums = gather(jnp.stack(sources), weights, base, key=key, **traced)
        finite = all_finite((*sources, *([base] if base is not None else [])))
        return sums, finite, jnp.bool_(True)

    def apply(sources, weights, base, key, tensors, traced, coefficients):
        del tensors
        merged = combine(jnp.stack(sources), weights, base, coefficients, key=key, **traced)
        merged = merged.astype(sources[0].dtype if out_dtype is None else out_dtype)
        finite = all_finite((*sources, *([base] if base is not None else []), merged))
        return merged, finite[:-1], finite[-1]

    return statistics if stage == STATISTICS else apply


def finish(method: str, static_params: tuple[tuple[str, Any], ...]) -> Callable:
    """(the blocks' partial sums in row order, weights, traced parameters) -> the coefficients
    of the second pass: the sums concatenated along their last axis, then `finish_program`, one
    program for the whole tensor's sums however many blocks gave them (a concatenation inside it
    would change how XLA sums them)."""
    program = finish_program(method, static_params)

    def run(partials: Sequence[jax.Array], weights: jax.Array, traced: dict) -> jax.Array:
        return program(whole_sums(partials), weights, traced)

    return run


def whole_sums(partials: Sequence[jax.Array]) -> jax.Array:
    """The blocks' partial sums in row order concatenated along their last axis: the whole
    tensor's."""
    return partials[0] if len(partials) == 1 else jnp.concatenate(partials, axis=-1)


@functools.cache
def finish_program(method: str, static_params: tuple[tuple[str, Any], ...]) -> Callable:
    """The method's `TwoPasses.finish` of the whole tensor's sums, (sums, weights, traced
    parameters) -> coefficients, jitted with `COMPILER_OPTIONS` (cached)."""
    passes = two_passes(method, static_params)
    params = dict(static_params)

    def run(sums: jax.Array, weights: jax.Array, traced: dict) -> jax.Array:
        return passes.finish(sums, weights, **params, **traced)

    return jax.jit(run, compiler_options=COMPILER_OPTIONS)


@functools.cache
def eager_leaf(
    method: str, static_params: tuple[tuple[str, Any], ...], out_dtype: np.dtype | None
) -> Callable:
    """Both passes on whole tensors, as three compiled programs, with the signature of
    `jkarcher.merge.traced_leaf`'s leaf: (sources, weights, base, key, tensors, traced) ->
    (merged, finite, merged finite). For a method with `two_passes`, called on arrays."""
    gather, apply = (
        jax.jit(
            stage_leaf(method, static_params, out_dtype, stage), compiler_options=COMPILER_OPTIONS
        )
        for stage in (STATISTICS, APPLY)
    )
    solve = finish(method, static_params)

    def run(sources, weights, base, key, tensors=None, traced=None):
        traced = traced or {}
        sums, finite, _ = gather(sources, weights, base, key, None, traced, None)
        coefficients = solve([sums], weights, traced)
        merged, _, merged_finite = apply(sources, weights, base, key, None, traced, coefficients)
        return merged, finite, merged_finite

    return run
