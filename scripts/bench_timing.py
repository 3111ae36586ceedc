"""The timing every scripts/bench_*.py shares: the best of several runs after a warm-up."""

from __future__ import annotations

import time

import jax


def best_time(fn, *args, repeats: int) -> tuple[float, object]:
    """The best wall time of `fn(*args)` in milliseconds over `repeats` runs after one warm-up
    (which compiles), and the result of the last run."""
    result = jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best * 1e3, result
