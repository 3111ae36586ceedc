"""The distance sweep: at a fixed number of experts, fine-tunes from near the base to far from it.

The paper's central claim is about distance: Euclidean blends collapse "when the source
checkpoints are farther apart or more heterogeneous", where the Karcher mean helps most (Wang, Ye,
Yin 2026, Sec. 1). Each level of the sweep fine-tunes the same experts from the fine-tune zoo's
base with more steps, a larger learning rate and less general data mixed in; each seed draws the
experts' data and batch order afresh (the base is shared). A cell is one (level, seed): its
experts are merged by every method and scored, and its distance is the mean pairwise angle
between the experts' whole weight vectors, the geodesic distance on the unit sphere that the
Karcher mean averages over.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence

from jkarcher.zoo.recipes import FINETUNE, ExpertRecipe, ZooRecipe

# Four domains the base is weak at, so every level's experts have something to add.
SWEEP_DOMAINS = ("addition", "reversal", "counting", "sorting")
TIE = 0.0005  # averages closer than this (below the tables' precision) are a tie


@dataclasses.dataclass(frozen=True)
class Level:
    """How far one level's experts move from the base."""

    name: str
    steps: int
    learning_rate: float
    general_share: float


LEVELS = (
    Level("1-nearest", 100, 3e-4, 0.5),
    Level("2-near", 300, 1e-3, 0.5),  # the fine-tune zoo's recipe
    Level("3-middle", 600, 2e-3, 0.25),
    Level("4-far", 1000, 3e-3, 0.0),
    Level("5-farthest", 1500, 3e-3, 0.0),
)


def level_recipe(
    level: Level,
    seed: int,
    base: ZooRecipe = FINETUNE,
    domains: Sequence[str] = SWEEP_DOMAINS,
    step_scale: float = 1.0,
) -> ZooRecipe:
    """The zoo of one cell: `base`'s base model, one expert per domain at the level's recipe
    (with `step_scale` times its steps, at least 1: a smaller sweep for a smaller zoo)."""
    steps = max(1, round(step_scale * level.steps))
    experts = tuple(
        ExpertRecipe(d, steps, level.learning_rate, general_share=level.general_share)
        for d in domains
    )
    return dataclasses.replace(base, experts=experts, expert_seed=seed)


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclasses.dataclass(frozen=True)
class Paired:
    """A method against another over the same cells: d_c = a_c - b_c for each cell c."""

    wins: int  # d_c > TIE
    ties: int
    losses: int  # d_c < -TIE
    mean_difference: float  # mean of d_c
    standard_error: float  # std(d_c) / sqrt(cells); nan for one cell


def paired_comparison(a: Mapping[object, float], b: Mapping[object, float]) -> Paired:
    """`a` against `b` over the cells both have (at least one)."""
    cells = sorted(set(a) & set(b), key=str)
    differences = [a[c] - b[c] for c in cells]
    mean, std = mean_and_std(differences)
    return Paired(
        wins=sum(d > TIE for d in differences),
        ties=sum(abs(d) <= TIE for d in differences),
        losses=sum(d < -TIE for d in differences),
        mean_difference=mean,
        standard_error=std / math.sqrt(len(differences)) if len(differences) > 1 else math.nan,
    )
