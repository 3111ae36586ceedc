"""The trimmed task-vector merges (`jkarcher.methods.task_arithmetic`) of a tensor too large for
the memory budget, over blocks of its rows (docs/design.md, "Memory").

Their masks and rescale factors depend on the whole task vector:
- a trim by the magnitudes' selection order (TIES, breadcrumbs) finds its cuts in the rounds of
  `jkarcher.methods.selection_passes` (two histogram rounds and a tie round for float32);
- a random trim draws each row from the tensor's key and the row (`sparsify.RowKey`), so a block
  draws what the whole tensor draws there: without `rescale` its rows merge on their own;
- `rescale` needs each model's L1 norms |delta_i|_1 and |m_i delta_i|_1, summed by chunks in one
  more round (`sparsify.l1_chunk_sums`, which blocks concatenate into the whole tensor's).
The last pass merges each block with the masks and factors found (`generalized_task_arithmetic`
with `keep` and `scales`). Every statistic is a count or a chunk sum, so blocks give the bytes of
the merge of the whole tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jkarcher.methods import sparsify
from jkarcher.methods.gram_passes import gram_sums_shape
from jkarcher.methods.registry import Passes, Round
from jkarcher.methods.selection import sortable_keys
from jkarcher.methods.selection_passes import kept, selection_rounds
from jkarcher.methods.task_arithmetic import (
    SPARSIFICATIONS,
    generalized_task_arithmetic,
    keep_masks,
    per_model,
    task_vectors,
)
from jkarcher.numerics import compute_dtype


def trim_passes(
    sparsification: str, sign_consensus: bool, params: Mapping[str, Any]
) -> Passes | None:
    """The passes of a trimmed merge for these parameters; None where its rows merge on their
    own (a random trim without `rescale`)."""
    kind = SPARSIFICATIONS[sparsification]
    rescale = bool(params.get("rescale"))
    trims = {p.name: params[p.name] for p in kind.params}
    merge = functools.partial(
        generalized_task_arithmetic,
        sparsification=sparsification,
        sign_consensus=sign_consensus,
    )
    if kind.random:
        if not rescale:
            return None
        rounds = (_l1_round(sparsification, trims, by_cuts=False),)
        return Passes(rounds, _apply(merge, lambda scales: (None, scales)), ieee=True)
    rounds = selection_rounds(
        _magnitude_keys,
        functools.partial(_layout, kind.cuts, trims),
        functools.partial(_cuts, kind.cuts, trims),
        8 * compute_dtype().itemsize,
    )
    if not rescale:
        return Passes(
            rounds, _apply(merge, lambda cut: (cut, None)), own_leaf_when_whole=True, ieee=True
        )
    # The L1 sums are float32: summed in one program with the rest, they could round otherwise.
    rounds = (*rounds, _l1_round(sparsification, trims, by_cuts=True))
    return Passes(rounds, _apply(merge, lambda found: found), ieee=True)


def _layout(cuts_of, trims: Mapping[str, Any], n: int) -> tuple[int, int]:
    """(N, C): one key array per model, and the cuts of its trim."""
    return n, len(cuts_of(1, **{name: per_model(v, n)[0] for name, v in trims.items()}))


def _cuts(cuts_of, trims: Mapping[str, Any], size: int, counts: jax.Array) -> np.ndarray:
    """[N, C] the "k largest" counts of each model's trim (`Sparsification.cuts`), which depend
    only on the tensor's size."""
    n = counts.shape[0]
    values = {name: per_model(value, n) for name, value in trims.items()}
    return np.array([cuts_of(size, **{k: v[i] for k, v in values.items()}) for i in range(n)])


def _magnitude_keys(stacked, base, **params) -> jax.Array:
    """[N, rows, ...] the sortable keys of each model's |delta_i|."""
    del params
    return jnp.stack([sortable_keys(jnp.abs(d)) for d in task_vectors(stacked, base)])


def _masks(stacked, base, cut, first_row) -> jax.Array:
    """[N, rows, ...] the keep-masks of a block from its tensor's cuts: the first "k largest"
    less the second, where there are two."""
    masks = kept(_magnitude_keys(stacked, base), cut, first_row)
    return masks[:, 0] & ~masks[:, 1] if masks.shape[1] == 2 else masks[:, 0]


def _l1_round(sparsification: str, trims: Mapping[str, Any], by_cuts: bool) -> Round:
    """The round that sums |delta_i| and |m_i delta_i| by chunks ([2N, K]), the masks drawn
    from the key or, `by_cuts`, made from the cuts the rounds before found; `finish` gives
    each model's factor (with the cuts, `by_cuts`)."""

    def statistics(stacked, weights, base, previous, *, key=None, first_row=0, **params):
        del weights, params
        deltas = task_vectors(stacked, base)
        if by_cuts:
            keep = _masks(stacked, base, previous, first_row)
        else:
            keep = keep_masks(sparsification, key, deltas, **trims)
        sums = [sparsify.l1_chunk_sums(d, keep[i]) for i, d in enumerate(deltas)]
        return jnp.concatenate(sums)

    def finish(sums, weights, previous, *, shape, **params):
        del shape, params
        n = weights.shape[0]
        scales = jnp.stack([sparsify.l1_rescale(sums[2 * i : 2 * i + 2]) for i in range(n)])
        return (previous, scales) if by_cuts else scales

    def sums(shape, n) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((2 * n, gram_sums_shape(shape, 1)[1]), compute_dtype())

    return Round(statistics, finish, sums)


def _apply(merge, found):
    """The last pass: a block merged with the cuts and rescale factors that the rounds found,
    `found(coefficients)` -> (cuts or None, factors or None)."""

    def apply(stacked, weights, base, coefficients, *, key=None, first_row=0, **params):
        values = dict(params)
        lambda_ = values.pop("lambda")
        cut, scales = found(coefficients)
        keep = None if cut is None else _masks(stacked, base, cut, first_row)
        return merge(
            stacked, weights, base, key=key, lambda_=lambda_, scales=scales, keep=keep, **values
        )

    return apply
