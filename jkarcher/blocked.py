"""The passes of a merge that needs whole-tensor statistics (docs/design.md, "Memory").

A method whose merge of a tensor needs statistics of the whole tensor (norms, inner products,
order statistics) declares them as `Passes` (`MergeMethod.blocked`): rounds of STATISTICS, each
a block of rows' partials from what the round before found, and its `finish` of every block's
partials; then APPLY, a block's rows from the last round's. The pipeline runs a tensor that does
not fit its memory budget pass by pass over blocks of rows, and one that fits as BOTH, every
pass on the one read of the whole tensor (or, `Passes.own_leaf_when_whole`, the method's own
leaf); `jkarcher.merge` runs the same programs (`eager_leaf`). Each is compiled alone with the
method's `compiler_options`, so a tensor gives the same bytes in any number of blocks: the blocks'
partials are those of the whole tensor, and each `finish`, compiled once, sees the same numbers.
(Traced into a caller's program, the method's own leaf runs every step in one program instead,
where the compiler may round float32 sums differently.)

Each stage's leaf has the signature of `jkarcher.merge.traced_leaf`'s, with what the round
before found (None in the first round) and the block's first row added:

    (sources, weights, base, key, tensors, traced, found, first_row) -> (result, finite, finite)

the result (a block's rows in the output dtype, or its partials), the all-finite flags of the
sources and base, and whether the result is finite.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jkarcher import methods
from jkarcher.methods.registry import Passes
from jkarcher.numerics import COMPILER_OPTIONS, IEEE_COMPILER_OPTIONS, all_finite
from jkarcher.sharding import with_auto_axes

# A task's stages: its rows merged by the method's leaf; a block's partials (a round of
# statistics); a block's rows from what the rounds found; every pass on one read of a whole
# tensor.
MERGE, STATISTICS, APPLY, BOTH = "merge", "statistics", "apply", "both"


def passes_of(method: str, params: Mapping[str, Any]) -> Passes | None:
    """The method's `Passes` for these (resolved or static) parameters, or None."""
    form = methods.get(method).blocked(dict(params))
    return form if isinstance(form, Passes) else None


def compiler_options(method: str, static_params: tuple[tuple[str, Any], ...]) -> dict:
    """The compiler options of every program of the method (its own leaf, its rounds, their
    `finish` and APPLY): `COMPILER_OPTIONS`, or `IEEE_COMPILER_OPTIONS` for `Passes.ieee`."""
    form = passes_of(method, static_params)
    return IEEE_COMPILER_OPTIONS if form is not None and form.ieee else COMPILER_OPTIONS


@functools.cache
def stage_leaf(
    method: str,
    static_params: tuple[tuple[str, Any], ...],
    out_dtype: np.dtype | None,
    stage: str,
    round_index: int = 0,
) -> Callable:
    """The leaf of STATISTICS (of round `round_index`) or APPLY for a method and its static
    parameters (cached); not jitted. `out_dtype` None: the sources' dtype."""
    passes = passes_of(method, static_params)
    params = dict(static_params)
    gather = with_auto_axes(functools.partial(passes.rounds[round_index].statistics, **params))
    combine = with_auto_axes(functools.partial(passes.apply, **params))

    def statistics(sources, weights, base, key, tensors, traced, found, first_row):
        del tensors
        partials = gather(
            jnp.stack(sources), weights, base, found, key=key, first_row=first_row, **traced
        )
        finite = all_finite((*sources, *([base] if base is not None else [])))
        return partials, finite, jnp.bool_(True)

    def apply(sources, weights, base, key, tensors, traced, found, first_row):
        del tensors
        merged = combine(
            jnp.stack(sources), weights, base, found, key=key, first_row=first_row, **traced
        )
        merged = merged.astype(sources[0].dtype if out_dtype is None else out_dtype)
        finite = all_finite((*sources, *([base] if base is not None else []), merged))
        return merged, finite[:-1], finite[-1]

    return statistics if stage == STATISTICS else apply


def whole_sums(partials: Sequence[jax.Array]) -> jax.Array:
    """The blocks' partials of a round in row order concatenated along their last axis: the
    whole tensor's (a round whose partials add keeps one running sum)."""
    return partials[0] if len(partials) == 1 else jnp.concatenate(partials, axis=-1)


@functools.cache
def finish_program(
    method: str,
    static_params: tuple[tuple[str, Any], ...],
    round_index: int,
    shape: tuple[int, ...],
) -> Callable:
    """The `finish` of round `round_index` of a whole tensor of `shape`, (its sums, weights,
    what the round before found, traced parameters) -> what this round finds, jitted with the
    method's `compiler_options` (cached): one program for the whole tensor's sums however many
    blocks gave them (a concatenation inside it would change how XLA sums them)."""
    step = passes_of(method, static_params).rounds[round_index]
    params = dict(static_params)

    def run(sums, weights: jax.Array, found, traced: dict):
        return step.finish(sums, weights, found, shape=shape, **params, **traced)

    return jax.jit(run, compiler_options=compiler_options(method, static_params))


@functools.cache
def eager_leaf(
    method: str, static_params: tuple[tuple[str, Any], ...], out_dtype: np.dtype | None
) -> Callable:
    """Every pass on whole tensors, as compiled programs, with the signature of
    `jkarcher.merge.traced_leaf`'s leaf: (sources, weights, base, key, tensors, traced) ->
    (merged, finite, merged finite). For a method with `passes_of`, called on arrays."""
    rounds = passes_of(method, static_params).rounds
    options = compiler_options(method, static_params)
    gathers = [
        jax.jit(
            stage_leaf(method, static_params, out_dtype, STATISTICS, index),
            compiler_options=options,
        )
        for index in range(len(rounds))
    ]
    apply = jax.jit(stage_leaf(method, static_params, out_dtype, APPLY), compiler_options=options)

    def run(sources, weights, base, key, tensors=None, traced=None):
        traced = traced or {}
        shape = tuple(sources[0].shape)
        found, finite = None, None
        for index, gather in enumerate(gathers):
            sums, flags, _ = gather(sources, weights, base, key, None, traced, found, 0)
            finite = flags if finite is None else finite
            found = finish_program(method, static_params, index, shape)(
                sums, weights, found, traced
            )
        merged, _, merged_finite = apply(sources, weights, base, key, None, traced, found, 0)
        return merged, finite, merged_finite

    return run
