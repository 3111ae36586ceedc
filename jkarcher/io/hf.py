"""What jkarcher knows of Hugging Face's conventions beyond the weights: hub ids found in the
local cache, the side files a model directory holds (tokenizer, generation config), and the
output's `config.json`.

The network is never used: a hub id resolves only to a snapshot already in the local cache.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jkarcher.io.checkpoint import CheckpointError, reading

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
GENERATION_FILES = ("generation_config.json",)


def resolve_checkpoint_dir(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a hub id (`org/name`) found in the local HF cache.

    The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`; the
    snapshot is the one `refs/main` points to, or the only one when there is no `refs/main`. The
    network is never used.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if is_hub_id(text):
        cache = _hub_cache_dir()
        repo = cache / ("models--" + text.replace("/", "--"))
        snapshot = _cached_snapshot(text, repo)
        if snapshot is not None:
            return snapshot
        raise CheckpointError(
            f"model {text!r}: no such directory, and not found in the local Hugging Face cache "
            f"({repo}); download it first (the merge never uses the network)"
        )
    raise CheckpointError(f"model {text!r}: no such directory")


def _hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join("~", ".cache", "huggingface")
    return Path(home).expanduser() / "hub"


def is_hub_id(text: str) -> bool:
    """Whether `text` has the form of a hub id, `org/name`, rather than of a local path."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~"))


def _cached_snapshot(repo_id: str, repo: Path) -> Path | None:
    """The snapshot of cached `repo` that `refs/main` names, else its only snapshot; None when
    the cache has no snapshot of it. A missing or ambiguous snapshot is an error that says so."""
    snapshots_dir, ref = repo / "snapshots", repo / "refs" / "main"
    with reading(repo):
        found = snapshots_dir.iterdir() if snapshots_dir.is_dir() else []
        names = sorted(p.name for p in found if p.is_dir())
        revision = ref.read_text().strip() if ref.is_file() else None
    listed = ", ".join(names) or "none"
    if revision is not None:
        if (snapshots_dir / revision).is_dir():
            return snapshots_dir / revision
        raise CheckpointError(
            f"model {repo_id!r}: {ref} names snapshot {revision!r}, which is not in "
            f"{snapshots_dir} (snapshots there: {listed}); download the model again, or pass "
            "one snapshot directory"
        )
    if len(names) > 1:
        raise CheckpointError(
            f"model {repo_id!r}: the local Hugging Face cache holds {len(names)} snapshots of it "
            f"({listed}) and no refs/main to choose one; pass one snapshot directory (e.g. "
            f"{snapshots_dir / names[-1]}) or write the revision to use into {ref}"
        )
    return snapshots_dir / names[0] if names else None


def copy_files(source: Path, destination: Path, names: Sequence[str]) -> None:
    """Copy those of `names` that exist in `source` (following links) into `destination`."""
    for name in names:
        if (source / name).is_file():
            shutil.copyfile(source / name, destination / name)


def side_files(copy_tokenizer: bool) -> tuple[str, ...]:
    """The files a merge copies from its template model: the generation config, and the
    tokenizer's files with `copy_tokenizer`."""
    return GENERATION_FILES + (TOKENIZER_FILES if copy_tokenizer else ())


def output_model_config(source: Mapping[str, Any], dtype_name: str, tie_embeddings: bool) -> dict:
    """The output's `config.json`: the source model's, with the output dtype and tying stated.

    Both the current `dtype` key and the older `torch_dtype` (when the source has it) are set.
    """
    config = dict(source)
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    config["tie_word_embeddings"] = tie_embeddings
    return config
