"""The distance sweep: its levels, the paired statistics, the report, and a small sweep end to end
(outputs complete, cells cached and resumed; not who wins)."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from jkarcher.zoo import sweep_report
from jkarcher.zoo.domains import DOMAINS
from jkarcher.zoo.recipes import FINETUNE, base_record
from jkarcher.zoo.sweep import LEVELS, level_recipe, mean_and_std, paired_comparison

ROOT = Path(__file__).resolve().parents[1]
NAMES = [d.name for d in DOMAINS]


def test_levels_go_from_near_to_far_and_share_the_fine_tune_base():
    assert [lv.steps for lv in LEVELS] == sorted(lv.steps for lv in LEVELS)
    assert [lv.learning_rate for lv in LEVELS] == sorted(lv.learning_rate for lv in LEVELS)
    shares = [lv.general_share for lv in LEVELS]
    assert shares == sorted(shares, reverse=True)
    recipe = level_recipe(LEVELS[2], seed=1)
    assert base_record(recipe) == base_record(FINETUNE)
    assert recipe.expert_seed == 1 and len(recipe.experts) == 4
    assert {e.steps for e in recipe.experts} == {LEVELS[2].steps}
    assert {e.steps for e in level_recipe(LEVELS[2], 0, step_scale=0.1).experts} == {60}


def test_paired_comparison_counts_and_its_standard_error():
    a = {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.3}
    b = {1: 0.4, 2: 0.6, 3: 0.8}  # cell 4 is not paired
    p = paired_comparison(a, b)
    assert (p.wins, p.ties, p.losses) == (1, 1, 1)
    assert p.mean_difference == pytest.approx(0.0, abs=1e-12)
    assert p.standard_error == pytest.approx(0.1 / math.sqrt(3), rel=1e-9)
    assert math.isnan(paired_comparison({1: 0.5}, {1: 0.4}).standard_error)
    assert mean_and_std([2.0]) == (2.0, 0.0)
    assert mean_and_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2.0)))


def _cell(base: float, linear: float, karcher: float, angle: float) -> dict:
    scores = lambda value: {d: value for d in NAMES}
    return {
        "distances": {"weight_angle": angle, "task_angle": 70.0, "relative_norm": 0.1},
        "references": {"base": scores(base), "expert-addition": scores(base) | {"addition": 0.9}},
        "runs": {"linear": {"scores": scores(linear)}, "karcher": {"scores": scores(karcher)}},
    }


def test_the_report_tables_follow_the_cells(tmp_path):
    levels = {lv.name: lv for lv in LEVELS[:2]}
    cells = {
        ("1-nearest", 0): _cell(0.4, 0.45, 0.46, 1.0),
        ("1-nearest", 1): _cell(0.4, 0.47, 0.46, 1.2),
        ("2-near", 0): _cell(0.4, 0.40, 0.44, 3.0),
    }
    sweep_report.write(cells, levels, ["karcher", "linear"], tmp_path)
    table = sweep_report.level_table(cells, levels, ["karcher", "linear"]).splitlines()
    assert table[0] == "| | 1-nearest | 2-near |"
    assert "| angle between experts' weights | 1.10° | 3.00° |" in table
    assert "| linear | 0.460 ± 0.014 | 0.400 |" in table
    assert "| expert - base on its own domain | 0.500 ± 0.000 | 0.500 |" in table
    paired = sweep_report.paired_table(cells, ["karcher", "linear"]).splitlines()
    assert paired[2] == "| linear | 3 | 2 | 0 | 1 | +0.0133 ± 0.0145 |"
    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 4 and {r["model"] for r in rows} == {
        "base",
        "expert-addition",
        "linear",
        "karcher",
    }
    for picture in ("average_vs_distance.png", "gap_to_linear.png"):
        assert (tmp_path / picture).stat().st_size > 10_000


@pytest.mark.slow
def test_a_small_sweep_runs_caches_its_cells_and_resumes(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "scripts" / "sweep.py"),
        "--zoo=small",
        "--step_scale=0.1",
        "--levels=1-nearest,3-middle",
        "--seeds=2",
        "--methods=karcher,linear,task_arithmetic",
        f"--cache={tmp_path / 'cache'}",
        f"--out={tmp_path / 'out'}",
        "--examples=16",
        "--text_windows=8",
    ]
    first = subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    assert first.stdout.count(" average ") == 4 * 3
    cells = sorted((tmp_path / "out" / "cells").glob("*.json"))
    assert [c.stem for c in cells] == [
        "1-nearest-seed0",
        "1-nearest-seed1",
        "3-middle-seed0",
        "3-middle-seed1",
    ]
    angles = {}
    for path in cells:
        cell = json.loads(path.read_text())
        assert set(cell["runs"]) == {"karcher", "linear", "task_arithmetic"}
        assert len(cell["references"]) == 5  # the base and four experts
        for scores in [*cell["references"].values()] + [r["scores"] for r in cell["runs"].values()]:
            assert set(scores) == set(NAMES) and all(0.0 <= s <= 1.0 for s in scores.values())
        angles[path.stem] = cell["distances"]["weight_angle"]
    assert angles["3-middle-seed0"] > angles["1-nearest-seed0"] > 0.0
    members = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("member.json")}
    assert len(members) == 5 + 4 * 5  # the small zoo; each cell, its base and four experts
    second = subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    assert " average " not in second.stdout
    assert {p: p.stat().st_mtime_ns for p in members} == members
    text = (tmp_path / "out" / "sweep.md").read_text()
    assert "| | 1-nearest | 3-middle |" in text and "| **karcher** |" in text
    assert "| karcher against | cells | wins | ties | losses |" in text
