"""Statistics of a checkpoint on disk estimated on a text file and saved beside it: the steps
that `jkarcher.fisher.checkpoint_fisher` (its diagonal Fisher) and
`jkarcher.grams.checkpoint_grams` (its linear layers' input Grams) share."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jkarcher.errors import JkarcherError
from jkarcher.io import resolve_checkpoint_dir
from jkarcher.models.checkpoint import load, save_statistics
from jkarcher.models.text import TokenizerError, file_batches


class CalibrationError(JkarcherError):
    """A statistic cannot be estimated from the text given; the message names the file."""


@dataclasses.dataclass(frozen=True)
class CalibrationRun:
    """An estimate that `estimate_on_text` made and wrote."""

    path: Path
    statistic: str  # what was estimated, e.g. "true Fisher"
    tokens: int  # the tokens it averages over
    batches: int
    seconds: float

    def __str__(self) -> str:
        return (
            f"{self.statistic} over {self.tokens} tokens of {self.batches} batches in "
            f"{self.seconds:.1f} s (compilation included); wrote {self.path}"
        )


def estimate_on_text(
    checkpoint_dir: str | os.PathLike,
    text_file: str | os.PathLike,
    estimate: Callable[[Any, Any, Any], Any],
    *,
    statistic: str,
    counted: Callable[[np.ndarray], np.ndarray],
    recipe: Mapping[str, str],
    output: str | os.PathLike,
    seq_len: int,
    batch_size: int,
    num_batches: int | None,
    dtype=jnp.float32,
    progress: bool = False,
) -> CalibrationRun:
    """`estimate(config, params, batches)` of an HF checkpoint on a UTF-8 text file, saved.

    The text is tokenized with the checkpoint's own `tokenizer.json`, cut into windows of
    `seq_len` tokens and run in batches of `batch_size` windows (the last one padded), at most
    `num_batches` of them, with the weights in `dtype`. The estimate (a pytree with the
    parameters' structure) is written atomically to `output` with `recipe`, the text's name and
    the count of tokens it averages over (`counted(mask)` marks them) as metadata.

    Raises CalibrationError, before the model is loaded, when the text gives no such token or a
    token the model has no embedding for.
    """
    directory = resolve_checkpoint_dir(checkpoint_dir)
    text_file = Path(text_file)
    try:
        batches = file_batches(
            directory, text_file, seq_len=seq_len, batch_size=batch_size, max_batches=num_batches
        )
    except TokenizerError as err:
        raise CalibrationError(str(err)) from None
    tokens = sum(int(np.sum(counted(mask))) for _, mask in batches)
    if not tokens:
        raise CalibrationError(f"{text_file}: too short, it gives no token to estimate on")
    config, params = load(directory, dtype=jnp.dtype(dtype))
    start = time.perf_counter()
    shown = tqdm(batches, desc=f"{statistic} of {directory.name}", disable=not progress)
    result = jax.block_until_ready(estimate(config, params, shown))
    seconds = time.perf_counter() - start
    metadata = dict(recipe) | {"text": text_file.name, "tokens": str(tokens)}
    path = save_statistics(result, output, metadata)
    return CalibrationRun(path, statistic, tokens, len(batches), seconds)
