"""The README.md model card of a merged checkpoint: YAML front matter and the resolved config."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def model_card(
    title: str,
    method: str,
    method_summary: str,
    method_reference: str,
    models: Sequence[tuple[str, Any]],
    base_model: str | None,
    resolved_config: Mapping[str, Any],
) -> str:
    """Markdown with Hugging Face front matter (base_model list; tags merge, jkarcher, the method).

    Args:
      title: the card's heading (the output directory's name).
      method, method_summary, method_reference: the merge method and what the registry says of it.
      models: (path or hub id, weight) of each merged model, in config order; a weight that is
        not a number varies by tensor, and the configuration shows it.
      base_model: the base model's path or hub id, if the merge used one.
      resolved_config: the config with every default filled in, shown as JSON.
    """
    bases = list(dict.fromkeys(([base_model] if base_model else []) + [m for m, _ in models]))
    lines = ["---", "base_model:"]
    lines += [f"- {json.dumps(b)}" for b in bases]
    lines += ["library_name: transformers", "tags:", "- merge", "- jkarcher", f"- {method}", "---"]
    lines += ["", f"# {title}", ""]
    described = f"{method_summary} ({method_reference})" if method_reference else method_summary
    lines += [
        f"This model is a weight-space merge of {len(models)} models made with jkarcher, using "
        f"the `{method}` method: {described}.",
        "",
        "## Merged models",
        "",
    ]
    lines += [f"- `{path}` ({_weight_text(weight)})" for path, weight in models]
    if base_model:
        lines += ["", f"Base model: `{base_model}`."]
    lines += [
        "",
        "## Configuration",
        "",
        "The configuration with every default filled in:",
        "",
        "```json",
        json.dumps(resolved_config, indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


def _weight_text(weight: Any) -> str:
    if isinstance(weight, int | float):
        return f"weight {weight:g}"
    return "weight varying by tensor, as the configuration below gives it"
