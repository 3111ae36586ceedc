"""The Fisher of a checkpoint on disk, estimated on a text file and saved beside it (what
`scripts/fisher.py` and a merge's `params.fisher = {"text": ...}` run)."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm import tqdm

from jkarcher import models
from jkarcher.config import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN
from jkarcher.errors import JkarcherError
from jkarcher.fisher.diagonal import causal_lm_fisher, next_token_mask
from jkarcher.fisher.files import estimate_recipe, fisher_path, save_fisher
from jkarcher.io import resolve_checkpoint_dir


class FisherError(JkarcherError):
    """A Fisher estimate cannot be made from the data given; the message names the file."""


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
