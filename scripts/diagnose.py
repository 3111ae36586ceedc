r"""Collapse diagnostics of checkpoints on a text: the paper's Table 7, as text, CSV, Markdown, PNG.

For each checkpoint, the text is tokenized with the checkpoint's own `tokenizer.json`, cut into
windows of --seq_len tokens and run in batches of --batch_size windows. For every chosen layer and
every batch, the real (unpadded) tokens' hidden states form a (tokens, features) matrix on which
`jkarcher.diagnostics` measures the mean variance, EffRank, StableRank, PR and NumRank; the table
reports each as mean ± std over batches (population std). Rank measures depend on the number of
tokens, so only full batches count (batch_size * seq_len real tokens each); the text's tail that
does not fill one is left out. Layer 0 is the embedding output, layer i the output of decoder
layer i, and the last layer is taken after the final norm (the layout of HF's
`output_hidden_states`).

    python scripts/diagnose.py \
      --checkpoints=/models/base,/models/karcher,/models/linear \
      --names=base,karcher,linear --text=eval.txt --layers=0,4,8,16 --out_dir=/tmp/diag

writes diagnostics.csv, diagnostics.md and one PNG per metric (<metric>.png) into --out_dir.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import jax.numpy as jnp
import matplotlib
import numpy as np
from absl import app, flags
from tqdm import tqdm

from jkarcher import diagnostics, models
from jkarcher.io import Checkpoint

matplotlib.use("Agg")
import matplotlib.pyplot as plt

FLAGS = flags.FLAGS
flags.DEFINE_list("checkpoints", None, "HF checkpoint directories (or hub ids in the HF cache).")
flags.DEFINE_list("names", None, "One display name per checkpoint (default: directory names).")
flags.DEFINE_string("text", None, "A UTF-8 text file to run the models on.")
flags.DEFINE_list("layers", None, "Hidden-state indices to measure (default: all, 0..L).")
flags.DEFINE_integer("seq_len", 256, "Tokens per window (with the tokenizer's leading specials).")
flags.DEFINE_integer("batch_size", 8, "Windows per batch.")
flags.DEFINE_integer("max_batches", None, "Use at most this many batches of the text.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Compute dtype.")
flags.DEFINE_string("out_dir", None, "Directory for diagnostics.csv, diagnostics.md and PNGs.")
flags.mark_flags_as_required(["checkpoints", "text", "out_dir"])

LABELS = {
    "activation_variance": "Mean Variance",
    "effective_rank": "EffRank",
    "stable_rank": "StableRank",
    "participation_ratio": "PR",
    "numerical_rank": "NumRank",
}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
AXIS_LABELS = {
    "activation_variance": "mean over features of the variance over tokens",
    "effective_rank": r"effective rank  $\exp H(\sigma / \Sigma\sigma)$",
    "stable_rank": r"stable rank  $\|A\|_F^2 / \|A\|_2^2$",
    "participation_ratio": r"participation ratio  $(\Sigma\lambda)^2 / \Sigma\lambda^2$",
    "numerical_rank": r"numerical rank  $\#\{\sigma > \max(m,n)\,\epsilon\,\sigma_1\}$",
}


def model_names(checkpoints: list[str], names: list[str] | None) -> list[str]:
    """The display names: --names, or each checkpoint's directory name; they must be unique."""
    names = names or [Path(path.rstrip("/")).name for path in checkpoints]
    if len(names) != len(checkpoints):
        raise app.UsageError(f"{len(names)} --names for {len(checkpoints)} --checkpoints")
    if len(set(names)) != len(names):
        raise app.UsageError(f"model names must be unique, got {names}; pass --names")
    return names


def chosen_layers(layers: list[str] | None, config: models.ModelConfig, name: str) -> tuple:
    """The hidden-state indices to measure, checked against the model's depth."""
    depth = config.num_hidden_layers
    chosen = tuple(int(layer) for layer in layers) if layers else tuple(range(depth + 1))
    bad = [layer for layer in chosen if not 0 <= layer <= depth]
    if bad:
        raise app.UsageError(f"{name}: layers {bad} out of range; it has layers 0..{depth}")
    return chosen


def measure(checkpoint: str, name: str, text: str) -> tuple[dict, int]:
    """({layer: {metric: one value per batch}}, number of real tokens) for one checkpoint."""
    directory = Checkpoint(checkpoint).path  # a hub id resolves to its cached snapshot
    config, params = models.load(directory, dtype=jnp.dtype(FLAGS.dtype))
    layers = chosen_layers(FLAGS.layers, config, name)
    batches = models.text_batches(
        directory,
        text,
        seq_len=FLAGS.seq_len,
        batch_size=FLAGS.batch_size,
        max_batches=FLAGS.max_batches,
        drop_remainder=True,
        vocab_size=config.vocab_size,
    )
    if not batches:
        raise app.UsageError(
            f"{name}: the text fills no whole batch of {FLAGS.batch_size} windows of "
            f"{FLAGS.seq_len} tokens; give a longer text or smaller --batch_size / --seq_len"
        )

    def step(tokens, mask):
        return models.selected_hidden_states(config, layers, params, tokens, mask)

    values = {layer: {metric: [] for metric in LABELS} for layer in layers}
    tokens = 0
    for hidden, mask in tqdm(models.stream(step, batches), total=len(batches), desc=name):
        real_tokens = mask.astype(bool)
        tokens += int(real_tokens.sum())
        for index, layer in enumerate(layers):
            report = diagnostics.activation_report(hidden[index][real_tokens])
            for metric, value in report.items():
                values[layer][metric].append(float(value))
    return values, tokens


def summary_rows(results: dict[str, dict[int, dict[str, list[float]]]]) -> list[dict]:
    """One row per (model, layer): batches, then mean and std over batches of each metric."""
    rows = []
    for name, per_layer in results.items():
        for layer, per_metric in per_layer.items():
            row = {"model": name, "layer": layer, "batches": len(per_metric["effective_rank"])}
            for metric, values in per_metric.items():
                row[f"{metric}_mean"] = float(np.mean(values))
                row[f"{metric}_std"] = float(np.std(values))
            rows.append(row)
    return rows


def format_mean_std(mean: float, std: float) -> str:
    """'849.2 ± 86.4', '1.000 ± 0.000', '0.06120 ± 0.00120': four significant digits of the
    mean, the std to the same decimal place."""
    if not math.isfinite(mean) or mean == 0:
        return f"{mean:g} ± {std:.3g}"
    decimals = max(0, 3 - math.floor(math.log10(abs(mean))))
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def table_cells(rows: list[dict]) -> list[list[str]]:
    """Header and rows of the paper's Table 7 layout, as strings."""
    cells = [["Model", "Layer", *LABELS.values()]]
    for row in rows:
        stats = [format_mean_std(row[f"{m}_mean"], row[f"{m}_std"]) for m in LABELS]
        cells.append([row["model"], str(row["layer"]), *stats])
    return cells


def text_table(cells: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    lines.insert(1, "|" + "---|" * len(cells[0]))
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_metric(rows: list[dict], metric: str, path: Path) -> None:
    """One line per model across layers with a ± std band; log scale when the values span more
    than two orders of magnitude."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    for index, name in enumerate(dict.fromkeys(row["model"] for row in rows)):
        mine = [row for row in rows if row["model"] == name]
        layers = [row["layer"] for row in mine]
        mean = np.array([row[f"{metric}_mean"] for row in mine])
        std = np.array([row[f"{metric}_std"] for row in mine])
        marker = MARKERS[index % len(MARKERS)]  # shapes tell apart lines that coincide
        (line,) = ax.plot(layers, mean, marker=marker, linewidth=1.8, alpha=0.9, label=name)
        ax.fill_between(layers, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    positive = [row[f"{metric}_mean"] for row in rows if row[f"{metric}_mean"] > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_yscale("log", nonpositive="clip")
    ax.set_title(f"{LABELS[metric]} across layers (mean ± std over batches)")
    ax.set_xlabel("layer (0 = embeddings; the last is after the final norm)")
    ax.set_ylabel(AXIS_LABELS[metric])
    layers = sorted({row["layer"] for row in rows})
    if len(layers) <= 20:
        ax.set_xticks(layers)  # a tick at each measured layer
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(title="model")
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv):
    del argv
    names = model_names(FLAGS.checkpoints, FLAGS.names)
    text = Path(FLAGS.text).read_text(encoding="utf-8")
    out_dir = Path(FLAGS.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results, tokens = {}, 0
    for path, name in zip(FLAGS.checkpoints, names, strict=True):
        results[name], model_tokens = measure(path, name, text)
        tokens += model_tokens
    rows = summary_rows(results)
    cells = table_cells(rows)
    print(text_table(cells))
    write_csv(rows, out_dir / "diagnostics.csv")
    (out_dir / "diagnostics.md").write_text(markdown_table(cells))
    for metric in LABELS:
        plot_metric(rows, metric, out_dir / f"{metric}.png")
    print(
        f"{len(names)} models, {tokens} tokens, {len(rows)} (model, layer) rows; table and "
        f"{len(LABELS)} plots in {out_dir} ({time.perf_counter() - start:.1f} s)"
    )


if __name__ == "__main__":
    app.run(main)
