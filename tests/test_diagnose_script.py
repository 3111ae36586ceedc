"""scripts/diagnose.py and scripts/evaluate.py end to end on tiny checkpoints and a tiny text."""

import csv
import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import matplotlib.image
import numpy as np
import pytest
from helpers_models import save_tiny_checkpoint, tiny_config, tiny_text

from jkarcher import diagnostics, models

ROOT = Path(__file__).resolve().parents[1]
WINDOWS = ["--seq_len=16", "--batch_size=4"]
LAYERS = (0, 1, 2)
HEADER = ["Model", "Layer", "Mean Variance", "EffRank", "StableRank", "PR", "NumRank"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Two tiny checkpoints with different tokenizers (Llama's adds <s>) and a text file."""
    root = tmp_path_factory.mktemp("diagnose")
    qwen = save_tiny_checkpoint(root / "qwen", tiny_config("qwen2"), seed=0, bos=False)
    llama = save_tiny_checkpoint(
        root / "llama", tiny_config("llama", tie_word_embeddings=True), seed=1, bos=True
    )
    text = root / "text.txt"
    text.write_text(tiny_text(250))  # ~18 windows: 4 full batches of 4 and a padded fifth
    return root, [qwen, llama], text


def run_script(name, *args):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def expected_means(checkpoint, text, layer):
    """Each metric's mean over the batches, computed here from the forward's hidden states."""
    config, params = models.load(checkpoint)
    batches = models.text_batches(
        checkpoint, text, seq_len=16, batch_size=4, max_batches=3, drop_remainder=True
    )
    assert len(batches) == 3 and all(mask.all() for _, mask in batches)
    per_batch = []
    for tokens, mask in batches:
        _, hidden_states = models.forward(config, params, tokens, mask)
        matrix = np.asarray(hidden_states[layer])[mask.astype(bool)]
        per_batch.append(
            {m: float(getattr(diagnostics, m)(matrix)) for m in diagnostics.ACTIVATION_METRICS}
        )
    return {m: np.mean([b[m] for b in per_batch]) for m in diagnostics.ACTIVATION_METRICS}


def test_diagnose_writes_table_csv_markdown_and_plots(workspace):
    root, checkpoints, text = workspace
    out = root / "out"
    result = run_script(
        "diagnose.py",
        f"--checkpoints={','.join(map(str, checkpoints))}",
        "--names=tiny-qwen,tiny-llama",
        f"--text={text}",
        f"--layers={','.join(map(str, LAYERS))}",
        f"--out_dir={out}",
        "--max_batches=3",
        *WINDOWS,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.split(r"\s{2,}", result.stdout.splitlines()[0].strip()) == HEADER
    assert "tiny-llama      2" in result.stdout

    with open(out / "diagnostics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], int(r["layer"])) for r in rows] == [
        (name, layer) for name in ("tiny-qwen", "tiny-llama") for layer in LAYERS
    ]
    assert all(int(r["batches"]) == 3 for r in rows)
    text_content = text.read_text()
    for row in (rows[1], rows[5]):  # qwen layer 1, llama layer 2 (after the final norm)
        checkpoint = checkpoints[0] if row["model"] == "tiny-qwen" else checkpoints[1]
        expected = expected_means(checkpoint, text_content, int(row["layer"]))
        for metric, value in expected.items():
            assert float(row[f"{metric}_mean"]) == pytest.approx(value, rel=1e-4), metric

    markdown = (out / "diagnostics.md").read_text().splitlines()
    assert markdown[0] == "| " + " | ".join(HEADER) + " |"
    assert len(markdown) == 2 + len(rows) and " ± " in markdown[2]

    for metric in diagnostics.ACTIVATION_METRICS:
        png = out / f"{metric}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width = matplotlib.image.imread(png).shape[:2]
        assert width >= 800 and height >= 450


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--layers=0,5", "qwen: layers [5] out of range; it has layers 0..2"),
        ("--seq_len=512", "qwen: the text fills no whole batch of 4 windows of 512 tokens"),
    ],
)
def test_diagnose_refuses_what_it_cannot_measure(workspace, flag, message):
    root, checkpoints, text = workspace
    result = run_script(
        "diagnose.py",
        f"--checkpoints={checkpoints[0]}",
        f"--text={text}",
        f"--out_dir={root / 'bad'}",
        *WINDOWS,
        flag,
    )
    assert result.returncode != 0
    assert message in result.stderr


def test_evaluate_reports_perplexity_and_accuracy(workspace):
    root, checkpoints, text = workspace
    out = root / "eval"
    result = run_script(
        "evaluate.py",
        f"--checkpoints={','.join(map(str, checkpoints))}",
        f"--text={text}",
        f"--out_dir={out}",
        *WINDOWS,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[:4] == ["Model", "Tokens", "Perplexity", "Accuracy"]
    with open(out / "evaluation.csv") as f:
        rows = {row["model"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"qwen", "llama"}
    assert (out / "evaluation.md").read_text().startswith("| Model | Tokens |")

    checkpoint = checkpoints[1]
    config, params = models.load(checkpoint)
    nll, correct, count = 0.0, 0, 0
    batches = models.text_batches(checkpoint, text.read_text(), seq_len=16, batch_size=4)
    assert not batches[-1][1].all()  # the padded tail counts too
    for tokens, mask in batches:
        logits, _ = models.forward(config, params, tokens, mask)
        log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        for row, length in enumerate(mask.sum(axis=1)):
            for t in range(length - 1):
                nll -= log_probs[row, t, tokens[row, t + 1]]
                correct += int(np.argmax(log_probs[row, t]) == tokens[row, t + 1])
                count += 1
    assert int(rows["llama"]["tokens"]) == count
    assert float(rows["llama"]["perplexity"]) == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert float(rows["llama"]["accuracy"]) == pytest.approx(correct / count)


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_numbers_follow_the_papers_style():
    diagnose = _load_script("diagnose")
    assert diagnose.format_mean_std(849.2, 86.4) == "849.2 ± 86.4"
    assert diagnose.format_mean_std(1.0002, 0.0001) == "1.000 ± 0.000"
    assert diagnose.format_mean_std(0.06121, 0.00118) == "0.06121 ± 0.00118"
    assert diagnose.format_mean_std(2284.3, 37.2) == "2284 ± 37"
    assert diagnose.format_mean_std(0.0, 0.0) == "0 ± 0"
