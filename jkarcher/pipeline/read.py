"""Reading a merge's inputs (docs/design.md, "Data flow"): each task's tensors placed on the mesh,
read ahead in a background thread.

On a mesh of several devices, and over several processes (`jkarcher.distributed`), each merged
tensor is split by rows over every device (`jkarcher.sharding`), and a process reads only the
rows its own devices hold (`StoredTensor.read_placed`: whatever the checkpoint's format). Peak
memory is about the bytes of the largest task, not the model size: tasks read ahead are held to
READ_AHEAD_BYTES (less under a small memory budget: `jkarcher.pipeline.budget`), and a larger
task is read alone.
"""

from __future__ import annotations

import concurrent.futures
import functools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jkarcher.io import StoredTensor
from jkarcher.pipeline.statistics import statistic_placement
from jkarcher.pipeline.tasks import TensorTask
from jkarcher.sharding import padded_shape, row_sharding

# Reading ahead holds at most this many bytes of tasks; a larger task is read once nothing is held.
# (Holding as much as the largest task, e.g. a 0.5B model's embedding in four models, 1.1 GB, let
# its small tasks pile up in memory beside the buffers that the embedding had used.)
READ_AHEAD_BYTES = 512 * 2**20
# The tensors of a task read at once.
PARALLEL_TENSOR_READS = 8


def read_task(mesh: Mesh, task: TensorTask) -> dict[StoredTensor, jax.Array | np.ndarray]:
    """What a task reads: its sources and base as global arrays split by rows over the mesh
    (this process reading only its own devices' rows), and its statistics in float32 as
    `statistic_placement` places them; the extra rows, or a tensor that is copied rather than
    merged, whole. The tensors are read in parallel."""
    if not task.floating:
        reads = {info: _pool().submit(info.read) for info in task.infos()}
        return {info: read.result() for info, read in reads.items()}
    shape = padded_shape(task.sources[0].shape, mesh)
    sharding = row_sharding(mesh, len(shape))
    placed = (*task.sources, *([task.base] if task.base is not None else []))
    reads = {
        info: _pool().submit(info.read_placed, shape, sharding, task.source_dtype)
        for info in dict.fromkeys(placed)
    }
    for info in task.statistics:
        placed_as = statistic_placement(task.statistic, task.sources[0].shape, info.shape, mesh)
        reads[info] = _pool().submit(info.read_placed, *placed_as, np.float32)
    if task.extra_rows is not None:
        reads[task.extra_rows] = _pool().submit(task.extra_rows.read)
    return {info: read.result() for info, read in reads.items()}


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(PARALLEL_TENSOR_READS, "tensor-read")


class ReadAhead:
    """Yields (task, what `read(task)` returned) in order, reading in a background thread.

    The thread stays at most min(`limit_bytes`, READ_AHEAD_BYTES) ahead (by `task.read_bytes`):
    it counts the task being processed until the consumer asks for the next one, and it always
    reads the next task when nothing is held, however large.
    """

    def __init__(
        self, tasks: Sequence[Any], read: Callable[[Any], Any], limit_bytes: int | None = None
    ):
        self._tasks = list(tasks)
        self._read = read
        self._limit = min(READ_AHEAD_BYTES, limit_bytes or READ_AHEAD_BYTES)
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
