"""RegMean against a float64 NumPy reference written from its paper, and the invariants the paper
states: the average for equal Grams, the least-squares fit of all the data on linear data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers_mergekit import require_oracle

import jkarcher
from jkarcher.errors import MergeError

EPS32 = float(np.finfo(np.float32).eps)


def reference_regmean(weights_per_model, grams, w, alpha):
    """(sum_i w_i W_i G~_i)(sum_i w_i G~_i)^-1, G~ = alpha G + (1 - alpha) diag(G), float64."""
    shrunk = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in grams]
    normal = sum(wi * g for wi, g in zip(w, shrunk, strict=True))
    right = sum(wi * m @ g for wi, m, g in zip(w, weights_per_model, shrunk, strict=True))
    return np.linalg.solve(normal.T, right.T).T


def _problem(n=3, out=24, inputs=16, tokens=64, seed=0, dtype=np.float32):
    """N weights [out, in] and the mean input Grams X_i^T X_i / tokens of inputs with their own
    scales per coordinate (so the Grams differ and the solve is not an average)."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((n, out, inputs)).astype(dtype)
    inputs_per_model = [
        rng.standard_normal((tokens, inputs)) * rng.uniform(0.3, 3.0, inputs) for _ in range(n)
    ]
    grams = [x.T @ x / tokens for x in inputs_per_model]
    return weights, grams, inputs_per_model


def _merge(weights, grams, w=None, **params):
    merged = jkarcher.merge(
        [jnp.asarray(m) for m in weights],
        w,
        method="regmean",
        gram=[jnp.asarray(g, jnp.float32) for g in grams],
        **params,
    )
    return np.asarray(merged.astype(jnp.float32), np.float64)


def _tolerance(weights, grams, w, alpha):
    """A float32 solve has backward error of a few eps times the matrix size (LU with partial
    pivoting), which the condition number kappa of sum_i w_i G~_i turns into a relative forward
    error; the Grams themselves reach the leaf rounded to float32, which moves the result by
    about kappa eps more. So 4 n kappa eps, relative to the largest weight."""
    shrunk = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in grams]
    kappa = np.linalg.cond(sum(wi * g for wi, g in zip(w, shrunk, strict=True)))
    return 4 * grams[0].shape[0] * kappa * EPS32 * np.max(np.abs(weights))


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_regmean_equals_the_float64_reference(alpha):
    weights, grams, _ = _problem()
    w = np.array([0.5, 1.0, 2.0])
    grams32 = [g.astype(np.float32).astype(np.float64) for g in grams]
    expected = reference_regmean(weights.astype(np.float64), grams32, w, alpha)
    merged = _merge(weights, grams, w, alpha=alpha)
    error = np.max(np.abs(merged - expected))
    assert error < _tolerance(weights, grams, w, alpha), error
    # Not vacuous: the weighted average misses by far more than the bound.
    average = np.tensordot(w / w.sum(), weights.astype(np.float64), axes=1)
    assert np.max(np.abs(average - expected)) > 100 * _tolerance(weights, grams, w, alpha)


def test_bfloat16_sources_are_merged_in_float32_and_rounded_once():
    weights, grams, _ = _problem(dtype=ml_dtypes.bfloat16)
    w = np.array([1.0, 2.0, 1.0])
    merged = jkarcher.merge(
        [jnp.asarray(m) for m in weights], w, method="regmean", gram=[jnp.asarray(g) for g in grams]
    )
    assert merged.dtype == jnp.bfloat16
    in_float32 = _merge(weights.astype(np.float32), grams, w)
    np.testing.assert_array_equal(np.asarray(merged), in_float32.astype(ml_dtypes.bfloat16))
    grams32 = [g.astype(np.float32).astype(np.float64) for g in grams]
    expected = reference_regmean(weights.astype(np.float64), grams32, w, 0.6)
    half_ulp = np.abs(expected) * 2.0**-8  # bfloat16 keeps 8 significant bits
    bound = half_ulp + _tolerance(weights.astype(np.float32), grams, w, 0.6)
    assert np.all(np.abs(np.asarray(merged, np.float64) - expected) <= bound)


def test_equal_grams_give_the_weighted_average():
    weights, grams, _ = _problem()
    w = np.array([3.0, 1.0, 1.0])
    merged = _merge(weights, [grams[0]] * 3, w, alpha=1.0)
    average = np.tensordot(w / w.sum(), weights.astype(np.float64), axes=1)
    np.testing.assert_allclose(merged, average, atol=_tolerance(weights, [grams[0]] * 3, w, 1.0))


def test_on_linear_data_regmean_is_the_least_squares_fit_of_all_the_data():
    """Each model fits its data exactly (Y_i = X_i W_i^T); with alpha = 1, RegMean minimizes
    sum_i w_i / T_i ||X_i W^T - Y_i||^2, the least-squares problem of the stacked data."""
    weights, grams, inputs = _problem(n=3, tokens=64)
    w = np.array([1.0, 0.5, 2.0])
    tokens = len(inputs[0])
    rows = np.concatenate([np.sqrt(wi / tokens) * x for wi, x in zip(w, inputs, strict=True)])
    targets = np.concatenate(
        [
            np.sqrt(wi / tokens) * x @ m.astype(np.float64).T
            for wi, x, m in zip(w, inputs, weights, strict=True)
        ]
    )
    least_squares = np.linalg.lstsq(rows, targets, rcond=None)[0].T
    merged = _merge(weights, grams, w, alpha=1.0)
    np.testing.assert_allclose(
        merged, least_squares, atol=_tolerance(weights, grams, w, 1.0), rtol=0
    )


def test_alpha_zero_weighs_each_input_coordinate_by_its_second_moment():
    weights, grams, _ = _problem()
    w = np.array([1.0, 2.0, 3.0])
    moments = np.stack([wi * np.diag(g) for wi, g in zip(w, grams, strict=True)])  # [N, in]
    expected = np.einsum("ni,noi->oi", moments, weights.astype(np.float64)) / moments.sum(0)
    # A mean with positive shares per coordinate: a few float32 roundings of the largest weight.
    atol = 8 * EPS32 * np.max(np.abs(weights))
    np.testing.assert_allclose(_merge(weights, grams, w, alpha=0.0), expected, atol=atol, rtol=0)


def test_an_input_coordinate_no_model_sees_keeps_the_weighted_average():
    weights, grams, _ = _problem()
    for g in grams:
        g[3, :] = g[:, 3] = 0.0
    w = np.array([1.0, 1.0, 2.0])
    merged = _merge(weights, grams, w, alpha=1.0)
    average = np.tensordot(w / w.sum(), weights.astype(np.float64), axes=1)
    np.testing.assert_allclose(merged[:, 3], average[:, 3], rtol=1e-6)
    expected = reference_regmean(
        weights.astype(np.float64)[:, :, [0, 1, 2, *range(4, 16)]],
        [np.delete(np.delete(g, 3, 0), 3, 1) for g in grams],
        w,
        1.0,
    )
    np.testing.assert_allclose(np.delete(merged, 3, 1), expected, atol=1e-4)


def test_tensors_without_grams_merge_as_the_weighted_average():
    rng = np.random.default_rng(3)
    models = [
        {"proj": rng.standard_normal((6, 4)), "norm": rng.standard_normal(6)} for _ in range(2)
    ]
    models = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), models)
    grams = [{"proj": jnp.eye(4) * (i + 1), "norm": None} for i in range(2)]
    merged = jkarcher.merge(models, [1.0, 3.0], method="regmean", gram=grams)
    expected_norm = 0.25 * models[0]["norm"] + 0.75 * models[1]["norm"]
    np.testing.assert_allclose(merged["norm"], expected_norm, rtol=1e-6)
    # Model i's Gram is (i + 1) I: the weight is the average with shares w_i (i + 1), 1 : 6.
    expected_proj = (models[0]["proj"] + 6 * models[1]["proj"]) / 7
    np.testing.assert_allclose(merged["proj"], expected_proj, rtol=1e-5)


def test_regmean_traces_into_a_users_jit():
    weights, grams, _ = _problem()
    fn = jax.jit(
        lambda ws, gs: jkarcher.merge(list(ws), method="regmean", gram=list(gs), alpha=0.9)
    )
    traced = np.asarray(fn(jnp.asarray(weights), jnp.asarray(np.stack(grams), jnp.float32)))
    np.testing.assert_allclose(traced, _merge(weights, grams, alpha=0.9), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("grams", "message"),
    [
        (None, r"method 'regmean' needs gram=\[one pytree per model\]"),
        ([np.eye(4)] * 2, "gram has 2 pytrees for 3 models"),
        ([np.eye(5)] * 3, r"gram of model 0 has shape \(5, 5\), it must be \(4, 4\)"),
        ([np.eye(4), None, np.eye(4)], "gram of model 1 is None, and that of model 0 is not"),
    ],
)
def test_bad_grams_name_the_model_and_the_shape(grams, message):
    models = [jnp.ones((6, 4))] * 3
    extra = {} if grams is None else {"gram": grams}
    with pytest.raises(MergeError, match=message):
        jkarcher.merge(models, method="regmean", **extra)


def test_a_gram_for_a_vector_is_refused():
    with pytest.raises(MergeError, match=r"leaf '' of shape \(6,\) takes no gram"):
        jkarcher.merge([jnp.ones(6)] * 2, method="regmean", gram=[jnp.eye(6)] * 2)


def test_alpha_outside_the_unit_interval_is_refused():
    with pytest.raises(jkarcher.methods.MethodError, match="'alpha'=1.5: must be in"):
        jkarcher.merge([jnp.ones((2, 2))] * 2, method="regmean", gram=[jnp.eye(2)] * 2, alpha=1.5)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_regmean_equals_fusionbench(dtype):
    """FusionBench's RegMean (`merging_with_regmean_weights`, equal weights, torch in float32)
    on a linear weight and a bias: the weight agrees to the solve's rounding, the bias (the
    mean) to a float32 rounding."""
    require_oracle("fusion_bench")
    import torch
    from fusion_bench.method.regmean.regmean import merging_with_regmean_weights

    weights, grams, _ = _problem(dtype=dtype)
    biases = np.random.default_rng(5).standard_normal((3, 24)).astype(dtype)
    as_torch = lambda a: torch.from_numpy(np.asarray(a, np.float32))
    theirs = merging_with_regmean_weights(
        {"proj.weight": list(map(as_torch, weights)), "proj.bias": list(map(as_torch, biases))},
        [{"proj": as_torch(g)} for g in grams],
        reduce_non_diagonal_ratio=0.6,
    )
    models = [
        {"weight": jnp.asarray(w), "bias": jnp.asarray(b)}
        for w, b in zip(weights, biases, strict=True)
    ]
    gram = [{"weight": jnp.asarray(g, jnp.float32), "bias": None} for g in grams]
    ours = jkarcher.merge(models, method="regmean", gram=gram)
    float32 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    # Ours rounds once to the sources' dtype; compare theirs rounded the same way, within the
    # float32 solve's bound (two solves: twice it) plus the rounding to that dtype.
    their_weight = theirs["proj.weight"].numpy().astype(dtype).astype(np.float64)
    bound = 2 * _tolerance(weights.astype(np.float32), grams, np.ones(3), 0.6)
    ulp = 0.0 if dtype == np.float32 else np.abs(their_weight) * 2.0**-7
    assert np.all(np.abs(float32(ours["weight"]) - their_weight) <= bound + ulp)
    their_bias = theirs["proj.bias"].numpy().astype(dtype).astype(np.float64)
    bias_ulp = np.abs(their_bias) * (2 * EPS32 if dtype == np.float32 else 2.0**-7)
    assert np.all(np.abs(float32(ours["bias"]) - their_bias) <= bias_ulp + 1e-7)
