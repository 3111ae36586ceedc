"""`bench_merge.py --zoo=wide`: merge time and memory on Llama-3-70B's widest tensors, under a cap.

    python scripts/bench_merge.py --zoo=wide                        # 8 experts, 47 GB, 10GB cap
    python scripts/bench_merge.py --zoo=wide --wide_shapes=smoke --memory_cap=1GB  # a quick test

The zoo (`bench_zoos.make_wide_zoo`, written once under --wide_zoo_dir) is 8 experts (or
--experts) with the embedding and LM head of Llama-3-70B (128256 x 8192 each) and one decoder
layer of its shapes, in bfloat16. Each leg is a fresh process in a cgroup v1 memory cgroup
capped at --memory_cap (swap included), started after one uncapped read of every input file (so
each leg finds the page cache as the others do):

  warm read         `cat` of every input file, once more: the reference (a zoo larger than
                    memory cannot all come from the page cache: much of it is read again);
  jkarcher karcher  `scripts/merge.py --mergekit-yaml` on `merge_method: karcher`, with
                    `--config.memory` only when --jkarcher_memory gives it; when it completes, its
                    embedding's norm is checked against the weighted mean of the sources' norms
                    and its vectors (the RMSNorm weights) against the float64 reference mean
                    (`tests/karcher_reference.py`), within bfloat16 rounding (`check_karcher`);
  mergekit linear   `mergekit-yaml` on CPU, `merge_method: linear`.

Each leg reports whether it completed or was killed (the cgroup's OOM killer) or failed, its wall
time, its peak RSS (`run_process`) and the cgroup's peak usage (`memory.max_usage_in_bytes`,
which counts the page cache charged to it too: a reader through the page cache peaks at the cap).
The pages that the uncapped read left cached stay charged outside the cgroup, so a leg that maps
its inputs (mergekit) can show a peak RSS above the cap. Then a table and the ratios jkarcher
karcher / warm read (target <= 1.3) and jkarcher karcher / mergekit linear. Merged outputs are
deleted after each leg, the zoo only with --delete_zoo.

This module also holds how every leg of `bench_merge.py` runs a process (`run_process`,
`timed_process`) and the mergekit configs it runs (`mergekit_command`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from absl import flags
from bench_zoos import WIDE_SHAPES, make_wide_zoo, row_blocks

from jkarcher.config.fields import parse_size
from jkarcher.io import Checkpoint, StoredTensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "tests"))
from karcher_reference import karcher_reference  # noqa: E402  (tests/ is not a package)

_WIDE_ZOO_DIR = flags.DEFINE_string(
    "wide_zoo_dir", None, "Wide zoo cache (default .bench/zoo-wide, or zoo-wide-smoke)."
)
_WIDE_SHAPES = flags.DEFINE_enum(
    "wide_shapes", "llama3-70b", list(WIDE_SHAPES), "The wide zoo's dimensions (smoke: small)."
)
_MEMORY_CAP = flags.DEFINE_string("memory_cap", "10GB", "Memory cap of each --zoo=wide leg.")
_JKARCHER_MEMORY = flags.DEFINE_string(
    "jkarcher_memory", "", "Pass --config.memory=VALUE to the jkarcher leg (empty: don't)."
)
_DELETE_ZOO = flags.DEFINE_bool("delete_zoo", False, "Delete the wide zoo after its legs.")

WIDE_EXPERTS = 8  # --zoo=wide's experts unless --experts is given
CGROUP = Path("/sys/fs/cgroup/memory/jkarcher-bench")
EMBEDDING = "model.embed_tokens.weight"
# The merged embedding's norm is the weighted mean of the sources' norms times ||u||, u the
# merged direction, rounded to bfloat16 entry by entry. Round-to-nearest moves that norm by about
# 2^-9 / sqrt(entries) relative (1e-8 here), and jkarcher's float32 sums and its stopping
# tolerance (1e-6) by ~1e-6; 1e-3 bounds both with room while a linear average of these experts
# (cosines ~0.94) is 2.6% shorter, so the check still tells a Karcher mean from a linear merge.
NORM_RTOL = 1e-3
# jkarcher's float32 error on a merged vector, relative to its largest entry: the stopping
# tolerance (1e-6 radians) and float32 rounding, with room.
FLOAT32_ERROR = 1e-5

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

# Runs argv[2:] and writes its exit code and peak RSS (KiB) to argv[1]. Linux counts the RSS of
# the process a child is forked from in the child's peak, so the legs are forked from this small
# launcher, never from the benchmark (which holds gigabytes after building or reading a zoo).
LAUNCHER = """\
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


def run_process(command: list[str], log: Path) -> tuple[float, int, float]:
    """Run a command to its end, its output to `log`: (wall seconds, exit code (-N for signal
    N), its peak resident memory in GB)."""
    result = log.with_suffix(".rusage")
    start = time.perf_counter()
    with open(log, "w") as out:
        subprocess.run(
            [sys.executable, "-c", LAUNCHER, str(result), *command],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ | OFFLINE,
            check=True,
        )
    seconds = time.perf_counter() - start
    code, max_rss_kib = map(int, result.read_text().split())
    return seconds, code, max_rss_kib * 1024 / 1e9


def timed_process(command: list[str], log: Path) -> tuple[float, float]:
    """Run a command to completion: (wall seconds, its peak resident memory in GB)."""
    seconds, code, rss = run_process(command, log)
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed; see {log}")
    return seconds, rss


def mergekit_config(work: Path, models: list[Path], method: str) -> Path:
    """A mergekit YAML merging `models` (weight 1 each for linear) by `method`, in bfloat16."""
    lines = [f"merge_method: {method}", "dtype: bfloat16", "models:"]
    for path in models:
        lines += [f"  - model: {path}"]
        if method == "linear":
            lines += ["    parameters:", "      weight: 1.0"]
    config = work / f"mergekit_{method}.yaml"
    config.write_text("\n".join(lines) + "\n")
    return config


def mergekit_command(work: Path, models: list[Path], method: str, output: Path) -> list[str]:
    """`mergekit-yaml` on `mergekit_config(work, models, method)`, writing `output`."""
    return [shutil.which("mergekit-yaml"), str(mergekit_config(work, models, method)), str(output)]


def cat_command(files: list[str]) -> list[str]:
    """A command that reads `files` once, through the page cache, and drops the bytes."""
    return ["sh", "-c", 'cat "$@" > /dev/null', "cat", *files]


def time_split(log: Path) -> str:
    """The time split line of a merge's summary (`jkarcher.pipeline.MergeSummary`)."""
    lines = [
        line.strip() for line in log.read_text().splitlines() if line.strip().startswith("time:")
    ]
    return lines[-1] if lines else "time: (no summary in the log)"


@dataclasses.dataclass(frozen=True)
class Leg:
    """How one capped leg ended: "completed", "killed (OOM)" or "failed (exit N)", its wall
    seconds, its peak RSS and the cgroup's peak usage (RSS and page cache) in GB."""

    outcome: str
    seconds: float
    rss: float
    cgroup_peak: float

    @property
    def completed(self) -> bool:
        return self.outcome == "completed"

    def __str__(self) -> str:
        return (
            f"{self.outcome} after {self.seconds:.1f} s, peak RSS {self.rss:.2f} GB, "
            f"cgroup peak {self.cgroup_peak:.2f} GB"
        )


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A new cgroup v1 memory cgroup (`CGROUP`) limited to `limit` bytes, swap included where
    the kernel accounts swap; removed at the end."""
    if not CGROUP.parent.is_dir() or os.geteuid() != 0:
        raise SystemExit(f"--zoo=wide caps its legs in {CGROUP}: it needs cgroup v1 and root")
    if CGROUP.exists():
        CGROUP.rmdir()  # left by a run that was stopped
    CGROUP.mkdir()
    try:
        (CGROUP / "memory.limit_in_bytes").write_text(str(limit))
        swap = CGROUP / "memory.memsw.limit_in_bytes"  # memory + swap: at least the above
        if swap.exists():
            swap.write_text(str(limit))
        yield CGROUP
    finally:
        CGROUP.rmdir()


def capped_leg(command: list[str], log: Path, limit: int) -> Leg:
    """Run `command` in a memory cgroup of `limit` bytes (`memory_cgroup`): how it ended."""
    with memory_cgroup(limit) as cgroup:
        enter = f'echo $$ > {cgroup / "cgroup.procs"} && exec "$@"'
        seconds, code, rss = run_process(["sh", "-c", enter, "sh", *command], log)
        peak = int((cgroup / "memory.max_usage_in_bytes").read_text()) / 1e9
        oom = dict(
            line.split() for line in (cgroup / "memory.oom_control").read_text().splitlines()
        )
    if code == 0:
        outcome = "completed"
    elif int(oom.get("oom_kill", 0)) or code in (-9, 137):
        outcome = "killed (OOM)"
    else:
        outcome = f"failed (exit {code})"
    return Leg(outcome, seconds, rss, peak)


def tensor_norm(tensor: StoredTensor) -> float:
    """The float64 norm of a stored tensor, read a block of rows at a time (`row_blocks`)."""
    total = 0.0
    for first, stop in row_blocks(tensor.shape):
        block = tensor.rows(first, stop).read().astype(np.float64).ravel()
        total += float(block @ block)
    return math.sqrt(total)


def check_karcher(models: list[Path], output: Path) -> bool:
    """Print how the merged output matches the Karcher mean of the equally weighted `models`:
    its embedding's norm (the mean of theirs, within `NORM_RTOL`) and each vector (the float64
    reference, within half a bfloat16 ulp of each entry plus `FLOAT32_ERROR`). Whether all do."""
    sources = [Checkpoint(path) for path in models]
    merged = Checkpoint(output)
    expected = float(np.mean([tensor_norm(source.info(EMBEDDING)) for source in sources]))
    error = abs(tensor_norm(merged.info(EMBEDDING)) / expected - 1.0)
    passed = error <= NORM_RTOL
    print(f"  check: {EMBEDDING} norm vs the sources' mean norm: relative error {error:.1e}")
    for name in merged.names():
        if len(merged.info(name).shape) != 1:
            continue
        stacked = np.stack([source.read(name).astype(np.float64) for source in sources])
        reference = karcher_reference(stacked)
        actual = merged.read(name).astype(np.float64)
        magnitude = np.maximum(np.abs(reference), np.abs(actual))
        half_ulp = np.exp2(np.floor(np.log2(magnitude)) - 8)  # bfloat16: 8 significant bits
        bound = half_ulp + FLOAT32_ERROR * np.abs(reference).max()
        worst = float(np.max(np.abs(actual - reference) / bound))
        passed &= worst <= 1.0
        print(f"  check: {name} vs the float64 reference: largest error {worst:.2f} of its bound")
    return passed


def wide_legs(work: Path, experts: flags.FlagHolder) -> None:
    """The --zoo=wide legs (module docstring), their table and ratios."""
    shapes = _WIDE_SHAPES.value
    suffix = "" if shapes == "llama3-70b" else f"-{shapes}"
    directory = Path(_WIDE_ZOO_DIR.value or ROOT / ".bench" / f"zoo-wide{suffix}")
    models = make_wide_zoo(directory, experts.value if experts.present else WIDE_EXPERTS, shapes)
    files = [str(f) for model in models for f in sorted(model.glob("*.safetensors"))]
    total = sum(os.path.getsize(f) for f in files)
    limit = parse_size(_MEMORY_CAP.value, "--memory_cap")
    print(f"wide zoo: {len(models)} experts, {total / 1e9:.1f} GB; cap {limit / 1e9:.2f} GB")
    output = work / "out-wide"
    jkarcher = [sys.executable, str(ROOT / "scripts" / "merge.py"), "--mergekit-yaml"]
    jkarcher += [str(mergekit_config(work, models, "karcher")), f"--config.output={output}"]
    jkarcher += ["--config.overwrite=True"]
    if _JKARCHER_MEMORY.value:
        jkarcher.append(f"--config.memory={_JKARCHER_MEMORY.value}")
    legs = {"warm read": cat_command(files), "jkarcher karcher": jkarcher}
    if shutil.which("mergekit-yaml"):
        legs["mergekit linear"] = mergekit_command(work, models, "linear", output)
    else:
        print("mergekit-yaml not found: the mergekit leg is skipped")
    results: dict[str, Leg] = {}
    check = "not run (the leg did not complete)"
    for name, command in legs.items():
        shutil.rmtree(output, ignore_errors=True)
        start = time.perf_counter()
        subprocess.run(cat_command(files), check=True)
        print(f"(uncapped read of the inputs first: {time.perf_counter() - start:.1f} s)")
        log = work / f"wide-{name.replace(' ', '-')}.log"
        results[name] = capped_leg(command, log, limit)
        print(f"{name}: {results[name]}; log {log}", flush=True)
        if name == "jkarcher karcher" and results[name].completed:
            print(f"  {time_split(log)}", flush=True)
            check = "passed" if check_karcher(models, output) else "FAILED"
        shutil.rmtree(output, ignore_errors=True)
    if _DELETE_ZOO.value:
        shutil.rmtree(directory)
    print_table(results, limit)
    print(f"jkarcher karcher's output vs the Karcher mean: {check}")


def print_table(results: dict[str, Leg], limit: int) -> None:
    """The legs in a table, then jkarcher karcher's wall-time ratios to the others."""
    print(f"\nlegs under a {limit / 1e9:.2f} GB cap (wall s and peak GB)")
    print(f"{'leg':17s} {'outcome':17s} {'wall s':>7s} {'peak RSS':>9s} {'cgroup peak':>12s}")
    for name, leg in results.items():
        row = f"{leg.seconds:7.1f} {leg.rss:9.2f} {leg.cgroup_peak:12.2f}"
        print(f"{name:17s} {leg.outcome:17s} {row}")
    ours = results["jkarcher karcher"]
    for name, target in (("warm read", " (target <= 1.3)"), ("mergekit linear", "")):
        if name not in results:
            continue
        if ours.completed and results[name].completed:
            ratio = f"{ours.seconds / results[name].seconds:.2f}x{target}"
        else:
            ratio = "n/a: " + ", ".join(
                f"{leg} {results[leg].outcome}"
                for leg in ("jkarcher karcher", name)
                if not results[leg].completed
            )
        print(f"jkarcher karcher / {name}, wall: {ratio}")
