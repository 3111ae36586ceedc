"""jkarcher.merge over pytrees: values, structure, dtypes, jit, and errors that name the leaf."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify
from karcher_reference import karcher_reference, relative_error

import jkarcher
from jkarcher import MergeError, methods


def _trees(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "embed": rng.standard_normal((40, 12)).astype(np.float32),
            "layers": [
                {
                    "w": rng.standard_normal((12, 12)).astype(np.float32),
                    "b": rng.standard_normal(12).astype(np.float32),
                },
                {"w": rng.standard_normal((12, 12)).astype(ml_dtypes.bfloat16)},
            ],
        }
        for _ in range(n)
    ]


def test_nested_dict_merge_is_the_karcher_mean_of_each_leaf():
    trees = _trees()
    weights = [1.0, 2.0, 0.5]
    merged = jkarcher.merge(trees, weights)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(trees[0])
    for path in [("embed",), ("layers", 0, "w"), ("layers", 0, "b")]:
        sources = [_get(t, path) for t in trees]
        assert relative_error(_get(merged, path), karcher_reference(sources, weights)) <= 1e-6


def test_leaf_dtypes_are_kept():
    merged = jkarcher.merge(_trees(), None)
    assert merged["layers"][1]["w"].dtype == jnp.bfloat16
    assert merged["embed"].dtype == jnp.float32


def test_linear_is_the_weighted_average():
    trees = _trees()
    merged = jkarcher.merge(trees, [1.0, 3.0, 0.0], method="linear")
    expected = (trees[0]["embed"] + 3.0 * trees[1]["embed"]) / 4.0
    np.testing.assert_allclose(merged["embed"], expected, rtol=1e-6, atol=1e-6)


def test_karcher_with_a_base_merges_task_vectors():
    trees = _trees(4)
    base, experts = trees[0], trees[1:]
    merged = jkarcher.merge(experts, [1.0, 1.0, 2.0], base=base)
    deltas = [e["embed"].astype(np.float64) - base["embed"] for e in experts]
    expected = base["embed"] + karcher_reference(deltas, [1.0, 1.0, 2.0])
    assert relative_error(merged["embed"], expected) <= 1e-6


def test_params_reach_the_leaf_function():
    trees = _trees()
    rows = jkarcher.merge(trees, None, block="row")
    expected = karcher_reference([t["embed"][5] for t in trees])
    assert relative_error(rows["embed"][5], expected) <= 1e-6


def test_flax_nnx_model_state_merges_and_loads_back():
    models = [nnx.Linear(6, 4, rngs=nnx.Rngs(seed)) for seed in range(3)]
    states = [nnx.state(m, nnx.Param) for m in models]
    merged = jkarcher.merge(states, [1.0, 1.0, 2.0])
    target = nnx.Linear(6, 4, rngs=nnx.Rngs(9))
    nnx.update(target, merged)
    kernels = [np.asarray(m.kernel[...]) for m in models]
    expected = karcher_reference(kernels, [1.0, 1.0, 2.0])
    assert relative_error(target.kernel[...], expected) <= 1e-6


def test_merge_inside_a_users_jit_equals_eager():
    trees = _trees()
    eager = jkarcher.merge(trees, [1.0, 2.0, 3.0])
    jitted = jax.jit(lambda ts, w: jkarcher.merge(ts, w))(trees, jnp.asarray([1.0, 2.0, 3.0]))
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        assert relative_error(b, a) <= 1e-6


def test_integer_leaves_are_copied_when_all_models_agree():
    trees = [{"w": np.ones((2, 2), np.float32) * (i + 1), "step": np.int32(7)} for i in range(2)]
    assert int(jkarcher.merge(trees)["step"]) == 7
    trees[1]["step"] = np.int32(8)
    with pytest.raises(MergeError, match="'step'.*model 1 differs"):
        jkarcher.merge(trees)


def test_random_method_requires_a_key():
    random_methods = [name for name in methods.names() if methods.get(name).random]
    for name in random_methods:
        spec = methods.get(name)
        with pytest.raises(MergeError, match="key"):
            jkarcher.merge(
                _trees(),
                None,
                method=name,
                base=_trees(1)[0] if spec.base != methods.BASE_NONE else None,
            )


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda ts: ts[1]["layers"].pop(), "model 1 has a different structure.*lacks leaf"),
        (lambda ts: ts[2].update(extra=np.ones(3)), "model 2 .*extra leaf 'extra'"),
        (
            lambda ts: ts[1].update(embed=np.ones((40, 13), np.float32)),
            "leaf 'embed': model 1 has shape \\(40, 13\\)",
        ),
        (
            lambda ts: ts[2]["layers"][0].update(b=np.ones(12, np.float16)),
            "leaf 'layers/0/b': model 2 has dtype float16",
        ),
        (
            lambda ts: ts[1]["layers"][0]["w"].__setitem__((3, 4), np.nan),
            "leaf 'layers/0/w': model 1 holds NaN or Inf",
        ),
        (
            lambda ts: ts[2]["embed"].__setitem__((0, 0), np.inf),
            "leaf 'embed': model 2 holds NaN or Inf",
        ),
    ],
)
def test_bad_inputs_name_the_leaf_and_model(mutate, pattern):
    trees = _trees()
    mutate(trees)
    with pytest.raises(MergeError, match=pattern):
        jkarcher.merge(trees, None)


@pytest.mark.parametrize(
    ("weights", "pattern"),
    [
        ([1.0, -1.0, 1.0], "weight of model 1 is -1.0"),
        ([0.0, 0.0, 0.0], "sum to zero"),
        ([1.0, 2.0], "got 2 weights for 3 models"),
        ([1.0, float("nan"), 1.0], "weight of model 1 is nan"),
        ([1e39, 1.0, 1.0], "weight of model 0 is 1e\\+39, beyond the float32 range"),
        ([2e38, 2e38, 1.0], "the weights sum to 4e\\+38, beyond the float32 range"),
        (["a", "b", "c"], "weights must be numbers, got \\['a', 'b', 'c'\\]"),
        ("abc", "weights must be numbers, got 'abc'"),
    ],
)
def test_bad_weights_are_errors(weights, pattern):
    with pytest.raises(MergeError, match=pattern):
        jkarcher.merge(_trees(), weights)


def test_unknown_method_and_parameter_are_errors():
    with pytest.raises(methods.MethodError, match="unknown merge method 'karcherr'.*karcher"):
        jkarcher.merge(_trees(), None, method="karcherr")
    with pytest.raises(methods.MethodError, match="'karcher' has no parameter 'iters'"):
        jkarcher.merge(_trees(), None, iters=3)
    with pytest.raises(methods.MethodError, match="'karcher', parameter 'block'='column'"):
        jkarcher.merge(_trees(), None, block="column")


def test_base_with_another_structure_is_an_error():
    trees = _trees()
    base = {"embed": trees[0]["embed"]}
    with pytest.raises(MergeError, match="base model has a different structure"):
        jkarcher.merge(trees, None, base=base)


def test_no_models_is_an_error():
    with pytest.raises(MergeError, match="at least one model"):
        jkarcher.merge([], None)


def test_registry_lists_karcher_and_linear():
    assert {"karcher", "linear"} <= set(methods.names())
    assert methods.get("karcher").base == methods.BASE_OPTIONAL


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def test_every_error_is_a_jkarcher_error():
    for error in (MergeError, methods.MethodError):
        assert issubclass(error, jkarcher.JkarcherError)


def test_python_numbers_as_leaves_are_0d_arrays_and_other_leaves_are_errors():
    trees = [{"w": np.full(3, 1.0, np.float32), "scale": 2.0, "count": 7}, None]
    trees[1] = {"w": np.full(3, 3.0, np.float32), "scale": 4.0, "count": 7}
    merged = jkarcher.merge(trees, method="linear")
    assert merged["scale"].shape == () and float(merged["scale"]) == 3.0
    assert merged["scale"].dtype == np.float32 and int(merged["count"]) == 7
    with pytest.raises(MergeError, match="leaf 'name' of model 0 is a str, not an array"):
        jkarcher.merge([{"name": "a"}, {"name": "b"}])


def test_a_result_that_is_not_finite_names_the_leaf_and_method():
    trees = [{"w": np.full(4, 3e38, np.float32)}, {"w": np.full(4, 3e38, np.float32)}]
    with pytest.raises(
        MergeError, match=r"leaf 'w': method linear \(normalize=False; weights 1, 1\) gives NaN"
    ):
        jkarcher.merge(trees, method="linear", normalize=False)


def test_inside_a_users_jit_value_checks_run_through_checkify():
    trees = _trees()
    poisoned = _trees()
    poisoned[1]["embed"][2, 3] = np.nan

    def merged(trees, weights):
        return jkarcher.merge(trees, weights, method="linear")

    checked = checkify.checkify(jax.jit(merged))
    error, _ = checked(trees, jnp.ones(3))
    assert error.get() is None
    error, _ = checked(poisoned, jnp.ones(3))
    assert "leaf 'embed': model 1 holds NaN or Inf values" in error.get()
    # linear takes signed weights, and divides by their sum.
    error, _ = checked(trees, jnp.array([1.0, -1.0, 1.0]))
    assert error.get() is None
    error, _ = checked(trees, jnp.array([1.0, -1.0, 0.0]))
    assert "weights must be finite and not sum to 0" in error.get()
    # model_stock's weights must be >= 0.
    unsigned = checkify.checkify(
        jax.jit(
            lambda trees, weights: jkarcher.merge(
                trees, weights, method="model_stock", base=trees[0]
            )
        )
    )
    error, _ = unsigned(trees, jnp.array([1.0, -1.0, 1.0]))
    assert "weights must be finite, >= 0 and not all zero" in error.get()
    error, _ = unsigned(trees, jnp.zeros(3))
    assert "not all zero" in error.get()
    # Without checkify the same jitted call runs unchecked, as any JAX function does.
    assert np.isnan(np.asarray(jax.jit(merged)(poisoned, jnp.ones(3))["embed"])).any()
