"""Validation: a config (an `ml_collections.ConfigDict` or any mapping) checked field by field
into a frozen `MergeConfig`, the method's parameters through the registry; every error names the
field (docs/design.md, "Data flow" and "Conventions").
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from jkarcher import methods
from jkarcher.config import fields, schema
from jkarcher.config.fields import ConfigError, check_known, optional_text
from jkarcher.config.params import resolved_params
from jkarcher.config.schema import (
    DistributedSettings,
    MergeConfig,
    ModelEntry,
    StatisticSettings,
)
from jkarcher.config.settings import falling_back, plain, read_setting
from jkarcher.config.slices import validated_slices
from jkarcher.config.statistics import validated_statistics
from jkarcher.config.tokens import checked_tokens
from jkarcher.errors import MergeError
from jkarcher.io import chat_template
from jkarcher.methods.registry import number


def validate(raw: Mapping[str, Any] | ml_collections.ConfigDict) -> MergeConfig:
    """Check every field of a config and return the `MergeConfig`; errors name the field."""
    raw = plain(raw)
    if not isinstance(raw, dict):
        raise ConfigError(f"a config is a mapping of fields, got {type(raw).__name__}")
    check_known(raw, schema.FIELDS, "")
    raw = schema.defaults() | raw
    spec = _method(raw.get("method"))
    check = functools.partial(_check_inputs, spec)
    slice_model = functools.partial(_model, spec=spec)
    slices = validated_slices(raw, spec, slice_model, check)
    models = () if slices else _models(raw.get("models"), spec)
    base_model = optional_text(raw["base_model"], "base_model")
    if not slices:
        check(models, base_model)
    raw_params = raw["params"]
    statistics = validated_statistics(spec, raw_params, models)
    return MergeConfig(
        method=spec.name,
        models=models,
        base_model=base_model,
        slices=slices,
        params={} if slices else resolved_params(spec, raw_params, models, base_model is not None),
        dtype=fields.output_dtype(raw["dtype"]),
        output=fields.output(raw.get("output")),
        out_shard_size=fields.parse_size(raw["out_shard_size"], "out_shard_size"),
        memory=None if raw["memory"] is None else fields.parse_size(raw["memory"], "memory"),
        seed=fields.seed(raw["seed"]),
        copy_tokenizer=fields.flag(raw["copy_tokenizer"], "copy_tokenizer"),
        chat_template=_chat_template(raw),
        tokenizer_source=_tokenizer_source(raw, statistics),
        tokens=checked_tokens(raw["tokens"]),
        pad_to_multiple_of=fields.optional_count(
            raw["pad_to_multiple_of"], "pad_to_multiple_of", 1
        ),
        overwrite=fields.flag(raw["overwrite"], "overwrite"),
        allow_crimes=fields.flag(raw["allow_crimes"], "allow_crimes"),
        mergekit_config=fields.optional_document(raw["mergekit_config"], "mergekit_config"),
        format=fields.output_format(raw["format"]),
        mesh=fields.mesh(raw["mesh"]),
        distributed=distributed_settings(raw),
        **statistics,
    )


def distributed_settings(raw: Mapping[str, Any] | ml_collections.ConfigDict) -> DistributedSettings:
    """The `distributed` field of a config, checked; errors name the field.

    It needs no other field and starts no JAX computation, so a script can join the other
    processes (`jkarcher.distributed.initialize`) before the rest of the config is validated.
    """
    value = plain(raw).get("distributed") or {}
    if not isinstance(value, dict):
        raise ConfigError(
            f"distributed: must be a mapping of {schema.DISTRIBUTED_FIELDS}, got {value!r}"
        )
    check_known(value, schema.DISTRIBUTED_FIELDS, "distributed")
    value = schema.defaults(DistributedSettings) | value
    enabled = fields.flag(value["enabled"], "distributed.enabled")
    address = optional_text(value["coordinator_address"], "distributed.coordinator_address")
    if address is not None and not re.fullmatch(r"\S+:\d+", address):
        raise ConfigError(f"distributed.coordinator_address: must be 'host:port', got {address!r}")
    count = fields.optional_count(value["num_processes"], "distributed.num_processes", 1)
    index = fields.optional_count(value["process_id"], "distributed.process_id", 0)
    if count is not None and index is not None and index >= count:
        raise ConfigError(
            f"distributed.process_id: must be below num_processes ({count}), got {index}"
        )
    settings = DistributedSettings(enabled, address, count, index)
    if not enabled and settings != DistributedSettings():
        field = next(f for f in schema.DISTRIBUTED_FIELDS[1:] if getattr(settings, f) is not None)
        raise ConfigError(
            f"distributed.{field}: set, but distributed.enabled is False; set "
            "distributed.enabled=True to run as one of several processes"
        )
    return settings


def _chat_template(raw: dict) -> str | None:
    """None, "auto", a named template or a template's Jinja text, which is told from a name
    by a "{" and its length (`jkarcher.io.chat_template`)."""
    setting = raw["chat_template"]
    if setting is None:
        return None
    named = setting == chat_template.AUTO or setting in chat_template.NAMED_TEMPLATES
    literal = (
        isinstance(setting, str)
        and "{" in setting
        and len(setting) >= chat_template.LITERAL_MIN_LENGTH
    )
    if not (named or literal):
        names = ", ".join(map(repr, chat_template.NAMED_TEMPLATES))
        raise ConfigError(
            f"chat_template: {setting!r} is none of 'auto', {names} or a Jinja template; give "
            "any other template's Jinja text literally"
        )
    if raw["copy_tokenizer"] is False:
        raise ConfigError(
            "chat_template: set, but copy_tokenizer is False; the template is written into the "
            "copied tokenizer_config.json"
        )
    return setting


def _tokenizer_source(raw: dict, statistics: Mapping[str, StatisticSettings | None]) -> str | None:
    """None, "base", "union" or a model's path (`jkarcher.pipeline.tokenizer`)."""
    source = optional_text(raw["tokenizer_source"], "tokenizer_source")
    if source is None:
        for field in ("tokens", "pad_to_multiple_of"):
            if raw[field]:
                raise ConfigError(f"{field}: needs tokenizer_source, which builds the vocabulary")
        return None
    refused = {
        "copy_tokenizer is False": raw["copy_tokenizer"] is False,
        **{
            f"params.{name} is given": settings is not None for name, settings in statistics.items()
        },
    }
    for reason, applies in refused.items():
        if applies:
            raise ConfigError(f"tokenizer_source: set, but {reason}; the two do not combine")
    return source


def _method(value: Any) -> methods.MergeMethod:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"method: must be a method name, got {value!r}")
    try:
        return methods.get(value)
    except methods.MethodError as err:
        raise ConfigError(f"method: {err}") from None


def _models(value: Any, spec: methods.MergeMethod) -> tuple[ModelEntry, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError("models: must be a non-empty list of {path, weight, params} entries")
    return tuple(_model(entry, f"models[{i}]", spec) for i, entry in enumerate(value))


def _model(entry: Any, field: str, spec: methods.MergeMethod) -> ModelEntry:
    if not isinstance(entry, dict):
        raise ConfigError(f"{field}: must be a mapping with a 'path', got {entry!r}")
    check_known(entry, schema.MODEL_FIELDS, field)
    path = optional_text(entry.get("path"), f"{field}.path")
    if path is None:
        raise ConfigError(f"{field}.path: required (a checkpoint directory or a hub id)")
    weight = _weight(entry.get("weight", schema.DEFAULT_WEIGHT), f"{field}.weight", spec)
    params = entry.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{field}.params: must be a mapping, got {params!r}")
    lora = optional_text(entry.get("lora"), f"{field}.lora")
    return ModelEntry(path, weight, params, lora)


def _weight(value: Any, field: str, spec: methods.MergeMethod) -> Any:
    """A model's weight: a number (>= 0 unless the method takes signed weights), or a setting
    that varies by tensor."""
    problem_of = functools.partial(_weight_problem, spec)
    if isinstance(value, list | dict):
        return falling_back(read_setting(value, field, problem_of), schema.DEFAULT_WEIGHT)
    problem = problem_of(value)
    if problem:
        raise ConfigError(f"{field}: {problem}")
    return float(value)


def _weight_problem(spec: methods.MergeMethod, value: Any) -> str | None:
    problem = number(value)
    if problem:
        return f"{problem}, got {value!r}"
    return spec.weight_sign_problem(value)


def _check_inputs(spec, models: tuple[ModelEntry, ...], base_model: str | None) -> None:
    """The models and base model of one merge (or slice), as the method takes them."""
    _check_model_count_and_base(spec, len(models), base_model)
    _check_weights(spec, models)


def _check_model_count_and_base(spec, n_models: int, base_model: str | None) -> None:
    problem = spec.inputs_problem(n_models, base_model is not None)
    if problem:
        raise ConfigError(": ".join(problem))


def _check_weights(spec, models: tuple[ModelEntry, ...]) -> None:
    """Weights that are the same for every tensor, as the method takes them (`tensor_values`
    checks the others, and the sums that the parameters divide by, tensor by tensor)."""
    if not all(isinstance(m.weight, float) for m in models):
        return
    try:
        spec.checked_weights([m.weight for m in models], len(models))
    except MergeError as err:
        raise ConfigError(f"models[*].weight: {err}") from None
