"""RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models",
arXiv:2212.09849, Sec. 3).

A linear layer y = x W^T (W stored as HF does, [out, in]) of model i was trained on inputs X_i
[tokens, in]. RegMean asks for the one W whose outputs on every model's inputs come closest to
that model's own, weighted by w_i per token of its T_i calibration tokens:

    W* = argmin_W  sum_i (w_i / T_i) ||X_i W^T - X_i W_i^T||_F^2
       = (sum_i w_i W_i G_i) (sum_i w_i G_i)^-1,           G_i = X_i^T X_i / T_i,

the normal equations' solution, with G_i model i's input Gram matrix [in, in] (a mean over its
calibration tokens, so calibration sets of different lengths weigh alike; `jkarcher.grams`
estimates it). The paper shrinks each Gram toward its diagonal by a factor alpha on the
off-diagonal entries,

    G~_i = alpha G_i + (1 - alpha) diag(G_i),

which keeps the sum positive definite when the calibration inputs span fewer than `in`
directions (with alpha = 1 the summed Grams must then have full rank, which takes more
calibration tokens than inputs: else the system is singular and its solution meaningless),
and interpolates between RegMean (alpha = 1) and an average weighted per input
coordinate by its second moment (alpha = 0). Its default, 0.6, is FusionBench's for CLIP and
GPT-2. An input coordinate that no model ever sees (a zero row and column of every G_i) leaves
its column of W undetermined; it takes the weighted average of the models' columns.

Invariants: equal G_i give the weighted average sum_i w_i W_i / sum_i w_i; when each model fits
its data exactly (Y_i = X_i W_i^T) and alpha = 1, W* is the least-squares fit of all the data
together. Tensors without a Gram (embeddings, norms, biases, any leaf whose `gram` is None) merge
as the weighted average, as the paper does. The solve runs in the compute dtype (float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jkarcher.methods.registry import MergeMethod, Param, register, unit_interval
from jkarcher.numerics import compute_dtype, sum_over_models, weighted_sum

DEFAULT_ALPHA = 0.6


def shrink_to_diagonal(gram: jax.Array, alpha) -> jax.Array:
    """alpha G + (1 - alpha) diag(G): the off-diagonal entries scaled by alpha."""
    return alpha * gram + (1 - alpha) * jnp.diag(jnp.diagonal(gram))


def regmean(
    stacked,
    weights,
    base=None,
    *,
    key=None,
    gram: jax.Array | None = None,
    alpha: float = DEFAULT_ALPHA,
) -> jax.Array:
    """(sum_i w_i W_i G~_i)(sum_i w_i G~_i)^-1 for a weight with Grams, else the weighted mean.

    Args:
      stacked: [N, out, in] the models' weights (any float dtype), or [N, ...] any leaf.
      weights: [N] non-negative weights, not all zero.
      gram: [N, in, in] each model's input Gram matrix (symmetric positive semi-definite), or
        None for a tensor that has none.
      alpha: the share of the Grams' off-diagonal entries kept, in [0, 1].

    Computed and returned in float32 (float64 under x64).
    """
    del base, key
    dtype = compute_dtype()
    w = weights.astype(dtype)
    average = weighted_sum(stacked, w) / jnp.sum(w)
    if gram is None:
        return average
    grams = [shrink_to_diagonal(w[i] * gram[i].astype(dtype), alpha) for i in range(len(gram))]
    normal = sum_over_models(grams)  # sum_i w_i G~_i, [in, in]
    right = sum_over_models(g @ stacked[i].astype(dtype).T for i, g in enumerate(grams))
    unseen = jnp.diagonal(normal) <= 0  # coordinates no model's inputs reach: keep the average
    normal = normal + jnp.diag(unseen.astype(dtype))
    right = jnp.where(unseen[:, None], average.T, right)
    return jnp.linalg.solve(normal, right).T


def _gram_shape(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """A weight [out, in] takes a Gram [in, in]; other leaves take none."""
    return (shape[1], shape[1]) if len(shape) == 2 else None


def _scratch(params, grams: bool, shape) -> tuple[float, float]:
    """The leaf's float32 scratch, in copies of a source [out, in]: with Grams, the weighted
    Grams [in, in] and their sum and solve, each in / out copies; without, an average."""
    del params
    if not grams or len(shape) != 2:
        return 0.1, 0.5
    ratio = shape[1] / shape[0]
    return 1.1 + ratio, 1 + ratio


register(
    MergeMethod(
        name="regmean",
        scratch=_scratch,
        leaf=regmean,
        params=(
            Param(
                "alpha",
                DEFAULT_ALPHA,
                "share of the input Grams' off-diagonal entries kept (1: exact RegMean)",
                check=unit_interval,
                traced=True,
            ),
        ),
        tensor_inputs=("gram",),
        tensor_inputs_required=True,
        inputs_per_leaf_optional=True,
        tensor_input_shapes={"gram": _gram_shape},
        summary="per linear layer, the weight that best reproduces every model's outputs on its "
        "own inputs (closed form from input Gram matrices); other tensors averaged",
        citation="https://arxiv.org/abs/2212.09849",
    )
)
