"""The leaf functions of a merge, placed on the mesh and compiled ahead (docs/design.md, "Data
flow").

Each merged tensor runs `jkarcher.merge.leaf_function(method, params)`, the very function behind
`jkarcher.merge`, so both give identical values; on a mesh, XLA adds the collectives that
whole-tensor statistics need (`placed_leaf`). A `LeafCompiler` compiles, in a background thread,
one leaf for each distinct `leaf_signature` in task order, so that compilation stays off the
critical path: a merge waits only for its own leaf.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jkarcher import blocked, compile_cache, methods
from jkarcher.merge import leaf_key, split_params, traced_arguments
from jkarcher.methods.sparsify import RowKey
from jkarcher.pipeline.placed import placed_leaf
from jkarcher.pipeline.statistics import statistic_placement
from jkarcher.pipeline.tasks import TensorTask
from jkarcher.sharding import padded_shape, replicated, row_sharding


def leaf_signature(method: str, task: TensorTask) -> tuple:
    """What the compiled leaf of a task depends on: tasks with equal signatures share one
    compilation (the weights and the traced parameters' values are arguments and take no part;
    whether a traced parameter is one value or one per model does)."""
    static, traced = split_params(method, task.settings.params)
    return (
        task.floating,
        task.sources[0].shape,
        task.source_dtype,
        task.base is not None,
        len(task.sources),
        task.statistic if task.statistics else None,
        len(task.statistics),
        static,
        jax.tree.structure(traced),
        task.out_dtype,
        task.stage,
        task.pass_round,
    )


class LeafCompiler:
    """The jitted leaf function of each tensor, compiled ahead in a background thread.

    Compiling for every distinct `leaf_signature` in task order, while earlier tensors merge,
    keeps compilation off the critical path; a merge waits only for its own compilation.
    """

    def __init__(
        self, method: methods.MergeMethod, tasks: Sequence[TensorTask], seed: int, mesh: Mesh
    ):
        self._method = method.name
        self._mesh = mesh
        self._seed_key = jax.random.key(seed) if method.random else None
        self._weights: dict[tuple[float, ...], jax.Array] = {}
        self._traced: dict[tuple, dict[str, Any]] = {}
        self._compile_seconds = 0.0
        self._loaded = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile")
        self._compiled: dict[tuple, concurrent.futures.Future] = {}
        # Each tensor merged in passes: the shape of its whole sources, whose statistics each
        # round's `finish` takes (the rows of every block).
        self._whole_shapes: dict[str, tuple[int, ...]] = {}
        for task in tasks:
            first_round = task.stage == blocked.STATISTICS and task.pass_round == 0
            if first_round or task.stage == blocked.BOTH:
                rows, *rest = task.sources[0].shape or (1,)
                before = self._whole_shapes.get(task.name, (0,))[0]
                self._whole_shapes[task.name] = (before + rows, *rest)
        for task in tasks:
            for compiled in self._compiled_tasks(task) if task.floating else ():
                signature = leaf_signature(self._method, compiled)
                if signature not in self._compiled:
                    self._compiled[signature] = self._executor.submit(self._compile, compiled)
            for index in self._rounds_finished(task):
                signature = self._finish_signature(task, index)
                if signature not in self._compiled:
                    compiling = self._executor.submit(self._compile_finish, task, index)
                    self._compiled[signature] = compiling

    def __enter__(self) -> LeafCompiler:
        return self

    def __exit__(self, *exc_info) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def weights(self, task: TensorTask) -> jax.Array:
        """The task's weights, checked as the method takes them (`MergeMethod.checked_weights`),
        once per distinct weights and parameters."""
        weights = task.settings.weights
        cached = (weights, task.settings.params_key)
        if cached not in self._weights:
            spec = methods.get(self._method)
            params = task.settings.params
            self._weights[cached] = spec.checked_weights(weights, len(weights), params)
        return self._weights[cached]

    def merge(
        self, task: TensorTask, sources: tuple, base, key, statistics: tuple = (), found=None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(merged rows on the mesh in the output dtype, per-input all-finite flags, whether
        the merged rows are all finite) from `leaf_function`, as `merge` gives them (see
        `placed_leaf`); at the task's stage (`jkarcher.blocked`): a block's partials from what
        the round before `found`, or its rows from what every round found; at BOTH, every pass
        in turn."""
        weights, traced = self.weights(task), self.traced_params(task)
        first_row = np.int32(task.first_row)
        if task.stage == blocked.BOTH:
            *gathers, apply = (
                self._compiled[leaf_signature(self._method, t)].result()
                for t in self._compiled_tasks(task)
            )
            finite = None
            for index, gather in enumerate(gathers):
                sums, flags, _ = gather(
                    sources, weights, base, key, statistics, traced, found, first_row
                )
                finite = flags if finite is None else finite
                found = self.finish(task, index, [sums], found)
            merged, _, merged_finite = apply(
                sources, weights, base, key, statistics, traced, found, first_row
            )
            return merged, finite, merged_finite
        compiled = self._compiled[leaf_signature(self._method, task)].result()
        return compiled(sources, weights, base, key, statistics, traced, found, first_row)

    def finish(self, task: TensorTask, index: int, partials: list[jax.Array], found):
        """What round `index` of a tensor's passes finds from its blocks' partials in row order
        (concatenated first, so that one program takes the whole tensor's sums: see
        `jkarcher.blocked.finish_program`) and what the round before found."""
        compiled = self._compiled[self._finish_signature(task, index)].result()
        sums = blocked.whole_sums(partials)
        return compiled(sums, self.weights(task), found, self.traced_params(task))

    def _passes(self, task: TensorTask):
        static = split_params(self._method, task.settings.params)[0]
        return blocked.passes_of(self._method, static)

    def rounds(self, task: TensorTask) -> int:
        """How many rounds of statistics a task's tensor takes."""
        return len(self._passes(task).rounds)

    def round_adds(self, task: TensorTask) -> bool:
        """Whether the blocks' partials of a task's round add (else they concatenate)."""
        return self._passes(task).rounds[task.pass_round].added

    def _rounds_finished(self, task: TensorTask) -> range:
        """The rounds whose `finish` a task takes: the one before its round, at STATISTICS;
        the last, at APPLY; every one, at BOTH."""
        if task.stage == blocked.STATISTICS:
            return range(task.pass_round - 1, task.pass_round) if task.pass_round else range(0)
        if task.stage == blocked.APPLY:
            rounds = self.rounds(task)
            return range(rounds - 1, rounds)
        return range(self.rounds(task)) if task.stage == blocked.BOTH else range(0)

    def _finish_signature(self, task: TensorTask, index: int) -> tuple:
        """What the compiled `finish` of a round of a task's tensor depends on."""
        static, traced = split_params(self._method, task.settings.params)
        shape, n = self._whole_shapes[task.name], len(task.sources)
        return ("finish", index, static, shape, n, jax.tree.structure(traced))

    def _sums(self, task: TensorTask, index: int) -> jax.ShapeDtypeStruct:
        """The statistics of round `index` of the whole tensor of a task, as `finish` takes
        them."""
        step = self._passes(task).rounds[index]
        sums = step.sums(self._whole_shapes[task.name], len(task.sources))
        return jax.ShapeDtypeStruct(sums.shape, sums.dtype, sharding=replicated(self._mesh))

    def _finish_arguments(self, task: TensorTask, index: int) -> tuple:
        """The abstract arguments of the `finish` of round `index` of a task's tensor."""
        found = self._found(task, index)
        return self._sums(task, index), self.weights(task), found, self.traced_params(task)

    def _found(self, task: TensorTask, index: int):
        """The shapes of what the rounds before round `index` (or, index = the number of
        rounds, every round) found: None before the first."""
        if index == 0:
            return None
        static = split_params(self._method, task.settings.params)[0]
        function = blocked.finish_program(
            self._method, static, index - 1, self._whole_shapes[task.name]
        )
        return jax.eval_shape(function, *self._finish_arguments(task, index - 1))

    def _compile_finish(self, task: TensorTask, index: int) -> jax.stages.Compiled:
        """The `finish` of round `index` of a task's tensor compiled for its sums, or loaded
        from the compile cache, as `_compile` does a leaf."""
        start = time.perf_counter()
        mesh = (self._mesh.shape_tuple, [device.id for device in self._mesh.devices.flat])
        stored_as = compile_cache.key(self._method, self._finish_signature(task, index), mesh)
        compiled = compile_cache.load(stored_as)
        if compiled is not None:
            self._loaded += 1
        else:
            static = split_params(self._method, task.settings.params)[0]
            function = blocked.finish_program(
                self._method, static, index, self._whole_shapes[task.name]
            )
            compiled = function.lower(*self._finish_arguments(task, index)).compile()
            compile_cache.store(stored_as, compiled)
        self._compile_seconds += time.perf_counter() - start
        return compiled

    def traced_params(self, task: TensorTask) -> dict[str, Any]:
        """The task's traced parameters as scalars (`jkarcher.merge.traced_arguments`), once per
        distinct parameters."""
        params = task.settings.params_key
        if params not in self._traced:
            traced = split_params(self._method, task.settings.params)[1]
            self._traced[params] = traced_arguments(traced)
        return self._traced[params]

    def _function(self, task: TensorTask) -> Callable:
        shape = task.sources[0].shape
        static = split_params(self._method, task.settings.params)[0]
        statistic = task.statistic if task.statistics else None
        return placed_leaf(
            self._method,
            static,
            shape,
            task.out_dtype,
            self._mesh,
            statistic,
            task.stage,
            task.pass_round,
        )

    @property
    def compilations(self) -> int:
        """How many distinct leaves this merge compiles (one per `leaf_signature`)."""
        return len(self._compiled)

    @property
    def loaded(self) -> int:
        """How many of them were loaded from the compile cache so far, not compiled."""
        return self._loaded

    @property
    def compile_seconds(self) -> float:
        """The seconds spent compiling (or loading) so far, in the background thread."""
        return self._compile_seconds

    def _found_at(self, task: TensorTask):
        """The shapes of what a task's leaf takes from the rounds before it (None at MERGE and
        in the first round)."""
        if task.stage == blocked.STATISTICS:
            return self._found(task, task.pass_round)
        if task.stage == blocked.APPLY:
            return self._found(task, self.rounds(task))
        return None

    def _compiled_tasks(self, task: TensorTask) -> tuple[TensorTask, ...]:
        """The tasks whose leaves `task` runs: itself, or at BOTH each round's and APPLY's."""
        if task.stage != blocked.BOTH:
            return (task,)
        rounds = self.rounds(task)
        gathers = [
            dataclasses.replace(task, stage=blocked.STATISTICS, pass_round=index)
            for index in range(rounds)
        ]
        return (*gathers, dataclasses.replace(task, stage=blocked.APPLY))

    def _compile(self, task: TensorTask) -> jax.stages.Compiled:
        """The task's leaf, traced, lowered and compiled for its shapes, or loaded from the
        compile cache (`jkarcher.compile_cache`): calling this compiled leaf runs it, where
        calling the jitted function would trace and lower it again."""
        start = time.perf_counter()
        shape = padded_shape(task.sources[0].shape, self._mesh)
        sharding = row_sharding(self._mesh, len(shape))
        shaped = jax.ShapeDtypeStruct(shape, task.source_dtype, sharding=sharding)
        base = None if task.base is None else shaped
        key = task_key(self._seed_key, task, methods.get(self._method))
        sources = (shaped,) * len(task.sources)
        placements = (
            statistic_placement(task.statistic, task.sources[0].shape, info.shape, self._mesh)
            for info in task.statistics
        )
        statistics = tuple(
            jax.ShapeDtypeStruct(placed_shape, np.float32, sharding=placed_sharding)
            for placed_shape, placed_sharding in placements
        )
        traced = self.traced_params(task)
        found = self._found_at(task)
        first_row = jax.ShapeDtypeStruct((), jnp.int32)
        mesh = (self._mesh.shape_tuple, [device.id for device in self._mesh.devices.flat])
        stored_as = compile_cache.key(self._method, leaf_signature(self._method, task), mesh)
        compiled = compile_cache.load(stored_as)
        if compiled is not None:
            self._loaded += 1
        else:
            function = self._function(task)
            arguments = (
                sources,
                self.weights(task),
                base,
                key,
                statistics,
                traced,
                found,
                first_row,
            )
            lowered = function.lower(*arguments)
            compiled = lowered.compile()
            compile_cache.store(stored_as, compiled)
        self._compile_seconds += time.perf_counter() - start
        return compiled


def task_key(
    seed_key: jax.Array | None, task: TensorTask, method: methods.MergeMethod
) -> jax.Array | RowKey | None:
    """The random key of a task's leaf: its tensor's (`leaf_key`); for a method that merges in
    blocks of rows, with the row where the task's rows begin (a `RowKey`), so that a block draws
    what the whole tensor draws there. None: the method is not random."""
    if seed_key is None:
        return None
    key = leaf_key(seed_key, task.name)
    if method.blocked(task.settings.params) is None:
        return key
    return RowKey(key, jnp.int32(task.first_row))
