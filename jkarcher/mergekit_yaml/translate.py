"""A parsed mergekit config translated field by field into the fields of a jkarcher config.

jkarcher's models are mergekit's in their order, less the base model, which mergekit lists among
them or adds to them; where mergekit merges the base as one of the models, it is jkarcher's
model 0. What jkarcher cannot honour is an error that names the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jkarcher import methods
from jkarcher.config import ConfigError
from jkarcher.config.params import declared_param
from jkarcher.config.slices import layer_range
from jkarcher.mergekit_yaml.outputs import output_dtype, tokenizer_fields
from jkarcher.mergekit_yaml.values import (
    chain,
    check_weight,
    mapping_of,
    model_entry_path,
    model_path,
    non_empty_list,
    note_no_effect,
    parameter_mapping,
    parameter_settings,
    value_of,
)

FIELDS = (
    "models",
    "slices",
    "merge_method",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
)
REFUSED_FIELDS = {
    "modules": "merges of several modules, each with its own layers, are not supported; give "
    "models, or slices",
}
# Methods for which mergekit merges base_model as one of the models: slerp's t = 0 end, and the
# methods without a base role in mergekit. jkarcher merges it as model 0.
BASE_IGNORED = ("linear", "passthrough", "karcher")
BASE_AS_MODEL_0 = ("slerp", *BASE_IGNORED)
# Parameters that mergekit reads per model and jkarcher's method takes once (for its one model).
PER_MODEL_IN_MERGEKIT = {"passthrough": ("scale",)}


@dataclasses.dataclass(frozen=True)
class Translation:
    """A mergekit config in jkarcher's terms: `fields` of a jkarcher config (all but `output` and
    the run's own settings), and `notes` on what was accepted without effect."""

    fields: dict[str, Any]
    notes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Input:
    """One model that mergekit merges: where the YAML lists it, its path and its parameters,
    and in a slice, its layers [start, end)."""

    field: str
    path: str
    parameters: dict[str, Any]
    layer_range: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class _Group:
    """What mergekit merges as one: the models of the models form, or one output slice
    (`field` names it: "" or "slices[i]"), with its base model and its own parameters;
    `every_layer`: each of its inputs gives all the layers of its model."""

    field: str
    inputs: list[_Input]
    base: str | None
    parameters: dict[str, Any]
    every_layer: bool = True


def translate(document: Any, *, layer_count: Callable[[str], int]) -> Translation:
    """A parsed mergekit config as the fields of a jkarcher config, and notes.

    `layer_count(model)` gives a model's number of layers, which a slice's layer ranges are
    checked against. One slice whose sources span every layer of their models is the models
    form (what mergekit makes of `models`); other slices are jkarcher's `slices`.
    """
    if not isinstance(document, dict):
        raise ConfigError(f"a mergekit config is a mapping of fields, got {document!r}")
    _check_fields(document)
    spec = _method(document.get("merge_method"))
    notes: list[str] = []
    groups = _groups(document, layer_count, notes)
    listed = document.get("models") is not None
    whole = len(groups) == 1 and groups[0].every_layer
    top_level = dict(parameter_mapping(document.get("parameters"), "parameters"))
    # Where each model's statistics come from (params.fisher, params.gram), for jkarcher-only
    # methods: as jkarcher's config takes them, not a mergekit value.
    statistics = {name: top_level.pop(name) for name in spec.tensor_inputs if name in top_level}
    if statistics and not whole:
        raise ConfigError(
            f"parameters.{next(iter(statistics))}: per-model statistics are not taken with "
            "slices; merge whole models"
        )
    shared = parameter_settings(top_level, "parameters")
    merges = [_merge(spec, group, shared, listed, not whole, notes) for group in groups]
    if whole:
        models, base_model, params = merges[0]
        fields = {"models": models, "base_model": base_model, "params": params | statistics}
    else:
        fields = {
            "slices": [
                {"models": models, "base_model": _slice_base(group, base), "params": params}
                for group, (models, base, params) in zip(groups, merges, strict=True)
            ]
        }
    vocabulary = tokenizer_fields(document, groups[0].base)
    fields = {"method": spec.name} | fields | {"dtype": output_dtype(document, notes)} | vocabulary
    if document.get("chat_template") is not None:
        fields["chat_template"] = document["chat_template"]
    return Translation(fields, tuple(dict.fromkeys(notes)))


def _merge(
    spec: methods.MergeMethod,
    group: _Group,
    top_level: dict,
    listed: bool,
    ranged: bool,
    notes: list[str],
) -> tuple[list[dict[str, Any]], str | None, dict]:
    """jkarcher's models (with their layer ranges where `ranged`), base model and params of one
    group; `listed`: the models form, to which mergekit adds a base model it does not list."""
    shared = dict(top_level)
    own = parameter_settings(group.parameters, f"{group.field}.parameters")
    for name, (field, setting) in own.items():
        shared[name] = (field, chain(setting, value_of(shared, name)))
    models, base_model = _arrange(spec, group, listed, notes)
    models, shared = _lift_per_model(spec, models, shared)
    weight_field, weight = shared.pop("weight", (None, None))
    if weight is not None:
        check_weight(weight_field, weight, spec)
        if note_no_effect(spec, "weight", weight_field, notes):
            weight = None
    params = _shared_params(spec, shared, notes)
    entries = [_model_entry(spec, item, weight, notes) for item in models]
    if ranged:
        for entry, item in zip(entries, models, strict=True):
            entry["layer_range"] = list(item.layer_range)
    return entries, base_model, params


def _slice_base(group: _Group, base: str | None) -> dict[str, Any] | None:
    """A slice's base model in jkarcher's form: its path and the layers its source gives."""
    if base is None:
        return None
    layers = next(item.layer_range for item in group.inputs if item.path == base)
    return {"path": base, "layer_range": list(layers)}


def _check_fields(document: dict) -> None:
    for key, value in document.items():
        if key in REFUSED_FIELDS and value is not None:
            raise ConfigError(f"{key}: {REFUSED_FIELDS[key]}")
        if key not in FIELDS and key not in REFUSED_FIELDS:
            raise ConfigError(f"unknown field {key!r} (jkarcher reads: {', '.join(FIELDS)})")


def _method(value: Any) -> methods.MergeMethod:
    if not isinstance(value, str):
        raise ConfigError(f"merge_method: required, one of {', '.join(methods.names())}")
    try:
        return methods.get(value)
    except methods.MethodError as err:
        raise ConfigError(f"merge_method: {err}") from None


def _groups(document: dict, layer_count: Callable[[str], int], notes: list[str]) -> list[_Group]:
    """The models form as one group, or each output slice as one."""
    if (document.get("models") is None) == (document.get("slices") is None):
        raise ConfigError("models, slices: give exactly one of them")
    base = document.get("base_model")
    base = None if base is None else model_path(base, "base_model")
    if document.get("models") is not None:
        entries = non_empty_list(document["models"], "models")
        inputs = [_input(e, f"models[{i}]", ("model", "parameters")) for i, e in enumerate(entries)]
        groups = [_Group("", inputs, base, {})]
    else:
        pieces = non_empty_list(document["slices"], "slices")
        groups = [
            _slice(piece, f"slices[{i}]", base, layer_count, notes)
            for i, piece in enumerate(pieces)
        ]
    for group in groups:
        seen: dict[str, str] = {}
        for item in group.inputs:
            if item.path in seen:
                raise ConfigError(
                    f"{item.field}.model: {item.path} is listed twice ({seen[item.path]})"
                )
            seen[item.path] = item.field
    return groups


def _slice(
    piece: Any, field: str, base: str | None, layer_count: Callable[[str], int], notes: list[str]
) -> _Group:
    """One output slice: its sources, each a range of layers within its model, all of the
    same length; its base model (else the top-level one) and its parameters."""
    piece = mapping_of(piece, field, ("sources", "base_model", "parameters", "residual_weight"))
    if piece.get("residual_weight") is not None:
        notes.append(f"{field}.residual_weight: ignored, as mergekit reads it but never uses it")
    inputs = []
    every_layer = True
    for i, source in enumerate(non_empty_list(piece.get("sources"), f"{field}.sources")):
        where = f"{field}.sources[{i}]"
        item = _input(source, where, ("model", "layer_range", "parameters"))
        start, end = layer_range(source.get("layer_range"), f"{where}.layer_range")
        layers = layer_count(model_entry_path(item.path)["path"])
        if end > layers:
            raise ConfigError(
                f"{where}.layer_range: [{start}, {end}) is outside the {layers} layers of "
                f"{item.path} (layers 0 .. {layers - 1})"
            )
        if inputs and end - start != _length(inputs[0]):
            raise ConfigError(
                f"{where}.layer_range: {end - start} layers, but {inputs[0].field} gives "
                f"{_length(inputs[0])}; the sources of a slice give the same number of layers"
            )
        inputs.append(dataclasses.replace(item, layer_range=(start, end)))
        every_layer &= (start, end) == (0, layers)
    own_base = piece.get("base_model")
    if own_base is not None:
        base = model_path(own_base, f"{field}.base_model")
    parameters = parameter_mapping(piece.get("parameters"), f"{field}.parameters")
    return _Group(field, inputs, base, parameters, every_layer)


def _length(item: _Input) -> int:
    start, end = item.layer_range
    return end - start


def _input(entry: Any, field: str, allowed: tuple[str, ...]) -> _Input:
    entry = mapping_of(entry, field, allowed)
    if "model" not in entry:
        raise ConfigError(f"{field}.model: required")
    return _Input(
        field,
        model_path(entry["model"], f"{field}.model", lora=True),
        parameter_mapping(entry.get("parameters"), f"{field}.parameters"),
    )


def _arrange(
    spec: methods.MergeMethod, group: _Group, listed_form: bool, notes: list[str]
) -> tuple[list[_Input], str | None]:
    """jkarcher's models, in order, and its base model, from mergekit's inputs and base.

    mergekit adds the base to the models form; a slice's base must be among its sources, but
    for the methods that take no base in mergekit, which ignore it."""
    inputs, base = group.inputs, group.base
    if base is None:
        return inputs, None
    listed = [item for item in inputs if item.path == base]
    others = [item for item in inputs if item.path != base]
    if not listed and not listed_form:
        if spec.name in BASE_IGNORED:
            notes.append(
                f"{group.field}: base_model {base} is not among its sources, and mergekit's "
                f"{spec.name} takes no base, so it is not merged"
            )
            return inputs, None
        raise ConfigError(
            f"{group.field}.sources: the base model {base} is not among them; mergekit merges a "
            "slice's base model from its sources"
        )
    if spec.name in BASE_AS_MODEL_0:
        return [listed[0] if listed else _Input("base_model", base, {}), *others], None
    for item in listed:
        if item.parameters:
            notes.append(
                f"{item.field}.parameters: ignored, as mergekit's {spec.name} ignores the base "
                "model's parameters"
            )
    return others, base


def _lift_per_model(
    spec: methods.MergeMethod, models: list[_Input], shared: dict
) -> tuple[list[_Input], dict]:
    """Parameters that mergekit reads per model and jkarcher's method once (for its one model)
    move from the model's parameters to the shared ones, over the value there."""
    lifted = PER_MODEL_IN_MERGEKIT.get(spec.name, ())
    shared = dict(shared)
    kept = []
    for item in models:
        own = parameter_settings(item.parameters, f"{item.field}.parameters")
        for name in lifted:
            if name in own:
                field, setting = own[name]
                shared[name] = (field, chain(setting, value_of(shared, name)))
        parameters = {k: v for k, v in item.parameters.items() if k not in lifted}
        kept.append(dataclasses.replace(item, parameters=parameters))
    return kept, shared


def _shared_params(spec: methods.MergeMethod, shared: dict, notes: list[str]) -> dict:
    """jkarcher's params from mergekit's parameters (the slice's over the top-level ones)."""
    params = {}
    for name, (field, setting) in shared.items():
        if note_no_effect(spec, name, field, notes):
            continue
        declared_param(spec, name, field)
        params[name] = setting
    return params


def _model_entry(
    spec: methods.MergeMethod, item: _Input, shared_weight: Any, notes: list[str]
) -> dict[str, Any]:
    """A jkarcher model entry: path, weight (its own, else the shared one) and own params."""
    entry: dict[str, Any] = model_entry_path(item.path)
    weight = shared_weight
    own: dict[str, Any] = {}
    parameters = parameter_settings(item.parameters, f"{item.field}.parameters")
    for name, (field, setting) in parameters.items():
        if name == "weight":
            check_weight(field, setting, spec)
            if not note_no_effect(spec, name, field, notes):
                weight = chain(setting, shared_weight)
        elif note_no_effect(spec, name, field, notes):
            continue
        elif not declared_param(spec, name, field).per_model:
            raise ConfigError(
                f"{field}: method {spec.name!r} takes one value of {name!r} for all models "
                "(mergekit reads it from parameters only); set it under parameters"
            )
        else:
            own[name] = setting
    if weight is not None:
        entry["weight"] = weight
    if own:
        entry["params"] = own
    return entry
