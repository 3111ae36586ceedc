"""Whether models can be merged tensor for tensor: the `config.json` fields that fix the
computation must agree.

Two checkpoints whose tensors have the same names and shapes can still compute different
functions: another activation, rotary base or scaling, norm epsilon, head layout or tying of the
output embedding. Averaging their weights then gives a model that neither of them is close to,
so such models are refused unless the user asks for it (`allow_crimes`, mergekit's name).

Compared: `ARCHITECTURE_FIELDS` at the top level and inside a nested `text_config` (multimodal
models). A field counts where a model states it (a missing `head_dim` is not a difference,
since transformers derives it), except `NONE_WHEN_MISSING` fields, whose absence means None (no
rope scaling). The vocabulary size is not compared: differing vocabularies are merged on the
rows they share (`jkarcher.pipeline.vocab`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jkarcher.errors import MergeError

ARCHITECTURE_FIELDS = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "partial_rotary_factor",
    "attention_bias",
    "mlp_bias",
    "use_sliding_window",
    "num_experts",
    "num_local_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
)
NONE_WHEN_MISSING = ("rope_scaling", "rope_parameters")
NESTED_CONFIGS = ("text_config",)
TIED_EMBEDDINGS = "tie_word_embeddings"
# The config.json keys that state the layer count: `num_hidden_layers`, or GPT-2's `n_layer`.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer")
LAYER_COUNT = LAYER_COUNT_KEYS[0]


def layer_count_key(config: Mapping[str, Any]) -> str | None:
    """The first of LAYER_COUNT_KEYS that `config` (one level of a config.json) has, or None."""
    return next((key for key in LAYER_COUNT_KEYS if key in config), None)


def layer_count(config: Mapping[str, Any]) -> Any:
    """A model's number of layers as its `config.json` states it: `num_hidden_layers` (or
    `n_layer`) at the top level, else in a nested `text_config` (where multimodal models such as
    LLaVA keep their language model's); None where neither states it. The value is returned
    unchecked."""
    for inner in (config, *(config.get(nested) for nested in NESTED_CONFIGS)):
        if isinstance(inner, Mapping) and (key := layer_count_key(inner)):
            return inner[key]
    return None


def architecture_differences(
    configs: Sequence[Mapping[str, Any]], labels: Sequence[str], tied: Sequence[bool]
) -> list[str]:
    """Each field on which the models disagree, as 'FIELD: LABEL a, LABEL b', in field order.

    Args:
      configs: each model's `config.json` ({} where a model has none: it is not compared).
      labels: each model's name in messages ('model 1 (PATH)').
      tied: whether each model ties its lm_head to its embeddings (as its tensors show).
    """
    stated = [(c, label) for c, label in zip(configs, labels, strict=True) if c]
    differences = _differences(stated, "")
    for nested in NESTED_CONFIGS:
        inner = [(c[nested], label) for c, label in stated if isinstance(c.get(nested), Mapping)]
        differences += _differences(inner, f"{nested}.")
    if len(set(tied)) > 1:
        values = ", ".join(f"{label} {t}" for label, t in zip(labels, tied, strict=True))
        differences.append(f"tied embeddings ({TIED_EMBEDDINGS}): {values}")
    return differences


def check_architectures(
    configs: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    tied: Sequence[bool],
    allow_crimes: bool,
) -> list[str]:
    """Refuse models whose config.json disagree on the computation (`architecture_differences`,
    whose arguments these are) with a MergeError listing every difference; with
    `allow_crimes`, a warning instead (the list of warnings, empty when all agree)."""
    differences = architecture_differences(configs, labels, tied)
    if not differences:
        return []
    listed = "; ".join(differences)
    if not allow_crimes:
        raise MergeError(
            f"the models' architectures differ ({listed}); their tensors do not compute the "
            "same function, so they are not merged unless allow_crimes=True "
            "(--config.allow_crimes=True)"
        )
    return [f"allow_crimes: merging models whose architectures differ ({listed})"]


def _differences(configs: Sequence[tuple[Mapping[str, Any], str]], prefix: str) -> list[str]:
    differences = []
    for field in ARCHITECTURE_FIELDS:
        if field in NONE_WHEN_MISSING:
            values = [(c.get(field), label) for c, label in configs]
        else:
            values = [(c[field], label) for c, label in configs if field in c]
        if len({_comparable(v) for v, _ in values}) > 1:
            shown = ", ".join(f"{label} {value!r}" for value, label in values)
            differences.append(f"{prefix}{field}: {shown}")
    return differences


def _comparable(value: Any) -> Any:
    """A hashable form of a JSON value (lists and mappings included)."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _comparable(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_comparable(v) for v in value)
    return value
