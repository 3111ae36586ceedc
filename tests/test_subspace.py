"""TSV-M, Iso-C and Iso-CTS against float64 NumPy references written from their papers, and the
invariants the papers state."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers_checkpoints import make_models, read_all
from helpers_mergekit import require_oracle

import jkarcher
from jkarcher import mergekit_yaml, pipeline
from jkarcher.config import validate
from jkarcher.methods.subspace import iso_cts_sizes

EPS32 = float(np.finfo(np.float32).eps)


def _svd(matrix):
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return u, s, vt.T


def _orthonormal(columns):
    p, _, qt = np.linalg.svd(columns, full_matrices=False)
    return p @ qt


def reference_tsv(deltas):
    """Gargiulo et al. 2025, Sec. 4: top r/N triplets per task, U and V orthogonalized."""
    keep = min(deltas[0].shape) // len(deltas)
    parts = [_svd(d) for d in deltas]
    u = np.concatenate([p[0][:, :keep] for p in parts], axis=1)
    s = np.concatenate([p[1][:keep] for p in parts])
    v = np.concatenate([p[2][:, :keep] for p in parts], axis=1)
    return _orthonormal(u) @ np.diag(s) @ _orthonormal(v).T


def reference_iso_c(deltas):
    """Marczak et al. 2025, Sec. 4.1: the sum's singular values replaced by their mean."""
    u, s, v = _svd(sum(deltas))
    return s.mean() * u @ v.T


def reference_iso_cts(deltas, fraction):
    """Marczak et al. 2025, Sec. 4.2: common directions of the sum, task directions outside."""
    rank, n = min(deltas[0].shape), len(deltas)
    per_task = round((rank - int(rank * fraction)) / n)
    common = rank - n * per_task
    u, s, v = _svd(sum(deltas))
    us, ss, vs = [u[:, :common]], [s[:common]], [v[:, :common]]
    for d in deltas:
        ui, si, vi = _svd(d - u[:, :common] @ u[:, :common].T @ d)
        us.append(ui[:, :per_task])
        ss.append(si[:per_task])
        vs.append(vi[:, :per_task])
    u_perp = _orthonormal(np.concatenate(us, axis=1))
    v_perp = _orthonormal(np.concatenate(vs, axis=1))
    return np.concatenate(ss).mean() * u_perp @ v_perp.T


def _models(n=3, shape=(48, 32), seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape)
    models = base + 0.1 * rng.standard_normal((n, *shape))
    return models.astype(dtype), base.astype(dtype)


def _merge(method, models, base, **params):
    merged = jkarcher.merge(
        [jnp.asarray(m) for m in models], method=method, base=jnp.asarray(base), **params
    )
    return np.asarray(merged, np.float64)


def _tolerance(deltas):
    """A float32 SVD has backward error of a few eps ||A||, and moves a singular subspace by
    about that over the gap between its singular values (Wedin's theorem): so 10 eps over the
    smallest gap, relative to the largest singular value, of the task matrices and of their sum
    bounds the error of an update rebuilt from their singular vectors, relative to its size."""
    spectra = [np.linalg.svd(a, compute_uv=False) for a in (*deltas, sum(deltas))]
    gap = min(np.min(-np.diff(s)) / s[0] for s in spectra)
    return 10 * EPS32 / gap


@pytest.mark.parametrize(
    ("method", "reference", "params"),
    [
        ("tsv", reference_tsv, {}),
        ("iso_c", reference_iso_c, {}),
        ("iso_cts", lambda d: reference_iso_cts(d, 0.8), {}),
        ("iso_cts", lambda d: reference_iso_cts(d, 0.5), {"common_fraction": 0.5}),
    ],
)
def test_the_update_equals_the_float64_reference(method, reference, params):
    models, base = _models()
    deltas = [m.astype(np.float64) - base for m in models]
    expected = base + 0.7 * reference(deltas)
    merged = _merge(method, models, base, scaling=0.7, **params)
    error = np.max(np.abs(merged - expected)) / np.max(np.abs(expected - base))
    assert error < _tolerance(deltas), error


def _fusionbench_update(method, deltas, common_fraction):
    """FusionBench's merged task vector of `deltas` ({name: array} each), torch in float32."""
    import torch
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
        compute_and_sum_svd_mem_reduction,
    )

    vectors = [
        {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in d.items()} for d in deltas
    ]
    if method == "tsv":
        merged = compute_and_sum_svd_mem_reduction(vectors, accelerator="cpu")
    elif method == "iso_c":
        merged = iso_c(vectors, accelerator="cpu")
    else:
        merged = iso_cts(vectors, common_space_fraction=common_fraction, accelerator="cpu")
    return {k: v.numpy().astype(np.float64) for k, v in merged.items()}


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_the_update_equals_fusionbench(method):
    """FusionBench's TSV-M, Iso-C and Iso-CTS (their merged task vector, added to the base at
    scaling 0.7 as its algorithms do) on a matrix and a bias: the matrix agrees within the
    subspace bound of the float64 test above (both sides are float32), the bias (the mean task
    vector) to float32 rounding."""
    require_oracle("fusion_bench")
    models, base = _models(n=3, shape=(48, 32))
    biases, bias_base = _models(n=3, shape=(32,), seed=1)
    deltas = [
        {"w": m.astype(np.float64) - base, "b": b.astype(np.float64) - bias_base}
        for m, b in zip(models, biases, strict=True)
    ]
    theirs = _fusionbench_update(method, deltas, common_fraction=0.8)
    trees = [
        {"w": jnp.asarray(m), "b": jnp.asarray(b)} for m, b in zip(models, biases, strict=True)
    ]
    ours = jkarcher.merge(
        trees,
        method=method,
        base={"w": jnp.asarray(base), "b": jnp.asarray(bias_base)},
        scaling=0.7,
    )
    expected_w = base + 0.7 * theirs["w"]
    error = np.max(np.abs(np.asarray(ours["w"], np.float64) - expected_w)) / np.max(
        np.abs(expected_w - base)
    )
    assert error < _tolerance([d["w"] for d in deltas]), error
    np.testing.assert_allclose(
        np.asarray(ours["b"], np.float64), bias_base + 0.7 * theirs["b"], rtol=4 * EPS32, atol=0
    )


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_iso_flattens_the_spectrum(method):
    models, base = _models(n=4, shape=(40, 24))
    update = _merge(method, models, base) - base
    singular = np.linalg.svd(update, compute_uv=False)
    np.testing.assert_allclose(singular, singular[0], rtol=1e-5)  # full rank: k + N s = r
    s = np.linalg.svd(sum(m.astype(np.float64) - base for m in models), compute_uv=False)
    if method == "iso_c":  # its level is the mean singular value of the sum
        np.testing.assert_allclose(singular[0], s.mean(), rtol=1e-5)


def test_iso_cts_sizes_fill_the_rank():
    for rank in range(1, 70):
        for n in range(1, 9):
            for fraction in (0.0, 0.3, 0.8, 0.99):
                common, per_task = iso_cts_sizes(rank, n, fraction)
                assert common + n * per_task == rank and common >= 0 and per_task >= 0


def test_tsv_of_tasks_in_orthogonal_subspaces_is_their_sum():
    """Task matrices of rank r / N with mutually orthogonal row and column spaces keep every
    singular triplet, and their concatenated vectors are already orthonormal: TSV-M adds them,
    which is task arithmetic."""
    rng = np.random.default_rng(1)
    n, rank_each, shape = 3, 8, (36, 24)
    q_left, _ = np.linalg.qr(rng.standard_normal((shape[0], n * rank_each)))
    q_right, _ = np.linalg.qr(rng.standard_normal((shape[1], n * rank_each)))
    deltas = [
        q_left[:, i * rank_each : (i + 1) * rank_each]
        @ np.diag(rng.uniform(1, 2, rank_each))
        @ q_right[:, i * rank_each : (i + 1) * rank_each].T
        for i in range(n)
    ]
    base = rng.standard_normal(shape)
    models = np.stack([base + d for d in deltas]).astype(np.float32)
    merged = _merge("tsv", models, base.astype(np.float32))
    expected = base.astype(np.float32).astype(np.float64) + sum(
        m.astype(np.float64) - base.astype(np.float32) for m in models
    )
    np.testing.assert_allclose(merged, expected, atol=1e-5)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_vectors_merge_as_the_mean_task_vector(method):
    models, base = _models(shape=(40,))
    merged = _merge(method, models, base, scaling=2.0)
    expected = base + 2.0 * (models.astype(np.float64) - base).mean(0)
    np.testing.assert_allclose(merged, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_bfloat16_sources_are_rounded_once(method):
    models, base = _models(dtype=ml_dtypes.bfloat16)
    merged = jkarcher.merge([jnp.asarray(m) for m in models], method=method, base=base)
    assert merged.dtype == jnp.bfloat16
    in_float32 = _merge(method, models.astype(np.float32), base.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(merged), in_float32.astype(ml_dtypes.bfloat16))


def test_a_mergekit_yaml_runs_iso_cts_on_bfloat16_checkpoints(tmp_path):
    """A jkarcher-only method in a mergekit YAML: the written checkpoint equals `jkarcher.merge`
    of the same arrays, tensor by tensor."""
    paths = make_models(tmp_path / "models", 4)
    document = tmp_path / "merge.yml"
    document.write_text(
        f"merge_method: iso_cts\nbase_model: {paths[0]}\n"
        "parameters:\n  scaling: 0.5\n  common_fraction: 0.6\n"
        "models:\n" + "".join(f"  - model: {p}\n" for p in paths[1:]) + "dtype: bfloat16\n"
    )
    translation = mergekit_yaml.load(document)
    config = validate(translation.fields | {"output": str(tmp_path / "out"), "mesh": "devices:1"})
    pipeline.run(pipeline.plan_merge(config))
    written = read_all(tmp_path / "out")
    base, *models = [read_all(p) for p in paths]
    for name, tensor in written.items():
        expected = jkarcher.merge(
            [jnp.asarray(m[name]) for m in models],
            method="iso_cts",
            base=jnp.asarray(base[name]),
            scaling=0.5,
            common_fraction=0.6,
        )
        assert tensor.dtype == ml_dtypes.bfloat16, name
        np.testing.assert_array_equal(tensor, np.asarray(expected), err_msg=name)
