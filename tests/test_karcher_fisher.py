"""Fisher-preconditioned Karcher: a float64 reference, its two limits, and merge(fisher=...)."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from karcher_reference import (
    fisher_karcher_reference,
    karcher_reference,
    relative_error,
    sources_with_cosine,
)

import jkarcher
from jkarcher import MergeError, karcher_mean

SHAPE = (40, 60)


def _fishers(rng, n, shape):
    return (rng.uniform(0.05, 2.0, (n, *shape)) ** 3).astype(np.float32)


@pytest.mark.parametrize("cosine", [0.3, 0.9, 0.999])
def test_matches_a_float64_reference(cosine):
    rng = np.random.default_rng(0)
    sources = sources_with_cosine(rng, 4, SHAPE, cosine, [1.0, 2.0, 1.5, 3.0]).astype(np.float32)
    weights = np.array([1.0, 0.5, 2.0, 1.0])
    fisher = _fishers(rng, 4, SHAPE)
    merged = karcher_mean(jnp.asarray(sources), jnp.asarray(weights), fisher=jnp.asarray(fisher))
    expected = fisher_karcher_reference(sources, weights, fisher)
    assert relative_error(merged, expected) <= 1e-6


@pytest.mark.parametrize("block", ["tensor", "row"])
def test_equal_constant_fishers_give_the_plain_karcher_mean(block):
    rng = np.random.default_rng(1)
    sources = sources_with_cosine(rng, 5, SHAPE, 0.5).astype(np.float32)
    weights = jnp.asarray([1.0, 2.0, 3.0, 1.0, 0.5])
    constant = jnp.full((5, *SHAPE), 2.5, jnp.float32)
    fisher = karcher_mean(jnp.asarray(sources), weights, block=block, fisher=constant)
    plain = karcher_mean(jnp.asarray(sources), weights, block=block)
    assert relative_error(fisher, plain) <= 1e-6


def test_close_sources_tend_to_fisher_weighted_averaging():
    rng = np.random.default_rng(2)
    weights = np.array([1.0, 2.0, 0.5, 1.5])
    fisher = _fishers(rng, 4, (5000,))
    base = rng.standard_normal(5000)
    gaps = []
    for spread in (1e-1, 1e-2, 1e-3):
        sources = (base + spread * rng.standard_normal((4, 5000))).astype(np.float32)
        averaged = (weights[:, None] * fisher * sources).sum(0) / (weights[:, None] * fisher).sum(0)
        ours = karcher_mean(jnp.asarray(sources), jnp.asarray(weights), fisher=jnp.asarray(fisher))
        plain = karcher_mean(jnp.asarray(sources), jnp.asarray(weights))
        gaps.append(relative_error(ours, averaged))
        # Much nearer Fisher averaging than the plain mean is, which ignores the Fishers.
        assert gaps[-1] < 0.1 * relative_error(plain, averaged)
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-4


def test_row_blocks_match_a_per_row_reference():
    rng = np.random.default_rng(3)
    sources = rng.standard_normal((3, 6, 50)).astype(np.float32)
    fisher = _fishers(rng, 3, (6, 50))
    merged = karcher_mean(
        jnp.asarray(sources), jnp.ones(3), block="row", fisher=jnp.asarray(fisher)
    )
    for r in range(6):
        expected = fisher_karcher_reference(sources[:, r], np.ones(3), fisher[:, r])
        assert relative_error(merged[r], expected) <= 1e-6


def test_bfloat16_sources_give_the_float32_mean_when_asked():
    rng = np.random.default_rng(6)
    sources = sources_with_cosine(rng, 3, SHAPE, 0.7, [1.0, 2.0, 1.5]).astype(ml_dtypes.bfloat16)
    fisher = _fishers(rng, 3, SHAPE).astype(ml_dtypes.bfloat16)
    weights = np.array([1.0, 0.5, 2.0])
    merged = karcher_mean(
        jnp.asarray(sources),
        jnp.asarray(weights),
        fisher=jnp.asarray(fisher),
        out_dtype=jnp.float32,
    )
    expected = fisher_karcher_reference(
        sources.astype(np.float64), weights, fisher.astype(np.float64)
    )
    assert merged.dtype == jnp.float32
    assert relative_error(merged, expected) <= 1e-6


def test_merge_takes_fisher_pytrees_and_checks_them():
    rng = np.random.default_rng(4)
    trees = [{"w": rng.standard_normal(SHAPE).astype(np.float32)} for _ in range(3)]
    fishers = [{"w": f} for f in _fishers(rng, 3, SHAPE)]
    merged = jkarcher.merge(trees, [1.0, 2.0, 1.0], fisher=fishers)
    expected = fisher_karcher_reference(
        [t["w"] for t in trees], [1.0, 2.0, 1.0], [f["w"] for f in fishers]
    )
    assert relative_error(merged["w"], expected) <= 1e-6
    plain = jkarcher.merge(trees, [1.0, 2.0, 1.0])
    assert relative_error(plain["w"], karcher_reference([t["w"] for t in trees], [1, 2, 1])) < 1e-6
    fishers[1]["w"][0, 0] = np.nan
    with pytest.raises(MergeError, match="leaf 'w': fisher of model 1 holds NaN"):
        jkarcher.merge(trees, None, fisher=fishers)
    with pytest.raises(MergeError, match="fisher has 2 pytrees for 3 models"):
        jkarcher.merge(trees, None, fisher=fishers[:2])
    with pytest.raises(MergeError, match="fisher of model 0 has a different structure"):
        jkarcher.merge(trees, None, fisher=[{"v": f["w"]} for f in fishers])


def test_fisher_with_a_base_merges_task_vectors():
    rng = np.random.default_rng(5)
    base = rng.standard_normal(SHAPE).astype(np.float32)
    experts = [base + 0.3 * rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3)]
    fisher = _fishers(rng, 3, SHAPE)
    merged = jkarcher.merge(
        [{"w": e} for e in experts], None, base={"w": base}, fisher=[{"w": f} for f in fisher]
    )
    deltas = [e.astype(np.float64) - base for e in experts]
    expected = base + fisher_karcher_reference(deltas, np.ones(3), fisher)
    assert relative_error(merged["w"], expected) <= 1e-6
