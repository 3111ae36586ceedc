"""The memory budget of a merge (docs/design.md, "Memory"): what a run may hold, and each
tensor cut into blocks of rows that fit it.

A run holds, besides a fixed overhead (the interpreter, JAX and its compiled leaves): the
inputs of the task being merged with those read ahead, free read buffers kept for reuse, the
leaf's float32 scratch and output, and the outputs waiting for the writer. `Budget` splits the
total between them; a task (one tensor, or one block of its rows) must fit its share,
`Budget.task`: its inputs, the leaf's scratch (`MergeMethod.scratch`, float32 copies of one
source) and its output. A tensor that does not fit is merged in blocks of rows, as its method
declares (`MergeMethod.blocked`): block by block where rows merge independently (ROWS), or in
passes where the merge needs whole-tensor statistics (`Passes`: rounds of the blocks'
statistics first, then each block's rows). Any other tensor that does not fit is refused before
any work, with the budget that would merge it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from jkarcher import methods
from jkarcher.blocked import APPLY, BOTH, MERGE, STATISTICS
from jkarcher.config.fields import size_text
from jkarcher.errors import MergeError
from jkarcher.memory import Budget, default_budget
from jkarcher.methods.registry import ROWS, Passes
from jkarcher.numerics import compute_dtype
from jkarcher.pipeline.tasks import MergePlan, TensorTask


def within_budget(plan: MergePlan) -> MergePlan:
    """`plan` with its budget (`config.memory`, else `default_budget()`; an Orbax output's
    tensors, kept to the end, come off it) and every task that does not fit it cut into blocks
    (`blocked_tasks`)."""
    budget = Budget(plan.config.memory or default_budget(), _held_outputs(plan))
    if budget.task <= 0:
        least = max(
            Budget(0, budget.held).total_for(
                task_bytes(t, plan.method) + statistics_bytes(t, plan.method), _output_bytes(t)
            )
            for t in plan.tasks
        )
        raise MergeError(
            f"an {plan.config.format} output keeps every merged tensor until it is saved, "
            f"{size_text(budget.held)} in this process, within the memory budget of "
            f"{size_text(budget.total)}; memory={size_text(least)} or more would merge it, or "
            'format="safetensors", which writes as it goes'
        )
    tasks = [
        block
        for task in plan.tasks
        for block in blocked_tasks(task, plan.method, budget, plan.config.format)
    ]
    return dataclasses.replace(plan, tasks=tuple(tasks), budget=budget)


def _held_outputs(plan: MergePlan) -> int:
    """The bytes of merged tensors that this process keeps until the end: with an Orbax output,
    its share of every output tensor (none with safetensors, which are written as they come)."""
    if plan.config.format == "safetensors":
        return 0
    return sum(_output_bytes(t) for t in plan.tasks) // jax.process_count()


def _output_bytes(task: TensorTask) -> int:
    return math.prod(task.shape) * np.dtype(task.out_dtype).itemsize


def task_bytes(task: TensorTask, method: methods.MergeMethod, rows: int | None = None) -> int:
    """The bytes a task holds while it merges (of its first `rows` rows, if given): its inputs,
    the leaf's scratch and its output."""
    infos = task.infos()
    if rows is None or not task.shape:
        inputs = sum(info.nbytes for info in infos)
        elements = math.prod(task.sources[0].shape)
    else:
        total_rows = task.sources[0].shape[0]
        # Inputs cut like the sources count by the row; the rest (the extra rows of a
        # vocabulary, Grams) whole, as a block may read them whole.
        inputs = sum(
            info.nbytes // max(total_rows, 1) * rows
            if info.shape[:1] == (total_rows,)
            else info.nbytes
            for info in infos
        )
        elements = rows * math.prod(task.sources[0].shape[1:])
    if not task.floating:
        return inputs + elements * np.dtype(task.out_dtype).itemsize
    copies = method.scratch_copies(
        task.settings.params, len(task.sources), bool(task.statistics), task.sources[0].shape
    )
    scratch = copies * elements * compute_dtype().itemsize
    return inputs + math.ceil(scratch) + elements * np.dtype(task.out_dtype).itemsize


def statistics_bytes(task: TensorTask, method: methods.MergeMethod) -> int:
    """The most bytes of a round's statistics of a whole tensor (`Passes`), held until its
    `finish` (twice, where the blocks' partials add into a running sum); 0 for a task merged
    in one pass."""
    passes = _passes(task, method)
    if passes is None:
        return 0
    held = 0
    for step in passes.rounds:
        sums = step.sums(task.sources[0].shape, len(task.sources))
        held = max(held, (1 + step.added) * math.prod(sums.shape) * sums.dtype.itemsize)
    return held


def _passes(task: TensorTask, method: methods.MergeMethod) -> Passes | None:
    """The method's `Passes` for a task, where it merges the task in passes (never with a
    tensor input, which `Passes` take none of)."""
    form = method.blocked(task.settings.params) if task.floating else None
    return form if isinstance(form, Passes) and not task.statistics else None


def blocked_tasks(
    task: TensorTask, method: methods.MergeMethod, budget: Budget, output_format: str
) -> list[TensorTask]:
    """The task itself when it fits `budget.task`; else its rows cut into the fewest blocks
    that fit, merged as the method declares (module docstring); else a MergeError naming the
    tensor, what it needs and the budget that would merge it whole."""
    out_row_bytes = np.dtype(task.out_dtype).itemsize * math.prod(task.shape[1:])
    rows = task.sources[0].shape[0] if task.shape else 1
    form = method.blocked(task.settings.params) if task.floating else None
    held = statistics_bytes(task, method)
    need = task_bytes(task, method) + held
    if need <= budget.task and rows * out_row_bytes <= budget.queued_outputs // 2:
        passes = _passes(task, method)
        in_passes = passes is not None and not passes.own_leaf_when_whole
        return [dataclasses.replace(task, stage=BOTH) if in_passes else task]
    why = _unblockable(task, method, form, output_format)
    if why is not None:
        raise MergeError(
            f"tensor {task.name!r}: {why}, which needs {size_text(need)} within the memory "
            f"budget of {size_text(budget.total)}; "
            f"memory={size_text(budget.total_for(need, rows * out_row_bytes))} "
            "or more would merge it"
        )
    per_block = _most_rows(
        lambda r: (
            task_bytes(task, method, r) + held <= budget.task
            and r * out_row_bytes <= budget.queued_outputs // 2
        ),
        rows,
    )
    if per_block < 1:
        least = task_bytes(task, method, 1) + held
        suggested = budget.total_for(least, out_row_bytes)
        raise MergeError(
            f"tensor {task.name!r}: a block of one row needs {size_text(least)} (with the "
            f"statistics of the whole tensor, {size_text(held)}) within the memory "
            f"budget of {size_text(budget.total)}; memory={size_text(suggested)} or more would "
            "merge it"
        )
    bounds = [(first, min(first + per_block, rows)) for first in range(0, rows, per_block)]
    if form == ROWS:
        return [_block(task, first, stop, MERGE, stop == rows) for first, stop in bounds]
    gather = [
        dataclasses.replace(_block(task, first, stop, STATISTICS, False), pass_round=index)
        for index in range(len(form.rounds))
        for first, stop in bounds
    ]
    return gather + [_block(task, first, stop, APPLY, stop == rows) for first, stop in bounds]


def _most_rows(fits, rows: int) -> int:
    """The most rows r in [0, rows] for which `fits(r)` holds (`fits` false past some r)."""
    low, high = 0, rows
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def _unblockable(
    task: TensorTask, method: methods.MergeMethod, form, output_format: str
) -> str | None:
    """Why `task` must be merged whole (None: it can be merged in blocks of rows)."""
    if not task.floating:
        return "a tensor that is copied is read whole"
    if form is None:
        return f"method {method.name!r} merges every tensor whole"
    if len(task.sources[0].shape) < 2:
        return "a tensor of fewer than two axes is merged whole"
    if output_format != "safetensors":
        return f"an {output_format} output is written whole"
    if isinstance(form, Passes) and task.statistics:
        return f"with a {task.statistic}, its method merges every tensor whole"
    if any(info.shape[:1] != task.sources[0].shape[:1] for info in task.statistics):
        return f"its {task.statistic} is read whole"
    return None


def _block(task: TensorTask, first: int, stop: int, stage: str, last: bool) -> TensorTask:
    """Rows [first, stop) of `task` at `stage`; the extra rows only with the last block."""
    return dataclasses.replace(
        task,
        sources=tuple(info.rows(first, stop) for info in task.sources),
        base=None if task.base is None else task.base.rows(first, stop),
        statistics=tuple(info.rows(first, stop) for info in task.statistics),
        extra_rows=task.extra_rows if last else None,
        first_row=first,
        stage=stage,
    )
