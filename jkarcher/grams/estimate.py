"""The input Gram matrices of a model's linear layers on calibration data, RegMean's statistics
(Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models",
arXiv:2212.09849, Sec. 3.1; `jkarcher.methods.regmean` merges with them).

A linear layer y = x W^T, W [out, in], sees one input x [in] per token. Its Gram matrix over the
calibration tokens t (those the mask marks as real; padding counts nowhere) is the mean

    G = 1/T sum_t x_t x_t^T        [in, in], symmetric positive semi-definite,

accumulated in float32 whatever the weights' dtype. Layers that read the same input (q, k and v;
gate and up) get equal Grams. The estimate runs the Flax decoder of `jkarcher.models` once per
batch and records each `Linear`'s input as the forward passes it (`flax.linen.intercept_methods`),
so it needs no gradient and holds one batch's activations and the running sums.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jkarcher.models.config import ModelConfig
from jkarcher.models.transformer import CausalLM, Linear

GRAMS = "grams"  # the Flax collection the recorded sums go to


def causal_lm_grams(
    config: ModelConfig, params: Any, batches: Iterable[tuple[np.ndarray, np.ndarray]]
) -> Any:
    """The mean input Gram of every linear layer over the real tokens of `batches`.

    Args:
      config: the decoder's architecture.
      params: its parameters (`jkarcher.models` layout), any float dtype.
      batches: (tokens [B, T] int, mask [B, T], 1 for real tokens and 0 for padding) pairs.

    Returns:
      A pytree with the structure of `params`: at each linear layer's `weight` [out, in] its
      Gram [in, in] (float32), and None at every other leaf (embeddings, norms, biases), the
      form `jkarcher.merge(..., method="regmean", gram=[...])` takes.

    Raises:
      ValueError: when the batches hold no real token.
    """
    sums, tokens = None, 0
    for batch_tokens, mask in batches:
        batch_sums = _gram_sums(config, params, jnp.asarray(batch_tokens), jnp.asarray(mask))
        sums = batch_sums if sums is None else jax.tree.map(jnp.add, sums, batch_sums)
        tokens += int(np.sum(mask))
    if not tokens:
        raise ValueError("the calibration batches hold no real token")
    return _like_params(params, jax.tree.map(lambda total: total / tokens, sums))


@functools.partial(jax.jit, static_argnums=0)
def _gram_sums(config: ModelConfig, params: Any, tokens: jax.Array, mask: jax.Array) -> Any:
    """{module path...: {"weight": sum over the batch's real tokens of x x^T}} of each Linear."""
    real = mask.astype(jnp.float32)[..., None]

    def record_input(next_fun, args, kwargs, context):
        if isinstance(context.module, Linear) and context.method_name == "__call__":
            inputs = args[0].astype(jnp.float32) * real
            gram = jnp.einsum("bti,btj->ij", inputs, inputs, precision=jax.lax.Precision.HIGHEST)
            context.module.sow(GRAMS, "weight", gram)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record_input):
        _, state = CausalLM(config).apply({"params": params}, tokens, mask, mutable=[GRAMS])
    return jax.tree.map(lambda sown: sown[0], state[GRAMS], is_leaf=lambda x: isinstance(x, tuple))


def _like_params(params: Any, grams: Any) -> Any:
    """`grams` (nested like the Linear modules) spread over the structure of `params`, None where
    a leaf has no Gram."""

    def gram_at(path, _):
        node = grams
        for entry in path:
            if not isinstance(node, dict) or entry.key not in node:
                return None
            node = node[entry.key]
        return node

    return jax.tree_util.tree_map_with_path(gram_at, params)
