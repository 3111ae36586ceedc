"""fisher_merging: a float64 reference, its limits (linear, the floor), and merge(fisher=...)."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jkarcher
from jkarcher import MergeError, methods
from jkarcher.methods.fisher_merging import fisher_merging

SHAPE = (12, 20)
FLOOR = 1e-6


def reference(sources, weights, fisher, floor=FLOOR):
    """sum_i w_i max(F_i, floor) x_i / sum_i w_i max(F_i, floor), in float64."""
    x, f = np.asarray(sources, np.float64), np.maximum(np.asarray(fisher, np.float64), floor)
    w = np.asarray(weights, np.float64).reshape(-1, *([1] * (x.ndim - 1)))
    return (w * f * x).sum(0) / (w * f).sum(0)


def problem(seed, n=3, shape=SHAPE):
    """Sources, and Fishers spanning many decades, with zeros and entries below the floor."""
    rng = np.random.default_rng(seed)
    sources = rng.standard_normal((n, *shape)).astype(np.float32)
    fisher = (10.0 ** rng.uniform(-9, 1, (n, *shape))).astype(np.float32)
    fisher[rng.random((n, *shape)) < 0.1] = 0
    return sources, fisher


def merged(sources, weights, fisher, **params):
    out = fisher_merging(
        jnp.asarray(sources),
        jnp.asarray(weights, jnp.float32),
        fisher=jnp.asarray(fisher),
        **params,
    )
    return np.asarray(out)


def test_matches_a_float64_reference():
    sources, fisher = problem(0)
    weights = [1.0, 2.0, 0.5]
    result = merged(sources, weights, fisher)
    expected = reference(sources, weights, fisher)
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)
    assert result.dtype == np.float32


@pytest.mark.parametrize("floor", [1e-9, 1e-3])
def test_the_floor_is_a_parameter(floor):
    sources, fisher = problem(1)
    result = merged(sources, [1.0, 1.0, 3.0], fisher, fisher_floor=floor)
    expected = reference(sources, [1.0, 1.0, 3.0], fisher, floor)
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["constant", "shared array"])
def test_equal_fishers_give_the_linear_merge(kind):
    sources, fisher = problem(2, n=4)
    same = np.full(SHAPE, 0.37, np.float32) if kind == "constant" else fisher[0] + 1e-3
    weights = [1.0, 2.0, 3.0, 0.25]
    result = merged(sources, weights, np.stack([same] * 4))
    linear = jkarcher.merge(list(jnp.asarray(sources)), weights, method="linear")
    np.testing.assert_allclose(result, linear, rtol=1e-6, atol=1e-6)


def test_where_every_fisher_is_below_the_floor_it_is_the_weighted_average():
    sources, _ = problem(3)
    fisher = np.zeros_like(sources)
    fisher[1, :4] = 5.0  # model 1 alone has information in the first rows
    weights = np.array([1.0, 2.0, 1.0])
    result = merged(sources, weights, fisher)
    average = (weights[:, None, None] * sources).sum(0) / weights.sum()
    np.testing.assert_allclose(result[4:], average[4:], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(result[:4], sources[1, :4], rtol=1e-6, atol=1e-6)


def test_a_zero_weight_model_takes_no_part_and_weights_are_scale_free():
    sources, fisher = problem(4)
    without = merged(sources[:2], [1.0, 3.0], fisher[:2])
    with_zero = merged(sources, [1.0, 3.0, 0.0], fisher)
    scaled = merged(sources, [1e-3, 3e-3, 0.0], fisher)
    np.testing.assert_allclose(with_zero, without, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(scaled, without, rtol=1e-6, atol=1e-6)


def test_computes_in_float32_and_merge_rounds_once_to_the_sources_dtype():
    """The leaf's float32 result is within (N + 3) eps * max |x| of the float64 one (N products
    and sums, one division); `merge` rounds that once to bfloat16."""
    sources, fisher = problem(5)
    bf16 = sources.astype(ml_dtypes.bfloat16)
    weights = [1.0, 1.0, 1.0]
    result = merged(bf16, weights, fisher)
    assert result.dtype == np.float32
    expected = reference(bf16.astype(np.float64), weights, fisher)
    bound = (len(weights) + 3) * np.finfo(np.float32).eps * np.abs(sources).max()
    np.testing.assert_allclose(result, expected, rtol=0, atol=bound)
    via_merge = jkarcher.merge(
        [{"x": s} for s in bf16],
        weights,
        method="fisher_merging",
        fisher=[{"x": f} for f in fisher],
    )["x"]
    assert via_merge.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(via_merge, result.astype(ml_dtypes.bfloat16))


def test_registered_with_a_required_fisher_input():
    spec = methods.get("fisher_merging")
    assert spec.tensor_inputs == ("fisher",) and spec.tensor_inputs_required
    assert spec.base == methods.BASE_NONE and spec.param("fisher_floor").default == FLOOR


# Through jkarcher.merge on pytrees.


def pytrees(seed, n=3):
    rng = np.random.default_rng(seed)
    models_, fishers = [], []
    for _ in range(n):
        models_.append({"w": rng.standard_normal((6, 5)), "b": rng.standard_normal(5)})
        fishers.append({"w": rng.uniform(0, 2, (6, 5)), "b": rng.uniform(0, 2, 5)})
    as_jax = lambda tree: {k: jnp.asarray(v, jnp.float32) for k, v in tree.items()}
    return [as_jax(m) for m in models_], [as_jax(f) for f in fishers]


def test_merge_takes_one_fisher_pytree_per_model():
    models_, fishers = pytrees(6)
    weights = [0.5, 1.0, 2.0]
    result = jkarcher.merge(models_, weights, method="fisher_merging", fisher=fishers)
    for name in ("w", "b"):
        expected = reference([m[name] for m in models_], weights, [f[name] for f in fishers])
        np.testing.assert_allclose(result[name], expected, rtol=1e-6, atol=1e-6)


def test_merge_without_fishers_or_with_bad_ones_says_what_is_wrong():
    models_, fishers = pytrees(7)
    with pytest.raises(MergeError, match=r"'fisher_merging' needs fisher=\[one pytree per model\]"):
        jkarcher.merge(models_, method="fisher_merging")
    with pytest.raises(MergeError, match="fisher has 2 pytrees for 3 models"):
        jkarcher.merge(models_, method="fisher_merging", fisher=fishers[:2])
    fishers[1]["b"] = fishers[1]["b"].at[0].set(jnp.nan)
    with pytest.raises(MergeError, match="leaf 'b': fisher of model 1 holds NaN"):
        jkarcher.merge(models_, method="fisher_merging", fisher=fishers)


def test_a_base_model_and_a_non_positive_floor_are_refused():
    models_, fishers = pytrees(8)
    with pytest.raises(methods.MethodError, match="'fisher_merging' takes no base model"):
        jkarcher.merge(models_, method="fisher_merging", base=models_[0], fisher=fishers)
    with pytest.raises(methods.MethodError, match="'fisher_floor'=0.*must be a number > 0"):
        jkarcher.merge(models_, method="fisher_merging", fisher=fishers, fisher_floor=0)
