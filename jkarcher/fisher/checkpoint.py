"""The Fisher of a checkpoint on disk, estimated on a text file and saved beside it (what
`scripts/fisher.py` and a merge's `params.fisher = {"text": ...}` run)."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from jkarcher.config import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN
from jkarcher.fisher.diagonal import causal_lm_fisher, next_token_mask
from jkarcher.fisher.files import estimate_recipe, fisher_path
from jkarcher.models.calibration import CalibrationRun, estimate_on_text


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
) -> CalibrationRun:
    """Estimate the diagonal Fisher of an HF checkpoint on a UTF-8 text file and save it.

    `estimate_on_text` with `causal_lm_fisher` (key `jax.random.key(seed)`): the estimate is
    written atomically to `output`, default `fisher_path(checkpoint_dir)`, with its
    `estimate_recipe`, the text's name and the count of predicted tokens as metadata.
    `progress` shows a progress bar.

    Raises `jkarcher.models.calibration.CalibrationError`, naming the text, before the model is
    loaded, when the text gives no token to predict or a token the model has no embedding for.
    """
    recipe = estimate_recipe(
        text_file,
        estimator=estimator,
        seq_len=seq_len,
        batch_size=batch_size,
        num_batches=num_batches,
        seed=seed,
    )
    fisher = functools.partial(causal_lm_fisher, key=jax.random.key(seed), estimator=estimator)
    return estimate_on_text(
        checkpoint_dir,
        text_file,
        fisher,
        statistic=f"{estimator} Fisher",
        counted=next_token_mask,
        recipe=recipe,
        output=output or fisher_path(checkpoint_dir),
        seq_len=seq_len,
        batch_size=batch_size,
        num_batches=num_batches,
        dtype=dtype,
        progress=progress,
    )
