"""What a mergekit config says of the output: its dtype, and where its vocabulary comes from."""

from __future__ import annotations

from typing import Any

from jkarcher.config import OUTPUT_DTYPES, ConfigError
from jkarcher.mergekit_yaml.values import mapping_of, model_path

MERGEKIT_DTYPES = ("bfloat16", "float16", "float32", "float64")


def tokenizer_fields(document: dict, base: str | None) -> dict[str, Any]:
    """jkarcher's tokenizer_source, tokens and pad_to_multiple_of, from mergekit's
    tokenizer_source or its tokenizer field ({source (default "union"), tokens,
    pad_to_multiple_of}), the models of the token sources checked as model references."""
    value = document.get("tokenizer")
    if value is None:
        source = tokenizer_source(document.get("tokenizer_source"), base)
        return {} if source is None else {"tokenizer_source": source}
    if document.get("tokenizer_source") is not None:
        raise ConfigError("tokenizer, tokenizer_source: give at most one of them")
    value = mapping_of(value, "tokenizer", ("source", "tokens", "pad_to_multiple_of"))
    fields: dict[str, Any] = {
        "tokenizer_source": tokenizer_source(value.get("source", "union"), base)
    }
    tokens = value.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise ConfigError(f"tokenizer.tokens: must be a mapping of tokens, got {tokens!r}")
    fields["tokens"] = {
        token: _token_entry(entry, f"tokenizer.tokens[{token!r}]")
        for token, entry in tokens.items()
    }
    if value.get("pad_to_multiple_of") is not None:
        fields["pad_to_multiple_of"] = value["pad_to_multiple_of"]
    return fields


def _token_entry(entry: Any, field: str) -> Any:
    """A token's entry, its source's model checked as a model reference."""
    if not isinstance(entry, dict):
        return entry
    source = entry.get("source")
    if isinstance(source, str):
        entry = entry | {"source": model_path(source, f"{field}.source")}
    elif isinstance(source, dict) and "model" in source:
        model = model_path(source["model"], f"{field}.source.model")
        entry = entry | {"source": source | {"model": model}}
    return entry


def tokenizer_source(value: Any, base: str | None) -> str | None:
    """jkarcher's tokenizer_source: "base", "union" or a model's path. mergekit needs a base
    model here: without one it builds the vocabulary on whichever model it lists first, which
    varies from run to run."""
    if value is None:
        return None
    if base is None:
        raise ConfigError(
            f"tokenizer_source: {value!r} needs a base_model; without one mergekit builds the "
            "vocabulary on whichever model it happens to list first"
        )
    if value in ("base", "union"):
        return value
    return model_path(value, "tokenizer_source")


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
