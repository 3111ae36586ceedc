r"""Perplexity and next-token accuracy of checkpoints on a text.

Each checkpoint tokenizes the text with its own `tokenizer.json` and runs the same windows and
batches as scripts/diagnose.py. Every real token after the first of its window is predicted from
the tokens before it; perplexity = exp(total negative log-likelihood / predicted tokens) and
accuracy = share of predictions whose argmax is the next token.

    python scripts/evaluate.py --checkpoints=/models/base,/models/karcher \
      --text=eval.txt --out_dir=/tmp/eval

prints a table and, with --out_dir, writes evaluation.csv and evaluation.md.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import jax.numpy as jnp
from absl import app, flags
from tqdm import tqdm

from jkarcher import models
from jkarcher.io import Checkpoint

FLAGS = flags.FLAGS
flags.DEFINE_list("checkpoints", None, "HF checkpoint directories (or hub ids in the HF cache).")
flags.DEFINE_list("names", None, "One display name per checkpoint (default: directory names).")
flags.DEFINE_string("text", None, "A UTF-8 text file to evaluate on.")
flags.DEFINE_integer("seq_len", 256, "Tokens per window (with the tokenizer's leading specials).")
flags.DEFINE_integer("batch_size", 8, "Windows per batch.")
flags.DEFINE_integer("max_batches", None, "Use at most this many batches of the text.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Compute dtype.")
flags.DEFINE_string("out_dir", None, "If set, write evaluation.csv and evaluation.md here.")
flags.mark_flags_as_required(["checkpoints", "text"])


def model_names(checkpoints: list[str], names: list[str] | None) -> list[str]:
    """The display names: --names, or each checkpoint's directory name; they must be unique."""
    names = names or [Path(path.rstrip("/")).name for path in checkpoints]
    if len(names) != len(checkpoints):
        raise app.UsageError(f"{len(names)} --names for {len(checkpoints)} --checkpoints")
    if len(set(names)) != len(names):
        raise app.UsageError(f"model names must be unique, got {names}; pass --names")
    return names


def evaluate(checkpoint: str, name: str, text: str) -> dict:
    """{model, tokens, perplexity, accuracy} of one checkpoint on the text."""
    directory = Checkpoint(checkpoint).path  # a hub id resolves to its cached snapshot
    config, params = models.load(directory, dtype=jnp.dtype(FLAGS.dtype))
    batches = models.text_batches(
        directory,
        text,
        seq_len=FLAGS.seq_len,
        batch_size=FLAGS.batch_size,
        max_batches=FLAGS.max_batches,
        vocab_size=config.vocab_size,
    )

    def step(tokens, mask):
        return models.next_token_stats(config, params, tokens, mask)

    nll = correct = count = 0.0
    for (batch_nll, batch_correct, batch_count), _ in tqdm(
        models.stream(step, batches), total=len(batches), desc=name
    ):
        nll += float(batch_nll)
        correct += float(batch_correct)
        count += float(batch_count)
    if count == 0:
        raise app.UsageError(f"{name}: the text gives no tokens to predict")
    return {
        "model": name,
        "tokens": int(count),
        "perplexity": math.exp(nll / count),
        "accuracy": correct / count,
    }


def table_cells(rows: list[dict]) -> list[list[str]]:
    cells = [["Model", "Tokens", "Perplexity", "Accuracy"]]
    for row in rows:
        cells.append(
            [row["model"], str(row["tokens"]), f"{row['perplexity']:.4g}", f"{row['accuracy']:.4f}"]
        )
    return cells


def main(argv):
    del argv
    names = model_names(FLAGS.checkpoints, FLAGS.names)
    text = Path(FLAGS.text).read_text(encoding="utf-8")
    start = time.perf_counter()
    rows = [evaluate(path, name, text) for path, name in zip(FLAGS.checkpoints, names, strict=True)]
    cells = table_cells(rows)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for row in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
    if FLAGS.out_dir:
        out_dir = Path(FLAGS.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "evaluation.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        markdown = ["| " + " | ".join(row) + " |" for row in cells]
        markdown.insert(1, "|" + "---|" * len(cells[0]))
        (out_dir / "evaluation.md").write_text("\n".join(markdown) + "\n")
    print(f"{len(rows)} models evaluated in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    app.run(main)
