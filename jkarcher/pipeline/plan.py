"""The plan of a merge, from headers and config files only (docs/design.md, "Data flow").

`plan_merge(config)` opens every checkpoint's headers (`jkarcher.pipeline.inputs`: a plain
merge is the one slice of every layer, a merge by slices a stack of them), finds where each
output tensor comes from (`jkarcher.pipeline.routes`), lists every output tensor with its sources
(`TensorTask`), checks that the models fit together (the same names, shapes and architectures;
vocabulary and tied embeddings: `jkarcher.pipeline.vocab`; statistics files:
`jkarcher.pipeline.statistics`) and that the output may be written, fixes the output's shard
layout and sizes the tasks to the memory budget (`jkarcher.pipeline.budget`). Any problem is an
error here, before anything is read or written.

The output takes its config, vocabulary and tokenizer from one input, the template: the base
model when there is one, else the first model (of the first slice; `tokenizer_source` builds
another vocabulary: `jkarcher.pipeline.tokenizer`). Tensors that are not floating point are
copied from the first model when every model agrees on them.
"""

from __future__ import annotations

import dataclasses

from jkarcher import methods
from jkarcher.architecture import check_architectures
from jkarcher.config import ConfigError, MergeConfig, tensor_values
from jkarcher.io import CheckpointError
from jkarcher.io.chat_template import chosen_chat_template
from jkarcher.io.output_dir import check_output_dir
from jkarcher.io.writer import natural_key
from jkarcher.pipeline.budget import within_budget
from jkarcher.pipeline.inputs import Inputs, open_inputs
from jkarcher.pipeline.routes import Route, plan_routes
from jkarcher.pipeline.statistics import open_statistics, statistic_labels, statistic_sources
from jkarcher.pipeline.tasks import (
    MergePlan,
    TensorSettings,
    TensorTask,
    output_shards,
    plan_mesh,
    plan_tensor,
)
from jkarcher.pipeline.tokenizer import OutputVocabulary, plan_vocabulary
from jkarcher.pipeline.vocab import VOCAB_SUFFIXES, source_info, ties_embeddings


def plan_merge(config: MergeConfig) -> MergePlan:
    """Open every checkpoint's headers, check that they fit together and fix the output layout.

    With `params.fisher` or `params.gram`, each model's statistics file is opened too (its
    headers) and checked to hold the merged tensors' statistics in their shapes
    (`prepare_statistics` must have made those that are to be estimated).

    Raises CheckpointError, MergeError or OutputError, naming the tensor, the model and the file,
    or ConfigError for a tensor whose weights or parameters the method cannot take, before any
    output is written.
    """
    statistic = config.statistic[0] if config.statistic else None  # none with slices
    inputs = open_inputs(config)
    adapters = [m.lora for m in config.models if m.lora]
    check_output_dir(config.output, [c.path for c in inputs.readers] + adapters, config.overwrite)
    template = inputs.template
    template_label = inputs.labels[inputs.template_index]
    if not template.config:
        raise CheckpointError(
            f"{template.path}: has no config.json; the output's config is copied from "
            f"{template_label}, so that one needs it"
        )
    tie = ties_embeddings(template)
    tied = [ties_embeddings(c) for c in inputs.readers]
    warnings = check_architectures(inputs.compared, inputs.labels, tied, config.allow_crimes)
    routes, checked = plan_routes(inputs, tie)
    warnings += checked
    vocabulary = None
    if config.tokenizer_source is not None:
        readers, template_index = inputs.readers, inputs.template_index
        vocabulary = plan_vocabulary(config, readers, inputs.paths, template_index)
    model_labels = inputs.labels[: len(inputs.models)]
    opened = open_statistics(config, model_labels) if statistic else ()
    named = statistic_labels(statistic, model_labels) if statistic else ()
    tasks = []
    for route in routes:
        task, warning = _task(inputs, vocabulary, route)
        if statistic and task.floating:
            infos = [source_info(inputs.readers[i], n) for i, n in route.sources]
            chosen = statistic_sources(
                statistic, task.sources, infos[: len(task.sources)], opened, named
            )
            task = dataclasses.replace(task, statistic=statistic, statistics=chosen)
        tasks.append(task)
        warnings += [warning] if warning else []
    tasks.sort(key=lambda task: natural_key(task.name))
    shards = output_shards(config, tasks)
    plan = MergePlan(
        config=config,
        method=methods.get(config.method),
        models=inputs.models,
        base=inputs.base,
        labels=inputs.labels,
        statistic_labels=named,
        tie_embeddings=tie,
        tasks=tuple(tasks),
        shards=shards,
        warnings=tuple(warnings),
        mesh=plan_mesh(config),
        config_updates=dict(inputs.config_updates)
        | ({} if vocabulary is None else {"vocab_size": vocabulary.rows}),
        chat_template=chosen_chat_template(
            config.chat_template, [c.path for c in (inputs.base, *inputs.models) if c]
        ),
        vocabulary=vocabulary,
    )
    return within_budget(plan)


def _task(
    inputs: Inputs, vocabulary: OutputVocabulary | None, route: Route
) -> tuple[TensorTask, str | None]:
    """The task of one output tensor from its route, with its piece's settings; a vocabulary
    tensor read in the output's token order when the output has its own vocabulary."""
    piece = inputs.pieces[route.piece]
    try:
        settings = TensorSettings(*tensor_values(piece.config, route.name, route.position))
    except ConfigError as err:
        raise ConfigError(f"{piece.field}.{err}" if piece.field else str(err)) from None
    if vocabulary is not None and route.name.endswith(VOCAB_SUFFIXES):
        everyone = [source_info(reader, route.name) for reader in inputs.readers]
        task = vocabulary.task(
            piece.config,
            route.name,
            everyone,
            piece.n_models,
            settings,
            inputs.labels,
            [i for i, _ in route.sources],
        )
        return dataclasses.replace(task, labels=piece.labels), None
    infos = [source_info(inputs.readers[i], name) for i, name in route.sources]
    template_index = (
        piece.inputs.index(inputs.template_index) if inputs.template_index in piece.inputs else 0
    )
    task, warning = plan_tensor(
        piece.config, route.name, infos, piece.labels, piece.n_models, template_index, settings
    )
    return dataclasses.replace(task, labels=piece.labels), warning
