"""randomized_svd against numpy.linalg.svd in float64: the exact thin SVD where the sketch spans
the matrix, the top singular values and the rank-k error Halko et al. bound where it does not,
and the same result with the matrix sharded over a mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jkarcher
from jkarcher.linalg import randomized_svd
from jkarcher.methods.subspace import tsv_update

EPS32 = float(np.finfo(np.float32).eps)


def with_spectrum(m, n, singular_values, seed=0):
    """An [m, n] float64 matrix U diag(s) V^T with random orthonormal U and V."""
    rng = np.random.default_rng(seed)
    k = len(singular_values)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return u @ np.diag(singular_values) @ v.T


def as_float64(triplets):
    return tuple(np.asarray(t, np.float64) for t in triplets)


def test_exact_where_the_sketch_spans_the_matrix():
    """k + p >= rank(A): Q spans the range of A, so U S V^T is A up to float32 rounding of a
    few matmuls and QRs of length max(m, n) (a bound of 50 eps32 ||A||_2, checked on entries)."""
    matrix = with_spectrum(300, 200, np.linspace(5.0, 1.0, 12))
    u, s, v = as_float64(randomized_svd(jnp.asarray(matrix, jnp.float32), 8, jax.random.key(1)))
    exact = np.linalg.svd(matrix, compute_uv=False)
    np.testing.assert_allclose(s, exact[:8], rtol=0, atol=50 * EPS32 * exact[0])
    rebuilt = u @ np.diag(s) @ v.T
    best = np.linalg.svd(matrix, full_matrices=False)
    rank8 = best[0][:, :8] @ np.diag(best[1][:8]) @ best[2][:8]
    assert np.max(np.abs(rebuilt - rank8)) < 50 * EPS32 * exact[0]
    np.testing.assert_allclose(u.T @ u, np.eye(8), atol=20 * EPS32)
    np.testing.assert_allclose(v.T @ v, np.eye(8), atol=20 * EPS32)


def test_top_singular_values_and_the_error_bound():
    """A decaying spectrum of full rank: sigma_j = 0.8^j. With q = 2 power iterations the
    rank-k error ||A - U S V^T||_2 is within (1 + C (sigma_{k+1}/sigma_k)^(2q+1))-ish of the best,
    sigma_{k+1} (Halko et al. 2011, Cor. 10.10); here we hold it to 1.05 sigma_{k+1}, and the top
    k singular values to 1e-3 relative (their error falls as (sigma_{k+p+1}/sigma_j)^(2q+1))."""
    spectrum = 0.8 ** np.arange(120)
    matrix = with_spectrum(400, 160, spectrum, seed=2)
    k = 16
    u, s, v = as_float64(randomized_svd(jnp.asarray(matrix, jnp.float32), k, jax.random.key(0)))
    np.testing.assert_allclose(s, spectrum[:k], rtol=1e-3)
    assert np.all(np.diff(s) <= 0)
    error = np.linalg.norm(matrix - u @ np.diag(s) @ v.T, ord=2)
    assert spectrum[k] * (1 - 1e-6) <= error <= 1.05 * spectrum[k]


def test_bfloat16_input_computes_in_float32():
    matrix = with_spectrum(256, 128, np.linspace(3.0, 0.5, 10), seed=3)
    stored = jnp.asarray(matrix, jnp.bfloat16)
    u, s, v = randomized_svd(stored, 10, jax.random.key(0))
    assert u.dtype == s.dtype == v.dtype == jnp.float32
    exact = np.linalg.svd(np.asarray(stored, np.float64), compute_uv=False)
    np.testing.assert_allclose(np.asarray(s), exact[:10], rtol=0, atol=50 * EPS32 * exact[0])


def test_sharded_over_a_mesh_equals_one_device():
    """Rows of A over 8 devices: the matmuls are partitioned, the result equals the unsharded one
    up to the rounding of sums split across devices (the reconstruction to 100 eps32 ||A||_2)."""
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    matrix = jnp.asarray(with_spectrum(512, 96, 0.7 ** np.arange(40), seed=4), jnp.float32)
    mesh = Mesh(np.array(devices[:8]), ("rows",))
    sharded = jax.device_put(matrix, NamedSharding(mesh, PartitionSpec("rows", None)))
    run = jax.jit(lambda a: randomized_svd(a, 12, jax.random.key(5)))
    u1, s1, v1 = as_float64(run(matrix))
    u8, s8, v8 = as_float64(run(sharded))
    scale = float(s1[0])
    np.testing.assert_allclose(s8, s1, rtol=0, atol=100 * EPS32 * scale)
    rebuilt1, rebuilt8 = u1 @ np.diag(s1) @ v1.T, u8 @ np.diag(s8) @ v8.T
    assert np.max(np.abs(rebuilt8 - rebuilt1)) < 100 * EPS32 * scale


def test_tsv_randomized_equals_dense_on_low_rank_tasks():
    """Each task matrix of rank exactly floor(r / N): both keep all of it (and no direction of a
    zero singular value, which either SVD may choose freely and which would then enter the
    orthogonalization), so TSV-M's merge is the same up to float32 rounding of the decompositions
    (bound 200 eps32 times the largest task norm)."""
    rng = np.random.default_rng(6)
    m, n, tasks = 96, 64, 4
    keep = min(m, n) // tasks
    deltas = [with_spectrum(m, n, rng.uniform(0.5, 2.0, keep), seed=10 + i) for i in range(tasks)]
    as_jax = [jnp.asarray(d, jnp.float32) for d in deltas]
    dense = np.asarray(tsv_update(as_jax), np.float64)
    randomized = np.asarray(tsv_update(as_jax, randomized=True), np.float64)
    scale = max(np.linalg.norm(d, ord=2) for d in deltas)
    assert np.max(np.abs(randomized - dense)) < 200 * EPS32 * scale


def test_tsv_randomized_on_bfloat16_sources_matches_the_float64_reference():
    """TSV-M with `randomized` through `jkarcher.merge` on bf16 sources: tasks of rank
    floor(r / N) plus the rounding of bf16 storage, E_i. Against the float64 reference on the same
    (rounded) tasks, the randomized triplets differ by the perturbation of a rank-k subspace,
    a few ||E_i||_2 (Wedin), and the output by half a bf16 ulp of its rounding."""
    from test_subspace import reference_tsv

    rng = np.random.default_rng(7)
    m, n, tasks = 96, 64, 4
    keep = min(m, n) // tasks
    base = rng.standard_normal((m, n))
    exact = [with_spectrum(m, n, rng.uniform(2.0, 4.0, keep), seed=20 + i) for i in range(tasks)]
    bf16 = jnp.bfloat16
    stored_base = np.asarray(jnp.asarray(base, bf16), np.float64)
    stored = [np.asarray(jnp.asarray(base + d, bf16), np.float64) for d in exact]
    deltas = [x - stored_base for x in stored]
    rounding = max(np.linalg.norm(d - e, ord=2) for d, e in zip(deltas, exact, strict=True))
    expected = stored_base + reference_tsv(deltas)
    merged = jkarcher.merge(
        [{"w": jnp.asarray(x, bf16)} for x in stored],
        base={"w": jnp.asarray(stored_base, bf16)},
        method="tsv",
        randomized=True,
    )["w"]
    assert merged.dtype == bf16
    error = np.abs(np.asarray(merged, np.float64) - expected)
    half_ulp = 2.0**-8 * np.abs(expected)  # bf16 keeps 8 significant bits
    assert np.all(error <= half_ulp + 4 * rounding)
