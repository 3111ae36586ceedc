"""Writing the pairwise setting's results: pairwise.csv and pairwise.md.

A cell is one (size, seed) of `jkarcher.zoo.pairwise`, as scripts/pairwise.py saves it: the
distance between the base and its instruct model, their scores alone, and each method's scores.
Every number and sentence written here comes from the cells passed in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from jkarcher.zoo.domains import DOMAINS
from jkarcher.zoo.pairwise import Size
from jkarcher.zoo.sweep_report import (
    FOCUS,
    at_level,
    cell_averages,
    gap_findings,
    level_distances,
    level_names,
    mean_std_text,
    paired_table,
    write_csv,
)

Cells = Mapping[tuple[str, int], Mapping]  # (size name, seed) -> cell
TASKS = [d.name for d in DOMAINS if d.kind == "task"]


def _instruct_gain(cell: Mapping) -> float:
    """The instruct model minus the base, averaged over the task domains."""
    base = cell["references"]["base"]
    instruct = next(v for k, v in cell["references"].items() if k != "base")
    return sum(instruct[t] - base[t] for t in TASKS) / len(TASKS)


def _reference_averages(cells: Cells, instruct: bool) -> dict[tuple[str, int], float]:
    """The base's (or the instruct model's) average over every domain in each cell."""
    averages = {}
    for key, cell in cells.items():
        (name,) = [k for k in cell["references"] if (k != "base") == instruct]
        scores = cell["references"][name]
        averages[key] = sum(scores.values()) / len(scores)
    return averages


def size_table(cells: Cells, sizes: Mapping[str, Size], rows: Sequence[str]) -> str:
    """Markdown: one column per size; its distances, the two models alone, then each row's
    average score as mean +- std over seeds."""
    names = level_names(cells, sizes)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def line(label: str, values: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    distances = [level_distances(cells, n) for n in names]
    line("parameters", [f"{round(d['parameters']):,}" for d in distances])
    angles = [f"{d['weight_angle']:.2f}°" for d in distances]
    line("angle between base and instruct weights", angles)
    line("instruct task vector norm / base norm", [f"{d['relative_norm']:.3f}" for d in distances])
    gains = {key: _instruct_gain(c) for key, c in cells.items()}
    line("instruct - base on the tasks", [mean_std_text(at_level(gains, n)) for n in names])
    for label, instruct in (("base alone", False), ("instruct alone", True)):
        values = _reference_averages(cells, instruct)
        line(label, [mean_std_text(at_level(values, n)) for n in names])
    for row in rows:
        values = cell_averages(cells, row)
        if values:
            label = f"**{row}**" if row == FOCUS else row
            line(label, [mean_std_text(at_level(values, n)) for n in names])
    return "\n".join(lines)


def write(cells: Cells, sizes: Mapping[str, Size], rows: Sequence[str], out: Path) -> None:
    """pairwise.csv and pairwise.md, in `out`."""
    write_csv(cells, rows, out / "pairwise.csv", key="size")
    seeds = sorted({seed for _, seed in cells})
    count = len(level_names(cells, sizes))
    text = [
        f"### Pairwise merges: a base and its instruct model at {count} sizes "
        "(the paper's Table 2)",
        "",
        f"Each column is a model size (hidden width x layers); each value is the mean ± std over "
        f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} (the instruct model's data sample and "
        "batch order), of the average score over every domain. The merges combine the base and "
        "its instruct model with equal weights (methods that need a base add the instruct "
        "model's task vector to it).",
        "",
        size_table(cells, sizes, rows),
        "",
        *[f"- {s}" for s in gap_findings(cells, sizes)],
        "",
        f"### {FOCUS} against each method, paired over every (size, seed) cell",
        "",
        paired_table(cells, rows),
        "",
    ]
    (out / "pairwise.md").write_text("\n".join(text))
