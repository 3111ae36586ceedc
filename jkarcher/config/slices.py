"""The `slices` field of a config: frankenmerges and merges by slice, as mergekit's slices.

    slices = [
        {"models": [{"path": A, "layer_range": [0, 24]}]},
        {"models": [{"path": B, "layer_range": [8, 32]}]},
    ]

stacks layers 0..23 of A and then 8..31 of B into a model of 48 layers. Each slice is a small
merge of its own: its models (each {path, layer_range, weight, params, lora}, every range of
the same length), its base model ({path, layer_range}) and its params, over the shared
`params`. A slice of N layers merges, for k = 0 .. N - 1, layer start + k of each model into
output layer (the layers of the slices before it) + k; values that vary over the layers are
placed by the layer's position in its slice, k / (N - 1) (1 when N = 1), as mergekit places
them.

`validated_slices` checks the field (ranges [start, end) with 0 <= start < end, the same length
across a slice, each slice's models and base as the method takes them); whether a range lies
within its model's layers needs the model's config.json, which the plan reads
(`jkarcher.pipeline.inputs`). Every error names the field (`slices[1].models[0].layer_range`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jkarcher import methods
from jkarcher.config import schema
from jkarcher.config.fields import ConfigError, check_known, optional_text
from jkarcher.config.params import resolved_params
from jkarcher.config.schema import ModelEntry, Slice, SliceBase, SliceModel
from jkarcher.config.settings import is_rule_list

# model(entry, field): one model entry checked as `models[i]` are; check(models, base_model):
# the models and base of one merge checked as the method takes them.
ModelCheck = Callable[[Any, str], ModelEntry]
InputsCheck = Callable[[tuple[ModelEntry, ...], str | None], None]


def validated_slices(
    raw: dict[str, Any], spec: methods.MergeMethod, model: ModelCheck, check: InputsCheck
) -> tuple[Slice, ...]:
    """The `slices` of a config (its defaults filled in), checked; () when it gives none.

    With slices, `models` must be empty and `base_model` unset, and `params` (the shared values)
    are resolved into each slice's params.
    """
    value = raw["slices"]
    if value is None or (isinstance(value, list | tuple) and not value):
        return ()
    if not isinstance(value, list | tuple):
        raise ConfigError(
            f"slices: must be a list of {{models, base_model, params}}, got {value!r}"
        )
    if raw.get("models"):
        raise ConfigError("models, slices: give one of them; with slices, each slice has models")
    if raw["base_model"] is not None:
        raise ConfigError(
            "base_model: with slices, each slice gives its own base_model {path, layer_range}"
        )
    shared = raw["params"]
    if not isinstance(shared, dict):
        raise ConfigError(f"params: must be a mapping of method parameters, got {shared!r}")
    for statistic in (schema.FISHER_INPUT, schema.GRAM_INPUT):
        if statistic in shared:
            raise ConfigError(
                f"params.{statistic}: per-model statistics are not taken with slices; merge "
                "whole models"
            )
    return tuple(
        _slice(entry, f"slices[{i}]", spec, shared, model, check) for i, entry in enumerate(value)
    )


def _slice(
    entry: Any,
    field: str,
    spec: methods.MergeMethod,
    shared: dict[str, Any],
    model: ModelCheck,
    check: InputsCheck,
) -> Slice:
    if not isinstance(entry, dict):
        raise ConfigError(f"{field}: must be a mapping with {', '.join(schema.SLICE_FIELDS)}")
    check_known(entry, schema.SLICE_FIELDS, field)
    raw_models = entry.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise ConfigError(
            f"{field}.models: must be a non-empty list of {{path, layer_range, weight, params}}"
        )
    models = tuple(_model(m, f"{field}.models[{i}]", model) for i, m in enumerate(raw_models))
    base = _base(entry.get("base_model"), f"{field}.base_model")
    ranges = [(f"{field}.models[{i}]", m.layer_range) for i, m in enumerate(models)]
    ranges += [(f"{field}.base_model", base.layer_range)] if base else []
    first, (start, end) = ranges[0]
    for where, (a, b) in ranges[1:]:
        if b - a != end - start:
            raise ConfigError(
                f"{where}.layer_range: {b - a} layers [{a}, {b}), but {first} gives {end - start} "
                f"[{start}, {end}); the models of a slice give the same number of layers"
            )
    params = _over(entry.get("params") or {}, shared, f"{field}.params")
    try:
        check(models, base and base.path)
        resolved = resolved_params(spec, params, models, base is not None)
    except ConfigError as err:
        raise ConfigError(f"{field}.{err}") from None
    return Slice(models, base, resolved)


def _model(entry: Any, field: str, model: ModelCheck) -> SliceModel:
    if not isinstance(entry, dict):
        raise ConfigError(f"{field}: must be a mapping with a 'path' and a 'layer_range'")
    check_known(entry, schema.SLICE_MODEL_FIELDS, field)
    checked = model({k: v for k, v in entry.items() if k != "layer_range"}, field)
    layers = layer_range(entry.get("layer_range"), f"{field}.layer_range")
    return SliceModel(
        checked.path, checked.weight, checked.params, checked.lora, layer_range=layers
    )


def _base(entry: Any, field: str) -> SliceBase | None:
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise ConfigError(f"{field}: must be a mapping {{path, layer_range}}, got {entry!r}")
    check_known(entry, schema.SLICE_BASE_FIELDS, field)
    path = optional_text(entry.get("path"), f"{field}.path")
    if path is None:
        raise ConfigError(f"{field}.path: required (a checkpoint directory or a hub id)")
    return SliceBase(path, layer_range(entry.get("layer_range"), f"{field}.layer_range"))


def layer_range(value: Any, field: str) -> tuple[int, int]:
    """[start, end) of layers: two whole numbers with 0 <= start < end."""
    whole = isinstance(value, list | tuple) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )
    if not whole or len(value) != 2:
        raise ConfigError(f"{field}: must be [start, end), two whole numbers, got {value!r}")
    start, end = value
    if start < 0:
        raise ConfigError(f"{field}: starts at layer {start}; layers are numbered from 0")
    if end <= start:
        raise ConfigError(f"{field}: [{start}, {end}) holds no layer; end must exceed start")
    return start, end


def _over(own: Any, shared: dict[str, Any], field: str) -> dict[str, Any]:
    """A slice's params over the shared ones: each name the slice gives replaces the shared
    value, except where the slice's filter rules match no name, which fall back to it."""
    if not isinstance(own, dict):
        raise ConfigError(f"{field}: must be a mapping of method parameters, got {own!r}")
    merged = dict(shared)
    for name, value in own.items():
        fallback = shared.get(name)
        open_rules = is_rule_list(value) and all(
            rule.get("filter") not in (None, "*") for rule in value
        )
        if open_rules and fallback is not None:
            value = list(value) + (fallback if is_rule_list(fallback) else [{"value": fallback}])
        merged[name] = value
    return merged
