"""The small zoo and the study, end to end: outputs complete and sane (not who wins)."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from jkarcher.zoo.domains import DOMAINS
from jkarcher.zoo.recipes import SMALL
from jkarcher.zoo.study import applicable, study_rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_small_study_writes_every_method_and_n(tmp_path):
    out = tmp_path / "results"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "study.py"),
            "--zoo=small",
            f"--zoo_dir={tmp_path / 'zoo'}",
            f"--out={out}",
            "--examples=32",
            "--text_windows=8",
        ],
        check=True,
        cwd=ROOT,
    )
    with open(out / "study.csv") as f:
        rows = list(csv.DictReader(f))
    domains = [d.name for d in DOMAINS]
    for row in rows:
        for name in domains:
            assert 0.0 <= float(row[name]) <= 1.0
            assert float(row[f"{name}_perplexity"]) >= 1.0
    references = {row["model"]: row for row in rows if row["n_models"] == "1"}
    base = references["base"]
    for expert in SMALL.experts:
        own = references[f"expert-{expert.domain}"]
        name = expert.domain
        assert float(own[f"{name}_perplexity"]) < float(base[f"{name}_perplexity"])
        assert float(own[name]) >= float(base[name])
    pool = len(SMALL.experts) + 1
    merged = {(row["model"], int(row["n_models"])) for row in rows if row["n_models"] != "1"}
    expected = {(m, n) for m in study_rows() for n in range(2, pool + 1) if applicable(m, n)}
    assert merged == expected
    summary = (out / "study.md").read_text()
    assert "| method | N=2 |" in summary and "| Model | Layer | Mean Variance |" in summary
    for picture in ["average_vs_n.png", "diagnostics/effective_rank.png"]:
        assert (out / picture).stat().st_size > 10_000
