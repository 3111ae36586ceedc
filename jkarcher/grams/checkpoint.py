"""The input Grams of a checkpoint on disk, estimated on a text file and saved beside it (what
`scripts/grams.py` and a merge's `params.gram = {"text": ...}` run)."""

from __future__ import annotations

import os

import jax.numpy as jnp

from jkarcher.config import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN
from jkarcher.grams.estimate import causal_lm_grams
from jkarcher.grams.files import gram_recipe, grams_path
from jkarcher.models.calibration import CalibrationRun, estimate_on_text


def checkpoint_grams(
    checkpoint_dir: str | os.PathLike,
    text_file: str | os.PathLike,
    *,
    output: str | os.PathLike | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_batches: int | None = None,
    dtype=jnp.float32,
    progress: bool = False,
) -> CalibrationRun:
    """Estimate the input Grams of an HF checkpoint's linear layers on a UTF-8 text file (every
    real token counts) and write them, with their `gram_recipe`, to `output` (default
    `grams_path(checkpoint_dir)`), under the weights' names: `estimate_on_text` with
    `causal_lm_grams`. Raises `jkarcher.models.calibration.CalibrationError`, naming the text,
    before the model is loaded, when the text gives no token or one the model lacks."""
    recipe = gram_recipe(text_file, seq_len=seq_len, batch_size=batch_size, num_batches=num_batches)
    return estimate_on_text(
        checkpoint_dir,
        text_file,
        causal_lm_grams,
        statistic="input Grams",
        counted=lambda mask: mask,
        recipe=recipe,
        output=output or grams_path(checkpoint_dir),
        seq_len=seq_len,
        batch_size=batch_size,
        num_batches=num_batches,
        dtype=dtype,
        progress=progress,
    )
