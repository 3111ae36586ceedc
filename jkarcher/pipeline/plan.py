"""The plan of a merge, from headers and config files only (docs/design.md, "Data flow").

`plan_merge(config)` opens every checkpoint's headers, lists every output tensor with its
sources (`TensorTask`), checks that the models fit together (the same names, shapes and
architectures; vocabulary and tied embeddings: `jkarcher.pipeline.vocab`; statistics files:
`jkarcher.pipeline.statistics`) and that the output may be written, and fixes the output's shard
layout. Any problem is an error here, before anything is read or written.

The output takes its config, vocabulary and tokenizer from one input, the plan's `template`: the
base model when there is one, else the first model (`tokenizer_source` builds another vocabulary:
`jkarcher.pipeline.tokenizer`). Tensors that are not floating point are
copied from the first model when every model agrees on them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jkarcher import methods
from jkarcher.architecture import check_architectures, layer_count
from jkarcher.config import MergeConfig
from jkarcher.errors import MergeError
from jkarcher.io import CheckpointError, CheckpointReader
from jkarcher.io.chat_template import chosen_chat_template
from jkarcher.io.output_dir import check_output_dir
from jkarcher.io.writer import natural_key
from jkarcher.pipeline.budget import within_budget
from jkarcher.pipeline.slices import plan_slices
from jkarcher.pipeline.statistics import open_statistics, statistic_labels, statistic_sources
from jkarcher.pipeline.tasks import (
    MergePlan,
    open_input,
    output_shards,
    plan_mesh,
    plan_tensor,
    tensor_settings,
)
from jkarcher.pipeline.tokenizer import plan_vocabulary
from jkarcher.pipeline.vocab import LM_HEAD_NAME, VOCAB_SUFFIXES, source_info, ties_embeddings


def plan_merge(config: MergeConfig) -> MergePlan:
    """Open every checkpoint's headers, check that they fit together and fix the output layout.

    With `params.fisher` or `params.gram`, each model's statistics file is opened too (its
    headers) and checked to hold the merged tensors' statistics in their shapes
    (`prepare_statistics` must have made those that are to be estimated).

    Raises CheckpointError, MergeError or OutputError, naming the tensor, the model and the file,
    or ConfigError for a tensor whose weights or parameters the method cannot take, before any
    output is written. A merge by slices (`config.slices`) is planned by
    `jkarcher.pipeline.slices`.
    """
    if config.slices:
        return within_budget(plan_slices(config))
    models = tuple(
        open_input(entry.path, f"models[{i}]", entry.lora) for i, entry in enumerate(config.models)
    )
    base = None if config.base_model is None else open_input(config.base_model, "base_model")
    inputs = (*models, base) if base else models
    adapters = [m.lora for m in config.models if m.lora]
    check_output_dir(config.output, [c.path for c in inputs] + adapters, config.overwrite)
    template = base or models[0]
    if not template.config:
        raise CheckpointError(
            f"{template.path}: has no config.json; the output's config is copied from the base "
            "model (or the first model), so that one needs it"
        )
    labels = [f"model {i} ({c.source})" for i, c in enumerate(models)]
    statistic = config.statistic[0] if config.statistic else None
    opened = open_statistics(config, labels) if statistic else ()
    named = statistic_labels(statistic, labels) if statistic else ()
    if base is not None:
        labels.append(f"the base model ({base.source})")
    template_index = len(models) if base else 0
    tie = ties_embeddings(template)
    tied = [ties_embeddings(c) for c in inputs]
    warnings = check_architectures([c.config for c in inputs], labels, tied, config.allow_crimes)
    names = sorted(
        (n for n in template.names() if not (tie and n == LM_HEAD_NAME)), key=natural_key
    )
    warnings += _check_names(inputs, labels, names, labels[template_index], tie)
    num_layers = layer_count(template.config)
    vocabulary = None
    if config.tokenizer_source is not None:
        paths = [m.path for m in config.models] + [config.base_model] * (base is not None)
        vocabulary = plan_vocabulary(config, inputs, paths, template_index)
    tasks = []
    for name in names:
        infos = [source_info(c, name) for c in inputs]
        settings = tensor_settings(config, name, num_layers)
        if vocabulary is not None and name.endswith(VOCAB_SUFFIXES):
            task = vocabulary.task(config, name, infos, len(models), settings, labels)
            warning = None
        else:
            task, warning = plan_tensor(
                config, name, infos, labels, len(models), template_index, settings
            )
        if statistic and task.floating:
            chosen = statistic_sources(statistic, task.sources, infos[: len(models)], opened, named)
            task = dataclasses.replace(task, statistic=statistic, statistics=chosen)
        tasks.append(task)
        warnings += [warning] if warning else []
    shards = output_shards(config, tasks)
    plan = MergePlan(
        config=config,
        method=methods.get(config.method),
        models=models,
        base=base,
        labels=tuple(labels),
        statistic_labels=named,
        tie_embeddings=tie,
        tasks=tuple(tasks),
        shards=shards,
        warnings=tuple(warnings),
        mesh=plan_mesh(config),
        chat_template=chosen_chat_template(
            config.chat_template, [c.path for c in (base, *models) if c is not None]
        ),
        vocabulary=vocabulary,
        config_updates={} if vocabulary is None else {"vocab_size": vocabulary.rows},
    )
    return within_budget(plan)


def _check_names(
    inputs: Sequence[CheckpointReader],
    labels: Sequence[str],
    names: Sequence[str],
    template_label: str,
    tie: bool,
) -> list[str]:
    """Every input must hold every output tensor and no other (lm_head aside, by tying rules)."""
    warnings = []
    wanted = set(names)
    for checkpoint, label in zip(inputs, labels, strict=True):
        present = set(checkpoint.names())
        own_head = LM_HEAD_NAME in present and not ties_embeddings(checkpoint)
        if tie:
            present.discard(LM_HEAD_NAME)
            if own_head:
                warnings.append(
                    f"{label} has its own lm_head, but the output ties lm_head to the "
                    f"embeddings as {template_label} does; that lm_head is not used"
                )
        elif LM_HEAD_NAME in wanted and not own_head and ties_embeddings(checkpoint):
            present.add(LM_HEAD_NAME)
            warnings.append(
                f"{label} ties lm_head to its embeddings; its embedding matrix is merged into "
                "the output's lm_head"
            )
        missing = sorted(wanted - present, key=natural_key)
        if missing:
            raise MergeError(
                f"tensor {missing[0]!r} is missing from {label}: no file of {checkpoint.path} "
                f"holds it ({len(missing)} tensors missing in all; {template_label} has them)"
            )
        extra = sorted(present - wanted, key=natural_key)
        if extra:
            raise MergeError(
                f"tensor {extra[0]!r} of {label} (in {checkpoint.info(extra[0]).file}) is not in "
                f"{template_label}; the models must have the same tensors"
            )
    return warnings
