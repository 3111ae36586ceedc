"""A merge's inputs, opened, and the runs of output layers that each merges (docs/design.md,
"Data flow").

Every merge is a merge by slices, as mergekit plans one: a plain merge (`config.models`) is the
one slice that covers every layer of its models, each output layer from the same layer of each
model and its base; a merge by slices (`config.slices`, `jkarcher.config.slices`) stacks its
slices, slice s's k-th layer from layer start + k of each of its models (and of its base). Each
slice is a `Piece`: its inputs, where its layers start in each, and the merge that makes its
tensors (its models' weights, its base and its params). `jkarcher.pipeline.routes` then finds
each output tensor's sources from the pieces.

The inputs are opened once each: a plain merge's models and then its base, labelled 'model 1
(PATH)' and 'the base model (PATH)'; the checkpoints of a merge by slices once per path and LoRA
adapter, the template first (the first slice's base, else its first model), labelled by the first
field that names them ('slices[1].models[0] (PATH)'). The output takes its config, vocabulary and
tokenizer from the template: `inputs.template`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping
from typing import Any

from jkarcher.architecture import (
    LAYER_COUNT,
    LAYER_COUNT_KEYS,
    NESTED_CONFIGS,
    layer_count,
    layer_count_key,
)
from jkarcher.config import ConfigError, MergeConfig
from jkarcher.config.schema import Slice, SliceBase, SliceModel
from jkarcher.io import CheckpointError, CheckpointReader
from jkarcher.pipeline.tasks import open_input

LAYER_TYPES = "layer_types"  # the config.json field of each layer's kind (attention pattern)
# A checkpoint of the slices: its path and the LoRA adapter applied to it (or None).
Key = tuple[str, str | None]


@dataclasses.dataclass(frozen=True)
class Piece:
    """A run of consecutive output layers merged alike: one slice.

    Its `num_layers` layers are merged by `config` (the slice's models' weights, its base and
    its params, over the shared params) from the inputs `inputs` (indices into `Inputs.readers`:
    its `n_models` models, then its base), layer k from layer `starts[j] + k` of input j.
    `field` names the slice in messages ('slices[1]'; '' for a plain merge), and `labels` its
    inputs ('slices[1].models[0] (PATH)').
    """

    config: MergeConfig
    field: str
    inputs: tuple[int, ...]
    labels: tuple[str, ...]
    n_models: int
    starts: tuple[int, ...]
    num_layers: int

    @property
    def template_at(self) -> int:
        """Where in `inputs` the input is whose layers give the piece's layers their tensors:
        its base, else its first model."""
        return self.n_models if len(self.inputs) > self.n_models else 0


@dataclasses.dataclass(frozen=True)
class Inputs:
    """A merge's checkpoints, each opened once, and its pieces.

    `models` and `base` are what the plan reports (a merge by slices has every checkpoint as a
    model and no base); `labels` name `readers` (the models, then the base) in messages;
    `compared` is each reader's config.json as the architectures are compared (without its layer
    count in a merge by slices, whose models may differ in depth); `config_updates` are the
    output's config.json fields that are not the template's (a merge by slices' layer count).
    """

    models: tuple[CheckpointReader, ...]
    base: CheckpointReader | None
    labels: tuple[str, ...]
    paths: tuple[str, ...]
    pieces: tuple[Piece, ...]
    compared: tuple[Mapping[str, Any], ...]
    config_updates: Mapping[str, Any]

    @functools.cached_property
    def readers(self) -> tuple[CheckpointReader, ...]:
        return (*self.models, *([self.base] if self.base is not None else []))

    @property
    def template_index(self) -> int:
        return len(self.models) if self.base is not None else 0

    @property
    def template(self) -> CheckpointReader:
        return self.readers[self.template_index]


def open_inputs(config: MergeConfig) -> Inputs:
    """The inputs of `config`, opened (headers only), with its pieces, and the layer ranges of a
    merge by slices checked against each model's layers. An error names the field."""
    return _slice_inputs(config) if config.slices else _plain_inputs(config)


def _plain_inputs(config: MergeConfig) -> Inputs:
    """A plain merge: its models and base, one piece of every layer of the template."""
    models = tuple(
        open_input(entry.path, f"models[{i}]", entry.lora) for i, entry in enumerate(config.models)
    )
    base = None if config.base_model is None else open_input(config.base_model, "base_model")
    labels = [f"model {i} ({c.source})" for i, c in enumerate(models)]
    if base is not None:
        labels.append(f"the base model ({base.source})")
    readers = (*models, *([base] if base is not None else []))
    template = base or models[0]
    count = valid_count(layer_count(template.config))
    if count is None and config.varies_by_layer:
        raise ConfigError(
            f"values that vary over the layers need the layer count: {template.path} states no "
            f"{LAYER_COUNT} (a positive integer) in its config.json"
        )
    paths = [entry.path for entry in config.models] + [config.base_model] * (base is not None)
    everyone = tuple(range(len(readers)))
    piece = Piece(config, "", everyone, tuple(labels), len(models), (0,) * len(readers), count or 0)
    return Inputs(
        models=models,
        base=base,
        labels=tuple(labels),
        paths=tuple(paths),
        pieces=(piece,),
        compared=tuple(c.config for c in readers),
        config_updates={},
    )


def _slice_inputs(config: MergeConfig) -> Inputs:
    """A merge by slices: each checkpoint once, the template first; a piece per slice."""
    fields: dict[Key, str] = {}
    for i, piece in enumerate(config.slices):
        if i == 0 and piece.base_model:
            fields.setdefault(_key(piece.base_model), f"slices[{i}].base_model")
        for field, entry in _entries(piece, i):
            fields.setdefault(_key(entry), field)
    opened = {key: open_input(key[0], field, key[1]) for key, field in fields.items()}
    index = {key: i for i, key in enumerate(opened)}
    _check_layer_ranges(config.slices, opened)
    pieces = []
    for i, piece in enumerate(config.slices):
        entries = list(_entries(piece, i))
        pieces.append(
            Piece(
                config=slice_config(config, i),
                field=f"slices[{i}]",
                inputs=tuple(index[_key(entry)] for _, entry in entries),
                labels=tuple(f"{field} ({opened[_key(e)].source})" for field, e in entries),
                n_models=len(piece.models),
                starts=tuple(entry.layer_range[0] for _, entry in entries),
                num_layers=piece.num_layers,
            )
        )
    readers = tuple(opened.values())
    template = readers[0]
    updates = _layer_updates(config.slices, opened, template) if template.config else {}
    return Inputs(
        models=readers,
        base=None,
        labels=tuple(f"{fields[key]} ({reader.source})" for key, reader in opened.items()),
        paths=tuple(path for path, _ in opened),
        pieces=tuple(pieces),
        compared=tuple(_stating_layer_count(r.config, None) for r in readers),
        config_updates=updates,
    )


def slice_config(config: MergeConfig, index: int) -> MergeConfig:
    """Slice `index` as a merge of its own: its models, base model and params."""
    piece = config.slices[index]
    base = piece.base_model.path if piece.base_model else None
    return dataclasses.replace(
        config, models=piece.models, base_model=base, params=piece.params, slices=()
    )


def valid_count(count: Any) -> int | None:
    """A stated layer count that is a positive integer, else None."""
    if isinstance(count, int) and not isinstance(count, bool) and count >= 1:
        return count
    return None


def _key(entry: SliceModel | SliceBase) -> Key:
    """The checkpoint an entry reads: its path and its LoRA adapter (a base has none)."""
    return entry.path, entry.lora if isinstance(entry, SliceModel) else None


def _entries(piece: Slice, index: int) -> Iterator[tuple[str, SliceModel | SliceBase]]:
    """(field, entry) of a slice's models, then of its base."""
    for j, model in enumerate(piece.models):
        yield f"slices[{index}].models[{j}]", model
    if piece.base_model:
        yield f"slices[{index}].base_model", piece.base_model


def _check_layer_ranges(
    slices: tuple[Slice, ...], checkpoints: Mapping[Key, CheckpointReader]
) -> None:
    """Every layer range within its model's layers (num_hidden_layers of its config.json)."""
    for i, piece in enumerate(slices):
        for field, entry in _entries(piece, i):
            path, (start, end) = entry.path, entry.layer_range
            count = valid_count(layer_count(checkpoints[_key(entry)].config))
            if count is None:
                raise ConfigError(
                    f"{field}.layer_range: {path} states no {LAYER_COUNT} (a positive integer) "
                    "in its config.json, which a layer range is checked against"
                )
            if end > count:
                raise ConfigError(
                    f"{field}.layer_range: [{start}, {end}) is outside the {count} layers of "
                    f"{path} (layers 0 .. {count - 1})"
                )


def _layer_updates(
    slices: tuple[Slice, ...],
    checkpoints: Mapping[Key, CheckpointReader],
    template: CheckpointReader,
) -> dict[str, Any]:
    """The output's layer count and, where the template states them, its layers' kinds, each
    from the first model of the layer's slice."""
    stated = _stating_layer_count(template.config, sum(piece.num_layers for piece in slices))
    updates = {k: v for k, v in stated.items() if k in (*LAYER_COUNT_KEYS, *NESTED_CONFIGS)}
    if isinstance(template.config.get(LAYER_TYPES), list):
        kinds = []
        for piece in slices:
            model = piece.models[0]
            stated = checkpoints[_key(model)].config.get(LAYER_TYPES)
            start, end = model.layer_range
            if not isinstance(stated, list) or len(stated) < end:
                raise CheckpointError(
                    f"{model.path}: config.json states no {LAYER_TYPES} for layers {start} .. "
                    f"{end - 1}, which the template {template.path} states for each layer"
                )
            kinds += stated[start:end]
        updates[LAYER_TYPES] = kinds
    return updates


def _stating_layer_count(config: Mapping[str, Any], count: int | None) -> dict[str, Any]:
    """A config.json with `count` as its layer count where it states one (at the top level, or
    in a nested `text_config`), or without it (count None), so that models of different
    depths compare equal otherwise."""
    result = dict(config)
    nested = [n for n in NESTED_CONFIGS if isinstance(result.get(n), Mapping)]
    for key, inner in [(None, result), *((n, dict(result[n])) for n in nested)]:
        if key_of_count := layer_count_key(inner):
            if count is None:
                del inner[key_of_count]
            else:
                inner[key_of_count] = count
        if key is not None:
            result[key] = inner
    return result
