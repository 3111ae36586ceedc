"""The study over seeds: each seed's merges cached in a cell file (as the distance sweep's cells
are, with the same `load_cell` and `save_cell`), and what the seeds say together.

A seed draws the experts' training data and batch order afresh from the same base (the zoo
recipe's `expert_seed`), and the key of the random merges. Seed k's results live in
`cells/seed<k>.json`: the settings they were made with, a digest of the pool's weights, each
reference model's scores, the expert check (the base and each expert scored on every held-out
prompt, with its own settings) and each (method, N) merge's scores, written after every merge, so
that a study stops and resumes where it was. Across seeds, tables report the mean and the sample
standard deviation of each average, and karcher is compared with every other method paired over
the (seed, N) cells both ran.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from jkarcher.zoo.study import MergeRun
from jkarcher.zoo.sweep import mean_and_std, paired_comparison


def cell_path(out: Path, seed: int) -> Path:
    return out / "cells" / f"seed{seed}.json"


def load_cell(path: Path, settings: dict) -> dict:
    """The cell saved at `path` if it was made with `settings`, else an empty one."""
    cell = json.loads(path.read_text()) if path.is_file() else {}
    if cell.get("settings") != settings:
        cell = {"settings": settings, "runs": {}}
    return cell


def pool_digest(member_dirs: Sequence[Path]) -> str:
    """A SHA-256 of the pool's weight files, in pool order: training a zoo again need not give
    the same bits (another CPU rounds float32 sums its own way), and a cell holds the results of
    one pool only."""
    digest = hashlib.sha256()
    for member in member_dirs:
        for weights in sorted(member.glob("*.safetensors")):
            digest.update(weights.read_bytes())
    return digest.hexdigest()


def for_pool(cell: dict, digest: str) -> dict:
    """`cell` if its results came from the pool of `digest` (or it has none yet), else an empty
    cell with its settings; either way marked with `digest`."""
    if cell.get("pool") not in (None, digest):
        cell = {"settings": cell["settings"], "runs": {}}
    cell["pool"] = digest
    return cell


def save_cell(path: Path, cell: dict) -> None:
    """Write the cell whole, or leave the previous file (a rename replaces it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(cell, indent=1) + "\n")
    partial.replace(path)


def run_name(method: str, n_models: int) -> str:
    return f"{method} N={n_models}"


def cached_runs(cell: dict) -> dict[tuple[str, int], MergeRun]:
    """The cell's merges by (method, N)."""
    runs = {}
    for saved in cell["runs"].values():
        run = MergeRun(
            saved["method"],
            saved["n_models"],
            saved["scores"],
            saved["perplexities"],
            saved["seconds"],
        )
        runs[run.method, run.n_models] = run
    return runs


def add_run(cell: dict, run: MergeRun) -> None:
    cell["runs"][run_name(run.method, run.n_models)] = {
        "method": run.method,
        "n_models": run.n_models,
        "scores": run.scores,
        "perplexities": run.perplexities,
        "seconds": run.seconds,
    }


def mean_runs(
    per_seed: Sequence[Sequence[MergeRun]],
) -> tuple[list[MergeRun], dict[tuple[str, int], float]]:
    """Per (method, N) run by every seed: a run of the mean scores (and seconds), and the sample
    standard deviation of its average over the seeds (0 for one seed)."""
    grouped: dict[tuple[str, int], list[MergeRun]] = {}
    for runs in per_seed:
        for run in runs:
            grouped.setdefault((run.method, run.n_models), []).append(run)
    means, spread = [], {}
    for (method, n_models), runs in grouped.items():
        if len(runs) < len(per_seed):
            continue
        domains = runs[0].scores
        means.append(
            MergeRun(
                method,
                n_models,
                {d: statistics.fmean(r.scores[d] for r in runs) for d in domains},
                {d: statistics.fmean(r.perplexities[d] for r in runs) for d in domains},
                statistics.fmean(r.seconds for r in runs),
            )
        )
        spread[method, n_models] = mean_and_std([r.average for r in runs])[1]
    return means, spread


def mean_references(per_seed: Sequence[dict[str, dict]]) -> dict[str, dict]:
    """Each reference model's mean score and perplexity per domain over the seeds."""
    first = per_seed[0]
    return {
        name: {
            domain: {
                key: statistics.fmean(refs[name][domain][key] for refs in per_seed)
                for key in values
            }
            for domain, values in domains.items()
        }
        for name, domains in first.items()
    }


def paired_table(per_seed: Sequence[Sequence[MergeRun]], focus: str = "karcher") -> str:
    """Markdown: `focus` against every other method over the (seed, N) cells both ran: wins,
    ties and losses, and the mean difference of the average with its standard error."""
    averages = {
        (run.method, seed, run.n_models): run.average
        for seed, runs in enumerate(per_seed)
        for run in runs
    }
    ours = {(seed, n): value for (m, seed, n), value in averages.items() if m == focus}
    lines = []
    for method in sorted({m for m, _, _ in averages} - {focus}):
        theirs = {(seed, n): v for (m, seed, n), v in averages.items() if m == method}
        shared = ours.keys() & theirs.keys()
        if not shared:
            continue
        paired = paired_comparison({c: ours[c] for c in shared}, {c: theirs[c] for c in shared})
        error = "" if len(shared) < 2 else f" +- {paired.standard_error:.4f}"
        lines.append(
            f"| {method} | {len(shared)} | {paired.wins} / {paired.ties} / {paired.losses} | "
            f"{paired.mean_difference:+.4f}{error} |"
        )
    header = [
        f"| {focus} against | cells (seed, N) | wins / ties / losses | mean difference +- s.e. |",
        "|---|---|---|---|",
    ]
    return "\n".join(header + lines) if lines else ""
