"""Train the expert zoo: a tiny Qwen2 base on every domain, then one expert per domain.

    python scripts/make_zoo.py            # the full zoo (10 experts) in cache/zoo
    python scripts/make_zoo.py --small    # 4 experts in cache/zoo-small (CI-sized)

The models are saved as Hugging Face checkpoints (config.json, model.safetensors, tokenizer.json)
under base/ and expert-<domain>/, with zoo.json recording the recipe and each model's training
loss, time and distance from the base. A zoo whose recipe matches is reused; the recipes are in
jkarcher/zoo/build.py.
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import app, flags, logging

from jkarcher.zoo.build import FULL, SMALL, build_zoo

ROOT = Path(__file__).resolve().parents[1]
_SMALL = flags.DEFINE_bool("small", False, "build the small zoo (4 experts, tiny models)")
_ZOO = flags.DEFINE_string("zoo", None, "directory (default cache/zoo or cache/zoo-small)")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    start = time.perf_counter()
    suffix = "-small" if _SMALL.value else ""
    directory = build_zoo(
        Path(_ZOO.value or ROOT / "cache" / f"zoo{suffix}"), SMALL if _SMALL.value else FULL
    )
    print(f"zoo ready in {directory} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    app.run(main)
