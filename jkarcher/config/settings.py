"""Values that vary by tensor, as in mergekit, and their resolution for each tensor.

Any method parameter (in `params` or a model's `params`) and a model's `weight` may be:
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

`read_setting` reads such a value as a config gives it into a `Gradient` or `Filtered` setting;
`tensor_values` resolves every setting of a validated config for one tensor, which
`jkarcher.pipeline` does for each tensor it plans (docs/design.md, "Data flow").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import ml_collections

from jkarcher import methods
from jkarcher.config.fields import ConfigError, check_known
from jkarcher.errors import MergeError
from jkarcher.methods.registry import REQUIRED, is_number

if TYPE_CHECKING:
    from jkarcher.config.schema import MergeConfig

# The error text for a bad value, or None (a declared parameter's check, or a weight's).
Problem = Callable[[Any], str | None]


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
        if not all(is_number(a) for a in self.anchors):
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
            {"value": plain(r.value)} | ({} if r.filter is None else {"filter": r.filter})
            for r in self.rules
        ]


def tensor_values(
    config: MergeConfig, name: str, position: float
) -> tuple[tuple[float, ...], dict[str, Any]]:
    """The models' weights and the method's resolved parameters for the tensor called `name`.

    `position` places the tensor along the layers for gradients: i / (L - 1) for layer i of L
    (1 when L = 1), 0 outside the layers (the plan places each tensor: `jkarcher.pipeline.routes`).
    All per-tensor settings are decided here: each model's own values, the shared values and the
    method's defaults, chosen by filters on the name and interpolated over the layers. Every value
    is checked as `validate` checks it; an error names the tensor.
    """
    spec = methods.get(config.method)
    weights = tuple(float(setting_at(w, name, position)) for w in config.weights)
    values = {key: setting_at(v, name, position) for key, v in config.params.items()}
    try:
        params = spec.resolve(values, len(config.models), config.base_model is not None)
    except methods.MethodError as err:
        raise ConfigError(f"params, tensor {name!r}: {err}") from None
    try:
        spec.checked_weights(weights, len(weights), params)
    except MergeError as err:
        raise ConfigError(f"models[*].weight, tensor {name!r}: {err}") from None
    return weights, params


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


def read_setting(value: Any, field: str, problem: Problem) -> Any:
    """A value as a config gives it: one value, {"gradient": [...]} or a list of filter rules.

    The values inside gradients and rules must pass `problem` (an error text, or None); a single
    value is checked where it is used.
    """
    if isinstance(value, list):
        if not is_rule_list(value):
            raise ConfigError(
                f"{field}: a list here is filter rules [{{'filter': TEXT, 'value': V}}, ..., "
                f"{{'value': V}}], got {value!r}; values over the layers are written "
                "{'gradient': [...]}"
            )
        return Filtered(tuple(_rule(r, f"{field}[{i}]", problem) for i, r in enumerate(value)))
    if isinstance(value, dict):
        return _gradient(value, field, problem)
    return value


def is_rule_list(value: Any) -> bool:
    """Whether a list is filter rules (mappings other than gradients), not one value per model."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(e, dict) and "gradient" not in e for e in value)
    )


def falling_back(setting: Any, fallback: Any) -> Any:
    """Filter rules followed by what applies to the names that none of them matches: the rules
    of `fallback`, or `fallback` itself for every name (nothing when `fallback` is REQUIRED)."""
    if not isinstance(setting, Filtered) or fallback is REQUIRED:
        return setting
    if any(rule.filter is None for rule in setting.rules):
        return setting
    rest = fallback.rules if isinstance(fallback, Filtered) else (Rule(None, fallback),)
    return Filtered(setting.rules + rest)


def first_value(setting: Any) -> Any:
    """One value that a setting takes (a config's structure is checked with these)."""
    if isinstance(setting, tuple):
        return tuple(first_value(s) for s in setting)
    if isinstance(setting, Filtered):
        return first_value(setting.rules[0].value)
    if isinstance(setting, Gradient):
        return setting.anchors[0]
    return setting


def has_gradient(setting: Any) -> bool:
    """Whether a setting (or a tuple of per-model settings) varies over the layers."""
    if isinstance(setting, tuple):
        return any(has_gradient(s) for s in setting)
    if isinstance(setting, Filtered):
        return any(isinstance(rule.value, Gradient) for rule in setting.rules)
    return isinstance(setting, Gradient)


def plain(value: Any) -> Any:
    """Mappings as dicts and sequences as lists, all the way down (ConfigDicts and settings
    that vary by tensor included)."""
    if isinstance(value, Gradient | Filtered):
        return value.plain()
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _rule(entry: dict, field: str, problem: Problem) -> Rule:
    check_known(entry, ("filter", "value"), field)
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


def _gradient(value: dict, field: str, problem: Problem) -> Gradient:
    if set(value) != {"gradient"}:
        raise ConfigError(f"{field}: a mapping here is {{'gradient': [values]}}, got {value!r}")
    anchors = value["gradient"]
    if not isinstance(anchors, list) or not anchors:
        raise ConfigError(f"{field}.gradient: must be a non-empty list of values, got {anchors!r}")
    return Gradient(
        tuple(_checked(a, f"{field}.gradient[{i}]", problem) for i, a in enumerate(anchors))
    )


def _checked(value: Any, field: str, problem: Problem) -> Any:
    if isinstance(value, list | dict):
        raise ConfigError(f"{field}: must be one value, got {value!r}")
    text = problem(value)
    if text:
        raise ConfigError(f"{field}: {text}")
    return value
