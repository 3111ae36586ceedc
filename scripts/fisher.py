r"""Estimate the diagonal Fisher of a checkpoint on a text and save it beside the checkpoint.

The text is tokenized with the checkpoint's own `tokenizer.json`, cut into windows of --seq_len
tokens and run in batches of --batch_size windows (the last one padded). `jkarcher.fisher` takes
the per-token mean of squared gradients of the next-token log-likelihood, with labels sampled from
the model (--estimator=true) or the text's tokens (--estimator=empirical); see the docstring of
`jkarcher/fisher/diagonal.py` for the exact estimator. The result is written as float32
`fisher.safetensors` in the checkpoint's directory (or --output), under the checkpoint's tensor
names, so merges read it like weights:

    python scripts/fisher.py --checkpoint=/models/math --text=calibration.txt \
      --seq_len=512 --batch_size=8 --num_batches=64

Fisher-weighted merges then take it with `jkarcher.fisher.load_fisher(checkpoint_dir)`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
from absl import app, flags

from jkarcher import fisher
from jkarcher.errors import JkarcherError

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "HF checkpoint directory (or a hub id in the HF cache).")
flags.DEFINE_string("text", None, "A UTF-8 calibration text file.")
flags.DEFINE_enum(
    "estimator",
    "true",
    list(fisher.ESTIMATORS),
    "true: labels sampled from the model; empirical: the text's next tokens.",
)
flags.DEFINE_integer("num_batches", None, "Use at most this many batches of the text.")
flags.DEFINE_integer(
    "seq_len", fisher.DEFAULT_SEQ_LEN, "Tokens per window (with the tokenizer's leading specials)."
)
flags.DEFINE_integer("batch_size", fisher.DEFAULT_BATCH_SIZE, "Windows per batch.")
flags.DEFINE_integer("seed", 0, "Seed of the label samples (true) or signs (empirical).")
flags.DEFINE_enum(
    "dtype",
    "float32",
    ["float32", "bfloat16", "float16"],
    "Dtype of the weights and gradients; squares are summed in float32 either way.",
)
flags.DEFINE_string(
    "output",
    None,
    "Where to write the Fisher (default: fisher.safetensors in the checkpoint directory).",
)
flags.mark_flags_as_required(["checkpoint", "text"])


def main(argv):
    del argv
    try:
        run = fisher.checkpoint_fisher(
            FLAGS.checkpoint,
            FLAGS.text,
            output=FLAGS.output,
            estimator=FLAGS.estimator,
            seq_len=FLAGS.seq_len,
            batch_size=FLAGS.batch_size,
            num_batches=FLAGS.num_batches,
            seed=FLAGS.seed,
            dtype=jnp.dtype(FLAGS.dtype),
            progress=True,
        )
    except (JkarcherError, OSError) as err:
        sys.exit(f"error: {err}")
    print(f"{Path(FLAGS.checkpoint).name}: {run}")


if __name__ == "__main__":
    app.run(main)
