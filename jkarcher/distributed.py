"""One merge run by several processes (hosts), each on its own devices, through `jax.distributed`.

Every process runs the same program on the same config: it plans the same merge from the same
headers, so all of them raise the same errors before anything is written, and they execute the
same leaf functions in the same order on one mesh that spans all their devices. Each reads and
writes only the rows that its devices hold; process 0 (the leader) creates the output's files
and directory and renames it into place once every process has written its part.

With one process, every function here is a plain single-process step (no barrier, no exchange).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from jkarcher.config import DistributedSettings
from jkarcher.io.output_dir import staged_directory, staging_token

# Room for a staging token when it is sent to every process.
TOKEN_BYTES = 64


def initialize(settings: DistributedSettings) -> None:
    """Join the processes of a run with `jax.distributed.initialize` when `settings.enabled`.

    Settings left None are found by JAX in the environment (Slurm, Open MPI, Cloud TPU, or the
    JAX_COORDINATOR_ADDRESS variable). CPU collectives go over gloo unless another
    implementation is set. Must run before anything else uses JAX.
    """
    if not settings.enabled:
        return
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address,
        num_processes=settings.num_processes,
        process_id=settings.process_id,
    )


def is_leader() -> bool:
    """Whether this is process 0, the one that writes what is written once."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Return once every process has called `barrier(name)`."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jkarcher: {name}")


def sum_over_processes(counts: np.ndarray) -> np.ndarray:
    """The elementwise sum of an int32 vector over all processes (each passes its own)."""
    counts = np.asarray(counts, np.int32)
    if jax.process_count() == 1:
        return counts
    return np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)


def least_over_processes(value: int) -> int:
    """The least of an int32 value over all processes (each passes its own)."""
    if jax.process_count() == 1:
        return value
    return int(np.asarray(multihost_utils.process_allgather(np.int32(value))).min())


def shared_token() -> str:
    """Process 0's `staging_token()` (its host, process id and a random part), in every process.

    The staging directory is named after process 0, which creates it, so that a later run on
    that host can tell when it was left by a process that died."""
    token = staging_token().encode().ljust(TOKEN_BYTES)
    drawn = np.frombuffer(token, np.uint8).astype(np.int32)
    shared = np.asarray(multihost_utils.broadcast_one_to_all(drawn), np.int32)
    return shared.astype(np.uint8).tobytes().decode().strip()


@contextlib.contextmanager
def staged_output(output: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """`jkarcher.io.output_dir.staged_directory` shared by every process of the run.

    All processes get the same staging directory; process 0 creates it, and renames it to
    `output` only once every process has finished its block without an error.
    """
    token = shared_token() if jax.process_count() > 1 else None
    with staged_directory(
        output, overwrite, token=token, leader=is_leader(), barrier=barrier
    ) as staging:
        yield staging
