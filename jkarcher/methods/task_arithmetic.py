"""Task arithmetic and its sparsified, sign-elected variants: TIES, DARE, breadcrumbs, DELLA.

Every method here merges task vectors delta_i = x_i - base (Ilharco et al. 2023, "Editing models
with task arithmetic", arXiv:2212.04089) in one way, mergekit's "generalized task arithmetic":

1. sparsify: delta_i <- delta_i * m_i with a keep-mask m_i (TIES: largest magnitudes; DARE: random;
   breadcrumbs: middle magnitudes; DELLA: random by magnitude rank); with `rescale`, the kept part
   is scaled back to the L1 norm of delta_i (`sparsify.l1_rescale`);
2. weight: d_i = w_i delta_i (w_i of any sign: a negative weight subtracts its task vector);
3. elect signs (TIES, DARE-TIES, breadcrumbs-TIES, DELLA): s = sign(sum_i d_i), with s = +1 where
   the sum is 0; entry j of model i takes part only where sign(d_ij) = s_j;
4. sum: M = sum_i c_i d_i with c_i the sign-election mask (or 1), and with `normalize` divide by
   D = sum_i c_i w_i (per entry, 1 where it is 0) or, without sign election, by sum_i w_i (1 where
   |sum w| < 1e-8);
5. merged = base + lambda M.

That is `generalized_task_arithmetic`. Each sparsification is a row of `SPARSIFICATIONS`
(keep-mask, parameters, paper: TIES, Yadav et al. 2023; DARE, Yu et al. 2023; Model Breadcrumbs,
Davari & Belilovsky 2023; DELLA, Deep et al. 2024), and each method a row of
`jkarcher.methods.task_arithmetic_methods.VARIANTS`, as mergekit's registry lists them: the
task-vector baselines of Wang, Ye, Yin (2026, Sec. 4). Defaults, parameter names, element counts
and epsilons follow mergekit 0.1.5. The merge is deterministic given the masks; random
sparsifications draw theirs from the explicit key first (`keep_masks`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jkarcher.methods import sparsify
from jkarcher.methods.registry import Param, fraction, non_negative, unit_interval
from jkarcher.numerics import compute_dtype, sum_over_models

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


def generalized_task_arithmetic(
    stacked: jax.Array,
    weights: jax.Array,
    base: jax.Array,
    *,
    key: jax.Array | None,
    sparsification: str | None,
    sign_consensus: bool,
    normalize: bool,
    lambda_: float,
    rescale: bool = False,
    scales: jax.Array | None = None,
    keep: jax.Array | None = None,
    **trim: Any,
) -> jax.Array:
    """base + lambda * (sum_i c_i w_i m_i delta_i) / D: steps 1-5 of the module docstring.

    Args:
      stacked: [N, ...] the models.
      weights: [N] their weights w_i, of any sign (a negative weight subtracts its task vector).
      base: [...] the base model.
      key: the `jax.random` key of a random sparsification (else unused).
      sparsification: a key of `SPARSIFICATIONS` (the keep-masks m_i), or None to keep every entry.
      sign_consensus: elect signs (c_i) as TIES does.
      normalize: divide by D, the sum of the weights taking part.
      lambda_: the scale of the merged task vector (mergekit's `lambda`).
      rescale: scale each kept task vector back to its L1 norm (with a sparsification).
      scales: [N] the rescale factors, where a first pass over the tensor's blocks found them
        (`jkarcher.methods.trim_passes`); None: from this tensor.
      keep: [N, ...] the keep-masks, where passes over the tensor's blocks found them; None:
        from this tensor (`keep_masks`).
      **trim: the sparsification's parameters (density; gamma or epsilon), one value or N each.

    Returns:
      The merge, computed and returned in float32 (float64 under x64).
    """
    dtype = compute_dtype()
    w = weights.astype(dtype)
    deltas = task_vectors(stacked, base)
    if sparsification is not None:
        if keep is None:
            keep = keep_masks(sparsification, key, deltas, **trim)
        if rescale and scales is None:
            sums = [sparsify.l1_chunk_sums(d, keep[i]) for i, d in enumerate(deltas)]
            scales = [sparsify.l1_rescale(partial) for partial in sums]
        deltas = [jnp.where(keep[i], d, 0.0) for i, d in enumerate(deltas)]
        if rescale:
            deltas = [d * scales[i] for i, d in enumerate(deltas)]
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
    return base.astype(dtype) + mixed * lambda_


def keep_masks(
    sparsification: str, key: jax.Array | None, deltas: list[jax.Array], **trim: Any
) -> jax.Array:
    """[N, ...] boolean keep-masks of the task vectors `deltas`, by a row of `SPARSIFICATIONS`.

    `trim` holds its parameters (density; gamma or epsilon), each one value or one per model. A
    random sparsification splits `key` (or a `sparsify.RowKey`'s) into one key per model.
    """
    n = len(deltas)
    kind = SPARSIFICATIONS[sparsification]
    if kind.random:
        whole = sparsify.row_key(key)
        keys = [whole._replace(key=one) for one in jax.random.split(whole.key, n)]
    values = {name: per_model(value, n) for name, value in trim.items()}
    masks = []
    for i, delta in enumerate(deltas):
        args = (keys[i], delta) if kind.random else (delta,)
        masks.append(kind.mask(*args, **{name: v[i] for name, v in values.items()}))
    return jnp.stack(masks)


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


class Sparsification(NamedTuple):
    """One way of trimming task vectors: its keep-mask, mask(delta, **params) or, if random,
    mask(key, delta, **params); its parameters, paper, and check across them; for a trim by the
    selection order of the magnitudes, `cuts(size, **params)`: the "k largest" counts its mask
    is made of (the first less the second, if two)."""

    mask: Callable[..., jax.Array] | None
    params: tuple[Param, ...]
    citation: str
    random: bool = False
    check: Callable[[Mapping[str, Any]], str | None] | None = None
    # The leaf's float32 scratch (`MergeMethod.scratch`): the masks' sorts and draws dominate.
    scratch: tuple[float, float] = (0.1, 0.5)
    cuts: Callable[..., tuple[int, ...]] | None = None


# The sparsifications by name (None: task arithmetic, which keeps every entry).
SPARSIFICATIONS = {
    None: Sparsification(None, (), "https://arxiv.org/abs/2212.04089"),
    "magnitude": Sparsification(
        sparsify.magnitude_mask,
        (_DENSITY,),
        "https://arxiv.org/abs/2306.01708",
        scratch=(4.75, 1.5),
        cuts=sparsify.magnitude_cuts,
    ),
    "random": Sparsification(
        sparsify.bernoulli_mask,
        (_DENSITY,),
        "https://arxiv.org/abs/2311.03099",
        random=True,
        scratch=(3.25, 2.5),
    ),
    "outliers": Sparsification(
        sparsify.outlier_mask,
        (_DENSITY, _GAMMA),
        "https://arxiv.org/abs/2312.06795",
        scratch=(6.25, 1),
        cuts=sparsify.outlier_cuts,
    ),
    "magprune": Sparsification(
        sparsify.della_mask,
        (_DENSITY, _EPSILON),
        "https://arxiv.org/abs/2406.11617",
        random=True,
        check=_della_check,
        scratch=(6.25, 1.5),
    ),
}
