"""The distance sweep: four experts fine-tuned from near the base to far from it, every method.

    python scripts/sweep.py                                     # 5 levels x 3 seeds: results/sweep/
    python scripts/sweep.py --seeds=1 --levels=1-nearest,4-far  # part of it

Each cell (level, seed) trains its experts from the fine-tune zoo's base (the zoo is built first,
or reused; --zoo=small starts from the CI zoo's) into cache/sweep-<zoo>/<level>-seed<k>/, merges
the base and the experts with every method (methods that need a base merge the experts onto it),
scores each merge on every domain and saves cells/<level>-seed<k>.json; a cell whose file holds
every method asked for is not run again, so the sweep can stop and resume. Writes sweep.md (per
level: the distances and each method's mean +- std over seeds; karcher against each method,
paired over the cells), sweep.csv and two plots. The levels and domains are in
jkarcher/zoo/sweep.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from absl import app, flags, logging

from jkarcher.zoo import pool_cells, sweep_report
from jkarcher.zoo.build import ZooError, build_zoo
from jkarcher.zoo.distances import checkpoint_distances
from jkarcher.zoo.recipes import ZOOS
from jkarcher.zoo.study import study_rows
from jkarcher.zoo.sweep import LEVELS, level_recipe

ROOT = Path(__file__).resolve().parents[1]
_ZOO = flags.DEFINE_enum(
    "zoo", "finetune", ["finetune", "small"], "whose base the experts start from"
)
_STEP_SCALE = flags.DEFINE_float("step_scale", 1.0, "multiplies every level's fine-tuning steps")
_LEVELS = flags.DEFINE_list("levels", [lv.name for lv in LEVELS], "levels to run")
_SEEDS = flags.DEFINE_integer("seeds", 3, "expert seeds per level (0 .. seeds-1)")
_METHODS = flags.DEFINE_list("methods", None, "study rows (default: every merging method)")
_CACHE = flags.DEFINE_string("cache", str(ROOT / "cache"), "where the zoos are built")
_OUT = flags.DEFINE_string("out", str(ROOT / "results" / "sweep"), "output directory")
_EXAMPLES = flags.DEFINE_integer("examples", 64, "held-out prompts per task domain")
_WINDOWS = flags.DEFINE_integer("text_windows", 200, "held-out 64-token windows per domain")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    start = time.perf_counter()
    levels = {lv.name: lv for lv in LEVELS}
    unknown = [name for name in _LEVELS.value if name not in levels]
    if unknown:
        sys.exit(f"error: --levels: unknown {', '.join(unknown)}; known: {', '.join(levels)}")
    out = Path(_OUT.value)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    cache = Path(_CACHE.value)
    base_recipe = ZOOS[_ZOO.value]
    try:
        base_zoo = build_zoo(cache / f"zoo-{_ZOO.value}", base_recipe)
    except ZooError as err:
        sys.exit(f"error: {err}")
    score_with = pool_cells.scoring(_EXAMPLES.value, _WINDOWS.value, base_recipe.seq_len)
    rows = _METHODS.value or study_rows()
    cells = {}
    for seed in range(_SEEDS.value):  # seed by seed: a sweep stopped early still spans every level
        for name in _LEVELS.value:
            recipe = level_recipe(levels[name], seed, base_recipe, step_scale=_STEP_SCALE.value)
            key = f"{name}-seed{seed}"
            try:
                zoo = build_zoo(
                    cache / f"sweep-{_ZOO.value}" / key, recipe, log=print, base_from=base_zoo
                )
            except ZooError as err:
                sys.exit(f"error: {err}")
            cells[(name, seed)] = pool_cells.run_cell(
                zoo,
                recipe,
                rows,
                score_with,
                out / "cells" / f"{key}.json",
                seed,
                experts_apart,
            )
    sweep_report.write(cells, levels, rows, out)
    print(f"sweep done in {time.perf_counter() - start:.0f} s; results in {out}")


def experts_apart(base_dir: Path, expert_dirs: list[Path]) -> dict[str, float]:
    """The whole model's distances: between the experts, and their task vectors' size."""
    return checkpoint_distances(base_dir, expert_dirs, family=lambda name: "model")["model"]


if __name__ == "__main__":
    app.run(main)
