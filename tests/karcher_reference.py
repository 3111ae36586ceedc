"""A float64 NumPy reference of the weighted Karcher mean, written from docs/design.md.

It iterates on full vectors (no Gram matrix, no coefficients), so it checks the library's
span-space formulation independently.
"""

from __future__ import annotations

import numpy as np

CUT_LOCUS_SIN = 1e-12


def karcher_reference(
    sources, weights=None, *, max_iter=10_000, tol=1e-14, step=1.0, eps=1e-12
) -> np.ndarray:
    """Weighted Karcher mean of the rows of `sources` (any shape [N, ...]), in float64."""
    x = np.asarray(sources, dtype=np.float64)
    shape = x.shape[1:]
    x = x.reshape(len(x), -1)
    w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1)
    scale = np.sum(w * norms) / np.sum(w)
    valid = norms > eps
    if not valid.any():
        return np.zeros(shape)
    units = x[valid] / norms[valid, None]
    alphas = w[valid] / np.sum(w[valid])
    u = starting_point(units, alphas)
    for _ in range(max_iter):
        tangent = step * mean_log(u, units, alphas)
        tangent_norm = np.linalg.norm(tangent)
        if tangent_norm < tol:
            break
        u = np.cos(tangent_norm) * u + np.sin(tangent_norm) * tangent / tangent_norm
        u /= np.linalg.norm(u)
    return (scale * u).reshape(shape)


def starting_point(units: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    mean = alphas @ units
    norm = np.linalg.norm(mean)
    return mean / norm if norm > 1e-6 else units[0]


def mean_log(u: np.ndarray, units: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """sum_i a_i log_u(u_i) with log_u(v) = theta / sin(theta) (v - cos(theta) u)."""
    cosines = np.clip(units @ u, -1.0, 1.0)
    thetas = np.arccos(cosines)
    sines = np.sin(thetas)
    with np.errstate(divide="ignore", invalid="ignore"):
        factors = np.where(thetas < 1e-8, 1.0, thetas / sines)
    factors = np.where((sines < CUT_LOCUS_SIN) & (thetas > 1.0), 0.0, factors)
    return np.sum((alphas * factors)[:, None] * (units - cosines[:, None] * u), axis=0)


def first_order_residual(merged, sources, weights) -> float:
    """||sum_i a_i log_u(u_i)|| at u = merged / ||merged||: zero at the Karcher mean (eq. 4)."""
    x = np.asarray(sources, dtype=np.float64).reshape(len(sources), -1)
    m = np.asarray(merged, dtype=np.float64).reshape(-1)
    norms = np.linalg.norm(x, axis=1)
    w = np.asarray(weights, dtype=np.float64)
    return float(np.linalg.norm(mean_log(m / np.linalg.norm(m), x / norms[:, None], w / w.sum())))


def curvature_bound(sources, weights) -> float:
    """A lower bound of the Hessian of f(u) = 1/2 sum a_i theta_i^2 at the Karcher mean.

    Each term's Hessian has eigenvalues 1 and theta_i cot theta_i <= 1, so the sum is at least
    sum_i a_i theta_i cot theta_i (for all theta_i < pi/2). A direction u with first-order residual
    r = |sum_i a_i log_u(u_i)| is then within r / lambda of the mean.
    """
    x = np.asarray(sources, np.float64).reshape(len(sources), -1)
    u = karcher_reference(x, weights)
    u = u / np.linalg.norm(u)
    thetas = np.arccos(np.clip((x / np.linalg.norm(x, axis=1, keepdims=True)) @ u, -1, 1))
    assert thetas.max() < np.pi / 2
    alphas = np.asarray(weights) / np.sum(weights)
    return float(np.sum(alphas * thetas / np.tan(thetas)))


def sources_with_cosine(rng, n, shape, cosine, norms=None) -> np.ndarray:
    """N random sources whose pairwise cosines are about `cosine`: c g + e_i, c^2 = cos/(1-cos)."""
    size = int(np.prod(shape))
    shared = rng.standard_normal(size) * np.sqrt(cosine / (1.0 - cosine))
    x = shared + rng.standard_normal((n, size))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    norms = np.full(n, 3.0) if norms is None else np.asarray(norms, dtype=np.float64)
    return (x * norms[:, None]).reshape((n, *shape))


def relative_error(actual, expected) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def min_cosine(sources) -> float:
    x = np.asarray(sources, dtype=np.float64).reshape(len(sources), -1)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    return float((u @ u.T).min())


def fisher_karcher_reference(
    sources, weights, fisher, *, max_iter=10_000, tol=1e-14, step=1.0, eps=1e-12
) -> np.ndarray:
    """The Fisher-preconditioned mean in float64: per-coordinate weights a_i F_i / sum_j a_j F_j
    in the tangent average, projected onto the tangent space, from the Fisher-weighted start."""
    x = np.asarray(sources, dtype=np.float64)
    shape = x.shape[1:]
    x = x.reshape(len(x), -1)
    f = np.maximum(np.asarray(fisher, dtype=np.float64).reshape(len(x), -1), 0.0)
    w = np.asarray(weights, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1)
    scale = np.sum(w * norms) / np.sum(w)
    valid = norms > eps
    units = x[valid] / norms[valid, None]
    alphas = w[valid] / np.sum(w[valid])
    weighted = alphas[:, None] * f[valid]
    total = weighted.sum(axis=0)
    spread = np.where(total > 0, weighted / np.where(total > 0, total, 1.0), alphas[:, None])
    u = (spread * units).sum(axis=0)
    u /= np.linalg.norm(u)
    for _ in range(max_iter):
        cosines = np.clip(units @ u, -1.0, 1.0)
        thetas = np.arccos(cosines)
        factors = np.where(thetas < 1e-8, 1.0, thetas / np.sin(np.maximum(thetas, 1e-300)))
        tangent = step * np.sum(factors[:, None] * spread * (units - cosines[:, None] * u), axis=0)
        tangent -= (tangent @ u) * u
        tangent_norm = np.linalg.norm(tangent)
        if tangent_norm < tol:
            break
        u = np.cos(tangent_norm) * u + np.sin(tangent_norm) * tangent / tangent_norm
        u /= np.linalg.norm(u)
    return (scale * u).reshape(shape)
