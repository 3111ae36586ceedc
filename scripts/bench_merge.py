"""End-to-end merge speed and memory on a synthetic zoo, against the I/O floor and mergekit.

    python scripts/bench_merge.py                      # add --mergekit_karcher for that leg too
    python scripts/bench_merge.py --zoo=big --experts=5  # the cold 3B legs (31 GB of inputs)
    python scripts/bench_merge.py --zoo=wide   # Llama-3-70B-wide tensors, capped (bench_wide.py)

The zoo is 4 experts with Qwen2.5-0.5B's shapes in bfloat16 (about 1 GB each: a shared random base
plus a small random update per expert), made once under --zoo_dir. In one run this times, each as
a fresh process on the same files (read once beforehand, so every leg finds them in the page cache):

  read floor        reading every tensor of every expert once (jkarcher's reader, in this process);
  import            `import jkarcher.pipeline` in a fresh process;
  jkarcher karcher  `scripts/merge.py`, Karcher mean with its default tolerance, first with its
                    compile cache (`jkarcher.compile_cache`) empty, then warm;
  jkarcher linear   `scripts/merge.py`, weighted average, the same two ways (the warm runs of
                    both alternate, --repeats times);
  mergekit linear   `mergekit-yaml` on CPU, when mergekit is installed;
  mergekit karcher  `mergekit-yaml` on CPU (with --mergekit_karcher: it takes minutes);
  write floor       writing the bytes of one merged output once (in this process);
  gradient-slerp    mergekit's examples/gradient-slerp.yml (a `t` that varies by layer and
                    filter) on two tiny 40-layer models, by jkarcher (`--mergekit-yaml`) and by
                    `mergekit-yaml`;

The quick legs (read floor, import, jkarcher's warm merges) run --repeats times and count by their
median: on a 2-core machine one run of a few seconds varies by a second from run to run.

With --zoo=big the zoo is the big one of `bench_zoos.py` (Qwen2.5-3B shapes, beyond memory),
and each leg starts with the page cache dropped (when run as root): a `cat` of every input file;
that `cat` with the bytes of one output written beside it (a merge does both, and where a disk's
reads and writes share one bandwidth this is its floor); jkarcher karcher (with its compile cache
as it is), with the default memory budget and with --config.memory=2GB (its output compared with
the first's, byte for byte); and mergekit linear.

With --zoo=wide the legs are `bench_wide.py`'s: 8 experts with Llama-3-70B's widest tensors (47
GB), a read of them, jkarcher karcher and mergekit linear, each under a memory cap (--memory_cap).

Each run prints wall time and peak resident memory of each leg, the ratios between them, and
where our karcher run's time went (its summary's split). Karcher runs with each tool's own
defaults (jkarcher: tol 1e-6, up to 100 iterations; mergekit: tol 1e-5, up
to 10), so jkarcher does at least as much iteration as mergekit.
"""

from __future__ import annotations

import functools
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from bench_wide import cat_command, mergekit_command, time_split, timed_process, wide_legs
from bench_zoos import make_big_zoo, make_zoo

from jkarcher import demo
from jkarcher.io import Checkpoint, read_tensor
from jkarcher.io.file_io import write_range
from jkarcher.io.output_dir import staged_directory

ROOT = Path(__file__).resolve().parents[1]
_ZOO_DIR = flags.DEFINE_string("zoo_dir", str(ROOT / ".bench" / "zoo-qwen2.5-0.5b"), "Zoo cache.")
_WORK_DIR = flags.DEFINE_string("work_dir", str(ROOT / ".bench" / "runs"), "Configs and outputs.")
_EXPERTS = flags.DEFINE_integer("experts", 4, "Experts in the zoo (--zoo=wide: 8 if not given).")
_MERGEKIT_KARCHER = flags.DEFINE_bool("mergekit_karcher", False, "Also time mergekit's karcher.")
_REPEATS = flags.DEFINE_integer(
    "repeats", 3, "runs of the quick legs (read floor, import, jkarcher's warm merges): the median"
)
_ZOO = flags.DEFINE_enum(
    "zoo", "small", ["small", "big", "wide"], "small: 0.5B legs; big: cold 3B; wide: bench_wide."
)
_BIG_ZOO_DIR = flags.DEFINE_string(
    "big_zoo_dir", str(ROOT / ".bench" / "zoo-qwen2.5-3b"), "Big zoo cache (31 GB for 5)."
)

GRADIENT_SLERP = """\
slices:
  - sources:
      - model: {a}
        layer_range: [0, 40]
      - model: {b}
        layer_range: [0, 40]
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""


def make_gradient_slerp(directory: Path, work: Path) -> Path:
    """mergekit's gradient-slerp example on two tiny 40-layer models (written once): its YAML."""
    models = [directory / name for name in ("a", "b")]
    if not directory.is_dir():
        rng = np.random.default_rng(1)
        config = demo.qwen2_config(320, num_layers=40)
        tokenizer = demo.build_tokenizer()
        with staged_directory(directory, overwrite=False) as staging:
            base = demo.random_weights(config, rng)
            for model in models:
                demo.write_model(
                    staging / model.name, demo.fine_tuned(base, rng), config, tokenizer
                )
    yaml = work / "gradient-slerp.yml"
    yaml.write_text(GRADIENT_SLERP.format(a=models[0], b=models[1]))
    return yaml


def read_while_writing(
    command: list[str], log: Path, work: Path, nbytes: int
) -> tuple[float, float]:
    """`timed_process(command, log)` with `write_floor(work, nbytes)` running beside it: wall
    seconds until both end, and the command's peak RSS."""
    start = time.perf_counter()
    writer = threading.Thread(target=write_floor, args=(work, nbytes))
    writer.start()
    _, rss = timed_process(command, log)
    writer.join()
    return time.perf_counter() - start, rss


def write_floor(work: Path, nbytes: int) -> float:
    """Seconds to write `nbytes` to a new file in 64 MiB pieces as the merge writes its output
    (`jkarcher.io.file_io.write_range`), the file then removed."""
    block = np.zeros(64 << 20, np.uint8)
    path = work / "write-floor.bin"
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset in range(0, nbytes, block.size):
            write_range(fd, path, memoryview(block[: min(block.size, nbytes - offset)]), offset)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def warm_page_cache(models: list[Path]) -> None:
    """Read every weight file through the page cache (jkarcher's reader would bypass it for
    files not already cached)."""
    for path in models:
        for file in sorted(path.glob("*.safetensors")):
            with open(file, "rb") as f:
                while f.read(64 << 20):
                    pass


def read_everything(models: list[Path]) -> tuple[float, int]:
    """Seconds and bytes to read every tensor of every model once, one tensor at a time."""
    start, total = time.perf_counter(), 0
    for path in models:
        checkpoint = Checkpoint(path)
        for name in checkpoint.names():
            total += read_tensor(checkpoint.info(name)).nbytes
    return time.perf_counter() - start, total


def jkarcher_command(work: Path, models: list[Path], method: str, output: Path) -> list[str]:
    config = work / "jkarcher_config.py"
    config.write_text(
        "from jkarcher.config import base_config\n\n\n"
        "def get_config():\n"
        "    config = base_config()\n"
        f"    config.models = {[{'path': str(p), 'weight': 1.0} for p in models]!r}\n"
        "    config.dtype = 'bfloat16'\n"
        "    return config\n"
    )
    script = ROOT / "scripts" / "merge.py"
    return [
        sys.executable,
        str(script),
        f"--config={config}",
        f"--config.method={method}",
        f"--config.output={output}",
    ]


def drop_page_cache() -> bool:
    """Write dirty pages out and drop the page cache (root only): whether it was dropped."""
    os.sync()
    if os.geteuid() != 0:
        return False
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return True


def cold_legs(work: Path) -> None:
    """The --zoo=big legs, each after the page cache is dropped, and their ratios."""
    models = make_big_zoo(Path(_BIG_ZOO_DIR.value), _EXPERTS.value)
    files = [str(f) for model in models for f in sorted(model.glob("*.safetensors"))]
    total = sum(os.path.getsize(f) for f in files)
    output_bytes = sum(p.stat().st_size for p in models[0].glob("*.safetensors"))
    print(f"big zoo: {len(models)} experts, {total / 1e9:.1f} GB", flush=True)
    cat = cat_command(files)
    # Each leg, run with its log's path: (wall seconds, peak RSS in GB).
    legs = {
        "cat": functools.partial(timed_process, cat),
        "cat while writing": functools.partial(
            read_while_writing, cat, work=work, nbytes=output_bytes
        ),
        "jkarcher karcher": functools.partial(
            timed_process, jkarcher_command(work, models, "karcher", work / "out-big")
        ),
        "jkarcher karcher 2GB": functools.partial(
            timed_process,
            [
                *jkarcher_command(work, models, "karcher", work / "out-big-2GB"),
                "--config.memory=2GB",
            ],
        ),
    }
    if shutil.which("mergekit-yaml"):
        legs["mergekit linear"] = functools.partial(
            timed_process, mergekit_command(work, models, "linear", work / "out-big-mergekit")
        )
    outputs = [work / name for name in ("out-big", "out-big-2GB", "out-big-mergekit")]
    for output in outputs:
        shutil.rmtree(output, ignore_errors=True)
    results = {}
    for name, leg in legs.items():
        cold = drop_page_cache()
        log = work / f"big-{name.replace(' ', '-')}.log"
        results[name] = leg(log)
        seconds, rss = results[name]
        state = "cold" if cold else "page cache NOT dropped (not root)"
        print(f"{name:17s} {seconds:6.1f} s   peak RSS {rss:5.2f} GB   ({state})", flush=True)
        if name.startswith("jkarcher"):
            print(f"  {time_split(log)}", flush=True)
    same = same_files(work / "out-big-2GB", work / "out-big")
    for output in outputs:
        shutil.rmtree(output, ignore_errors=True)
    ours, ours_rss = results["jkarcher karcher"]
    print(f"jkarcher karcher / cat, wall: {ours / results['cat'][0]:.2f}x")
    both = results["cat while writing"][0]
    print(f"jkarcher karcher / (cat while writing), wall: {ours / both:.2f}x (target <= 1.15)")
    small_rss = results["jkarcher karcher 2GB"][1]
    print(f"jkarcher karcher 2GB peak RSS: {small_rss:.2f} GB (target <= 2.5)")
    print(f"jkarcher karcher 2GB gives the bytes of the default budget's: {same}")
    if "mergekit linear" in results:
        theirs = results["mergekit linear"][0]
        print(f"jkarcher karcher / mergekit linear, wall: {ours / theirs:.2f}x (target <= 0.6)")
    print(f"jkarcher karcher peak RSS: {ours_rss:.2f} GB (target <= 4.5)")


def same_files(directory: Path, other: Path) -> bool:
    """Whether two outputs hold the same safetensors files, byte for byte."""
    names = sorted(p.name for p in directory.glob("*.safetensors"))
    if names != sorted(p.name for p in other.glob("*.safetensors")):
        return False
    command = ["cmp", "--silent"]
    return all(subprocess.run([*command, directory / n, other / n]).returncode == 0 for n in names)


def main(argv: list[str]) -> None:
    del argv
    work = Path(_WORK_DIR.value)
    work.mkdir(parents=True, exist_ok=True)
    if _ZOO.value == "big":
        cold_legs(work)
        return
    if _ZOO.value == "wide":
        wide_legs(work, _EXPERTS)
        return
    models = make_zoo(Path(_ZOO_DIR.value), _EXPERTS.value)
    warm_page_cache(models)  # for every leg
    floors = [read_everything(models) for _ in range(_REPEATS.value)]
    floor, total = statistics.median(seconds for seconds, _ in floors), floors[0][1]
    print(f"zoo: {len(models)} experts, {total / 1e9:.2f} GB; read floor {floor:.2f} s", flush=True)
    import_command = [sys.executable, "-c", "import jkarcher.pipeline"]
    import_seconds = statistics.median(
        timed_process(import_command, work / "import.log")[0] for _ in range(_REPEATS.value)
    )
    output_bytes = sum(p.stat().st_size for p in models[0].glob("*.safetensors"))
    written = write_floor(work, output_bytes)
    print(
        f"import jkarcher.pipeline {import_seconds:.2f} s; write floor {written:.2f} s", flush=True
    )

    mergekit = shutil.which("mergekit-yaml")
    # jkarcher runs each method first with its compile cache empty, then --repeats times with it
    # warm, karcher and linear in turn, so that both see the same state of the machine.
    cache = work / "compile-cache"
    os.environ["JKARCHER_COMPILE_CACHE"] = str(cache)
    legs = [("jkarcher", m, "cold") for m in ("karcher", "linear")]
    legs += [("jkarcher", m, "warm") for _ in range(_REPEATS.value) for m in ("karcher", "linear")]
    if mergekit:
        legs.append(("mergekit", "linear", ""))
        if _MERGEKIT_KARCHER.value:
            legs.append(("mergekit", "karcher", ""))
    else:
        print("mergekit-yaml not found: mergekit legs skipped")
    samples = {}
    for tool, method, compile_cache in legs:
        if compile_cache == "cold" and method == "karcher":
            shutil.rmtree(cache, ignore_errors=True)
        output = work / f"out-{tool}-{method}"
        shutil.rmtree(output, ignore_errors=True)
        command = (jkarcher_command if tool == "jkarcher" else mergekit_command)(
            work, models, method, output
        )
        log = work / f"{tool}-{method}-{compile_cache}.log"
        seconds, rss = timed_process(command, log)
        shutil.rmtree(output, ignore_errors=True)
        label = f"{method}, {compile_cache} compile cache" if compile_cache else method
        samples.setdefault((tool, label), []).append((seconds, rss))
        print(f"{tool:9s} {label:28s} {seconds:6.1f} s   peak RSS {rss:5.2f} GB", flush=True)
        if tool == "jkarcher":
            print(f"  {time_split(log)}", flush=True)
    # Each leg's median wall time and its largest peak RSS.
    results = {
        leg: (statistics.median(s for s, _ in runs), max(r for _, r in runs))
        for leg, runs in samples.items()
    }

    yaml = make_gradient_slerp(Path(_ZOO_DIR.value).with_name("gradient-slerp-40"), work)
    commands = {"jkarcher": [sys.executable, str(ROOT / "scripts" / "merge.py"), "--mergekit-yaml"]}
    if mergekit:
        commands["mergekit"] = [mergekit]
    shutil.rmtree(cache, ignore_errors=True)
    for tool, command in commands.items():
        output = work / f"out-{tool}-gradient-slerp"
        shutil.rmtree(output, ignore_errors=True)
        if tool == "jkarcher":
            arguments = [str(yaml), f"--config.output={output}"]
        else:
            arguments = [str(yaml), str(output)]
        seconds, rss = timed_process(command + arguments, work / f"{tool}-gradient-slerp.log")
        shutil.rmtree(output, ignore_errors=True)
        results[tool, "gradient-slerp"] = (seconds, rss)
        print(f"{tool:9s} gradient-slerp {seconds:6.1f} s   peak RSS {rss:5.2f} GB", flush=True)

    print_ratios(results, floor, import_seconds)


def print_ratios(
    results: dict[tuple[str, str], tuple[float, float]], floor: float, import_seconds: float
) -> None:
    """The ratios the targets are stated in, each with its target."""
    ours, ours_rss = results["jkarcher", "karcher, warm compile cache"]
    ours_cold = results["jkarcher", "karcher, cold compile cache"][0]
    ours_linear = results["jkarcher", "linear, warm compile cache"][0]
    print(
        f"(jkarcher figures with the compile cache warm, unless they say cold; the read floor, "
        f"the import and the warm merges are medians of {_REPEATS.value} runs)"
    )
    print(f"jkarcher karcher / read floor, wall: {ours / floor:.1f}x")
    floor_and_import = floor + import_seconds
    print(
        f"jkarcher karcher / (read floor + import), wall: {ours / floor_and_import:.2f}x"
        f" (target <= 2); cold: {ours_cold / floor_and_import:.2f}x"
    )
    print(f"jkarcher karcher / jkarcher linear, wall: {ours / ours_linear:.2f}x (target <= 1.15)")
    if ("mergekit", "linear") in results:
        theirs, theirs_rss = results["mergekit", "linear"]
        print(
            f"jkarcher linear / mergekit linear, wall: {ours_linear / theirs:.2f}x (target <= 0.35)"
        )
        print(f"jkarcher karcher / mergekit linear, wall: {ours / theirs:.2f}x")
        print(
            f"jkarcher karcher / mergekit linear, peak RSS: {ours_rss / theirs_rss:.2f}x"
            " (target <= 0.35)"
        )
    if ("mergekit", "karcher") in results:
        theirs = results["mergekit", "karcher"][0]
        print(f"mergekit karcher / jkarcher karcher, wall: {theirs / ours:.1f}x (target >= 20)")
    if ("mergekit", "gradient-slerp") in results:
        ours_slerp = results["jkarcher", "gradient-slerp"][0]
        theirs = results["mergekit", "gradient-slerp"][0]
        print(
            f"jkarcher gradient-slerp / mergekit gradient-slerp, wall: {ours_slerp / theirs:.2f}x"
            " (target <= 1)"
        )


if __name__ == "__main__":
    app.run(main)
