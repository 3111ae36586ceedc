"""Writing the distance sweep's results: sweep.csv, sweep.md and its two plots.

A cell is one (level, seed) of `jkarcher.zoo.sweep`, as scripts/sweep.py saves it: the experts'
distances, the base's and each expert's scores alone, and each method's scores. Every number and
sentence written here comes from the cells passed in.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from jkarcher.zoo.domains import DOMAINS
from jkarcher.zoo.sweep import Level, mean_and_std, paired_comparison

FOCUS = "karcher"
REFERENCE = "linear"
DOMAIN_NAMES = [d.name for d in DOMAINS]

Cells = Mapping[tuple[str, int], Mapping]  # (level name, seed) -> cell


def _average(scores: Mapping[str, float]) -> float:
    return sum(scores[d] for d in DOMAIN_NAMES) / len(DOMAIN_NAMES)


def cell_averages(cells: Cells, row: str) -> dict[tuple[str, int], float]:
    """Row's average score in each cell that has it."""
    return {key: _average(c["runs"][row]["scores"]) for key, c in cells.items() if row in c["runs"]}


def level_names(cells: Cells, levels: Mapping[str, Level]) -> list[str]:
    """The levels the cells hold, in the sweep's order."""
    return [name for name in levels if any(key[0] == name for key in cells)]


def _in_level(values: Mapping[tuple[str, int], float], level: str) -> dict[tuple[str, int], float]:
    """The values of one level's cells, by (level, seed)."""
    return {key: v for key, v in sorted(values.items()) if key[0] == level}


def at_level(values: Mapping[tuple[str, int], float], level: str) -> list[float]:
    """The values of one level's cells, in seed order."""
    return list(_in_level(values, level).values())


def level_distances(cells: Cells, level: str) -> dict[str, float]:
    """The mean over a level's seeds of each whole-model distance."""
    chosen = [c["distances"] for (name, _), c in cells.items() if name == level]
    return {k: sum(d[k] for d in chosen) / len(chosen) for k in chosen[0]}


def _own_domain_gain(cell: Mapping) -> float:
    """The mean over a cell's experts of (expert - base) on the expert's own domain."""
    base = cell["references"]["base"]
    experts = {k: v for k, v in cell["references"].items() if k != "base"}
    gains = [
        v[k.removeprefix("expert-")] - base[k.removeprefix("expert-")] for k, v in experts.items()
    ]
    return sum(gains) / len(gains)


def level_table(cells: Cells, levels: Mapping[str, Level], rows: Sequence[str]) -> str:
    """Markdown: one column per level; its recipe and distances, then each row's mean +- std."""
    names = level_names(cells, levels)
    header = "| | " + " | ".join(names) + " |"
    lines = [header, "|---|" + "---|" * len(names)]

    def line(label: str, values: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    line("fine-tuning steps", [str(levels[n].steps) for n in names])
    line("learning rate", [f"{levels[n].learning_rate:g}" for n in names])
    line("general data share", [f"{levels[n].general_share:g}" for n in names])
    distances = [level_distances(cells, n) for n in names]
    line("angle between experts' weights", [f"{d['weight_angle']:.2f}°" for d in distances])
    line("angle between task vectors", [f"{d['task_angle']:.1f}°" for d in distances])
    line("task vector norm / base norm", [f"{d['relative_norm']:.3f}" for d in distances])
    gains = {key: _own_domain_gain(c) for key, c in cells.items()}
    line("expert - base on its own domain", [mean_std_text(at_level(gains, n)) for n in names])
    bases = {key: _average(c["references"]["base"]) for key, c in cells.items()}
    line("base alone", [mean_std_text(at_level(bases, n)) for n in names])
    for row in rows:
        values = cell_averages(cells, row)
        if values:
            line(
                f"**{row}**" if row == FOCUS else row,
                [mean_std_text(at_level(values, n)) for n in names],
            )
    return "\n".join(lines)


def mean_std_text(values: Sequence[float]) -> str:
    """The values' mean and sample std as "0.460 ± 0.014", the mean alone for one value, and
    the empty string for none."""
    if not values:
        return ""
    mean, std = mean_and_std(values)
    return f"{mean:.3f} ± {std:.3f}" if len(values) > 1 else f"{mean:.3f}"


def paired_table(cells: Cells, rows: Sequence[str], focus: str = FOCUS) -> str:
    """Markdown: `focus` against each other row, paired over the cells both have."""
    mine = cell_averages(cells, focus)
    lines = [
        f"| {focus} against | cells | wins | ties | losses | mean difference ± s.e. |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        theirs = cell_averages(cells, row)
        if row == focus or not set(mine) & set(theirs):
            continue
        p = paired_comparison(mine, theirs)
        cells_compared = p.wins + p.ties + p.losses
        lines.append(
            f"| {row} | {cells_compared} | {p.wins} | {p.ties} | {p.losses} | {_difference(p)} |"
        )
    return "\n".join(lines)


def _difference(p) -> str:
    """The mean difference, with its standard error where there are two cells or more."""
    if math.isnan(p.standard_error):
        return f"{p.mean_difference:+.4f}"
    return f"{p.mean_difference:+.4f} ± {p.standard_error:.4f}"


def gap_findings(cells: Cells, levels: Mapping[str, Level], focus: str = FOCUS) -> list[str]:
    """Sentences: `focus` minus the linear average at each level, paired over its seeds."""
    mine, linear = cell_averages(cells, focus), cell_averages(cells, REFERENCE)
    parts = []
    for name in level_names(cells, levels):
        p = paired_comparison(_in_level(mine, name), _in_level(linear, name))
        angle = level_distances(cells, name)["weight_angle"]
        parts.append(f"{_difference(p)} at {name} ({angle:.2f}°)")
    return [
        f"{focus} minus {REFERENCE} (mean ± s.e. over seeds, where there are two or more): "
        + "; ".join(parts)
        + "."
    ]


def write_csv(cells: Cells, rows: Sequence[str], path: Path, key: str = "level") -> None:
    """One row per (`key`, seed, model): every domain's score and the average; the models are
    the base and experts alone and every method's merge."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([key, "seed", "model", *DOMAIN_NAMES, "average", "weight_angle"])
        for (level, seed), cell in sorted(cells.items()):
            models = dict(cell["references"])
            models |= {r: cell["runs"][r]["scores"] for r in rows if r in cell["runs"]}
            for model, scores in models.items():
                values = [f"{scores[d]:.4f}" for d in DOMAIN_NAMES] + [f"{_average(scores):.4f}"]
                angle = f"{cell['distances']['weight_angle']:.4f}"
                writer.writerow([level, seed, model, *values, angle])


def plot(cells: Cells, levels: Mapping[str, Level], rows: Sequence[str], out: Path) -> None:
    """average_vs_distance.png (each row's mean +- std against the level's angle) and
    gap_to_linear.png (each row minus linear, mean +- s.e. over seeds)."""
    names = level_names(cells, levels)
    angles = [level_distances(cells, n)["weight_angle"] for n in names]
    linear = cell_averages(cells, REFERENCE)
    for filename, title, gap in (
        ("average_vs_distance.png", "Average score of the merge of 4 experts", False),
        ("gap_to_linear.png", f"Average score minus the {REFERENCE} merge's (mean ± s.e.)", True),
    ):
        fig, ax = plt.subplots(figsize=(9, 5.5), dpi=130)
        for index, row in enumerate(rows):
            values = cell_averages(cells, row)
            if not values or (gap and row == REFERENCE):
                continue
            means, bars = [], []
            for n in names:
                if gap:
                    p = paired_comparison(_in_level(values, n), _in_level(linear, n))
                    means.append(p.mean_difference)
                    bars.append(0.0 if math.isnan(p.standard_error) else p.standard_error)
                else:
                    mean, std = mean_and_std(at_level(values, n))
                    means.append(mean)
                    bars.append(std)
            ax.errorbar(
                angles,
                means,
                yerr=bars,
                marker="osD^v<>pPXh*"[index % 11],
                linestyle="-" if index < 10 else "--",  # the colour cycle repeats after ten
                capsize=3,
                linewidth=3.0 if row == FOCUS else 1.2,
                label=row,
                zorder=3 if row == FOCUS else 2,
            )
        if gap:
            ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel("mean pairwise angle between the experts' weights (degrees)")
        ax.set_ylabel("difference of average scores" if gap else "average score over all domains")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        fig.savefig(out / filename)
        plt.close(fig)


def write(cells: Cells, levels: Mapping[str, Level], rows: Sequence[str], out: Path) -> None:
    """sweep.csv, sweep.md and the plots, in `out`."""
    write_csv(cells, rows, out / "sweep.csv")
    plot(cells, levels, rows, out)
    seeds = sorted({seed for _, seed in cells})
    text = [
        "### Distance sweep: four experts, from near the base to far",
        "",
        f"Each column is a level; each value is the mean ± std over {len(seeds)} "
        f"seed{'s' if len(seeds) > 1 else ''} (the experts' data sample and batch order). "
        "The merges combine the base and the four experts (methods that need a base merge the "
        "experts onto it), with equal weights.",
        "",
        level_table(cells, levels, rows),
        "",
        *[f"- {s}" for s in gap_findings(cells, levels)],
        "",
        "![average against distance](average_vs_distance.png)",
        "![gap to linear against distance](gap_to_linear.png)",
        "",
        f"### {FOCUS} against each method, paired over every (level, seed) cell",
        "",
        paired_table(cells, rows),
        "",
    ]
    (out / "sweep.md").write_text("\n".join(text))
