"""`jkarcher-yaml CONFIG_FILE OUT_PATH [options]`: a mergekit YAML merged with mergekit-yaml's
command line.

    jkarcher-yaml ties.yml ./merged --copy-tokenizer --out-shard-size 2B --random-seed 1

The options of `mergekit-yaml` are accepted under their names. Those with a meaning here set the
run: --allow-crimes, --copy-tokenizer/--no-copy-tokenizer, --out-shard-size (mergekit's sizes:
"5B" is 5 * 10^9 bytes), --random-seed, --transformers-cache (where hub ids are looked up),
--quiet and -v; --memory (not in mergekit) sets the memory budget, e.g. 8GB. The rest concern
how mergekit computes in PyTorch (devices, threads, lazy
loading, asynchronous writes) or what jkarcher always does (a model card, safetensors); each is
accepted, and one line says that it changes nothing. --overwrite (not in mergekit) replaces
OUT_PATH when it is an earlier jkarcher output or an empty directory; nothing else is ever
replaced. Errors are one line and a non-zero exit status, before anything is written.

A file of several YAML documents, each with a `name` but for at most one, is a multi-stage merge as
mergekit-multi runs it (`jkarcher/mergekit_yaml/multi.py`): each stage is merged into
`--intermediate-dir/NAME` (default: OUT_PATH.intermediates, beside OUT_PATH) but the final one, the
document without a name (else the one no other stage uses), into OUT_PATH. An intermediate left
complete by an earlier run of the same stage is kept (unless --no-lazy); any other existing one is
replaced only with --overwrite, under the same rules as OUT_PATH.
"""

from __future__ import annotations

import argparse
import os
import sys

from absl import logging

from jkarcher.commands.running import enable_compile_cache, run_stages, stop_quietly_on_signals
from jkarcher.config import ConfigError, base_config, validate
from jkarcher.errors import JkarcherError
from jkarcher.mergekit_yaml import multi

# mergekit-yaml's options that change nothing here, and why.
NO_EFFECT = {
    "cuda": "jkarcher computes on JAX's default devices",
    "device": "jkarcher computes on JAX's default devices",
    "gpu_rich": "jkarcher computes on JAX's default devices",
    "read_to_gpu": "jkarcher places tensors on JAX's devices as it reads them",
    "multi_gpu": "jkarcher spreads each tensor over every device of its mesh (--config.mesh)",
    "low_cpu_memory": "jkarcher holds what its memory budget allows (--memory)",
    "lazy_unpickle": "jkarcher reads safetensors byte ranges and refuses pickled checkpoints",
    "clone_tensors": "jkarcher writes every tensor it is asked for",
    "trust_remote_code": "jkarcher never runs a model's code",
    "num_threads": "XLA chooses its threads",
    "async_write": "jkarcher always writes while it merges",
    "write_threads": "jkarcher always writes while it merges",
    "lora_merge_cache": "jkarcher applies LoRA adapters as it reads, without a cache",
    "lora_merge_dtype": "jkarcher applies LoRA adapters in float32",
    "write_model_card": "jkarcher always writes the model card",
    "safe_serialization": "jkarcher writes safetensors only",
    "unsafe_truncate_embeddings": "jkarcher merges differing vocabularies on the rows they share",
}
# Options whose value other than the default changes nothing; the flags that take a value.
_FLAGS = ("device", "num_threads", "write_threads", "lora_merge_cache", "lora_merge_dtype")
_DEFAULT_ON = ("write_model_card", "safe_serialization")


def parser() -> argparse.ArgumentParser:
    """mergekit-yaml's command line (its options as `--name/--no-name` switches)."""
    parse = _OneLineErrors(prog="jkarcher-yaml", description=__doc__.split("\n\n")[0])
    parse.add_argument("config_file", help="a mergekit YAML config")
    parse.add_argument("out_path", help="the output directory")
    switch = argparse.BooleanOptionalAction
    parse.add_argument("--allow-crimes", action=switch, default=False, help="mix architectures")
    parse.add_argument("--copy-tokenizer", action=switch, default=True)
    parse.add_argument("--out-shard-size", default="5B", help="bytes per shard (5B: 5 * 10^9)")
    parse.add_argument("--random-seed", type=int, default=None)
    parse.add_argument(
        "--memory", default=None, help="memory budget, e.g. 8GB (default: half the available)"
    )
    parse.add_argument("--transformers-cache", default=None, help="the HF hub cache to look in")
    parse.add_argument("--overwrite", action="store_true", help="replace an earlier output")
    parse.add_argument(
        "--intermediate-dir", "-I", default=None, help="where a multi-stage merge's stages go"
    )
    parse.add_argument("--lazy", action=switch, default=True, help="keep finished stages")
    parse.add_argument("--quiet", action=switch, default=False, help="no progress bar")
    parse.add_argument("-v", dest="verbosity", action="count", default=0)
    for name in NO_EFFECT:
        option = "--" + name.replace("_", "-")
        if name in _FLAGS:
            parse.add_argument(option, *(["-j"] if name == "num_threads" else []), default=None)
        elif name == "gpu_rich":
            parse.add_argument(option, action="store_true")
        else:
            parse.add_argument(option, action=switch, default=name in _DEFAULT_ON)
    return parse


class _OneLineErrors(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {message} (jkarcher-yaml --help tells the options)", file=sys.stderr)
        sys.exit(2)


def config_fields(arguments: argparse.Namespace, stages: list[multi.Stage]) -> list[dict]:
    """The jkarcher config fields of each stage of the YAML (one, unless it holds several) and
    the options (the YAML's notes, and a note for each option given that changes nothing,
    logged)."""
    for stage in stages:
        for note in stage.notes:
            where = f" (stage {stage.name})" if stage.name else ""
            logging.warning("%s%s: %s", arguments.config_file, where, note)
    for name, why in NO_EFFECT.items():
        value = getattr(arguments, name)
        if value not in (None, False) and not (name in _DEFAULT_ON and value is True):
            logging.warning("--%s: changes nothing, since %s", name.replace("_", "-"), why)
    run = {
        "allow_crimes": arguments.allow_crimes,
        "copy_tokenizer": arguments.copy_tokenizer,
        "out_shard_size": arguments.out_shard_size,
        "overwrite": arguments.overwrite,
    }
    if arguments.random_seed is not None:
        run["seed"] = arguments.random_seed
    if arguments.memory is not None:
        run["memory"] = arguments.memory
    return [base_config().to_dict() | stage.fields | run for stage in stages]


def main(argv: list[str] | None = None) -> None:
    """The `jkarcher-yaml` command."""
    stop_quietly_on_signals(lambda: _merge(argv))


def _merge(argv: list[str] | None) -> None:
    arguments = parser().parse_args(argv)
    logging.set_verbosity(
        {0: logging.WARNING, 1: logging.INFO}.get(arguments.verbosity, logging.DEBUG)
    )
    if arguments.transformers_cache is not None:
        os.environ["HF_HUB_CACHE"] = arguments.transformers_cache
    try:
        enable_compile_cache()
        work_dir = arguments.intermediate_dir or multi.default_work_dir(arguments.out_path)
        stages = multi.load_stages(arguments.config_file, work_dir, arguments.out_path)
        reused = multi.reused_stages(stages) if arguments.lazy else set()
        configs = []
        for stage, fields in zip(stages, config_fields(arguments, stages), strict=True):
            try:
                configs.append((validate(fields), stage.name in reused))
            except ConfigError as err:
                where = f" (stage {stage.name})" if stage.name else ""
                raise ConfigError(
                    f"{arguments.config_file}{where}, as a jkarcher config: {err}"
                ) from None
    except (JkarcherError, OSError) as err:
        sys.exit(f"error: {err}")
    run_stages(configs, quiet=arguments.quiet)
