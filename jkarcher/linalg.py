"""Truncated singular value decompositions that need no dense SVD of the whole matrix.

`randomized_svd` is randomized subspace iteration (Halko, Martinsson, Tropp 2011, "Finding
structure with randomness", SIAM Review 53(2), Algorithms 4.4 and 5.1): for A [m, n], a target
rank k, oversampling p and q power iterations,

  Omega ~ N(0, 1) [n, k + p],   Q = orth(A Omega)
  q times:   Q = orth(A orth(A^T Q))          (each pass sharpens the spectrum by sigma^2)
  B = Q^T A [k + p, n] = U_B S V^T  (a small dense SVD),   A ~ (Q U_B) S V^T,  the top k kept,

where orth is a thin QR. Every step is a matmul of A with a thin matrix, a thin QR or an SVD of
a (k + p)-row matrix, so it runs where A is: on a GPU, or with A sharded over a mesh (XLA
partitions the matmuls; the thin factors are small). With singular values sigma_j, the error of
the rank-k approximation exceeds the best one, sigma_{k+1}, by a factor that tends to 1 as
(sigma_{k+1} / sigma_k)^(2q + 1) does (Halko et al., Corollary 10.10).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_OVERSAMPLE = 10
DEFAULT_POWER_ITERATIONS = 2


def randomized_svd(
    matrix: jax.Array,
    rank: int,
    key: jax.Array,
    *,
    oversample: int = DEFAULT_OVERSAMPLE,
    power_iterations: int = DEFAULT_POWER_ITERATIONS,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The top `rank` singular triplets of a 2-D `matrix`, by randomized subspace iteration.

    Args:
      matrix: [m, n], any float dtype; computed in its dtype promoted to at least float32.
      rank: k, the triplets returned (k + oversample is capped at min(m, n), where the result is
        the exact thin SVD up to rounding).
      key: a `jax.random` key for the Gaussian test matrix.
      oversample: p, extra sketch columns beyond k.
      power_iterations: q, passes of A A^T over the sketch.

    Returns:
      (U [m, k], S [k] decreasing, V [n, k]) with matrix ~ U diag(S) V^T.
    """
    a = matrix.astype(jnp.promote_types(matrix.dtype, jnp.float32))
    m, n = a.shape
    width = min(rank + oversample, m, n)
    sketch = jax.random.normal(key, (n, width), a.dtype)
    q, _ = jnp.linalg.qr(a @ sketch)
    for _ in range(power_iterations):
        z, _ = jnp.linalg.qr(a.T @ q)
        q, _ = jnp.linalg.qr(a @ z)
    u_small, s, vt = jnp.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ u_small)[:, :rank], s[:rank], vt[:rank].T
