"""Writing a merge's output (docs/design.md, "Data flow"): the tensors into planned safetensors
shards or one Orbax checkpoint, then the side files.

For safetensors output, each process writes its devices' rows of each merged tensor straight
into their planned places in the shared output files, through a writer thread; process 0 writes
what is copied rather than merged; at the end every row of every tensor must have been written,
counted over all processes. Orbax output (`format="orbax"`) instead keeps the merged tensors on
the mesh, each device its part, and saves them at the end as one Orbax checkpoint, each process
writing its own shards; its peak memory is the output model, spread over the devices.

The side files come from the plan's template model: config.json (with the output's dtype and
tying), the generation config and tokenizer files, and the model card.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jkarcher import distributed
from jkarcher.io.chat_template import write_chat_template
from jkarcher.io.hf import TOKENIZER_FILES, copy_files, output_model_config, side_files
from jkarcher.io.model_card import model_card
from jkarcher.io.orbax_io import save_params
from jkarcher.io.output_dir import OutputError
from jkarcher.io.tokenizer_files import write_tokenizer
from jkarcher.io.writer import (
    Shard,
    ShardWriter,
    WriteBehind,
    create_shard_files,
    write_index,
    write_json,
)
from jkarcher.pipeline.tasks import MergePlan, TensorTask
from jkarcher.pipeline.tokenizer import OutputVocabulary
from jkarcher.sharding import even_sharding, local_rows

# put(task, merged, extra_rows): hands one output tensor to the output.
Put = Callable[[TensorTask, jax.Array | np.ndarray, np.ndarray | None], None]


@contextlib.contextmanager
def output_errors(output: Path) -> Iterator[None]:
    """OSErrors of the block (the output's files and directories) as one-line OutputErrors."""
    try:
        yield
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        raise OutputError(
            f"writing output {output} failed: {err.strerror or err}{where}; nothing was written"
        ) from None


@contextlib.contextmanager
def safetensors_output(plan: MergePlan, staging: Path) -> Iterator[Put]:
    """Yields `put(task, merged, extra_rows)`, which writes this process's part of a tensor
    into the planned safetensors shards (`write_part`).

    Process 0 creates the files (headers, full length) before any process writes; every process
    writes through its own writer thread; at the end, every tensor must be complete, its rows
    counted over all processes (`check_complete`).
    """
    if distributed.is_leader():
        create_shard_files(staging, plan.shards)
    distributed.barrier("shard files created")
    with ShardWriter(staging, plan.shards, shared=True) as files:
        with WriteBehind(files) as writer:
            yield functools.partial(write_part, writer)
        check_complete(plan.shards, files.rows_written())


MERGEKIT_CONFIG_NAME = "mergekit_config.yml"  # where mergekit keeps the config of a merge


def write_part(
    writer: WriteBehind,
    task: TensorTask,
    merged: jax.Array | np.ndarray,
    extra_rows: np.ndarray | None,
) -> None:
    """This process's part of one output tensor (or of a block of its rows, from
    `task.first_row`): the merged rows its devices hold (each row by one process only), and on
    process 0 the extra rows copied after them, or a copied tensor (`merged` a NumPy array)."""
    leader = distributed.is_leader()
    if isinstance(merged, np.ndarray):
        if leader:
            writer.write(task.name, merged)
        return
    rows = task.sources[0].shape[0] if task.shape else 1
    for first_row, block in local_rows(merged, rows):
        writer.write_rows(task.name, task.first_row + first_row, block)
    if extra_rows is not None and leader:
        writer.write_rows(task.name, task.first_row + rows, extra_rows)


def check_complete(shards: Sequence[Shard], rows_written: Mapping[str, int]) -> None:
    """Raise OutputError unless every row of every tensor of `shards` was written, counting the
    rows that each process wrote (`rows_written`: this process's count, by tensor name)."""
    tensors = [tensor for shard in shards for tensor in shard.tensors]
    written = distributed.sum_over_processes(np.array([rows_written[t.name] for t in tensors]))
    for tensor, count in zip(tensors, written, strict=True):
        rows = tensor.shape[0] if tensor.shape else 1
        if count != rows:
            raise OutputError(
                f"the output is incomplete: {count} of the {rows} rows of tensor "
                f"{tensor.name!r} were written"
            )


@contextlib.contextmanager
def orbax_output(plan: MergePlan, staging: Path) -> Iterator[Put]:
    """Yields `put(task, merged, extra_rows)`, which keeps each output tensor whole on the mesh
    (`_assembled`); at the end all are saved as one Orbax checkpoint, every process writing the
    shards its devices hold."""
    tensors: dict[str, jax.Array | np.ndarray] = {}

    def keep(task: TensorTask, merged: jax.Array | np.ndarray, extra_rows: np.ndarray | None):
        whole = isinstance(merged, np.ndarray)
        tensors[task.name] = merged if whole else _assembled(merged, extra_rows, task.shape)

    yield keep
    save_params(staging, tensors)


def _assembled(
    merged: jax.Array, extra_rows: np.ndarray | None, shape: tuple[int, ...]
) -> jax.Array:
    """The output tensor of exactly `shape`: the merged rows without their padding, then the
    extra rows, split over the mesh by `even_sharding`."""
    sharding = even_sharding(merged.sharding.mesh, shape)
    return _assembler(shape, sharding)(merged, extra_rows)


@functools.cache
def _assembler(shape: tuple[int, ...], sharding: NamedSharding) -> Callable:
    """The jitted `_assembled` for one shape and output sharding (cached)."""

    def assemble(merged: jax.Array, extra_rows: jax.Array | None) -> jax.Array:
        if not shape:
            return merged
        if extra_rows is None:
            return merged[: shape[0]]
        return jnp.concatenate([merged[: shape[0] - extra_rows.shape[0]], extra_rows])

    return jax.jit(assemble, out_shardings=sharding)


def write_vocabulary(directory: Path, vocabulary: OutputVocabulary) -> None:
    """The output's tokenizer files: those of the vocabulary's source model, its tokenizer.json
    with the vocabulary's added tokens."""
    copy_files(vocabulary.source, directory, TOKENIZER_FILES)
    if vocabulary.added:
        write_tokenizer(directory, vocabulary.source, vocabulary.added, vocabulary.vocab)


def write_side_files(plan: MergePlan, directory: Path) -> None:
    """Index (when sharded), config.json, generation and tokenizer files (with the plan's chat
    template), the model card, and for a merge from a mergekit YAML that YAML as
    mergekit_config.yml."""
    config = plan.config
    if config.format == "safetensors" and len(plan.shards) > 1:
        write_index(directory, plan.shards)
    model_config = output_model_config(plan.template.config, config.dtype, plan.tie_embeddings)
    model_config |= plan.config_updates
    write_json(directory / "config.json", model_config)
    tokenizer_copied = config.copy_tokenizer and plan.vocabulary is None
    copy_files(plan.template.path, directory, side_files(tokenizer_copied))
    if plan.vocabulary is not None:
        write_vocabulary(directory, plan.vocabulary)
    if plan.chat_template is not None:
        write_chat_template(directory, plan.chat_template)
    card = model_card(
        title=config.output.name,
        method=plan.method.name,
        method_summary=plan.method.summary
        + (", with each model's diagonal Fisher (params.fisher)" if config.fisher else "")
        + (", with each model's input Grams (params.gram)" if config.gram else ""),
        method_citation=plan.method.citation,
        models=[(m.path, m.weight) for m in config.all_models],
        base_model=config.base_model,
        resolved_config={k: v for k, v in config.to_dict().items() if k != "mergekit_config"},
        mergekit_config=config.mergekit_config,
    )
    (directory / "README.md").write_text(card, encoding="utf-8")
    if config.mergekit_config is not None:
        (directory / MERGEKIT_CONFIG_NAME).write_text(config.mergekit_config, encoding="utf-8")
