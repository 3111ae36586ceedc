"""Top-k, rank-range and rank masks keep exact counts and break ties by one fixed rule.

The selection order (`jkarcher.methods.selection`): values largest first and, among equal values,
the lowest flat index first. Stated here in NumPy as a stable sort of the negated values, it
decides which tied entries TIES, breadcrumbs and SCE keep and how DELLA ranks tied magnitudes.
On bfloat16 weights many magnitudes tie; the counts kept must still be exactly mergekit's, on
small tensors (sorted keys) and beyond 2^17 entries (radix selection).
"""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jkarcher.methods import sce, selection, sparsify

try:
    import torch
    from mergekit import sparsify as mergekit_sparsify
    from mergekit.merge_methods.sce import sce_mask
except ImportError:
    if os.environ.get("CI") == "true":
        raise
    torch = None

needs_mergekit = pytest.mark.skipif(
    torch is None, reason="mergekit is not installed (pip install -e '.[test]')"
)

SMALL = (24, 40)
LARGE = (400, 384)  # 153_600 entries, beyond the 2^17 of the sorting path
SIZES = [pytest.param(SMALL, id="small"), pytest.param(LARGE, id="large", marks=pytest.mark.slow)]
# float32's unit roundoff.
U = 2.0**-24


def _selection_order(values):
    """The flat indices in the selection order: a stable sort of the negated values."""
    return np.argsort(-np.asarray(values, np.float64).ravel(), kind="stable")


def _positions_in(order, start, stop, shape):
    """A mask of the entries at positions start <= p < stop of an order of flat indices."""
    mask = np.zeros(int(np.prod(shape)), bool)
    mask[order[start:stop]] = True
    return mask.reshape(shape)


def _small_integers(seed, shape, low=-8, high=8):
    """Values with ties everywhere: integers from [low, high) as float32 (zeros are +0.0)."""
    return np.random.default_rng(seed).integers(low, high, shape).astype(np.float32)


def _bfloat16_valued(seed, shape, scale=1.0):
    """N(0, scale^2) float32 values rounded to bfloat16: the ties of bfloat16 weights."""
    values = scale * np.random.default_rng(seed).standard_normal(shape)
    return values.astype(ml_dtypes.bfloat16).astype(np.float32)


# The tie rule, from its NumPy statement.


@pytest.mark.parametrize("shape", SIZES)
def test_largest_mask_keeps_exactly_k_and_the_lowest_index_ties(shape):
    values = _small_integers(0, shape)
    order = _selection_order(values)
    size = values.size
    largest = jax.jit(selection.largest_mask)
    for k in (1, 3, size // 3, size // 2 + 1, size - 1, size):
        keep = np.asarray(largest(values, k))
        assert keep.sum() == k
        np.testing.assert_array_equal(keep, _positions_in(order, 0, k, shape), err_msg=f"k={k}")


@pytest.mark.parametrize("shape", SIZES)
def test_position_range_mask_is_a_slice_of_the_selection_order(shape):
    values = _small_integers(1, shape)
    order = _selection_order(values)
    size = values.size
    position_range = jax.jit(selection.position_range_mask, static_argnums=(1, 2))
    for start, stop in ((0, 10), (5, size // 2), (size // 3, size), (7, 7)):
        keep = np.asarray(position_range(values, start, stop))
        np.testing.assert_array_equal(keep, _positions_in(order, start, stop, shape))


def test_positions_along_the_last_axis_follow_the_selection_order():
    values = _small_integers(2, (3, 5, 50), 0, 6)
    positions = np.asarray(jax.jit(selection.positions_along_last_axis)(values))
    for index in np.ndindex(values.shape[:-1]):
        expected = np.empty(values.shape[-1], int)
        expected[_selection_order(values[index])] = np.arange(values.shape[-1])
        np.testing.assert_array_equal(positions[index], expected)


def test_sparsifiers_follow_the_tie_rule():
    delta = _small_integers(3, (30, 40))
    magnitude = np.abs(delta)
    order = _selection_order(magnitude)
    k = int(0.3 * delta.size)
    keep = np.asarray(jax.jit(sparsify.magnitude_mask, static_argnums=1)(delta, 0.3))
    np.testing.assert_array_equal(keep, _positions_in(order, 0, k, delta.shape))
    # breadcrumbs: floor(0.1 D) outliers, then floor(0.6 D) kept
    kept, outliers = int(0.6 * delta.size), int(0.1 * delta.size)
    keep = np.asarray(jax.jit(sparsify.outlier_mask, static_argnums=(1, 2))(delta, 0.6, 0.1))
    np.testing.assert_array_equal(
        keep, _positions_in(order, outliers, outliers + kept, delta.shape)
    )
    # DELLA ranks along axis 1, smallest first: rank = n - 1 - position
    probabilities = jax.jit(sparsify.della_keep_probabilities, static_argnums=(1, 2))
    p = np.asarray(probabilities(delta, 0.5, 0.2))
    n = delta.shape[1]
    for row, row_probabilities in zip(magnitude, p, strict=True):
        ranks = np.empty(n)
        ranks[_selection_order(row)] = n - 1 - np.arange(n)
        # probabilities below 1, a few roundings each
        np.testing.assert_allclose(row_probabilities, 0.3 + 0.4 * ranks / (n - 1), atol=4 * U)


def test_sce_variance_mask_follows_the_tie_rule():
    """Four models with integer task vectors: every variance is exact in float32 (sums of small
    integers divided by 4), so equal variances tie exactly."""
    deltas = _small_integers(4, (4, 20, 30), -2, 3)
    variance = deltas.astype(np.float64).var(axis=0)
    k = int(np.float32(np.count_nonzero(variance)) * np.float32(0.4))
    keep = np.asarray(jax.jit(sce.variance_topk_mask, static_argnums=1)(list(deltas), 0.4))
    np.testing.assert_array_equal(keep, _positions_in(_selection_order(variance), 0, k, (20, 30)))


# Counts against mergekit's sparsifiers, on bfloat16-valued tensors.


def _ties_across(values, k):
    """Whether the values tied with the k-th largest reach beyond it (a count that keeps every
    tied entry would exceed k)."""
    return np.count_nonzero(values >= np.sort(values, axis=None)[::-1][k - 1]) > k


@needs_mergekit
@pytest.mark.parametrize("shape", SIZES)
def test_ties_and_breadcrumbs_keep_mergekits_counts(shape):
    delta = _bfloat16_valued(5, shape)
    assert np.all(delta != 0)  # so that mergekit's kept entries are its nonzero outputs
    tensor = torch.from_numpy(delta)
    tied_cuts = 0
    for density in (0.1, 0.37, 0.5, 0.9):
        theirs = np.count_nonzero(mergekit_sparsify.magnitude(tensor, density).numpy())
        ours = np.count_nonzero(np.asarray(sparsify.magnitude_mask(jnp.asarray(delta), density)))
        assert ours == theirs == max(1, int(density * delta.size))
        tied_cuts += _ties_across(np.abs(delta), theirs)
        for gamma in (0.01, 0.2):
            theirs = mergekit_sparsify.magnitude_outliers(tensor, density, gamma=gamma).numpy()
            ours = np.asarray(sparsify.outlier_mask(jnp.asarray(delta), density, gamma))
            assert np.count_nonzero(ours) == np.count_nonzero(theirs) == int(density * delta.size)
    assert tied_cuts >= 2  # the data does tie across the cuts


def _near_the_cut(values, k, rtol):
    """The entries between the k-th and (k+1)-th largest values (widened by rtol relative) when
    those two are within rtol of each other; else none."""
    ordered = np.sort(values, axis=None)[::-1]
    if k == 0 or k == ordered.size or ordered[k - 1] - ordered[k] > rtol * ordered[k - 1]:
        return np.zeros(values.shape, bool)
    low, high = ordered[k] * (1 - rtol), ordered[k - 1] * (1 + rtol)
    return (values >= low) & (values <= high)


@needs_mergekit
@pytest.mark.parametrize("spread", [0.5, 1e-3])  # 1e-3: many task vectors round to 0
@pytest.mark.parametrize("shape", SIZES)
def test_sce_keeps_mergekits_count_and_entries_but_among_tied_variances(shape, spread):
    """mergekit keeps k = int(#nonzero variances * select_topk), the product in float32. The
    masks differ only where the variances tie across the k-th: each library's float32 variance of
    N values is within (N + 3) u of exact (two-pass and Welford; Chan, Golub & LeVeque 1983), so
    variances within twice the sum of those may be ordered either way."""
    base = _bfloat16_valued(6, shape)
    models = (base + _bfloat16_valued(7, (3, *shape), spread)).astype(ml_dtypes.bfloat16)
    deltas = models.astype(np.float32) - base
    variance = deltas.astype(np.float64).var(axis=0)
    nonzero = np.float32(np.count_nonzero(variance))
    select = jax.jit(sce.variance_topk_mask, static_argnums=1)
    for select_topk in (0.1, 0.3, 0.7):
        theirs = sce_mask(torch.from_numpy(deltas), select_topk).numpy() != 0
        ours = np.asarray(select(list(deltas), select_topk))
        assert ours.sum() == theirs.sum() == int(nonzero * np.float32(select_topk))
        tied = _near_the_cut(variance, int(theirs.sum()), 4 * (len(deltas) + 3) * U)
        assert not np.any((ours != theirs) & ~tied)


@needs_mergekit
@pytest.mark.parametrize("shape", [(40, 96), (4, 6, 50)])
def test_della_probabilities_equal_mergekits_but_for_the_order_among_ties(shape, monkeypatch):
    """mergekit draws Bernoulli(p) with p from its argsort ranks along axis 1; within a group of
    tied magnitudes both assign the same ranks, perhaps to different members. So, per slice along
    axis 1, the probabilities sorted by (magnitude, probability) agree: equal off ties, equal as
    a set on each tie group, hence the same expected count kept."""
    delta = _bfloat16_valued(8, shape, 0.1)
    drawn = []

    def bernoulli_recording(probabilities, *args, **kwargs):
        drawn.append(probabilities.numpy().copy())
        return torch.ones_like(probabilities)

    monkeypatch.setattr(torch, "bernoulli", bernoulli_recording)
    mergekit_sparsify.della_magprune(torch.from_numpy(delta), 0.5, 0.2)
    theirs = drawn[0].reshape(shape)
    ours = np.asarray(sparsify.della_keep_probabilities(jnp.asarray(delta), 0.5, 0.2))
    magnitude = np.moveaxis(np.abs(delta), 1, -1).reshape(-1, shape[1])
    ours, theirs = (np.moveaxis(p, 1, -1).reshape(-1, shape[1]) for p in (ours, theirs))
    assert any(np.unique(row).size < row.size for row in magnitude)  # there are ties
    for row, mine, their in zip(magnitude, ours, theirs, strict=True):
        np.testing.assert_allclose(
            mine[np.lexsort((mine, row))], their[np.lexsort((their, row))], atol=4 * U
        )
