r"""The diagonal Fisher information of a model over its predictions on data (docs/design.md,
"The Karcher merge, exactly": the Fisher preconditioning takes these estimates).

The Fisher of a model p_theta(y | x) over the predictions it makes on calibration data is, on the
diagonal and per prediction (one prediction per token of a language model),

    F = E_t E_{y ~ p_theta(. | x_<t)} [ (d log p_theta(y | x_<t) / d theta)^2 ]      (true Fisher)
    F = E_t [ (d log p_theta(y_t | x_<t) / d theta)^2 ],  y_t the token of the text  (empirical)

where E_t averages over every predicted token of the data. Matena & Raffel (2022, "Merging Models
with Fisher-Weighted Averaging", arXiv:2111.09832) use the true Fisher, one prediction per
example, F = 1/N sum_n E_{y ~ p(y|x_n)} (grad log p(y|x_n))^2, which their code computes with the
expectation over the classes taken exactly. A language model makes one prediction per token, over
a vocabulary too large for an exact expectation, so here each token's label is one sample of
p_theta(. | x_<t); with one prediction per example the estimator below is theirs with the
expectation sampled.

The estimator. Squared gradients per token would need one backward pass per token. Instead, per
sequence s (one row of a batch) we take one gradient

    g_s = d/d theta  sum_t m_st c_st log p_theta(y_st | x_s,<t)

with m_st in {0, 1} the mask of predictions that count, and return

    F_hat = sum_s g_s^2 / sum_s sum_t m_st           (squares elementwise, in float32).

- True Fisher: y_st ~ p_theta(. | x_s,<t) sampled independently at each position, given the text's
  prefix x_s,<t, and c_st = 1. The score has mean zero, E_y[grad log p(y | x_<t)] = 0, and the
  labels of different positions are independent, so E_y[g_t g_t'] = 0 for t != t' and
  E[g_s^2] = sum_t E[g_t^2]: F_hat is unbiased for the per-token Fisher above.
- Empirical Fisher: y_st is the text's token and c_st = +-1 are independent random signs
  (Rademacher), so E_c[c_t c_t'] = 0 for t != t' and E_c[g_s^2] = sum_t g_t^2 exactly: F_hat is
  unbiased for the per-token empirical Fisher. With one prediction per sequence it is exact.

So the estimate is a per-token mean however the tokens are grouped into sequences; the price of
one backward pass per sequence is variance from the cross terms, which averaging over sequences
and batches removes (roughly sqrt(2 / S) relative noise per coordinate over S long sequences).
Squared gradients of a whole batch's summed loss would be unbiased too, with about B times the
variance.

Memory is bounded: a jitted step per batch scans over its sequences, adding each squared gradient
to a float32 accumulator that it updates in place, so it holds the parameters, the accumulator,
one gradient and one sequence's activations, however many batches there are.

Any model with categorical outputs fits through a `predict_fn(params, batch)` returning
(logits [..., V], targets [...], mask [...]); `causal_lm_fisher` does it for the Flax decoder of
`jkarcher.models`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jkarcher import models
from jkarcher.config import ESTIMATORS

Params = Any
Batch = Any
# predict_fn(params, batch) -> (logits [..., V], targets [...] int, mask [...] in {0, 1}).
PredictFn = Callable[[Params, Batch], tuple[jax.Array, jax.Array, jax.Array]]


def diagonal_fisher(
    predict_fn: PredictFn,
    params: Params,
    batches: Iterable[Batch],
    *,
    key: jax.Array,
    estimator: str = "true",
) -> Params:
    """The diagonal Fisher of a categorical model over every prediction in `batches`.

    Args:
      predict_fn: (params, batch) -> (logits [B, ..., V], targets [B, ...] int, mask [B, ...]):
        the model's logits for each prediction, the data's label of each (used by the empirical
        Fisher) and a 0/1 mask of the predictions that count. It must accept a batch of one
        example (each example's gradient is taken alone).
      params: a pytree of float arrays (float32 for precise gradients).
      batches: pytrees whose leaves share a leading batch axis B; batches of one shape compile
        once.
      key: a `jax.random` key: label samples (true Fisher) or signs (empirical Fisher).
      estimator: "true" or "empirical" (see the module docstring for the exact estimator).

    Returns:
      A float32 pytree shaped like `params`: sum over examples of their squared gradients,
      divided by the number of predictions (the mask's sum over all batches).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    step = _fisher_step(predict_fn, estimator)
    total = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    count = jnp.zeros((), jnp.float32)
    for index, batch in enumerate(batches):
        total, count = step(params, total, count, batch, jax.random.fold_in(key, index))
    if count == 0:
        raise ValueError("the batches hold no predictions (every mask is 0): nothing to average")
    return jax.tree.map(lambda leaf: leaf / count, total)


def causal_lm_fisher(
    config: models.ModelConfig,
    params: Params,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    key: jax.Array,
    estimator: str = "true",
) -> Params:
    """The diagonal Fisher of a `jkarcher.models` decoder over the next-token predictions of
    (tokens [B, T], mask [B, T]) batches, such as `jkarcher.models.text_batches` makes.

    Token t + 1 is predicted from tokens 0..t wherever both positions are real (`next_token_mask`).
    """
    return diagonal_fisher(
        causal_lm_predictions(config), params, batches, key=key, estimator=estimator
    )


@functools.cache
def causal_lm_predictions(config: models.ModelConfig) -> PredictFn:
    """predict_fn of the decoder: (params, (tokens, mask)) -> next-token logits, targets, mask."""

    def predict(params: Params, batch: tuple[jax.Array, jax.Array]):
        tokens, mask = batch
        logits, _ = models.forward(config, params, tokens, mask)
        return logits[:, :-1], tokens[:, 1:], next_token_mask(mask)

    return predict


def next_token_mask(mask):
    """[B, T - 1]: 1 where token t + 1 is predicted from a real token t, i.e. both are real."""
    return mask[:, :-1] * mask[:, 1:]


def score_objective(predict_fn: PredictFn, estimator: str) -> Callable:
    """(params, batch, key) -> (sum_t m_t c_t log p(y_t | x_<t), sum_t m_t): the function whose
    gradient, squared, is one example's term of the estimator (module docstring).

    True Fisher: y_t ~ p(. | x_<t) (no gradient flows through the sampling) and c_t = 1;
    empirical Fisher: y_t the targets and c_t = +-1 with equal probability.
    """

    def objective(params, batch, key):
        logits, targets, mask = predict_fn(params, batch)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        mask = mask.astype(jnp.float32)
        if estimator == "true":
            labels = jax.random.categorical(key, jax.lax.stop_gradient(log_probs))
            coefficients = mask
        else:
            labels = targets
            coefficients = mask * jax.random.rademacher(key, mask.shape, jnp.float32)
        chosen = jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)
        return jnp.sum(coefficients * chosen[..., 0]), jnp.sum(mask)

    return objective


@functools.lru_cache(maxsize=16)
def _fisher_step(predict_fn: PredictFn, estimator: str) -> Callable:
    """Jitted (params, total, count, batch, key) -> (total + the squared gradient of each of the
    batch's examples in float32, count + its number of predictions).

    The examples run one after another, and `total` is donated and updated in place, so memory
    holds the parameters, the float32 total, one gradient and one example's activations.
    """
    gradient = jax.grad(score_objective(predict_fn, estimator), has_aux=True)

    def step(params, total, count, batch, key):
        def add_example(carry, example_and_key):
            total, count = carry
            example, example_key = example_and_key
            one = jax.tree.map(lambda x: x[None], example)
            grads, predictions = gradient(params, one, example_key)
            total = jax.tree.map(lambda t, g: t + jnp.square(g.astype(jnp.float32)), total, grads)
            return (total, count + predictions), None

        keys = jax.random.split(key, jax.tree.leaves(batch)[0].shape[0])
        (total, count), _ = jax.lax.scan(add_example, (total, count), (batch, keys))
        return total, count

    return jax.jit(step, donate_argnums=(1, 2))
