"""Merge Hugging Face checkpoints on disk as a config file says, into a new HF checkpoint.

    python scripts/merge.py --config configs/demo.py
    python scripts/merge.py --config configs/qwen14b.py --config.output=/data/merged
    python scripts/merge.py --mergekit-yaml ties.yml --config.output=/data/merged

Any config field can be overridden on the command line (`--config.FIELD=VALUE`); see
`jkarcher/config.py` for the fields. A mergekit YAML config (`--mergekit-yaml`, translated by
`jkarcher/mergekit_yaml.py`) gives the merge itself; `--config.FIELD=VALUE` then sets the run's
fields (output, overwrite, out_shard_size, seed, ...) over the defaults. Inputs are read from
disk or the local HF cache, never the network. The output appears only once it is complete.
With JAX_COMPILATION_CACHE_DIR=DIR set, compiled merge functions are kept between runs, so a
repeated merge of the same shapes starts at once.

Several processes (hosts) run one merge when each is started with the same config and
`--config.distributed.enabled=True` (plus coordinator_address, num_processes and process_id,
unless the cluster's environment gives them; see `jkarcher/config.py`): each reads and writes only
the rows its own devices hold, and the output appears once all of them have finished.

Methods that take each model's diagonal Fisher read it as `params.fisher` says; given a text
(`{"text": FILE, ...}`), the Fishers not yet estimated on it are estimated first and saved beside
the models.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from jkarcher import distributed, mergekit_yaml, pipeline
from jkarcher.config import ConfigError, MergeConfig, distributed_settings, validate
from jkarcher.fisher import FisherError
from jkarcher.io import CheckpointError
from jkarcher.io.writer import OutputError
from jkarcher.merge import MergeError

DEFAULTS = Path(__file__).resolve().parents[1] / "configs" / "defaults.py"
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(DEFAULTS), "Merge config file (configs/*.py)."
)
_MERGEKIT_YAML = flags.DEFINE_string(
    "mergekit-yaml",
    None,
    "A mergekit YAML config to run instead of --config; set the output with --config.output=DIR.",
)

USER_ERRORS = (ConfigError, CheckpointError, OutputError, MergeError, FisherError)


def read_config() -> MergeConfig:
    """The validated merge config given on the command line: a config file, or a mergekit YAML
    file whose fields `--config.FIELD=VALUE` completes (output, ...) or overrides."""
    given = flags.FLAGS["config"].present
    if _MERGEKIT_YAML.value is None:
        if not given:
            raise app.UsageError("give --config FILE, or --mergekit-yaml FILE --config.output=DIR")
        return validate(_CONFIG.value)
    if given:
        raise app.UsageError(
            "--config and --mergekit-yaml exclude each other; with --mergekit-yaml, set the "
            "output and the run's other fields with --config.FIELD=VALUE"
        )
    translation = mergekit_yaml.load(_MERGEKIT_YAML.value)
    for note in translation.notes:
        logging.warning("%s: %s", _MERGEKIT_YAML.value, note)
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    overridden = {key.split(".")[0] for key in overrides}
    fields = _CONFIG.value.to_dict() | {
        key: value for key, value in translation.fields.items() if key not in overridden
    }
    try:
        return validate(fields)
    except ConfigError as err:
        raise ConfigError(f"{_MERGEKIT_YAML.value}, as a jkarcher config: {err}") from None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        distributed.initialize(distributed_settings(_CONFIG.value))
        config = read_config()
        for estimate in pipeline.prepare_fishers(config, progress=distributed.is_leader()):
            print(estimate)
        plan = pipeline.plan_merge(config)
        for warning in plan.warnings:
            logging.warning(warning)
        print(
            f"merging {len(config.models)} models with {config.method}: {len(plan.tasks)} "
            f"tensors, {plan.bytes_to_read / 1e9:.2f} GB to read -> {config.output}"
        )
        quiet = not distributed.is_leader()
        with tqdm(total=len(plan.tasks), unit="tensor", disable=quiet) as progress:
            summary = pipeline.run(plan, on_tensor=lambda task: progress.update())
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
    print(summary)


if __name__ == "__main__":
    app.run(main)
