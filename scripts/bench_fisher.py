"""What Fisher preconditioning costs: estimating each checkpoint's Fisher, and merging with it.

    python scripts/bench_fisher.py [--zoo=cache/zoo-finetune] [--models=4] [--num_batches=4]

On the expert zoo (`scripts/make_zoo.py`; the base and the first experts), this times in one
process:

  estimate      `jkarcher.fisher.checkpoint_fisher` of each checkpoint on its own training text
                (the base's on all domains), first run (with compilation) and a second run;
  merge         the streaming merge (`jkarcher.pipeline`) of the checkpoints with karcher, plain
                and with `params.fisher` (the estimates just made), each run twice, the second
                time with every leaf compiled;
  leaf          `karcher_mean` on N Qwen2.5-0.5B MLP-shaped float32 tensors (4864 x 896,
                fine-tune-like spread), plain and Fisher-preconditioned (jitted, best of 5);

and prints seconds and the ratios Fisher / plain.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jkarcher import karcher_mean, pipeline
from jkarcher.config import base_config, validate
from jkarcher.fisher import checkpoint_fisher
from jkarcher.zoo.domains import DOMAINS
from jkarcher.zoo.training import domain_texts

ROOT = Path(__file__).resolve().parents[1]
_ZOO = flags.DEFINE_string(
    "zoo", str(ROOT / "cache" / "zoo-finetune"), "zoo directory (make_zoo.py)"
)
_MODELS = flags.DEFINE_integer("models", 4, "checkpoints to merge: the base and the first experts")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 4, "Fisher batches of 16 x 64 tokens")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed runs of each leaf; the best is reported")


def calibration_text(directory: Path, name: str) -> Path:
    """A checkpoint's own training text: its domain's, or every domain's for the base."""
    domain = name.removeprefix("expert-")
    names = [domain] if name != "base" else [d.name for d in DOMAINS]
    lines = [text for d in names for text in domain_texts(d, "train", 400, seed=0)]
    path = directory / f"{name}.txt"
    path.write_text("\n".join(lines))
    return path


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_estimates(checkpoints: list[Path], work: Path) -> list[Path]:
    files = []
    for checkpoint in checkpoints:
        text = calibration_text(work, checkpoint.name)
        output = work / f"{checkpoint.name}.fisher.safetensors"

        def estimate(checkpoint=checkpoint, text=text, output=output):
            return checkpoint_fisher(
                checkpoint,
                text,
                output=output,
                seq_len=64,
                batch_size=16,
                num_batches=_NUM_BATCHES.value,
            )

        run, first = timed(estimate)
        _, second = timed(estimate)
        print(
            f"estimate {checkpoint.name:22s} {run.tokens:6d} tokens: first {first:6.2f} s, "
            f"again {second:6.2f} s"
        )
        files.append(output)
    return files


def bench_merges(checkpoints: list[Path], fishers: list[Path], work: Path) -> None:
    seconds = {}
    for label, params in [("karcher", {}), ("karcher+fisher", {"fisher": list(map(str, fishers))})]:
        config = base_config()
        config.models = [{"path": str(c)} for c in checkpoints]
        config.params = params
        config.output = str(work / label)
        config.overwrite = True
        config.dtype = "float32"
        for attempt in ("first", "again"):
            plan = pipeline.plan_merge(validate(config))
            summary, seconds[label, attempt] = timed(lambda plan=plan: pipeline.run(plan))
        print(
            f"merge    {label:22s} {summary.bytes_read / 1e6:6.1f} MB read: first "
            f"{seconds[label, 'first']:6.2f} s, again {seconds[label, 'again']:6.2f} s"
        )
    ratio = seconds["karcher+fisher", "again"] / seconds["karcher", "again"]
    print(f"merge    Fisher / plain (compiled): {ratio:.2f}x")


def bench_leaf(n_models: int) -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4864, 896)).astype(np.float32)
    stacked = jnp.asarray(
        np.stack(
            [base + 0.1 * rng.normal(size=base.shape).astype(np.float32) for _ in range(n_models)]
        )
    )
    fisher = jnp.asarray(np.exp(rng.normal(size=stacked.shape)).astype(np.float32))
    weights = jnp.ones((n_models,), jnp.float32)
    cases = {
        "karcher": jax.jit(lambda s, w, f: karcher_mean(s, w)),
        "karcher+fisher": jax.jit(lambda s, w, f: karcher_mean(s, w, fisher=f)),
    }
    best = {}
    for label, fn in cases.items():
        jax.block_until_ready(fn(stacked, weights, fisher))
        best[label] = min(
            timed(lambda fn=fn: jax.block_until_ready(fn(stacked, weights, fisher)))[1]
            for _ in range(_REPEATS.value)
        )
        print(f"leaf     {label:22s} N={n_models} 4864x896: {best[label] * 1e3:8.1f} ms")
    print(f"leaf     Fisher / plain: {best['karcher+fisher'] / best['karcher']:.2f}x")


def main(argv):
    del argv
    zoo = Path(_ZOO.value)
    experts = sorted(p for p in zoo.glob("expert-*") if p.is_dir())
    if not (zoo / "base").is_dir() or not experts:
        raise app.UsageError(f"{zoo}: no zoo there; build one with scripts/make_zoo.py")
    checkpoints = [zoo / "base", *experts][: _MODELS.value]
    with tempfile.TemporaryDirectory() as work:
        fishers = bench_estimates(checkpoints, Path(work))
        bench_merges(checkpoints, fishers, Path(work))
    bench_leaf(len(checkpoints))


if __name__ == "__main__":
    app.run(main)
