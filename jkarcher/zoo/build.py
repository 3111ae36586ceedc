"""Building the zoo: a base model trained on the mixture of domains, then one expert per domain.

The experts get deliberately different amounts of fine-tuning (steps and learning rates), so some
sit far from the base and some near, as the checkpoints of the paper's 14B pool do. Every model is
saved as a Hugging Face checkpoint with the byte-level `tokenizer.json`; `zoo.json` records the
recipe, and a directory whose recipe matches is reused instead of rebuilt.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from jkarcher.models import ModelConfig, init_params, save
from jkarcher.zoo.domains import DOMAINS
from jkarcher.zoo.tokenizer import BOS, byte_tokenizer
from jkarcher.zoo.training import domain_texts, packed_windows, random_batches, train

MANIFEST = "zoo.json"


@dataclasses.dataclass(frozen=True)
class ExpertRecipe:
    domain: str
    steps: int
    learning_rate: float


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


FULL = ZooRecipe(
    hidden_size=128,
    layers=2,
    seq_len=64,
    batch_size=32,
    base_steps=1200,
    base_learning_rate=3e-3,
    examples_per_domain=20_000,
    experts=_experts(250),
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


def recipe_record(recipe: ZooRecipe) -> dict:
    """The recipe as JSON data (as zoo.json holds it), with the Python version whose stdlib the
    text came from."""
    record = {"recipe": dataclasses.asdict(recipe), "python": platform.python_version()}
    return json.loads(json.dumps(record))


def build_zoo(directory: str | Path, recipe: ZooRecipe, log=print) -> Path:
    """Train (or reuse) the zoo in `directory`: base/, one expert-<domain>/ each, zoo.json."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text())["record"] == recipe_record(recipe):
        log(f"zoo in {directory} is up to date")
        return directory
    building = directory.with_name(directory.name + ".partial")
    if building.exists():
        shutil.rmtree(building)
    tokenizer = byte_tokenizer()
    config = recipe.model_config(tokenizer.get_vocab_size())
    bos = tokenizer.token_to_id(BOS)

    def batches(domains: list[str], seed: int):
        texts = [
            text
            for name in domains
            for text in domain_texts(name, "train", recipe.examples_per_domain, recipe.seed)
        ]
        windows = packed_windows(tokenizer, texts, recipe.seq_len, bos, seed)
        return random_batches(windows, recipe.batch_size, seed)

    timings = {}
    start = time.perf_counter()
    params = init_params(config, jax.random.key(recipe.seed))
    base, base_loss = train(
        config,
        params,
        batches([d.name for d in DOMAINS], recipe.seed),
        steps=recipe.base_steps,
        learning_rate=recipe.base_learning_rate,
        desc="base",
    )
    _save(building / "base", config, base, tokenizer)
    timings["base"] = {"seconds": time.perf_counter() - start, "final_loss": base_loss}
    log(f"base: {recipe.base_steps} steps, loss {base_loss:.3f}")
    for index, expert in enumerate(recipe.experts):
        start = time.perf_counter()
        params, loss = train(
            config,
            base,
            batches([expert.domain], recipe.seed + 1 + index),
            steps=expert.steps,
            learning_rate=expert.learning_rate,
            desc=expert.domain,
        )
        _save(building / f"expert-{expert.domain}", config, params, tokenizer)
        timings[expert.domain] = {
            "seconds": time.perf_counter() - start,
            "final_loss": loss,
            "distance_from_base": _relative_distance(params, base),
        }
        log(
            f"expert {expert.domain}: {expert.steps} steps at lr {expert.learning_rate}, "
            f"loss {loss:.3f}, {timings[expert.domain]['distance_from_base']:.3f} from base"
        )
    record = {"record": recipe_record(recipe), "training": timings}
    (building / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    building.rename(directory)
    return directory


def _save(directory: Path, config: ModelConfig, params, tokenizer) -> None:
    save(directory, config, params)
    tokenizer.save(str(directory / "tokenizer.json"))


def _relative_distance(params, base) -> float:
    """||params - base|| / ||base|| over all parameters."""
    diff = sum(
        float(np.sum((np.asarray(a) - np.asarray(b)) ** 2))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base), strict=True)
    )
    norm = sum(float(np.sum(np.asarray(b) ** 2)) for b in jax.tree.leaves(base))
    return (diff / norm) ** 0.5


def zoo_members(directory: str | Path) -> tuple[Path, list[Path]]:
    """(base checkpoint, expert checkpoints in the recipe's fixed order) of a built zoo."""
    directory = Path(directory)
    record = json.loads((directory / MANIFEST).read_text())["record"]["recipe"]
    experts = [directory / f"expert-{e['domain']}" for e in record["experts"]]
    return directory / "base", experts
