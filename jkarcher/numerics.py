"""Numerics shared by every merge: the compute dtype, the accurate sum, sums over models,
checked weights, all-finite flags, and the agreement of tensors that are copied, not merged.

Merges compute in float32 (float64 under JAX's x64 mode) whatever the storage dtype, and round
once, to the output dtype. Sums that set coefficients (norms, dot products, L1 norms) go through
one strategy, `accurate_sum`, so that their rounding error grows with the logarithm of their
length. Weights are checked before they reach a leaf; every input and result is checked finite in
the same pass that reads it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jkarcher.errors import MergeError

# The options of every program jkarcher compiles itself (`jkarcher.merge`'s leaves, the
# pipeline's, an eager `karcher_mean`). XLA:CPU keeps a float sum in the order it was written
# unless told that it may reassociate, so a reduction along a chunk runs one scalar add at a time;
# with reassociation (and fused multiply-adds) LLVM vectorizes it: the Karcher Gram pass of 8 bf16
# sources of 4864 x 896 drops from 33 to 4.2 ms (of 4 sources, from 4.1 to 1.1 ms). NaNs,
# infinities, division and library functions keep their IEEE meaning. Partial sums within a chunk
# then run in vector lanes, which only shortens their chains; the bounds of `accurate_sum` hold.
# Traced inside a user's `jax.jit`, the leaves compile with the user's options instead, and can
# differ from these in the rounding of float32 sums. XLA:CPU also emits 256-bit vectors unless
# told to prefer 512 bits where the CPU has them (AVX-512; elsewhere the CPU's widest is used):
# the Karcher Gram pass of 8 or 16 bf16 sources of 4864 x 896 then takes 0.65-0.75 of the time.
COMPILER_OPTIONS = {
    "xla_cpu_enable_fast_math": True,
    "xla_cpu_fast_math_honor_nans": True,
    "xla_cpu_fast_math_honor_infs": True,
    "xla_cpu_fast_math_honor_division": True,
    "xla_cpu_fast_math_honor_functions": True,
    "xla_cpu_prefer_vector_width": 512,
}
# The options of the programs of a merge in passes that recompute, in every pass, a statistic
# of several fused float32 operations (`Passes.ieee`): with fast math, LLVM reassociates and
# contracts each fusion after what else it computes, so two programs can round one expression
# differently (SCE's variances differed by up to 11 ulps between its rounds and its merge);
# without, each operation rounds once, in the written order, in every program.
IEEE_COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": 512}


def compute_dtype() -> jnp.dtype:
    """The dtype merges compute in: float64 where JAX's x64 mode is on, else float32.

    Storage dtypes such as bfloat16 are never used for arithmetic. Leaf functions return their
    results in this dtype; `jkarcher.merge.leaf_function` rounds them once to the output dtype.
    """
    return jnp.dtype(jnp.float64) if jax.config.jax_enable_x64 else jnp.dtype(jnp.float32)


def accurate_sum(
    values: jax.Array, axis: int | None = None, *, block: int = 16, fan_in: int = 2
) -> jax.Array:
    """The sum of every entry (axis None) or along the last axis (axis -1), by a tree of sums.

    Consecutive blocks of `block` entries are summed, each in one fused reduction; then the block
    sums are added in groups of `fan_in`, level by level, down to one sum. A level whose length is
    not a whole number of groups sums its remainder as a group of its own (never padded: XLA:CPU
    can fuse a pad into every consumer of the sum and recompute it there, which once made a
    Fisher-Karcher iteration take seconds). The rounding error then grows with the logarithm of
    the length, where XLA's CPU backend sums a few thousand entries along a few long chains and
    loses up to ~5e-7 relative in float32 (several ulps in a rescaled result). Pairs (fan_in 2)
    are added as strided slices, x[0::2] + x[1::2]: XLA folds a tree of reshaped reductions back
    into one long reduction, but keeps slices as written.

    Args:
      values: the array to sum, summed in its own dtype.
      axis: None to sum every entry; -1 to sum along the last axis, one sum per leading index.
      block: the entries of one first-level block. The default 16 with pairwise levels keeps
        float32 sums near 1e-7 relative at every length, in one pass over the data like a plain
        sum. The Karcher solvers, whose values are already partial sums over chunks, use `CHUNK`.
      fan_in: the partial sums that each later level adds together (2: a pairwise tree).

    Returns:
      A scalar (axis None) or an array shaped `values.shape[:-1]` (axis -1).
    """
    if axis is None:
        values = values.reshape(-1)
    elif axis not in (-1, values.ndim - 1):
        raise ValueError(f"accurate_sum sums every entry or the last axis, not axis {axis}")
    group = block
    while values.shape[-1] > group:
        values = _sums_of_groups(values, group)
        group = fan_in
    return values.sum(axis=-1)


def _sums_of_groups(values: jax.Array, size: int) -> jax.Array:
    """One level of `accurate_sum`: the sums of consecutive groups of `size` along the last axis,
    the remainder summed as a group of its own."""
    whole = values.shape[-1] - values.shape[-1] % size
    if size == 2:
        sums = [values[..., 0:whole:2] + values[..., 1:whole:2]]
    else:
        sums = [values[..., :whole].reshape(*values.shape[:-1], -1, size).sum(axis=-1)]
    if whole < values.shape[-1]:
        sums.append(values[..., whole:].sum(axis=-1, keepdims=True))
    return jnp.concatenate(sums, axis=-1)


def accurate_norm(values: jax.Array) -> jax.Array:
    """The Euclidean norm of `values` as one flat vector, its squares summed by `accurate_sum`."""
    return jnp.sqrt(accurate_sum(jnp.square(values)))


def sum_along(values: jax.Array, axis: int | None) -> jax.Array:
    """The sum over `axis` with the dimension kept, or over every entry by `accurate_sum` (None)."""
    if axis is None:
        return accurate_sum(values).reshape((1,) * values.ndim)
    return jnp.sum(values, axis=axis, keepdims=True)


def sum_over_models(terms: Iterable[jax.Array]) -> jax.Array:
    """The sum of same-shaped arrays, one per model, as a chain of adds.

    Reductions over the leading (model) axis of a stacked array are very slow on XLA's CPU backend
    (over 30x a fused elementwise chain); with N static, an unrolled chain fuses into one loop.
    """
    return functools.reduce(jnp.add, terms)


def weighted_sum(stacked: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_i w_i x_i over the leading axis of `stacked`, in the compute dtype."""
    dtype = compute_dtype()
    w = weights.astype(dtype)
    return sum_over_models(w[i] * stacked[i].astype(dtype) for i in range(stacked.shape[0]))


# The Karcher solvers' unit of summation: each block of their sources is cut along its last axis
# into chunks of CHUNK / 4 to 2 CHUNK entries (`chunked`), each summed in one fused reduction, and
# `add_chunk_sums` adds the chunks' partial sums in groups of CHUNK.
CHUNK = 1024


def chunked(source: jax.Array, rows: int) -> jax.Array:
    """One source as [rows, K, c]: `rows` blocks (1, or its first axis), each cut into K chunks.

    Chunks bound the length of every running sum. They split only the last axis: one chunk of it
    all up to 2 CHUNK entries, else chunks of its largest divisor in [CHUNK / 4, CHUNK], else of
    CHUNK with zeros padding the axis (zeros change no sum or inner product); so the view is a
    free reshape of the source, but for that padding.
    """
    last = (source.shape or (1,))[-1]
    chunk = _chunk_length(last)
    pad = -last % chunk
    source = source.reshape(-1, last)
    if pad:
        source = jnp.pad(source, ((0, 0), (0, pad)))
    return source.reshape(rows, -1, chunk)


def unchunked(blocks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A [rows, K, c] array from `chunked` back in the source's `shape`, the padding dropped."""
    last = (shape or (1,))[-1]
    padded = last + -last % _chunk_length(last)
    return blocks.reshape(-1, padded)[:, :last].reshape(shape)


def chunk_sums(terms: Sequence[jax.Array]) -> jax.Array:
    """[R, T, K]: the sum over each chunk of each of T terms chunked alike ([R, K, c], `chunked`).

    One variadic reduction along the last axis reads every term once. XLA compiles it alike for
    any number of chunks, so rows cut into blocks give chunk sums that concatenate, along K,
    into the whole tensor's, bit for bit (the first pass of a merge in blocks of rows).
    """
    zeros = tuple(jnp.zeros((), term.dtype) for term in terms)

    def add(a, b):
        return tuple(p + q for p, q in zip(a, b, strict=True))

    return jnp.stack(jax.lax.reduce(tuple(terms), zeros, add, (2,)), axis=-2)


def add_chunk_sums(partials: jax.Array) -> jax.Array:
    """The [R, K] partial sums of the K chunks of R blocks (`chunked`) added up: [R].

    `accurate_sum` in groups of CHUNK.
    """
    return accurate_sum(partials, axis=-1, block=CHUNK, fan_in=CHUNK)


def chunks_per_row(row_length: int) -> int:
    """The chunks that `chunked` cuts one row of `row_length` entries into (its last axis)."""
    chunk = _chunk_length(row_length)
    return -(-row_length // chunk)


def _chunk_length(length: int) -> int:
    """The chunk length of `chunked` for a last axis of `length`."""
    if length <= 2 * CHUNK:
        return length
    for chunk in range(CHUNK, CHUNK // 4 - 1, -1):
        if length % chunk == 0:
            return chunk
    return CHUNK


class NegativeWeightError(MergeError):
    """A negative weight given to a method whose weights must be >= 0."""


# Signed weights whose sum is within this fraction of the sum of their magnitudes sum to 0.
ZERO_SUM = 1e-8


def check_weights(
    weights: Sequence[float] | jax.Array | None,
    n_models: int,
    *,
    signed: bool = False,
    nonzero_sum: bool = True,
) -> jax.Array:
    """The weights as a float array [N] in the compute dtype.

    Errors for a wrong count, values that are not numbers or not finite, that overflow the
    compute dtype (float32: beyond 3.4e38), or whose sum overflows; unless `signed`, for negative
    values (a NegativeWeightError) and a sum that is not positive; if `signed` and `nonzero_sum`,
    for a sum of 0 to ZERO_SUM of the weights' magnitudes (for a method that divides by it).
    Traced weights (inside a caller's jit) can only be checked by `jax.experimental.checkify`:
    the same checks run there as `checkify.debug_check`s, which do nothing unless the caller's
    function is wrapped in `checkify.checkify`.
    """
    dtype = compute_dtype()
    if weights is None:
        return jnp.ones((n_models,), dtype)
    if isinstance(weights, jax.core.Tracer):
        if weights.shape != (n_models,):
            raise MergeError(f"got weights of shape {weights.shape} for {n_models} models")
        weights = weights.astype(dtype)
        total = jnp.sum(weights)
        sign_ok = True if signed else jnp.all(weights >= 0) & (total > 0)
        nonzero = jnp.abs(total) > ZERO_SUM * jnp.sum(jnp.abs(weights))
        sum_ok = nonzero if signed and nonzero_sum else True
        checkify.debug_check(
            jnp.all(jnp.isfinite(weights)) & jnp.isfinite(total) & sign_ok & sum_ok,
            "the weights must be finite"
            + ("" if signed else ", >= 0 and not all zero")
            + (" and not sum to 0" if signed and nonzero_sum else ""),
        )
        return weights
    try:
        values = np.asarray(weights, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise MergeError(f"weights must be numbers, got {weights!r}") from None
    if values.shape != (n_models,):
        raise MergeError(f"got {values.size} weights for {n_models} models")
    largest = float(jnp.finfo(dtype).max)
    for index, value in enumerate(values):
        if not np.isfinite(value):
            raise MergeError(f"weight of model {index} is {value}; weights must be finite")
        if value < 0 and not signed:
            raise NegativeWeightError(f"weight of model {index} is {value}; weights must be >= 0")
        if abs(value) > largest:
            raise MergeError(
                f"weight of model {index} is {value:g}, beyond the {dtype.name} range "
                f"({largest:.3g}) that merges compute in"
            )
    if not signed and values.sum() <= 0:
        raise MergeError("the weights sum to zero; at least one model needs a positive weight")
    if signed and nonzero_sum and abs(values.sum()) <= ZERO_SUM * np.abs(values).sum():
        raise MergeError(
            f"the weights {values.tolist()} sum to 0 (to {ZERO_SUM:g} of their magnitudes), "
            "and the merge divides by their sum"
        )
    if abs(values.sum()) > largest:
        raise MergeError(f"the weights sum to {values.sum():g}, beyond the {dtype.name} range")
    return jnp.asarray(values, dtype)


def all_finite(arrays: Sequence[jax.Array]) -> jax.Array:
    """[len(arrays)] flags: whether each array holds only floating-point values that are finite.

    An IEEE float is NaN or infinite exactly when its exponent field is all ones, so with E the
    mask of that field, x is finite iff (bits(x) & E) < E: the largest masked bit pattern of an
    array decides. One variadic max over the last axis checks every array of one shape in a
    single read of the data, integer compares that vectorize (several times faster than a float
    sum of x * 0), so a leaf checks its inputs and its result together, reading the inputs once.
    """
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, array in enumerate(arrays):
        by_shape.setdefault(jnp.shape(array) or (1,), []).append(index)
    flags = [None] * len(arrays)
    for indices in by_shape.values():
        masks = [_exponent_mask(arrays[i].dtype) for i in indices]
        exponents = tuple(
            jax.lax.bitcast_convert_type(jnp.atleast_1d(arrays[i]), mask.dtype) & mask
            for i, mask in zip(indices, masks, strict=True)
        )
        largest = jax.lax.reduce(
            exponents,
            tuple(jnp.zeros((), mask.dtype) for mask in masks),
            lambda x, y: tuple(jnp.maximum(p, q) for p, q in zip(x, y, strict=True)),
            (exponents[0].ndim - 1,),
        )
        for index, top, mask in zip(indices, largest, masks, strict=True):
            flags[index] = jnp.max(top) < mask
    return jnp.stack(flags)


def _exponent_mask(dtype: np.dtype) -> np.unsignedinteger:
    """The exponent field of a float dtype, as an unsigned integer of its width."""
    info = jnp.finfo(dtype)
    bits = np.dtype(f"uint{8 * np.dtype(dtype).itemsize}").type
    return bits(((1 << info.nexp) - 1) << info.nmant)


def first_disagreeing(arrays: Sequence[np.ndarray | jax.Array]) -> int | None:
    """The index of the first array whose values differ from the first one's, or None.

    Tensors that are not floating point (indices, masks, counters) are never averaged: they are
    copied, and only when every model holds the same values.
    """
    first = np.asarray(arrays[0])
    for index, array in enumerate(arrays[1:], start=1):
        if not np.array_equal(np.asarray(array), first):
            return index
    return None
