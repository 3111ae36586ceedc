"""The plan of a merge by slices (`config.slices`; docs/design.md, "Data flow").

Each output tensor gets its sources from one slice, named in each input by its own layer:
output layer (the layers of the slices before) + k of slice s comes from layer start + k of
each model of s (and of its base), for k = 0 .. N - 1 of the slice's N layers, and merges with
the slice's weights and params at position k / (N - 1) along the slice (1 when N = 1), as
mergekit numbers and places them. The tensors outside the layers come, at position 0, from the
first slice's models when they precede the layers (the input embeddings) and from the last
slice's otherwise (the final norm, lm_head), as mergekit's pre- and post-layer weights do. With
`tokenizer_source`, the output vocabulary is built from every checkpoint of the slices, the
template first (`jkarcher.pipeline.tokenizer`), and the vocabulary tensors read in its order.
A model of a slice with a LoRA adapter (its `lora`) is read with it applied; the same
checkpoint without the adapter is another input.

The output's config.json is the template's (the first slice's base model, else its first
model) with the layer count of all slices together, and `layer_types`, where the template
states it, taken layer by layer from the models the layers come from. The rest of the pipeline
(read, leaf, write) runs the tasks as those of any merge.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

from jkarcher import methods
from jkarcher.architecture import (
    LAYER_COUNT,
    LAYER_COUNT_KEYS,
    NESTED_CONFIGS,
    check_architectures,
    layer_count,
    layer_count_key,
)
from jkarcher.config import ConfigError, MergeConfig, tensor_values
from jkarcher.config.schema import Slice, SliceBase, SliceModel
from jkarcher.errors import MergeError
from jkarcher.io import CheckpointError, CheckpointReader, StoredTensor
from jkarcher.io.chat_template import chosen_chat_template
from jkarcher.io.output_dir import check_output_dir
from jkarcher.io.writer import natural_key
from jkarcher.pipeline.tasks import (
    MergePlan,
    TensorSettings,
    TensorTask,
    open_input,
    output_shards,
    plan_mesh,
    plan_tensor,
)
from jkarcher.pipeline.tokenizer import OutputVocabulary, plan_vocabulary
from jkarcher.pipeline.vocab import LM_HEAD_NAME, VOCAB_SUFFIXES, source_info, ties_embeddings

LAYER_TYPES = "layer_types"  # the config.json field of each layer's kind (attention pattern)
# Dotted parts of the names of the tensors before the first layer (mergekit's pre-layer weights).
INPUT_SIDE = frozenset({"embed_tokens", "embed_in", "embeddings", "embedding_norm", "wte", "wpe"})
# A checkpoint of the slices: its path and the LoRA adapter applied to it (or None).
Key = tuple[str, str | None]


@dataclasses.dataclass(frozen=True)
class _Source:
    """One input of an output tensor: the checkpoint, the tensor's name there, and its label."""

    checkpoint: CheckpointReader
    name: str
    label: str


def plan_slices(config: MergeConfig) -> MergePlan:
    """`plan_merge` for a config with slices: every output tensor with its sources from one
    slice, the checks of `plan_merge` (outputs, architectures, names, shapes, dtypes), and the
    layer ranges checked against each model's layers; any problem is an error before anything
    is written."""
    inputs = _open_inputs(config.slices)
    by_key = {key: reader for key, (_, reader) in inputs.items()}
    readers = tuple(by_key.values())
    labels = tuple(f"{field} ({reader.source})" for field, reader in inputs.values())
    check_output_dir(config.output, [r.path for r in readers], config.overwrite)
    template = readers[0]
    if not template.config:
        raise CheckpointError(
            f"{template.path}: has no config.json; the output's config is copied from the first "
            "slice's base model (or its first model), so that one needs it"
        )
    _check_layer_ranges(config.slices, by_key)
    tie = ties_embeddings(template)
    warnings = check_architectures(
        [_stating_layer_count(r.config, None) for r in readers],
        labels,
        [ties_embeddings(r) for r in readers],
        config.allow_crimes,
    )
    vocabulary = None
    if config.tokenizer_source is not None:
        vocabulary = plan_vocabulary(config, readers, [path for path, _ in by_key], 0)
    tasks = []
    for out_name, index, sources, base, position in _output_tensors(
        config.slices, by_key, template, tie
    ):
        if vocabulary is not None and out_name.endswith(VOCAB_SUFFIXES):
            task = _vocabulary_task(
                config, vocabulary, readers, labels, index, out_name, sources, base
            )
            warning = None
        else:
            task, warning = _task(config, index, out_name, sources, base, position, template)
        tasks.append(task)
        warnings += [warning] if warning else []
    tasks.sort(key=lambda task: natural_key(task.name))
    shards = output_shards(config, tasks)
    return MergePlan(
        config=config,
        method=methods.get(config.method),
        models=readers,
        base=None,
        labels=labels,
        statistic_labels=(),
        tie_embeddings=tie,
        tasks=tuple(tasks),
        shards=shards,
        warnings=tuple(warnings),
        mesh=plan_mesh(config),
        config_updates=_config_updates(config.slices, by_key, template)
        | ({} if vocabulary is None else {"vocab_size": vocabulary.rows}),
        chat_template=chosen_chat_template(config.chat_template, [r.path for r in readers]),
        vocabulary=vocabulary,
    )


def slice_config(config: MergeConfig, index: int) -> MergeConfig:
    """Slice `index` as a merge of its own: its models, base model and params."""
    piece = config.slices[index]
    base = piece.base_model.path if piece.base_model else None
    return dataclasses.replace(
        config, models=piece.models, base_model=base, params=piece.params, slices=()
    )


def _key(entry: SliceModel | SliceBase) -> Key:
    """The checkpoint an entry reads: its path and its LoRA adapter (a base has none)."""
    return entry.path, entry.lora if isinstance(entry, SliceModel) else None


def _open_inputs(slices: tuple[Slice, ...]) -> dict[Key, tuple[str, CheckpointReader]]:
    """Each distinct checkpoint (path and adapter) once, with the first field that names it;
    the template first (the first slice's base model, else its first model)."""
    fields: dict[Key, str] = {}
    for i, piece in enumerate(slices):
        if i == 0 and piece.base_model:
            fields.setdefault(_key(piece.base_model), f"slices[{i}].base_model")
        for j, model in enumerate(piece.models):
            fields.setdefault(_key(model), f"slices[{i}].models[{j}]")
        if piece.base_model:
            fields.setdefault(_key(piece.base_model), f"slices[{i}].base_model")
    return {
        (path, lora): (field, open_input(path, field, lora))
        for (path, lora), field in fields.items()
    }


def _check_layer_ranges(
    slices: tuple[Slice, ...], checkpoints: Mapping[Key, CheckpointReader]
) -> None:
    """Every layer range within its model's layers (num_hidden_layers of its config.json)."""
    for field, entry in _entries(slices):
        path, (start, end) = entry.path, entry.layer_range
        count = layer_count(checkpoints[_key(entry)].config)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ConfigError(
                f"{field}.layer_range: {path} states no {LAYER_COUNT} (a positive integer) in "
                "its config.json, which a layer range is checked against"
            )
        if end > count:
            raise ConfigError(
                f"{field}.layer_range: [{start}, {end}) is outside the {count} layers of {path} "
                f"(layers 0 .. {count - 1})"
            )


def _entries(slices: tuple[Slice, ...]) -> Iterator[tuple[str, SliceModel | SliceBase]]:
    """(field, entry) of every model and base of every slice."""
    for i, piece in enumerate(slices):
        for j, model in enumerate(piece.models):
            yield f"slices[{i}].models[{j}]", model
        if piece.base_model:
            yield f"slices[{i}].base_model", piece.base_model


def _layer_pattern(name: str) -> str | None:
    """A layer tensor's name with its layer as a blank ('model.layers.{}.mlp.up_proj.weight'),
    the layer being the first number among the dotted parts (as `jkarcher.config.layer_position`
    reads it); None outside the layers."""
    parts = name.split(".")
    at = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    if at is None:
        return None
    return ".".join([*parts[:at], "{}", *parts[at + 1 :]])


def _output_tensors(
    slices: tuple[Slice, ...],
    checkpoints: Mapping[Key, CheckpointReader],
    template: CheckpointReader,
    tie: bool,
) -> Iterator[tuple[str, int, list[_Source], _Source | None, float]]:
    """Each output tensor: (its name, its slice, its sources, its base source, its position),
    for the tensors of the template (lm_head left out where the output ties it)."""
    names = [n for n in template.names() if not (tie and n == LM_HEAD_NAME)]
    patterns = sorted({pattern for n in names if (pattern := _layer_pattern(n))})
    for name in names:
        if _layer_pattern(name) is None:
            index = 0 if INPUT_SIDE.intersection(name.split(".")) else len(slices) - 1
            yield (name, index, *_sources(slices[index], index, checkpoints, name, 0), 0.0)
    first_layer = 0
    for index, piece in enumerate(slices):
        n = piece.num_layers
        for k in range(n):
            position = k / (n - 1) if n > 1 else 1.0
            for pattern in patterns:
                out_name = pattern.format(first_layer + k)
                sources, base = _sources(piece, index, checkpoints, pattern, k)
                yield out_name, index, sources, base, position
        first_layer += n


def _sources(
    piece: Slice, index: int, checkpoints: Mapping[Key, CheckpointReader], pattern: str, k: int
) -> tuple[list[_Source], _Source | None]:
    """The slice's models' tensors (and its base's) named `pattern` at layer start + k of each
    (a name without a layer as it is)."""

    def source(entry: SliceModel | SliceBase, field: str) -> _Source:
        checkpoint = checkpoints[_key(entry)]
        name = pattern.format(entry.layer_range[0] + k)
        return _Source(checkpoint, name, f"{field} ({checkpoint.source})")

    field = f"slices[{index}]"
    sources = [source(m, f"{field}.models[{j}]") for j, m in enumerate(piece.models)]
    base = piece.base_model
    return sources, base and source(base, f"{field}.base_model")


def _task(
    config: MergeConfig,
    index: int,
    out_name: str,
    sources: list[_Source],
    base: _Source | None,
    position: float,
    template: CheckpointReader,
) -> tuple[TensorTask, str | None]:
    """The task of one output tensor from its slice's sources, with the slice's settings."""
    inputs = [*sources, base] if base else sources
    infos = [_info(s, out_name) for s in inputs]
    labels = [s.label for s in inputs]
    piece = slice_config(config, index)
    settings = _settings(piece, index, out_name, position)
    template_index = next((i for i, s in enumerate(inputs) if s.checkpoint is template), 0)
    task, warning = plan_tensor(
        piece, out_name, infos, labels, len(sources), template_index, settings
    )
    return dataclasses.replace(task, labels=tuple(labels)), warning


def _vocabulary_task(
    config: MergeConfig,
    vocabulary: OutputVocabulary,
    readers: tuple[CheckpointReader, ...],
    labels: tuple[str, ...],
    index: int,
    name: str,
    sources: list[_Source],
    base: _Source | None,
) -> TensorTask:
    """The task of vocabulary tensor `name` (outside the layers, at position 0) from its slice's
    sources, read in the output's token order. Every checkpoint's tensor (`readers`, the inputs
    of `vocabulary`, with their `labels`) is handed over, as a `tokens` entry may take its row
    from any of them; other rows a source lacks come from the slice's own sources."""
    inputs = [*sources, base] if base else sources
    everyone = [
        _info(_Source(r, name, label), name) for r, label in zip(readers, labels, strict=True)
    ]
    piece = slice_config(config, index)
    settings = _settings(piece, index, name, 0.0)
    chosen = [readers.index(s.checkpoint) for s in inputs]
    task = vocabulary.task(piece, name, everyone, len(sources), settings, labels, chosen)
    return dataclasses.replace(task, labels=tuple(s.label for s in inputs))


def _settings(piece: MergeConfig, index: int, name: str, position: float) -> TensorSettings:
    """Slice `index`'s weights and params for tensor `name` at `position` along the slice."""
    try:
        return TensorSettings(*tensor_values(piece, name, position))
    except ConfigError as err:
        raise ConfigError(f"slices[{index}].{err}") from None


def _info(source: _Source, out_name: str) -> StoredTensor:
    """The source's tensor (a model that ties gives its embedding as lm_head)."""
    checkpoint = source.checkpoint
    tied_head = source.name == LM_HEAD_NAME and ties_embeddings(checkpoint)
    if source.name not in checkpoint and not tied_head:
        raise MergeError(
            f"tensor {source.name!r} is missing from {source.label}: no file of "
            f"{checkpoint.path} holds it (output tensor {out_name!r} comes from it)"
        )
    return source_info(checkpoint, source.name)


def _config_updates(
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
