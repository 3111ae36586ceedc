"""The Karcher mean merge (Wang, Ye, Yin 2026), with an optional base model (task-vector mode)."""

from __future__ import annotations

import jax

from jkarcher.karcher import (
    BLOCKS,
    DEFAULT_EPS,
    DEFAULT_MAX_ITER,
    DEFAULT_TOL,
    coefficients_from_gram,
    karcher_mean,
)
from jkarcher.methods.gram_passes import GRAM_SCRATCH, gram_passes
from jkarcher.methods.registry import (
    BASE_OPTIONAL,
    ROWS,
    MergeMethod,
    Param,
    Passes,
    non_negative,
    one_of,
    positive,
    positive_int,
    register,
)
from jkarcher.numerics import compute_dtype


def karcher(
    stacked, weights, base=None, *, key=None, fisher: jax.Array | None = None, **options
) -> jax.Array:
    """Weighted Karcher mean of the sources on the sphere, rescaled to their weighted mean norm.

    `options` are `jkarcher.karcher_mean`'s max_iter, tol, step, block and eps. With a base
    model the mean is taken of the task vectors x_i - base and the base is added back. With
    `fisher` (the sources' diagonal Fisher estimates, stacked like them) the tangent average is
    Fisher-preconditioned (`jkarcher.karcher_fisher`). Computed and returned in float32 (float64
    under x64).

    A whole tensor (block="tensor") without a Fisher runs as the two passes of a merge in
    blocks of rows (`TWO_PASSES`), in one program: the Gram sums of the sources (of the task
    vectors, formed as they are read, never held), the fixed point on coefficients, the
    combination.
    """
    del key
    if fisher is None and options["block"] == "tensor":
        return TWO_PASSES.in_one_program(stacked, weights, base, **options)
    dtype = compute_dtype()
    options.update(fisher=fisher, out_dtype=dtype)
    if base is None:
        return karcher_mean(stacked, weights, **options)
    deltas = stacked.astype(dtype) - base.astype(dtype)[None]
    return base.astype(dtype) + karcher_mean(deltas, weights, **options)


def _coefficients(gram, weights, *, block, **options) -> jax.Array:
    del block
    return coefficients_from_gram(gram, weights, **options)


# A tensor too large for the memory budget: its Gram matrix summed over blocks of rows, the
# fixed point on coefficients, then each block's rows combined (the same sums as one pass).
TWO_PASSES = gram_passes(_coefficients)


def _scratch(params, fisher: bool, shape) -> tuple[float, float]:
    """The leaf's float32 scratch: the Fisher-preconditioned iteration holds its sources, their
    Fishers and its iterate in float32; rows (each its own mean) hold the task vectors; a whole
    tensor in two passes about one copy."""
    del shape
    if fisher:
        return 3.25, 2.5
    return (1.1, 0.5) if params["block"] == "row" else GRAM_SCRATCH


def _blocked(params) -> Passes | str:
    """Rows merged one by one (block="row") merge block by block; a whole tensor in two passes."""
    return ROWS if params["block"] == "row" else TWO_PASSES


register(
    MergeMethod(
        name="karcher",
        leaf=karcher,
        params=(
            Param("max_iter", DEFAULT_MAX_ITER, "most fixed-point updates", check=positive_int),
            Param("tol", DEFAULT_TOL, "stop when the tangent norm is below this", check=positive),
            Param("step", 1.0, "fixed-point step size", check=positive),
            Param("block", "tensor", "merge each tensor whole or each row", check=one_of(*BLOCKS)),
            Param("eps", DEFAULT_EPS, "norm under which a source is ignored", check=non_negative),
        ),
        base=BASE_OPTIONAL,
        tensor_inputs=("fisher",),
        blocked=_blocked,
        scratch=_scratch,
        summary="weighted Karcher mean on the unit sphere, rescaled to the mean norm",
        unsigned_because=(
            "the Karcher mean is a weighted mean of points on the sphere, which a negative weight "
            "leaves undefined (task_arithmetic subtracts a task vector with a negative weight)"
        ),
        citation=(
            "Wang, Ye, Yin 2026, Functionality-Oriented LLM Merging on the Fisher-Rao Manifold"
        ),
    )
)
