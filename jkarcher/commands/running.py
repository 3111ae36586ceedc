"""What the command-line programs share: quiet interruption, and running a validated config.

A program runs in `stop_quietly_on_signals(program)`: Ctrl-C or SIGTERM then prints one line and
unwinds (every staging directory is removed on the way), exiting with 128 + the signal's number.
`run_config` runs a config as every program does: the built-in example's checkpoints made when it
names them, Fishers estimated where the config asks, the plan's warnings logged, a progress bar,
the summary printed; any error is one line on stderr and exit status 1. `run_stages` runs the
stages of a multi-stage merge in turn.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import logging
from tqdm import tqdm

from jkarcher import compile_cache, demo, distributed, pipeline
from jkarcher.config import MergeConfig
from jkarcher.errors import JkarcherError
from jkarcher.io.hf import is_hub_id
from jkarcher.io.output_dir import check_output_dir


class Interrupted(SystemExit):
    """Ctrl-C or SIGTERM: raised where the program is, exit status 128 + the signal's number."""


def stop_quietly_on_signals(program: Callable[[], None]) -> None:
    """Run `program` so that Ctrl-C and SIGTERM stop it with one line and no traceback.

    The signal unwinds the program (every staging directory is removed on the way); then the
    process ends at once with 128 + the signal's number, rather than waiting at exit for threads
    that the interruption may have left running (a pool's worker started just as it came, which
    the pool never learnt of and so never stops).
    """
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, _stop)
    try:
        program()
    except Interrupted as stop:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(stop.code)


def _stop(signum, frame):
    """One line, then unwind with Interrupted(128 + signum); a second signal while stopping is
    ignored. Python ignores an exception raised in a garbage collector's callback (JAX has one)
    or a finalizer, so a signal that lands there is sent again once that code has returned."""
    if _swallows_exceptions(frame):
        threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()
        return
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)
    name = signal.Signals(signum).name
    print(f"interrupted by {name}: stopping; no output is written", file=sys.stderr, flush=True)
    raise Interrupted(128 + signum)


def _swallows_exceptions(frame) -> bool:
    """Whether `frame` runs inside a garbage collector's callback or a `__del__`."""
    callbacks = {getattr(callback, "__code__", None) for callback in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def enable_compile_cache() -> None:
    """Keep compiled leaves between runs (`jkarcher.compile_cache`)."""
    compile_cache.enable(compile_cache.cache_directory())


def run_config(config: MergeConfig, quiet: bool = False) -> None:
    """Merge as `config` says, printing what is merged, a progress bar (unless `quiet`, or on a
    process other than the first) and the summary; a JkarcherError or OSError exits with one
    line and status 1."""
    try:
        demo.make_missing_demo_models([config.base_model, *(m.path for m in config.all_models)])
        for estimate in pipeline.prepare_statistics(config, progress=distributed.is_leader()):
            print(estimate)
        plan = pipeline.plan_merge(config)
        for warning in plan.warnings:
            logging.warning(warning)
        blocks = len(plan.tasks) - plan.tensor_count
        print(
            f"merging {len(config.all_models)} models with {config.method}: {plan.tensor_count} "
            f"tensors{f' ({blocks} more tasks for blocks of rows)' if blocks else ''}, "
            f"{plan.bytes_to_read / 1e9:.2f} GB to read, memory budget "
            f"{plan.budget.total / 1e9:.2f} GB -> {config.output}"
        )
        hidden = quiet or not distributed.is_leader()
        with tqdm(total=len(plan.tasks), unit="task", disable=hidden) as progress:
            summary = pipeline.run(plan, on_tensor=lambda task: progress.update())
    except (JkarcherError, OSError) as err:
        sys.exit(f"error: {err}")
    print(summary)


def run_stages(stages: Sequence[tuple[MergeConfig, bool]], quiet: bool = False) -> None:
    """Merge each (config, reused) stage in turn as `run_config` does, but for those `reused`,
    whose output an earlier run left complete; every output to be written is checked first
    (`check_output_dir`), so that a refused one stops the run before anything is merged."""
    try:
        for config, reused in stages:
            if not reused:
                check_output_dir(config.output, _local_inputs(config), config.overwrite)
    except (JkarcherError, OSError) as err:
        sys.exit(f"error: {err}")
    for config, reused in stages:
        if reused:
            print(f"kept {config.output}: merged by an earlier run of the same stage")
        else:
            run_config(config, quiet)


def _local_inputs(config: MergeConfig) -> list[str]:
    """The config's models that are (or will be) local directories, not hub ids."""
    inputs = [config.base_model, *(m.path for m in config.all_models)]
    return [p for p in inputs if p is not None and (Path(p).is_dir() or not is_hub_id(p))]
