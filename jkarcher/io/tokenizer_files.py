"""A model's tokenizer as a vocabulary, read from its `tokenizer.json` with the `tokenizers`
library, and the output's `tokenizer.json` with tokens appended to it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from jkarcher.io.checkpoint import CheckpointError, reading

TOKENIZER_JSON = "tokenizer.json"
# Files of a slow tokenizer, which no longer describe a vocabulary that tokens were added to.
SLOW_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


@dataclasses.dataclass(frozen=True)
class ModelTokens:
    """A tokenizer's vocabulary: `vocab`, token -> id (its model's tokens and its added ones);
    `added`, its added tokens as `tokenizer.json` lists them (content -> entry)."""

    directory: Path
    vocab: Mapping[str, int]
    added: Mapping[str, Mapping[str, Any]]

    def by_id(self, below: int) -> list[str]:
        """The tokens of id < `below`, in the order of their ids."""
        return sorted((t for t, i in self.vocab.items() if i < below), key=self.vocab.__getitem__)


def read_tokens(directory: Path, field: str) -> ModelTokens:
    """The vocabulary of the tokenizer in `directory` (its tokenizer.json); `field` names the
    setting that needs it in errors."""
    path = directory / TOKENIZER_JSON
    with reading(path):
        if not path.is_file():
            raise CheckpointError(f"{directory}: has no {TOKENIZER_JSON}, which {field} reads")
        text = path.read_text(encoding="utf-8")
    try:
        tokenizer = tokenizers.Tokenizer.from_str(text)
        entries = json.loads(text).get("added_tokens") or []
    except Exception as err:  # the library's own error types are not exported
        raise CheckpointError(f"{path}: not a tokenizer ({err})") from None
    return ModelTokens(
        directory,
        tokenizer.get_vocab(with_added_tokens=True),
        {entry["content"]: entry for entry in entries},
    )


def write_tokenizer(
    destination: Path, source: Path, added: Sequence[Mapping[str, Any]], vocab: Mapping[str, int]
) -> None:
    """`source`'s tokenizer.json with the `added` tokens (entries of `added_tokens`) appended,
    written into `destination`; each token must get the id `vocab` gives it."""
    tokenizer = tokenizers.Tokenizer.from_file(str(source / TOKENIZER_JSON))
    tokenizer.add_tokens([_added_token(entry) for entry in added])
    for entry in added:
        given = tokenizer.token_to_id(entry["content"])
        if given != vocab[entry["content"]]:
            raise CheckpointError(
                f"{source / TOKENIZER_JSON}: token {entry['content']!r} was added as id {given}, "
                f"not {vocab[entry['content']]}; its ids are not 0 .. n - 1"
            )
    tokenizer.save(str(destination / TOKENIZER_JSON))
    for name in SLOW_TOKENIZER_FILES:
        (destination / name).unlink(missing_ok=True)


def _added_token(entry: Mapping[str, Any]) -> tokenizers.AddedToken:
    return tokenizers.AddedToken(
        entry["content"],
        single_word=entry.get("single_word", False),
        lstrip=entry.get("lstrip", False),
        rstrip=entry.get("rstrip", False),
        normalized=entry.get("normalized", True),
        special=entry.get("special", False),
    )
