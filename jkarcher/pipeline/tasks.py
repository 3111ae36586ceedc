"""What a merge plan is made of: each output tensor's task (`TensorTask`: its sources, settings
and stage), the plan (`MergePlan`), and the steps the planner (`jkarcher.pipeline.plan`) takes to
build them: an input opened, the mesh, one tensor's task, the output's shards.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jkarcher import methods
from jkarcher.blocked import MERGE
from jkarcher.config import ConfigError, MergeConfig
from jkarcher.errors import MergeError
from jkarcher.io import CheckpointError, CheckpointReader, StoredTensor
from jkarcher.io.orbax_io import open_checkpoint
from jkarcher.io.output_dir import check_free_space
from jkarcher.io.writer import OutputTensor, Shard, plan_shards
from jkarcher.lora.applied import with_adapter
from jkarcher.memory import Budget
from jkarcher.pipeline.vocab import shared_rows
from jkarcher.sharding import MeshError, make_mesh

if TYPE_CHECKING:
    from jkarcher.pipeline.tokenizer import OutputVocabulary


@dataclasses.dataclass(frozen=True)
class TensorSettings:
    """What merges one tensor: the models' weights and the method's resolved parameters."""

    weights: tuple[float, ...]
    params: Mapping[str, Any]

    @property
    def params_key(self) -> tuple:
        return tuple(sorted(self.params.items()))


@dataclasses.dataclass(frozen=True)
class TensorTask:
    """One output tensor and where its data comes from.

    `sources[i]` is model i's tensor (only the rows all models share, for a vocabulary tensor);
    `extra_rows`, when the template model's vocabulary is larger, holds the output's further
    rows, copied from that model. A tensor that is not `floating` point is copied from the first
    model once all agree, rather than merged. `statistics[i]`, when the method is given each
    model's `statistic` (its tensor input: "fisher" or "gram"), is model i's Fisher of the same
    rows as `sources[i]`, or its Gram of the tensor's inputs. `labels`, in a merge by slices, names
    each source's input and then the base's ('slices[1].models[0] (PATH)'); otherwise the
    plan's labels do.
    """

    name: str
    shape: tuple[int, ...]
    source_dtype: np.dtype
    out_dtype: np.dtype
    sources: tuple[StoredTensor, ...]
    base: StoredTensor | None
    extra_rows: StoredTensor | None
    settings: TensorSettings
    floating: bool
    statistic: str | None = None
    statistics: tuple[StoredTensor, ...] = ()
    labels: tuple[str, ...] = ()
    # A block of the tensor's rows (`jkarcher.pipeline.budget`): the output row of its first
    # row, and its stage (`jkarcher.blocked`): "merge" (its rows merged), "statistics" (a round
    # of statistics, the `pass_round`-th), "apply" (its rows merged from what every round found)
    # or "both" (every pass on the whole tensor).
    first_row: int = 0
    stage: str = MERGE
    pass_round: int = 0

    def infos(self) -> tuple[StoredTensor, ...]:
        """Every distinct tensor this task reads (a model listed twice is read once)."""
        wanted = (*self.sources, self.base, self.extra_rows, *self.statistics)
        return tuple(dict.fromkeys(i for i in wanted if i is not None))

    @property
    def read_bytes(self) -> int:
        return sum(info.nbytes for info in self.infos())


@dataclasses.dataclass(frozen=True)
class MergePlan:
    """Everything a merge will do, decided from headers and config files alone."""

    config: MergeConfig
    method: methods.MergeMethod
    models: tuple[CheckpointReader, ...]
    base: CheckpointReader | None
    labels: tuple[str, ...]
    statistic_labels: tuple[str, ...]
    tie_embeddings: bool
    tasks: tuple[TensorTask, ...]
    shards: tuple[Shard, ...]
    warnings: tuple[str, ...]
    mesh: Mesh
    # Fields of the output's config.json other than the template's: a merge by slices sets its
    # layer count (`jkarcher.pipeline.inputs`).
    config_updates: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # The chat template written into the output's tokenizer_config.json (`config.chat_template`
    # resolved by `jkarcher.io.chat_template`); None: the template model's is kept.
    chat_template: str | None = None
    # The output's vocabulary for `config.tokenizer_source` (`jkarcher.pipeline.tokenizer`);
    # None: the template model's.
    vocabulary: OutputVocabulary | None = None
    # The memory budget that sized the tasks (`jkarcher.pipeline.budget`); plan_merge sets it.
    budget: Budget = dataclasses.field(default_factory=lambda: Budget(2**62))

    @property
    def template(self) -> CheckpointReader:
        """The model whose config, vocabulary and tokenizer the output takes: base, else first."""
        return self.base or self.models[0]

    @property
    def template_label(self) -> str:
        return self.labels[-1] if self.base else self.labels[0]

    @property
    def tensor_count(self) -> int:
        """The output's tensors (a tensor merged in blocks is one, its tasks several)."""
        return sum(len(shard.tensors) for shard in self.shards)

    @property
    def bytes_to_read(self) -> int:
        return sum(task.read_bytes for task in self.tasks)

    @property
    def bytes_to_write(self) -> int:
        return sum(shard.nbytes for shard in self.shards)

    def input_labels(self, task: TensorTask) -> list[tuple[StoredTensor, str]]:
        """Each tensor a task reads, with the input it comes from ('model 2 (PATH)'), in the
        order of the leaf's all-finite flags (sources, base, statistics), then the extra rows."""
        labels = task.labels or self.labels
        labelled = list(zip(task.sources, labels, strict=False))
        if task.base is not None:
            labelled.append((task.base, labels[-1]))
        labelled += zip(task.statistics, self.statistic_labels, strict=False)
        if task.extra_rows is not None:
            labelled.append((task.extra_rows, self.template_label))
        return labelled


def open_input(path: str, field: str, lora: str | None = None) -> CheckpointReader:
    """The checkpoint at `path`, with the LoRA adapter `lora` applied as it is read."""
    try:
        checkpoint = open_checkpoint(path)
        return checkpoint if lora is None else with_adapter(checkpoint, lora)
    except CheckpointError as err:
        raise CheckpointError(f"{field}: {err}") from None


def plan_mesh(config: MergeConfig) -> Mesh:
    try:
        return make_mesh(config.mesh)
    except MeshError as err:
        raise ConfigError(f"mesh: {err}") from None


def plan_tensor(
    config: MergeConfig,
    name: str,
    infos: Sequence[StoredTensor],
    labels: Sequence[str],
    n_models: int,
    template_index: int,
    settings: TensorSettings,
) -> tuple[TensorTask, str | None]:
    """The task for one output tensor merged by `settings` from `infos` (the models' tensors,
    then the base's) and, for a vocabulary size difference, a warning."""
    template = infos[template_index]
    floating = [bool(jnp.issubdtype(i.dtype, jnp.floating)) for i in infos]
    if len(set(floating)) > 1:
        odd = floating.index(not floating[template_index])
        raise MergeError(
            f"tensor {name!r} is {infos[odd].dtype} in {labels[odd]} ({infos[odd].file}) but "
            f"{template.dtype} in {labels[template_index]} ({template.file})"
        )
    rows, warning = shared_rows(name, infos, labels, template_index)
    if rows is not None and not floating[0]:
        raise MergeError(f"tensor {name!r}: vocabulary sizes differ in a non-float tensor")
    trimmed = [i if rows is None else i.rows(0, rows) for i in infos]
    has_extra_rows = rows is not None and rows < template.shape[0]
    # The sources merge in their dtype when they agree, else in the one that holds all.
    task = TensorTask(
        name=name,
        shape=template.shape,
        source_dtype=np.dtype(functools.reduce(jnp.promote_types, [i.dtype for i in infos])),
        out_dtype=np.dtype(config.out_dtype) if floating[0] else template.dtype,
        sources=tuple(trimmed[:n_models]),
        base=trimmed[n_models] if len(infos) > n_models else None,
        extra_rows=template.rows(rows, template.shape[0]) if has_extra_rows else None,
        settings=settings,
        floating=floating[0],
    )
    return task, warning


def output_shards(config: MergeConfig, tasks: Sequence[TensorTask]) -> tuple[Shard, ...]:
    """The output's shard files for the tasks' tensors, in their order, once the disk is checked
    to have room for them."""
    layout = [OutputTensor(t.name, t.out_dtype, t.shape) for t in tasks]
    shards = plan_shards(layout, config.out_shard_size)
    check_free_space(config.output, sum(shard.nbytes for shard in shards))
    return shards
