"""The pairwise setting: its sizes and instruct recipe, its distances, its report, and a small run
end to end (outputs complete, cells cached and resumed; not who wins)."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from jkarcher.zoo import pairwise_report
from jkarcher.zoo.domains import DOMAINS
from jkarcher.zoo.pairwise import SIZES, pair_distances, size_recipe
from jkarcher.zoo.recipes import FINETUNE, base_record, expert_texts
from jkarcher.zoo.training import INSTRUCT, domain_texts

ROOT = Path(__file__).resolve().parents[1]
NAMES = [d.name for d in DOMAINS]
TASKS = [d.name for d in DOMAINS if d.kind == "task"]


def test_sizes_grow_and_the_largest_shares_the_fine_tune_zoos_base():
    widths = [(s.hidden_size, s.layers) for s in SIZES]
    assert widths == sorted(widths) and len(set(widths)) == len(widths)
    assert base_record(size_recipe(SIZES[-1], seed=2)) == base_record(FINETUNE)
    smaller = size_recipe(SIZES[0], seed=1)
    assert base_record(smaller) != base_record(FINETUNE)
    assert (smaller.base_steps, smaller.base_learning_rate) == (3000, 3e-3)
    assert smaller.expert_seed == 1 and [e.domain for e in smaller.experts] == [INSTRUCT]
    assert size_recipe(SIZES[0], 0, step_scale=0.1).experts[0].steps == 60


def test_the_instruct_model_trains_on_every_task_and_the_general_mixture():
    recipe = size_recipe(SIZES[0], seed=0)
    texts = expert_texts(recipe, recipe.experts[0])
    assert len(texts) == 2 * FINETUNE.examples_per_domain  # half of them general
    per_task = FINETUNE.examples_per_domain // len(TASKS)
    for index, task in enumerate(TASKS):
        chunk = texts[index * per_task : (index + 1) * per_task]
        assert chunk == domain_texts(task, "train", per_task, recipe.seed)


def test_pair_distances_in_float64(tmp_path):
    rng = np.random.default_rng(0)
    base = {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": np.ones(5, np.float32)}
    expert = {k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()}
    for name, weights in (("base", base), ("expert", expert)):
        (tmp_path / name).mkdir()
        safetensors.numpy.save_file(weights, tmp_path / name / "model.safetensors")
    got = pair_distances(tmp_path / "base", [tmp_path / "expert"])
    w0 = np.concatenate([base["a"].ravel(), base["b"]]).astype(np.float64)
    w1 = np.concatenate([expert["a"].ravel(), expert["b"]]).astype(np.float64)
    cosine = w0 @ w1 / np.linalg.norm(w0) / np.linalg.norm(w1)
    assert got["weight_angle"] == pytest.approx(math.degrees(math.acos(cosine)), rel=1e-12)
    assert got["relative_norm"] == pytest.approx(
        np.linalg.norm(w1 - w0) / np.linalg.norm(w0), rel=1e-12
    )
    assert got["parameters"] == 17


def _cell(base: float, instruct: float, linear: float, karcher: float, angle: float) -> dict:
    scores = lambda value: {d: value for d in NAMES}
    return {
        "distances": {"weight_angle": angle, "relative_norm": 0.1, "parameters": 1000},
        "references": {"base": scores(base), "expert-instruct": scores(instruct)},
        "runs": {"linear": {"scores": scores(linear)}, "karcher": {"scores": scores(karcher)}},
    }


def test_the_report_follows_the_cells(tmp_path):
    sizes = {s.name: s for s in SIZES[:2]}
    cells = {
        ("64x2", 0): _cell(0.30, 0.40, 0.45, 0.46, 4.0),
        ("64x2", 1): _cell(0.30, 0.42, 0.47, 0.46, 6.0),
        ("96x3", 0): _cell(0.35, 0.45, 0.40, 0.44, 3.0),
    }
    pairwise_report.write(cells, sizes, ["karcher", "linear"], tmp_path)
    table = pairwise_report.size_table(cells, sizes, ["karcher", "linear"]).splitlines()
    assert table[0] == "| | 64x2 | 96x3 |"
    assert "| angle between base and instruct weights | 5.00° | 3.00° |" in table
    assert "| parameters | 1,000 | 1,000 |" in table
    assert "| instruct - base on the tasks | 0.110 ± 0.014 | 0.100 |" in table
    assert "| base alone | 0.300 ± 0.000 | 0.350 |" in table
    assert "| instruct alone | 0.410 ± 0.014 | 0.450 |" in table
    assert "| linear | 0.460 ± 0.014 | 0.400 |" in table
    text = (tmp_path / "pairwise.md").read_text()
    assert "at 2 sizes" in text and "| linear | 3 | 2 | 0 | 1 | +0.0133 ± 0.0145 |" in text
    with open(tmp_path / "pairwise.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 4 and rows[0]["size"] == "64x2"


@pytest.mark.slow
def test_a_small_pairwise_run_caches_its_cells_and_resumes(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "scripts" / "pairwise.py"),
        "--zoo=small",
        "--step_scale=0.05",
        "--sizes=64x2,96x3",
        "--seeds=2",
        "--methods=karcher,linear,slerp,task_arithmetic",
        f"--cache={tmp_path / 'cache'}",
        f"--out={tmp_path / 'out'}",
        "--examples=8",
        "--text_windows=4",
    ]
    first = subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    assert first.stdout.count(" average ") == 4 * 4
    cells = sorted((tmp_path / "out" / "cells").glob("*.json"))
    assert [c.stem for c in cells] == ["64x2-seed0", "64x2-seed1", "96x3-seed0", "96x3-seed1"]
    for path in cells:
        cell = json.loads(path.read_text())
        assert set(cell["runs"]) == {"karcher", "linear", "slerp", "task_arithmetic"}
        assert set(cell["references"]) == {"base", "expert-instruct"}
        for scores in [*cell["references"].values()] + [r["scores"] for r in cell["runs"].values()]:
            assert set(scores) == set(NAMES) and all(0.0 <= s <= 1.0 for s in scores.values())
        assert cell["distances"]["weight_angle"] > 0.0
        # one model onto the base at weight 1 is that model
        assert cell["runs"]["task_arithmetic"]["scores"] == cell["references"]["expert-instruct"]
    members = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("member.json")}
    assert len(members) == 2 * 2 * 2  # each cell's base (a copy of seed 0's) and instruct model
    bases = {p.read_bytes() for p in (tmp_path / "cache").glob("*/64x2-seed*/base/*.safetensors")}
    assert len(bases) == 1
    second = subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    assert " average " not in second.stdout
    assert {p: p.stat().st_mtime_ns for p in members} == members
    text = (tmp_path / "out" / "pairwise.md").read_text()
    assert "| | 64x2 | 96x3 |" in text and "| **karcher** |" in text
