"""`jkarcher-merge`: merge Hugging Face checkpoints on disk as a config file says, into a new HF
checkpoint (`python scripts/merge.py` runs the same).

    jkarcher-merge --config configs/demo.py
    jkarcher-merge --config configs/qwen14b.py --config.output=/data/merged
    jkarcher-merge --mergekit-yaml ties.yml --config.output=/data/merged

Any config field can be overridden on the command line (`--config.FIELD=VALUE`, and a method's
parameters with `--config.params.NAME=VALUE` whether or not the file sets them); see
`jkarcher/config/schema.py` for the fields. A config file's `overwrite=True` covers only the output
it names itself: an output given on the command line is replaced only with
`--config.overwrite=True` too, and only when it is an earlier jkarcher output or an empty
directory. A mergekit YAML config (`--mergekit-yaml`, translated by `jkarcher/mergekit_yaml/`)
gives the merge itself; `--config.FIELD=VALUE` then sets the run's fields (output, overwrite,
out_shard_size, seed, ...). A mergekit YAML of several documents (each with a `name`, but for the
final one) is a multi-stage merge (`jkarcher/mergekit_yaml/multi.py`): its stages are merged in
turn into OUTPUT.intermediates/NAME, beside the output, but for the final one, into the output; one
left complete by an earlier run of the same stage is kept.
Inputs are read from disk or the local HF cache, never the network. The output appears only once
it is complete; Ctrl-C or SIGTERM stops the run, and nothing is left behind.
Compiled leaf functions are kept between runs (`jkarcher.compile_cache`: in ~/.cache/jkarcher/jax
unless JKARCHER_COMPILE_CACHE=DIR or JKARCHER_COMPILE_CACHE=off says otherwise).

Several processes (hosts) run one merge when each is started with the same config and
`--config.distributed.enabled=True` (plus coordinator_address, num_processes and process_id,
unless the cluster's environment gives them; see `jkarcher/config/schema.py`): each reads and
writes only the rows its own devices hold, and the output appears once all of them have finished.

Methods that take each model's diagonal Fisher read it as `params.fisher` says, and RegMean each
model's input Grams as `params.gram` says; given a text (`{"text": FILE, ...}`), those not yet
estimated on it are estimated first and saved beside the models. The built-in example's
checkpoints (`jkarcher.demo`) that a config names are written when the run first needs them.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import sys
from pathlib import Path
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from jkarcher import distributed, mergekit_yaml, methods
from jkarcher.commands import defaults
from jkarcher.commands.running import enable_compile_cache, run_stages, stop_quietly_on_signals
from jkarcher.config import (
    FIELDS,
    ConfigError,
    MergeConfig,
    base_config,
    distributed_settings,
    validate,
)
from jkarcher.errors import JkarcherError
from jkarcher.mergekit_yaml import multi

_CONFIG = config_flags.DEFINE_config_file(
    "config", defaults.__file__, "Merge config file (configs/*.py)."
)
_MERGEKIT_YAML = flags.DEFINE_string(
    "mergekit-yaml",
    None,
    "A mergekit YAML config to run instead of --config; set the output with --config.output=DIR.",
)
HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")
PARAMS_PREFIX = "--config.params."


@dataclasses.dataclass(frozen=True)
class CommandLine:
    """What the command line asks for beyond the flags: method parameters by dotted name."""

    params: dict[str, Any]


def parse_command_line(argv: list[str]) -> CommandLine:
    """Parse the flags and load the config file; every mistake is one line on stderr and exit
    status 2."""
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print(help_text())
        sys.exit(0)
    argv, params = _split_params(argv)
    sys.argv = argv  # the config flag reads its overrides from sys.argv
    _check_config_file(argv)
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value  # noqa: B018  (loads the config file, applying the overrides)
    except flags.Error as err:
        _usage_error(str(err))
    except (AttributeError, KeyError) as err:
        _usage_error(_unknown_field(err, argv))
    except Exception as err:  # the config file itself failed to load
        _usage_error(f"--config: cannot load the config file: {_first_line(err)}")
    if len(rest) > 1:
        _usage_error(f"unexpected arguments: {' '.join(rest[1:])}")
    return CommandLine(params)


def read_config(command_line: CommandLine) -> MergeConfig:
    """The validated merge config given on the command line: a config file, or a mergekit YAML
    file whose fields `--config.FIELD=VALUE` completes (output, ...) or overrides."""
    given = flags.FLAGS["config"].present
    overridden = {key.split(".")[0] for key in flags.FLAGS["config"].override_values}
    fields = _CONFIG.value.to_dict()
    if _MERGEKIT_YAML.value is None:
        if not given:
            raise ConfigError("give --config FILE, or --mergekit-yaml FILE --config.output=DIR")
        if "output" in overridden and "overwrite" not in overridden:
            fields["overwrite"] = False
        return validate(_with_params(fields, command_line.params))
    if given:
        raise ConfigError(
            "--config and --mergekit-yaml exclude each other; with --mergekit-yaml, set the "
            "output and the run's other fields with --config.FIELD=VALUE"
        )
    translation = mergekit_yaml.load(_MERGEKIT_YAML.value)
    for note in translation.notes:
        logging.warning("%s: %s", _MERGEKIT_YAML.value, note)
    fields |= {key: value for key, value in translation.fields.items() if key not in overridden}
    try:
        return validate(_with_params(fields, command_line.params))
    except ConfigError as err:
        raise ConfigError(f"{_MERGEKIT_YAML.value}, as a jkarcher config: {err}") from None


def read_stages(command_line: CommandLine) -> list[tuple[MergeConfig, bool]]:
    """The configs to merge in turn, each with whether an earlier run left its output complete:
    `read_config`'s one, or the stages of a multi-stage mergekit YAML file, whose fields
    `--config.FIELD=VALUE` completes or overrides as for one stage."""
    path = _MERGEKIT_YAML.value
    if path is None or flags.FLAGS["config"].present or not multi.holds_stages(path):
        return [(read_config(command_line), False)]
    overridden = {key.split(".")[0] for key in flags.FLAGS["config"].override_values}
    fields = _CONFIG.value.to_dict()
    if fields["output"] is None:
        raise ConfigError(f"--mergekit-yaml {path}: give the output with --config.output=DIR")
    stages = multi.load_stages(path, multi.default_work_dir(fields["output"]), fields["output"])
    reused = multi.reused_stages(stages)
    configs = []
    for stage in stages:
        for note in stage.notes:
            logging.warning("%s (stage %s): %s", path, stage.name, note)
        own = {key: value for key, value in stage.fields.items() if key not in overridden}
        try:
            config = validate(
                _with_params(fields | own | {"output": stage.output}, command_line.params)
            )
        except ConfigError as err:
            raise ConfigError(f"{path} (stage {stage.name}), as a jkarcher config: {err}") from None
        configs.append((config, stage.name in reused))
    return configs


def main() -> None:
    """The `jkarcher-merge` command: parse the command line, then merge."""
    stop_quietly_on_signals(lambda: app.run(_merge, flags_parser=parse_command_line))


def _merge(command_line: CommandLine) -> None:
    try:
        distributed.initialize(distributed_settings(_CONFIG.value))
        enable_compile_cache()
        stages = read_stages(command_line)
    except (JkarcherError, OSError) as err:
        sys.exit(f"error: {err}")
    run_stages(stages)


def help_text() -> str:
    """This script's usage, its flags, every config field with its default, and the methods."""
    defaults = base_config().to_dict()
    fields = "\n".join(f"  {name} = {defaults.get(name)!r}" for name in FIELDS)
    listed = "\n".join(f"  {name}: {methods.get(name).summary}" for name in methods.names())
    return (
        f"{__doc__}\nFlags:\n  --config FILE         a Python config file (configs/*.py)\n"
        "  --mergekit-yaml FILE  a mergekit YAML config\n"
        "  --config.FIELD=VALUE  set a config field (--config.params.NAME=VALUE: a parameter)\n"
        f"\nConfig fields (defaults; jkarcher/config/schema.py says what each means):\n{fields}\n"
        f"\nMethods (--config.method=NAME):\n{listed}\n"
    )


def _split_params(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """argv without its `--config.params.NAME=VALUE` (or `... NAME VALUE`) arguments, and those
    parameters with their values read as Python literals (text otherwise)."""
    rest, params = [], {}
    arguments = iter(argv)
    for argument in arguments:
        if not argument.startswith(PARAMS_PREFIX):
            rest.append(argument)
            continue
        name, equals, text = argument.removeprefix(PARAMS_PREFIX).partition("=")
        if not equals:
            text = next(arguments, None)
            if text is None:
                _usage_error(f"{argument}: give a value, as {argument}=VALUE")
        params[name] = _literal(text)
    return rest, params


def _literal(text: str) -> Any:
    """0.5, 1e-5, [0.3, 0.7], {'text': 'a.txt'}, True/true, None/null, or else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False, "none": None, "null": None}.get(text.lower(), text)


def _with_params(fields: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    if not params:
        return fields
    merged = dict(fields.get("params") or {})
    for name, value in params.items():
        _set_path(merged, name.split("."), value)
    return fields | {"params": merged}


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    for key in path[:-1]:
        if not isinstance(tree.get(key), dict):
            tree[key] = {}
        tree = tree[key]
    tree[path[-1]] = value


def _check_config_file(argv: list[str]) -> None:
    for index, argument in enumerate(argv):
        path = argv[index + 1] if argument == "--config" and index + 1 < len(argv) else None
        path = argument.removeprefix("--config=") if argument.startswith("--config=") else path
        if path is not None and not Path(path).is_file():
            _usage_error(f"--config {path}: no such file")


def _unknown_field(err: Exception, argv: list[str]) -> str:
    """'--config.outptu=x: no config field 'outptu' (did you mean 'output'?)'."""
    overrides = [a for a in argv if a.startswith("--config.")]
    for argument in overrides:
        field = argument.removeprefix("--config.").partition("=")[0].split(".")[0]
        if field.split("[")[0] not in FIELDS:
            close = difflib.get_close_matches(field, FIELDS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the fields: {', '.join(FIELDS)}"
            return f"{argument}: no config field {field!r} ({hint})"
    unknown = str(err.args[0] if err.args else err).splitlines()[0].strip("'\\\"")
    argument = next((a for a in overrides if f".{unknown}" in a), "--config.FIELD")
    return f"{argument}: the config has no field {unknown!r} there"


def _first_line(err: Exception) -> str:
    cause = err.__cause__ or err
    return f"{type(cause).__name__}: {cause}".splitlines()[0]


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
