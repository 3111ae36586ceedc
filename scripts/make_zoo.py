"""Train an expert zoo: a tiny Qwen2 base on a mixture of domains, then one expert per domain.

    python scripts/make_zoo.py              # the fine-tune zoo (10 experts) in cache/zoo-finetune
    python scripts/make_zoo.py --zoo=far    # the far zoo (10 experts) in cache/zoo-far
    python scripts/make_zoo.py --zoo=small  # 4 experts in cache/zoo-small (CI-sized)

The models are saved as Hugging Face checkpoints (config.json, model.safetensors, tokenizer.json)
under base/ and expert-<domain>/, with zoo.json recording the recipe and each model's training
loss, time and distance from the base. A zoo whose recipe matches is reused; the recipes are in
jkarcher/zoo/build.py. The script ends by printing how far the experts are from the base and from
each other, per tensor family.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from absl import app, flags, logging

from jkarcher.zoo.build import ZooError, build_zoo, zoo_members
from jkarcher.zoo.distances import checkpoint_distances, distance_table
from jkarcher.zoo.recipes import ZOOS

ROOT = Path(__file__).resolve().parents[1]
_ZOO = flags.DEFINE_enum("zoo", "finetune", sorted(ZOOS), "which zoo recipe to build")
_ZOO_DIR = flags.DEFINE_string("zoo_dir", None, "directory (default cache/zoo-<zoo>)")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    start = time.perf_counter()
    try:
        directory = build_zoo(
            Path(_ZOO_DIR.value or ROOT / "cache" / f"zoo-{_ZOO.value}"), ZOOS[_ZOO.value]
        )
    except ZooError as err:
        sys.exit(f"error: {err}")
    print(f"zoo ready in {directory} ({time.perf_counter() - start:.0f} s)")
    print(distance_table(checkpoint_distances(*zoo_members(directory))))


if __name__ == "__main__":
    app.run(main)
