"""Running a merge plan (docs/design.md, "Data flow"): read ahead, merge, write, rename.

`run(plan)` merges the tensors in `execution_order`: a background thread reads the next tensors
(`jkarcher.pipeline.read`) while the current one merges in its leaf function, which a second
thread compiled ahead (`jkarcher.pipeline.compile`); a third streams each result into the output
(`jkarcher.pipeline.write`); config, tokenizer files and model card follow, and the finished
directory is renamed into place. Every input and every merged tensor is checked finite, and a
tensor that is not floating point is copied only when every model holds the same values.

With several processes (`jkarcher.distributed`), every process runs the same plan on its own
devices' rows; process 0 renames the output into place once every process has written its part
and every tensor is complete.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jkarcher import distributed
from jkarcher.blocked import APPLY, STATISTICS
from jkarcher.errors import MergeError
from jkarcher.io import StoredTensor
from jkarcher.io.buffers import limit_free_buffers
from jkarcher.merge import describe_merge
from jkarcher.numerics import all_finite, first_disagreeing
from jkarcher.pipeline.compile import LeafCompiler, leaf_signature, task_key
from jkarcher.pipeline.read import ReadAhead, read_task
from jkarcher.pipeline.tasks import MergePlan, TensorTask
from jkarcher.pipeline.write import (
    orbax_output,
    output_errors,
    safetensors_output,
    write_side_files,
)


@dataclasses.dataclass(frozen=True)
class MergeSummary:
    """What a finished merge did."""

    output: Path
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    # Distinct leaf functions, how many of them were loaded from the compile cache rather than
    # compiled, and the seconds spent on them (in a background thread, overlapped with reading
    # and merging).
    compilations: int
    loaded: int
    compile_seconds: float
    # Where the main thread's time went, in seconds: waiting for the read-ahead thread, merging
    # (a tensor's leaf, with any wait for its compilation), handing results to the writer, and
    # the rest (opening the output, side files, the rename).
    phases: Mapping[str, float]

    def __str__(self) -> str:
        rate = self.bytes_read / max(self.seconds, 1e-9) / 1e9
        split = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items())
        return (
            f"merged {self.tensors} tensors: {self.bytes_read / 1e9:.2f} GB read, "
            f"{self.bytes_written / 1e9:.2f} GB written in {self.seconds:.1f} s "
            f"({rate:.2f} GB/s read) -> {self.output}\n"
            f"  time: {split}; {self.compilations} leaves ({self.loaded} from the compile "
            f"cache) ready in {self.compile_seconds:.1f} s in the background"
        )


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
    phases = dict.fromkeys(("waiting for reads", "merging", "writing"), 0.0)
    key = jax.random.key(plan.config.seed) if plan.method.random else None
    order = execution_order(plan)
    limit_free_buffers(plan.budget.free_buffers)
    passes = Statistics()
    output = orbax_output if plan.config.format == "orbax" else safetensors_output
    with (
        output_errors(plan.config.output),
        distributed.staged_output(plan.config.output, plan.config.overwrite) as staging,
    ):
        with (
            LeafCompiler(plan.method, order, plan.config.seed, plan.mesh) as leaves,
            ReadAhead(
                order, functools.partial(read_task, plan.mesh), plan.budget.read_ahead
            ) as reads,
            output(plan, staging) as put,
        ):
            for task, arrays in _timed(reads, phases, "waiting for reads"):
                tensor_key = task_key(key, task, plan.method)
                lap = time.perf_counter()
                merged = merge_tensor(plan, leaves, task, arrays, tensor_key, passes)
                phases["merging"] += time.perf_counter() - lap
                if task.stage != STATISTICS:
                    lap = time.perf_counter()
                    put(task, *merged)
                    phases["writing"] += time.perf_counter() - lap
                del arrays, merged
                if on_tensor is not None:
                    on_tensor(task)
        if distributed.is_leader():
            write_side_files(plan, staging)
    seconds = time.perf_counter() - start
    phases["other"] = seconds - sum(phases.values())
    return MergeSummary(
        output=plan.config.output,
        tensors=plan.tensor_count,
        bytes_read=plan.bytes_to_read,
        bytes_written=plan.bytes_to_write,
        seconds=seconds,
        compilations=leaves.compilations,
        loaded=leaves.loaded,
        compile_seconds=leaves.compile_seconds,
        phases=phases,
    )


def _timed(items: Iterable, phases: dict[str, float], phase: str) -> Iterator:
    """The items of `items`, the seconds spent waiting for each added to `phases[phase]`."""
    iterator = iter(items)
    while True:
        lap = time.perf_counter()
        item = next(iterator, _DONE)
        phases[phase] += time.perf_counter() - lap
        if item is _DONE:
            return
        yield item


_DONE = object()


def execution_order(plan: MergePlan) -> tuple[TensorTask, ...]:
    """The order to merge the plan's tasks in: grouped by the leaf they compile to
    (`leaf_signature`), groups in order of first appearance; the blocks of a tensor merged in
    passes together, in the plan's order (each round before the next, the last before APPLY).

    Each group merges while the next group's leaf compiles, instead of every layer waiting for
    new compilations. The output files keep the planned layout whatever the order.
    """
    groups: dict[tuple, list[TensorTask]] = {}
    for task in plan.tasks:
        in_passes = task.stage in (STATISTICS, APPLY)
        group = ("passes", task.name) if in_passes else leaf_signature(plan.method.name, task)
        groups.setdefault(group, []).append(task)
    return tuple(task for group in groups.values() for task in group)


class Statistics:
    """What the rounds of statistics of the tensors merged in passes (`jkarcher.blocked`)
    gather block by block, and what each round's `finish` found from them."""

    def __init__(self):
        self._partials: dict[tuple[str, int], list[jax.Array]] = {}
        self._found: dict[tuple[str, int], Any] = {}

    def add(self, leaves: LeafCompiler, task: TensorTask, partials: jax.Array) -> None:
        """Keep a block's partials of its round: in row order, or added into one running sum
        where the round's partials add."""
        kept = self._partials.setdefault((task.name, task.pass_round), [])
        if kept and leaves.round_adds(task):
            kept[0] = kept[0] + partials
        else:
            kept.append(partials)

    def found(self, leaves: LeafCompiler, task: TensorTask) -> Any:
        """What the rounds before `task` found (None in the first round): at STATISTICS, the
        round before its own; at APPLY, the last. Each round's `finish` runs once, at the first
        task that needs it, and drops that round's partials."""
        if task.stage == STATISTICS:
            return self._finished(leaves, task, task.pass_round - 1)
        return self._finished(leaves, task, leaves.rounds(task) - 1)

    def _finished(self, leaves: LeafCompiler, task: TensorTask, index: int) -> Any:
        if index < 0:
            return None
        if (task.name, index) not in self._found:
            before = self._finished(leaves, task, index - 1)
            partials = self._partials.pop((task.name, index))
            self._found[task.name, index] = leaves.finish(task, index, partials, before)
        return self._found[task.name, index]


def merge_tensor(
    plan: MergePlan,
    leaves: LeafCompiler,
    task: TensorTask,
    arrays: Mapping[StoredTensor, jax.Array | np.ndarray],
    key: jax.Array | None,
    passes: Statistics,
) -> tuple[jax.Array | np.ndarray, np.ndarray | None]:
    """The output tensor from what `read_task` read: its merged rows on the mesh (padded, in
    the output dtype) and the extra rows copied after them, if any; or a tensor that is copied
    rather than merged, and None. A block's round of statistics (`task.stage`) keeps its
    partials in `passes` and returns them. A NaN or Inf in an input or the result is a
    MergeError."""
    if not task.floating:
        return _agreed_copy(plan, task, arrays), None
    sources = tuple(arrays[info] for info in task.sources)
    base = None if task.base is None else arrays[task.base]
    statistics = tuple(arrays[info] for info in task.statistics)
    found = passes.found(leaves, task) if task.stage in (STATISTICS, APPLY) else None
    merged, finite, merged_finite = leaves.merge(task, sources, base, key, statistics, found)
    labelled = plan.input_labels(task)
    for index in np.flatnonzero(~np.asarray(finite)):
        _raise_not_finite(task, *labelled[index])
    if task.stage == STATISTICS:
        passes.add(leaves, task, merged)
        return merged, None
    if not bool(merged_finite):
        what = describe_merge(plan.method.name, task.settings.params, task.settings.weights)
        raise MergeError(
            f"tensor {task.name!r}: {what} gives NaN or Inf values in the output dtype "
            f"{np.dtype(task.out_dtype).name} (from finite sources); nothing was written"
        )
    if task.extra_rows is None:
        return merged, None
    if not bool(_all_finite_rows(arrays[task.extra_rows])):
        _raise_not_finite(task, *labelled[-1])
    extra_rows = arrays[task.extra_rows].astype(task.out_dtype)
    if not bool(_all_finite_rows(extra_rows)):
        raise MergeError(
            f"tensor {task.name!r}: rows copied from {labelled[-1][1]} overflow the output "
            f"dtype {np.dtype(task.out_dtype).name}; nothing was written"
        )
    return merged, extra_rows


_all_finite_rows = jax.jit(lambda rows: all_finite([rows])[0])


def _raise_not_finite(task: TensorTask, info: StoredTensor, label: str) -> None:
    raise MergeError(
        f"tensor {task.name!r}: {label} holds NaN or Inf values (file {info.file}); "
        "nothing was written"
    )


def _agreed_copy(
    plan: MergePlan, task: TensorTask, arrays: Mapping[StoredTensor, np.ndarray]
) -> np.ndarray:
    """A non-float tensor (an index, a mask) is copied if every model holds the same values."""
    labelled = plan.input_labels(task)
    index = first_disagreeing([arrays[info] for info, _ in labelled])
    if index is not None:
        info, label = labelled[index]
        raise MergeError(
            f"tensor {task.name!r} is not floating point ({info.dtype}) and differs between "
            f"{labelled[0][1]} and {label} (file {info.file}), so it cannot be merged"
        )
    return arrays[labelled[0][0]].astype(task.out_dtype, copy=False)
