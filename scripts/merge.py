"""Merge Hugging Face checkpoints on disk as a config file says, into a new HF checkpoint.

    python scripts/merge.py --config configs/demo.py
    python scripts/merge.py --config configs/qwen14b.py --config.output=/data/merged

Any config field can be overridden on the command line (`--config.FIELD=VALUE`); see
`jkarcher/config.py` for the fields. Inputs are read from disk or the local HF cache, never the
network. The output appears only once it is complete. With JAX_COMPILATION_CACHE_DIR=DIR set,
compiled merge functions are kept between runs, so a repeated merge of the same shapes starts
at once.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from jkarcher import pipeline
from jkarcher.config import ConfigError, MergeConfig, validate
from jkarcher.io import CheckpointError
from jkarcher.io.writer import OutputError
from jkarcher.merge import MergeError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Merge config file (configs/*.py).")
flags.mark_flag_as_required("config")

USER_ERRORS = (ConfigError, CheckpointError, OutputError, MergeError)


def read_config() -> MergeConfig:
    """The validated merge config given on the command line."""
    return validate(_CONFIG.value)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = read_config()
        plan = pipeline.plan_merge(config)
        for warning in plan.warnings:
            logging.warning(warning)
        print(
            f"merging {len(config.models)} models with {config.method}: {len(plan.tasks)} "
            f"tensors, {plan.bytes_to_read / 1e9:.2f} GB to read -> {config.output}"
        )
        with tqdm(total=len(plan.tasks), unit="tensor") as progress:
            summary = pipeline.run(plan, on_tensor=lambda task: progress.update())
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
    print(summary)


if __name__ == "__main__":
    app.run(main)
