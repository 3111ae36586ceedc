"""The table of merge methods for the README, generated from the registry."""

from __future__ import annotations

from urllib.parse import urlsplit

from jkarcher.methods.registry import REQUIRED, MergeMethod, Param, get, names

_HEADER = (
    "| Method | What it does | Base model | Models | Uses weights | Parameters (defaults) "
    "| Reference |",
    "|---|---|---|---|---|---|---|",
)


def methods_table_markdown() -> str:
    """One Markdown table row per registered method, sorted by name."""
    rows = [_row(get(name)) for name in names()]
    return "\n".join((*_HEADER, *rows))


def _row(method: MergeMethod) -> str:
    name = f"`{method.name}`" + (" (random)" if method.random else "")
    need = "required" if method.tensor_inputs_required else "optional"
    inputs = [f"`{name}` (tensors per model, {need})" for name in method.tensor_inputs]
    params = ", ".join([_param(p) for p in method.params] + inputs) or "none"
    cells = (
        name,
        method.summary,
        method.base,
        _models(method),
        "yes" if method.weighted else "no",
        params,
        _citation(method.citation),
    )
    return "| " + " | ".join(cells) + " |"


def _param(p: Param) -> str:
    default = "required" if p.default is REQUIRED else repr(p.default)
    return f"`{p.name}`={default}" + (" (per model)" if p.per_model else "")


def _models(method: MergeMethod) -> str:
    if method.max_models == method.min_models:
        return str(method.min_models)
    if method.max_models is None:
        return f">= {method.min_models}"
    return f"{method.min_models}-{method.max_models}"


def _citation(citation: str) -> str:
    if citation.startswith("https://arxiv.org/abs/"):
        return f"[arXiv:{citation.removeprefix('https://arxiv.org/abs/')}]({citation})"
    if citation.startswith("https://"):
        return f"[{urlsplit(citation).netloc}]({citation})"
    return citation
