"""Collapse diagnostics of a merged model: activation statistics and weight-space figures.

Activation measures take a (tokens, features) matrix A of one layer's hidden states (m tokens,
n features) with singular values s_1 >= s_2 >= ... >= 0, and follow Wang, Ye & Yin (2026),
"Functionality-Oriented LLM Merging on the Fisher-Rao Manifold", Table 7:

    activation_variance  mean_j Var_t(A[t, j])   (population variance over tokens, per feature)
    effective_rank       exp(-sum_i p_i log p_i), p_i = s_i / sum_k s_k   (Roy & Vetterli 2007)
    stable_rank          ||A||_F^2 / ||A||_2^2 = sum_i s_i^2 / s_1^2
    participation_ratio  (sum_i l_i)^2 / sum_i l_i^2, l_i the eigenvalues of the covariance of A
    numerical_rank       #{i : s_i > max(m, n) * eps * s_1}

Centering. The variance and the participation ratio are defined through the covariance, so they
are centered (the per-feature mean over tokens is removed). The three rank measures are taken on
A itself, uncentered: that is what the paper's Table 7 implies. On any one matrix,
SR <= PR <= SR^2 (PR = (sum l)^2 / sum l^2 <= (sum l)^2 / l_1^2 = SR^2, l = s^2), so a stable
rank of 1.000 forces PR <= 1.001; yet Table 7 reports StableRank 1.000-1.004 with PR 2.7-13.6 at
every layer from 4 on. The two were thus not computed on the same matrix: the uncentered residual
stream of a deep layer is dominated by one direction, its large common mean (and a few massive
activations), which makes ||A||_2 ~ ||A||_F, while its centered covariance spreads over a few
directions. Pass `center=True` to a rank measure for the centered variant.

Conventions: a matrix with no energy (all zeros, or a constant matrix once centered) has rank
measures 0, as `np.linalg.matrix_rank` gives for a zero matrix. All arithmetic runs in float32
(float64 where JAX's x64 mode is on) whatever the input dtype; `eps` in `numerical_rank` is the
machine epsilon of that precision, as in `np.linalg.matrix_rank` on a float32 (float64) matrix.
Every sum and mean adds blocks of 16 entries and then the block sums pairwise
(`jkarcher.numerics.accurate_sum`), so its rounding error grows with the logarithm of its length
and does not depend on whether the function runs jitted (as in `activation_report`) or eagerly.
Singular values come from a singular value decomposition, never from squaring A, so values far
below s_1 stay accurate where the numerical-rank threshold needs them.

Weight-space figures compare one merged tensor with the N source tensors it was merged from
(stacked on axis 0, the layout of `jkarcher` leaf functions): the norm shrinkage
||merged|| / mean_i ||x_i|| (below 1 when averaging cuts the chord inside the sphere) and the angle
arccos(<merged, x_i> / (||merged|| ||x_i||)) to each source.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jkarcher.numerics import accurate_norm, accurate_sum

ACTIVATION_METRICS = (
    "activation_variance",
    "effective_rank",
    "stable_rank",
    "participation_ratio",
    "numerical_rank",
)


# Jitted, so that a measure called eagerly compiles one small program per shape, not one per step
# of the pairwise tree.
_sum = jax.jit(accurate_sum)
_norm = jax.jit(accurate_norm)


def _float(x) -> jax.Array:
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    return jnp.asarray(x, dtype=dtype)


def _matrix(activations) -> jax.Array:
    a = _float(activations)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"expected a non-empty (tokens, features) matrix, got shape {a.shape}")
    return a


def _token_mean(a: jax.Array) -> jax.Array:
    """The per-feature mean over tokens, shape (1, features), each column summed accurately."""
    return jax.vmap(_sum, in_axes=1)(a)[None, :] / a.shape[0]


def _centered(a: jax.Array) -> jax.Array:
    """A minus its per-feature mean over tokens, the mean refined by one corrective pass
    (mu += mean(A - mu)) so that a constant column centers to exactly zero."""
    mean = _token_mean(a)
    mean = mean + _token_mean(a - mean)
    return a - mean


def singular_values(activations, *, center: bool = False) -> jax.Array:
    """Singular values of A (of A minus its per-feature mean if `center`), descending."""
    a = _matrix(activations)
    return jnp.linalg.svd(_centered(a) if center else a, compute_uv=False)


def activation_variance(activations) -> jax.Array:
    """mean over features j of Var_t(A[t, j]), the population variance over tokens."""
    centered = _centered(_matrix(activations))
    return _sum(centered * centered) / centered.size


def effective_rank_of_spectrum(s: jax.Array) -> jax.Array:
    """exp(entropy of p = s / sum s), with 0 log 0 = 0; 0 when all s are 0 (Roy & Vetterli)."""
    total = _sum(s)
    p = s / jnp.where(total > 0, total, 1.0)
    entropy = -_sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.where(total > 0, jnp.exp(entropy), 0.0)


def stable_rank_of_spectrum(s: jax.Array) -> jax.Array:
    """sum s^2 / max(s)^2 (= ||A||_F^2 / ||A||_2^2); 0 when all s are 0."""
    top = jnp.max(s)
    return jnp.where(top > 0, _sum((s / jnp.where(top > 0, top, 1.0)) ** 2), 0.0)


def numerical_rank_of_spectrum(s: jax.Array, shape: tuple[int, int], eps: float) -> jax.Array:
    """#{s_i > max(m, n) * eps * max(s)} for a matrix of `shape` (m, n)."""
    return jnp.sum(s > max(shape) * eps * jnp.max(s)).astype(s.dtype)


def effective_rank(activations, *, center: bool = False) -> jax.Array:
    """Roy & Vetterli's effective rank exp(H(s / ||s||_1)) of A (uncentered by default)."""
    return effective_rank_of_spectrum(singular_values(activations, center=center))


def stable_rank(activations, *, center: bool = False) -> jax.Array:
    """||A||_F^2 / ||A||_2^2 (uncentered by default)."""
    return stable_rank_of_spectrum(singular_values(activations, center=center))


def numerical_rank(activations, *, center: bool = False, eps: float | None = None) -> jax.Array:
    """Number of singular values above max(m, n) * eps * s_1 (uncentered by default).

    `eps` defaults to the machine epsilon of the compute dtype (float32, or float64 under x64).
    """
    s = singular_values(activations, center=center)
    eps = float(jnp.finfo(s.dtype).eps) if eps is None else eps
    return numerical_rank_of_spectrum(s, np.shape(activations), eps)


def participation_ratio(activations) -> jax.Array:
    """(sum l)^2 / sum l^2 over the eigenvalues l of the covariance of A; 0 if A is constant.

    With centered C = A_c^T A_c / m: sum l = tr C = ||A_c||_F^2 / m and sum l^2 = ||C||_F^2,
    and ||A_c^T A_c||_F = ||A_c A_c^T||_F, so the smaller Gram matrix gives it without any
    eigendecomposition (the ratio is invariant to the 1/m scale).
    """
    a = _centered(_matrix(activations))
    gram = a @ a.T if a.shape[0] < a.shape[1] else a.T @ a
    trace, frobenius_sq = _sum(jnp.diagonal(gram)), _sum(gram * gram)
    has_variance = frobenius_sq > 0
    return jnp.where(has_variance, trace**2 / jnp.where(has_variance, frobenius_sq, 1.0), 0.0)


@jax.jit
def activation_report(activations) -> dict[str, jax.Array]:
    """All five measures of `ACTIVATION_METRICS` with one SVD of A (jitted, per shape)."""
    s = singular_values(activations)
    eps = float(jnp.finfo(s.dtype).eps)
    return {
        "activation_variance": activation_variance(activations),
        "effective_rank": effective_rank_of_spectrum(s),
        "stable_rank": stable_rank_of_spectrum(s),
        "participation_ratio": participation_ratio(activations),
        "numerical_rank": numerical_rank_of_spectrum(s, activations.shape, eps),
    }


def _source_norms_and_dots(merged, sources) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(||merged||, ||x_i|| for each i, <merged, x_i> for each i), reducing over minor axes."""
    merged, sources = _float(merged), _float(sources)
    if sources.shape[1:] != merged.shape:
        raise ValueError(
            f"sources of shape {sources.shape[1:]} (stacked {sources.shape}) do not match the "
            f"merged tensor's shape {merged.shape}"
        )
    flat = sources.reshape(sources.shape[0], -1)
    vector = merged.reshape(-1)
    return _norm(vector), jax.vmap(_norm)(flat), jax.vmap(_sum)(flat * vector)


def norm_shrinkage(merged, sources) -> jax.Array:
    """||merged|| / mean_i ||x_i|| for sources stacked [N, ...]: 1 keeps the sources' scale."""
    merged_norm, source_norms, _ = _source_norms_and_dots(merged, sources)
    return merged_norm / (_sum(source_norms) / source_norms.size)


def source_angles(merged, sources) -> jax.Array:
    """Angles (radians, [N]) between the merged tensor and each source x_i, as flat vectors:
    arccos(<merged, x_i> / (||merged|| ||x_i||)); NaN where either has zero norm."""
    merged_norm, source_norms, dots = _source_norms_and_dots(merged, sources)
    return jnp.arccos(jnp.clip(dots / (merged_norm * source_norms), -1.0, 1.0))
