"""The factors of a LoRA adapter extracted from a task matrix by truncated SVD.

A fine-tuned weight W' (out x in) of a base weight W has the task matrix D = W' - W, with thin
SVD D = U diag(s) V^T, s_1 >= s_2 >= ... >= 0. Its best approximation of rank r in the Frobenius
(and spectral) norm is D_r = U_r diag(s_1..s_r) V_r^T, and

    ||D - D_r||_F = sqrt(s_{r+1}^2 + ... + s_n^2)

(Eckart and Young 1936, Mirsky 1960). A LoRA adapter adds (alpha / r) B A to W (Hu et al.
2021, "LoRA: Low-Rank Adaptation of Large Language Models"; PEFT's `lora_A` is A, r x in, and
its `lora_B` is B, out x r). With alpha = r, which extraction writes, B A = D_r when

    A = diag(s_r)^(1/2) V_r^T,  B = U_r diag(s_r)^(1/2)   (distribute_scale, the default), or
    A = diag(s_r) V_r^T,        B = U_r                   (the scale all in A),

as mergekit's `mergekit-extract-lora` splits them. The rank is min(max_rank, out, in), and with
sv_epsilon > 0 no more than the number of singular values above sv_epsilon, but at least 1 (a
LoRA module has rank >= 1). An embedding (vocabulary x dim) is decomposed transposed: PEFT's
`lora_embedding_A` (r x vocabulary) and `lora_embedding_B` (dim x r) add (alpha / r) (B A)^T.

The SVD runs in JAX in the compute dtype (float32; float64 under x64 mode), whatever the dtype
of the weights; the factors come back in that dtype.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jkarcher.numerics import compute_dtype


class LoraFactors(NamedTuple):
    """A (r x in) and B (out x r), with the Frobenius norms of D - B A (from the discarded
    singular values) and of D."""

    a: jax.Array
    b: jax.Array
    residual: float
    norm: float


def kept_rank(singular_values: np.ndarray, max_rank: int, sv_epsilon: float = 0.0) -> int:
    """The rank extraction keeps: min(max_rank, len(s)), and with sv_epsilon > 0 at most the
    count of singular values above sv_epsilon, but at least 1."""
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    rank = min(max_rank, len(singular_values))
    if sv_epsilon > 0:
        rank = min(rank, int(np.sum(np.asarray(singular_values) > sv_epsilon)))
    return max(rank, 1)


def lora_factors(
    delta: jax.Array | np.ndarray,
    max_rank: int,
    *,
    distribute_scale: bool = True,
    sv_epsilon: float = 0.0,
) -> LoraFactors:
    """A and B with B A the rank-r truncated SVD of the 2-D `delta` (module docstring): A is
    r x in, B is out x r, r = `kept_rank(s, max_rank, sv_epsilon)`."""
    if np.ndim(delta) != 2:
        raise ValueError(f"a task matrix is 2-D, got shape {list(np.shape(delta))}")
    u, s, vt = _svd(jnp.asarray(delta, compute_dtype()))
    singular_values = np.asarray(s, np.float64)
    rank = kept_rank(singular_values, max_rank, sv_epsilon)
    a, b = _split(u, s, vt, rank, distribute_scale)
    residual = float(np.sqrt(np.sum(singular_values[rank:] ** 2)))
    return LoraFactors(a, b, residual, float(np.sqrt(np.sum(singular_values**2))))


@jax.jit
def _svd(delta: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return jnp.linalg.svd(delta, full_matrices=False)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _split(
    u: jax.Array, s: jax.Array, vt: jax.Array, rank: int, distribute_scale: bool
) -> tuple[jax.Array, jax.Array]:
    kept = s[:rank]
    scale_a = jnp.sqrt(kept) if distribute_scale else kept
    scale_b = jnp.sqrt(kept) if distribute_scale else jnp.ones_like(kept)
    return scale_a[:, None] * vt[:rank], u[:, :rank] * scale_b[None, :]
