"""The merge methods' registry, their parameter errors, and properties each method must have.

Agreement with mergekit's implementations is in test_methods_parity.py; here are the facts that
hold whatever another implementation does: exact order statistics, counts of kept entries,
norms that rescaling keeps, hand-worked merges, dtypes, reproducible randomness.
"""

import functools
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jkarcher
from jkarcher import MergeError, methods
from jkarcher.methods import selection, sparsify, task_arithmetic
from jkarcher.methods.table import methods_table_markdown
from jkarcher.numerics import (
    CHUNK,
    COMPILER_OPTIONS,
    accurate_sum,
    add_chunk_sums,
    compute_dtype,
)

ROOT = Path(__file__).resolve().parents[1]
ISSUE_METHODS = {
    "linear",
    "slerp",
    "nuslerp",
    "multislerp",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "sce",
    "model_stock",
    "arcee_fusion",
    "nearswap",
    "passthrough",
    "karcher",
}
RANDOM_METHODS = {"dare_linear", "dare_ties", "della", "della_linear"}
# Parameters without defaults, and model counts, that a valid call of each method needs.
REQUIRED_PARAMS = {"slerp": {"t": 0.4}, "nearswap": {"t": 0.1}}
MODEL_COUNTS = {"slerp": 2, "nuslerp": 2, "arcee_fusion": 1, "nearswap": 1, "passthrough": 1}


def _merge(method, models, weights=None, base=None, key=None, **params):
    if methods.get(method).random and key is None:
        key = jax.random.key(0)
    merged = jkarcher.merge(
        [jnp.asarray(m) for m in models],
        weights,
        method=method,
        base=None if base is None else jnp.asarray(base),
        key=key,
        **params,
    )
    return np.asarray(merged)


def _sources(method, shape=(6, 10), dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    n = MODEL_COUNTS.get(method, 3)
    models = rng.standard_normal((n, *shape)).astype(dtype)
    spec = methods.get(method)
    base = rng.standard_normal(shape).astype(dtype) if spec.base == methods.BASE_REQUIRED else None
    return models, base


# The registry.


def test_every_method_of_the_issue_is_registered_with_its_declarations():
    assert ISSUE_METHODS <= set(methods.names())
    for name in methods.names():
        spec = methods.get(name)
        assert spec.leaf.__doc__ and spec.summary and spec.citation, name
        assert spec.random == (name in RANDOM_METHODS), name


def test_base_requirements_follow_mergekit():
    required = {n for n in methods.names() if methods.get(n).base == methods.BASE_REQUIRED}
    optional = {n for n in methods.names() if methods.get(n).base == methods.BASE_OPTIONAL}
    assert required == {
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "della",
        "della_linear",
        "breadcrumbs",
        "breadcrumbs_ties",
        "sce",
        "model_stock",
        "arcee_fusion",
        "ram",
        "ramplus_tl",
        "nearswap",
        "tsv",
        "iso_c",
        "iso_cts",
    }
    assert optional == {"nuslerp", "multislerp", "karcher"}


def test_methods_table_lists_every_method_with_its_parameters():
    table = methods_table_markdown()
    rows = table.splitlines()[2:]
    assert len(rows) == len(methods.names())
    for name, row in zip(methods.names(), rows, strict=True):
        assert row.startswith(f"| `{name}`")
        for p in methods.get(name).params:
            assert f"`{p.name}`=" in row
    assert "`t`=required" in table and "`density`=1.0 (per model)" in table


def test_methods_table_script_prints_the_table():
    result = subprocess.run(
        [sys.executable, "scripts/methods_table.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == methods_table_markdown()


# Bad parameters: errors name the method and the parameter.


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs", "della_linear"])
@pytest.mark.parametrize("density", [0, -0.1, 1.5, "0.5", True])
def test_density_outside_the_unit_interval_is_refused(method, density):
    models, base = _sources(method)
    with pytest.raises(methods.MethodError, match=rf"'{method}'.*'density'.*\(0, 1\]"):
        _merge(method, models, base=base, density=density)


def test_a_per_model_density_needs_one_value_per_model():
    models, base = _sources("ties")
    with pytest.raises(methods.MethodError, match=r"'ties'.*'density'.*2 values given for 3"):
        _merge("ties", models, base=base, density=[0.5, 0.5])
    with pytest.raises(methods.MethodError, match=r"'ties'.*'density'=0"):
        _merge("ties", models, base=base, density=[0.5, 0, 0.5])


def test_a_shared_parameter_takes_one_value():
    models, base = _sources("ties")
    with pytest.raises(methods.MethodError, match=r"'ties'.*'lambda'.*one value"):
        _merge("ties", models, base=base, **{"lambda": [1.0, 2.0, 3.0]})


@pytest.mark.parametrize("n", [1, 3])
def test_slerp_needs_exactly_two_models(n):
    models = np.ones((n, 4), np.float32)
    with pytest.raises(methods.MethodError, match=f"'slerp' merges exactly 2 models, got {n}"):
        _merge("slerp", models, t=0.5)


@pytest.mark.parametrize("method", ["slerp", "nearswap"])
def test_a_parameter_without_default_must_be_given(method):
    models, base = _sources(method)
    with pytest.raises(methods.MethodError, match=rf"'{method}' needs parameter 't'"):
        _merge(method, models, base=base)


@pytest.mark.parametrize(
    "method", sorted(n for n in ISSUE_METHODS if methods.get(n).base == methods.BASE_REQUIRED)
)
def test_a_base_requiring_method_without_a_base_is_refused(method):
    models, _ = _sources(method)
    with pytest.raises(methods.MethodError, match=rf"'{method}' needs a base model"):
        _merge(method, models, **REQUIRED_PARAMS.get(method, {}))


@pytest.mark.parametrize("method", ["slerp", "passthrough", "linear"])
def test_a_method_without_a_base_refuses_one(method):
    models, _ = _sources(method)
    with pytest.raises(methods.MethodError, match=rf"'{method}' takes no base model"):
        _merge(method, models, base=models[0], **REQUIRED_PARAMS.get(method, {}))


def test_unknown_methods_and_parameters_are_named():
    models, base = _sources("ties")
    with pytest.raises(methods.MethodError, match=r"unknown merge method 'tie'.*ties"):
        _merge("tie", models, base=base)
    with pytest.raises(methods.MethodError, match=r"'ties' has no parameter 'densty'.*density"):
        _merge("ties", models, base=base, densty=0.5)
    with pytest.raises(methods.MethodError, match=r"'task_arithmetic' has no parameter 'density'"):
        _merge("task_arithmetic", models, base=base, density=0.5)


@pytest.mark.parametrize(
    "density,epsilon", [(0.5, 0.5), (0.9, 0.15), (0.1, 0.1), ([0.5, 0.95, 0.5], 0.1)]
)
def test_della_needs_density_plus_minus_epsilon_inside_the_unit_interval(density, epsilon):
    models, base = _sources("della")
    with pytest.raises(methods.MethodError, match=r"'della'.*'density'.*'epsilon'"):
        _merge("della", models, base=base, density=density, epsilon=epsilon)


@pytest.mark.parametrize(
    "method,params,named",
    [
        ("sce", {"select_topk": 0.0}, "select_topk"),
        ("breadcrumbs", {"gamma": 1.5}, "gamma"),
        ("nearswap", {"t": -1.0}, "t"),
        ("passthrough", {"scale": "half"}, "scale"),
        ("ties", {"normalize": "yes"}, "normalize"),
        ("slerp", {"t": float("nan")}, "t"),
        ("multislerp", {"eps": 0.0}, "eps"),
    ],
)
def test_bad_values_name_the_method_and_parameter(method, params, named):
    models, base = _sources(method)
    with pytest.raises(methods.MethodError, match=rf"'{method}'.*'{named}'"):
        _merge(method, models, base=base, **params)


@pytest.mark.parametrize("method", ["arcee_fusion", "nearswap", "passthrough"])
def test_single_model_methods_refuse_two(method):
    models, base = _sources(method)
    models = np.concatenate([models, models])
    with pytest.raises(methods.MethodError, match=rf"'{method}' merges exactly 1 model, got 2"):
        _merge(method, models, base=base, **REQUIRED_PARAMS.get(method, {}))


@pytest.mark.parametrize("method", sorted(RANDOM_METHODS))
def test_random_methods_need_a_key(method):
    models, base = _sources(method)
    with pytest.raises(MergeError, match=rf"'{method}' is random"):
        jkarcher.merge(list(models), method=method, base=base)


# Every method: shape and dtype kept, float32 compute for bfloat16 storage.


# Each case compiles the method twice; a plain run checks one method of each family.
_DTYPE_CHECKED_BY_DEFAULT = {"karcher", "slerp", "ties", "della", "sce", "model_stock"}


@pytest.mark.parametrize(
    "method",
    [
        pytest.param(m, marks=() if m in _DTYPE_CHECKED_BY_DEFAULT else pytest.mark.slow)
        for m in sorted(ISSUE_METHODS)
    ],
)
def test_every_method_keeps_shape_and_bfloat16_dtype(method):
    models, base = _sources(method, dtype=ml_dtypes.bfloat16)
    params = dict(REQUIRED_PARAMS.get(method, {}))
    if method in {"ties", "dare_ties", "della", "breadcrumbs"}:
        params["density"] = 0.5
    merged = _merge(method, models, base=base, **params)
    assert merged.dtype == ml_dtypes.bfloat16 and merged.shape == models.shape[1:]
    as_float32 = _merge(
        method,
        models.astype(np.float32),
        base=None if base is None else base.astype(np.float32),
        **params,
    )
    np.testing.assert_array_equal(merged, as_float32.astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("x64", [False, True])
def test_every_leaf_returns_the_compute_dtype(x64):
    """Leaves compute in float32 (float64 under x64) and return that, whatever the sources'
    dtype: the caller rounds once, to the output dtype. Traced only, nothing is compiled."""
    with jax.enable_x64(x64):
        for name in methods.names():
            spec = methods.get(name)
            n = MODEL_COUNTS.get(name, 3)
            stacked = jnp.ones((n, 6, 10), jnp.bfloat16)
            base = stacked[0] if spec.base == methods.BASE_REQUIRED else None
            params = spec.resolve(REQUIRED_PARAMS.get(name, {}), n, base is not None)
            inputs = {
                input_name: jnp.ones((n, *spec.tensor_input_shape(input_name, (6, 10))))
                for input_name in spec.tensor_inputs
            }
            leaf = functools.partial(spec.leaf, key=jax.random.key(0), **params, **inputs)
            merged = jax.eval_shape(leaf, stacked, jnp.ones(n), base)
            assert merged.dtype == compute_dtype() and merged.shape == (6, 10), name


# Order statistics.


@pytest.mark.parametrize("size", [1, 1000, 200_003])  # sorted, and radix-selected beyond 2^17
def test_order_statistics_equal_a_sort(size):
    rng = np.random.default_rng(size)
    values = rng.standard_normal(size).astype(np.float32)
    values[: size // 4] = values[size // 2 : size // 2 + size // 4]  # duplicates
    ordered = np.sort(values)
    select = jax.jit(selection.order_statistic)
    for rank in {0, size // 3, size // 2, size - 1}:
        assert select(values, rank) == ordered[rank]


def test_order_statistics_of_negative_zero_and_extremes():
    values = np.array([0.0, -0.0, -np.inf, np.inf, -1e-38, 1e-38, -3.0, 2.0], np.float32)
    ordered = np.sort(values)
    select = jax.jit(selection.order_statistic)
    for rank in range(values.size):
        assert select(values, rank) == ordered[rank]


@pytest.mark.parametrize("size", [5000, 150_000])
def test_largest_and_position_range_masks_select_the_sorted_slices(size):
    values = np.random.default_rng(0).permutation(size).astype(np.float32) - size // 2
    decreasing = np.argsort(-values)
    largest = jax.jit(selection.largest_mask)(values, 1234)
    assert set(np.flatnonzero(largest)) == set(decreasing[:1234])
    middle = jax.jit(selection.position_range_mask, static_argnums=(1, 2))(values, 100, size - 900)
    assert set(np.flatnonzero(middle)) == set(decreasing[100 : size - 900])
    assert not np.asarray(selection.position_range_mask(jnp.asarray(values), 7, 7)).any()


def _tree_sum_bound(size: int) -> float:
    """The worst-case relative error of `accurate_sum` of `size` non-negative float32 values:
    gamma_k = k u / (1 - k u) for the k additions of its longest chain (15 within a block of 16,
    then one per pairwise level), u = 2^-24; a plain chain of `size` additions has k = size - 1."""
    additions = 15 + max(0, math.ceil(math.log2(max(1, math.ceil(size / 16)))))
    u = 2.0**-24
    return additions * u / (1 - additions * u)


@pytest.mark.parametrize("shape", [(5,), (64, 48), (300, 201)])
def test_accurate_sum_is_accurate_in_float32(shape):
    values = np.abs(np.random.default_rng(0).standard_normal(shape)).astype(np.float32)
    exact = values.astype(np.float64).sum()
    got = float(jax.jit(accurate_sum)(values))
    assert abs(got - exact) <= _tree_sum_bound(values.size) * exact


def test_accurate_sum_along_the_last_axis_sums_each_row_accurately():
    values = np.abs(np.random.default_rng(1).standard_normal((3, 4099))).astype(np.float32)
    exact = values.astype(np.float64).sum(axis=-1)
    sums = jax.jit(lambda v: accurate_sum(v, axis=-1))(values)
    assert sums.shape == (3,)
    np.testing.assert_array_less(np.abs(np.asarray(sums) - exact), _tree_sum_bound(4099) * exact)


def test_accurate_sum_in_groups_of_chunks_sums_each_row_accurately():
    """The Karcher solvers' use: partial sums of chunks, added in groups of CHUNK."""
    values = np.abs(np.random.default_rng(2).standard_normal((2, 5000))).astype(np.float32)
    exact = values.astype(np.float64).sum(axis=-1)
    sums = jax.jit(add_chunk_sums)(values)
    additions = (CHUNK - 1) + (math.ceil(5000 / CHUNK) - 1)  # within a group, then the groups
    bound = additions * 2.0**-24 / (1 - additions * 2.0**-24)
    np.testing.assert_array_less(np.abs(np.asarray(sums) - exact), bound * exact)


# Sparsification.


@pytest.mark.parametrize("density", [0.01, 0.29, 0.5, 0.999])
def test_magnitude_mask_keeps_the_largest_floor_density_entries(density):
    rng = np.random.default_rng(1)
    delta = (rng.permutation(1000) + 1.0) * rng.choice([-1.0, 1.0], 1000)
    delta = delta.astype(np.float32)
    keep = np.asarray(sparsify.magnitude_mask(jnp.asarray(delta), density))
    k = max(1, int(density * delta.size))
    assert keep.sum() == k
    assert set(np.flatnonzero(keep)) == set(np.argsort(np.abs(delta))[-k:])


def test_outlier_mask_drops_the_largest_gamma_and_the_smallest():
    delta = np.random.default_rng(2).permutation(1000).astype(np.float32) + 1
    order = np.argsort(delta)
    keep = np.asarray(sparsify.outlier_mask(jnp.asarray(delta), 0.6, 0.1))
    assert set(np.flatnonzero(keep)) == set(order[300:900])
    # density + gamma > 1: only 50 outliers dropped, so that floor(density D) entries remain
    keep = np.asarray(sparsify.outlier_mask(jnp.asarray(delta), 0.95, 0.1))
    assert set(np.flatnonzero(keep)) == set(order[:950])


def test_rescaling_keeps_the_l1_norm_from_sums_over_any_blocks_of_rows():
    """The L1 rescale's chunk sums over blocks of rows concatenate into the whole tensor's bit
    for bit, and its factor keeps the L1 norm within the error of two float32 sums of positive
    terms, along chains of a chunk (40) and a tree over the 30 chunks: 2 (40 + log2 30) u."""
    rng = np.random.default_rng(3)
    delta = jnp.asarray(rng.standard_normal((30, 40)).astype(np.float32))
    keep = jnp.asarray(rng.random((30, 40)) < 0.3)
    sums = jax.jit(sparsify.l1_chunk_sums, compiler_options=COMPILER_OPTIONS)
    whole = sums(delta, keep)
    blocks = [sums(delta[a:b], keep[a:b]) for a, b in ((0, 7), (7, 8), (8, 30))]
    np.testing.assert_array_equal(np.concatenate(blocks, axis=-1), whole)
    factor = float(sparsify.l1_rescale(whole))
    rescaled = np.where(keep, np.asarray(delta, np.float64), 0.0) * factor
    assert not rescaled[~np.asarray(keep)].any()
    l1 = np.abs(np.asarray(delta, np.float64)).sum()
    assert abs(np.abs(rescaled).sum() - l1) <= 2 * (40 + np.log2(30)) * 2.0**-24 * l1


def test_della_probabilities_rise_with_magnitude_rank_around_density():
    delta = jnp.asarray(np.random.default_rng(4).standard_normal((5, 41)).astype(np.float32))
    probabilities = jax.jit(sparsify.della_keep_probabilities, static_argnums=(1, 2))
    p = np.asarray(probabilities(delta, 0.4, 0.1))
    np.testing.assert_allclose(p.min(axis=1), 0.3, atol=1e-7)
    np.testing.assert_allclose(p.max(axis=1), 0.5, atol=1e-7)
    np.testing.assert_allclose(p.mean(axis=1), 0.4, atol=1e-6)
    for row, probs in zip(np.abs(np.asarray(delta)), p, strict=True):
        assert np.all(np.diff(probs[np.argsort(row)]) > 0)


def test_random_masks_are_reproducible_from_the_key_and_keep_density_on_average():
    stacked = jnp.ones((3, 200, 100), jnp.float32)
    deltas = list(stacked)
    first = task_arithmetic.keep_masks("random", jax.random.key(1), deltas, density=0.3)
    again = task_arithmetic.keep_masks("random", jax.random.key(1), deltas, density=0.3)
    other = task_arithmetic.keep_masks("random", jax.random.key(2), deltas, density=0.3)
    np.testing.assert_array_equal(first, again)
    assert np.any(np.asarray(first) != np.asarray(other))
    kept = np.asarray(first).reshape(3, -1).sum(axis=1)
    sigma = np.sqrt(20_000 * 0.3 * 0.7)
    assert np.all(np.abs(kept - 6000) <= 5 * sigma)
    assert np.any(np.asarray(first[0]) != np.asarray(first[1]))  # one key per model


def test_merge_with_the_same_key_is_reproducible():
    models, base = _sources("dare_ties", shape=(20, 30))
    key = jax.random.key(7)
    first = _merge("dare_ties", models, base=base, key=key, density=0.3)
    np.testing.assert_array_equal(
        first, _merge("dare_ties", models, base=base, key=key, density=0.3)
    )
    other = _merge("dare_ties", models, base=base, key=jax.random.key(8), density=0.3)
    assert np.any(first != other)


# Hand-worked merges and limiting cases.


def test_ties_elects_signs_and_averages_the_agreeing_entries():
    base = np.zeros(3, np.float32)
    models = np.array([[1.0, -2.0, 0.5], [2.0, 1.0, -1.0]], np.float32)
    # sums 3, -1, -0.5: signs +, -, -; entry 0 both agree, 1 and 2 one each
    np.testing.assert_allclose(_merge("ties", models, base=base), [1.5, -2.0, -1.0])
    np.testing.assert_allclose(
        _merge("ties", models, [1.0, 3.0], base=base), [7.0 / 4.0, 3.0 / 3.0, -3.0 / 3.0]
    )


def test_ties_trims_each_task_vector_before_electing():
    base = np.ones(4, np.float32)
    models = base + np.array([[4.0, -1.0, 0.5, 3.0], [-2.0, 1.0, 5.0, 0.1]], np.float32)
    # density 0.5 keeps the two largest magnitudes of each: [4, 0, 0, 3] and [-2, 0, 5, 0]
    expected = base + np.array([4.0, 0.0, 5.0, 3.0])
    np.testing.assert_allclose(_merge("ties", models, base=base, density=0.5), expected)


def test_task_arithmetic_is_the_scaled_weighted_sum_of_task_vectors():
    models, base = _sources("task_arithmetic")
    weights = np.array([0.5, 1.0, 2.0])
    deltas = models.astype(np.float64) - base
    expected = base + 0.7 * np.tensordot(weights, deltas, 1)
    merged = _merge("task_arithmetic", models, weights, base, **{"lambda": 0.7})
    np.testing.assert_allclose(merged, expected, rtol=1e-6, atol=1e-6)
    merged = _merge("task_arithmetic", models, weights, base, normalize=True)
    np.testing.assert_allclose(merged, base + np.tensordot(weights, deltas, 1) / 3.5, atol=1e-6)


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_dropping_nothing_is_task_arithmetic(method):
    models, base = _sources(method)
    weights = np.array([0.5, 1.0, 2.0])
    dropped = _merge(method, models, weights, base, density=1.0)
    summed = _merge("task_arithmetic", models, weights, base)
    # Nothing is dropped, so the rescale factor |delta|_1 / |kept|_1 is 1 up to the rounding of
    # two float32 sums of the same n entries, which compile separately and may add them in
    # different orders (each within (log2(n) + 1) eps), and the sum over models rounds once more.
    eps, n = np.finfo(np.float32).eps, base.size
    deltas = np.abs(weights[:, None, None] * (models.astype(np.float64) - base))
    bound = 2 * (np.log2(n) + 1) * eps * deltas.sum(axis=0) + 2 * eps * np.abs(summed)
    assert np.all(np.abs(dropped - summed) <= bound)


def test_slerp_ends_are_the_models_and_unit_vectors_stay_on_the_sphere():
    rng = np.random.default_rng(5)
    models = rng.standard_normal((2, 50)).astype(np.float32)
    np.testing.assert_allclose(_merge("slerp", models, t=0.0), models[0], atol=1e-6)
    np.testing.assert_allclose(_merge("slerp", models, t=1.0), models[1], atol=1e-6)
    units = models / np.linalg.norm(models, axis=1, keepdims=True)
    assert abs(np.linalg.norm(_merge("slerp", units, t=0.3)) - 1.0) <= 1e-6


def test_nuslerp_takes_t_from_the_weights():
    models = np.random.default_rng(6).standard_normal((2, 30)).astype(np.float32)
    np.testing.assert_allclose(
        _merge("nuslerp", models, [3.0, 1.0]), _merge("slerp", models, t=0.25), atol=1e-6
    )


def test_multislerp_is_the_mean_direction_at_the_mean_norm():
    rng = np.random.default_rng(7)
    models = rng.standard_normal((3, 40)) * np.array([[1.0], [2.0], [4.0]])
    weights = np.array([1.0, 2.0, 1.0])
    a = weights / weights.sum()
    norms = np.linalg.norm(models, axis=1)
    mean = a @ (models / norms[:, None])
    expected = (a @ norms) * mean / np.linalg.norm(mean)
    merged = _merge("multislerp", models.astype(np.float32), weights)
    np.testing.assert_allclose(merged, expected, atol=1e-6)
    permutation = [2, 0, 1]
    np.testing.assert_allclose(
        _merge("multislerp", models[permutation].astype(np.float32), weights[permutation]),
        merged,
        atol=1e-6,
    )


def test_model_stock_interpolates_by_the_offsets_angle():
    base = np.zeros(4, np.float32)
    orthogonal = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(_merge("model_stock", orthogonal, base=base), base)  # t = 0
    parallel = np.array([[1.0, 1.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(_merge("model_stock", parallel, base=base), parallel.mean(0))
    # cos = 1/2 between two offsets: t = 2 (1/2) / (1 + 1/2) = 2/3
    sixty = np.array([[1.0, 0.0, 0.0, 0.0], [0.5, np.sqrt(0.75), 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(
        _merge("model_stock", sixty, base=base), 2.0 / 3.0 * sixty.mean(0), atol=1e-7
    )


def test_nearswap_takes_the_model_where_it_is_near_the_base():
    base = np.zeros(3, np.float32)
    model = np.array([[0.05, 0.2, 1.0]], np.float32)
    # t = 0.1: weights min(1, 0.1 / |diff|) = 1, 0.5, 0.1
    np.testing.assert_allclose(_merge("nearswap", model, base=base, t=0.1), [0.05, 0.1, 0.1])
    np.testing.assert_array_equal(_merge("nearswap", model, base=base, t=0.0), base)


def test_passthrough_copies_or_scales_one_model():
    model = np.array([[1.5, -2.0]], np.float32)
    np.testing.assert_array_equal(_merge("passthrough", model), model[0])
    np.testing.assert_array_equal(_merge("passthrough", model, scale=2.0), [3.0, -4.0])


def test_sce_keeps_the_highest_variance_entries_and_ignores_weights():
    models, base = _sources("sce", shape=(20, 50))
    merged = _merge("sce", models, base=base, select_topk=0.2)
    assert np.count_nonzero(merged != base) == 200
    variance = (models.astype(np.float64) - base).var(axis=0)
    assert set(np.flatnonzero(merged != base)) == set(np.argsort(variance, axis=None)[-200:])
    np.testing.assert_array_equal(
        merged, _merge("sce", models, [5.0, 0.1, 1.0], base, select_topk=0.2)
    )


def test_arcee_fusion_takes_each_entry_from_the_model_or_the_base():
    models, base = _sources("arcee_fusion", shape=(8, 64))
    merged = _merge("arcee_fusion", models, base=base)
    from_base = merged == base
    assert np.allclose(merged[~from_base], models[0][~from_base], rtol=1e-6, atol=0)
    assert 0 < (~from_base).sum() < merged.size / 2
