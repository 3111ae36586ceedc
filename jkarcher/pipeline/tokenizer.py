"""The output's vocabulary for `tokenizer_source`, and each model's embedding rows in its order.

`tokenizer_source` (mergekit 0.1.5's `build_tokenizer` and `PermutedVocabulary`, read for their
semantics):

- a model's path: the output has that model's tokenizer, all its tokens;
- "base": the template model's tokenizer (the base model, else the first model);
- "union": the template model's tokens, then the tokens of the other models that it lacks (model
  by model in order, each in the order of its ids), then the added tokens of all models that it
  still lacks (those of the template first); each appended to its tokenizer.json.

Only a model's tokens of id below its number of embedding rows count as its tokens. Every vocabulary
tensor (embed_tokens, lm_head) of every model is then read in the output's token order
(`VocabularyRows`): a token the model has is its own row; a token it lacks is the row of the one
model that has it, else of the template model where it has it, else the mean of the rows of the
models that have it, else zeros; the models here are those the tensor is merged from (in a merge by
slices, its slice's), as in mergekit. The tokens of `config.tokens` are appended where the
vocabulary lacks them, and their rows made as each entry says (`jkarcher.config.tokens`); with
`pad_to_multiple_of`, rows past the tokens are each model's mean row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jkarcher.config import ConfigError, MergeConfig
from jkarcher.errors import MergeError
from jkarcher.io import CheckpointReader, StoredTensor
from jkarcher.io.hf import resolve_checkpoint_dir
from jkarcher.io.tokenizer_files import ModelTokens, read_tokens
from jkarcher.pipeline.tasks import TensorSettings, TensorTask
from jkarcher.pipeline.vocab import EMBED_SUFFIX, embedding_name
from jkarcher.pipeline.vocab_rows import VocabularyRows

FIELD = "tokenizer_source"
NEW_TOKEN = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True}


@dataclasses.dataclass(frozen=True)
class OutputVocabulary:
    """The output's tokens, `vocab` (token -> id, ids 0 .. n - 1): the tokenizer in `source`
    with the `added` entries (of tokenizer.json's added_tokens) appended; `own[i][t]`, input
    i's row of output token t, -1 where it lacks it; `template_index`, the template input;
    `configured[t]`, for the tokens of `config.tokens` (whose ids are `configured_ids`), the
    (input, row) pairs whose mean is token t's row in the inputs that lack it (in all, for a
    forced token); `rows`, the output's embedding rows: the tokens, then padding rows."""

    vocab: Mapping[str, int]
    source: Path
    added: tuple[Mapping[str, Any], ...]
    own: tuple[np.ndarray, ...]
    template_index: int
    configured: Mapping[int, tuple[tuple[int, int], ...]]
    configured_ids: frozenset[int]
    rows: int

    def task(
        self,
        config: MergeConfig,
        name: str,
        infos: Sequence[StoredTensor],
        n_models: int,
        settings: TensorSettings,
        labels: Sequence[str],
        chosen: Sequence[int] | None = None,
    ) -> TensorTask:
        """The task of vocabulary tensor `name`, from `infos`, every input's tensor (in the order
        of `plan_vocabulary`'s inputs, `labels` theirs): the tensors of the inputs `chosen` (its
        `n_models` models, then its base; unless given, every input in order) read in the
        output's token order, the rows of tokens an input lacks filled from those of the chosen
        inputs that have them (as mergekit fills them from the tensors it merges)."""
        chosen = list(range(len(infos)) if chosen is None else chosen)
        for info, label in zip(infos, labels, strict=True):
            if len(info.shape) != 2 or info.shape[1:] != infos[0].shape[1:]:
                raise MergeError(
                    f"tensor {name!r} has shape {list(info.shape)} in {label} ({info.file}) but "
                    f"{list(infos[0].shape)} in {labels[0]} ({infos[0].file})"
                )
            if not jnp.issubdtype(info.dtype, jnp.floating):
                raise MergeError(f"tensor {name!r} is {info.dtype} in {label} ({info.file})")
        shape = (self.rows, infos[0].shape[1])
        fills = self._fills(chosen)
        views = [
            VocabularyRows(tuple(infos), i, self.own[i], fills, len(self.vocab), shape)
            for i in chosen
        ]
        return TensorTask(
            name=name,
            shape=shape,
            source_dtype=np.dtype(np.float32),
            out_dtype=np.dtype(config.out_dtype),
            sources=tuple(views[:n_models]),
            base=views[n_models] if len(views) > n_models else None,
            extra_rows=None,
            settings=settings,
            floating=True,
        )

    def _fills(self, chosen: Sequence[int]) -> dict[int, tuple[tuple[int, int], ...]]:
        """For each token a chosen input lacks, the (input, row) pairs whose mean is its row
        there: `configured`'s, else of the chosen inputs that have it (`_fills`)."""
        template = chosen.index(self.template_index) if self.template_index in chosen else None
        own = [self.own[i] for i in chosen]
        fills = {
            token: tuple((chosen[i], row) for i, row in pairs)
            for token, pairs in _fills(own, template, self.configured_ids).items()
        }
        return fills | dict(self.configured)


def plan_vocabulary(
    config: MergeConfig,
    inputs: Sequence[CheckpointReader],
    paths: Sequence[str],
    template_index: int,
) -> OutputVocabulary:
    """The output vocabulary for `config.tokenizer_source` ("base", "union" or a model's path)
    and `config.tokens`, and the row maps of `inputs` (the models, then the base; in a merge by
    slices, every checkpoint once), given in the config as `paths`; `inputs[template_index]` is
    the template model."""
    setting = config.tokenizer_source
    tokens = [read_tokens(c.path, FIELD) for c in inputs]
    rows = [_rows(c) for c in inputs]
    template = tokens[template_index]
    if setting in ("base", "union"):
        _check_within(template, rows[template_index], inputs[template_index].path)
        vocab, source = dict(template.vocab), template.directory
    else:
        source = resolve_checkpoint_dir(setting)
        vocab = dict(read_tokens(source, FIELD).vocab)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ConfigError(f"{FIELD}: the ids of {source}'s tokenizer are not 0 .. n - 1")
    added: list[Mapping[str, Any]] = []
    if setting == "union":
        order = [template_index] + [i for i in range(len(inputs)) if i != template_index]
        for i in order[1:]:
            for token in tokens[i].by_id(rows[i]):
                if token not in vocab and token not in tokens[i].added:
                    added.append({"content": token, **NEW_TOKEN, "special": False})
                    vocab[token] = len(vocab)
        for i in order:
            for token in tokens[i].by_id(rows[i]):
                if token not in vocab:
                    added.append(dict(tokens[i].added[token]))
                    vocab[token] = len(vocab)
    for token in config.tokens:
        if token not in vocab:
            added.append({"content": token, **NEW_TOKEN, "special": False})
            vocab[token] = len(vocab)
    own = tuple(_own_rows(vocab, t, r) for t, r in zip(tokens, rows, strict=True))
    configured = {}
    for token, entry in config.tokens.items():
        fill = _configured_fill(token, entry, vocab[token], paths, own, tokens, rows)
        if fill is not None:
            configured[vocab[token]] = fill
        if entry["force"]:
            for model_rows in own:
                model_rows[vocab[token]] = -1
    size = len(vocab)
    if config.pad_to_multiple_of:
        size = -(-size // config.pad_to_multiple_of) * config.pad_to_multiple_of
    configured_ids = frozenset(vocab[t] for t in config.tokens)
    return OutputVocabulary(
        vocab, source, tuple(added), own, template_index, configured, configured_ids, size
    )


def _rows(checkpoint: CheckpointReader) -> int:
    name = embedding_name(checkpoint)
    if name is None:
        raise ConfigError(f"{FIELD}: {checkpoint.path} has no tensor ending in {EMBED_SUFFIX}")
    return checkpoint.info(name).shape[0]


def _check_within(tokens: ModelTokens, rows: int, path: Path) -> None:
    beyond = [t for t, i in tokens.vocab.items() if i >= rows]
    if beyond:
        raise ConfigError(
            f"{FIELD}: the tokenizer of {path} has {len(beyond)} tokens beyond its {rows} "
            f"embedding rows (e.g. {beyond[0]!r}); its vocabulary cannot be the output's"
        )


def _own_rows(vocab: Mapping[str, int], tokens: ModelTokens, rows: int) -> np.ndarray:
    """Each output token's row in one model (its id there), -1 where it lacks it."""
    own = np.full(len(vocab), -1, dtype=np.int64)
    for token, out_id in vocab.items():
        model_id = tokens.vocab.get(token, -1)
        if 0 <= model_id < rows:
            own[out_id] = model_id
    return own


def _fills(
    own: Sequence[np.ndarray], template_index: int | None, configured: frozenset[int]
) -> dict:
    """For each token some model lacks (but those of `configured` ids): the row of the one
    model that has it, else of the template model (if among them) where it has it, else the
    rows of all that have it (their mean); none of them (zeros) where no model has it."""
    has = np.stack(own) >= 0
    fills = {}
    for token in np.flatnonzero(~has.all(axis=0)):
        if int(token) in configured:
            continue
        holders = [int(i) for i in np.flatnonzero(has[:, token])]
        if len(holders) > 1 and template_index is not None and has[template_index, token]:
            holders = [template_index]
        fills[int(token)] = tuple((i, int(own[i][token])) for i in holders)
    return fills


def _configured_fill(
    token: str,
    entry: Mapping[str, Any],
    out_id: int,
    paths: Sequence[str],
    own: Sequence[np.ndarray],
    tokens: Sequence[ModelTokens],
    rows: Sequence[int],
) -> tuple[tuple[int, int], ...] | None:
    """The (input, row) pairs that make a `tokens` entry's row (none: zeros); None where no
    model needs it (all have the token, and it is not forced)."""
    where = f"tokens[{token!r}].source"
    source = entry["source"]
    if source is None:
        lacking = [paths[i] for i, r in enumerate(own) if r[out_id] < 0]
        if lacking:
            raise ConfigError(f"{where}: needed, as {lacking[0]} lacks the token")
        return None
    if source["kind"] == "zero":
        return ()
    if source["model"] not in paths:
        raise ConfigError(f"{where}: {source['model']} is not one of the merged models")
    index = paths.index(source["model"])
    if source["kind"] == "model":
        row = int(own[index][out_id])
    elif "token_id" in source:
        row = source["token_id"]
    else:
        row = tokens[index].vocab.get(source["token"], -1)
    if not 0 <= row < rows[index]:
        raise ConfigError(
            f"{where}: {source['model']} has no such token among its {rows[index]} rows "
            f"({source.get('token', source.get('token_id', token))!r})"
        )
    return ((index, row),)
