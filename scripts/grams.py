r"""Estimate the input Grams of a checkpoint's linear layers on a text and save them beside it.

The text is tokenized with the checkpoint's own `tokenizer.json`, cut into windows of --seq_len
tokens and run in batches of --batch_size windows (the last one padded). Each linear layer's Gram
is the mean of x x^T over the text's tokens x of its input (see `jkarcher/grams/estimate.py`),
written as float32 `grams.safetensors` in the checkpoint's directory (or --output), under the
layer's weight name, so that RegMean merges read it like weights:

    python scripts/grams.py --checkpoint=/models/math --text=calibration.txt \
      --seq_len=512 --batch_size=8 --num_batches=64
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
from absl import app, flags

from jkarcher import grams
from jkarcher.config import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN
from jkarcher.errors import JkarcherError

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "HF checkpoint directory (or a hub id in the HF cache).")
flags.DEFINE_string("text", None, "A UTF-8 calibration text file.")
flags.DEFINE_integer("num_batches", None, "Use at most this many batches of the text.")
flags.DEFINE_integer(
    "seq_len", DEFAULT_SEQ_LEN, "Tokens per window (with the tokenizer's leading specials)."
)
flags.DEFINE_integer("batch_size", DEFAULT_BATCH_SIZE, "Windows per batch.")
flags.DEFINE_enum(
    "dtype",
    "float32",
    ["float32", "bfloat16", "float16"],
    "Dtype of the weights and activations; the Grams are summed in float32 either way.",
)
flags.DEFINE_string(
    "output", None, "Where to write the Grams (default: grams.safetensors in the checkpoint)."
)
flags.mark_flags_as_required(["checkpoint", "text"])


def main(argv):
    del argv
    try:
        run = grams.checkpoint_grams(
            FLAGS.checkpoint,
            FLAGS.text,
            output=FLAGS.output,
            seq_len=FLAGS.seq_len,
            batch_size=FLAGS.batch_size,
            num_batches=FLAGS.num_batches,
            dtype=jnp.dtype(FLAGS.dtype),
            progress=True,
        )
    except (JkarcherError, OSError) as err:
        sys.exit(f"error: {err}")
    print(f"{Path(FLAGS.checkpoint).name}: {run}")


if __name__ == "__main__":
    app.run(main)
