"""The README.md model card of a merged checkpoint: YAML front matter and the resolved config."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from jkarcher.io.hf import is_hub_id


def display_name(path_or_id: str | os.PathLike) -> str:
    """How the card names an input model, never by an absolute local path.

    A hub id resolved from the local HF cache (`org/name` that is not a local directory) stays
    as given; a directory inside a cached hub repo (`.../models--org--name/snapshots/<rev>`) is
    named by that repo's id; any other directory by its own name, once resolved (so that "." or
    "../x/" give real names).
    """
    path = Path(path_or_id).expanduser()
    if not path.is_dir():
        return str(path_or_id) if is_hub_id(str(path_or_id)) else path.name
    resolved = path.resolve()
    for folder in resolved.parents:
        repo = folder.parent
        if folder.name == "snapshots" and repo.name.startswith("models--"):
            org, _, name = repo.name.removeprefix("models--").partition("--")
            return f"{org}/{name}"
    return resolved.name


def model_card(
    title: str,
    method: str,
    method_summary: str,
    method_citation: str,
    models: Sequence[tuple[str, Any]],
    base_model: str | None,
    resolved_config: Mapping[str, Any],
    mergekit_config: str | None = None,
) -> str:
    """Markdown with Hugging Face front matter (base_model list; tags merge, jkarcher, the method).

    Models are named by `display_name`, in the front matter and in the body alike. The front
    matter is YAML with non-ASCII names written as UTF-8 text.

    Args:
      title: the card's heading (the output directory's name).
      method, method_summary, method_citation: the merge method and what the registry says of it.
      models: (path or hub id, weight) of each merged model, in config order; a weight that is
        not a number varies by tensor, and the configuration shows it.
      base_model: the base model's path or hub id, if the merge used one.
      resolved_config: the config with every default filled in, shown as JSON.
      mergekit_config: the mergekit YAML the config was translated from, if any, shown as it is.
    """
    names = [display_name(path) for path, _ in models]
    base_name = display_name(base_model) if base_model else None
    front_matter = {
        "base_model": list(dict.fromkeys(([base_name] if base_name else []) + names)),
        "library_name": "transformers",
        "tags": ["merge", "jkarcher", method],
    }
    lines = ["---", yaml.safe_dump(front_matter, allow_unicode=True, sort_keys=False).rstrip()]
    lines += ["---", "", f"# {title}", ""]
    described = f"{method_summary} ({method_citation})" if method_citation else method_summary
    lines += [
        f"This model is a weight-space merge of {len(models)} models made with jkarcher, using "
        f"the `{method}` method: {described}.",
        "",
        "## Merged models",
        "",
    ]
    lines += [
        f"- `{name}` ({_weight_text(weight)})"
        for name, (_, weight) in zip(names, models, strict=True)
    ]
    if base_name:
        lines += ["", f"Base model: `{base_name}`."]
    lines += [
        "",
        "## Configuration",
        "",
        "The configuration with every default filled in:",
        "",
        "```json",
        json.dumps(resolved_config, indent=2, ensure_ascii=False),
        "```",
        "",
    ]
    if mergekit_config is not None:
        lines += [
            "It was translated from this mergekit configuration (also in mergekit_config.yml):",
            "",
            "```yaml",
            mergekit_config.rstrip("\n"),
            "```",
            "",
        ]
    return "\n".join(lines)


def _weight_text(weight: Any) -> str:
    if isinstance(weight, int | float):
        return f"weight {weight:g}"
    return "weight varying by tensor, as the configuration below gives it"
