r"""Diagonal Fisher information of a model on calibration data, estimated once and saved.

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
`jkarcher.models`. `checkpoint_fisher` estimates it for a checkpoint on disk from a text file
and saves it with its recipe (`estimate_recipe`: a merge tells by it whether a saved estimate is
current); `save_fisher` writes `fisher.safetensors` beside a checkpoint, with the checkpoint's
tensor names, and `load_fisher` / `fisher_tensors` read it back.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from tqdm import tqdm

from jkarcher import models
from jkarcher.errors import JkarcherError
from jkarcher.io import (
    CheckpointError,
    TensorInfo,
    read_header,
    read_tensor,
    resolve_checkpoint_dir,
)

ESTIMATORS = ("true", "empirical")
FISHER_NAME = "fisher.safetensors"
DEFAULT_SEQ_LEN = 256
DEFAULT_BATCH_SIZE = 8

Params = Any
Batch = Any
# predict_fn(params, batch) -> (logits [..., V], targets [...] int, mask [...] in {0, 1}).
PredictFn = Callable[[Params, Batch], tuple[jax.Array, jax.Array, jax.Array]]


class FisherError(JkarcherError):
    """A Fisher estimate cannot be made from the data given; the message names the file."""


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


# Files: fisher.safetensors beside the checkpoint, with the checkpoint's tensor names.


def fisher_path(checkpoint_dir: str | os.PathLike) -> Path:
    """Where the Fisher of a checkpoint lives: `fisher.safetensors` in its directory (a hub id
    resolves to its snapshot in the local HF cache)."""
    return resolve_checkpoint_dir(checkpoint_dir) / FISHER_NAME


def save_fisher(
    fisher: Params, path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a decoder-shaped Fisher pytree as float32 safetensors under the HF tensor names.

    The file is written to a temporary name in the same directory and renamed into place, so
    an interrupted run never leaves a partial `fisher.safetensors`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: np.asarray(jax.device_get(leaf), np.float32)
        for name, leaf in models.params_to_hf(fisher).items()
    }
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        safetensors.numpy.save_file(tensors, temporary, dict(metadata or {}))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


@dataclasses.dataclass(frozen=True)
class FisherRun:
    """A Fisher estimate that `checkpoint_fisher` made and wrote."""

    path: Path
    estimator: str
    predictions: int
    batches: int
    seconds: float

    def __str__(self) -> str:
        return (
            f"{self.estimator} Fisher over {self.predictions} predicted tokens of {self.batches} "
            f"batches in {self.seconds:.1f} s (compilation included); wrote {self.path}"
        )


def estimate_recipe(
    text_file: str | os.PathLike,
    *,
    estimator: str = "true",
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_batches: int | None = None,
    seed: int = 0,
) -> dict[str, str]:
    """Everything that decides a `checkpoint_fisher` estimate besides the model, as the text
    metadata it is saved with: the text by its SHA-256, and the settings.

    A saved estimate whose metadata holds the same recipe (`has_recipe`) need not be made again.
    """
    digest = hashlib.sha256(Path(text_file).read_bytes()).hexdigest()
    return {
        "text_sha256": digest,
        "estimator": estimator,
        "seq_len": str(seq_len),
        "batch_size": str(batch_size),
        "num_batches": "all" if num_batches is None else str(num_batches),
        "seed": str(seed),
    }


def has_recipe(path: str | os.PathLike, recipe: Mapping[str, str]) -> bool:
    """Whether `path` is a saved Fisher estimate made by `recipe` (`estimate_recipe`)."""
    if not Path(path).is_file():
        return False
    _, metadata = read_header(path)
    return all(metadata.get(key) == value for key, value in recipe.items())


def checkpoint_fisher(
    checkpoint_dir: str | os.PathLike,
    text_file: str | os.PathLike,
    *,
    output: str | os.PathLike | None = None,
    estimator: str = "true",
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_batches: int | None = None,
    seed: int = 0,
    dtype=jnp.float32,
    progress: bool = False,
) -> FisherRun:
    """Estimate the diagonal Fisher of an HF checkpoint on a UTF-8 text file and save it.

    The text is tokenized with the checkpoint's own `tokenizer.json`, cut into windows of
    `seq_len` tokens and run in batches of `batch_size` windows (the last one padded), at most
    `num_batches` of them, through `causal_lm_fisher` with the weights in `dtype` and the key
    `jax.random.key(seed)`. The estimate is written by `save_fisher` (atomically) to `output`,
    default `fisher_path(checkpoint_dir)`, with its `estimate_recipe`, the text's name and the
    counts of predictions and sequences as metadata. `progress` shows a progress bar.

    Raises FisherError, before the model is loaded, when the text gives no token to predict or
    a token the model has no embedding for.
    """
    directory = resolve_checkpoint_dir(checkpoint_dir)
    text_file = Path(text_file)
    try:
        batches = models.text_batches(
            directory,
            text_file.read_text(encoding="utf-8"),
            seq_len=seq_len,
            batch_size=batch_size,
            max_batches=num_batches,
            vocab_size=models.load_config(directory).vocab_size,
        )
    except models.TokenizerError as err:
        raise FisherError(f"{text_file}: {err}") from None
    predictions = sum(int(next_token_mask(mask).sum()) for _, mask in batches)
    if not predictions:
        raise FisherError(f"{text_file}: too short, it gives no token to predict")
    config, params = models.load(directory, dtype=jnp.dtype(dtype))
    start = time.perf_counter()
    estimate = causal_lm_fisher(
        config,
        params,
        tqdm(batches, desc=f"Fisher of {directory.name} ({estimator})", disable=not progress),
        key=jax.random.key(seed),
        estimator=estimator,
    )
    estimate = jax.block_until_ready(estimate)
    seconds = time.perf_counter() - start
    recipe = estimate_recipe(
        text_file,
        estimator=estimator,
        seq_len=seq_len,
        batch_size=batch_size,
        num_batches=num_batches,
        seed=seed,
    )
    metadata = recipe | {
        "text": text_file.name,
        "predictions": str(predictions),
        "sequences": str(sum(int(mask.any(axis=1).sum()) for _, mask in batches)),
    }
    path = save_fisher(estimate, output or fisher_path(directory), metadata)
    return FisherRun(path, estimator, predictions, len(batches), seconds)


def fisher_tensors(
    checkpoint_dir: str | os.PathLike, path: str | os.PathLike | None = None
) -> dict[str, TensorInfo]:
    """{HF tensor name: where its Fisher lies} of a checkpoint's Fisher file (headers only).

    `path` overrides the default `fisher_path(checkpoint_dir)`. Read one tensor with
    `jkarcher.io.read_tensor(info)`.
    """
    file = Path(path) if path is not None else fisher_path(checkpoint_dir)
    if not file.is_file():
        raise CheckpointError(
            f"{file}: no Fisher estimate; compute one with "
            f"`python scripts/fisher.py --checkpoint={checkpoint_dir} --text=...`"
        )
    infos, _ = read_header(file)
    return infos


def load_fisher(checkpoint_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Params:
    """The Fisher of a checkpoint as a float32 pytree shaped like its `jkarcher.models` params.

    Every tensor the checkpoint's config needs must be in the file with its shape, and nothing
    else, so a Fisher of another model fails here, naming the file and the tensor.
    """
    directory = resolve_checkpoint_dir(checkpoint_dir)
    file = Path(path) if path is not None else directory / FISHER_NAME
    infos = fisher_tensors(directory, file)
    config = models.load_config(directory)
    expected = models.expected_tensors(config)
    missing = sorted(set(expected) - set(infos))
    extra = sorted(set(infos) - set(expected))
    if missing or extra:
        problem = f"lacks {missing[:3]}" if missing else f"has tensors the model lacks {extra[:3]}"
        raise CheckpointError(f"{file}: not the Fisher of {directory}: it {problem}")
    for name, shape in expected.items():
        if infos[name].shape != shape:
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {list(infos[name].shape)}, the model's is "
                f"{list(shape)}"
            )

    def read(keys, _):
        name = models.hf_name(tuple(key.key for key in keys))
        return jnp.asarray(read_tensor(infos[name]), jnp.float32)

    return jax.tree_util.tree_map_with_path(read, models.param_shapes(config))
