"""Merges in the singular subspaces of task matrices: TSV-M, Iso-C and Iso-CTS.

Each works on the task matrices Delta_i = X_i - base of a 2-D weight, with singular value
decompositions Delta = U S V^T (thin, singular values in decreasing order, r = min(m, n)), and
returns base + lambda M for an update M built from singular vectors:

- TSV-M (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model
  Merging", arXiv:2412.00081, Sec. 4): keep the top k = floor(r / N) triplets of each Delta_i,
  concatenate them, U_c = [U_1k .. U_Nk], S_c = diag(S_1k .. S_Nk), V_c = [V_1k .. V_Nk], replace
  U_c and V_c by their nearest matrices with orthonormal columns (P Q^T from U_c = P Sigma Q^T),
  which removes the interference between tasks' directions, and take M = U_perp S_c V_perp^T.
- Iso-C (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces", arXiv:2502.04959, Sec. 4.1): the task-arithmetic sum
  Delta_TA = sum_i Delta_i = U S V^T with its spectrum flattened, M = mean(S) U V^T.
- Iso-CTS (the same paper, Sec. 4.2): with k0 = floor(f r) for a common fraction f, each task
  gets s = round((r - k0) / N) directions (at most floor(r / N)) and the common subspace the
  k = r - N s top singular vectors U_k of Delta_TA; task i contributes the top s triplets of its
  part outside the common subspace, (I - U_k U_k^T) Delta_i; the common and task-specific
  vectors are concatenated, orthogonalized as in TSV-M, and given one singular value, the mean
  of the k + N s kept ones.

Tensors that are not matrices (norms, biases) merge as the mean task vector, M = mean_i Delta_i,
as both papers do. The per-model weights take no part. Decompositions run in the compute dtype
(float32) with `jnp.linalg.svd`, or for TSV-M's per-task triplets optionally with
`jkarcher.linalg.randomized_svd`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jkarcher.linalg import randomized_svd
from jkarcher.methods.registry import (
    BASE_REQUIRED,
    MergeMethod,
    Param,
    boolean,
    number,
    register,
)
from jkarcher.methods.task_arithmetic import task_vectors
from jkarcher.numerics import sum_over_models


def _nearest_orthonormal(columns: jax.Array) -> jax.Array:
    """The matrix with orthonormal columns nearest to `columns` in Frobenius norm: P Q^T from
    the thin SVD columns = P Sigma Q^T (the orthogonal Procrustes solution)."""
    p, _, qt = jnp.linalg.svd(columns, full_matrices=False)
    return p @ qt


def _svd(matrix: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The thin SVD (U [m, r], S [r] decreasing, V [n, r])."""
    u, s, vt = jnp.linalg.svd(matrix, full_matrices=False)
    return u, s, vt.T


def tsv_update(deltas: list[jax.Array], randomized: bool = False) -> jax.Array:
    """TSV-M's update of one matrix: the top floor(r / N) singular triplets of each task matrix,
    with U and V orthogonalized, M = U_perp S_c V_perp^T (Gargiulo et al. 2025, Sec. 4). With
    `randomized`, each task's triplets come from `jkarcher.linalg.randomized_svd` (a fixed
    sketch per task, so the merge is deterministic) instead of a dense SVD."""
    keep = max(1, min(deltas[0].shape) // len(deltas))
    if randomized:
        keys = jax.random.split(jax.random.key(0), len(deltas))
        parts = [randomized_svd(delta, keep, k) for delta, k in zip(deltas, keys, strict=True)]
    else:
        parts = [_svd(delta) for delta in deltas]
    u = jnp.concatenate([u[:, :keep] for u, _, _ in parts], axis=1)
    s = jnp.concatenate([s[:keep] for _, s, _ in parts])
    v = jnp.concatenate([v[:, :keep] for _, _, v in parts], axis=1)
    return (_nearest_orthonormal(u) * s) @ _nearest_orthonormal(v).T


def iso_c_update(deltas: list[jax.Array]) -> jax.Array:
    """Iso-C's update of one matrix: sum_i Delta_i with every singular value replaced by their
    mean, M = mean(S) U V^T (Marczak et al. 2025, Sec. 4.1)."""
    u, s, v = _svd(sum_over_models(deltas))
    return jnp.mean(s) * (u @ v.T)


def iso_cts_sizes(rank: int, n_models: int, common_fraction: float) -> tuple[int, int]:
    """(k, s): the common subspace's size and each task's share of the rest, with k + N s = r."""
    common = int(rank * common_fraction)
    per_task = min(round((rank - common) / n_models), rank // n_models)
    return rank - n_models * per_task, per_task


def iso_cts_update(deltas: list[jax.Array], common_fraction: float) -> jax.Array:
    """Iso-CTS's update of one matrix: the top k directions of sum_i Delta_i and the top s of
    each Delta_i outside them, orthogonalized, all given their mean singular value (Marczak
    et al. 2025, Sec. 4.2)."""
    n = len(deltas)
    common, per_task = iso_cts_sizes(min(deltas[0].shape), n, common_fraction)
    u, s, v = _svd(sum_over_models(deltas))
    us, ss, vs = [u[:, :common]], [s[:common]], [v[:, :common]]
    for delta in deltas:
        outside = delta - u[:, :common] @ (u[:, :common].T @ delta)
        u_i, s_i, v_i = _svd(outside)
        us.append(u_i[:, :per_task])
        ss.append(s_i[:per_task])
        vs.append(v_i[:, :per_task])
    u_perp = _nearest_orthonormal(jnp.concatenate(us, axis=1))
    v_perp = _nearest_orthonormal(jnp.concatenate(vs, axis=1))
    return jnp.mean(jnp.concatenate(ss)) * (u_perp @ v_perp.T)


def _subspace_leaf(update):
    """A leaf base + scaling M, with M = update(task matrices) for a 2-D tensor, else their mean."""

    def leaf(stacked, weights, base, *, key=None, scaling, **params) -> jax.Array:
        del weights, key
        deltas = task_vectors(stacked, base)
        if stacked.ndim == 3:
            merged = update(deltas, **params)
        else:
            merged = sum_over_models(deltas) / len(deltas)
        return base.astype(merged.dtype) + scaling * merged

    leaf.__name__ = update.__name__.removesuffix("_update")
    leaf.__doc__ = (
        f"{update.__doc__}\n\n    The merge: base + scaling M (M: the mean task vector if not 2-D)."
    )
    return leaf


def _common_fraction(value) -> str | None:
    return None if number(value) is None and 0 <= value < 1 else "must be in [0, 1)"


_SCALING = Param(
    "scaling", 1.0, "lambda, the scale of the merged update", check=number, traced=True
)

for _name, _update, _extra, _scratch, _summary, _citation in (
    (
        "tsv",
        tsv_update,
        (
            Param(
                "randomized",
                False,
                "each task's top singular vectors by randomized subspace iteration",
                check=boolean,
            ),
        ),
        (1.6, 2),
        "each task's top singular vectors, decorrelated, added to the base (TSV-M)",
        "https://arxiv.org/abs/2412.00081",
    ),
    (
        "iso_c",
        iso_c_update,
        (),
        (0.1, 3),
        "the task-vector sum with a flat spectrum, added to the base",
        "https://arxiv.org/abs/2502.04959",
    ),
    (
        "iso_cts",
        iso_cts_update,
        (
            Param(
                "common_fraction",
                0.8,
                "the share of directions taken from the task-vector sum",
                check=_common_fraction,
            ),
        ),
        (2.25, 3.5),
        "common and task-specific singular directions with a flat spectrum",
        "https://arxiv.org/abs/2502.04959",
    ),
):
    register(
        MergeMethod(
            name=_name,
            leaf=_subspace_leaf(_update),
            params=(_SCALING, *_extra),
            base=BASE_REQUIRED,
            weighted=False,
            scratch=_scratch,
            summary=_summary,
            citation=_citation,
        )
    )
