"""mergekit YAML configs, run by jkarcher: a mergekit config as the fields of a jkarcher config.

    python scripts/merge.py --mergekit-yaml ties.yml --config.output=merged

`translate(document, layer_count=...)` maps a parsed mergekit config (a dict) to the fields that
`jkarcher.config.validate` checks, with notes on what it accepts without effect; `read(path)`
parses a file and `load(path)` does both. What jkarcher cannot honour is an error that names the
field of the YAML file; nothing is dropped silently.

What maps to what:
  merge_method                    method (the same names and parameters)
  models[i].model                 a model's path (a local directory, or a hub id in the local cache)
  models[i].parameters.weight     the model's weight (else parameters.weight, else 1)
  models[i].parameters.NAME       the model's own value of a per-model parameter (density, ...)
  parameters.NAME                 params.NAME
  a list of values                {"gradient": [...]}: interpolated over the layers
  - filter: TEXT  value: V        the same filter rules, first match wins
  base_model                      base_model; where mergekit merges the base as one of the
                                  models (slerp's t = 0 end; linear, passthrough and karcher, whose
                                  mergekit versions have no base role), jkarcher's model 0
  out_dtype, else dtype           dtype, the output dtype (arithmetic is float32 whatever the
                                  dtype)
  tokenizer_source: base          the base model's tokenizer (the output's reference model)
  slices                          one slice whose sources all span every layer, as models; its
                                  parameters and base_model come before the top-level ones
jkarcher's models are mergekit's in their order, less the base model, which mergekit lists among
them or adds to them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from jkarcher import methods
from jkarcher.config import OUTPUT_DTYPES, ConfigError
from jkarcher.io import Checkpoint

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
MERGEKIT_DTYPES = ("bfloat16", "float16", "float32", "float64")
# Methods for which mergekit merges base_model as one of the models: slerp's t = 0 end, and the
# methods without a base role in mergekit. jkarcher merges it as model 0.
BASE_AS_MODEL_0 = ("slerp", "linear", "passthrough", "karcher")
# Parameters that mergekit reads per model and jkarcher's method takes once (for its one model).
PER_MODEL_IN_MERGEKIT = {"passthrough": ("scale",)}
# Parameters that mergekit accepts and that change no value: name -> why, for every method ...
NO_EFFECT = {
    "int8_mask": "it only sets the dtype of mergekit's sign masks, not the merged values",
}
# ... and for one method.
NO_EFFECT_BY_METHOD = {
    "task_arithmetic": {
        "density": "mergekit's task_arithmetic accepts it but never sparsifies",
        "rescale": "mergekit's task_arithmetic accepts it but never sparsifies, so never rescales",
    },
}


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


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers such as 1e-5 as numbers (YAML 1.2; YAML 1.1 reads
    them as text, which mergekit turns into numbers later)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load(path: str | Path, layer_count: Callable[[str], int] | None = None) -> Translation:
    """Read and translate a mergekit YAML file; errors name the file and the field.

    `layer_count(model)` gives a model's number of layers, to check a slice's layer ranges
    (default: `num_hidden_layers` of the model's config.json).
    """
    try:
        return translate(read(path), layer_count=layer_count or checkpoint_layer_count)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def read(path: str | Path) -> Any:
    """The one YAML document of a file, parsed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror})") from None
    try:
        documents = list(yaml.load_all(text, Loader=_Loader))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if len(documents) != 1:
        raise ConfigError(f"{path}: holds {len(documents)} YAML documents; a config is one")
    return documents[0]


def checkpoint_layer_count(model: str) -> int:
    """`num_hidden_layers` of a model's config.json (a local directory or a cached hub id)."""
    checkpoint = Checkpoint(model)
    count = checkpoint.config.get("num_hidden_layers")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ConfigError(
            f"{checkpoint.path / 'config.json'}: no num_hidden_layers (a positive integer), "
            "which a slice's layer_range is checked against"
        )
    return count


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
    shared = _settings(_parameters(document.get("parameters"), "parameters"), "parameters")
    for name, (field, setting) in _settings(slice_parameters, "slices[0].parameters").items():
        shared[name] = (field, _chain(setting, _value_of(shared, name)))
    models, base_model = _arrange(spec, inputs, base, notes)
    models, shared = _lift_per_model(spec, models, shared)
    weight_field, weight = shared.pop("weight", (None, None))
    if weight is not None:
        _check_weight(weight_field, weight)
    params = _shared_params(spec, shared, notes)
    entries = [_model_entry(spec, item, weight, notes) for item in models]
    _check_tokenizer_source(document.get("tokenizer_source"), base, models)
    fields = {
        "method": spec.name,
        "models": entries,
        "base_model": base_model,
        "params": params,
        "dtype": _output_dtype(document, notes),
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
    base = None if base is None else _model_path(base, "base_model")
    if document.get("models") is not None:
        entries = _list(document["models"], "models")
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
    slices = _list(slices, "slices")
    if len(slices) != 1:
        raise ConfigError(
            f"slices: jkarcher merges whole models: give one slice whose sources span every "
            f"layer, not {len(slices)}"
        )
    field = "slices[0]"
    piece = _mapping(slices[0], field, ("sources", "base_model", "parameters", "residual_weight"))
    if piece.get("residual_weight") is not None:
        notes.append(f"{field}.residual_weight: ignored, as mergekit reads it but never uses it")
    inputs = []
    for i, source in enumerate(_list(piece.get("sources"), f"{field}.sources")):
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
    base = None if base is None else _model_path(base, f"{field}.base_model")
    return inputs, base, _parameters(piece.get("parameters"), f"{field}.parameters")


def _input(entry: Any, field: str, allowed: tuple[str, ...]) -> _Input:
    entry = _mapping(entry, field, allowed)
    if "model" not in entry:
        raise ConfigError(f"{field}.model: required")
    return _Input(
        field,
        _model_path(entry["model"], f"{field}.model"),
        _parameters(entry.get("parameters"), f"{field}.parameters"),
    )


def _model_path(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{field}: must be a local directory or a hub id, got {value!r}")
    if "+" in value:
        raise ConfigError(
            f"{field}: {value!r} applies a LoRA adapter (model+lora), which jkarcher does not do; "
            "merge the adapter into its model first"
        )
    if "@" in value:
        raise ConfigError(
            f"{field}: {value!r} names a revision (model@revision); jkarcher reads hub ids from "
            "the local cache without revisions: give the snapshot's directory"
        )
    return value


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
        own = _settings(item.parameters, f"{item.field}.parameters")
        for name in lifted:
            if name in own:
                field, setting = own[name]
                shared[name] = (field, _chain(setting, _value_of(shared, name)))
        parameters = {k: v for k, v in item.parameters.items() if k not in lifted}
        kept.append(dataclasses.replace(item, parameters=parameters))
    return kept, shared


def _shared_params(spec: methods.MergeMethod, shared: dict, notes: list[str]) -> dict:
    """jkarcher's params from mergekit's parameters (the slice's over the top-level ones)."""
    params = {}
    for name, (field, setting) in shared.items():
        if _note_no_effect(spec, name, field, notes):
            continue
        _declared(spec, name, field)
        params[name] = setting
    return params


def _model_entry(
    spec: methods.MergeMethod, item: _Input, shared_weight: Any, notes: list[str]
) -> dict[str, Any]:
    """A jkarcher model entry: path, weight (its own, else the shared one) and own params."""
    entry: dict[str, Any] = {"path": item.path}
    weight = shared_weight
    own: dict[str, Any] = {}
    for name, (field, setting) in _settings(item.parameters, f"{item.field}.parameters").items():
        if name == "weight":
            _check_weight(field, setting)
            weight = _chain(setting, shared_weight)
        elif _note_no_effect(spec, name, field, notes):
            continue
        elif not _declared(spec, name, field).per_model:
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


def _note_no_effect(spec: methods.MergeMethod, name: str, field: str, notes: list[str]) -> bool:
    """Whether a parameter changes nothing (and then a note that says why)."""
    why = NO_EFFECT.get(name) or NO_EFFECT_BY_METHOD.get(spec.name, {}).get(name)
    if why:
        notes.append(f"{field}: ignored, since {why}")
    return bool(why)


def _declared(spec: methods.MergeMethod, name: str, field: str) -> methods.Param:
    try:
        return spec.param(name)
    except methods.MethodError as err:
        raise ConfigError(f"{field}: {err}") from None


def _value_of(settings: dict[str, tuple[str, Any]], name: str) -> Any:
    """The value of a parameter in `_settings`' form, or None when it is not given."""
    return settings[name][1] if name in settings else None


def _settings(parameters: dict, field: str) -> dict[str, tuple[str, Any]]:
    """Each parameter as (its field, its value in jkarcher's form)."""
    return {
        name: (f"{field}.{name}", _setting(value, f"{field}.{name}"))
        for name, value in parameters.items()
    }


def _setting(value: Any, field: str) -> Any:
    """A mergekit parameter value in jkarcher's form: one value as it is; a list of values
    (interpolated over the layers) as {"gradient": [...]}; filter rules as a list of rules."""
    if isinstance(value, dict):
        return [_rule(value, field)]
    if not isinstance(value, list):
        return _scalar(value, field)
    if not value:
        raise ConfigError(f"{field}: an empty list gives no value")
    if all(isinstance(v, dict) for v in value):
        return [_rule(v, f"{field}[{i}]") for i, v in enumerate(value)]
    return {"gradient": [_scalar(v, f"{field}[{i}]") for i, v in enumerate(value)]}


def _rule(entry: dict, field: str) -> dict[str, Any]:
    entry = _mapping(entry, field, ("filter", "value"))
    if "value" not in entry:
        raise ConfigError(f"{field}.value: required")
    value = entry["value"]
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{field}.value: an empty list gives no value")
        value = {"gradient": [_scalar(v, f"{field}.value[{i}]") for i, v in enumerate(value)]}
    else:
        value = _scalar(value, f"{field}.value")
    text = entry.get("filter")
    if text is None:
        return {"value": value}
    if not isinstance(text, str):
        raise ConfigError(f"{field}.filter: must be text (part of a tensor name), got {text!r}")
    return {"filter": text, "value": value}


def _scalar(value: Any, field: str) -> Any:
    if isinstance(value, list | dict):
        raise ConfigError(
            f"{field}: must be one value (a number, true/false or text), got {value!r}"
        )
    return value


def _chain(first: Any, fallback: Any) -> Any:
    """`first`, and `fallback` for the tensor names that no filter rule of `first` matches
    (mergekit takes a value from the most specific place that gives one)."""
    if first is None:
        return fallback
    if fallback is None or not isinstance(first, list):
        return first
    if any(rule.get("filter") in (None, "*") for rule in first):
        return first
    return first + (fallback if isinstance(fallback, list) else [{"value": fallback}])


def _check_weight(field: str, setting: Any) -> None:
    """jkarcher's weights are numbers >= 0 (mergekit also takes negative ones)."""
    rules = setting if isinstance(setting, list) else [{"value": setting}]
    for rule in rules:
        value = rule["value"]
        for number in value["gradient"] if isinstance(value, dict) else [value]:
            if isinstance(number, int | float) and not isinstance(number, bool) and number < 0:
                raise ConfigError(
                    f"{field}: weights must be >= 0 in jkarcher (no negative weights), got "
                    f"{number!r}"
                )


def _check_tokenizer_source(value: Any, base: str | None, models: list[_Input]) -> None:
    """The output takes the tokenizer of its reference model (the base, else the first)."""
    if value is None:
        return
    if value == "union":
        raise ConfigError(
            "tokenizer_source: 'union' builds a new vocabulary from all models, which jkarcher "
            "does not do; use 'base', or leave it out"
        )
    if value == "base":
        if base is None:
            raise ConfigError("tokenizer_source: 'base' needs a base_model")
        return
    reference = base or models[0].path
    if _model_path(value, "tokenizer_source") != reference:
        raise ConfigError(
            f"tokenizer_source: the output takes the tokenizer of {reference} (the base model, "
            f"else the first); that of {value} is not supported"
        )


def _output_dtype(document: dict, notes: list[str]) -> str:
    """jkarcher's output dtype: out_dtype, else dtype (mergekit's compute dtype)."""
    dtype = _dtype_name(document.get("dtype"), "dtype")
    out_dtype = _dtype_name(document.get("out_dtype"), "out_dtype")
    field, name = ("out_dtype", out_dtype) if out_dtype else ("dtype", dtype)
    if name is None:
        notes.append(
            "dtype, out_dtype: neither is given, so the output is bfloat16 (mergekit would keep "
            "the models' dtype)"
        )
        return "bfloat16"
    if name not in OUTPUT_DTYPES:
        raise ConfigError(f"{field}: jkarcher writes {', '.join(OUTPUT_DTYPES)}, not {name}")
    if dtype is not None and dtype != "float32":
        notes.append(
            f"dtype: {dtype} is mergekit's compute dtype; jkarcher computes in float32 and rounds "
            f"once to the output dtype, {name}"
        )
    return name


def _dtype_name(value: Any, field: str) -> str | None:
    if value is None:
        return None
    name = value.removeprefix("torch.") if isinstance(value, str) else value
    if name not in MERGEKIT_DTYPES:
        raise ConfigError(f"{field}: must be one of {', '.join(MERGEKIT_DTYPES)}, got {value!r}")
    return name


def _parameters(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{field}: must be a mapping of parameter names to values, got {value!r}")
    return value


def _mapping(value: Any, field: str, allowed: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{field}: must be a mapping with {', '.join(allowed)}, got {value!r}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ConfigError(f"{field}: unknown field {unknown[0]!r} (it has: {', '.join(allowed)})")
    return value


def _list(value: Any, field: str) -> list:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{field}: must be a non-empty list, got {value!r}")
    return value
