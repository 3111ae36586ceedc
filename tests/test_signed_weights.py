"""Negative weights, where mergekit takes them: task negation with task arithmetic and its
variants, signed blends with linear, nuslerp and multislerp, each against a float64 NumPy
reference and mergekit's own functions; the Karcher mean refuses them and says why, and a method
that divides by the weights' sum refuses a sum of 0, before anything is merged.

The comparisons with mergekit run where it is installed, and always in CI.
"""

import os

import jax
import ml_dtypes
import numpy as np
import pytest

import jkarcher
from jkarcher import methods
from jkarcher.config import ConfigError, validate
from jkarcher.errors import MergeError
from jkarcher.numerics import NegativeWeightError, check_weights

SHAPE = (48, 32)
EPS32 = float(np.finfo(np.float32).eps)
SIGNED = {
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "nuslerp",
    "multislerp",
}


def _models(n, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(SHAPE)
    models = [base + 0.3 * rng.standard_normal(SHAPE) for _ in range(n)]
    stored = ml_dtypes.bfloat16 if dtype == "bf16" else np.float32
    return base.astype(stored).astype(np.float32), [
        m.astype(stored).astype(np.float32) for m in models
    ]


def _tree(x):
    return {"w": x}


def _ours(method, models, weights, base=None, **params):
    merged = jkarcher.merge(
        [_tree(m) for m in models],
        weights,
        method=method,
        base=None if base is None else _tree(base),
        **params,
    )
    return np.asarray(merged["w"], np.float64)


def _tolerance(reference, terms):
    """float32 rounding of a sum of `terms` products of this magnitude, times a small factor."""
    return 4 * terms * EPS32 * float(np.max(np.abs(reference))) + 1e-30


def test_the_signed_methods_are_the_ones_mergekit_blends_with_any_sign():
    assert {name for name in methods.names() if methods.get(name).signed_weights} == SIGNED


@pytest.mark.parametrize("dtype", [np.float32, "bf16"])
def test_task_negation_subtracts_the_task_vector(dtype):
    """Weight -1 on one model: base - (x - base) (Ilharco et al. 2023, task negation)."""
    base, (model,) = _models(1, dtype=dtype)
    got = _ours("task_arithmetic", [model], [-1.0], base=base)
    want = base.astype(np.float64) - (model.astype(np.float64) - base)
    np.testing.assert_allclose(got, want, rtol=0, atol=_tolerance(want, 3))


@pytest.mark.parametrize("normalize", [True, False])
def test_signed_linear_equals_the_float64_blend(normalize):
    _, models = _models(3, seed=1)
    weights = [1.0, -0.5, 0.75]
    got = _ours("linear", models, weights, normalize=normalize)
    want = sum(w * m.astype(np.float64) for w, m in zip(weights, models, strict=True))
    if normalize:
        want = want / sum(weights)
    np.testing.assert_allclose(got, want, rtol=0, atol=_tolerance(want, 2 * len(models)))


def test_a_zero_sum_is_refused_where_the_merge_divides_by_it():
    _, models = _models(2, seed=2)
    with pytest.raises(MergeError, match=r"sum to 0 .* the merge divides by their sum"):
        _ours("linear", models, [1.0, -1.0])
    with pytest.raises(MergeError, match="sum to 0"):
        _ours("multislerp", models, [0.5, -0.5])
    difference = _ours("linear", models, [1.0, -1.0], normalize=False)
    np.testing.assert_allclose(difference, models[0].astype(np.float64) - models[1], atol=1e-6)
    # nuslerp and task arithmetic guard a zero sum as mergekit does: t = 1/2, a divisor of 1.
    assert np.all(np.isfinite(_ours("nuslerp", models, [1.0, -1.0])))
    base, models = _models(2, seed=3)
    got = _ours("task_arithmetic", models, [1.0, -1.0], base=base, normalize=True)
    want = base.astype(np.float64) + (models[0].astype(np.float64) - models[1])
    np.testing.assert_allclose(got, want, rtol=0, atol=_tolerance(want, 4))


def test_the_zero_sum_threshold_is_relative_to_the_weights():
    check_weights([0.3, -0.1, -0.2], 3, signed=True, nonzero_sum=False)  # no division: fine
    with pytest.raises(MergeError, match="sum to 0"):
        check_weights([0.3, -0.1, -0.2], 3, signed=True)  # 0 to within ZERO_SUM of 0.6
    check_weights([1e-6, 1e-6], 2, signed=True)  # small weights that do not cancel are fine


def test_the_karcher_mean_refuses_negative_weights_and_says_why():
    _, models = _models(2, seed=4)
    with pytest.raises(NegativeWeightError, match=r"model 1 is -0.5.* for method 'karcher', sin"):
        _ours("karcher", models, [1.0, -0.5])
    with pytest.raises(ConfigError, match=r"models\[1\].weight: method 'karcher' takes weights"):
        validate({"method": "karcher", "models": [{"path": "a"}, {"path": "b", "weight": -0.5}]})
    rules = {"path": "b", "weight": [{"filter": "mlp", "value": -1}, {"value": 1}]}
    with pytest.raises(ConfigError, match=r"models\[1\].weight\[0\].value: method 'karcher'"):
        validate({"method": "karcher", "models": [{"path": "a"}, rules]})


def test_a_config_takes_signed_weights_for_signed_methods():
    config = validate(
        {
            "method": "task_arithmetic",
            "models": [{"path": "a"}, {"path": "b", "weight": -0.5}],
            "base_model": "base",
            "output": "out",
        }
    )
    assert config.weights == (1.0, -0.5)


def test_signed_weights_work_inside_a_users_jit():
    base, models = _models(2, seed=5)
    merged = jax.jit(
        lambda trees, weights, base: jkarcher.merge(
            trees, weights, method="task_arithmetic", base=base
        )
    )([_tree(m) for m in models], np.array([1.0, -1.0], np.float32), _tree(base))
    want = base.astype(np.float64) + (models[0].astype(np.float64) - models[1])
    np.testing.assert_allclose(merged["w"], want, rtol=0, atol=_tolerance(want, 4))


# Against mergekit's own functions.

try:
    import torch
    from mergekit.merge_methods.api import merge_tensors
except ImportError:
    merge_tensors = None


@pytest.fixture(scope="module")
def mergekit():
    if merge_tensors is None:
        if os.environ.get("CI") == "true":
            pytest.fail("mergekit must be installed in CI (pip install -e '.[test]')")
        pytest.skip("mergekit is not installed (pip install -e '.[test]')")


CASES = [
    ("linear", [1.0, -0.5, 0.75], False, {}),
    ("linear", [1.0, -0.5, 0.75], False, {"normalize": False}),
    ("task_arithmetic", [1.0, -1.0, 0.5], True, {}),
    ("ties", [0.8, -0.6, 0.5], True, {"density": 1.0}),
    ("breadcrumbs", [1.0, -0.7, 0.4], True, {"density": 0.9, "gamma": 0.01}),
    ("nuslerp", [1.0, -1.0], False, {}),
    ("nuslerp", [1.0, -0.4], True, {}),
    ("multislerp", [1.0, -0.3, 0.6], True, {}),
]


# bf16 values tie at breadcrumbs' magnitude cuts, which each library breaks in its own order.
BY_DTYPE = [(np.float32, *case) for case in CASES] + [
    ("bf16", *case) for case in CASES if case[0] != "breadcrumbs"
]


@pytest.mark.parametrize(("dtype", "method", "weights", "with_base", "params"), BY_DTYPE)
def test_signed_weights_equal_mergekits(mergekit, dtype, method, weights, with_base, params):
    base, models = _models(len(weights), seed=6, dtype=dtype)
    tensors = [torch.from_numpy(m) for m in models]
    base_index = None
    if with_base:
        tensors.insert(0, torch.from_numpy(base))
        base_index = 0
    parameters = {"weight": [float(w) for w in weights], **params}
    theirs = merge_tensors(tensors, method, parameters=parameters, base_index=base_index)
    ours = _ours(method, models, weights, base=base if with_base else None, **params)
    theirs = theirs.numpy().astype(np.float64)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=_tolerance(theirs, 4 * len(weights)))
