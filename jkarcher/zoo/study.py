"""The paper's multi-expert study (its Table 1, Figure 1 and Appendix A) on the zoo.

The pool is the base model followed by the experts in the zoo's fixed order, as the paper's 14B
pool starts with Qwen2.5-14B and adds fine-tunes. For N = 2 .. pool size, the first N models are
merged with every registered method that applies to N models: methods that take no base merge all
N; methods that need a base merge models 2..N onto model 1, the base (mergekit's convention, where
the base's own task vector is zero). Weights are equal (the paper's default). Each merge is scored
on every domain. The Fisher rows (Fisher-preconditioned Karcher, Fisher merging) use each pool
model's diagonal Fisher, and RegMean its linear layers' input Grams, estimated on that model's own
training data (the base's on the mixture), which is disjoint from the held-out evaluation data.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import jax

import jkarcher
from jkarcher import methods
from jkarcher.zoo.domains import DOMAINS

# Method parameters the study sets where mergekit's defaults would make the method a no-op or
# has none (mergekit's density defaults to 1, which keeps every delta). The paper gives no values;
# these are the ones mergekit's documentation uses in its examples.
STUDY_PARAMS: dict[str, dict] = {
    "slerp": {"t": 0.5},
    "nearswap": {"t": 0.0001},
    "ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "della": {"density": 0.5, "epsilon": 0.1},
    "della_linear": {"density": 0.5, "epsilon": 0.1},
    "breadcrumbs": {"density": 0.9, "gamma": 0.01},
    "breadcrumbs_ties": {"density": 0.9, "gamma": 0.01},
}
NOT_MERGES = ("passthrough",)  # copies one model; nothing to compare
# Study rows that run a registered method with each model's diagonal Fisher: label -> method.
FISHER_VARIANTS = {"karcher+fisher": "karcher"}


@dataclasses.dataclass(frozen=True)
class MergeRun:
    method: str
    n_models: int
    scores: dict[str, float]  # domain -> score
    perplexities: dict[str, float]
    seconds: float

    @property
    def average(self) -> float:
        return sum(self.scores.values()) / len(self.scores)


def study_rows() -> list[str]:
    """Every registered method that merges, and the Fisher variants, in alphabetical order."""
    return sorted([m for m in methods.names() if m not in NOT_MERGES] + list(FISHER_VARIANTS))


def calibration_inputs(row: str) -> tuple[str, ...]:
    """The per-model statistics a study row merges with ("fisher", "gram"): the Fisher of a
    Fisher variant, or the tensor inputs a method needs (a method that only may take them, as
    karcher, runs without)."""
    if row in FISHER_VARIANTS:
        return ("fisher",)
    spec = methods.get(row)
    return spec.tensor_inputs if spec.tensor_inputs_required else ()


def applicable(row: str, n_models: int) -> bool:
    """Whether a study row can merge the first `n_models` of the pool (base first)."""
    if row in NOT_MERGES:
        return False
    spec = methods.get(FISHER_VARIANTS.get(row, row))
    merged = n_models - 1 if spec.base == methods.BASE_REQUIRED else n_models
    return merged >= spec.min_models and (spec.max_models is None or merged <= spec.max_models)


def merge_pool(
    pool: Sequence,
    row: str,
    n_models: int,
    seed: int,
    statistics: Mapping[str, Sequence] | None = None,
):
    """Merge the first `n_models` parameter pytrees of the pool as study row `row` says.

    `statistics[name][i]` is pool model i's Fisher ("fisher") or input Grams ("gram"), given to
    the rows whose `calibration_inputs` name them.
    """
    method = FISHER_VARIANTS.get(row, row)
    spec = methods.get(method)
    chosen = slice(1, n_models) if spec.base == methods.BASE_REQUIRED else slice(0, n_models)
    extra = {name: list((statistics or {})[name][chosen]) for name in calibration_inputs(row)}
    return jkarcher.merge(
        pool[chosen],
        None,
        method=method,
        base=pool[0] if spec.base == methods.BASE_REQUIRED else None,
        key=jax.random.key(seed) if spec.random else None,
        **STUDY_PARAMS.get(method, {}),
        **extra,
    )


def run_study(
    pool: Sequence,
    score: Callable[[object], dict[str, dict[str, float]]],
    rows: Sequence[str],
    *,
    statistics: Mapping[str, Sequence] | None = None,
    seed: int = 0,
    done: Mapping[tuple[str, int], MergeRun] | None = None,
    on_run: Callable[[MergeRun], None] | None = None,
    log=print,
) -> list[MergeRun]:
    """Every applicable (row, N) merge of the pool, scored by `score(params)`.

    Runs in `done` (by (row, N)) are taken as they are; `on_run(run)` follows every new one.
    """
    done = done or {}
    runs = []
    for n_models in range(2, len(pool) + 1):
        for method in rows:
            if not applicable(method, n_models):
                continue
            if (method, n_models) in done:
                runs.append(done[method, n_models])
                continue
            start = time.perf_counter()
            merged = merge_pool(pool, method, n_models, seed, statistics)
            results = score(merged)
            run = MergeRun(
                method,
                n_models,
                {d.name: results[d.name]["score"] for d in DOMAINS},
                {d.name: results[d.name]["perplexity"] for d in DOMAINS},
                time.perf_counter() - start,
            )
            log(f"N={n_models:2d} {method:17s} average {run.average:.3f} ({run.seconds:.1f}s)")
            runs.append(run)
            if on_run is not None:
                on_run(run)
        jax.clear_caches()  # the next N compiles new shapes; free this N's executables
    return runs
