"""The vocabulary tensors of a merge: embedding rows that differ in number, and tied embeddings.

- Embeddings and lm_head of different vocabulary sizes: the rows that all models have are
  merged; the output has the template model's vocabulary (the base model, else the first), its
  further rows copied from that model (`shared_rows`).
- Tied embeddings stay tied: no lm_head is written when the template model ties it; when that
  model has its own lm_head, a model that ties contributes its embedding matrix instead
  (`source_info`).
"""

from __future__ import annotations

from collections.abc import Sequence

from jkarcher.errors import MergeError
from jkarcher.io import CheckpointReader, StoredTensor

EMBED_SUFFIX = "embed_tokens.weight"
LM_HEAD_NAME = "lm_head.weight"
VOCAB_SUFFIXES = (EMBED_SUFFIX, LM_HEAD_NAME)


def ties_embeddings(checkpoint: CheckpointReader) -> bool:
    """Whether a model's lm_head is its input embedding: its config says so, or it stores none."""
    if embedding_name(checkpoint) is None:
        return False
    if LM_HEAD_NAME not in checkpoint:
        return True
    return bool(checkpoint.config.get("tie_word_embeddings", False))


def embedding_name(checkpoint: CheckpointReader) -> str | None:
    """The name of a model's input embedding (the tensor ending in embed_tokens.weight)."""
    return next((n for n in checkpoint.names() if n.endswith(EMBED_SUFFIX)), None)


def source_info(checkpoint: CheckpointReader, name: str) -> StoredTensor:
    """The tensor a model contributes for `name`: a tying model gives its embedding as lm_head."""
    if name == LM_HEAD_NAME and ties_embeddings(checkpoint):
        return checkpoint.info(embedding_name(checkpoint))
    return checkpoint.info(name)


def shared_rows(
    name: str, infos: Sequence[StoredTensor], labels: Sequence[str], template_index: int
) -> tuple[int | None, str | None]:
    """None when all shapes agree; for vocabulary tensors that differ only in their number of
    rows, the number of rows all share (and a warning saying what happens to the others).

    Any other difference of shape is a MergeError naming the tensor, both models and files.
    """
    template = infos[template_index]
    odd = next((i for i, info in enumerate(infos) if info.shape != template.shape), None)
    if odd is None:
        return None, None
    vocabulary = name.endswith(VOCAB_SUFFIXES) and all(
        len(i.shape) >= 1 and i.shape[1:] == template.shape[1:] for i in infos
    )
    if not vocabulary:
        raise MergeError(
            f"tensor {name!r} has shape {list(infos[odd].shape)} in {labels[odd]} "
            f"({infos[odd].file}) but {list(template.shape)} in {labels[template_index]} "
            f"({template.file})"
        )
    rows = min(i.shape[0] for i in infos)
    sizes = ", ".join(f"{label}: {i.shape[0]}" for label, i in zip(labels, infos, strict=True))
    fate = (
        f"rows {rows}..{template.shape[0] - 1} are copied from {labels[template_index]}"
        if rows < template.shape[0]
        else f"the output keeps the {rows} rows of {labels[template_index]}"
    )
    return rows, (
        f"tensor {name!r}: vocabulary sizes differ ({sizes}); the first {rows} rows are merged, "
        f"{fate}, and rows beyond that in other models are dropped"
    )
