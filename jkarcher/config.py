"""The merge config: its schema, defaults and validation (DESIGN.md, "Config files").

A config file `configs/NAME.py` defines `get_config()` returning an `ml_collections.ConfigDict`;
starting from `base_config()` gives every field its default, so that any field can be overridden
on the command line (`--config.output=/tmp/x`). `validate` turns the ConfigDict (or any mapping)
into a frozen `MergeConfig`, checking each field and the method's parameters through the
registry; every error names the field.

Fields:
  method          name of a registered merge method (`jkarcher.methods.names()`).
  models          list of {path, weight (default 1), params (per-model method parameters)};
                  path is a local directory or a hub id found in the local HF cache.
  base_model      path or hub id of the base model, or None.
  params          the method's parameters (defaults from the registry); a list gives one value
                  per model, for the parameters that take one. For the methods that take each
                  model's diagonal Fisher (karcher, optionally; fisher_merging, necessarily),
                  `params.fisher` says where the Fishers are (`jkarcher.fisher` files):
                    "beside"            fisher.safetensors in each model's directory;
                    [PATH, ...]         one per model: a Fisher file, or a directory holding
                                        fisher.safetensors;
                    {"text": FILE, "estimator": "true", "seq_len": 256, "batch_size": 8,
                     "num_batches": None, "seed": 0}
                                        estimated on a text file where missing, and written
                                        as fisher.safetensors beside each model
                                        (`jkarcher.pipeline.prepare_fishers`; an estimate there
                                        made by other settings or text is made again).
  dtype           output dtype: "bfloat16", "float16" or "float32".
  output          output directory.
  out_shard_size  most bytes per output file, as text: "5GB", "500MB", "2GiB", "1000000".
  seed            seed of the `jax.random` key that random methods draw from.
  copy_tokenizer  copy the tokenizer files of the base (or first) model into the output.
  overwrite       replace an existing output directory, if it is an earlier jkarcher output
                  (or empty); any other directory is never replaced. On the command line, a
                  config file's overwrite=True covers only the output the file names.
  allow_crimes    merge models whose config.json disagree on the architecture (mergekit's
                  name): by default such models are refused, the differences listed.
  format          output format: "safetensors" (a Hugging Face checkpoint) or "orbax" (an Orbax
                  checkpoint in `params/` beside the same config, tokenizer and card files; see
                  `jkarcher.io.orbax_io`). Inputs of either format are recognized by their files.
  mesh            the device mesh the merge runs on, as axis names and sizes in text,
                  "data:2,model:4" (a config given as a plain dict may use a mapping,
                  {"data": 2, "model": 4}); one size may be -1 (the devices the other axes
                  leave). None: all devices on one axis. Every tensor is split by rows over all
                  the mesh's devices (`jkarcher.sharding`).
  distributed     several processes (hosts) running one merge with `jax.distributed`:
                    enabled              False: one process (the other fields stay unset);
                    coordinator_address  "host:port" of process 0's coordinator;
                    num_processes        how many processes take part;
                    process_id           this process's index, 0 .. num_processes - 1;
                  unset ones are found in the environment as `jax.distributed.initialize` does
                  (Slurm, Open MPI, Cloud TPU, JAX_COORDINATOR_ADDRESS).

Values that vary by tensor, as in mergekit, for any method parameter (in `params` or a model's
`params`) and for a model's `weight`:
  {"gradient": [v0, v1, ...]}   anchors spread evenly over the layers, from the first layer to the
                                last, linearly interpolated in between (a layer's position is
                                i / (L - 1) for layer i of L, 1 when L = 1; tensors outside the
                                layers, such as embeddings, final norm and lm_head, take position
                                0); anchors that are not numbers are picked, not interpolated.
  [{"filter": "self_attn", "value": V}, ..., {"value": V}]
                                the first rule whose filter text is part of the tensor's name
                                gives the value (V: one value or a gradient); a rule without a
                                filter (or with "*") matches every name.
A model's own value comes first, then the shared value in `params`, then the method's default:
filter rules that match none of a tensor's name fall back to the next of these.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import ml_dtypes
import numpy as np
from ml_collections import config_dict

from jkarcher import methods
from jkarcher.errors import JkarcherError, MergeError
from jkarcher.fisher import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN, ESTIMATORS
from jkarcher.methods.registry import BASE_NONE, BASE_REQUIRED, REQUIRED
from jkarcher.numerics import check_weights

OUTPUT_DTYPES: dict[str, np.dtype] = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
}
DEFAULT_SHARD_SIZE = "5GB"
DEFAULT_WEIGHT = 1.0
FIELDS = (
    "method",
    "models",
    "base_model",
    "params",
    "dtype",
    "output",
    "out_shard_size",
    "seed",
    "copy_tokenizer",
    "overwrite",
    "allow_crimes",
    "format",
    "mesh",
    "distributed",
)
MODEL_FIELDS = ("path", "weight", "params")
OUTPUT_FORMATS = ("safetensors", "orbax")
DISTRIBUTED_FIELDS = ("enabled", "coordinator_address", "num_processes", "process_id")
FISHER_INPUT = "fisher"  # the tensor input `params.fisher` feeds
FISHER_BESIDE = "beside"
FISHER_ESTIMATE_FIELDS = ("text", "estimator", "seq_len", "batch_size", "num_batches", "seed")
_SIZE_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


class ConfigError(JkarcherError):
    """A config field is missing, unknown or has a bad value; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Gradient:
    """Values over the layers: `anchors` spread evenly from position 0 (the first layer) to
    position 1 (the last), linearly interpolated in between (mergekit's list of values).

    Where an anchor is not a number (true/false, text), the anchor at or below the position is
    picked instead. Interpolating between whole-number anchors gives an int where the result is
    whole, so integer parameters can vary too.
    """

    anchors: tuple[Any, ...]

    def at(self, position: float) -> Any:
        last = len(self.anchors) - 1
        spot = position * last
        below = int(spot)
        if not all(_is_number(a) for a in self.anchors):
            return self.anchors[below]
        above = min(below + 1, last)
        fraction = spot - below
        value = (1 - fraction) * self.anchors[below] + fraction * self.anchors[above]
        whole = all(isinstance(a, int) for a in self.anchors) and float(value).is_integer()
        return int(value) if whole else value

    def plain(self) -> dict[str, list]:
        return {"gradient": list(self.anchors)}


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule of a `Filtered` setting: `value` (one value or a `Gradient`) applies to the
    tensors whose name contains `filter`, or to every tensor when `filter` is None."""

    filter: str | None
    value: Any

    def matches(self, name: str) -> bool:
        return self.filter is None or self.filter in name


@dataclasses.dataclass(frozen=True)
class Filtered:
    """Values chosen by tensor name: the first rule that matches the name gives the value.

    Validation ends the rules with one that matches every name and gives the value that applies
    otherwise (the shared value, then the method's default), unless the parameter has no default.
    """

    rules: tuple[Rule, ...]

    def matching(self, name: str) -> Rule | None:
        return next((rule for rule in self.rules if rule.matches(name)), None)

    def plain(self) -> list[dict[str, Any]]:
        return [
            {"value": _plain(r.value)} | ({} if r.filter is None else {"filter": r.filter})
            for r in self.rules
        ]


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One model to merge: where it is, its weight, and its own method parameters.

    `weight` is a number, or a `Gradient` or `Filtered` setting when it varies by tensor.
    """

    path: str
    weight: Any = DEFAULT_WEIGHT
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class FisherEstimate:
    """How the Fishers that are missing beside the models are estimated (`params.fisher` given
    as a mapping; `jkarcher.fisher.checkpoint_fisher` takes these settings)."""

    text: str
    estimator: str = "true"
    seq_len: int = DEFAULT_SEQ_LEN
    batch_size: int = DEFAULT_BATCH_SIZE
    num_batches: int | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class FisherSettings:
    """Where each model's diagonal Fisher comes from (`params.fisher`): the files in `files`,
    one per model (a file, or a directory holding fisher.safetensors), or else
    fisher.safetensors beside each model, estimated first where `estimate` is given."""

    files: tuple[str, ...] | None = None
    estimate: FisherEstimate | None = None

    def plain(self) -> Any:
        if self.files is not None:
            return list(self.files)
        if self.estimate is not None:
            return dataclasses.asdict(self.estimate)
        return FISHER_BESIDE


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """How this process joins a merge run by several (`jkarcher.distributed.initialize`)."""

    enabled: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """A validated merge config; `params` are resolved (defaults filled, per-model tuples), and
    values that vary by tensor are `Gradient` or `Filtered` settings, which `tensor_values`
    resolves for each tensor."""

    method: str
    models: tuple[ModelEntry, ...]
    base_model: str | None
    params: Mapping[str, Any]
    dtype: str
    output: Path
    out_shard_size: int
    seed: int
    copy_tokenizer: bool
    overwrite: bool
    allow_crimes: bool = False
    format: str = "safetensors"
    mesh: tuple[tuple[str, int], ...] | None = None
    distributed: DistributedSettings = DistributedSettings()
    fisher: FisherSettings | None = None

    @property
    def weights(self) -> tuple[Any, ...]:
        """The models' weights: numbers, or settings where a weight varies by tensor."""
        return tuple(m.weight for m in self.models)

    @property
    def out_dtype(self) -> np.dtype:
        return OUTPUT_DTYPES[self.dtype]

    @property
    def varies_by_layer(self) -> bool:
        """Whether a weight or a parameter is a gradient over the layers."""
        return any(_has_gradient(s) for s in (*self.weights, *self.params.values()))

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (lists, dicts, strings, numbers)."""
        return {
            "method": self.method,
            "models": [
                {"path": m.path, "weight": _plain(m.weight), "params": _plain(m.params)}
                for m in self.models
            ],
            "base_model": self.base_model,
            "params": _plain(self.params)
            | ({FISHER_INPUT: self.fisher.plain()} if self.fisher else {}),
            "dtype": self.dtype,
            "output": str(self.output),
            "out_shard_size": self.out_shard_size,
            "seed": self.seed,
            "copy_tokenizer": self.copy_tokenizer,
            "overwrite": self.overwrite,
            "allow_crimes": self.allow_crimes,
            "format": self.format,
            "mesh": None if self.mesh is None else dict(self.mesh),
            "distributed": dataclasses.asdict(self.distributed),
        }


def base_config() -> ml_collections.ConfigDict:
    """A ConfigDict with every field at its default; config files fill in the rest."""
    config = ml_collections.ConfigDict()
    config.method = "karcher"
    config.models = []
    config.base_model = config_dict.placeholder(str)
    config.params = ml_collections.ConfigDict()
    config.dtype = "bfloat16"
    config.output = config_dict.placeholder(str)
    config.out_shard_size = DEFAULT_SHARD_SIZE
    config.seed = 0
    config.copy_tokenizer = True
    config.overwrite = False
    config.allow_crimes = False
    config.format = "safetensors"
    config.mesh = config_dict.placeholder(str)
    config.distributed = ml_collections.ConfigDict()
    config.distributed.enabled = False
    config.distributed.coordinator_address = config_dict.placeholder(str)
    config.distributed.num_processes = config_dict.placeholder(int)
    config.distributed.process_id = config_dict.placeholder(int)
    return config


def validate(raw: Mapping[str, Any] | ml_collections.ConfigDict) -> MergeConfig:
    """Check every field of a config and return the `MergeConfig`; errors name the field."""
    raw = _plain(raw.to_dict() if isinstance(raw, ml_collections.ConfigDict) else raw)
    if not isinstance(raw, dict):
        raise ConfigError(f"a config is a mapping of fields, got {type(raw).__name__}")
    _check_known(raw, FIELDS, "")
    spec = _method(raw.get("method"))
    models = _models(raw.get("models"))
    base_model = _optional_text(raw.get("base_model"), "base_model")
    _check_model_count_and_base(spec, len(models), base_model)
    _check_weights(models)
    raw_params = raw.get("params")
    fisher = _fisher(
        spec, raw_params.pop(FISHER_INPUT, None) if isinstance(raw_params, dict) else None, models
    )
    params = _resolved_params(spec, raw_params, models, base_model is not None)
    return MergeConfig(
        method=spec.name,
        models=models,
        base_model=base_model,
        params=params,
        dtype=_dtype(raw.get("dtype", "bfloat16")),
        output=_output(raw.get("output")),
        out_shard_size=parse_size(raw.get("out_shard_size", DEFAULT_SHARD_SIZE), "out_shard_size"),
        seed=_seed(raw.get("seed", 0)),
        copy_tokenizer=_flag(raw.get("copy_tokenizer", True), "copy_tokenizer"),
        overwrite=_flag(raw.get("overwrite", False), "overwrite"),
        allow_crimes=_flag(raw.get("allow_crimes", False), "allow_crimes"),
        format=_format(raw.get("format", "safetensors")),
        mesh=_mesh(raw.get("mesh")),
        distributed=distributed_settings(raw),
        fisher=fisher,
    )


def distributed_settings(raw: Mapping[str, Any] | ml_collections.ConfigDict) -> DistributedSettings:
    """The `distributed` field of a config, checked; errors name the field.

    It needs no other field and starts no JAX computation, so a script can join the other
    processes (`jkarcher.distributed.initialize`) before the rest of the config is validated.
    """
    raw = _plain(raw.to_dict() if isinstance(raw, ml_collections.ConfigDict) else raw)
    value = raw.get("distributed") or {}
    if not isinstance(value, dict):
        raise ConfigError(f"distributed: must be a mapping of {DISTRIBUTED_FIELDS}, got {value!r}")
    _check_known(value, DISTRIBUTED_FIELDS, "distributed")
    enabled = _flag(value.get("enabled", False), "distributed.enabled")
    address = _optional_text(value.get("coordinator_address"), "distributed.coordinator_address")
    if address is not None and not re.fullmatch(r"\S+:\d+", address):
        raise ConfigError(f"distributed.coordinator_address: must be 'host:port', got {address!r}")
    count = _optional_count(value.get("num_processes"), "distributed.num_processes", 1)
    index = _optional_count(value.get("process_id"), "distributed.process_id", 0)
    if count is not None and index is not None and index >= count:
        raise ConfigError(
            f"distributed.process_id: must be below num_processes ({count}), got {index}"
        )
    settings = DistributedSettings(enabled, address, count, index)
    if not enabled and settings != DistributedSettings():
        field = next(f for f in DISTRIBUTED_FIELDS[1:] if getattr(settings, f) is not None)
        raise ConfigError(
            f"distributed.{field}: set, but distributed.enabled is False; set "
            "distributed.enabled=True to run as one of several processes"
        )
    return settings


def tensor_values(
    config: MergeConfig, name: str, position: float
) -> tuple[tuple[float, ...], dict[str, Any]]:
    """The models' weights and the method's resolved parameters for the tensor called `name`.

    `position` places the tensor along the layers for gradients: i / (L - 1) for layer i of L
    (1 when L = 1), 0 outside the layers. Every value is checked as `validate` checks it; an error
    names the tensor.
    """
    weights = tuple(float(setting_at(w, name, position)) for w in config.weights)
    try:
        check_weights(weights, len(weights))
    except MergeError as err:
        raise ConfigError(f"models[*].weight, tensor {name!r}: {err}") from None
    values = {key: setting_at(v, name, position) for key, v in config.params.items()}
    try:
        params = methods.get(config.method).resolve(
            values, len(config.models), config.base_model is not None
        )
    except methods.MethodError as err:
        raise ConfigError(f"params, tensor {name!r}: {err}") from None
    return weights, params


def layer_position(name: str, num_layers: int | None) -> float:
    """Where a tensor lies along the layers, as mergekit places it for values that vary by layer:
    i / (L - 1) in layer i of L (1 when L = 1), and 0 outside the layers (embeddings, the final
    norm, lm_head). The layer is the first number among the dotted parts of the name
    (`model.layers.3.mlp.up_proj.weight` is in layer 3).
    """
    index = next((int(part) for part in name.split(".") if part.isdigit()), None)
    if index is None:
        return 0.0
    if num_layers is None:
        raise ConfigError(
            f"tensor {name!r}: values that vary over the layers need the layer count "
            "(num_hidden_layers in the config.json of the base, or first, model)"
        )
    if not 0 <= index < num_layers:
        raise ConfigError(
            f"tensor {name!r} is in layer {index}, but the model has {num_layers} layers "
            "(num_hidden_layers); values that vary over the layers cannot place it"
        )
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def setting_at(setting: Any, name: str, position: float) -> Any:
    """The value a setting takes for the tensor `name` at `position` along the layers; a tuple
    of per-model settings gives a tuple. Filter rules that match nothing give `REQUIRED`."""
    if isinstance(setting, tuple):
        return tuple(setting_at(s, name, position) for s in setting)
    if isinstance(setting, Filtered):
        rule = setting.matching(name)
        return REQUIRED if rule is None else setting_at(rule.value, name, position)
    if isinstance(setting, Gradient):
        return setting.at(position)
    return setting


def parse_size(value: Any, field: str) -> int:
    """A byte count from an int or text like "5GB" (10^9), "500MB", "2GiB" (2^31), "1.5G"."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", value, re.IGNORECASE)
        if not match:
            raise ConfigError(f"{field}: cannot read {value!r} as a size (e.g. 5GB, 500MB, 2GiB)")
        size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()])
    else:
        raise ConfigError(f"{field}: must be a byte count or text like '5GB', got {value!r}")
    if size <= 0:
        raise ConfigError(f"{field}: must be positive, got {value!r}")
    return size


def _method(value: Any) -> methods.MergeMethod:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"method: must be a method name, got {value!r}")
    try:
        return methods.get(value)
    except methods.MethodError as err:
        raise ConfigError(f"method: {err}") from None


def _models(value: Any) -> tuple[ModelEntry, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError("models: must be a non-empty list of {path, weight, params} entries")
    return tuple(_model(entry, f"models[{i}]") for i, entry in enumerate(value))


def _model(entry: Any, field: str) -> ModelEntry:
    if not isinstance(entry, dict):
        raise ConfigError(f"{field}: must be a mapping with a 'path', got {entry!r}")
    _check_known(entry, MODEL_FIELDS, field)
    path = _optional_text(entry.get("path"), f"{field}.path")
    if path is None:
        raise ConfigError(f"{field}.path: required (a checkpoint directory or a hub id)")
    weight = _weight(entry.get("weight", DEFAULT_WEIGHT), f"{field}.weight")
    params = entry.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{field}.params: must be a mapping, got {params!r}")
    return ModelEntry(path, weight, params)


def _weight(value: Any, field: str) -> Any:
    """A model's weight: a number >= 0, or a setting that varies by tensor."""
    if isinstance(value, list | dict):
        return _falling_back(_setting(value, field, _weight_problem), DEFAULT_WEIGHT)
    problem = _weight_problem(value)
    if problem:
        raise ConfigError(f"{field}: {problem}")
    return float(value)


def _weight_problem(value: Any) -> str | None:
    if not _is_number(value) or not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    return f"must be >= 0, got {value!r}" if value < 0 else None


def _check_model_count_and_base(spec, n_models: int, base_model: str | None) -> None:
    if spec.base == BASE_REQUIRED and base_model is None:
        raise ConfigError(f"base_model: method {spec.name!r} needs a base model")
    if spec.base == BASE_NONE and base_model is not None:
        raise ConfigError(f"base_model: method {spec.name!r} takes no base model")
    if n_models < spec.min_models:
        raise ConfigError(
            f"models: method {spec.name!r} merges at least {spec.min_models} models, got {n_models}"
        )
    if spec.max_models is not None and n_models > spec.max_models:
        raise ConfigError(
            f"models: method {spec.name!r} merges at most {spec.max_models} models, got {n_models}"
        )


def _check_weights(models: tuple[ModelEntry, ...]) -> None:
    """Weights that are the same for every tensor must not sum to zero (`tensor_values` checks
    the others tensor by tensor)."""
    if not all(isinstance(m.weight, float) for m in models):
        return
    try:
        check_weights([m.weight for m in models], len(models))
    except MergeError as err:
        raise ConfigError(f"models[*].weight: {err}") from None


def _resolved_params(spec, value: Any, models: tuple[ModelEntry, ...], has_base: bool) -> dict:
    """Method parameters with defaults filled in; per-model values become tuples of N values.

    `models[i].params` sets a per-model parameter for model i, over the value in `params`.
    Settings that vary by tensor stay settings, their filter rules falling back to the shared
    value and then to the default. The structure is checked here with each setting's first
    value; `tensor_values` checks the values of every tensor.
    """
    params = {} if value is None else value
    if not isinstance(params, dict):
        raise ConfigError(f"params: must be a mapping of method parameters, got {value!r}")
    n_models = len(models)
    settings = {name: _shared_setting(spec, name, raw, n_models) for name, raw in params.items()}
    for name in sorted({name for m in models for name in m.params}):
        declared = _declared(spec, name, f"models[*].params.{name}")
        if not declared.per_model:
            raise ConfigError(
                f"models[*].params.{name}: method {spec.name!r} takes one value of {name!r} for "
                "all models; set it under params"
            )
        shared = settings.get(name, declared.default)
        shared = shared if isinstance(shared, tuple) else (shared,) * n_models
        check = _param_check(spec, declared)
        values = tuple(
            _falling_back(_setting(m.params[name], f"models[{i}].params.{name}", check), v)
            if name in m.params
            else v
            for i, (m, v) in enumerate(zip(models, shared, strict=True))
        )
        if REQUIRED in values:
            raise ConfigError(
                f"models[{values.index(REQUIRED)}].params.{name}: required, since other models "
                "set it and there is no shared value in params"
            )
        settings[name] = values
    try:
        resolved = spec.resolve(
            {name: _first_value(s) for name, s in settings.items()}, n_models, has_base
        )
    except methods.MethodError as err:
        raise ConfigError(f"params: {err}") from None
    return resolved | settings


def _fisher(spec, value: Any, models: tuple[ModelEntry, ...]) -> FisherSettings | None:
    """`params.fisher`, checked against the method: only methods with a Fisher tensor input take
    it, and those that need one must have it."""
    takes = FISHER_INPUT in spec.tensor_inputs
    forms = (
        f"{FISHER_BESIDE!r} (fisher.safetensors in each model's directory), a list of one Fisher "
        "file or directory per model, or {'text': FILE} to estimate them on a text"
    )
    if value is None:
        if takes and spec.tensor_inputs_required:
            raise ConfigError(
                f"params.fisher: method {spec.name!r} needs each model's diagonal Fisher: give "
                f"{forms} (scripts/fisher.py estimates one)"
            )
        return None
    if not takes:
        users = [m for m in methods.names() if FISHER_INPUT in methods.get(m).tensor_inputs]
        raise ConfigError(
            f"params.fisher: method {spec.name!r} takes no Fisher; the methods that do are "
            f"{', '.join(users)}"
        )
    if value == FISHER_BESIDE:
        return FisherSettings()
    if isinstance(value, list):
        if len(value) != len(models):
            raise ConfigError(f"params.fisher: {len(value)} Fisher files for {len(models)} models")
        return FisherSettings(
            files=tuple(_path(v, f"params.fisher[{i}]") for i, v in enumerate(value))
        )
    if isinstance(value, dict):
        return FisherSettings(estimate=_fisher_estimate(value))
    raise ConfigError(f"params.fisher: must be {forms}; got {value!r}")


def _fisher_estimate(value: dict) -> FisherEstimate:
    _check_known(value, FISHER_ESTIMATE_FIELDS, "params.fisher")
    text = _optional_text(value.get("text"), "params.fisher.text")
    if text is None:
        raise ConfigError("params.fisher.text: required (the text file to estimate Fishers on)")
    estimator = value.get("estimator", "true")
    if estimator not in ESTIMATORS:
        raise ConfigError(
            f"params.fisher.estimator: must be one of {', '.join(ESTIMATORS)}, got {estimator!r}"
        )
    return FisherEstimate(
        text=text,
        estimator=estimator,
        seq_len=_count(value.get("seq_len", DEFAULT_SEQ_LEN), "params.fisher.seq_len", 2),
        batch_size=_count(
            value.get("batch_size", DEFAULT_BATCH_SIZE), "params.fisher.batch_size", 1
        ),
        num_batches=_optional_count(value.get("num_batches"), "params.fisher.num_batches", 1),
        seed=_count(value.get("seed", 0), "params.fisher.seed", 0),
    )


def _declared(spec, name: str, field: str):
    try:
        return spec.param(name)
    except methods.MethodError as err:
        raise ConfigError(f"{field}: {err}") from None


def _shared_setting(spec, name: str, raw: Any, n_models: int) -> Any:
    """A parameter's value in `params`: one setting, or (a list) one setting per model."""
    declared = _declared(spec, name, "params")
    field = f"params.{name}"
    check = _param_check(spec, declared)
    if not isinstance(raw, list) or _is_rule_list(raw):
        return _falling_back(_setting(raw, field, check), declared.default)
    layers_hint = "(values that vary over the layers are written {'gradient': [...]})"
    if not declared.per_model:
        raise ConfigError(
            f"{field}: method {spec.name!r} takes one value of {name!r} for all models, not a "
            f"list {raw!r} {layers_hint}"
        )
    if len(raw) != n_models:
        raise ConfigError(f"{field}: {len(raw)} values for {n_models} models {layers_hint}")
    return tuple(
        _falling_back(_setting(v, f"{field}[{i}]", check), declared.default)
        for i, v in enumerate(raw)
    )


def _param_check(spec, declared) -> Callable[[Any], str | None]:
    """The error text for a bad value of a declared parameter, or None."""

    def problem(value: Any) -> str | None:
        text = declared.check(value) if declared.check is not None else None
        if text is None:
            return None
        return f"method {spec.name!r}, parameter {declared.name!r}={value!r}: {text}"

    return problem


def _setting(value: Any, field: str, problem: Callable[[Any], str | None]) -> Any:
    """A value as a config gives it: one value, {"gradient": [...]} or a list of filter rules.

    The values inside gradients and rules must pass `problem` (an error text, or None); a single
    value is checked where it is used.
    """
    if isinstance(value, list):
        if not _is_rule_list(value):
            raise ConfigError(
                f"{field}: a list here is filter rules [{{'filter': TEXT, 'value': V}}, ..., "
                f"{{'value': V}}], got {value!r}; values over the layers are written "
                "{'gradient': [...]}"
            )
        return Filtered(tuple(_rule(r, f"{field}[{i}]", problem) for i, r in enumerate(value)))
    if isinstance(value, dict):
        return _gradient(value, field, problem)
    return value


def _is_rule_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(e, dict) and "gradient" not in e for e in value)
    )


def _rule(entry: dict, field: str, problem: Callable[[Any], str | None]) -> Rule:
    _check_known(entry, ("filter", "value"), field)
    if "value" not in entry:
        raise ConfigError(f"{field}.value: required")
    text = entry.get("filter")
    if text is not None and (not isinstance(text, str) or not text):
        raise ConfigError(
            f"{field}.filter: must be text (part of a tensor name) or '*', got {text!r}"
        )
    value = entry["value"]
    if isinstance(value, dict):
        value = _gradient(value, f"{field}.value", problem)
    else:
        value = _checked(value, f"{field}.value", problem)
    return Rule(None if text in (None, "*") else text, value)


def _gradient(value: dict, field: str, problem: Callable[[Any], str | None]) -> Gradient:
    if set(value) != {"gradient"}:
        raise ConfigError(f"{field}: a mapping here is {{'gradient': [values]}}, got {value!r}")
    anchors = value["gradient"]
    if not isinstance(anchors, list) or not anchors:
        raise ConfigError(f"{field}.gradient: must be a non-empty list of values, got {anchors!r}")
    return Gradient(
        tuple(_checked(a, f"{field}.gradient[{i}]", problem) for i, a in enumerate(anchors))
    )


def _checked(value: Any, field: str, problem: Callable[[Any], str | None]) -> Any:
    if isinstance(value, list | dict):
        raise ConfigError(f"{field}: must be one value, got {value!r}")
    text = problem(value)
    if text:
        raise ConfigError(f"{field}: {text}")
    return value


def _falling_back(setting: Any, fallback: Any) -> Any:
    """Filter rules followed by what applies to the names that none of them matches: the rules
    of `fallback`, or `fallback` itself for every name (nothing when `fallback` is REQUIRED)."""
    if not isinstance(setting, Filtered) or fallback is REQUIRED:
        return setting
    if any(rule.filter is None for rule in setting.rules):
        return setting
    rest = fallback.rules if isinstance(fallback, Filtered) else (Rule(None, fallback),)
    return Filtered(setting.rules + rest)


def _first_value(setting: Any) -> Any:
    """One value that a setting takes (a config's structure is checked with these)."""
    if isinstance(setting, tuple):
        return tuple(_first_value(s) for s in setting)
    if isinstance(setting, Filtered):
        return _first_value(setting.rules[0].value)
    if isinstance(setting, Gradient):
        return setting.anchors[0]
    return setting


def _has_gradient(setting: Any) -> bool:
    if isinstance(setting, tuple):
        return any(_has_gradient(s) for s in setting)
    if isinstance(setting, Filtered):
        return any(isinstance(rule.value, Gradient) for rule in setting.rules)
    return isinstance(setting, Gradient)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_known(value: Mapping[str, Any], fields: Sequence[str], field: str) -> None:
    """Raise ConfigError naming the first key of `value` that is not one of `fields`."""
    unknown = sorted(set(value) - set(fields))
    if unknown:
        where = f"{field}: " if field else ""
        raise ConfigError(
            f"{where}unknown field {unknown[0]!r} (the fields are: {', '.join(fields)})"
        )


def _optional_text(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{field}: must be a path or hub id, got {value!r}")
    return value


def _path(value: Any, field: str) -> str:
    text = _optional_text(value, field)
    if text is None:
        raise ConfigError(f"{field}: must be a path, got None")
    return text


def _format(value: Any) -> str:
    if value not in OUTPUT_FORMATS:
        raise ConfigError(f"format: must be one of {', '.join(OUTPUT_FORMATS)}, got {value!r}")
    return value


def _mesh(value: Any) -> tuple[tuple[str, int], ...] | None:
    """(axis name, size) pairs from a mapping or text "data:2,model:4"; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        pairs = [part.partition(":") for part in value.split(",")]
        if not all(sep and name.strip() for name, sep, _ in pairs):
            raise ConfigError(f"mesh: cannot read {value!r}; write axes as 'data:2,model:4'")
        value = {name.strip(): _mesh_size(size.strip(), name.strip()) for name, _, size in pairs}
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"mesh: must map axis names to sizes, e.g. {{'data': 8}}, got {value!r}")
    axes = []
    for name, size in value.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"mesh: axis name {name!r} is not a Python identifier")
        if isinstance(size, bool) or not isinstance(size, int) or not (size >= 1 or size == -1):
            raise ConfigError(f"mesh.{name}: must be a size >= 1, or -1, got {size!r}")
        axes.append((name, size))
    if sum(size == -1 for _, size in axes) > 1:
        raise ConfigError("mesh: at most one axis may have size -1")
    return tuple(axes)


def _mesh_size(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"mesh.{name}: must be a size >= 1, or -1, got {text!r}") from None


def _optional_count(value: Any, field: str, least: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{field}: must be an integer >= {least}, got {value!r}")
    return value


def _count(value: Any, field: str, least: int) -> int:
    if value is None:
        raise ConfigError(f"{field}: must be an integer >= {least}, got None")
    return _optional_count(value, field, least)


def _dtype(value: Any) -> str:
    if value not in OUTPUT_DTYPES:
        raise ConfigError(f"dtype: must be one of {', '.join(OUTPUT_DTYPES)}, got {value!r}")
    return value


def _output(value: Any) -> Path:
    text = _optional_text(value, "output")
    if text is None:
        raise ConfigError("output: required (the directory to write the merged model to)")
    return Path(text).expanduser()


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"seed: must be an integer >= 0, got {value!r}")
    return value


def _flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{field}: must be True or False, got {value!r}")
    return value


def _plain(value: Any) -> Any:
    """Mappings as dicts and sequences as lists, all the way down (ConfigDicts and settings
    that vary by tensor included)."""
    if isinstance(value, Gradient | Filtered):
        return value.plain()
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
