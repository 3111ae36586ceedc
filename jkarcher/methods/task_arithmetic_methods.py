"""The task-vector methods as mergekit's registry lists them: task arithmetic, TIES, DARE,
breadcrumbs and DELLA, each with or without sign election, as rows of `VARIANTS` over the
generalized task arithmetic of `jkarcher.methods.task_arithmetic` (its sparsification, whether it
elects signs, its defaults of `normalize` and `rescale`). Defaults and parameter names follow
mergekit 0.1.5. A tensor too large for the memory budget merges in blocks of rows
(`jkarcher.methods.trim_passes`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from jkarcher.methods.registry import (
    BASE_REQUIRED,
    ROWS,
    MergeMethod,
    Param,
    Passes,
    always_rows,
    boolean,
    number,
    register,
)
from jkarcher.methods.task_arithmetic import SPARSIFICATIONS, generalized_task_arithmetic
from jkarcher.methods.trim_passes import trim_passes


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


def _blocked(variant: Variant) -> Callable[[Mapping[str, Any]], Passes | str]:
    """Task arithmetic and the random trims without `rescale` merge row by row; the others in
    passes over blocks of rows (`jkarcher.methods.trim_passes`)."""
    if variant.sparsification is None:
        return always_rows

    def blocked(params: Mapping[str, Any]) -> Passes | str:
        passes = trim_passes(variant.sparsification, variant.sign_consensus, params)
        return ROWS if passes is None else passes

    return blocked


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
