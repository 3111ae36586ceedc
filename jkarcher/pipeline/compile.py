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
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jkarcher import blocked, compile_cache, methods
from jkarcher.config import FISHER_INPUT
from jkarcher.merge import leaf_key, split_params, traced_arguments, traced_leaf
from jkarcher.methods.sparsify import RowKey
from jkarcher.numerics import COMPILER_OPTIONS, compute_dtype
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
        self._passes: dict[tuple, tuple] = {}
        # Each tensor merged in two passes: the shape of its whole sources, whose first pass's
        # sums `finish` takes (the rows of every block).
        self._whole_shapes: dict[str, tuple[int, ...]] = {}
        for task in tasks:
            if task.stage in (blocked.STATISTICS, blocked.BOTH):
                rows, *rest = task.sources[0].shape or (1,)
                before = self._whole_shapes.get(task.name, (0,))[0]
                self._whole_shapes[task.name] = (before + rows, *rest)
        for task in tasks:
            for compiled in _compiled_tasks(task) if task.floating else ():
                signature = leaf_signature(self._method, compiled)
                if signature not in self._compiled:
                    self._compiled[signature] = self._executor.submit(self._compile, compiled)
            if task.stage in (blocked.APPLY, blocked.BOTH):
                signature = self._finish_signature(task)
                if signature not in self._compiled:
                    self._compiled[signature] = self._executor.submit(self._compile_finish, task)

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
        self, task: TensorTask, sources: tuple, base, key, statistics: tuple = (), coefficients=None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(merged rows on the mesh in the output dtype, per-input all-finite flags, whether
        the merged rows are all finite) from `leaf_function`, as `merge` gives them (see
        `placed_leaf`); at the task's stage (`jkarcher.blocked`): a block's partial sums, or its
        rows from the `coefficients` of the first pass; at BOTH, the two passes in turn."""
        signature = leaf_signature(self._method, task)
        weights, traced = self.weights(task), self.traced_params(task)
        if task.stage == blocked.BOTH:
            gather, solve, apply = self._both_passes(signature, task)
            sums, finite, _ = gather(sources, weights, base, key, statistics, traced, None)
            coefficients = solve(sums, weights, traced)
            merged, _, merged_finite = apply(
                sources, weights, base, key, statistics, traced, coefficients
            )
            return merged, finite, merged_finite
        compiled = self._compiled[signature].result()
        return compiled(sources, weights, base, key, statistics, traced, coefficients)

    def _both_passes(self, signature: tuple, task: TensorTask) -> tuple:
        """The compiled first pass, finish and second pass of a BOTH task (kept by its leaf
        signature, which fixes all three)."""
        if signature not in self._passes:
            gather, apply = (
                self._compiled[leaf_signature(self._method, t)].result()
                for t in _compiled_tasks(task)
            )
            solve = self._compiled[self._finish_signature(task)].result()
            self._passes[signature] = gather, solve, apply
        return self._passes[signature]

    def finish(self, task: TensorTask, partials: list[jax.Array]) -> jax.Array:
        """The coefficients of a tensor's second pass from its blocks' partial sums in row order
        (concatenated first, so that one program takes the whole tensor's sums: see
        `jkarcher.blocked.finish`)."""
        compiled = self._compiled[self._finish_signature(task)].result()
        sums = blocked.whole_sums(partials)
        return compiled(sums, self.weights(task), self.traced_params(task))

    def _finish_signature(self, task: TensorTask) -> tuple:
        """What the compiled `finish` of a task's tensor depends on."""
        static, traced = split_params(self._method, task.settings.params)
        sums = self._sums(task)
        return ("finish", static, sums.shape, len(task.sources), jax.tree.structure(traced))

    def _sums(self, task: TensorTask) -> jax.ShapeDtypeStruct:
        """The first pass's sums of the whole tensor of a task, as `finish` takes them."""
        static = split_params(self._method, task.settings.params)[0]
        passes = blocked.two_passes(self._method, static)
        shape = passes.sums_shape(self._whole_shapes[task.name], len(task.sources))
        return jax.ShapeDtypeStruct(shape, compute_dtype(), sharding=replicated(self._mesh))

    def _compile_finish(self, task: TensorTask) -> jax.stages.Compiled:
        """The `finish` of a task's tensor compiled for its sums, or loaded from the compile
        cache, as `_compile` does a leaf."""
        start = time.perf_counter()
        mesh = (self._mesh.shape_tuple, [device.id for device in self._mesh.devices.flat])
        stored_as = compile_cache.key(self._method, self._finish_signature(task), mesh)
        compiled = compile_cache.load(stored_as)
        if compiled is not None:
            self._loaded += 1
        else:
            static = split_params(self._method, task.settings.params)[0]
            function = blocked.finish_program(self._method, static)
            arguments = (self._sums(task), self.weights(task), self.traced_params(task))
            compiled = function.lower(*arguments).compile()
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
            self._method, static, shape, task.out_dtype, self._mesh, statistic, task.stage
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

    def _coefficients_shape(self, task: TensorTask, traced):
        """The shape of the coefficients an APPLY task takes (None at other stages)."""
        if task.stage != blocked.APPLY:
            return None
        static = split_params(self._method, task.settings.params)[0]
        finish = blocked.finish_program(self._method, static)
        return jax.eval_shape(finish, self._sums(task), self.weights(task), traced)

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
        coefficients = self._coefficients_shape(task, traced)
        mesh = (self._mesh.shape_tuple, [device.id for device in self._mesh.devices.flat])
        stored_as = compile_cache.key(self._method, leaf_signature(self._method, task), mesh)
        compiled = compile_cache.load(stored_as)
        if compiled is not None:
            self._loaded += 1
        else:
            function = self._function(task)
            arguments = (sources, self.weights(task), base, key, statistics, traced, coefficients)
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


def _compiled_tasks(task: TensorTask) -> tuple[TensorTask, ...]:
    """The tasks whose leaves `task` runs: itself, or at BOTH its two passes'."""
    if task.stage != blocked.BOTH:
        return (task,)
    stages = (blocked.STATISTICS, blocked.APPLY)
    return tuple(dataclasses.replace(task, stage=stage) for stage in stages)


def _without_coefficients(leaf, sources, weights, base, key, tensors, traced, coefficients):
    """The method's own leaf (`traced_leaf`) at stage MERGE, which takes no coefficients."""
    del coefficients
    return leaf(sources, weights, base, key, tensors, traced)


@functools.cache
def placed_leaf(
    method: str,
    static_params: tuple,
    shape: tuple[int, ...],
    out_dtype: np.dtype,
    mesh: Mesh,
    statistic: str | None = None,
    stage: str = blocked.MERGE,
) -> Callable:
    """`jkarcher.merge.traced_leaf(method, static_params)` for sources of `shape` split by rows
    over `mesh`, as `jkarcher.pipeline.read.read_task` places them (cached): (sources, weights,
    base, key, statistics, traced parameters) -> (merged, all-finite flags, merged all finite).
    `statistics` are the models' tensor input named `statistic` ("fisher", split by rows like
    the sources; "gram", whole), or () when the tensor has none.

    The padding rows are cut off before the leaf sees the sources (and the Fishers) and put
    back as zeros after it, so the leaf merges exactly the tensor (its whole-tensor statistics
    and random draws are those of one device);
    the result is cast to `out_dtype` and split like the sources, and the all-finite flags are
    on every device. It compiles with `COMPILER_OPTIONS`, as `jkarcher.merge` does. At `stage`
    (`jkarcher.blocked`), the leaf is that stage's: it takes the coefficients of a first pass
    as a last argument (None but at APPLY), and the STATISTICS stage returns partial sums,
    replicated.
    """
    if stage == blocked.MERGE:
        leaf = traced_leaf(method, static_params, np.dtype(out_dtype))
        leaf = functools.partial(_without_coefficients, leaf)
    else:
        leaf = blocked.stage_leaf(method, static_params, np.dtype(out_dtype), stage)
    padding = padded_shape(shape, mesh)[0] - shape[0] if shape else 0

    def cut(x: jax.Array) -> jax.Array:
        return x[: shape[0]] if padding else x

    def run(sources, weights, base, key, statistics, traced, coefficients=None):
        base = None if base is None else cut(base)
        if statistic == FISHER_INPUT:
            statistics = tuple(map(cut, statistics))
        tensors = {statistic: tuple(statistics)} if statistics else None
        sources = tuple(map(cut, sources))
        merged, finite, merged_finite = leaf(
            sources, weights, base, key, tensors, traced, coefficients
        )
        if padding and stage != blocked.STATISTICS:
            merged = jnp.pad(merged, [(0, padding)] + [(0, 0)] * (len(shape) - 1))
        return merged, finite, merged_finite

    flags = replicated(mesh)
    result = flags if stage == blocked.STATISTICS else row_sharding(mesh, len(shape))
    shardings = (result, flags, flags)
    return jax.jit(run, out_shardings=shardings, compiler_options=COMPILER_OPTIONS)
