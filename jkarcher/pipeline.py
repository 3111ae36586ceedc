"""Streaming merge of checkpoints on disk (Hugging Face or Orbax): plan, read ahead, merge, write,
rename.

Data flows one way (DESIGN.md):

  `plan_merge(config)`  reads headers and config files only: every output tensor with its sources,
                        all models checked for the same names and shapes, the output layout fixed;
                        any problem is an error here, before anything is written.
  `run(plan)`           a background thread reads the next tensors while the current one merges in
                        `jkarcher.merge.leaf_function(method, params)` (the very function behind
                        `jkarcher.merge`, so both give identical values); a second thread compiles
                        the leaf for the shapes still to come; a third streams each result into its
                        shard; config, tokenizer files and model card follow; the finished
                        directory is renamed into place.

Peak memory is about the bytes of the largest tensor across all models (the tensor being merged,
plus the tensors read ahead, are held to that budget), not the model size.

On a mesh of several devices, and over several processes (`jkarcher.distributed`), each tensor
is split by rows over every device (`jkarcher.sharding`): a process reads only the rows its own
devices hold, the same leaf function runs on them (XLA adds the collectives that whole-tensor
statistics need), and for safetensors output each process writes its devices' rows straight into
their planned places in the shared output files; process 0 writes what is copied rather than
merged, and renames the output into place once every process has written its part and every
tensor is complete. Orbax output (`format="orbax"`) instead keeps the merged tensors on the mesh,
each device its part, and saves them at the end as one Orbax checkpoint, each process writing
its own shards; its peak memory is the output model, spread over the devices.

Users' expectations that the plan encodes:
- embeddings and lm_head of different vocabulary sizes: the rows that all models have are merged;
  the output has the base (or first) model's vocabulary, its further rows copied from that model;
- tied embeddings stay tied: no lm_head is written when the base (or first) model ties it; when
  that model has its own lm_head, a model that ties contributes its embedding matrix instead;
- tensors that are not floating point are copied when every model agrees on them.

Methods that weigh coordinates by each model's diagonal Fisher (`params.fisher`) read the Fisher
files like the models, tensor by tensor, in float32: the plan checks that each holds every merged
tensor with the model's shape (a tying model's embedding Fisher serves as its lm_head's), the
leaf gets them as its `fisher` input, and a NaN or Inf in one is an error naming the file.
`prepare_fishers(config)` first estimates the Fishers a config asks to estimate.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jkarcher import distributed, fisher, methods
from jkarcher.architecture import architecture_differences
from jkarcher.config import FISHER_INPUT, ConfigError, MergeConfig, layer_position, tensor_values
from jkarcher.errors import MergeError
from jkarcher.io.model_card import model_card
from jkarcher.io.orbax_io import (
    OrbaxCheckpoint,
    OrbaxTensor,
    open_checkpoint,
    read_orbax_placed,
    read_orbax_tensor,
    save_params,
)
from jkarcher.io.output_dir import OutputError, check_free_space, check_output_dir
from jkarcher.io.safetensors_io import (
    Checkpoint,
    CheckpointError,
    TensorInfo,
    read_tensor,
)
from jkarcher.io.writer import (
    GENERATION_FILES,
    TOKENIZER_FILES,
    OutputTensor,
    Shard,
    ShardWriter,
    WriteBehind,
    copy_files,
    create_shard_files,
    natural_key,
    output_model_config,
    plan_shards,
    write_index,
    write_json,
)
from jkarcher.merge import describe_merge, leaf_function, leaf_key
from jkarcher.numerics import check_weights
from jkarcher.sharding import (
    MeshError,
    even_sharding,
    local_rows,
    make_mesh,
    padded_shape,
    replicated,
    row_sharding,
)

EMBED_SUFFIX = "embed_tokens.weight"
LM_HEAD_NAME = "lm_head.weight"
VOCAB_SUFFIXES = (EMBED_SUFFIX, LM_HEAD_NAME)
# Reading ahead may hold at least this much even when every tensor is small.
MIN_READ_AHEAD_BYTES = 256 * 2**20


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
    `tail` holds the output's further rows, copied from the base (or first) model. Tensors that are
    not floating point (`merged` False) are copied from the first model once all agree.
    `fishers[i]`, when the method is given Fishers, is model i's Fisher of the same rows.
    """

    name: str
    shape: tuple[int, ...]
    source_dtype: np.dtype
    out_dtype: np.dtype
    sources: tuple[TensorInfo, ...]
    base: TensorInfo | None
    tail: TensorInfo | None
    settings: TensorSettings
    merged: bool
    fishers: tuple[TensorInfo, ...] = ()

    def infos(self) -> tuple[TensorInfo, ...]:
        """Every distinct byte range this task reads (a model listed twice is read once)."""
        wanted = (*self.sources, self.base, self.tail, *self.fishers)
        return tuple(dict.fromkeys(i for i in wanted if i is not None))

    @property
    def read_bytes(self) -> int:
        return sum(info.nbytes for info in self.infos())


@dataclasses.dataclass(frozen=True)
class MergePlan:
    """Everything a merge will do, decided from headers and config files alone."""

    config: MergeConfig
    method: methods.MergeMethod
    models: tuple[Checkpoint, ...]
    base: Checkpoint | None
    labels: tuple[str, ...]
    fisher_labels: tuple[str, ...]
    tie_embeddings: bool
    tasks: tuple[TensorTask, ...]
    shards: tuple[Shard, ...]
    warnings: tuple[str, ...]
    mesh: Mesh

    @property
    def reference(self) -> Checkpoint:
        """The model whose config, vocabulary and tokenizer the output takes: base, else first."""
        return self.base or self.models[0]

    @property
    def reference_label(self) -> str:
        return self.labels[-1] if self.base else self.labels[0]

    @property
    def bytes_to_read(self) -> int:
        return sum(task.read_bytes for task in self.tasks)

    @property
    def bytes_to_write(self) -> int:
        return sum(shard.nbytes for shard in self.shards)

    def input_labels(self, task: TensorTask) -> list[tuple[TensorInfo, str]]:
        """Each tensor a task reads, with the input it comes from ('model 2 (PATH)'), in the
        order of the leaf's all-finite flags (sources, base, Fishers), then the tail."""
        labelled = list(zip(task.sources, self.labels, strict=False))
        if task.base is not None:
            labelled.append((task.base, self.labels[-1]))
        labelled += zip(task.fishers, self.fisher_labels, strict=False)
        if task.tail is not None:
            labelled.append((task.tail, self.reference_label))
        return labelled


@dataclasses.dataclass(frozen=True)
class MergeSummary:
    """What a finished merge did."""

    output: Path
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float

    def __str__(self) -> str:
        rate = self.bytes_read / max(self.seconds, 1e-9) / 1e9
        return (
            f"merged {self.tensors} tensors: {self.bytes_read / 1e9:.2f} GB read, "
            f"{self.bytes_written / 1e9:.2f} GB written in {self.seconds:.1f} s "
            f"({rate:.2f} GB/s read) -> {self.output}"
        )


def tensor_settings(
    config: MergeConfig, name: str, num_layers: int | None = None
) -> TensorSettings:
    """The weights and method parameters that merge the tensor called `name`.

    All per-tensor settings are decided here and nowhere else: each model's own values, the shared
    values and the method's defaults, chosen by filters on the name and interpolated over the
    layers (`num_layers`, the models' layer count, places the tensor: `layer_position`), resolve
    to one set of weights and parameters (`jkarcher.config.tensor_values`). Tensors with equal
    shapes and parameters share one compiled leaf; each distinct parameter value compiles anew,
    while weights are arguments of the leaf and never cause a compilation.
    """
    position = layer_position(name, num_layers) if config.varies_by_layer else 0.0
    return TensorSettings(*tensor_values(config, name, position))


# ---------------------------------------------------------------------------------------------
# Plan: headers and config files only.


def plan_merge(config: MergeConfig) -> MergePlan:
    """Open every checkpoint's headers, check that they fit together and fix the output layout.

    With `params.fisher`, each model's Fisher file is opened too (its headers) and checked to
    hold every merged tensor in the model's shape (`prepare_fishers` must have made those that
    are to be estimated).

    Raises CheckpointError, MergeError or OutputError, naming the tensor, the model and the file,
    or ConfigError for a tensor whose weights or parameters the method cannot take, before any
    output is written.
    """
    models = tuple(_open(entry.path, f"models[{i}]") for i, entry in enumerate(config.models))
    base = None if config.base_model is None else _open(config.base_model, "base_model")
    inputs = (*models, base) if base else models
    check_output_dir(config.output, [c.path for c in inputs], config.overwrite)
    reference = base or models[0]
    if not reference.config:
        raise CheckpointError(
            f"{reference.path}: has no config.json; the output's config is copied from the base "
            "model (or the first model), so that one needs it"
        )
    labels = [f"model {i} ({c.source})" for i, c in enumerate(models)]
    fishers = _open_fishers(config, labels) if config.fisher else ()
    fisher_labels = tuple(f"the Fisher of {label}" for label in labels[: len(fishers)])
    if base is not None:
        labels.append(f"the base model ({base.source})")
    reference_index = len(models) if base else 0
    tie = ties_embeddings(reference)
    warnings = _check_architectures(config, inputs, labels)
    names = sorted(
        (n for n in reference.names() if not (tie and n == LM_HEAD_NAME)), key=natural_key
    )
    warnings += _check_names(inputs, labels, names, labels[reference_index], tie)
    num_layers = reference.config.get("num_hidden_layers")
    tasks = []
    for name in names:
        infos = [_source_info(c, name) for c in inputs]
        task, warning = _plan_tensor(
            config, name, infos, labels, len(models), reference_index, num_layers
        )
        if fishers and task.merged:
            task = dataclasses.replace(
                task, fishers=_fisher_sources(task, infos[: len(models)], fishers, fisher_labels)
            )
        tasks.append(task)
        warnings += [warning] if warning else []
    layout = [OutputTensor(t.name, t.out_dtype, t.shape) for t in tasks]
    shards = plan_shards(layout, config.out_shard_size)
    check_free_space(config.output, sum(shard.nbytes for shard in shards))
    return MergePlan(
        config=config,
        method=methods.get(config.method),
        models=models,
        base=base,
        labels=tuple(labels),
        fisher_labels=fisher_labels,
        tie_embeddings=tie,
        tasks=tuple(tasks),
        shards=shards,
        warnings=tuple(warnings),
        mesh=_mesh(config),
    )


def fisher_files(config: MergeConfig) -> tuple[Path, ...]:
    """Each model's Fisher file as `params.fisher` places it: a file given, fisher.safetensors
    in a directory given, or fisher.safetensors beside the model."""
    if config.fisher.files is None:
        return tuple(fisher.fisher_path(entry.path) for entry in config.models)
    paths = (Path(p).expanduser() for p in config.fisher.files)
    return tuple(p / fisher.FISHER_NAME if p.is_dir() else p for p in paths)


def prepare_fishers(config: MergeConfig, progress: bool = False) -> list[fisher.FisherRun]:
    """Estimate the Fishers that `params.fisher = {"text": FILE, ...}` asks for and that are not
    yet beside the models, made by the same text and settings; return what was estimated.

    Each estimate is `jkarcher.fisher.checkpoint_fisher` of one model on the text, written
    atomically as fisher.safetensors in the model's directory. With several processes, process
    0 estimates and the others wait for it. Nothing is done for other forms of `params.fisher`.
    """
    if config.fisher is None or config.fisher.estimate is None:
        return []
    settings = dataclasses.asdict(config.fisher.estimate)
    text = Path(settings.pop("text")).expanduser()
    if not text.is_file():
        raise ConfigError(f"params.fisher.text: {text} is not a file")
    recipe = fisher.estimate_recipe(text, **settings)
    runs = []
    if distributed.is_leader():
        for entry, path in zip(config.models, fisher_files(config), strict=True):
            if not fisher.has_recipe(path, recipe):
                runs.append(
                    fisher.checkpoint_fisher(
                        entry.path, text, output=path, progress=progress, **settings
                    )
                )
    distributed.barrier("Fisher estimates written")
    return runs


def ties_embeddings(checkpoint: Checkpoint) -> bool:
    """Whether a model's lm_head is its input embedding: its config says so, or it stores none."""
    if _embedding_name(checkpoint) is None:
        return False
    if LM_HEAD_NAME not in checkpoint.tensors:
        return True
    return bool(checkpoint.config.get("tie_word_embeddings", False))


def _check_architectures(
    config: MergeConfig, inputs: Sequence[Checkpoint], labels: Sequence[str]
) -> list[str]:
    """Refuse models whose config.json disagree on the computation (`jkarcher.architecture`);
    with `allow_crimes`, a warning instead."""
    differences = architecture_differences(
        [c.config for c in inputs], labels, [ties_embeddings(c) for c in inputs]
    )
    if not differences:
        return []
    listed = "; ".join(differences)
    if not config.allow_crimes:
        raise MergeError(
            f"the models' architectures differ ({listed}); their tensors do not compute the "
            "same function, so they are not merged unless allow_crimes=True "
            "(--config.allow_crimes=True)"
        )
    return [f"allow_crimes: merging models whose architectures differ ({listed})"]


def _open(path: str, field: str) -> Checkpoint | OrbaxCheckpoint:
    try:
        return open_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"{field}: {err}") from None


def _mesh(config: MergeConfig) -> Mesh:
    try:
        return make_mesh(config.mesh)
    except MeshError as err:
        raise ConfigError(f"mesh: {err}") from None


def _open_fishers(config: MergeConfig, labels: Sequence[str]) -> tuple[dict[str, TensorInfo], ...]:
    """The headers of each model's Fisher file; a missing one is an error naming it."""
    opened = []
    for path, entry, label in zip(fisher_files(config), config.models, labels, strict=True):
        try:
            opened.append(fisher.fisher_tensors(entry.path, path))
        except CheckpointError as err:
            raise CheckpointError(f"params.fisher, the Fisher of {label}: {err}") from None
    return tuple(opened)


def _fisher_sources(
    task: TensorTask,
    model_infos: Sequence[TensorInfo],
    fishers: Sequence[Mapping[str, TensorInfo]],
    fisher_labels: Sequence[str],
) -> tuple[TensorInfo, ...]:
    """Each model's Fisher of a task's rows: the Fisher's tensor named like the model's tensor
    (`model_infos[i]`, the embedding for the lm_head of a model that ties them), of its shape."""
    chosen = []
    for full, infos, label, source in zip(
        model_infos, fishers, fisher_labels, task.sources, strict=True
    ):
        if full.name not in infos:
            raise MergeError(
                f"tensor {full.name!r} is missing from {label}; the Fisher file needs every "
                "tensor the model merges"
            )
        info = infos[full.name]
        if info.shape != full.shape:
            raise MergeError(
                f"tensor {full.name!r} has shape {list(info.shape)} in {label} ({info.file}) "
                f"but {list(full.shape)} in the model ({full.file})"
            )
        chosen.append(info if source.shape == info.shape else info.rows(0, source.shape[0]))
    return tuple(chosen)


def _embedding_name(checkpoint: Checkpoint) -> str | None:
    return next((n for n in checkpoint.names() if n.endswith(EMBED_SUFFIX)), None)


def _source_info(checkpoint: Checkpoint, name: str) -> TensorInfo:
    """The tensor a model contributes for `name`: a tying model gives its embedding as lm_head."""
    if name == LM_HEAD_NAME and ties_embeddings(checkpoint):
        return checkpoint.info(_embedding_name(checkpoint))
    return checkpoint.info(name)


def _check_names(
    inputs: Sequence[Checkpoint],
    labels: Sequence[str],
    names: Sequence[str],
    reference_label: str,
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
                    f"embeddings as {reference_label} does; that lm_head is not used"
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
                f"holds it ({len(missing)} tensors missing in all; {reference_label} has them)"
            )
        extra = sorted(present - wanted, key=natural_key)
        if extra:
            raise MergeError(
                f"tensor {extra[0]!r} of {label} (in {checkpoint.info(extra[0]).file}) is not in "
                f"{reference_label}; the models must have the same tensors"
            )
    return warnings


def _plan_tensor(
    config: MergeConfig,
    name: str,
    infos: Sequence[TensorInfo],
    labels: Sequence[str],
    n_models: int,
    reference_index: int,
    num_layers: int | None,
) -> tuple[TensorTask, str | None]:
    """The task for one output tensor and, for a vocabulary size difference, a warning."""
    reference = infos[reference_index]
    floating = [bool(jnp.issubdtype(i.dtype, jnp.floating)) for i in infos]
    if len(set(floating)) > 1:
        odd = floating.index(not floating[reference_index])
        raise MergeError(
            f"tensor {name!r} is {infos[odd].dtype} in {labels[odd]} ({infos[odd].file}) but "
            f"{reference.dtype} in {labels[reference_index]} ({reference.file})"
        )
    rows, warning = _shared_rows(name, infos, labels, reference_index)
    if rows is not None and not floating[0]:
        raise MergeError(f"tensor {name!r}: vocabulary sizes differ in a non-float tensor")
    trimmed = [i if rows is None else i.rows(0, rows) for i in infos]
    has_tail = rows is not None and rows < reference.shape[0]
    task = TensorTask(
        name=name,
        shape=reference.shape,
        source_dtype=_common_dtype([i.dtype for i in infos]),
        out_dtype=np.dtype(config.out_dtype) if floating[0] else reference.dtype,
        sources=tuple(trimmed[:n_models]),
        base=trimmed[n_models] if len(infos) > n_models else None,
        tail=reference.rows(rows, reference.shape[0]) if has_tail else None,
        settings=tensor_settings(config, name, num_layers),
        merged=floating[0],
    )
    return task, warning


def _shared_rows(
    name: str, infos: Sequence[TensorInfo], labels: Sequence[str], reference_index: int
) -> tuple[int | None, str | None]:
    """None when all shapes agree; for vocabulary tensors that differ only in their number of
    rows, the number of rows all share (and a warning saying what happens to the others)."""
    reference = infos[reference_index]
    odd = next((i for i, info in enumerate(infos) if info.shape != reference.shape), None)
    if odd is None:
        return None, None
    vocabulary = name.endswith(VOCAB_SUFFIXES) and all(
        len(i.shape) >= 1 and i.shape[1:] == reference.shape[1:] for i in infos
    )
    if not vocabulary:
        raise MergeError(
            f"tensor {name!r} has shape {list(infos[odd].shape)} in {labels[odd]} "
            f"({infos[odd].file}) but {list(reference.shape)} in {labels[reference_index]} "
            f"({reference.file})"
        )
    rows = min(i.shape[0] for i in infos)
    sizes = ", ".join(f"{label}: {i.shape[0]}" for label, i in zip(labels, infos, strict=True))
    fate = (
        f"rows {rows}..{reference.shape[0] - 1} are copied from {labels[reference_index]}"
        if rows < reference.shape[0]
        else f"the output keeps the {rows} rows of {labels[reference_index]}"
    )
    return rows, (
        f"tensor {name!r}: vocabulary sizes differ ({sizes}); the first {rows} rows are merged, "
        f"{fate}, and rows beyond that in other models are dropped"
    )


def _common_dtype(dtypes: Sequence[np.dtype]) -> np.dtype:
    """The dtype all sources are merged in: theirs when they agree, else the one that holds all."""
    common = dtypes[0]
    for dtype in dtypes[1:]:
        common = jnp.promote_types(common, dtype)
    return np.dtype(common)


# ---------------------------------------------------------------------------------------------
# Run: read ahead, merge, write, rename.


def run(plan: MergePlan, on_tensor: Callable[[TensorTask], None] | None = None) -> MergeSummary:
    """Execute a plan: stream every tensor through the leaf function into the output files.

    The output appears at `plan.config.output` only once complete; on any error (NaN or Inf in a
    source or the result, models that disagree on a non-float tensor, a full disk, an
    interruption) nothing is left there; a failed write (ENOSPC, EROFS, ...) is an OutputError.
    With several processes, every process runs this on the same plan, and the output appears
    once all of them have written their parts. `on_tensor(task)` is called after each tensor is
    merged and handed to the writer (e.g. to advance a progress bar).
    """
    start = time.perf_counter()
    key = jax.random.key(plan.config.seed) if plan.method.random else None
    order = execution_order(plan.tasks)
    output = _orbax_output if plan.config.format == "orbax" else _safetensors_output
    with (
        _output_errors(plan.config.output),
        distributed.staged_output(plan.config.output, plan.config.overwrite) as staging,
    ):
        with (
            _Leaves(plan.method, order, plan.config.seed, plan.mesh) as leaves,
            ReadAhead(
                order, functools.partial(_read_task, plan.mesh), _read_ahead_bytes(order)
            ) as reads,
            output(plan, staging) as put,
        ):
            for task, arrays in reads:
                tensor_key = None if key is None else leaf_key(key, task.name)
                put(task, *_merge_tensor(plan, leaves, task, arrays, tensor_key))
                del arrays
                if on_tensor is not None:
                    on_tensor(task)
        if distributed.is_leader():
            _write_side_files(plan, staging)
    return MergeSummary(
        output=plan.config.output,
        tensors=len(plan.tasks),
        bytes_read=plan.bytes_to_read,
        bytes_written=plan.bytes_to_write,
        seconds=time.perf_counter() - start,
    )


@contextlib.contextmanager
def _output_errors(output: Path) -> Iterator[None]:
    """OSErrors of the block (the output's files and directories) as one-line OutputErrors."""
    try:
        yield
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        raise OutputError(
            f"writing output {output} failed: {err.strerror or err}{where}; nothing was written"
        ) from None


def execution_order(tasks: Sequence[TensorTask]) -> tuple[TensorTask, ...]:
    """The order to merge in: tasks grouped by the leaf they compile to, groups in order of
    first appearance.

    Each group merges while the next group's leaf compiles, instead of every layer waiting for
    new compilations. The output files keep the planned layout whatever the order.
    """
    groups: dict[tuple, list[TensorTask]] = {}
    for task in tasks:
        groups.setdefault(_signature(task), []).append(task)
    return tuple(task for group in groups.values() for task in group)


def _read_task(mesh: Mesh, task: TensorTask) -> dict[TensorInfo, jax.Array | np.ndarray]:
    """What a task reads: its sources and base (and Fishers, in float32) as global arrays split
    by rows over the mesh (this process reading only its own devices' rows); a tail, or a tensor
    that is copied, whole."""
    if not task.merged:
        return {info: _read_whole(info) for info in task.infos()}
    shape = padded_shape(task.sources[0].shape, mesh)
    sharding = row_sharding(mesh, len(shape))
    placed = (*task.sources, *([task.base] if task.base is not None else []))
    arrays = {
        info: _read_placed(info, shape, sharding, task.source_dtype)
        for info in dict.fromkeys(placed)
    }
    arrays |= {info: _read_placed(info, shape, sharding, np.float32) for info in task.fishers}
    if task.tail is not None:
        arrays[task.tail] = _read_whole(task.tail)
    return arrays


def _read_whole(info: TensorInfo | OrbaxTensor) -> np.ndarray:
    return read_orbax_tensor(info) if isinstance(info, OrbaxTensor) else read_tensor(info)


def _read_placed(
    info: TensorInfo | OrbaxTensor, shape: tuple[int, ...], sharding: NamedSharding, dtype
) -> jax.Array:
    """A tensor as a global array of `shape` (its rows, then zero rows of padding) and
    `sharding`, cast to `dtype`; this process reads only the rows its own devices hold, each
    device's block one byte range of the safetensors file (used in place on CPU)."""
    if isinstance(info, OrbaxTensor):
        return read_orbax_placed(info, shape, sharding, dtype)
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        if shape:
            first, stop = index[0].start or 0, index[0].stop or shape[0]
            held = info.rows(min(first, info.shape[0]), min(stop, info.shape[0]))
            block = _padded_rows(read_tensor(held), stop - first)
        else:
            block = read_tensor(info)
        block = block if block.dtype == dtype else block.astype(dtype)
        arrays.append(jax.device_put(block, device, may_alias=True))
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _padded_rows(block: np.ndarray, rows: int) -> np.ndarray:
    """`block` with zero rows appended up to `rows` rows (itself when it has them all)."""
    if block.shape[0] == rows:
        return block
    padded = np.zeros((rows, *block.shape[1:]), block.dtype)
    padded[: block.shape[0]] = block
    return padded


def _read_ahead_bytes(tasks: Sequence[TensorTask]) -> int:
    return max([MIN_READ_AHEAD_BYTES, *(t.read_bytes for t in tasks)])


class ReadAhead:
    """Yields (task, what `read(task)` returned) in order, reading in a background thread.

    The thread stays at most `limit_bytes` (by `task.read_bytes`) ahead: it counts the task being
    processed until the consumer asks for the next one, and it always reads the next task when
    nothing is held, however large.
    """

    def __init__(self, tasks: Sequence[Any], read: Callable[[Any], Any], limit_bytes: int):
        self._tasks = list(tasks)
        self._read = read
        self._limit = limit_bytes
        self._held = 0
        self._stopping = False
        self._condition = threading.Condition()
        self._results: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._read_all, name="read-ahead", daemon=True)

    def __enter__(self) -> ReadAhead:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join()

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for task in self._tasks:
            outcome = self._results.get()
            if isinstance(outcome, BaseException):
                raise outcome
            yield task, outcome
            with self._condition:
                self._held -= task.read_bytes
                self._condition.notify_all()

    def _read_all(self) -> None:
        try:
            for task in self._tasks:
                with self._condition:
                    while (
                        not self._stopping
                        and self._held > 0
                        and self._held + task.read_bytes > self._limit
                    ):
                        self._condition.wait()
                    if self._stopping:
                        return
                    self._held += task.read_bytes
                self._results.put(self._read(task))
        except BaseException as err:  # handed to the consumer, which raises it
            self._results.put(err)


class _Leaves:
    """The jitted leaf function of each tensor, compiled ahead in a background thread.

    Compiling for every distinct (shape, dtype, parameters) in task order, while earlier tensors
    merge, keeps compilation off the critical path; a merge waits only for its own compilation.
    """

    def __init__(
        self, method: methods.MergeMethod, tasks: Sequence[TensorTask], seed: int, mesh: Mesh
    ):
        self._method = method.name
        self._mesh = mesh
        self._seed_key = jax.random.key(seed) if method.random else None
        self._weights: dict[tuple[float, ...], jax.Array] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile")
        self._compiled: dict[tuple, concurrent.futures.Future] = {}
        for task in tasks:
            signature = _signature(task)
            if task.merged and signature not in self._compiled:
                self._compiled[signature] = self._executor.submit(self._compile, task)

    def __enter__(self) -> _Leaves:
        return self

    def __exit__(self, *exc_info) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def weights(self, task: TensorTask) -> jax.Array:
        weights = task.settings.weights
        if weights not in self._weights:
            self._weights[weights] = check_weights(weights, len(weights))
        return self._weights[weights]

    def merge(
        self, task: TensorTask, sources: tuple, base, key, fishers: tuple = ()
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(merged rows on the mesh in the output dtype, per-input all-finite flags, whether
        the merged rows are all finite) from `leaf_function`, as `merge` gives them (see
        `placed_leaf`)."""
        self._compiled[_signature(task)].result()
        return self._function(task)(sources, self.weights(task), base, key, fishers)

    def _function(self, task: TensorTask) -> Callable:
        shape = task.sources[0].shape
        params = task.settings.params_key
        return placed_leaf(self._method, params, shape, task.out_dtype, self._mesh)

    def _compile(self, task: TensorTask) -> None:
        shape = padded_shape(task.sources[0].shape, self._mesh)
        sharding = row_sharding(self._mesh, len(shape))
        shaped = jax.ShapeDtypeStruct(shape, task.source_dtype, sharding=sharding)
        base = None if task.base is None else shaped
        key = None if self._seed_key is None else leaf_key(self._seed_key, task.name)
        sources = (shaped,) * len(task.sources)
        fishers = (jax.ShapeDtypeStruct(shape, np.float32, sharding=sharding),) * len(task.fishers)
        self._function(task).lower(sources, self.weights(task), base, key, fishers).compile()


@functools.cache
def placed_leaf(
    method: str, params_key: tuple, shape: tuple[int, ...], out_dtype: np.dtype, mesh: Mesh
) -> Callable:
    """`leaf_function(method, params)` for sources of `shape` split by rows over `mesh`, as
    `_read_task` places them (cached).

    The padding rows are cut off before the leaf sees the sources (and the Fishers, its
    `fisher` input, when there are any) and put back as zeros after it, so the leaf merges
    exactly the tensor (its whole-tensor statistics and random draws are those of one device);
    the result is cast to `out_dtype` and split like the sources, and the all-finite flags are
    on every device.
    """
    leaf = leaf_function(method, dict(params_key), out_dtype)
    padding = padded_shape(shape, mesh)[0] - shape[0] if shape else 0

    def cut(x: jax.Array) -> jax.Array:
        return x[: shape[0]] if padding else x

    def run(sources, weights, base, key, fishers):
        base = None if base is None else cut(base)
        tensors = {FISHER_INPUT: tuple(map(cut, fishers))} if fishers else None
        merged, finite, merged_finite = leaf(tuple(map(cut, sources)), weights, base, key, tensors)
        if padding:
            merged = jnp.pad(merged, [(0, padding)] + [(0, 0)] * (len(shape) - 1))
        return merged, finite, merged_finite

    flags = replicated(mesh)
    return jax.jit(run, out_shardings=(row_sharding(mesh, len(shape)), flags, flags))


def _signature(task: TensorTask) -> tuple:
    """What the compiled leaf of a task depends on."""
    return (
        task.merged,
        task.sources[0].shape,
        task.source_dtype,
        task.base is not None,
        len(task.sources),
        len(task.fishers),
        task.settings.params_key,
        task.out_dtype,
    )


def _merge_tensor(
    plan: MergePlan,
    leaves: _Leaves,
    task: TensorTask,
    arrays: Mapping[TensorInfo, jax.Array | np.ndarray],
    key: jax.Array | None,
) -> tuple[jax.Array | np.ndarray, np.ndarray | None]:
    """The output tensor: its merged rows on the mesh (padded, in the output dtype) and the rows
    copied after them, if any; or a tensor that is copied rather than merged, and None."""
    if not task.merged:
        return _agreed_copy(plan, task, arrays), None
    sources = tuple(arrays[info] for info in task.sources)
    base = None if task.base is None else arrays[task.base]
    fishers = tuple(arrays[info] for info in task.fishers)
    merged, finite, merged_finite = leaves.merge(task, sources, base, key, fishers)
    labelled = plan.input_labels(task)
    for index in np.flatnonzero(~np.asarray(finite)):
        _raise_not_finite(task, *labelled[index])
    if not bool(merged_finite):
        _raise_merge_not_finite(plan, task)
    if task.tail is None:
        return merged, None
    if not bool(_all_finite(arrays[task.tail])):
        _raise_not_finite(task, *labelled[-1])
    tail = arrays[task.tail].astype(task.out_dtype)
    if not bool(_all_finite(tail)):
        raise MergeError(
            f"tensor {task.name!r}: rows copied from {labelled[-1][1]} overflow the output "
            f"dtype {np.dtype(task.out_dtype).name}; nothing was written"
        )
    return merged, tail


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x))


@contextlib.contextmanager
def _safetensors_output(plan: MergePlan, staging: Path) -> Iterator[Callable]:
    """Yields `put(task, merged, tail)`, which writes this process's part of a tensor into the
    planned safetensors shards (`_write_part`).

    Process 0 creates the files (headers, full length) before any process writes; every process
    writes through its own writer thread; at the end, every tensor must be complete, its rows
    counted over all processes.
    """
    if distributed.is_leader():
        create_shard_files(staging, plan.shards)
    distributed.barrier("shard files created")
    with ShardWriter(staging, plan.shards, shared=True) as files:
        with WriteBehind(files) as writer:
            yield functools.partial(_write_part, writer)
        _check_complete(plan, files.rows_written())


def _write_part(
    writer: WriteBehind, task: TensorTask, merged: jax.Array | np.ndarray, tail: np.ndarray | None
) -> None:
    """This process's part of one output tensor: the merged rows its devices hold (each row by
    one process only), and on process 0 the rows copied after them, or a copied tensor."""
    leader = distributed.is_leader()
    if isinstance(merged, np.ndarray):
        if leader:
            writer.write(task.name, merged)
        return
    rows = task.sources[0].shape[0] if task.shape else 1
    for first_row, block in local_rows(merged, rows):
        writer.write_rows(task.name, first_row, block)
    if tail is not None and leader:
        writer.write_rows(task.name, rows, tail)


def _check_complete(plan: MergePlan, rows_written: Mapping[str, int]) -> None:
    """Raise OutputError unless every row of every planned tensor was written, counting the rows
    that each process wrote."""
    tensors = [tensor for shard in plan.shards for tensor in shard.tensors]
    written = distributed.sum_over_processes(np.array([rows_written[t.name] for t in tensors]))
    for tensor, count in zip(tensors, written, strict=True):
        rows = tensor.shape[0] if tensor.shape else 1
        if count != rows:
            raise OutputError(
                f"the output is incomplete: {count} of the {rows} rows of tensor "
                f"{tensor.name!r} were written"
            )


@contextlib.contextmanager
def _orbax_output(plan: MergePlan, staging: Path) -> Iterator[Callable]:
    """Yields `put(task, merged, tail)`, which keeps each output tensor whole on the mesh
    (`_assembled`); at the end all are saved as one Orbax checkpoint, every process writing the
    shards its devices hold."""
    tensors: dict[str, jax.Array | np.ndarray] = {}

    def keep(task: TensorTask, merged: jax.Array | np.ndarray, tail: np.ndarray | None):
        whole = isinstance(merged, np.ndarray)
        tensors[task.name] = merged if whole else _assembled(merged, tail, task.shape)

    yield keep
    save_params(staging, tensors)


def _assembled(merged: jax.Array, tail: np.ndarray | None, shape: tuple[int, ...]) -> jax.Array:
    """The output tensor of exactly `shape`: the merged rows without their padding, then the
    tail's rows, split over the mesh by `even_sharding`."""
    sharding = even_sharding(merged.sharding.mesh, shape)
    return _assembler(shape, sharding)(merged, tail)


@functools.cache
def _assembler(shape: tuple[int, ...], sharding: NamedSharding) -> Callable:
    """The jitted `_assembled` for one shape and output sharding (cached)."""

    def assemble(merged: jax.Array, tail: jax.Array | None) -> jax.Array:
        if not shape:
            return merged
        if tail is None:
            return merged[: shape[0]]
        return jnp.concatenate([merged[: shape[0] - tail.shape[0]], tail])

    return jax.jit(assemble, out_shardings=sharding)


def _raise_not_finite(task: TensorTask, info: TensorInfo, label: str) -> None:
    raise MergeError(
        f"tensor {task.name!r}: {label} holds NaN or Inf values (file {info.file}); "
        "nothing was written"
    )


def _raise_merge_not_finite(plan: MergePlan, task: TensorTask) -> None:
    what = describe_merge(plan.method.name, task.settings.params, task.settings.weights)
    raise MergeError(
        f"tensor {task.name!r}: {what} gives NaN or Inf values in the output dtype "
        f"{np.dtype(task.out_dtype).name} (from finite sources); nothing was written"
    )


def _agreed_copy(
    plan: MergePlan, task: TensorTask, arrays: Mapping[TensorInfo, np.ndarray]
) -> np.ndarray:
    """A non-float tensor (an index, a mask) is copied if every model holds the same values."""
    labelled = plan.input_labels(task)
    first, first_label = labelled[0]
    for info, label in labelled[1:]:
        if not np.array_equal(arrays[info], arrays[first]):
            raise MergeError(
                f"tensor {task.name!r} is not floating point ({info.dtype}) and differs between "
                f"{first_label} and {label} (file {info.file}), so it cannot be merged"
            )
    return arrays[first].astype(task.out_dtype, copy=False)


def _write_side_files(plan: MergePlan, directory: Path) -> None:
    """Index (when sharded), config.json, generation and tokenizer files, and the model card."""
    config = plan.config
    if config.format == "safetensors" and len(plan.shards) > 1:
        write_index(directory, plan.shards)
    model_config = output_model_config(plan.reference.config, config.dtype, plan.tie_embeddings)
    write_json(directory / "config.json", model_config)
    names = GENERATION_FILES + (TOKENIZER_FILES if config.copy_tokenizer else ())
    copy_files(plan.reference.path, directory, names)
    card = model_card(
        title=config.output.name,
        method=plan.method.name,
        method_summary=plan.method.summary
        + (", with each model's diagonal Fisher (params.fisher)" if config.fisher else ""),
        method_reference=plan.method.reference,
        models=[(m.path, m.weight) for m in config.models],
        base_model=config.base_model,
        resolved_config=config.to_dict(),
    )
    (directory / "README.md").write_text(card, encoding="utf-8")
