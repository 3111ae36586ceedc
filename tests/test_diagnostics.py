"""Each diagnostic against a float64 NumPy computation from its definition, on matrices of known
rank and spectrum, and the weight-space figures."""

import jax
import numpy as np
import pytest

from jkarcher import diagnostics

EPS = float(np.finfo(np.float32).eps)


def float32_rtol(terms, factor=8):
    """The relative error a float32 result may carry when it is made of `terms` rounded terms.

    From error analysis, so that it holds on any CPU and in any summation order: a float32 sum of
    n terms errs by at most (n - 1) * eps relative to the sum of the terms' magnitudes (Higham,
    "Accuracy and Stability of Numerical Algorithms", 2nd ed., sec. 4.2), and the LAPACK Users'
    Guide (sec. 4.9) bounds each computed singular value's error by about eps * s_1. `factor`
    covers the few roundings each term takes on top (a square, a product, a division).
    """
    return factor * terms * EPS


def sum_rtol(a):
    """Variance and participation ratio: sums over all m * n entries (the PR through Gram
    entries, dot products of max(m, n) terms, summed over min(m, n)^2 <= m * n of them)."""
    return float32_rtol(a.size)


def spectrum_rtol(a):
    """Stable rank: a sum over the min(m, n) singular values, each within ~eps * s_1."""
    return float32_rtol(min(a.shape))


def effective_rank_rtol(a):
    """A singular value that is exactly 0 comes out as ~eps * s_1, so p_i ~ eps and it adds
    -p_i log p_i ~ eps log(1 / eps) to the entropy: the spectrum's bound times log(1 / eps)."""
    return spectrum_rtol(a) * np.log(1 / EPS)


def ref_singular_values(a, center=False):
    a = np.asarray(a, np.float64)
    return np.linalg.svd(a - a.mean(axis=0) if center else a, compute_uv=False)


def ref_variance(a):
    a = np.asarray(a, np.float64)
    return np.mean([np.var(a[:, j]) for j in range(a.shape[1])])


def ref_effective_rank(a, center=False):
    s = ref_singular_values(a, center)
    if s.sum() == 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def ref_stable_rank(a, center=False):
    a = np.asarray(a, np.float64)
    a = a - a.mean(axis=0) if center else a
    spectral = np.linalg.norm(a, 2)
    return 0.0 if spectral == 0 else np.linalg.norm(a, "fro") ** 2 / spectral**2


def ref_participation_ratio(a):
    a = np.asarray(a, np.float64)
    eigenvalues = np.linalg.eigvalsh(np.atleast_2d(np.cov(a, rowvar=False, bias=True)))
    return 0.0 if np.sum(eigenvalues**2) == 0 else np.sum(eigenvalues) ** 2 / np.sum(eigenvalues**2)


def ref_numerical_rank(a):
    return int(np.linalg.matrix_rank(np.asarray(a, np.float32)))


def with_spectrum(m, n, spectrum, seed=0):
    """U diag(spectrum) V^T with random orthonormal U (m x k) and V (n x k), as float32."""
    rng = np.random.default_rng(seed)
    k = len(spectrum)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return ((u * np.asarray(spectrum, np.float64)) @ v.T).astype(np.float32)


def rank_k_product(m, n, k, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, k)) @ rng.standard_normal((k, n))).astype(np.float32)


MATRICES = {
    "identity": np.eye(24, dtype=np.float32),
    "rank-3 product, tall": rank_k_product(120, 16, 3),
    "rank-5 product, wide": rank_k_product(10, 40, 5, seed=1),
    "full-rank gaussian": np.random.default_rng(2).standard_normal((64, 20)).astype(np.float32),
    "constant": np.full((30, 12), 2.5, np.float32),
    "constant, inexact mean": np.full((7, 12), 0.1, np.float32),
    "one row": np.arange(1, 9, dtype=np.float32)[None, :],
    "one column": np.arange(1, 9, dtype=np.float32)[:, None],
    "known spectrum": with_spectrum(80, 30, [10.0, 4.0, 1.0, 1e-1, 1e-3, 2e-5]),
    "shifted, uncentered mean dominates": rank_k_product(200, 16, 4, seed=3) + 50.0,
}


@pytest.mark.parametrize("name", list(MATRICES))
def test_each_measure_equals_its_numpy_definition(name):
    a = MATRICES[name]
    np.testing.assert_allclose(
        diagnostics.activation_variance(a), ref_variance(a), rtol=sum_rtol(a)
    )
    np.testing.assert_allclose(
        diagnostics.effective_rank(a), ref_effective_rank(a), rtol=effective_rank_rtol(a)
    )
    np.testing.assert_allclose(
        diagnostics.stable_rank(a), ref_stable_rank(a), rtol=spectrum_rtol(a)
    )
    np.testing.assert_allclose(
        diagnostics.participation_ratio(a), ref_participation_ratio(a), rtol=sum_rtol(a)
    )
    assert int(diagnostics.numerical_rank(a)) == ref_numerical_rank(a)


@pytest.mark.parametrize("name", list(MATRICES))
def test_the_report_gives_the_same_values_as_each_measure(name):
    """The jitted report and the eager measures run the same SVD and differ only in how the
    roundings are ordered and fused: by at most the bound of their longest sum (all m * n
    entries)."""
    a = MATRICES[name]
    report = diagnostics.activation_report(a)
    assert set(report) == set(diagnostics.ACTIVATION_METRICS)
    for metric in diagnostics.ACTIVATION_METRICS:
        np.testing.assert_allclose(
            report[metric], getattr(diagnostics, metric)(a), rtol=sum_rtol(a)
        )


@pytest.mark.parametrize("name", ["rank-3 product, tall", "shifted, uncentered mean dominates"])
def test_centered_rank_measures_equal_numpy_on_the_centered_matrix(name):
    """Centering in float32 moves each entry by ~eps |A|, which the centered spectrum sees
    relative to its own size: the bounds grow by ||A||_F / ||A - mean||_F."""
    a = MATRICES[name]
    centered = a.astype(np.float64) - a.astype(np.float64).mean(axis=0)
    growth = np.linalg.norm(a.astype(np.float64)) / np.linalg.norm(centered)
    np.testing.assert_allclose(
        diagnostics.effective_rank(a, center=True),
        ref_effective_rank(centered),
        rtol=effective_rank_rtol(a) * growth,
    )
    np.testing.assert_allclose(
        diagnostics.stable_rank(a, center=True),
        ref_stable_rank(centered),
        rtol=spectrum_rtol(a) * growth,
    )
    assert int(diagnostics.numerical_rank(a, center=True)) == ref_numerical_rank(centered)


def test_known_values():
    n = 24
    identity = MATRICES["identity"]
    assert float(diagnostics.effective_rank(identity)) == pytest.approx(
        n, rel=effective_rank_rtol(identity)
    )
    assert float(diagnostics.stable_rank(identity)) == pytest.approx(n, rel=spectrum_rtol(identity))
    assert int(diagnostics.numerical_rank(identity)) == n
    # centered identity: covariance (I - J/n)/n has n - 1 equal eigenvalues and a zero one
    assert float(diagnostics.participation_ratio(identity)) == pytest.approx(
        n - 1, rel=sum_rtol(identity)
    )
    assert float(diagnostics.activation_variance(identity)) == pytest.approx(
        1 / n - 1 / n**2, rel=sum_rtol(identity)
    )

    for k, name in [(3, "rank-3 product, tall"), (5, "rank-5 product, wide")]:
        assert int(diagnostics.numerical_rank(MATRICES[name])) == k
        assert 1.0 < float(diagnostics.effective_rank(MATRICES[name])) < k

    # singular values 10, 4, 1, .1, 1e-3, 2e-5 on 80 x 30: threshold 80 * 1.19e-7 * 10 ~ 1e-4
    spectrum = np.array([10.0, 4.0, 1.0, 1e-1, 1e-3, 2e-5])
    p = spectrum / spectrum.sum()
    known = MATRICES["known spectrum"]
    assert int(diagnostics.numerical_rank(known)) == 5
    assert float(diagnostics.stable_rank(known)) == pytest.approx(
        np.sum(spectrum**2) / 100, rel=spectrum_rtol(known)
    )
    assert float(diagnostics.effective_rank(known)) == pytest.approx(
        np.exp(-np.sum(p * np.log(p))), rel=effective_rank_rtol(known)
    )

    for name in ("constant", "constant, inexact mean", "one row"):
        a = MATRICES[name]
        assert float(diagnostics.effective_rank(a)) == pytest.approx(
            1.0, rel=effective_rank_rtol(a)
        )
        assert float(diagnostics.stable_rank(a)) == pytest.approx(1.0, rel=spectrum_rtol(a))
        assert int(diagnostics.numerical_rank(a)) == 1
        assert float(diagnostics.activation_variance(a)) == 0.0
        assert float(diagnostics.participation_ratio(a)) == 0.0


def test_a_zero_matrix_has_no_rank():
    zeros = np.zeros((6, 4), np.float32)
    for metric in diagnostics.ACTIVATION_METRICS:
        assert float(getattr(diagnostics, metric)(zeros)) == 0.0


def test_a_dominant_mean_drives_stable_rank_to_one_but_not_pr():
    """The pattern of the paper's Table 7 at deep layers: uncentered StableRank ~ 1 while the
    centered PR sees several directions."""
    a = MATRICES["shifted, uncentered mean dominates"]
    assert float(diagnostics.stable_rank(a)) < 1.01
    assert float(diagnostics.participation_ratio(a)) > 2.0
    assert float(diagnostics.stable_rank(a, center=True)) > 1.5


def test_bfloat16_input_is_measured_in_float32():
    a = MATRICES["full-rank gaussian"].astype(jax.numpy.bfloat16)
    assert diagnostics.effective_rank(a).dtype == np.float32
    np.testing.assert_allclose(
        diagnostics.effective_rank(a),
        ref_effective_rank(np.asarray(a, np.float32)),
        rtol=effective_rank_rtol(a),
    )


@pytest.mark.parametrize("shape", [(5,), (3, 0), (2, 3, 4)])
def test_rejects_what_is_not_a_matrix(shape):
    with pytest.raises(ValueError, match="tokens, features"):
        diagnostics.effective_rank(np.ones(shape, np.float32))


def test_norm_shrinkage_and_angles_from_their_definitions():
    rng = np.random.default_rng(0)
    sources = rng.standard_normal((3, 7, 5)).astype(np.float32)
    merged = sources.mean(axis=0)
    flat, vector = sources.reshape(3, -1).astype(np.float64), merged.reshape(-1).astype(np.float64)
    norms = np.linalg.norm(flat, axis=1)
    expected_angles = np.arccos(flat @ vector / (norms * np.linalg.norm(vector)))
    # at these angles (0.9 to 1.2 radians) a relative error d in a cosine moves the angle by
    # d / (angle * tan(angle)) < d relative
    np.testing.assert_allclose(
        diagnostics.norm_shrinkage(merged, sources),
        np.linalg.norm(vector) / norms.mean(),
        rtol=float32_rtol(merged.size),
    )
    np.testing.assert_allclose(
        diagnostics.source_angles(merged, sources), expected_angles, rtol=float32_rtol(merged.size)
    )


def test_the_linear_mean_of_orthogonal_sources_shrinks_and_slerp_does_not():
    sources = np.array([[3.0, 0.0], [0.0, 3.0]], np.float32)
    linear = sources.mean(axis=0)
    slerp = 3.0 * np.array([1.0, 1.0], np.float32) / np.sqrt(2)
    rtol = float32_rtol(2)
    assert float(diagnostics.norm_shrinkage(linear, sources)) == pytest.approx(
        1 / np.sqrt(2), rel=rtol
    )
    assert float(diagnostics.norm_shrinkage(slerp, sources)) == pytest.approx(1.0, rel=rtol)
    # arccos(c) has slope -1 / sin: sqrt(2) at pi / 4 and 1 at pi / 2; at 0 it turns an error
    # d in a cosine near 1 into an angle of sqrt(2 d)
    np.testing.assert_allclose(
        diagnostics.source_angles(slerp, sources), [np.pi / 4] * 2, rtol=np.sqrt(2) * rtol
    )
    np.testing.assert_allclose(
        diagnostics.source_angles(sources[0], sources), [0.0, np.pi / 2], atol=np.sqrt(2 * rtol)
    )
    assert np.isnan(diagnostics.source_angles(np.zeros(2, np.float32), sources)).all()


def test_weight_figures_check_shapes():
    with pytest.raises(ValueError, match="do not match"):
        diagnostics.norm_shrinkage(np.ones((4, 3)), np.ones((2, 3, 4)))


@pytest.mark.parametrize("name", ["identity", "full-rank gaussian", "known spectrum"])
def test_pr_lies_between_the_centered_stable_rank_and_its_square(name):
    """On one matrix SR <= PR <= SR^2: why Table 7's StableRank ~1 with PR > 2 means that the
    rank measures there were taken uncentered."""
    a = MATRICES[name]
    stable = float(diagnostics.stable_rank(a, center=True))
    pr = float(diagnostics.participation_ratio(a))
    rtol = 2 * sum_rtol(a)  # one bound for each side, the larger of the two measures' bounds
    assert stable * (1 - rtol) <= pr <= stable**2 * (1 + rtol)
