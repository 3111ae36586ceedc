"""mergekit's parameter values in jkarcher's form, and the checks of the YAML's structure.

A value as it is; a list of values (interpolated over the layers) as {"gradient": [...]}; filter
rules as a list of rules; a value given in several places (a model, a slice, the top level)
as filter rules that fall back from the most specific place to the next. Parameters that change
nothing in mergekit are noted and dropped.
"""

from __future__ import annotations

from typing import Any

from jkarcher import methods
from jkarcher.config import ConfigError
from jkarcher.methods.registry import is_number

# Parameters that mergekit accepts and that change no value: name -> why, for every method ...
NO_EFFECT = {
    "int8_mask": "it only sets the dtype of mergekit's sign masks, not the merged values",
}
# ... and for one method.
NO_EFFECT_BY_METHOD = {
    "karcher": {
        "weight": "mergekit's karcher weighs every model equally (jkarcher's own configs give "
        "the Karcher mean weights)",
    },
    "task_arithmetic": {
        "density": "mergekit's task_arithmetic accepts it but never sparsifies",
        "rescale": "mergekit's task_arithmetic accepts it but never sparsifies, so never rescales",
    },
}


def parameter_settings(parameters: dict, field: str) -> dict[str, tuple[str, Any]]:
    """Each parameter as (its field, its value in jkarcher's form)."""
    return {
        name: (f"{field}.{name}", _setting(value, f"{field}.{name}"))
        for name, value in parameters.items()
    }


def value_of(settings: dict[str, tuple[str, Any]], name: str) -> Any:
    """The value of a parameter in `parameter_settings`' form, or None when it is not given."""
    return settings[name][1] if name in settings else None


def chain(first: Any, fallback: Any) -> Any:
    """`first`, and `fallback` for the tensor names that no filter rule of `first` matches
    (mergekit takes a value from the most specific place that gives one)."""
    if first is None:
        return fallback
    if fallback is None or not isinstance(first, list):
        return first
    if any(rule.get("filter") in (None, "*") for rule in first):
        return first
    return first + (fallback if isinstance(fallback, list) else [{"value": fallback}])


def check_weight(field: str, setting: Any, spec: methods.MergeMethod) -> None:
    """A weight setting as the method takes it: of any sign for the methods with signed weights
    (as mergekit takes them), else >= 0, the refusal saying why."""
    rules = setting if isinstance(setting, list) else [{"value": setting}]
    for rule in rules:
        value = rule["value"]
        for number in value["gradient"] if isinstance(value, dict) else [value]:
            problem = spec.weight_sign_problem(number) if is_number(number) else None
            if problem:
                raise ConfigError(f"{field}: {problem}")


def note_no_effect(spec: methods.MergeMethod, name: str, field: str, notes: list[str]) -> bool:
    """Whether a parameter changes nothing (and then a note that says why)."""
    why = NO_EFFECT.get(name) or NO_EFFECT_BY_METHOD.get(spec.name, {}).get(name)
    if why:
        notes.append(f"{field}: ignored, since {why}")
    return bool(why)


def model_path(value: Any, field: str, lora: bool = False) -> str:
    """A model reference: a local directory or a hub id, without revision; with `lora`, it may
    apply a LoRA adapter ('model+lora', which `model_entry_path` splits)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{field}: must be a local directory or a hub id, got {value!r}")
    if "+" in value and (not lora or value.count("+") > 1 or "" in value.split("+")):
        raise ConfigError(
            f"{field}: {value!r}: jkarcher applies a LoRA adapter (model+lora) to a merged "
            "model only, as one model and one adapter; merge the adapter into its model first"
        )
    if "@" in value:
        raise ConfigError(
            f"{field}: {value!r} names a revision (model@revision); jkarcher reads hub ids from "
            "the local cache without revisions: give the snapshot's directory"
        )
    return value


def model_entry_path(reference: str) -> dict[str, str]:
    """A jkarcher model entry's path, and its `lora` where the reference is 'model+lora'."""
    path, _, lora = reference.partition("+")
    return {"path": path, "lora": lora} if lora else {"path": path}


def parameter_mapping(value: Any, field: str) -> dict[str, Any]:
    """A `parameters:` mapping (none: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{field}: must be a mapping of parameter names to values, got {value!r}")
    return value


def mapping_of(value: Any, field: str, allowed: tuple[str, ...]) -> dict:
    """A mapping whose keys are among `allowed`."""
    if not isinstance(value, dict):
        raise ConfigError(f"{field}: must be a mapping with {', '.join(allowed)}, got {value!r}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ConfigError(f"{field}: unknown field {unknown[0]!r} (it has: {', '.join(allowed)})")
    return value


def non_empty_list(value: Any, field: str) -> list:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{field}: must be a non-empty list, got {value!r}")
    return value


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
    entry = mapping_of(entry, field, ("filter", "value"))
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
