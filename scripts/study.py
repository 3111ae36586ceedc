"""The paper's study on the zoo: every method, N = 2 .. 11 models, scored on every domain.

    python scripts/study.py              # the fine-tune zoo (built on first use): results/finetune/
    python scripts/study.py --zoo=far    # the far zoo: results/far/
    python scripts/study.py --zoo=small  # the small zoo: results/small/ (minutes)

Writes study.csv, study.md (average score by method and N, the per-domain table in the layout of
the paper's Appendix A with the base and each expert alone as reference rows, and the Table 7
diagnostics of the largest merges), average_vs_n.png, and diagnose.py's per-metric PNGs for the
largest merges. With --readme, replaces README.md's Results section with the generated summary.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags, logging

from jkarcher import models
from jkarcher.zoo import report
from jkarcher.zoo.build import ZooError, build_zoo, zoo_members
from jkarcher.zoo.distances import checkpoint_distances, distance_table
from jkarcher.zoo.domains import DOMAINS, text_lines
from jkarcher.zoo.evaluation import build_eval_set, evaluate
from jkarcher.zoo.fishers import pool_fishers
from jkarcher.zoo.recipes import ZOOS
from jkarcher.zoo.study import (
    FISHER_VARIANTS,
    STUDY_PARAMS,
    merge_pool,
    run_study,
    study_rows,
    uses_fisher,
)
from jkarcher.zoo.tokenizer import byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DIAGNOSED = (
    "karcher",
    "karcher+fisher",
    "linear",
    "ties",
    "task_arithmetic",
    "dare_ties",
    "model_stock",
    "multislerp",
)

_ZOO = flags.DEFINE_enum("zoo", "finetune", sorted(ZOOS), "which zoo recipe to study")
_ZOO_DIR = flags.DEFINE_string("zoo_dir", None, "zoo directory (default cache/zoo-<zoo>)")
_OUT = flags.DEFINE_string("out", None, "output directory (default results/<zoo>)")
_METHODS = flags.DEFINE_list(
    "methods", None, "study rows to compare (default: every merging method and karcher+fisher)"
)
_EXAMPLES = flags.DEFINE_integer("examples", 64, "held-out prompts per task domain")
_WINDOWS = flags.DEFINE_integer("text_windows", 200, "held-out 64-token windows per domain")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the evaluation data and random merges")
_README = flags.DEFINE_string("readme", None, "README.md whose Results section to rewrite")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    start = time.perf_counter()
    recipe = ZOOS[_ZOO.value]
    zoo = Path(_ZOO_DIR.value or ROOT / "cache" / f"zoo-{_ZOO.value}")
    out = Path(_OUT.value or ROOT / "results" / _ZOO.value)
    out.mkdir(parents=True, exist_ok=True)

    try:
        build_zoo(zoo, recipe)
    except ZooError as err:
        sys.exit(f"error: {err}")
    base_dir, expert_dirs = zoo_members(zoo)
    config, base = models.load(base_dir)
    pool = [base] + [models.load(d)[1] for d in expert_dirs]
    tokenizer = byte_tokenizer()
    evals = build_eval_set(
        tokenizer,
        examples=_EXAMPLES.value,
        text_windows=_WINDOWS.value,
        seq_len=recipe.seq_len,
        seed=_SEED.value,
    )

    def score(params):
        return evaluate(config, params, tokenizer, evals)

    references = {"base": score(base)}
    for path, params in zip(expert_dirs, pool[1:], strict=True):
        references[path.name] = score(params)
    rows = _METHODS.value or study_rows()
    fishers = []
    if any(uses_fisher(row) for row in rows):
        fishers = pool_fishers(config, pool, [None, *(e.domain for e in recipe.experts)], recipe)
    runs = run_study(pool, score, rows, fishers=fishers, seed=_SEED.value)

    report.write_csv(runs, references, out / "study.csv")
    report.plot_average_vs_n(runs, out / "average_vs_n.png")
    diagnostics = diagnose_largest_merges(pool, fishers, config, tokenizer, recipe.seq_len, out)
    seconds = time.perf_counter() - start
    base_average = sum(references["base"][d.name]["score"] for d in DOMAINS) / len(DOMAINS)
    distances = distance_table(checkpoint_distances(base_dir, expert_dirs))
    summary = summary_section(runs, references, base_average, distances, out, diagnostics, seconds)
    (out / "study.md").write_text(
        summary + "\n\n## Scores by domain\n\n" + report.domain_table(runs, references) + "\n"
    )
    if _README.value:
        report.update_readme(
            Path(_README.value),
            summary.replace("](", f"]({os.path.relpath(out, Path(_README.value).parent)}/"),
        )
    print(f"study done in {seconds:.0f} s; results in {out}")


def diagnose_largest_merges(pool, fishers, config, tokenizer, seq_len: int, out: Path) -> str:
    """Save the base and the N = pool-size merges, and run scripts/diagnose.py on them.

    Returns diagnose's Markdown table (the paper's Table 7 layout).
    """
    n_models = len(pool)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints, names = [], []
        chosen = [m for m in DIAGNOSED if fishers or not uses_fisher(m)]
        for method in ("base", *chosen):
            params = pool[0] if method == "base" else merge_pool(pool, method, n_models, 0, fishers)
            directory = Path(tmp) / method
            models.save(directory, config, params)
            tokenizer.save(str(directory / "tokenizer.json"))
            checkpoints.append(str(directory))
            names.append(method if method == "base" else f"{method} N={n_models}")
        text = Path(tmp) / "held_out.txt"
        text.write_text("\n".join(text_lines("prose", "eval") + text_lines("code", "eval")))
        diagnose_out = out / "diagnostics"
        if diagnose_out.exists():
            shutil.rmtree(diagnose_out)
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "diagnose.py"),
                f"--checkpoints={','.join(checkpoints)}",
                f"--names={','.join(names)}",
                f"--text={text}",
                f"--seq_len={seq_len}",
                "--batch_size=16",
                "--max_batches=8",
                f"--out_dir={diagnose_out}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return (diagnose_out / "diagnostics.md").read_text()


def summary_section(
    runs, references, base_average: float, distances: str, out: Path, diagnostics: str, seconds
) -> str:
    """The Markdown summary shared by study.md and README's Results section."""
    pngs = sorted(p.name for p in (out / "diagnostics").glob("*.png"))
    effective_rank = next(
        (p for p in pngs if "effective" in p.lower() or "effrank" in p.lower()), None
    )
    lines = [
        "### The experts alone against the base",
        "",
        "Scores are exact-match accuracy for tasks and next-token accuracy for text, on held-out "
        "data; an expert keeps a domain when it scores within 0.05 of the base there.",
        "",
        report.expert_table(references),
        "",
        "How far the experts are from the base and from each other, per tensor family "
        "(task vector tau_i = expert_i - base; norms averaged over the experts, angles over "
        "their pairs):",
        "",
        distances,
        "",
        "### Average score by method and number of merged models",
        "",
        "The best of each column is in bold. The pool is the base model followed by the experts "
        "in the zoo's fixed order; methods that need a base merge models 2..N onto model 1. "
        "Weights are equal; parameters are mergekit's defaults except "
        + ", ".join(f"{m} {p}" for m, p in sorted(STUDY_PARAMS.items()))
        + ".",
        "",
        report.average_table(runs),
        "",
        *[f"- {s}" for s in report.findings(runs)],
        *[f"- {s}" for s in report.variant_findings(runs, FISHER_VARIANTS)],
        *[f"- {s}" for s in report.reference_findings(runs, base_average)],
        "",
        "![average score against N](average_vs_n.png)",
        "",
        f"### Collapse diagnostics of the N={max(r.n_models for r in runs)} merges "
        "(the paper's Table 7)",
        "",
        diagnostics.strip(),
        "",
    ]
    if effective_rank:
        lines += [f"![effective rank per layer](diagnostics/{effective_rank})", ""]
    lines.append(f"The study took {seconds / 60:.1f} minutes on this machine.")
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
