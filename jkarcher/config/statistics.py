"""The per-model statistics a merge reads besides the weights, `params.fisher` (each model's
diagonal Fisher) and `params.gram` (its linear layers' input Grams, for RegMean): where they come
from, checked against the method (docs/design.md, "Adding a method")."""

from __future__ import annotations

import dataclasses
from typing import Any

from jkarcher import methods
from jkarcher.config import fields, schema
from jkarcher.config.fields import ConfigError, check_known, optional_text
from jkarcher.config.schema import FisherEstimate, GramEstimate, ModelEntry, StatisticSettings


@dataclasses.dataclass(frozen=True)
class _Statistic:
    """What a config says of one kind of statistic, for its error messages and its estimate."""

    noun: str  # "diagonal Fisher"
    file: str  # its file beside a model
    script: str  # the script that estimates one
    estimate: type
    estimate_fields: tuple[str, ...]


_STATISTICS = {
    schema.FISHER_INPUT: _Statistic(
        "diagonal Fisher",
        "fisher.safetensors",
        "scripts/fisher.py",
        FisherEstimate,
        schema.FISHER_ESTIMATE_FIELDS,
    ),
    schema.GRAM_INPUT: _Statistic(
        "input Grams",
        "grams.safetensors",
        "scripts/grams.py",
        GramEstimate,
        schema.GRAM_ESTIMATE_FIELDS,
    ),
}


def validated_statistics(
    spec: methods.MergeMethod, params: Any, models: tuple[ModelEntry, ...]
) -> dict[str, StatisticSettings | None]:
    """{"fisher": ..., "gram": ...}: each popped from `params` (a mapping, else neither is
    given) and checked: only methods with that tensor input take it, those that need it must
    have it, and a config gives at most one."""
    given = params if isinstance(params, dict) else {}
    settings = {name: _statistic(spec, name, given.pop(name, None), models) for name in _STATISTICS}
    chosen = [name for name, value in settings.items() if value is not None]
    if len(chosen) > 1:
        raise ConfigError(f"params.{chosen[1]}: give one of params.{chosen[0]} and this")
    return settings


def _statistic(
    spec: methods.MergeMethod, name: str, value: Any, models: tuple[ModelEntry, ...]
) -> StatisticSettings | None:
    kind = _STATISTICS[name]
    field = f"params.{name}"
    takes = name in spec.tensor_inputs
    forms = (
        f"{schema.BESIDE!r} ({kind.file} in each model's directory), a list of one file or "
        "directory per model, or {'text': FILE} to estimate them on a text"
    )
    if value is None:
        if takes and spec.tensor_inputs_required:
            raise ConfigError(
                f"{field}: method {spec.name!r} needs each model's {kind.noun}: give {forms} "
                f"({kind.script} estimates them)"
            )
        return None
    if not takes:
        users = [m for m in methods.names() if name in methods.get(m).tensor_inputs]
        raise ConfigError(
            f"{field}: method {spec.name!r} takes no {kind.noun}; the methods that do are "
            f"{', '.join(users)}"
        )
    adapted = next((i for i, m in enumerate(models) if m.lora), None)
    if adapted is not None and not isinstance(value, list):
        raise ConfigError(
            f"{field}: models[{adapted}] applies a LoRA adapter, so the {kind.noun} beside its "
            f"model is not its own, and none is estimated with the adapter: give one file per "
            "model"
        )
    if value == schema.BESIDE:
        return StatisticSettings()
    if isinstance(value, list):
        if len(value) != len(models):
            raise ConfigError(f"{field}: {len(value)} paths for {len(models)} models")
        return StatisticSettings(
            files=tuple(fields.path(v, f"{field}[{i}]") for i, v in enumerate(value))
        )
    if isinstance(value, dict):
        return StatisticSettings(estimate=_estimate(kind, field, value))
    raise ConfigError(f"{field}: must be {forms}; got {value!r}")


def _estimate(kind: _Statistic, field: str, value: dict) -> FisherEstimate | GramEstimate:
    check_known(value, kind.estimate_fields, field)
    text = optional_text(value.get("text"), f"{field}.text")
    if text is None:
        raise ConfigError(f"{field}.text: required (the text file to estimate them on)")
    value = schema.defaults(kind.estimate) | value
    checked = {
        "text": text,
        "seq_len": fields.count(value["seq_len"], f"{field}.seq_len", 2),
        "batch_size": fields.count(value["batch_size"], f"{field}.batch_size", 1),
        "num_batches": fields.optional_count(value["num_batches"], f"{field}.num_batches", 1),
    }
    if kind.estimate is FisherEstimate:
        if value["estimator"] not in schema.ESTIMATORS:
            raise ConfigError(
                f"{field}.estimator: must be one of {', '.join(schema.ESTIMATORS)}, got "
                f"{value['estimator']!r}"
            )
        checked |= {
            "estimator": value["estimator"],
            "seed": fields.count(value["seed"], f"{field}.seed", 0),
        }
    return kind.estimate(**checked)
