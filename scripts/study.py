"""The paper's study on the zoo: every method, N = 2 .. 11 models, scored on every domain, over
seeds.

    python scripts/study.py              # the fine-tune zoo (built on first use): results/finetune/
    python scripts/study.py --zoo=far    # the far zoo: results/far/
    python scripts/study.py --zoo=small  # the small zoo: results/small/ (minutes)

Seed 0 is the zoo itself; seed k (--seeds, default 3) retrains the zoo's experts from the same
base with other training data and batch order (the recipe's expert_seed k), next to the zoo
(<zoo_dir>-seed<k>), and draws the random merges with key k. Each seed's merges are cached in
cells/seed<k>.json as they finish, so a study stops and resumes (`jkarcher.zoo.study_cells`).
Each seed also gets an expert check: the base and each expert alone scored on every held-out
prompt of each task (up to --check_examples) and --check_windows text windows, since the study's
64 prompts cannot tell a weak expert from its base. Writes study.csv (the mean over seeds of every
merge and reference model), study.md (the expert check, seed by seed; average score by method and
N as mean +- standard deviation over seeds; karcher against every method paired over the (seed,
N) cells; the per-domain table in the layout of the paper's Appendix A
with the base and each expert alone as reference rows; the Table 7 diagnostics of seed 0's
largest merges), average_vs_n.png (with bands of +- one standard deviation), and diagnose.py's
per-metric PNGs. With --readme, replaces README.md's Results section with the generated summary.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags, logging

from jkarcher import models
from jkarcher.zoo import report, study_cells, study_summary
from jkarcher.zoo.build import ZooError, build_zoo, training_seconds, zoo_members
from jkarcher.zoo.calibration import pool_statistics
from jkarcher.zoo.distances import checkpoint_distances, distance_table
from jkarcher.zoo.domains import DOMAINS, text_lines
from jkarcher.zoo.evaluation import build_eval_set, evaluate
from jkarcher.zoo.recipes import ZOOS, recipe_record
from jkarcher.zoo.study import (
    applicable,
    calibration_inputs,
    merge_pool,
    run_study,
    study_rows,
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
_CHECK_EXAMPLES = flags.DEFINE_integer(
    "check_examples", 1000, "the expert check's held-out prompts per task (all, if fewer)"
)
_CHECK_WINDOWS = flags.DEFINE_integer(
    "check_windows", 1000, "the expert check's held-out windows per text domain"
)
_SEED = flags.DEFINE_integer("seed", 0, "seed of the evaluation data")
_SEEDS = flags.DEFINE_integer(
    "seeds", 3, "expert seeds 0 .. seeds-1 (seed 0: the zoo itself)", lower_bound=1
)
_README = flags.DEFINE_string("readme", None, "README.md whose Results section to rewrite")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    start = time.perf_counter()
    recipe = ZOOS[_ZOO.value]
    zoo = Path(_ZOO_DIR.value or ROOT / "cache" / f"zoo-{_ZOO.value}")
    out = Path(_OUT.value or ROOT / "results" / _ZOO.value)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_tokenizer()
    held_out = {"seq_len": recipe.seq_len, "seed": _SEED.value}
    evals = build_eval_set(
        tokenizer, examples=_EXAMPLES.value, text_windows=_WINDOWS.value, **held_out
    )
    check_evals = build_eval_set(
        tokenizer, examples=_CHECK_EXAMPLES.value, text_windows=_CHECK_WINDOWS.value, **held_out
    )
    rows = _METHODS.value or study_rows()
    per_seed_runs, per_seed_references, per_seed_checks = [], [], []
    for seed in range(_SEEDS.value):
        seed_recipe = dataclasses.replace(recipe, expert_seed=seed)
        path = study_cells.cell_path(out, seed)
        cell = study_cells.load_cell(path, cell_settings(seed_recipe))
        pool_size = 1 + len(recipe.experts)
        wanted = [(r, n) for n in range(2, pool_size + 1) for r in rows if applicable(r, n)]
        done = study_cells.cached_runs(cell)
        finished = "references" in cell and checked(cell) and all(run in done for run in wanted)
        if seed > 0 and finished:
            # A finished seed needs no zoo: seed 0's alone is read again, for the diagnostics.
            per_seed_runs.append([done[run] for run in wanted])
            per_seed_references.append(cell["references"])
            per_seed_checks.append(cell["expert_check"]["references"])
            continue
        directory = zoo if seed == 0 else zoo.with_name(f"{zoo.name}-seed{seed}")
        try:
            build_zoo(directory, seed_recipe, base_from=None if seed == 0 else zoo)
        except ZooError as err:
            sys.exit(f"error: {err}")
        runs, cell, pool = run_seed(
            directory, seed_recipe, rows, tokenizer, (evals, check_evals), (path, cell), seed
        )
        per_seed_runs.append(runs)
        per_seed_references.append(cell["references"])
        per_seed_checks.append(cell["expert_check"]["references"])
        if seed == 0:
            largest = pool  # seed 0's pool, statistics and config, for the diagnostics
    runs, spread = study_cells.mean_runs(per_seed_runs)
    references = study_cells.mean_references(per_seed_references)

    report.write_csv(runs, references, out / "study.csv")
    report.plot_average_vs_n(runs, out / "average_vs_n.png", spread=spread)
    diagnostics = diagnose_largest_merges(*largest, tokenizer, recipe.seq_len, out)
    seconds = sum(r.seconds for seed_runs in per_seed_runs for r in seed_runs)
    base_average = sum(references["base"][d.name]["score"] for d in DOMAINS) / len(DOMAINS)
    base_dir, expert_dirs = zoo_members(zoo)
    distances = distance_table(checkpoint_distances(base_dir, expert_dirs))
    paired = study_cells.paired_table(per_seed_runs)
    summary = study_summary.summary_section(
        runs,
        spread,
        paired,
        per_seed_checks,
        {name: len(answers) for name, answers in check_evals.task_answers.items()},
        base_average,
        distances,
        out,
        diagnostics,
        seconds,
        training_seconds(zoo),
        seeds=_SEEDS.value,
        check_windows=_CHECK_WINDOWS.value,
    )
    (out / "study.md").write_text(
        summary + "\n\n## Scores by domain\n\n" + report.domain_table(runs, references) + "\n"
    )
    if _README.value:
        report.update_readme(
            Path(_README.value),
            summary.replace("](", f"]({os.path.relpath(out, Path(_README.value).parent)}/"),
        )
    print(f"study done in {time.perf_counter() - start:.0f} s; results in {out}")


def cell_settings(recipe) -> dict:
    """What a seed's results depend on besides the code: a cell made otherwise is redone."""
    return {
        "recipe": recipe_record(recipe),
        "examples": _EXAMPLES.value,
        "text_windows": _WINDOWS.value,
        "eval_seed": _SEED.value,
    }


def check_settings() -> dict:
    """What the expert check's scores depend on besides the pool."""
    return {
        "examples": _CHECK_EXAMPLES.value,
        "text_windows": _CHECK_WINDOWS.value,
        "eval_seed": _SEED.value,
    }


def checked(cell: dict) -> bool:
    """Whether the cell holds an expert check made with this run's settings."""
    return cell.get("expert_check", {}).get("settings") == check_settings()


def run_seed(zoo: Path, recipe, rows, tokenizer, evals, saved: tuple[Path, dict], seed: int):
    """One seed's references, expert check and merges: those in its cell `saved` (path, contents)
    as they are where the cell came from this pool, the others run and added to it one by one.
    `evals` are the study's held-out sets and the check's. Returns (runs, cell, (pool,
    statistics, config))."""
    base_dir, expert_dirs = zoo_members(zoo)
    config, base = models.load(base_dir)
    pool = [base] + [models.load(d)[1] for d in expert_dirs]
    members = dict(zip(["base", *(d.name for d in expert_dirs)], pool, strict=True))
    study_evals, check_evals = evals

    def score(params, held_out=study_evals):
        return evaluate(config, params, tokenizer, held_out)

    path, cell = saved
    cell = study_cells.for_pool(cell, study_cells.pool_digest([base_dir, *expert_dirs]))
    if "references" not in cell:
        cell["references"] = {name: score(params) for name, params in members.items()}
        study_cells.save_cell(path, cell)
    if not checked(cell):
        scores = {name: score(p, check_evals) for name, p in members.items()}
        cell["expert_check"] = {"settings": check_settings(), "references": scores}
        study_cells.save_cell(path, cell)
    done = study_cells.cached_runs(cell)
    missing = [
        row
        for n_models in range(2, len(pool) + 1)
        for row in rows
        if applicable(row, n_models) and (row, n_models) not in done
    ]
    # Seed 0's statistics serve the diagnostics too, which merge with every row they show.
    needed = {name for row in (rows if seed == 0 else missing) for name in calibration_inputs(row)}
    domains = [None, *(e.domain for e in recipe.experts)]
    statistics = pool_statistics(config, pool, domains, recipe, needed)

    def save(run):
        study_cells.add_run(cell, run)
        study_cells.save_cell(path, cell)

    runs = run_study(pool, score, rows, statistics=statistics, seed=seed, done=done, on_run=save)
    return runs, cell, (pool, statistics, config)


def diagnose_largest_merges(pool, statistics, config, tokenizer, seq_len: int, out: Path) -> str:
    """Save the base and the N = pool-size merges, and run scripts/diagnose.py on them.

    Returns diagnose's Markdown table (the paper's Table 7 layout).
    """
    n_models = len(pool)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints, names = [], []
        chosen = [m for m in DIAGNOSED if set(calibration_inputs(m)) <= set(statistics)]
        for method in ("base", *chosen):
            params = (
                pool[0] if method == "base" else merge_pool(pool, method, n_models, 0, statistics)
            )
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


if __name__ == "__main__":
    app.run(main)
