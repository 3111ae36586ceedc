"""The recipes of the expert zoos, and the training texts each recipe gives its models.

Two zoos are defined here. In the far zoo (`FAR`) the experts get deliberately different amounts
of fine-tuning on their domain alone (steps and learning rates), so some sit far from the base and
some near, and each forgets most of what it was not trained on. In the fine-tune zoo (`FINETUNE`)
the base is pre-trained longer on text with some of every task, and each expert is fine-tuned from
it as real fine-tunes are made: a small learning rate, few steps, and half of its training texts
drawn from the base's mixture, so it improves its own domain and keeps most of the others. `SMALL`
is the CI-sized zoo.
"""

from __future__ import annotations

import dataclasses
import json
import platform

import numpy as np

from jkarcher.models import ModelConfig
from jkarcher.zoo.domains import DOMAINS
from jkarcher.zoo.training import domain_texts


@dataclasses.dataclass(frozen=True)
class ExpertRecipe:
    domain: str
    steps: int
    learning_rate: float
    general_share: float = 0.0  # share of the training texts drawn from the base's mixture


@dataclasses.dataclass(frozen=True)
class ZooRecipe:
    """Everything that determines a zoo; two zoos with equal recipes are identical."""

    hidden_size: int
    layers: int
    seq_len: int
    batch_size: int
    base_steps: int
    base_learning_rate: float
    examples_per_domain: int
    experts: tuple[ExpertRecipe, ...]
    seed: int = 0
    base_examples_per_task: int | None = None  # the base's examples of each task (default: all)
    expert_seed: int = 0  # draws the experts' data and batch order; the base does not depend on it

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig.qwen2(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=3 * self.hidden_size,
            num_hidden_layers=self.layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            max_position_embeddings=4 * self.seq_len,
        )


def _experts(scale: float, domains: tuple[str, ...] = tuple(d.name for d in DOMAINS)):
    """One expert per domain, steps from 0.5x to 3x `scale` and learning rates 3e-4 to 3e-3."""
    plan = [
        (1.0, 1e-3),
        (3.0, 2e-3),
        (0.5, 3e-4),
        (2.0, 1e-3),
        (1.0, 3e-3),
        (0.5, 1e-3),
        (2.0, 3e-4),
        (3.0, 1e-3),
        (1.0, 2e-3),
        (2.0, 2e-3),
    ]
    return tuple(
        ExpertRecipe(name, max(10, int(scale * steps)), lr)
        for name, (steps, lr) in zip(domains, plan, strict=False)
    )


FAR = ZooRecipe(
    hidden_size=128,
    layers=2,
    seq_len=64,
    batch_size=32,
    base_steps=1200,
    base_learning_rate=3e-3,
    examples_per_domain=20_000,
    experts=_experts(250),
)
FINETUNE = ZooRecipe(
    hidden_size=128,
    layers=4,
    seq_len=64,
    batch_size=32,
    base_steps=3000,
    base_learning_rate=3e-3,
    examples_per_domain=20_000,
    base_examples_per_task=4000,
    experts=tuple(ExpertRecipe(d.name, 300, 1e-3, general_share=0.5) for d in DOMAINS),
)
# Four experts, for CI: the same pipeline end to end in about two minutes.
SMALL = ZooRecipe(
    hidden_size=64,
    layers=2,
    seq_len=64,
    batch_size=16,
    base_steps=150,
    base_learning_rate=3e-3,
    examples_per_domain=2_000,
    experts=_experts(40, ("successor", "counting", "brackets", "prose")),
)

ZOOS = {"far": FAR, "finetune": FINETUNE, "small": SMALL}


def recipe_record(recipe: ZooRecipe) -> dict:
    """The recipe as JSON data (as zoo.json holds it), with the Python version whose stdlib the
    text came from."""
    record = {"recipe": dataclasses.asdict(recipe), "python": platform.python_version()}
    return json.loads(json.dumps(record))


def base_record(recipe: ZooRecipe) -> dict:
    """What determines a recipe's base model: the recipe without its experts."""
    record = recipe_record(recipe)
    del record["recipe"]["experts"], record["recipe"]["expert_seed"]
    return record


def expert_record(recipe: ZooRecipe, index: int) -> dict:
    """What determines the recipe's `index`-th expert: its base, its recipe, its seeds."""
    return {
        "base": base_record(recipe),
        "expert": dataclasses.asdict(recipe.experts[index]),
        "expert_seed": recipe.expert_seed,
        "batch_seed": expert_batch_seed(recipe, index),
    }


def expert_batch_seed(recipe: ZooRecipe, index: int) -> int:
    """The seed of the `index`-th expert's batch order."""
    return recipe.seed + 1 + index + 1000 * recipe.expert_seed


def base_mixture(recipe: ZooRecipe, seed: int) -> list[str]:
    """The base's training texts: `examples_per_domain` of each text domain, and of each task
    `base_examples_per_task` (or as many as of text), drawn with `seed`."""
    texts = []
    for d in DOMAINS:
        count = recipe.examples_per_domain
        if d.kind == "task" and recipe.base_examples_per_task is not None:
            count = recipe.base_examples_per_task
        texts += domain_texts(d.name, "train", count, seed)
    return texts


def expert_texts(recipe: ZooRecipe, expert: ExpertRecipe) -> list[str]:
    """An expert's training texts: `examples_per_domain` of its domain, and general texts (the
    base's mixture, drawn afresh) making up `general_share` of the whole.

    The draws use the recipe's seed plus its `expert_seed`, so experts of seed 0 see the base's
    own samples of their domain and other expert seeds see other samples.
    """
    seed = recipe.seed + recipe.expert_seed
    own = domain_texts(expert.domain, "train", recipe.examples_per_domain, seed)
    general_count = round(len(own) * expert.general_share / (1 - expert.general_share))
    if general_count == 0:
        return own
    general = base_mixture(recipe, seed + 1)
    picks = np.random.default_rng(seed).choice(
        len(general), size=general_count, replace=general_count > len(general)
    )
    return own + [general[i] for i in sorted(picks)]
