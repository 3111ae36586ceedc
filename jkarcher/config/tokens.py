"""The `tokens` field: how the embedding rows of named tokens are made, when `tokenizer_source`
builds the output's vocabulary (mergekit 0.1.5's `tokenizer.tokens`).

Each entry `TOKEN: {source, force}` adds TOKEN to the output's vocabulary where it lacks it. Its
row, in every model that lacks the token (in every model with `force`), is made by `source`:

- `{"kind": "zero"}`: zeros;
- a model's path (one of the merged models): that model's row of TOKEN;
- `{"kind": "model_token", "model": PATH, "token_id": ID}` (or `"token": TEXT`): that model's
  row ID (of token TEXT in its own vocabulary).

Without a source, every model must have the token (and `force` is refused).
"""

from __future__ import annotations

from typing import Any

from jkarcher.config.fields import ConfigError, check_known, flag, optional_count

ZERO = "zero"
MODEL_TOKEN = "model_token"
ENTRY_FIELDS = ("source", "force")


def checked_tokens(value: Any, field: str = "tokens") -> dict[str, dict[str, Any]]:
    """`tokens` as {TOKEN: {"source": SOURCE or None, "force": bool}}, SOURCE one of {"kind":
    "zero"}, {"kind": "model", "model": PATH}, {"kind": "model_token", "model": PATH,
    "token_id": ID} or {..., "token": TEXT}."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{field}: must be a mapping of tokens to {{source, force}}")
    checked = {}
    for token, entry in value.items():
        where = f"{field}[{token!r}]"
        if not isinstance(token, str) or not token:
            raise ConfigError(f"{where}: a token is non-empty text")
        entry = {} if entry is None else entry
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a mapping of {', '.join(ENTRY_FIELDS)}")
        check_known(entry, ENTRY_FIELDS, where)
        source = _source(entry.get("source"), f"{where}.source")
        force = flag(entry.get("force", False), f"{where}.force")
        if force and source is None:
            raise ConfigError(f"{where}.force: needs a source for the token's row")
        checked[token] = {"source": source, "force": force}
    return checked


def _source(value: Any, field: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip():
        return {"kind": "model", "model": value}
    if not isinstance(value, dict) or value.get("kind") not in (ZERO, MODEL_TOKEN):
        raise ConfigError(
            f"{field}: must be a model's path, {{kind: zero}} or {{kind: model_token, model: "
            f"PATH, token_id: ID or token: TEXT}}, got {value!r}"
        )
    if value["kind"] == ZERO:
        check_known(value, ("kind",), field)
        return {"kind": ZERO}
    check_known(value, ("kind", "model", "token_id", "token"), field)
    model = value.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ConfigError(f"{field}.model: must be a model's path, got {model!r}")
    if ("token_id" in value) == ("token" in value):
        raise ConfigError(f"{field}: give one of token_id and token")
    if "token_id" in value:
        token_id = optional_count(value["token_id"], f"{field}.token_id", 0)
        return {"kind": MODEL_TOKEN, "model": model, "token_id": token_id}
    token = value["token"]
    if not isinstance(token, str) or not token:
        raise ConfigError(f"{field}.token: must be non-empty text, got {token!r}")
    return {"kind": MODEL_TOKEN, "model": model, "token": token}
