"""The study's cells: saved and read back whole, means and spreads over seeds, karcher paired
with every method over the (seed, N) cells."""

from __future__ import annotations

import statistics

import pytest

from jkarcher.zoo import study_cells
from jkarcher.zoo.study import MergeRun


def run(method, n, score):
    return MergeRun(method, n, {"a": score, "b": 1 - score}, {"a": 2.0, "b": 3.0 + score}, 1.5)


def test_a_cell_keeps_its_runs_and_is_dropped_when_its_settings_change(tmp_path):
    path = study_cells.cell_path(tmp_path, 1)
    cell = study_cells.load_cell(path, {"recipe": 1})
    study_cells.add_run(cell, run("karcher", 2, 0.25))
    study_cells.add_run(cell, run("linear", 3, 0.75))
    study_cells.save_cell(path, cell)
    assert path.name == "seed1.json" and not list(tmp_path.rglob("*.partial"))
    again = study_cells.cached_runs(study_cells.load_cell(path, {"recipe": 1}))
    assert again == {("karcher", 2): run("karcher", 2, 0.25), ("linear", 3): run("linear", 3, 0.75)}
    assert study_cells.load_cell(path, {"recipe": 2}) == {"settings": {"recipe": 2}, "runs": {}}


def test_means_and_spreads_over_seeds():
    per_seed = [
        [run("karcher", 2, 0.2), run("linear", 2, 0.1), run("ties", 2, 0.3)],
        [run("karcher", 2, 0.4), run("linear", 2, 0.3)],  # ties not run at this seed
    ]
    means, spread = study_cells.mean_runs(per_seed)
    by_key = {(r.method, r.n_models): r for r in means}
    assert set(by_key) == {("karcher", 2), ("linear", 2)}
    assert by_key["karcher", 2].scores == pytest.approx({"a": 0.3, "b": 0.7})
    assert by_key["karcher", 2].perplexities == pytest.approx({"a": 2.0, "b": 3.3})
    # The average over domains a, b is 0.5 for every run here: its spread is 0.
    assert spread["karcher", 2] == pytest.approx(0.0)
    one = [[MergeRun("x", 2, {"a": s}, {"a": 1.0}, 1.0)] for s in (0.1, 0.3, 0.8)]
    _, spread = study_cells.mean_runs(one)
    assert spread["x", 2] == pytest.approx(statistics.stdev([0.1, 0.3, 0.8]))


def test_references_average_over_seeds():
    per_seed = [
        {"base": {"a": {"score": 0.2, "perplexity": 4.0}}},
        {"base": {"a": {"score": 0.4, "perplexity": 2.0}}},
    ]
    assert study_cells.mean_references(per_seed) == {
        "base": {"a": pytest.approx({"score": 0.3, "perplexity": 3.0})}
    }


def test_karcher_is_paired_with_every_method_over_seed_and_n():
    def single(method, n, average):
        return MergeRun(method, n, {"a": average}, {"a": 1.0}, 1.0)

    per_seed = [
        [single("karcher", 2, 0.50), single("linear", 2, 0.40), single("karcher", 3, 0.50)],
        [single("karcher", 2, 0.50), single("linear", 2, 0.60), single("linear", 3, 0.50)],
    ]
    table = study_cells.paired_table(per_seed).splitlines()
    assert table[0].startswith("| karcher against | cells (seed, N) |")
    # linear shares (0, 2) and (1, 2): +0.1 and -0.1; (0, 3) and (1, 3) each lack one of them.
    assert table[2] == "| linear | 2 | 1 / 0 / 1 | +0.0000 +- 0.1000 |"


def test_a_cell_from_another_build_of_the_pool_starts_again(tmp_path):
    members = [tmp_path / "base", tmp_path / "expert-a"]
    for index, member in enumerate(members):
        member.mkdir()
        (member / "model.safetensors").write_bytes(bytes([index]) * 64)
    first = study_cells.pool_digest(members)
    cell = study_cells.for_pool({"settings": {"recipe": 1}, "runs": {}}, first)
    study_cells.add_run(cell, run("karcher", 2, 0.25))
    assert study_cells.for_pool(cell, first)["runs"]  # the same pool keeps its runs
    (members[1] / "model.safetensors").write_bytes(bytes([7]) * 64)  # trained again, other bits
    second = study_cells.pool_digest(members)
    assert second != first
    assert study_cells.for_pool(cell, second) == {
        "settings": {"recipe": 1},
        "runs": {},
        "pool": second,
    }
