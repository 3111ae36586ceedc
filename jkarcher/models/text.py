"""Text -> fixed-shape padded token batches, and a streaming loop over them.

A text file is tokenized once with the checkpoint's `tokenizer.json` (the `tokenizers` library,
no special tokens), cut into consecutive windows, and each window gets the special tokens that the
tokenizer puts at the start of a text (Llama's BOS; none for Qwen2). Batches are
(tokens [B, T] int32, mask [B, T] int32) with every batch the same shape, so the jitted forward
compiles once: the last window and the last batch are padded (mask 0).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from jkarcher.errors import JkarcherError


class TokenizerError(JkarcherError):
    """A checkpoint's tokenizer gives token ids that its model has no embedding for."""


def load_tokenizer(checkpoint_dir: str | os.PathLike) -> Tokenizer:
    """The `tokenizer.json` of an HF checkpoint directory."""
    path = Path(checkpoint_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json in the checkpoint directory")
    return Tokenizer.from_file(str(path))


def leading_special_tokens(tokenizer: Tokenizer) -> list[int]:
    """The special tokens the tokenizer's post-processor puts before a text (e.g. [BOS])."""
    encoding = tokenizer.encode("a", add_special_tokens=True)
    prefix = []
    for token, special in zip(encoding.ids, encoding.special_tokens_mask, strict=True):
        if not special:
            break
        prefix.append(token)
    return prefix


def text_windows(tokenizer: Tokenizer, text: str, seq_len: int) -> list[list[int]]:
    """Consecutive windows of at most `seq_len` tokens, each starting with the leading specials."""
    prefix = leading_special_tokens(tokenizer)
    body = seq_len - len(prefix)
    if body < 2:
        raise ValueError(f"seq_len={seq_len} leaves no room for text after {prefix}")
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return [prefix + ids[start : start + body] for start in range(0, len(ids), body)]


def batches(
    windows: list[list[int]], batch_size: int, seq_len: int, pad_id: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, mask) pairs of shape [batch_size, seq_len], right-padded, whole rows padded at
    the end of the last batch."""
    for start in range(0, len(windows), batch_size):
        tokens = np.full((batch_size, seq_len), pad_id, np.int32)
        mask = np.zeros((batch_size, seq_len), np.int32)
        for row, window in enumerate(windows[start : start + batch_size]):
            tokens[row, : len(window)] = window
            mask[row, : len(window)] = 1
        yield tokens, mask


def text_batches(
    checkpoint_dir: str | os.PathLike,
    text: str,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    drop_remainder: bool = False,
    vocab_size: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The text as batches for the checkpoint's tokenizer (at most `max_batches`).

    With `drop_remainder`, a last window shorter than `seq_len` and a last batch of fewer than
    `batch_size` windows are left out, so every batch holds batch_size * seq_len real tokens.

    Raises TokenizerError when a token id is `vocab_size` (the model's) or more: a tokenizer of
    another model, whose tokens would read no embedding and give NaN.
    """
    windows = text_windows(load_tokenizer(checkpoint_dir), text, seq_len)
    if vocab_size is not None:
        largest = max((max(window) for window in windows), default=-1)
        if largest >= vocab_size:
            raise TokenizerError(
                f"{Path(checkpoint_dir) / 'tokenizer.json'} gives token id {largest} on this "
                f"text, but the model's vocab_size (config.json) is {vocab_size}: the tokenizer "
                "is not the model's"
            )
    if drop_remainder:
        windows = [window for window in windows if len(window) == seq_len]
        windows = windows[: len(windows) - len(windows) % batch_size]
    if max_batches is not None:
        windows = windows[: max_batches * batch_size]
    return list(batches(windows, batch_size, seq_len))


def file_batches(
    checkpoint_dir: str | os.PathLike,
    text_file: str | os.PathLike,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`text_batches` of a UTF-8 text file, checked against the vocabulary of the checkpoint's
    config.json; a TokenizerError names the file."""
    from jkarcher.models.config import load_config

    try:
        return text_batches(
            checkpoint_dir,
            Path(text_file).read_text(encoding="utf-8"),
            seq_len=seq_len,
            batch_size=batch_size,
            max_batches=max_batches,
            vocab_size=load_config(checkpoint_dir).vocab_size,
        )
    except TokenizerError as err:
        raise TokenizerError(f"{text_file}: {err}") from None


def stream(
    step: Callable[..., Any], inputs: Iterable[tuple[np.ndarray, np.ndarray]]
) -> Iterator[tuple[Any, np.ndarray]]:
    """Run `step(tokens, mask)` on one batch at a time, yielding (its outputs, the mask).

    Each output is handed on before the next batch is run and is dropped once the caller moves
    on, so device memory holds one batch's activations however long the text is.
    """
    for tokens, mask in inputs:
        yield step(tokens, mask), mask
