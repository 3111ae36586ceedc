"""bfloat16 sources merged to float32 or float16 are rounded once, from the float32 computation.

`jkarcher.merge.leaf_function(method, params, out_dtype)` runs a leaf in float32 and rounds its
result once, to out_dtype. Here each method's float32 output is checked against a float64 NumPy
reference written from the method's math, within a bound from error analysis: u = 2^-24 (float32's
unit roundoff) per rounding, times the size of what is summed, with gamma(n) = n u / (1 - n u)
for a chain of n roundings (Higham, "Accuracy and Stability of Numerical Algorithms", Sec. 3.1).
The bounds are worst cases, so they hold whatever order XLA sums in, on any CPU. A result rounded
to bfloat16 on the way would be off by up to 2^-9 relative, hundreds of times these bounds, and
its entries would all be bfloat16 numbers; most entries of a float32 merge are not.
"""

import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from karcher_reference import curvature_bound, karcher_reference, sources_with_cosine

from jkarcher import methods
from jkarcher.karcher import DEFAULT_TOL
from jkarcher.merge import leaf_function
from jkarcher.numerics import all_finite, check_weights

U = 2.0**-24
SHAPE = (16, 32)
SIZE = SHAPE[0] * SHAPE[1]
N = 3
# Weights with few bits, exact in float32, so that only the arithmetic rounds.
WEIGHTS = np.array([0.75, 1.5, 0.5])
LAMBDA = 0.7
# XLA's float32 arccos and sin are taken to be within 2 ulps: a relative error of 4 u.
TRANSCENDENTAL_ERROR = 4 * U


def gamma(n: float) -> float:
    return n * U / (1 - n * U)


def _bfloat16(values) -> np.ndarray:
    return np.asarray(values).astype(ml_dtypes.bfloat16)


def _accurate_sum_additions(size: int) -> int:
    """Additions in a chain of `jkarcher.numerics.accurate_sum`: 15 within a block of 16, then
    one per level of the pairwise tree of the block sums."""
    return 15 + math.ceil(math.log2(math.ceil(size / 16)))


def _karcher_sum_additions(shape: tuple[int, int]) -> int:
    """Additions in a chain of each inner product of `jkarcher.karcher` on a [rows, columns]
    tensor of at most 2048 columns: along a row, then over the rows."""
    return (shape[1] - 1) + (shape[0] - 1)


def _data():
    """bfloat16 sources: a base, task-vector models base + 0.3 N(0, 1), and sources at pairwise
    cosine ~0.7 with norms 1, 2, 1.5 (for the spherical methods)."""
    rng = np.random.default_rng(0)
    base = _bfloat16(rng.standard_normal(SHAPE))
    models = _bfloat16(base.astype(np.float64) + 0.3 * rng.standard_normal((N, *SHAPE)))
    spherical = _bfloat16(sources_with_cosine(rng, N, SHAPE, 0.7, [1.0, 2.0, 1.5]))
    return base, models, spherical


BASE, MODELS, SPHERICAL = _data()


def _leaf(method, params, sources, base, out_dtype, **tensor_inputs):
    spec = methods.get(method)
    resolved = spec.resolve(params, len(sources), base is not None)
    fn = leaf_function(method, resolved, out_dtype)
    tensors = {name: tuple(map(jnp.asarray, arrays)) for name, arrays in tensor_inputs.items()}
    merged, _, finite = fn(
        tuple(map(jnp.asarray, sources)),
        check_weights(WEIGHTS[: len(sources)], len(sources)),
        None if base is None else jnp.asarray(base),
        None,
        tensors or None,
    )
    assert bool(finite)
    return np.asarray(merged)


# Each case: (sources, base, params, tensor inputs, reference, bound). An array bound holds entry
# by entry; a number bounds the Euclidean norm of the error.


def _linear():
    """sum_i w_i x_i / sum_i w_i: per entry N products, N - 1 additions and a division (at most
    2 roundings, as a reciprocal and a product): gamma(N + 2) sum_i |w_i x_i| / sum_i w_i."""
    x = MODELS.astype(np.float64)
    reference = np.tensordot(WEIGHTS, x, 1) / WEIGHTS.sum()
    bound = gamma(N + 2) * np.tensordot(WEIGHTS, np.abs(x), 1) / WEIGHTS.sum()
    return MODELS, None, {}, {}, reference, bound


def _task_arithmetic():
    """b + lambda sum_i w_i (x_i - b): a difference, a product, N - 1 additions, lambda (itself
    rounded) and the base's addition: gamma(N + 4) (|b| + lambda sum_i |w_i (x_i - b)|)."""
    b = BASE.astype(np.float64)
    deltas = MODELS.astype(np.float64) - b
    reference = b + LAMBDA * np.tensordot(WEIGHTS, deltas, 1)
    bound = gamma(N + 4) * (np.abs(b) + LAMBDA * np.tensordot(WEIGHTS, np.abs(deltas), 1))
    return MODELS, BASE, {"lambda": LAMBDA}, {}, reference, bound


def _ties():
    """TIES at density 0.5 with the disjoint mean, from the math: the top half of each |delta_i|
    (ties to the lowest index), signs elected from sum_i w_i m_i delta_i (+ at 0), the agreeing
    entries averaged by their weights, b + lambda times that. The masks and signs are those of
    float32 (asserted: exact differences, no sum whose sign float32 rounding could flip); the rest
    rounds as task arithmetic plus a division: gamma(N + 6) (|b| + lambda sum_agree |w d| / D)."""
    b = BASE.astype(np.float64)
    deltas = MODELS.astype(np.float64) - b
    assert np.array_equal(MODELS.astype(np.float32) - BASE.astype(np.float32), deltas)
    k = int(0.5 * SIZE)
    keep = np.zeros((N, SIZE), bool)
    for i, delta in enumerate(deltas.reshape(N, -1)):
        keep[i, np.argsort(-np.abs(delta), kind="stable")[:k]] = True
    weighted = WEIGHTS[:, None, None] * np.where(keep.reshape(deltas.shape), deltas, 0.0)
    total = weighted.sum(axis=0)
    magnitude = np.abs(weighted).sum(axis=0)
    assert np.all((total == 0) | (np.abs(total) > gamma(N - 1) * magnitude))
    agree = np.where(total >= 0, weighted > 0, weighted < 0)
    divisor = np.where(agree, WEIGHTS[:, None, None], 0.0).sum(axis=0)
    divisor = np.where(divisor == 0, 1.0, divisor)
    reference = b + LAMBDA * np.where(agree, weighted, 0.0).sum(axis=0) / divisor
    size = np.abs(b) + LAMBDA * np.where(agree, np.abs(weighted), 0.0).sum(axis=0) / divisor
    params = {"density": 0.5, "lambda": LAMBDA}
    return MODELS, BASE, params, {}, reference, gamma(N + 6) * size


def _karcher_bound(sources) -> float:
    """The relative error (Euclidean) of the float32 Karcher mean.

    The fixed point stops at a tangent norm below tol; every inner product it uses is a sum of
    the sources' products with error at most e = gamma(A + 5) relative to the norms (A additions,
    a product, the unit normalization), which moves the tangent by at most 4 e. With lambda the
    curvature bound, the direction is within (tol + 4 e) / lambda of the mean's. The norm
    (square roots of the Gram diagonal, a weighted mean) and the output sum_j gamma_j x_j (whose
    terms' sizes stay within twice the result's for sources within 90 degrees of the mean) add
    gamma(A / 2 + 3 N + 3).
    """
    additions = _karcher_sum_additions(SHAPE)
    inner_product = gamma(additions + 5)
    direction = (DEFAULT_TOL + 4 * inner_product) / curvature_bound(sources, WEIGHTS)
    return direction + gamma(additions / 2 + 3 * N + 3)


def _karcher():
    """The weighted Karcher mean of bfloat16 sources (jkarcher.karcher_mean's statement)."""
    x = SPHERICAL.astype(np.float64)
    reference = karcher_reference(x, WEIGHTS)
    bound = _karcher_bound(x) * np.linalg.norm(reference)
    return SPHERICAL, None, {}, {}, reference, bound


def _karcher_with_a_base():
    """b + the Karcher mean of the task vectors x_i - b; the difference and the base's addition
    add gamma(2) |result| to the mean's error."""
    b = BASE.astype(np.float64)
    deltas = MODELS.astype(np.float64) - b
    mean = karcher_reference(deltas, WEIGHTS)
    reference = b + mean
    bound = _karcher_bound(deltas) * np.linalg.norm(mean) + gamma(2) * np.linalg.norm(reference)
    return MODELS, BASE, {}, {}, reference, bound


def _karcher_with_equal_fishers():
    """Fisher-preconditioned Karcher with every Fisher equal: the plain mean, reached by the
    Fisher iteration, whose per-block sums have the plain mean's chains."""
    x = SPHERICAL.astype(np.float64)
    reference = karcher_reference(x, WEIGHTS)
    fisher = _bfloat16(np.full((N, *SHAPE), 2.5))
    bound = _karcher_bound(x) * np.linalg.norm(reference)
    return SPHERICAL, None, {}, {"fisher": fisher}, reference, bound


def _slerp():
    """slerp(a, b; t) = g_a a + g_b b, g_a = sin((1 - t) theta) / sin theta, g_b = sin(t theta) /
    sin theta, theta = arccos <a/|a|, b/|b|>. The cosine: a sum of A additions of products of
    entries divided by norms (each from A additions): error at most gamma(2 A + 6). arccos adds
    its own error, so theta is off by at most gamma(2 A + 6) / sin theta + 4 u theta; t (rounded,
    and 1 - t) by 2 u. The coefficients then move by their slopes times those, and round in at
    most 12 further operations (a product with theta, sin, sin, a division, the combination)."""
    a, b = SPHERICAL[0].astype(np.float64), SPHERICAL[1].astype(np.float64)
    t = 0.3
    cosine = np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))
    theta = np.arccos(cosine)

    def coefficients(angle, fraction):
        return np.array([np.sin((1 - fraction) * angle), np.sin(fraction * angle)]) / np.sin(angle)

    g = coefficients(theta, t)
    step = 1e-6
    by_theta = np.abs(coefficients(theta + step, t) - coefficients(theta - step, t)) / (2 * step)
    by_t = np.abs(coefficients(theta, t + step) - coefficients(theta, t - step)) / (2 * step)
    theta_error = gamma(2 * _accurate_sum_additions(SIZE) + 6) / np.sin(theta)
    theta_error += TRANSCENDENTAL_ERROR * theta
    slack = by_theta * theta_error + by_t * 2 * U + gamma(12) * np.abs(g)
    reference = g[0] * a + g[1] * b
    bound = slack[0] * np.abs(a) + slack[1] * np.abs(b)
    return SPHERICAL[:2], None, {"t": t}, {}, reference, bound


def _model_stock():
    """t mean(x) + (1 - t) b, t = N c / (1 + (N - 1) c), c the mean of the pairwise cosines of
    the task vectors. Each cosine (a sum of A additions over norms from A additions) is within
    gamma(2 A + 6), their mean within that plus gamma(P) of the P cosines' size; t moves by its
    slope N / (1 + (N - 1) c)^2 times that, and rounds in 4 operations; the interpolation then
    moves by that times |mean(x) - b| and rounds in N + 3."""
    b = BASE.astype(np.float64)
    x = MODELS.astype(np.float64)
    deltas = (x - b).reshape(N, -1)
    units = deltas / np.linalg.norm(deltas, axis=1, keepdims=True)
    cosines = [units[i] @ units[j] for i in range(N) for j in range(i + 1, N)]
    c = np.mean(cosines)
    t = N * c / (1 + (N - 1) * c)
    cosine_error = gamma(2 * _accurate_sum_additions(SIZE) + 6) + gamma(len(cosines)) * np.mean(
        np.abs(cosines)
    )
    t_error = N / (1 + (N - 1) * c) ** 2 * cosine_error + gamma(4) * abs(t)
    average = x.mean(axis=0)
    reference = t * average + (1 - t) * b
    rounding = gamma(N + 3) * (abs(t) * np.abs(x).mean(axis=0) + abs(1 - t) * np.abs(b))
    bound = t_error * np.abs(average - b) + rounding
    return MODELS, BASE, {}, {}, reference, bound


CASES = {
    "linear": ("linear", _linear),
    "task_arithmetic": ("task_arithmetic", _task_arithmetic),
    "ties": ("ties", _ties),
    "karcher": ("karcher", _karcher),
    "karcher_with_a_base": ("karcher", _karcher_with_a_base),
    "karcher_with_equal_fishers": ("karcher", _karcher_with_equal_fishers),
    "slerp": ("slerp", _slerp),
    "model_stock": ("model_stock", _model_stock),
}


def _error_within(error: np.ndarray, bound) -> None:
    if np.ndim(bound):
        assert np.all(np.abs(error) <= bound), np.max(np.abs(error) / bound)
    else:
        assert np.linalg.norm(error) <= bound, np.linalg.norm(error) / bound


@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_output_of_bfloat16_sources_is_float32_accurate(case):
    method, make = CASES[case]
    sources, base, params, tensor_inputs, reference, bound = make()
    merged = _leaf(method, params, sources, base, np.float32, **tensor_inputs)
    assert merged.dtype == np.float32
    _error_within(merged - reference, bound)
    # A float32 entry is a bfloat16 number by structure (an entry of a source or the base kept as
    # it is, as TIES keeps the base where no model is kept) or by chance (2^-16), so few are.
    in_bfloat16 = merged.astype(ml_dtypes.bfloat16).astype(np.float32) == merged
    assert np.mean(in_bfloat16) < 0.5


@pytest.mark.parametrize("case", sorted(CASES))
def test_float16_output_of_bfloat16_sources_is_rounded_once(case):
    """Rounding float32 y to float16 moves it by at most half the float16 spacing at the exact
    value r (or, across a power of two, by no more than |y - r|), so |out - r| <= h(r) + |y - r|.
    A bfloat16 rounding first would move entries by up to 8 h."""
    method, make = CASES[case]
    sources, base, params, tensor_inputs, reference, bound = make()
    merged = _leaf(method, params, sources, base, np.float16, **tensor_inputs)
    assert merged.dtype == np.float16
    half_spacing = 0.5 * np.spacing(np.abs(reference).astype(np.float16)).astype(np.float64)
    error = np.abs(merged.astype(np.float64) - reference)
    if np.ndim(bound):
        assert np.all(error <= half_spacing + bound)
    else:
        assert np.linalg.norm(error) <= np.linalg.norm(half_spacing) + bound


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_flags_each_array_whatever_its_shape(bad):
    arrays = [
        np.ones((3, 5), ml_dtypes.bfloat16),
        np.ones((3, 5), np.float32),
        np.ones((7,), np.float32),
        np.float32(2.0),
        np.full((3, 5), 3e38, np.float32),  # finite, though its sum overflows
        np.array([-65504.0, 6e-8, -0.0], np.float16),  # the largest, a subnormal, a signed zero
        np.array([float(ml_dtypes.finfo(ml_dtypes.bfloat16).max), -1e-40], ml_dtypes.bfloat16),
    ]
    assert np.asarray(all_finite([jnp.asarray(a) for a in arrays])).tolist() == [True] * 7
    for index in range(len(arrays)):
        broken = [np.array(a, copy=True) for a in arrays]
        broken[index].reshape(-1)[-1] = bad
        flags = np.asarray(all_finite([jnp.asarray(a) for a in broken])).tolist()
        assert flags == [i != index for i in range(len(arrays))]
