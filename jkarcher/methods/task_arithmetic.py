"""Task arithmetic and its sparsified, sign-elected variants: TIES, DARE, breadcrumbs, DELLA.

Every method here merges task vectors delta_i = x_i - base (Ilharco et al. 2023, "Editing models
with task arithmetic", arXiv:2212.04089) in one way, mergekit's "generalized task arithmetic":

1. sparsify: delta_i <- delta_i * m_i with a keep-mask m_i (TIES: largest magnitudes; DARE: random;
   breadcrumbs: middle magnitudes; DELLA: random by magnitude rank); with `rescale`, the kept part
   is scaled back to the L1 norm of delta_i (`sparsify.rescaled`);
2. weight: d_i = w_i delta_i;
3. elect signs (TIES, DARE-TIES, breadcrumbs-TIES, DELLA): s = sign(sum_i d_i), with s = +1 where
   the sum is 0; entry j of model i takes part only where sign(d_ij) = s_j;
4. sum: M = sum_i c_i d_i with c_i the sign-election mask (or 1), and with `normalize` divide by
   D = sum_i c_i w_i (per entry, 1 where it is 0) or, without sign election, by sum_i w_i (1 where
   |sum w| < 1e-8);
5. merged = base + lambda M.

These are the task-vector baselines of Wang, Ye, Yin (2026, Sec. 4). Defaults, parameter names,
element counts and epsilons follow mergekit 0.1.5, so its configurations mean the same here.
The merge proper (`merge_task_vectors`) is deterministic given the keep-masks; the random methods
draw their masks from the explicit key first (`dare_masks`, `della_masks`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jkarcher.methods import sparsify
from jkarcher.methods.common import sum_over_models
from jkarcher.methods.registry import (
    BASE_REQUIRED,
    MergeMethod,
    Param,
    boolean,
    fraction,
    non_negative,
    number,
    register,
    unit_interval,
)
from jkarcher.numerics import compute_dtype

# Without sign election, a sum of weights below this is treated as 1 (mergekit's guard).
WEIGHT_SUM_EPS = 1e-8


def per_model(value: Any, n: int) -> tuple:
    """A per-model parameter as N values: a tuple stays, one value is repeated."""
    return tuple(value) if isinstance(value, tuple) else (value,) * n


def task_vectors(stacked: jax.Array, base: jax.Array) -> list[jax.Array]:
    """delta_i = x_i - base for each model, in the compute dtype."""
    dtype = compute_dtype()
    base = base.astype(dtype)
    return [stacked[i].astype(dtype) - base for i in range(stacked.shape[0])]


def elect_signs(deltas: list[jax.Array]) -> list[jax.Array]:
    """TIES sign election: where each d_i agrees with s = sign(sum_i d_i) (+1 where the sum is 0).

    Zero entries agree with neither sign and so never count (Yadav et al. 2023, "TIES-merging").
    """
    positive = sum_over_models(deltas) >= 0
    return [jnp.where(positive, d > 0, d < 0) for d in deltas]


def merge_task_vectors(
    stacked: jax.Array,
    weights: jax.Array,
    base: jax.Array,
    keep: jax.Array | None = None,
    *,
    rescale: bool = False,
    sign_consensus: bool = False,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> jax.Array:
    """base + lambda * (sum_i c_i w_i m_i delta_i) / D: steps 1-5 of the module docstring.

    Args:
      stacked: [N, ...] the models.
      weights: [N] their weights w_i.
      base: [...] the base model.
      keep: [N, ...] boolean keep-masks m_i, or None to keep every entry.
      rescale: scale each kept task vector back to its L1 norm.
      sign_consensus: elect signs (c_i) as TIES does.
      normalize: divide by D, the sum of the weights taking part.
      lambda_: the scale of the merged task vector (mergekit's `lambda`).

    Returns:
      The merge, computed and returned in float32 (float64 under x64).
    """
    dtype = compute_dtype()
    w = weights.astype(dtype)
    deltas = task_vectors(stacked, base)
    if keep is not None:
        sparsify_one = sparsify.rescaled if rescale else lambda d, m: jnp.where(m, d, 0.0)
        deltas = [sparsify_one(d, keep[i]) for i, d in enumerate(deltas)]
    weighted = [w[i] * d for i, d in enumerate(deltas)]
    if sign_consensus:
        agree = elect_signs(weighted)
        mixed = sum_over_models(jnp.where(a, d, 0.0) for a, d in zip(agree, weighted, strict=True))
        divisor = sum_over_models(jnp.where(a, w[i], 0.0) for i, a in enumerate(agree))
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    else:
        mixed = sum_over_models(weighted)
        divisor = jnp.sum(w)
        divisor = jnp.where(jnp.abs(divisor) < WEIGHT_SUM_EPS, 1.0, divisor)
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return base.astype(dtype) + mixed


def magnitude_masks(stacked: jax.Array, base: jax.Array, density) -> jax.Array:
    """TIES keep-masks [N, ...]: each task vector's top floor(density D) magnitudes (at least 1)."""
    deltas = task_vectors(stacked, base)
    densities = per_model(density, len(deltas))
    masks = [sparsify.magnitude_mask(d, p) for d, p in zip(deltas, densities, strict=True)]
    return jnp.stack(masks)


def outlier_masks(stacked: jax.Array, base: jax.Array, density, gamma) -> jax.Array:
    """Breadcrumbs keep-masks [N, ...]: magnitudes between the outliers and the smallest."""
    deltas = task_vectors(stacked, base)
    n = len(deltas)
    return jnp.stack(
        [
            sparsify.outlier_mask(d, p, g)
            for d, p, g in zip(deltas, per_model(density, n), per_model(gamma, n), strict=True)
        ]
    )


def dare_masks(key: jax.Array, stacked: jax.Array, density) -> jax.Array:
    """DARE keep-masks [N, ...]: entry kept with probability density_i, one key split per model."""
    n = stacked.shape[0]
    keys = jax.random.split(key, n)
    shape = stacked.shape[1:]
    return jnp.stack(
        [sparsify.bernoulli_mask(keys[i], shape, p) for i, p in enumerate(per_model(density, n))]
    )


def della_masks(key: jax.Array, stacked: jax.Array, base: jax.Array, density, epsilon) -> jax.Array:
    """DELLA keep-masks [N, ...]: kept with probability density_i +- epsilon_i by magnitude rank."""
    deltas = task_vectors(stacked, base)
    n = len(deltas)
    keys = jax.random.split(key, n)
    return jnp.stack(
        [
            sparsify.della_mask(keys[i], d, p, e)
            for i, (d, p, e) in enumerate(
                zip(deltas, per_model(density, n), per_model(epsilon, n), strict=True)
            )
        ]
    )


def task_arithmetic(
    stacked: jax.Array,
    weights: jax.Array,
    base: jax.Array,
    *,
    key=None,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> jax.Array:
    """Task arithmetic (Ilharco et al. 2023): base + lambda sum_i w_i (x_i - base), divided by
    sum_i w_i with `normalize`."""
    del key
    return merge_task_vectors(stacked, weights, base, normalize=normalize, lambda_=lambda_)


def ties(
    stacked: jax.Array,
    weights: jax.Array,
    base: jax.Array,
    *,
    key=None,
    density=1.0,
    normalize: bool = True,
    rescale: bool = False,
    lambda_: float = 1.0,
) -> jax.Array:
    """TIES (Yadav et al. 2023, arXiv:2306.01708): trim each task vector to its top-density
    magnitudes, elect signs, average the agreeing entries (disjoint mean with `normalize`)."""
    del key
    keep = magnitude_masks(stacked, base, density)
    return merge_task_vectors(
        stacked,
        weights,
        base,
        keep,
        rescale=rescale,
        sign_consensus=True,
        normalize=normalize,
        lambda_=lambda_,
    )


def dare_linear(
    stacked: jax.Array,
    weights: jax.Array,
    base: jax.Array,
    *,
    key: jax.Array,
    density=1.0,
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
) -> jax.Array:
    """DARE (Yu et al. 2023, arXiv:2311.03099): drop each entry with probability 1 - density,
    rescale to the L1 norm, then the weighted sum of task vectors."""
    keep = dare_masks(key, stacked, density)
    return merge_task_vectors(
        stacked, weights, base, keep, rescale=rescale, normalize=normalize, lambda_=lambda_
    )


def dare_ties(
    stacked: jax.Array,
    weights: jax.Array,
    base: jax.Array,
    *,
    key: jax.Array,
    density=1.0,
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
) -> jax.Array:
    """DARE's random drop and L1 rescale followed by TIES sign election (Yu et al. 2023)."""
    keep = dare_masks(key, stacked, density)
    return merge_task_vectors(
        stacked,
        weights,
        base,
        keep,
        rescale=rescale,
        sign_consensus=True,
        normalize=normalize,
        lambda_=lambda_,
    )


def breadcrumbs(
    stacked: jax.Array,
    weights: jax.Array,
    base: jax.Array,
    *,
    key=None,
    density=1.0,
    gamma=0.01,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
) -> jax.Array:
    """Model Breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795): drop the largest gamma
    and the smallest magnitudes of each task vector, keeping density, then sum them."""
    del key
    keep = outlier_masks(stacked, base, density, gamma)
    return merge_task_vectors(
        stacked, weights, base, keep, rescale=rescale, normalize=normalize, lambda_=lambda_
    )


def breadcrumbs_ties(
    stacked: jax.Array,
    weights: jax.Array,
    base: jax.Array,
    *,
    key=None,
    density=1.0,
    gamma=0.01,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
) -> jax.Array:
    """Model Breadcrumbs' trimming (Davari & Belilovsky 2023) followed by TIES sign election
    (Yadav et al. 2023)."""
    del key
    keep = outlier_masks(stacked, base, density, gamma)
    return merge_task_vectors(
        stacked,
        weights,
        base,
        keep,
        rescale=rescale,
        sign_consensus=True,
        normalize=normalize,
        lambda_=lambda_,
    )


def della(
    stacked: jax.Array,
    weights: jax.Array,
    base: jax.Array,
    *,
    key: jax.Array,
    density=1.0,
    epsilon=0.15,
    normalize: bool = True,
    rescale: bool = True,
    lambda_: float = 1.0,
) -> jax.Array:
    """DELLA (Deep et al. 2024, arXiv:2406.11617): MagPrune (keep with probability rising with
    magnitude rank, density +- epsilon), L1 rescale, TIES sign election."""
    keep = della_masks(key, stacked, base, density, epsilon)
    return merge_task_vectors(
        stacked,
        weights,
        base,
        keep,
        rescale=rescale,
        sign_consensus=True,
        normalize=normalize,
        lambda_=lambda_,
    )


def della_linear(
    stacked: jax.Array,
    weights: jax.Array,
    base: jax.Array,
    *,
    key: jax.Array,
    density=1.0,
    epsilon=0.15,
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
) -> jax.Array:
    """DELLA's MagPrune and L1 rescale (Deep et al. 2024), then the weighted sum of task vectors
    (no sign election)."""
    keep = della_masks(key, stacked, base, density, epsilon)
    return merge_task_vectors(
        stacked, weights, base, keep, rescale=rescale, normalize=normalize, lambda_=lambda_
    )


def _mergekit_keywords(leaf: Callable) -> Callable:
    """The leaf taking mergekit's parameter `lambda` (a Python keyword) for `lambda_`."""

    @functools.wraps(leaf)
    def with_lambda(stacked, weights, base=None, *, key=None, **params):
        params["lambda_"] = params.pop("lambda", 1.0)
        return leaf(stacked, weights, base, key=key, **params)

    return with_lambda


def _della_check(params: Mapping[str, Any]) -> str | None:
    """mergekit's DELLA condition: 0 < density - epsilon and density + epsilon < 1, per model."""
    n = max(len(v) if isinstance(v, tuple) else 1 for v in (params["density"], params["epsilon"]))
    pairs = zip(per_model(params["density"], n), per_model(params["epsilon"], n), strict=True)
    for index, (density, epsilon) in enumerate(pairs):
        if density < 1 and not (0 < density - epsilon and density + epsilon < 1):
            model = f" of model {index}" if n > 1 else ""
            return (
                f"parameters 'density'={density!r} and 'epsilon'={epsilon!r}{model}: "
                "density - epsilon and density + epsilon must lie in (0, 1)"
            )
    return None


def _params(normalize: bool, rescale: bool | None, *extra: Param) -> tuple[Param, ...]:
    params = [
        *extra,
        Param(
            "normalize",
            normalize,
            "divide by the sum of the weights (of the sign-agreeing models, with sign election)",
            check=boolean,
        ),
        Param("lambda", 1.0, "scale of the merged task vector", check=number),
    ]
    if rescale is not None:
        params.append(
            Param("rescale", rescale, "rescale kept task vectors to their L1 norm", check=boolean)
        )
    return tuple(params)


_DENSITY = Param(
    "density", 1.0, "fraction of each task vector's entries kept", per_model=True, check=fraction
)
_GAMMA = Param(
    "gamma",
    0.01,
    "fraction of largest magnitudes dropped as outliers",
    per_model=True,
    check=unit_interval,
)
_EPSILON = Param(
    "epsilon",
    0.15,
    "keep probabilities range over density +- epsilon by magnitude rank",
    per_model=True,
    check=non_negative,
)


def _register(
    leaf: Callable,
    summary: str,
    reference: str,
    params: tuple[Param, ...],
    *,
    random: bool = False,
    check: Callable | None = None,
) -> None:
    register(
        MergeMethod(
            name=leaf.__name__,
            leaf=_mergekit_keywords(leaf),
            params=params,
            base=BASE_REQUIRED,
            random=random,
            summary=summary,
            reference=reference,
            check=check,
        )
    )


_register(
    task_arithmetic,
    "weighted sum of task vectors",
    "https://arxiv.org/abs/2212.04089",
    _params(False, None),
)
_register(
    ties,
    "top-magnitude trim, sign election, disjoint mean",
    "https://arxiv.org/abs/2306.01708",
    _params(True, False, _DENSITY),
)
_register(
    dare_linear,
    "random drop, L1 rescale, weighted sum",
    "https://arxiv.org/abs/2311.03099",
    _params(False, True, _DENSITY),
    random=True,
)
_register(
    dare_ties,
    "random drop, L1 rescale, sign election",
    "https://arxiv.org/abs/2311.03099",
    _params(False, True, _DENSITY),
    random=True,
)
_register(
    breadcrumbs,
    "drop outliers and small magnitudes, weighted sum",
    "https://arxiv.org/abs/2312.06795",
    _params(False, False, _DENSITY, _GAMMA),
)
_register(
    breadcrumbs_ties,
    "drop outliers and small magnitudes, sign election",
    "https://arxiv.org/abs/2312.06795",
    _params(False, False, _DENSITY, _GAMMA),
)
_register(
    della,
    "rank-dependent random drop, L1 rescale, sign election",
    "https://arxiv.org/abs/2406.11617",
    _params(True, True, _DENSITY, _EPSILON),
    random=True,
    check=_della_check,
)
_register(
    della_linear,
    "rank-dependent random drop, L1 rescale, weighted sum",
    "https://arxiv.org/abs/2406.11617",
    _params(False, True, _DENSITY, _EPSILON),
    random=True,
    check=_della_check,
)
