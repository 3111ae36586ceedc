"""PEFT LoRA adapter directories: their tensor names, their config, reading and checking them.

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors`. Module M
of the model (its weight `M.weight`) has the tensors

    base_model.model.M.lora_A.weight             r x in     (a linear module)
    base_model.model.M.lora_B.weight             out x r
    base_model.model.M.lora_B.bias               out        (applied only with lora_bias)
    base_model.model.M.lora_embedding_A          r x vocabulary   (an embedding)
    base_model.model.M.lora_embedding_B          dim x r
    base_model.model.M.weight, .bias             the module itself, replaced whole
                                                 (a module in modules_to_save)

and PEFT computes W + s B A (an embedding: W + s (B A)^T; a bias: b + s bias_B) with the scale
s = alpha / r (alpha / sqrt(r) with use_rslora), r and alpha the module's entries in
rank_pattern and alpha_pattern, else the config's `r` and `lora_alpha` (Hu et al. 2021; PEFT's
`LoraLayer.update_layer`). A pattern key names the module or a final part of its name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

from jkarcher.errors import JkarcherError
from jkarcher.io import CheckpointError, StoredTensor, read_header
from jkarcher.io.hf import resolve_checkpoint_dir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# A config's fields that would change what the adapter computes, and the values jkarcher reads.
PLAIN_LORA = {"use_dora": False, "fan_in_fan_out": False}


class AdapterError(CheckpointError):
    """A LoRA adapter directory is missing, unreadable, or asks for what jkarcher cannot apply."""


def lora_names(module: str, embedding: bool) -> tuple[str, str]:
    """The names of module `module`'s A and B factors in an adapter file."""
    if embedding:
        return f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B"
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


def lora_bias_name(module: str) -> str:
    return f"{PREFIX}{module}.lora_B.bias"


def saved_name(tensor: str) -> str:
    """The name in an adapter file of a model tensor saved whole (modules_to_save)."""
    return f"{PREFIX}{tensor}"


def adapter_config(
    base_model: str,
    ranks: dict[str, int],
    target_modules: list[str],
    modules_to_save: list[str],
) -> dict[str, Any]:
    """The adapter_config.json of an extracted adapter: r the largest rank, lora_alpha = r, and
    every module of another rank in rank_pattern and alpha_pattern with alpha equal to its rank,
    so that every module's scale alpha / r is 1."""
    r = max(ranks.values())
    others = {module: rank for module, rank in ranks.items() if rank != r}
    return {
        "base_model_name_or_path": base_model,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "target_modules": target_modules,
        "modules_to_save": modules_to_save,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": False,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter on disk: its directory, its config and its tensors (headers only)."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, StoredTensor]

    def scale(self, module: str) -> float:
        """alpha / r of `module` (alpha / sqrt(r) with use_rslora), from the patterns first."""
        r = _pattern_value(self.config.get("rank_pattern") or {}, module, self.config["r"])
        alpha = _pattern_value(
            self.config.get("alpha_pattern") or {}, module, self.config["lora_alpha"]
        )
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    @property
    def applies_bias(self) -> bool:
        return bool(self.config.get("lora_bias"))

    def saved_modules(self) -> list[str]:
        return list(self.config.get("modules_to_save") or [])


def read_adapter(path: str) -> LoraAdapter:
    """Open a PEFT LoRA adapter directory (or a hub id in the local cache): its config, checked
    to be a plain LoRA jkarcher can apply, and the headers of its weights."""
    try:
        directory = resolve_checkpoint_dir(path)
    except JkarcherError as err:
        raise AdapterError(f"LoRA adapter {path}: {err}") from None
    config_file, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_file.is_file():
        raise AdapterError(f"{directory}: no {CONFIG_NAME}; a LoRA adapter directory holds one")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{config_file}: unreadable ({err})") from None
    _check_config(config_file, config)
    if not weights.is_file():
        raise AdapterError(f"{directory}: no {WEIGHTS_NAME} (pickled adapters are refused)")
    tensors, _ = read_header(weights)
    return LoraAdapter(directory, config, tensors)


def _check_config(file: Path, config: Any) -> None:
    if not isinstance(config, dict):
        raise AdapterError(f"{file}: not a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{file}: peft_type is {config.get('peft_type')!r}; only LORA applies")
    for field, plain in PLAIN_LORA.items():
        if bool(config.get(field, plain)) != plain:
            raise AdapterError(f"{file}: {field} is {config[field]!r}; jkarcher applies plain LoRA")
    for field in ("r", "lora_alpha"):
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise AdapterError(f"{file}: {field} must be a number > 0, got {value!r}")


def _pattern_value(pattern: dict[str, Any], module: str, default: float) -> float:
    """The value of the first key that is `module` or a final part of it (PEFT's matching)."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?({key})", module):
            return value
    return default
