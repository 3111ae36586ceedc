"""SCE: Select, Calculate, Erase (Wan et al. 2024, "FuseChat", arXiv:2408.07990).

With task vectors delta_i = x_i - base:

1. select: with select_topk < 1, keep only the entries whose variance across the models,
   v = (1/N) sum_i (delta_i - mean delta)^2, is among the k = floor(select_topk * #{v != 0})
   largest (k computed in float32, as mergekit does; of equal variances the lowest-index entries,
   the selection order of `jkarcher.methods.selection`); the other entries of every delta are 0;
2. calculate: model weights a_i = mean(delta_i^2) / sum_j mean(delta_j^2), or 1/N when that sum
   is below 1e-6;
3. erase: TIES sign election on the (unweighted) deltas;

merged = base + sum_i c_i a_i delta_i / max(sum_i c_i a_i, 1e-6), with c_i the election mask.

The per-model weights take no part: SCE derives its own from the task vectors. Note the 1e-6
floor of step 2, taken from mergekit: fine-tuning deltas of typical size (entries ~1e-3, so
mean(delta^2) ~ 1e-6) fall below it and get equal weights. SCE is a baseline of Wang, Ye, Yin
(2026, Sec. 4).

A tensor too large for the memory budget merges in passes over blocks of rows
(docs/design.md, "Memory"): the variance selection's digit and tie rounds
(`jkarcher.methods.selection_passes`), a round of chunk sums of delta_i^2 for the weights, and
the merge of each block.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jkarcher.methods.gram_passes import gram_sums_shape
from jkarcher.methods.registry import (
    BASE_REQUIRED,
    MergeMethod,
    Param,
    Passes,
    Round,
    fraction,
    register,
)
from jkarcher.methods.selection import largest_mask, sortable_keys
from jkarcher.methods.selection_passes import kept, selection_rounds
from jkarcher.methods.task_arithmetic import elect_signs, task_vectors
from jkarcher.numerics import (
    add_chunk_sums,
    chunk_sums,
    chunked,
    compute_dtype,
    sum_over_models,
)

# Below this sum of mean squared task vectors the models get equal weights.
WEIGHT_SUM_EPS = 1e-6
# The floor of the per-entry sum of the elected weights.
DIVISOR_FLOOR = 1e-6


def sce(stacked, weights, base, *, key=None, select_topk: float = 1.0) -> jax.Array:
    """SCE (Wan et al. 2024, arXiv:2408.07990) of the task vectors delta_i = x_i - base:
    base + sum_i c_i a_i delta_i / max(sum_i c_i a_i, 1e-6), after the variance top-k (module
    docstring). The weights are not used."""
    del weights, key
    deltas = task_vectors(stacked, base)
    if select_topk < 1:
        keep = variance_topk_mask(deltas, select_topk)
        deltas = [jnp.where(keep, d, 0.0) for d in deltas]
    return _erased(base, deltas, model_weights(energy_chunk_sums(deltas), deltas[0].size))


def _erased(base, deltas: list[jax.Array], importance: jax.Array) -> jax.Array:
    """Steps 3 and the merge: base + sum_i c_i a_i delta_i / max(sum_i c_i a_i, 1e-6)."""
    agree = elect_signs(deltas)
    elected = [jnp.where(a, importance[i], 0.0) for i, a in enumerate(agree)]
    merged = sum_over_models(d * e for d, e in zip(deltas, elected, strict=True))
    merged = merged / jnp.maximum(sum_over_models(elected), DIVISOR_FLOOR)
    return base.astype(merged.dtype) + merged


def variances(deltas: list[jax.Array]) -> jax.Array:
    """v = (1/N) sum_i (delta_i - mean delta)^2, the mean taken as delta_0 + mean(delta_i -
    delta_0): delta_0 exactly where every model agrees, so that the variance is exactly 0 there
    and the count of nonzero variances is mergekit's."""
    n = len(deltas)
    mean = deltas[0] + sum_over_models(d - deltas[0] for d in deltas) / n
    return sum_over_models(jnp.square(d - mean) for d in deltas) / n


def selected_count(nonzero: jax.Array, select_topk: float) -> jax.Array:
    """k = floor(select_topk * #nonzero variances), in float32 as mergekit computes it."""
    return jnp.floor(nonzero.astype(jnp.float32) * jnp.float32(select_topk)).astype(jnp.int32)


def variance_topk_mask(deltas: list[jax.Array], select_topk: float) -> jax.Array:
    """True at the floor(select_topk * #nonzero) entries of largest variance across models."""
    variance = variances(deltas)
    k = selected_count(jnp.sum(variance != 0), select_topk)
    return (k > 0) & largest_mask(variance, jnp.maximum(k, 1))


def energy_chunk_sums(deltas: list[jax.Array]) -> jax.Array:
    """[N, K]: the sums of delta_i^2 over each chunk (`chunked`), which blocks of rows
    concatenate along K into the whole tensor's."""
    return chunk_sums([chunked(jnp.square(d), 1) for d in deltas])[0]


def model_weights(sums: jax.Array, size: int) -> jax.Array:
    """a_i = mean(delta_i^2) / sum_j mean(delta_j^2), or 1/N when the sum is below 1e-6, from
    the whole tensor's `energy_chunk_sums` and its `size`."""
    scores = add_chunk_sums(sums) / size
    total = jnp.sum(scores)
    equal = jnp.full_like(scores, 1.0 / scores.shape[0])
    proportional = scores / jnp.where(total == 0, 1.0, total)
    return jnp.where(jnp.abs(total) < WEIGHT_SUM_EPS, equal, proportional)


def _variance_keys(stacked, base, **params) -> jax.Array:
    """[1, rows, ...]: sortable keys of the variances, 0 for a variance of exactly 0 (below
    every other key, as 0 is below every other variance), so that the first digit round counts
    the zeros exactly."""
    del params
    variance = variances(task_vectors(stacked, base))
    return jnp.where(variance == 0, 0, sortable_keys(variance))[None]


def _variance_cut(select_topk: float, size: int, counts: jax.Array) -> jax.Array:
    """[[k]] from the first digit round's counts [1, 2^16]: the zeros are its digit 0."""
    return selected_count(size - counts[0, 0], select_topk)[None, None]


def _scratch(params, inputs, shape) -> tuple[float, float]:
    """The leaf's float32 scratch (`MergeMethod.scratch`): the variance selection's keys and
    histograms add about 5 copies of a source."""
    del inputs, shape
    return (1.25, 5.5) if params["select_topk"] < 1 else (1.25, 0.5)


def _blocked(params) -> Passes:
    """The variance selection's rounds (with select_topk < 1), the energies' round, and the
    merge of each block (module docstring)."""
    select_topk = params["select_topk"]
    rounds = ()
    if select_topk < 1:
        rounds = selection_rounds(
            _variance_keys,
            lambda n: (1, 1),
            functools.partial(_variance_cut, select_topk),
            8 * compute_dtype().itemsize,
        )

    def masked(stacked, base, cut, first_row) -> list[jax.Array]:
        deltas = task_vectors(stacked, base)
        if cut is None:
            return deltas
        keep = kept(_variance_keys(stacked, base), cut, first_row)[0, 0]
        return [jnp.where(keep, d, 0.0) for d in deltas]

    def energies(stacked, weights, base, cut, *, key=None, first_row=0, **params):
        del weights, key, params
        return energy_chunk_sums(masked(stacked, base, cut, first_row))

    def weighed(sums, weights, cut, *, shape, **params):
        del weights, params
        return cut, model_weights(sums, math.prod(shape))

    def energy_sums(shape, n) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((n, gram_sums_shape(shape, 1)[1]), compute_dtype())

    def apply(stacked, weights, base, found, *, key=None, first_row=0, **params):
        del weights, key, params
        cut, importance = found
        return _erased(base, masked(stacked, base, cut, first_row), importance)

    return Passes((*rounds, Round(energies, weighed, energy_sums)), apply, ieee=True)


register(
    MergeMethod(
        name="sce",
        scratch=_scratch,
        leaf=sce,
        params=(
            Param("select_topk", 1.0, "fraction of highest-variance entries kept", check=fraction),
        ),
        base=BASE_REQUIRED,
        weighted=False,
        summary="variance top-k, energy weights, sign election",
        blocked=_blocked,
        citation="https://arxiv.org/abs/2408.07990",
    )
)
