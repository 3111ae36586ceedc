"""RAM, Reinforced Agent Merging, and RAM+ (Yuan et al. 2026, "Behavior Knowledge Merge in
Reinforced Agentic Models", arXiv:2601.13572): average the entries that several models changed,
keep the entries that one model alone changed.

With task vectors delta_i = x_i - base, an entry of model i is *active* where |delta_i| > epsilon
(strictly). Entry by entry, c = #{i : active} counts the models that changed it:

- ram: merged = base + sum_{i active} delta_i / max(c, 1). An entry that one model changed
  (c = 1) keeps that model's change whole; one that several changed (c > 1) gets the mean of
  their changes; one that none changed (c = 0) stays the base's. Changes of at most epsilon are
  dropped.
- ramplus_tl: as ram, but where c = 1 the one model's change is scaled by
      lambda_i = 1 + r * clip(rho_i, 0, alpha),    rho_i = S_i / max(U_i, epsilon),
  with S_i (U_i) the number of active entries of model i that are shared, c > 1 (unique,
  c = 1), counted over the tensor: "tensor-local", where the paper counts over the whole model.
  A model with many shared entries for its unique ones has its unique changes boosted, at most
  by the factor 1 + r alpha, against their dilution.

The per-model weights take no part: both weigh the changes only by the counts. ram is ramplus_tl
with r = 0. Definitions, parameter names and defaults follow mergekit 0.1.5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jkarcher.methods.registry import (
    BASE_REQUIRED,
    MergeMethod,
    Param,
    non_negative,
    number,
    register,
)
from jkarcher.methods.task_arithmetic import task_vectors
from jkarcher.numerics import compute_dtype, sum_over_models

CITATION = "https://arxiv.org/abs/2601.13572"


def active_changes(
    stacked: jax.Array, base: jax.Array, epsilon: float
) -> tuple[list[jax.Array], list[jax.Array], jax.Array]:
    """The task vectors zeroed where inactive, delta_i [|delta_i| > epsilon], their active masks,
    and the per-entry count of active models c (int32), in the compute dtype."""
    deltas = task_vectors(stacked, base)
    active = [jnp.abs(d) > epsilon for d in deltas]
    changes = [jnp.where(a, d, 0.0) for a, d in zip(active, deltas, strict=True)]
    counts = sum_over_models(a.astype(jnp.int32) for a in active)
    return changes, active, counts


def ram(stacked, weights, base, *, key=None, epsilon: float = 1e-5) -> jax.Array:
    """RAM (Yuan et al. 2026, arXiv:2601.13572): base + sum_{i active} delta_i / max(c, 1), with
    delta_i = x_i - base active where |delta_i| > epsilon and c the number of active models,
    entry by entry. The weights are not used."""
    del weights, key
    changes, _, counts = active_changes(stacked, base, epsilon)
    merged = sum_over_models(changes) / jnp.maximum(counts, 1).astype(compute_dtype())
    return base.astype(merged.dtype) + merged


def ramplus_tl(
    stacked,
    weights,
    base,
    *,
    key=None,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> jax.Array:
    """RAM+, tensor-local (Yuan et al. 2026, arXiv:2601.13572): ram, but where one model alone is
    active (c = 1) its change is scaled by lambda_i = 1 + r clip(S_i / max(U_i, epsilon), 0, alpha),
    S_i and U_i its shared and unique active entries in this tensor. The weights are not used."""
    del weights, key
    dtype = compute_dtype()
    changes, active, counts = active_changes(stacked, base, epsilon)
    shared, unique = counts > 1, counts == 1
    boosted = []
    for a, change in zip(active, changes, strict=True):
        shared_count = jnp.sum(a & shared, dtype=jnp.int32).astype(dtype)
        unique_count = jnp.sum(a & unique, dtype=jnp.int32).astype(dtype)
        rho = shared_count / jnp.maximum(unique_count, epsilon)
        boosted.append((1.0 + r * jnp.clip(rho, 0.0, alpha)) * change)
    mean = sum_over_models(changes) / jnp.maximum(counts, 1).astype(dtype)
    merged = jnp.where(unique, sum_over_models(boosted), mean)
    return base.astype(dtype) + merged


_EPSILON = Param(
    "epsilon",
    1e-5,
    "changes of magnitude at most this count as none",
    check=non_negative,
    traced=True,
)

register(
    MergeMethod(
        name="ram",
        scratch=(0.1, 0.5),
        leaf=ram,
        params=(_EPSILON,),
        base=BASE_REQUIRED,
        weighted=False,
        summary="mean of the changes where several models changed an entry, the change where one",
        citation=CITATION,
    )
)
register(
    MergeMethod(
        name="ramplus_tl",
        scratch=(2.1, 0.5),
        leaf=ramplus_tl,
        params=(
            Param(
                "r",
                0.1,
                "strength of the boost of changes one model alone made",
                check=number,
                traced=True,
            ),
            Param(
                "alpha",
                0.2,
                "cap of the shared-to-unique ratio in the boost",
                check=non_negative,
                traced=True,
            ),
            _EPSILON,
        ),
        base=BASE_REQUIRED,
        weighted=False,
        summary="ram, with one model's changes boosted by its shared-to-unique ratio per tensor",
        citation=CITATION,
    )
)
