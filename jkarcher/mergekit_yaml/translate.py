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
from jkarcher.mergekit_yaml.outputs import check_tokenizer_source, output_dtype
from jkarcher.mergekit_yaml.values import (
    chain,
    check_weight,
    mapping_of,
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
)
REFUSED_FIELDS = {
    "modules": "merges of several modules, each with its own layers, are not supported; give "
    "models, or one slice",
    "tokenizer": "building a new vocabulary (added tokens, embedding initialisation) is not "
    "supported; tokenizer_source: base keeps the base model's tokenizer",
    "chat_template": "setting a chat template is not supported; the output keeps the tokenizer "
    "files of the base (or first) model",
}
# Methods for which mergekit merges base_model as one of the models: slerp's t = 0 end, and the
# methods without a base role in mergekit. jkarcher merges it as model 0.
BASE_AS_MODEL_0 = ("slerp", "linear", "passthrough", "karcher")
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
    """One model that mergekit merges: where the YAML lists it, its path and its parameters."""

    field: str
    path: str
    parameters: dict[str, Any]


def translate(document: Any, *, layer_count: Callable[[str], int]) -> Translation:
    """A parsed mergekit config as the fields of a jkarcher config, and notes.

    `layer_count(model)` gives a model's number of layers (used only to check slices).
    """
    if not isinstance(document, dict):
        raise ConfigError(f"a mergekit config is a mapping of fields, got {document!r}")
    _check_fields(document)
    spec = _method(document.get("merge_method"))
    notes: list[str] = []
    inputs, base, slice_parameters = _inputs(document, layer_count, notes)
    shared = parameter_settings(
        parameter_mapping(document.get("parameters"), "parameters"), "parameters"
    )
    for name, (field, setting) in parameter_settings(
        slice_parameters, "slices[0].parameters"
    ).items():
        shared[name] = (field, chain(setting, value_of(shared, name)))
    models, base_model = _arrange(spec, inputs, base, notes)
    models, shared = _lift_per_model(spec, models, shared)
    weight_field, weight = shared.pop("weight", (None, None))
    if weight is not None:
        check_weight(weight_field, weight)
    params = _shared_params(spec, shared, notes)
    entries = [_model_entry(spec, item, weight, notes) for item in models]
    check_tokenizer_source(document.get("tokenizer_source"), base, base or models[0].path)
    fields = {
        "method": spec.name,
        "models": entries,
        "base_model": base_model,
        "params": params,
        "dtype": output_dtype(document, notes),
    }
    return Translation(fields, tuple(dict.fromkeys(notes)))


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


def _inputs(
    document: dict, layer_count: Callable[[str], int], notes: list[str]
) -> tuple[list[_Input], str | None, dict]:
    """The models mergekit merges, its base model, and the parameters of the slice (if any)."""
    if (document.get("models") is None) == (document.get("slices") is None):
        raise ConfigError("models, slices: give exactly one of them")
    base = document.get("base_model")
    base = None if base is None else model_path(base, "base_model")
    if document.get("models") is not None:
        entries = non_empty_list(document["models"], "models")
        inputs = [_input(e, f"models[{i}]", ("model", "parameters")) for i, e in enumerate(entries)]
        slice_parameters: dict = {}
    else:
        inputs, slice_base, slice_parameters = _single_slice(document["slices"], layer_count, notes)
        base = slice_base or base
    seen: dict[str, str] = {}
    for item in inputs:
        if item.path in seen:
            raise ConfigError(
                f"{item.field}.model: {item.path} is listed twice ({seen[item.path]})"
            )
        seen[item.path] = item.field
    return inputs, base, slice_parameters


def _single_slice(
    slices: Any, layer_count: Callable[[str], int], notes: list[str]
) -> tuple[list[_Input], str | None, dict]:
    """The one slice jkarcher can honour: every source spans all the layers of its model."""
    slices = non_empty_list(slices, "slices")
    if len(slices) != 1:
        raise ConfigError(
            f"slices: jkarcher merges whole models: give one slice whose sources span every "
            f"layer, not {len(slices)}"
        )
    field = "slices[0]"
    piece = mapping_of(slices[0], field, ("sources", "base_model", "parameters", "residual_weight"))
    if piece.get("residual_weight") is not None:
        notes.append(f"{field}.residual_weight: ignored, as mergekit reads it but never uses it")
    inputs = []
    for i, source in enumerate(non_empty_list(piece.get("sources"), f"{field}.sources")):
        where = f"{field}.sources[{i}]"
        item = _input(source, where, ("model", "layer_range", "parameters"))
        layers = layer_count(item.path)
        if source.get("layer_range") != [0, layers]:
            raise ConfigError(
                f"{where}.layer_range: jkarcher merges whole models, so a source spans all "
                f"{layers} layers of {item.path}: [0, {layers}], not {source.get('layer_range')!r}"
            )
        inputs.append(item)
    base = piece.get("base_model")
    base = None if base is None else model_path(base, f"{field}.base_model")
    return inputs, base, parameter_mapping(piece.get("parameters"), f"{field}.parameters")


def _input(entry: Any, field: str, allowed: tuple[str, ...]) -> _Input:
    entry = mapping_of(entry, field, allowed)
    if "model" not in entry:
        raise ConfigError(f"{field}.model: required")
    return _Input(
        field,
        model_path(entry["model"], f"{field}.model"),
        parameter_mapping(entry.get("parameters"), f"{field}.parameters"),
    )


def _arrange(
    spec: methods.MergeMethod, inputs: list[_Input], base: str | None, notes: list[str]
) -> tuple[list[_Input], str | None]:
    """jkarcher's models, in order, and its base model, from mergekit's inputs and base."""
    if base is None:
        return inputs, None
    listed = [item for item in inputs if item.path == base]
    others = [item for item in inputs if item.path != base]
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
    entry: dict[str, Any] = {"path": item.path}
    weight = shared_weight
    own: dict[str, Any] = {}
    parameters = parameter_settings(item.parameters, f"{item.field}.parameters")
    for name, (field, setting) in parameters.items():
        if name == "weight":
            check_weight(field, setting)
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
