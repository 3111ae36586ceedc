"""The cost of sharding a merge: the synthetic 0.5B zoo merged on 1, 2, 4 and 8 devices and by 2
processes, each against the one-device merge of the same run.

    python scripts/bench_scale.py                       # --method=linear, --experts=... too

The zoo is `scripts/bench_merge.py`'s, with its flags (4 experts with Qwen2.5-0.5B's shapes in
bfloat16, made once under --zoo_dir; configs and outputs go under --work_dir/scale). Every
configuration is a fresh `scripts/merge.py` run on the same files (read once beforehand, so each
finds them in the page cache), with XLA_FLAGS giving it its number of virtual CPU devices; the
processes of a multi-process run join through a coordinator on 127.0.0.1. Each line prints wall
time, every process's peak resident memory, the ratios to the one-device run, and the largest
difference of the merged tensors from the one-device output (relative to each tensor's largest
value).
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from bench_merge import OFFLINE, read_everything
from bench_zoos import make_zoo

from jkarcher.io import Checkpoint

ROOT = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS  # --zoo_dir, --work_dir and --experts come with bench_merge
_METHOD = flags.DEFINE_string("method", "karcher", "The merge method.")

# (label, processes, devices per process); the first is the baseline.
CONFIGURATIONS = (
    ("1 device", 1, 1),
    ("2 devices", 1, 2),
    ("4 devices", 1, 4),
    ("8 devices", 1, 8),
    ("2 processes x 1 device", 2, 1),
)


def write_config(work: Path, models: list[Path], output: Path) -> Path:
    """A merge config of the zoo's experts, equal weights, into `output`."""
    config = work / "scale_config.py"
    config.write_text(
        "from jkarcher.config import base_config\n\n\n"
        "def get_config():\n"
        "    config = base_config()\n"
        f"    config.models = {[{'path': str(p), 'weight': 1.0} for p in models]!r}\n"
        f"    config.method = {_METHOD.value!r}\n"
        f"    config.output = {str(output)!r}\n"
        "    return config\n"
    )
    return config


def run_merge(config: Path, processes: int, devices: int, logs: Path) -> tuple[float, list[float]]:
    """`scripts/merge.py` as `processes` processes of `devices` virtual CPU devices each:
    (wall seconds until all have finished, each one's peak resident memory in GB)."""
    env = (
        os.environ
        | OFFLINE
        | {
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu",
        }
    )
    command = [sys.executable, str(ROOT / "scripts" / "merge.py"), f"--config={config}"]
    if processes > 1:
        command += [
            "--config.distributed.enabled=True",
            f"--config.distributed.coordinator_address=127.0.0.1:{free_port()}",
            f"--config.distributed.num_processes={processes}",
        ]
    start = time.perf_counter()
    running = []
    for index in range(processes):
        extra = [f"--config.distributed.process_id={index}"] if processes > 1 else []
        with open(logs.with_name(f"{logs.name}-{index}.log"), "w") as log:
            running.append(
                subprocess.Popen(command + extra, stdout=log, stderr=subprocess.STDOUT, env=env)
            )
    peaks = []
    for process in running:
        _, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{' '.join(command)} failed; see {logs}-*.log")
        peaks.append(usage.ru_maxrss * 1024 / 1e9)
    return time.perf_counter() - start, peaks


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def largest_difference(output: Path, reference: Path) -> float:
    """The largest |output - reference| over all tensors, each relative to its largest |value|."""
    got, want = Checkpoint(output), Checkpoint(reference)
    worst = 0.0
    for name in want.names():
        a = got.read(name).astype(np.float32)
        b = want.read(name).astype(np.float32)
        worst = max(worst, float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)))
    return worst


def main(argv: list[str]) -> None:
    del argv
    work = Path(FLAGS.work_dir) / "scale"
    work.mkdir(parents=True, exist_ok=True)
    models = make_zoo(Path(FLAGS.zoo_dir), FLAGS.experts)
    read_everything(models)  # page cache warm for every configuration
    floor, total = read_everything(models)
    print(f"zoo: {len(models)} experts, {total / 1e9:.2f} GB; read floor {floor:.2f} s")
    print(f"method {_METHOD.value}, on {os.cpu_count()} CPU cores", flush=True)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(
        f"(a child's peak RSS counts this process's {own:.2f} GB at its start; merges first, "
        "comparisons after)",
        flush=True,
    )
    outputs, baseline = [], None
    for label, processes, devices in CONFIGURATIONS:
        slug = label.replace(" ", "-")
        output = work / f"out-{slug}"
        shutil.rmtree(output, ignore_errors=True)
        config = write_config(work, models, output)
        seconds, peaks = run_merge(config, processes, devices, work / slug)
        baseline = baseline or (seconds, max(peaks))
        outputs.append((label, output))
        rss = ", ".join(f"{peak:.2f}" for peak in peaks)
        print(
            f"{label:24s} {seconds:7.1f} s ({seconds / baseline[0]:.2f}x)   peak RSS per "
            f"process {rss} GB ({max(peaks) / baseline[1]:.2f}x)",
            flush=True,
        )
    (_, reference), *others = outputs
    for label, output in others:
        print(
            f"{label:24s} largest difference from 1 device: "
            f"{largest_difference(output, reference):.1e}"
        )
        shutil.rmtree(output)
    shutil.rmtree(reference)


if __name__ == "__main__":
    app.run(main)
