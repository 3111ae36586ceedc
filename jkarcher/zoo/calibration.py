"""Each zoo model's statistics on calibration data, for the study rows that merge with them:
its diagonal Fisher (`jkarcher.fisher`) and its linear layers' input Grams (`jkarcher.grams`).

A model's statistics are computed on its own training data (disjoint from the held-out
evaluation data): the base's on the mixture of every domain, each expert's on its domain.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import jax
import numpy as np

from jkarcher.fisher import causal_lm_fisher
from jkarcher.grams import causal_lm_grams
from jkarcher.zoo.domains import DOMAINS
from jkarcher.zoo.recipes import ZooRecipe
from jkarcher.zoo.tokenizer import BOS, byte_tokenizer
from jkarcher.zoo.training import domain_texts, packed_windows

CALIBRATION_TEXTS = 2000  # training strings sampled for each model's statistics
CALIBRATION_ROWS = 64  # windows of seq_len tokens the statistics are averaged over


def calibration_batches(domain: str | None, recipe: ZooRecipe) -> list:
    """Batches of (tokens, mask) from the training data of `domain` (None: every domain)."""
    tokenizer = byte_tokenizer()
    all_domains = [d.name for d in DOMAINS]
    texts = [
        text
        for d in ([domain] if domain else all_domains)
        for text in domain_texts(
            d, "train", CALIBRATION_TEXTS // (1 if domain else len(all_domains)), recipe.seed
        )
    ]
    bos = tokenizer.token_to_id(BOS)
    windows = packed_windows(tokenizer, texts, recipe.seq_len, bos, recipe.seed)
    windows = windows[:CALIBRATION_ROWS]
    return [(w, np.ones_like(w)) for w in np.split(windows, CALIBRATION_ROWS // 16)]


def pool_statistics(
    config,
    pool: Sequence,
    domains: Sequence[str | None],
    recipe: ZooRecipe,
    names: Collection[str],
) -> dict[str, list]:
    """{"fisher": each pool model's diagonal (true) Fisher, "gram": its input Grams}, those of the
    two that `names` asks for; `domains[i]` is model i's domain, None for the base."""
    statistics = {name: [] for name in names}
    for index, (params, domain) in enumerate(zip(pool, domains, strict=True)):
        batches = calibration_batches(domain, recipe)
        if "fisher" in statistics:
            fisher = causal_lm_fisher(config, params, batches, key=jax.random.key(index))
            statistics["fisher"].append(fisher)
        if "gram" in statistics:
            statistics["gram"].append(causal_lm_grams(config, params, batches))
    return statistics
