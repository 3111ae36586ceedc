"""The study's summary: the Markdown section that study.md opens with and README's Results holds.

Every number in it comes from the study's runs and checks (`scripts/study.py`); the sentences
that say who wins are `jkarcher.zoo.report`'s, generated from the same numbers.
"""

from __future__ import annotations

from pathlib import Path

from jkarcher.zoo import report, study_cells
from jkarcher.zoo.study import FISHER_VARIANTS, STUDY_PARAMS


def summary_section(
    runs,
    spread,
    paired: str,
    checks: list[dict],
    check_sizes: dict[str, int],
    base_average: float,
    distances: str,
    out: Path,
    diagnostics: str,
    seconds: float,
    trained: dict[str, float],
    seeds: int,
    check_windows: int,
) -> str:
    """The Markdown summary shared by study.md and README's Results section.

    `runs` are the means over the seeds, `spread` the standard deviation of each average, `paired`
    karcher against every method over the (seed, N) cells, `checks` each seed's expert check
    (scores of the base and the experts on `check_sizes` held-out prompts per task and
    `check_windows` windows per text); `seconds` the merges' time, `trained` seed 0's training
    times by member, `seeds` how many seeds there are."""
    pngs = sorted(p.name for p in (out / "diagnostics").glob("*.png"))
    effective_rank = next(
        (p for p in pngs if "effective" in p.lower() or "effrank" in p.lower()), None
    )
    lines = [
        "### The experts alone against the base",
        "",
        "Scores are exact-match accuracy for tasks and next-token accuracy for text, on every "
        "held-out prompt of each task ("
        + ", ".join(f"{name} {count}" for name, count in check_sizes.items())
        + f") and {check_windows} held-out windows of each text domain; the columns but "
        "the seeds' are means over the seeds. An expert keeps a domain when it scores within "
        "0.05 of the base there.",
        "",
        report.expert_table(study_cells.mean_references(checks), checks),
        "",
        "How far the experts are from the base and from each other, per tensor family "
        "(task vector tau_i = expert_i - base; norms averaged over the experts, angles over "
        "their pairs):",
        "",
        distances,
        "",
        "### Average score by method and number of merged models",
        "",
        f"Each cell is the mean over {seeds} seed{'s' if seeds > 1 else ''} (the experts "
        "retrained from the same base on other samples and batch orders)"
        + (" +- the sample standard deviation" if seeds > 1 else "")
        + "; the best mean of each column is in bold. The pool is the base model followed by "
        "the experts in the zoo's fixed order; methods that need a base merge models 2..N onto "
        "model 1. Weights are equal; parameters are mergekit's defaults except "
        + ", ".join(f"{m} {p}" for m, p in sorted(STUDY_PARAMS.items()))
        + ". The expert table and the distances are the means over the seeds and seed 0's.",
        "",
        report.average_table(runs, spread if seeds > 1 else None),
        "",
        "karcher against every method, paired over the cells both ran (a tie: averages within "
        "0.0005):",
        "",
        paired,
        "",
        *[f"- {s}" for s in report.findings(runs)],
        *[f"- {s}" for s in report.variant_findings(runs, FISHER_VARIANTS)],
        *[f"- {s}" for s in report.reference_findings(runs, base_average)],
        "",
        "![average score against N](average_vs_n.png)",
        "",
        f"### Collapse diagnostics of the N={max(r.n_models for r in runs)} merges "
        "(the paper's Table 7; seed 0)",
        "",
        diagnostics.strip(),
        "",
    ]
    if effective_rank:
        lines += [f"![effective rank per layer](diagnostics/{effective_rank})", ""]
    experts = sum(v for member, v in trained.items() if member != "base")
    lines.append(
        f"The merges and their scoring took {seconds / 60:.1f} minutes on this machine over the "
        f"{seeds} seed{'s' if seeds > 1 else ''}; training seed 0's zoo took "
        f"{trained.get('base', 0.0) / 60:.1f} minutes for the base and {experts / 60:.1f} for "
        "the experts (each further seed trains its experts again)."
    )
    return "\n".join(lines)
