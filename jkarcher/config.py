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
  params          the method's parameters (defaults from the registry).
  dtype           output dtype: "bfloat16", "float16" or "float32".
  output          output directory.
  out_shard_size  most bytes per output file, as text: "5GB", "500MB", "2GiB", "1000000".
  seed            seed of the `jax.random` key that random methods draw from.
  copy_tokenizer  copy the tokenizer files of the base (or first) model into the output.
  overwrite       replace an existing output directory.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
import ml_dtypes
import numpy as np
from ml_collections import config_dict

from jkarcher import methods
from jkarcher.merge import MergeError, check_weights
from jkarcher.methods.registry import BASE_NONE, BASE_REQUIRED, REQUIRED

OUTPUT_DTYPES: dict[str, np.dtype] = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
}
DEFAULT_SHARD_SIZE = "5GB"
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
)
MODEL_FIELDS = ("path", "weight", "params")
_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


class ConfigError(ValueError):
    """A config field is missing, unknown or has a bad value; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One model to merge: where it is, its weight, and its own method parameters."""

    path: str
    weight: float = 1.0
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """A validated merge config; `params` are resolved (defaults filled, per-model tuples)."""

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

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(m.weight for m in self.models)

    @property
    def out_dtype(self) -> np.dtype:
        return OUTPUT_DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (lists, dicts, strings, numbers)."""
        return {
            "method": self.method,
            "models": [
                {"path": m.path, "weight": m.weight, "params": _plain(m.params)}
                for m in self.models
            ],
            "base_model": self.base_model,
            "params": _plain(self.params),
            "dtype": self.dtype,
            "output": str(self.output),
            "out_shard_size": self.out_shard_size,
            "seed": self.seed,
            "copy_tokenizer": self.copy_tokenizer,
            "overwrite": self.overwrite,
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
    return config


def validate(raw: Mapping[str, Any] | ml_collections.ConfigDict) -> MergeConfig:
    """Check every field of a config and return the `MergeConfig`; errors name the field."""
    raw = _plain(raw.to_dict() if isinstance(raw, ml_collections.ConfigDict) else raw)
    if not isinstance(raw, dict):
        raise ConfigError(f"a config is a mapping of fields, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown field {unknown[0]!r} (the fields are: {', '.join(FIELDS)})")
    spec = _method(raw.get("method"))
    models = _models(raw.get("models"))
    base_model = _optional_text(raw.get("base_model"), "base_model")
    _check_model_count_and_base(spec, len(models), base_model)
    _check_weights(models)
    params = _resolved_params(spec, raw.get("params"), models, base_model is not None)
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
    )


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
    unknown = sorted(set(entry) - set(MODEL_FIELDS))
    if unknown:
        raise ConfigError(
            f"{field}: unknown field {unknown[0]!r} (a model has: {', '.join(MODEL_FIELDS)})"
        )
    path = _optional_text(entry.get("path"), f"{field}.path")
    if path is None:
        raise ConfigError(f"{field}.path: required (a checkpoint directory or a hub id)")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        raise ConfigError(f"{field}.weight: must be a finite number, got {weight!r}")
    if weight < 0:
        raise ConfigError(f"{field}.weight: must be >= 0, got {weight!r}")
    params = entry.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{field}.params: must be a mapping, got {params!r}")
    return ModelEntry(path, float(weight), params)


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
    try:
        check_weights([m.weight for m in models], len(models))
    except MergeError as err:
        raise ConfigError(f"models[*].weight: {err}") from None


def _resolved_params(spec, value: Any, models: tuple[ModelEntry, ...], has_base: bool) -> dict:
    """Method parameters with defaults filled in; per-model values become tuples of N values.

    `models[i].params` sets a per-model parameter for model i, over the value in `params`.
    """
    params = {} if value is None else value
    if not isinstance(params, dict):
        raise ConfigError(f"params: must be a mapping of method parameters, got {value!r}")
    params = dict(params)
    for name in sorted({name for m in models for name in m.params}):
        field = f"models[*].params.{name}"
        try:
            declared = spec.param(name)
        except methods.MethodError as err:
            raise ConfigError(f"{field}: {err}") from None
        if not declared.per_model:
            raise ConfigError(
                f"{field}: method {spec.name!r} takes one value of {name!r} for all models; "
                "set it under params"
            )
        shared = params.get(name, declared.default)
        values = list(shared) if isinstance(shared, list | tuple) else [shared] * len(models)
        if len(values) != len(models):
            raise ConfigError(f"params.{name}: {len(values)} values for {len(models)} models")
        values = [m.params.get(name, v) for m, v in zip(models, values, strict=True)]
        if REQUIRED in values:
            raise ConfigError(
                f"models[{values.index(REQUIRED)}].params.{name}: required, since other models "
                "set it and there is no shared value in params"
            )
        params[name] = values
    try:
        return spec.resolve(params, len(models), has_base)
    except methods.MethodError as err:
        raise ConfigError(f"params: {err}") from None


def _optional_text(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{field}: must be a path or hub id, got {value!r}")
    return value


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
    """Mappings as dicts and sequences as lists, all the way down (ConfigDicts included)."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
