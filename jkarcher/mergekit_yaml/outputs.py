"""What a mergekit config says of the output: its dtype, and whose tokenizer it keeps."""

from __future__ import annotations

from typing import Any

from jkarcher.config import OUTPUT_DTYPES, ConfigError
from jkarcher.mergekit_yaml.values import model_path

MERGEKIT_DTYPES = ("bfloat16", "float16", "float32", "float64")


def check_tokenizer_source(value: Any, base: str | None, reference: str) -> None:
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
    if model_path(value, "tokenizer_source") != reference:
        raise ConfigError(
            f"tokenizer_source: the output takes the tokenizer of {reference} (the base model, "
            f"else the first); that of {value} is not supported"
        )


def output_dtype(document: dict, notes: list[str]) -> str:
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
