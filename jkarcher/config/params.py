"""The method's parameters of a config, resolved through the registry: each model's own value,
then the shared one in `params`, then the method's default (docs/design.md, "Adding a method":
the config validation reads the registry's declarations).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jkarcher import methods
from jkarcher.config.fields import ConfigError
from jkarcher.config.schema import ModelEntry
from jkarcher.config.settings import falling_back, first_value, is_rule_list, read_setting
from jkarcher.methods.registry import REQUIRED


def resolved_params(spec, value: Any, models: tuple[ModelEntry, ...], has_base: bool) -> dict:
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
        declared = declared_param(spec, name, f"models[*].params.{name}")
        if not declared.per_model:
            raise ConfigError(
                f"models[*].params.{name}: method {spec.name!r} takes one value of {name!r} for "
                "all models; set it under params"
            )
        shared = settings.get(name, declared.default)
        shared = shared if isinstance(shared, tuple) else (shared,) * n_models
        check = _param_check(spec, declared)
        values = tuple(
            falling_back(read_setting(m.params[name], f"models[{i}].params.{name}", check), v)
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
            {name: first_value(s) for name, s in settings.items()}, n_models, has_base
        )
    except methods.MethodError as err:
        raise ConfigError(f"params: {err}") from None
    return resolved | settings


def declared_param(spec: methods.MergeMethod, name: str, field: str) -> methods.Param:
    """The declaration of parameter `name` of a method; an error names `field`."""
    try:
        return spec.param(name)
    except methods.MethodError as err:
        raise ConfigError(f"{field}: {err}") from None


def _shared_setting(spec, name: str, raw: Any, n_models: int) -> Any:
    """A parameter's value in `params`: one setting, or (a list) one setting per model."""
    declared = declared_param(spec, name, "params")
    field = f"params.{name}"
    check = _param_check(spec, declared)
    if not isinstance(raw, list) or is_rule_list(raw):
        return falling_back(read_setting(raw, field, check), declared.default)
    layers_hint = "(values that vary over the layers are written {'gradient': [...]})"
    if not declared.per_model:
        raise ConfigError(
            f"{field}: method {spec.name!r} takes one value of {name!r} for all models, not a "
            f"list {raw!r} {layers_hint}"
        )
    if len(raw) != n_models:
        raise ConfigError(f"{field}: {len(raw)} values for {n_models} models {layers_hint}")
    return tuple(
        falling_back(read_setting(v, f"{field}[{i}]", check), declared.default)
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
