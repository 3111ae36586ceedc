"""Writing the study's results: CSV, Markdown tables, plots and the README's Results section.

Every number in these files comes from the runs passed in; the sentences that describe who wins
are generated from the same numbers.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from jkarcher.zoo.domains import DOMAINS
from jkarcher.zoo.study import MergeRun

README_BEGIN = "<!-- study results: written by scripts/study.py -->"
README_END = "<!-- end of study results -->"
DOMAIN_NAMES = [d.name for d in DOMAINS]


def write_csv(runs: Sequence[MergeRun], references: dict[str, dict], path: Path) -> None:
    """One row per merge (method, N) and per reference model: every domain's score and
    perplexity, the average score, and the seconds the merge and its scoring took."""
    perplexity_columns = [f"{d}_perplexity" for d in DOMAIN_NAMES]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["model", "n_models", *DOMAIN_NAMES, "average", *perplexity_columns, "seconds"]
        )
        for name, results in references.items():
            scores = [results[d]["score"] for d in DOMAIN_NAMES]
            perplexities = [results[d]["perplexity"] for d in DOMAIN_NAMES]
            writer.writerow(
                [
                    name,
                    1,
                    *_fmt(scores),
                    f"{sum(scores) / len(scores):.4f}",
                    *_fmt(perplexities),
                    "",
                ]
            )
        for run in runs:
            scores = [run.scores[d] for d in DOMAIN_NAMES]
            perplexities = [run.perplexities[d] for d in DOMAIN_NAMES]
            writer.writerow(
                [
                    run.method,
                    run.n_models,
                    *_fmt(scores),
                    f"{run.average:.4f}",
                    *_fmt(perplexities),
                    f"{run.seconds:.2f}",
                ]
            )


def _fmt(values) -> list[str]:
    return [f"{v:.4f}" for v in values]


def average_table(
    runs: Sequence[MergeRun], spread: Mapping[tuple[str, int], float] | None = None
) -> str:
    """Markdown: methods x N of the average score (with ` +- spread[method, N]` where given),
    the best of each column in bold."""
    ns = sorted({r.n_models for r in runs})
    by_method = _by_method(runs)
    best = {n: max(r.average for r in runs if r.n_models == n) for n in ns}
    lines = ["| method | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for method, cells in by_method.items():
        row = []
        for n in ns:
            run = cells.get(n)
            if run is None:
                row.append("")
            else:
                text = f"**{run.average:.3f}**" if run.average == best[n] else f"{run.average:.3f}"
                row.append(text if spread is None else f"{text} +- {spread[method, n]:.3f}")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def domain_table(runs: Sequence[MergeRun], references: dict[str, dict]) -> str:
    """Markdown in the layout of the paper's Appendix A: method, N, per-domain scores, average."""
    header = "| model | N | " + " | ".join(DOMAIN_NAMES) + " | avg |"
    lines = [header, "|---|---|" + "---|" * (len(DOMAIN_NAMES) + 1)]
    for name, results in references.items():
        scores = [results[d]["score"] for d in DOMAIN_NAMES]
        lines.append(
            f"| {name} (alone) | 1 | "
            + " | ".join(f"{s:.3f}" for s in scores)
            + f" | {sum(scores) / len(scores):.3f} |"
        )
    for method, cells in _by_method(runs).items():
        for n, run in sorted(cells.items()):
            scores = [run.scores[d] for d in DOMAIN_NAMES]
            lines.append(
                f"| {method} | {n} | "
                + " | ".join(f"{s:.3f}" for s in scores)
                + f" | {run.average:.3f} |"
            )
    return "\n".join(lines)


def expert_table(references: dict[str, dict], per_seed: Sequence[dict[str, dict]]) -> str:
    """Each expert alone against the base: its own domain's score (and perplexity), its average
    over every domain, and how many of the other domains it keeps within 0.05 of the base;
    `references` are the means over the seeds of `per_seed`, whose own-domain gains (expert minus
    base) get a column of their own."""
    base = references["base"]
    base_average = sum(base[d]["score"] for d in DOMAIN_NAMES) / len(DOMAIN_NAMES)
    lines = [
        "| expert | own domain: expert / base | expert - base by seed | "
        "perplexity: expert / base | average: expert / base | other domains kept |",
        "|---|---|---|---|---|---|",
    ]
    for name, results in references.items():
        if name == "base":
            continue
        own = name.removeprefix("expert-")
        others = [d for d in DOMAIN_NAMES if d != own]
        kept = sum(results[d]["score"] >= base[d]["score"] - 0.05 for d in others)
        average = sum(results[d]["score"] for d in DOMAIN_NAMES) / len(DOMAIN_NAMES)
        gains = ", ".join(f"{g:+.3f}" for g in own_domain_gains(per_seed, name))
        lines.append(
            f"| {name} | {results[own]['score']:.3f} / {base[own]['score']:.3f} | {gains} | "
            f"{results[own]['perplexity']:.3f} / {base[own]['perplexity']:.3f} | "
            f"{average:.3f} / {base_average:.3f} | {kept} of {len(others)} |"
        )
    return "\n".join(lines)


def own_domain_gains(per_seed: Sequence[dict[str, dict]], expert: str) -> list[float]:
    """Per seed, the expert's score on its own domain minus the base's."""
    own = expert.removeprefix("expert-")
    return [refs[expert][own]["score"] - refs["base"][own]["score"] for refs in per_seed]


def _by_method(runs: Sequence[MergeRun]) -> dict[str, dict[int, MergeRun]]:
    """{method: {N: run}}, methods in alphabetical order."""
    table: dict[str, dict[int, MergeRun]] = {}
    for run in sorted(runs, key=lambda r: (r.method, r.n_models)):
        table.setdefault(run.method, {})[run.n_models] = run
    return table


def findings(runs: Sequence[MergeRun], focus: str = "karcher") -> list[str]:
    """Sentences, generated from the runs, on where `focus` wins and where it does not."""
    ns = sorted({r.n_models for r in runs})
    wins, losses = [], []
    for n in ns:
        column = sorted((r for r in runs if r.n_models == n), key=lambda r: -r.average)
        ours = next((r for r in column if r.method == focus), None)
        if ours is None:
            continue
        if column[0].method == focus:
            wins.append(n)
        else:
            losses.append(
                f"N={n} ({column[0].method} {column[0].average:.3f} against {ours.average:.3f})"
            )
    sentences = []
    if wins:
        sentences.append(
            f"{focus} has the best average score at N = " + ", ".join(map(str, wins)) + "."
        )
    if losses:
        sentences.append(f"{focus} is not the best at " + "; ".join(losses) + ".")
    spread = _spread_by_method(runs, ns)
    if spread:
        steadiest = min(spread, key=spread.get)
        sentences.append(
            f"From N={ns[0]} to N={ns[-1]}, the smallest drop of the average from its best is "
            f"{steadiest}'s ({spread[steadiest]:.3f})"
            + (f"; {focus}'s is {spread[focus]:.3f}." if focus in spread else ".")
        )
    return sentences


def variant_findings(runs: Sequence[MergeRun], variants: dict[str, str]) -> list[str]:
    """For each variant row (label -> the method it varies, e.g. karcher+fisher -> karcher), how
    much it changes that method's average score at each N both ran at."""
    table = _by_method(runs)
    sentences = []
    for variant, method in variants.items():
        shared = sorted(set(table.get(variant, {})) & set(table.get(method, {})))
        if not shared:
            continue
        changes = [table[variant][n].average - table[method][n].average for n in shared]
        better = sum(change > 0 for change in changes)
        sentences.append(
            f"{variant} against {method}: the average changes by "
            + ", ".join(f"{c:+.3f} at N={n}" for n, c in zip(shared, changes, strict=True))
            + f" (mean {sum(changes) / len(changes):+.3f}; higher at {better} of {len(shared)})."
        )
    return sentences


def reference_findings(runs: Sequence[MergeRun], base_average: float) -> list[str]:
    """Where the best merge of each N stands against the base model alone."""
    ns = sorted({r.n_models for r in runs})
    best = {n: max((r for r in runs if r.n_models == n), key=lambda r: r.average) for n in ns}
    above = [n for n in ns if best[n].average > base_average]
    where = f"N = {', '.join(map(str, above))}" if above else "no N"
    return [
        f"The base model alone averages {base_average:.3f}; the best merge exceeds it at {where} "
        f"(the best merges range from {min(b.average for b in best.values()):.3f} to "
        f"{max(b.average for b in best.values()):.3f})."
    ]


def _spread_by_method(runs: Sequence[MergeRun], ns: list[int]) -> dict[str, float]:
    """For methods run at every N: best average minus the average at the largest N."""
    table = _by_method(runs)
    return {
        method: max(r.average for r in cells.values()) - cells[ns[-1]].average
        for method, cells in table.items()
        if set(cells) == set(ns)
    }


def plot_average_vs_n(
    runs: Sequence[MergeRun],
    path: Path,
    focus: str = "karcher",
    spread: Mapping[tuple[str, int], float] | None = None,
) -> None:
    """Average score against N, one line per method, `focus` drawn thicker; with `spread`, a
    band of +- spread[method, N] around each line."""
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=130)
    markers = "osD^v<>pPXh*"
    for index, (method, cells) in enumerate(_by_method(runs).items()):
        ns = sorted(cells)
        averages = np.array([cells[n].average for n in ns])
        (line,) = ax.plot(
            ns,
            averages,
            marker=markers[index % len(markers)],
            linewidth=3.0 if method == focus else 1.3,
            markersize=5,
            label=method,
            zorder=3 if method == focus else 2,
        )
        if spread is not None:
            deviation = np.array([spread[method, n] for n in ns])
            ax.fill_between(
                ns, averages - deviation, averages + deviation, color=line.get_color(), alpha=0.12
            )
    ax.set_xlabel("N, models merged (the base first, then the experts in the zoo's order)")
    ax.set_ylabel("average score over all domains")
    ax.set_title("Average score of the merge as more experts are merged")
    ax.set_xticks(sorted({r.n_models for r in runs}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def update_readme(readme: Path, section: str) -> None:
    """Replace the text between the README's study markers with `section`."""
    text = readme.read_text()
    pattern = re.compile(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no study markers ({README_BEGIN} ... {README_END})")
    replacement = f"{README_BEGIN}\n{section.strip()}\n{README_END}"
    readme.write_text(pattern.sub(lambda _: replacement, text))
