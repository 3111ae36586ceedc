"""The paper's pairwise setting: a base and its instruct model merged at three model sizes.

    python scripts/pairwise.py                          # 3 sizes x 3 seeds: results/pairwise/
    python scripts/pairwise.py --seeds=1 --sizes=64x2   # part of it

Each size's base is pre-trained as the fine-tune zoo's (the 128x4 base is that zoo's own, reused
when built) and its instruct model fine-tuned from it on every task at once (--zoo=small starts
from the CI zoo's recipe); each cell (size, seed) is built in cache/pairwise-<zoo>/<size>-seed<k>/,
its two models merged by every method that merges two, scored on every domain and saved as
cells/<size>-seed<k>.json; a cell whose file holds every method asked for is not run again, so a
run can stop and resume. Writes pairwise.md (per size: the distance, the two models alone, every
method's mean +- std over seeds; karcher against each method, paired over the cells) and
pairwise.csv. The sizes and the instruct recipe are in jkarcher/zoo/pairwise.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from absl import app, flags, logging

from jkarcher.zoo import pairwise_report, pool_cells
from jkarcher.zoo.build import ZooError, build_zoo
from jkarcher.zoo.pairwise import SIZES, pair_distances, size_recipe
from jkarcher.zoo.recipes import ZOOS, base_record
from jkarcher.zoo.study import study_rows

ROOT = Path(__file__).resolve().parents[1]
_ZOO = flags.DEFINE_enum("zoo", "finetune", ["finetune", "small"], "whose recipe the bases follow")
_STEP_SCALE = flags.DEFINE_float("step_scale", 1.0, "multiplies the instruct model's steps")
_SIZES = flags.DEFINE_list("sizes", [s.name for s in SIZES], "sizes to run")
_SEEDS = flags.DEFINE_integer("seeds", 3, "instruct seeds per size (0 .. seeds-1)", lower_bound=1)
_METHODS = flags.DEFINE_list("methods", None, "study rows (default: every merging method)")
_CACHE = flags.DEFINE_string("cache", str(ROOT / "cache"), "where the zoos are built")
_OUT = flags.DEFINE_string("out", str(ROOT / "results" / "pairwise"), "output directory")
_EXAMPLES = flags.DEFINE_integer("examples", 64, "held-out prompts per task domain")
_WINDOWS = flags.DEFINE_integer("text_windows", 200, "held-out 64-token windows per domain")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    start = time.perf_counter()
    sizes = {s.name: s for s in SIZES}
    unknown = [name for name in _SIZES.value if name not in sizes]
    if unknown:
        sys.exit(f"error: --sizes: unknown {', '.join(unknown)}; known: {', '.join(sizes)}")
    out = Path(_OUT.value)
    cache = Path(_CACHE.value)
    zoo_recipe = ZOOS[_ZOO.value]
    score_with = pool_cells.scoring(_EXAMPLES.value, _WINDOWS.value, zoo_recipe.seq_len)
    rows = _METHODS.value or study_rows()
    cells = {}
    for name in _SIZES.value:
        # Every seed copies one base: the zoo's own where this size is the zoo's, else seed 0's.
        shared_base = cache / f"pairwise-{_ZOO.value}" / f"{name}-seed0"
        if base_record(size_recipe(sizes[name], 0, zoo_recipe)) == base_record(zoo_recipe):
            shared_base = cache / f"zoo-{_ZOO.value}"
        for seed in range(_SEEDS.value):
            recipe = size_recipe(sizes[name], seed, zoo_recipe, step_scale=_STEP_SCALE.value)
            key = f"{name}-seed{seed}"
            try:
                zoo = build_zoo(
                    cache / f"pairwise-{_ZOO.value}" / key, recipe, base_from=shared_base
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
                pair_distances,
            )
    pairwise_report.write(cells, sizes, rows, out)
    print(f"pairwise done in {time.perf_counter() - start:.0f} s; results in {out}")


if __name__ == "__main__":
    app.run(main)
