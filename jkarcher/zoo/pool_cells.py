"""One cell of the distance sweep or the pairwise setting: a small zoo (a base and its experts)
merged whole by every study row, each merge scored on every domain, the results cached.

A cell's file holds the settings it was made with, the zoo's distances, the scores of the base
and each expert alone (`references`) and each row's scores (`runs`), written after every merge;
a run of the same settings takes what the file holds and merges only what is missing, so a sweep
stops and resumes where it was.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tokenizers import Tokenizer

from jkarcher import models
from jkarcher.zoo import study_cells
from jkarcher.zoo.build import zoo_members
from jkarcher.zoo.calibration import pool_statistics
from jkarcher.zoo.domains import DOMAINS
from jkarcher.zoo.evaluation import EvalSet, build_eval_set, evaluate
from jkarcher.zoo.recipes import ZooRecipe, recipe_record
from jkarcher.zoo.study import applicable, calibration_inputs, merge_pool
from jkarcher.zoo.tokenizer import byte_tokenizer


@dataclasses.dataclass(frozen=True)
class Scoring:
    """The held-out data every cell is scored on, and the settings it was drawn with."""

    tokenizer: Tokenizer
    evals: EvalSet
    settings: dict


def scoring(examples: int, text_windows: int, seq_len: int) -> Scoring:
    """`examples` held-out prompts per task and `text_windows` windows per text domain."""
    tokenizer = byte_tokenizer()
    evals = build_eval_set(
        tokenizer, examples=examples, text_windows=text_windows, seq_len=seq_len, seed=0
    )
    return Scoring(tokenizer, evals, {"examples": examples, "text_windows": text_windows})


def run_cell(
    zoo: Path,
    recipe: ZooRecipe,
    rows: Sequence[str],
    scoring: Scoring,
    path: Path,
    seed: int,
    distances: Callable[[Path, list[Path]], dict[str, float]],
    log=print,
) -> dict:
    """Every applicable row's merge of the zoo's base and experts, scored, as the cell at `path`.

    `distances(base_dir, expert_dirs)` gives the cell's distances; `seed` keys the random merges.
    """
    cell = study_cells.load_cell(path, {"recipe": recipe_record(recipe)} | scoring.settings)
    base_dir, expert_dirs = zoo_members(zoo)
    config, base = models.load(base_dir)
    pool = [base] + [models.load(d)[1] for d in expert_dirs]

    def score(params) -> dict:
        results = evaluate(config, params, scoring.tokenizer, scoring.evals)
        return {d.name: results[d.name]["score"] for d in DOMAINS}

    if "references" not in cell:
        cell["distances"] = distances(base_dir, expert_dirs)
        cell["references"] = {"base": score(base)}
        for directory, params in zip(expert_dirs, pool[1:], strict=True):
            cell["references"][directory.name] = score(params)
        study_cells.save_cell(path, cell)
    missing = [r for r in rows if r not in cell["runs"] and applicable(r, len(pool))]
    needed = {name for row in missing for name in calibration_inputs(row)}
    domains = [None, *(e.domain for e in recipe.experts)]
    statistics = pool_statistics(config, pool, domains, recipe, needed)
    for row in missing:
        began = time.perf_counter()
        scores = score(merge_pool(pool, row, len(pool), seed, statistics))
        cell["runs"][row] = {"scores": scores, "seconds": time.perf_counter() - began}
        average = sum(scores.values()) / len(scores)
        log(f"{path.stem} {row:17s} average {average:.3f}")
        study_cells.save_cell(path, cell)
    return cell
