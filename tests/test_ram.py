"""ram and ramplus_tl: a float64 reference, mergekit's own functions, the invariants of the math,
and jkarcher.merge on pytrees, eager and under jit.

Sources are sparse, heterogeneous task vectors on a base of real scale, as RL fine-tuning gives:
each model changes its own share of the entries by ~1e-3, and a few more by ~1e-5, around the
default epsilon, so that every kind of entry occurs (unchanged, changed by one model, by several,
changed by less than epsilon).
"""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jkarcher
from jkarcher import methods
from jkarcher.methods.ram import ram, ramplus_tl

try:
    import torch
    from mergekit.merge_methods.api import merge_tensors
except ImportError:
    if os.environ.get("CI") == "true":
        raise
    torch = None

EPS32 = float(np.finfo(np.float32).eps)
EPSILON = 1e-5
# The share of its entries that model i changes by ~1e-3: unequal, so that the shared-to-unique
# ratios of RAM+ differ between models (with four, alpha = 1 caps some of them and not others).
DENSITIES = (0.05, 0.1, 0.2, 0.4)
# Real tensor shapes (Qwen2.5-0.5B: a norm, k_proj, an MLP projection).
SHAPES = [(896,), (128, 896), (4864, 896)]
LEAVES = {"ram": ram, "ramplus_tl": ramplus_tl}
VALUES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def reference(models, base, epsilon=EPSILON, r=0.0, alpha=0.0):
    """RAM+ in float64, from the math of `jkarcher.methods.ram`; ram is the case r = 0.

    delta_i = x_i - base, active where |delta_i| > epsilon; c the number of active models;
    merged = base + (lambda_i delta_i where c = 1, mean of the active delta_i where c > 1, 0 where
    c = 0), lambda_i = 1 + r clip(S_i / max(U_i, epsilon), 0, alpha), S_i and U_i the counts of
    model i's active entries with c > 1 and c = 1.
    """
    b = np.asarray(base, np.float64)
    deltas = np.asarray(models, np.float64) - b
    active = np.abs(deltas) > epsilon
    changes = np.where(active, deltas, 0.0)
    counts = active.sum(axis=0)
    axes = tuple(range(1, deltas.ndim))
    shared = (active & (counts > 1)).sum(axis=axes)
    unique = (active & (counts == 1)).sum(axis=axes)
    boost = 1.0 + r * np.clip(shared / np.maximum(unique, epsilon), 0.0, alpha)
    boosted = (boost.reshape(-1, *([1] * len(axes))) * changes).sum(axis=0)
    mean = changes.sum(axis=0) / np.maximum(counts, 1)
    return b + np.where(counts == 1, boosted, mean)


def rounding_bound(models, base, r=0.0, alpha=0.0):
    """Per entry, (N + 2) float32 epsilons of |base| + (1 + |r| alpha) sum_i |delta_i|.

    A float32 merge rounds each delta_i (exact for bf16 sources), the sum of at most N changes,
    the division by c (or the product by lambda_i, itself a few roundings from its counts), and
    the final addition of the base: about N + 2 roundings of unit eps/2 of that magnitude, here
    given eps each.
    """
    b = np.asarray(base, np.float64)
    changes = np.abs(np.asarray(models, np.float64) - b).sum(axis=0)
    return (len(models) + 2) * EPS32 * (np.abs(b) + (1 + abs(r) * alpha) * changes)


def mergekit_bound(models, base, r=0.0, alpha=0.0):
    """Per entry, one float32 epsilon of |base| + (N + 1)(1 + |r| alpha) sum_i |delta_i|.

    mergekit and this library compute the same float32 task vectors, masks, counts and boosts;
    they differ only in the order of the roundings of a mean of at most N changes (a sum, then
    a division, or divisions, then a sum), and then each rounds base + mean once (half an ulp,
    at most eps/2 of the value, each).
    """
    b = np.asarray(base, np.float64)
    changes = np.abs(np.asarray(models, np.float64) - b).sum(axis=0)
    return EPS32 * (np.abs(b) + (len(models) + 1) * (1 + abs(r) * alpha) * changes)


def sources(seed, shape, n, values="float32", epsilon=EPSILON):
    """N models and a base in the dtype `values`, as the module docstring says.

    The threshold |delta| > epsilon is a step: a model's entry whose |delta| lies within float32
    rounding of epsilon could fall on either side in float32 and in float64, so such entries are
    set to the base's value (delta exactly 0, which every implementation counts as unchanged).
    """
    rng = np.random.default_rng(seed)
    dtype = VALUES[values]
    base = 0.02 * rng.standard_normal(shape)
    models = []
    for density in DENSITIES[:n]:
        changed = rng.random(shape) < density
        slight = rng.random(shape) < 0.1
        delta = np.where(changed, 1e-3 * rng.standard_normal(shape), 0.0)
        delta += np.where(slight & ~changed, 2 * epsilon * rng.standard_normal(shape), 0.0)
        models.append(base + delta)
    base = base.astype(dtype)
    models = np.stack(models).astype(dtype)
    x, b = models.astype(np.float64), base.astype(np.float64)
    margin = 4 * EPS32 * (np.abs(x) + np.abs(b) + epsilon)
    near = np.abs(np.abs(x - b) - epsilon) <= margin
    return np.where(near, base, models), base


def leaf(method, models, base, **params):
    merged = LEAVES[method](jnp.asarray(models), jnp.ones(len(models)), jnp.asarray(base), **params)
    assert merged.dtype == jnp.float32
    return np.asarray(merged, np.float64)


CASES = [  # (method, models, parameters)
    ("ram", 2, {}),
    ("ram", 4, {"epsilon": 3e-4}),
    ("ramplus_tl", 3, {}),
    ("ramplus_tl", 4, {"r": 0.3, "alpha": 1.0}),
    ("ramplus_tl", 2, {"r": 1.0, "alpha": 2.0, "epsilon": 1e-4}),
]


def _cases():
    """Each case on each shape; the largest shape runs in the slow tests only."""
    return [
        pytest.param(
            method, n, params, shape, marks=pytest.mark.slow if shape == SHAPES[-1] else ()
        )
        for method, n, params in CASES
        for shape in SHAPES
    ]


def _boost(method, params):
    if method == "ram":
        return 0.0, 0.0
    return params.get("r", 0.1), params.get("alpha", 0.2)


@pytest.mark.parametrize("values", list(VALUES))
@pytest.mark.parametrize("method,n,params,shape", _cases())
def test_leaf_equals_the_float64_reference(method, n, params, shape, values):
    epsilon = params.get("epsilon", EPSILON)
    models, base = sources(n + len(shape), shape, n, values, epsilon)
    r, alpha = _boost(method, params)
    expected = reference(models, base, epsilon, r, alpha)
    got = leaf(method, models, base, **params)
    assert np.all(np.abs(got - expected) <= rounding_bound(models, base, r, alpha))
    # The data has every kind of entry: unchanged, changed by one model, by several.
    counts = (np.abs(models.astype(np.float64) - base.astype(np.float64)) > epsilon).sum(0)
    assert {0, 1, 2} <= set(np.unique(counts))


mergekit_only = pytest.mark.skipif(
    torch is None, reason="mergekit is not installed (pip install -e '.[test]')"
)


@mergekit_only
@pytest.mark.parametrize("values", list(VALUES))
@pytest.mark.parametrize("method,n,params,shape", _cases())
def test_leaf_equals_mergekit(method, n, params, shape, values):
    """Within a float32 epsilon of the values' magnitude (`mergekit_bound`)."""
    models, base = sources(2 * n + len(shape), shape, n, values, params.get("epsilon", EPSILON))
    tensors = [torch.from_numpy(np.asarray(t, np.float32)) for t in (base, *models)]
    theirs = merge_tensors(tensors, method, parameters=params, base_index=0).numpy()
    ours = leaf(method, models, base, **params)
    difference = np.abs(ours - theirs)
    assert np.all(difference <= mergekit_bound(models, base, *_boost(method, params)))
    print(f"{method} {params} {values} {shape}: max |ours - mergekit| {difference.max():.3g}")


# Invariants. bf16-valued sources make them exact: x - base, and base + (x - base), are exact
# in float32, and so are the sums and means of a few equal bf16 changes.


def _kept_changes(models, base, epsilon=EPSILON):
    """Each model where it changed the base by more than epsilon, the base elsewhere."""
    changed = np.abs(models.astype(np.float64) - base.astype(np.float64)) > epsilon
    return np.where(changed, models, base).astype(np.float64)


@pytest.mark.parametrize("method", list(LEAVES))
def test_one_model_keeps_its_changes_above_epsilon(method):
    models, base = sources(0, (64, 96), 1, "bfloat16")
    np.testing.assert_array_equal(leaf(method, models, base), _kept_changes(models, base)[0])


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("method", list(LEAVES))
def test_identical_models_merge_to_the_model(method, n):
    models, base = sources(n, (64, 96), 1, "bfloat16")
    copies = np.repeat(models, n, axis=0)
    np.testing.assert_array_equal(leaf(method, copies, base), _kept_changes(models, base)[0])


@pytest.mark.parametrize("method", list(LEAVES))
def test_a_model_equal_to_the_base_takes_no_part(method):
    models, base = sources(1, (64, 96), 3, "float32")
    with_base_copy = np.concatenate([models[:2], base[None], models[2:]])
    np.testing.assert_array_equal(leaf(method, with_base_copy, base), leaf(method, models, base))


@pytest.mark.parametrize("method", list(LEAVES))
def test_disjoint_changes_are_all_kept(method):
    """Where each entry is changed by one model at most, no entry is shared, no change boosted."""
    models, base = sources(2, (64, 96), 3, "bfloat16")
    owner = np.random.default_rng(2).integers(0, 3, base.shape)
    disjoint = np.where(np.arange(3)[:, None, None] == owner, models, base)
    expected = np.take_along_axis(_kept_changes(disjoint, base), owner[None], axis=0)[0]
    np.testing.assert_array_equal(leaf(method, disjoint, base), expected)


def test_ramplus_tl_boosts_unique_changes_by_the_clipped_shared_to_unique_ratio():
    """Model 0 changes entries 0..10, model 1 entries 0 and 11. Entry 0 is shared: the mean 2.
    Model 0 has S/U = 1/10, so lambda = 1 + 0.1 * 0.1; model 1 has S/U = 1, clipped to 0.2, so
    lambda = 1 + 0.1 * 0.2."""
    base = np.zeros(12, np.float32)
    models = np.zeros((2, 12), np.float32)
    models[0, :11] = 1.0
    models[1, [0, 11]] = [3.0, 2.0]
    expected = np.array([2.0] + [1.01] * 10 + [2.04])
    np.testing.assert_allclose(leaf("ramplus_tl", models, base), expected, rtol=EPS32, atol=0)
    np.testing.assert_array_equal(leaf("ram", models, base), [2.0] + [1.0] * 10 + [2.0])


@pytest.mark.parametrize("method", list(LEAVES))
def test_a_change_of_exactly_epsilon_counts_as_none(method):
    above = np.nextafter(np.float32(0.25), np.float32(1))
    models = np.array([[0.25, above, -0.25, 0.1]], np.float32)
    got = leaf(method, models, np.zeros(4, np.float32), epsilon=0.25)
    np.testing.assert_array_equal(got, [0.0, above, 0.0, 0.0])


def test_ramplus_tl_without_boost_is_ram():
    models, base = sources(3, (64, 96), 4, "float32")
    np.testing.assert_array_equal(
        leaf("ramplus_tl", models, base, r=0.0), leaf("ram", models, base)
    )


# The registry and jkarcher.merge.


def test_registered_under_mergekits_names_and_defaults():
    assert {p.name: p.default for p in methods.get("ram").params} == {"epsilon": 1e-5}
    plus = methods.get("ramplus_tl")
    assert {p.name: p.default for p in plus.params} == {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}
    for spec in (methods.get("ram"), plus):
        assert spec.base == methods.BASE_REQUIRED and not spec.weighted and not spec.random
        assert all(p.traced and not p.per_model for p in spec.params)


def _trees():
    """Three bf16 models and a base as pytrees, and their leaves by name as NumPy arrays."""
    shapes = {"q": (16, 24), "bias": (24,), "norm": (24,)}
    arrays = {
        name: sources(seed, shape, 3, "bfloat16", 1e-4)
        for seed, (name, shape) in enumerate(shapes.items())
    }
    trees = [
        {
            "attn": {n: jnp.asarray(arrays[n][0][i]) for n in ("q", "bias")},
            "norm": jnp.asarray(arrays["norm"][0][i]),
        }
        for i in range(3)
    ]
    base = {
        "attn": {n: jnp.asarray(arrays[n][1]) for n in ("q", "bias")},
        "norm": jnp.asarray(arrays["norm"][1]),
    }
    return trees, base, arrays


@pytest.mark.parametrize("method", list(LEAVES))
def test_merge_of_pytrees_eager_and_under_jit(method):
    trees, base, arrays = _trees()
    params = {"epsilon": 1e-4} if method == "ram" else {"epsilon": 1e-4, "r": 0.5, "alpha": 1.0}
    eager = jkarcher.merge(trees, [1.0, 2.0, 0.5], method=method, base=base, **params)
    merged = jax.jit(lambda ts, b: jkarcher.merge(ts, method=method, base=b, **params))
    jitted = merged(trees, base)
    r, alpha = _boost(method, params)
    for path, value in jax.tree_util.tree_leaves_with_path(eager):
        models, bases = arrays[path[-1].key]
        assert value.dtype == jnp.bfloat16 and value.shape == bases.shape, path
        expected = reference(models, bases, 1e-4, r, alpha)
        # A float32 result within rounding_bound, then rounded once to bf16 (half an ulp: at
        # most 2^-8 of the value).
        bound = rounding_bound(models, bases, r, alpha) + 2.0**-8 * np.abs(expected)
        assert np.all(np.abs(np.asarray(value, np.float64) - expected) <= bound), path
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "method,params,message",
    [
        ("ram", {"epsilon": -1e-5}, "'epsilon'=-1e-05: must be a number >= 0"),
        ("ramplus_tl", {"alpha": -0.2}, "'alpha'=-0.2: must be a number >= 0"),
        ("ramplus_tl", {"r": float("nan")}, "'r'=nan: must be a finite number"),
        ("ram", {"epsilon": [1e-5, 1e-4]}, "'epsilon': takes one value"),
    ],
)
def test_bad_parameters_are_errors_naming_them(method, params, message):
    trees, base, _ = _trees()
    with pytest.raises(methods.MethodError, match=message):
        jkarcher.merge(trees[:2], method=method, base=base, **params)


@pytest.mark.parametrize("method", list(LEAVES))
def test_a_base_model_is_required(method):
    trees, _, _ = _trees()
    with pytest.raises(methods.MethodError, match=f"method '{method}' needs a base model"):
        jkarcher.merge(trees, method=method)
