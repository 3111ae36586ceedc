"""Each zoo model's diagonal Fisher, for the study rows that merge with Fishers.

A model's Fisher is estimated on its own training data (disjoint from the held-out evaluation
data): the base's on the mixture of every domain, each expert's on its domain.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from jkarcher.fisher import causal_lm_fisher
from jkarcher.zoo.domains import DOMAINS
from jkarcher.zoo.recipes import ZooRecipe
from jkarcher.zoo.tokenizer import BOS, byte_tokenizer
from jkarcher.zoo.training import domain_texts, packed_windows

FISHER_TEXTS = 2000  # training strings sampled for each model's Fisher
FISHER_ROWS = 64  # windows of seq_len tokens the Fisher is averaged over


def pool_fishers(config, pool: Sequence, domains: Sequence[str | None], recipe: ZooRecipe) -> list:
    """The diagonal (true) Fisher of each pool model; `domains[i]` is model i's domain, None for
    the base (the mixture of domains)."""
    tokenizer = byte_tokenizer()
    bos = tokenizer.token_to_id(BOS)
    all_domains = [d.name for d in DOMAINS]
    fishers = []
    for index, (params, name) in enumerate(zip(pool, domains, strict=True)):
        texts = [
            text
            for d in ([name] if name else all_domains)
            for text in domain_texts(
                d, "train", FISHER_TEXTS // (1 if name else len(all_domains)), recipe.seed
            )
        ]
        windows = packed_windows(tokenizer, texts, recipe.seq_len, bos, recipe.seed)[:FISHER_ROWS]
        batches = [(w, np.ones_like(w)) for w in np.split(windows, FISHER_ROWS // 16)]
        fishers.append(causal_lm_fisher(config, params, batches, key=jax.random.key(index)))
    return fishers
