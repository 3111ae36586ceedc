"""How much memory a run may hold, and how a merge shares it (docs/design.md, "Memory").

The budget is `memory` (a config field) or, by default, `DEFAULT_SHARE` of the memory available
at the start: the least of the host's available memory, the room left in the process's cgroup
and each accelerator's free memory, taken over every process of a merge.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import jax

from jkarcher import distributed

# The default budget: this share of the memory available at the start.
DEFAULT_SHARE = 0.5


@dataclasses.dataclass(frozen=True)
class Budget:
    """A run's memory budget in bytes, split between what it holds at once; `held`, the
    outputs an Orbax output keeps until the end, comes off the top."""

    total: int
    held: int = 0

    @property
    def shared(self) -> int:
        """The bytes the shares below split: the total less what is held."""
        return self.total - self.held

    @property
    def read_ahead(self) -> int:
        """The most bytes of tasks read ahead of the one merging (that one counted): the
        pipeline holds less where its own limit is lower (`jkarcher.pipeline.read`)."""
        return self.shared // 8

    @property
    def free_buffers(self) -> int:
        """The most bytes of free read buffers kept for reuse (`jkarcher.io.buffers`)."""
        return self.shared // 8

    @property
    def queued_outputs(self) -> int:
        """Bytes of merged outputs waiting for the writer (two of them)."""
        return self.shared // 8

    @property
    def task(self) -> int:
        """Bytes one task may hold: its inputs, the leaf's scratch and its output."""
        return self.shared - self.read_ahead - self.free_buffers - self.queued_outputs

    def total_for(self, task_bytes: int, output_bytes: int) -> int:
        """The least total budget whose shares hold a task of `task_bytes` and its output."""
        return max(math.ceil(task_bytes * 8 / 5) + 8, 16 * output_bytes + 16) + self.held


def default_budget() -> int:
    """DEFAULT_SHARE of the memory available at the start (`available_memory`), in whole MiB,
    the least over the processes of a merge, so that every process plans the same blocks."""
    mib = int(DEFAULT_SHARE * available_memory()) >> 20
    return distributed.least_over_processes(mib) << 20


def available_memory() -> int:
    """The least of: the host's available memory, what this process's cgroup (v1 or v2) still
    allows, and on an accelerator the smallest device memory of this process's devices."""
    limits = [_meminfo_available(), *_cgroup_room()]
    for device in jax.local_devices():
        stats = device.memory_stats() if device.platform != "cpu" else None
        if stats and stats.get("bytes_limit"):
            limits.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    return min(limits)


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _cgroup_room() -> list[int]:
    """Limit minus usage of each memory cgroup this process is in that has a limit (of the
    v1 `memory` hierarchy and of v2), as /proc/self/cgroup names them."""
    room = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return room
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            files = Path("/sys/fs/cgroup", path.lstrip("/")), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            directory = Path("/sys/fs/cgroup/memory", path.lstrip("/"))
            files = directory, "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        directory, limit_file, usage_file = files
        try:
            limit = (directory / limit_file).read_text().strip()
            usage = int((directory / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            room.append(int(limit) - usage)
    return room
