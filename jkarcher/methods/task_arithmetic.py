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

That is `generalized_task_arithmetic`. Each method is a row of `VARIANTS` (its sparsification,
whether it elects signs, its defaults of `normalize` and `rescale`), each sparsification a row of
`SPARSIFICATIONS` (keep-mask, parameters, paper: TIES, Yadav et al. 2023; DARE, Yu et al. 2023;
Model Breadcrumbs, Davari & Belilovsky 2023; DELLA, Deep et al. 2024), as mergekit's registry
lists them: the task-vector baselines of Wang, Ye, Yin (2026, Sec. 4). Defaults, parameter names,
element counts and epsilons follow mergekit 0.1.5. The merge is deterministic given the masks;
random sparsifications draw theirs from the explicit key first (`keep_masks`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jkarcher.methods import sparsify
from jkarcher.methods.gram_passes import gram_sums_shape
from jkarcher.methods.registry import (
    BASE_REQUIRED,
    ROWS,
    MergeMethod,
    Param,
    TwoPasses,
    always_rows,
    boolean,
    fraction,
    never_blocked,
    non_negative,
    number,
    register,
    unit_interval,
)
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
        (`_rescaled_passes`); None: from this tensor.
      **trim: the sparsification's parameters (density; gamma or epsilon), one value or N each.

    Returns:
      The merge, computed and returned in float32 (float64 under x64).
    """
    dtype = compute_dtype()
    w = weights.astype(dtype)
    deltas = task_vectors(stacked, base)
    if sparsification is not None:
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
    mask(key, delta, **params); its parameters, paper, and check across them."""

    mask: Callable[..., jax.Array] | None
    params: tuple[Param, ...]
    citation: str
    random: bool = False
    check: Callable[[Mapping[str, Any]], str | None] | None = None
    # The leaf's float32 scratch (`MergeMethod.scratch`): the masks' sorts and draws dominate.
    scratch: tuple[float, float] = (0.1, 0.5)


# The sparsifications by name (None: task arithmetic, which keeps every entry).
SPARSIFICATIONS = {
    None: Sparsification(None, (), "https://arxiv.org/abs/2212.04089"),
    "magnitude": Sparsification(
        sparsify.magnitude_mask,
        (_DENSITY,),
        "https://arxiv.org/abs/2306.01708",
        scratch=(4.75, 1.5),
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


class Variant(NamedTuple):
    """A method of the family: its sparsification (a key of SPARSIFICATIONS), whether it elects
    signs, and its defaults of `normalize` and `rescale` (None: no such parameter)."""

    sparsification: str | None
    sign_consensus: bool
    normalize: bool
    rescale: bool | None


VARIANTS = {
    "task_arithmetic": Variant(None, sign_consensus=False, normalize=False, rescale=None),
    "ties": Variant("magnitude", sign_consensus=True, normalize=True, rescale=False),
    "dare_linear": Variant("random", sign_consensus=False, normalize=False, rescale=True),
    "dare_ties": Variant("random", sign_consensus=True, normalize=False, rescale=True),
    "breadcrumbs": Variant("outliers", sign_consensus=False, normalize=False, rescale=False),
    "breadcrumbs_ties": Variant("outliers", sign_consensus=True, normalize=False, rescale=False),
    "della": Variant("magprune", sign_consensus=True, normalize=True, rescale=True),
    "della_linear": Variant("magprune", sign_consensus=False, normalize=False, rescale=True),
}
SUMMARIES = {
    "task_arithmetic": "weighted sum of task vectors",
    "ties": "top-magnitude trim, sign election, disjoint mean",
    "dare_linear": "random drop, L1 rescale, weighted sum",
    "dare_ties": "random drop, L1 rescale, sign election",
    "breadcrumbs": "drop outliers and small magnitudes, weighted sum",
    "breadcrumbs_ties": "drop outliers and small magnitudes, sign election",
    "della": "rank-dependent random drop, L1 rescale, sign election",
    "della_linear": "rank-dependent random drop, L1 rescale, weighted sum",
}


def _params(variant: Variant) -> tuple[Param, ...]:
    """The sparsification's parameters, then normalize, lambda and rescale (if it has one)."""
    declared = [
        *SPARSIFICATIONS[variant.sparsification].params,
        Param(
            "normalize",
            variant.normalize,
            "divide by the sum of the weights (of the sign-agreeing models, with sign election)",
            check=boolean,
        ),
        Param("lambda", 1.0, "scale of the merged task vector", check=number, traced=True),
    ]
    if variant.rescale is not None:
        doc = "rescale kept task vectors to their L1 norm"
        declared.append(Param("rescale", variant.rescale, doc, check=boolean))
    return tuple(declared)


def _rescaled_passes(variant: Variant) -> TwoPasses:
    """A random sparsification with `rescale`, over blocks of rows: the first pass draws the
    masks and sums |delta_i| and |m_i delta_i| by chunks ([2N, K]), `finish` gives each model's
    factor, the second draws the same masks (`sparsify.RowKey`) and merges."""
    row = dict(sparsification=variant.sparsification, sign_consensus=variant.sign_consensus)
    trims = [p.name for p in SPARSIFICATIONS[variant.sparsification].params]

    def statistics(stacked, weights, base, *, key=None, **params):
        del weights
        deltas = task_vectors(stacked, base)
        trim = {name: params[name] for name in trims}
        keep = keep_masks(variant.sparsification, key, deltas, **trim)
        sums = [sparsify.l1_chunk_sums(d, keep[i]) for i, d in enumerate(deltas)]
        return jnp.concatenate(sums)

    def finish(sums, weights, **params):
        del params
        return jnp.stack(
            [sparsify.l1_rescale(sums[2 * i : 2 * i + 2]) for i in range(len(weights))]
        )

    def apply(stacked, weights, base, scales, *, key=None, **params):
        values = dict(params)
        lambda_ = values.pop("lambda")
        return generalized_task_arithmetic(
            stacked, weights, base, key=key, lambda_=lambda_, scales=scales, **row, **values
        )

    def sums_shape(shape, n):
        return 2 * n, gram_sums_shape(shape, 1)[1]

    return TwoPasses(statistics, finish, apply, sums_shape)


def _blocked(variant: Variant) -> Callable[[Mapping[str, Any]], TwoPasses | str | None]:
    """Task arithmetic and the random trims merge row by row, rescaled ones in two passes (their
    L1 norms are the whole tensor's); the other trims rank whole task vectors."""
    kind = SPARSIFICATIONS[variant.sparsification]
    if variant.sparsification is None:
        return always_rows
    if not kind.random:
        return never_blocked
    passes = _rescaled_passes(variant)
    return lambda params: passes if params["rescale"] else ROWS


def _method(name: str, variant: Variant) -> MergeMethod:
    """The registration of a row of VARIANTS: its leaf is `generalized_task_arithmetic` with the
    row's sparsification and sign election, and the declared parameters' defaults."""
    kind = SPARSIFICATIONS[variant.sparsification]
    params = _params(variant)
    defaults = {p.name: p.default for p in params}
    row = dict(sparsification=variant.sparsification, sign_consensus=variant.sign_consensus)

    def leaf(stacked, weights, base=None, *, key=None, **given):
        values = {**defaults, **given}
        lambda_ = values.pop("lambda")
        return generalized_task_arithmetic(
            stacked, weights, base, key=key, lambda_=lambda_, **row, **values
        )

    leaf.__name__ = leaf.__qualname__ = name
    leaf.__doc__ = (
        f"{name}: {SUMMARIES[name]} ({kind.citation}).\n\n`generalized_task_arithmetic` with "
        f"sparsification={variant.sparsification!r} and sign_consensus={variant.sign_consensus}; "
        "mergekit's parameter `lambda` is its lambda_."
    )
    return MergeMethod(
        name=name,
        leaf=leaf,
        params=params,
        base=BASE_REQUIRED,
        random=kind.random,
        summary=SUMMARIES[name],
        citation=kind.citation,
        check=kind.check,
        signed_weights=True,
        blocked=_blocked(variant),
        scratch=kind.scratch,
    )


for _name, _variant in VARIANTS.items():
    register(_method(_name, _variant))
del _name, _variant
