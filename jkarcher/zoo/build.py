"""Building a zoo (a recipe of `jkarcher.zoo.recipes`): the base model, then one expert per domain.

Every model is saved as a Hugging Face checkpoint with the byte-level `tokenizer.json` and a
`member.json` holding the part of the recipe that determines it and how its training went. A
member whose record matches is reused, so a build that stops resumes with the next member, and a
zoo that shares its base with another (seeds and distance levels differ only in their experts)
copies that base instead of training it again. A member is written under a `.partial` name and
renamed when complete; `zoo.json`, the recipe and every member's training, is written last.
Nothing in a directory that a build did not write is replaced.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from jkarcher import models
from jkarcher.errors import JkarcherError
from jkarcher.zoo.recipes import (
    ZooRecipe,
    base_mixture,
    base_record,
    expert_batch_seed,
    expert_record,
    expert_texts,
    recipe_record,
)
from jkarcher.zoo.tokenizer import BOS, byte_tokenizer
from jkarcher.zoo.training import packed_windows, random_batches, train

MANIFEST = "zoo.json"
MEMBER = "member.json"
PARTIAL = ".partial"


class ZooError(JkarcherError):
    """A zoo directory holds files that a zoo build did not write."""


def build_zoo(
    directory: str | Path, recipe: ZooRecipe, log=print, base_from: str | Path | None = None
) -> Path:
    """Train (or reuse) the zoo in `directory`: base/, one expert-<domain>/ each, zoo.json.

    `base_from` is another zoo's directory whose base is copied when its record matches.
    """
    directory = Path(directory)
    _check_ours(directory)
    manifest_path = directory / MANIFEST
    if _manifest(directory).get("record") != recipe_record(recipe):
        # Until the build ends, zoo.json marks the directory as a zoo's but describes no zoo.
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(manifest_path, json.dumps({"building": recipe_record(recipe)}) + "\n")
    tokenizer = byte_tokenizer()
    config = recipe.model_config(tokenizer.get_vocab_size())
    bos = tokenizer.token_to_id(BOS)

    def trained(member: Path, record: dict, start, texts, seed: int, steps: int, lr: float):
        """The member's parameters and training record; `start()` (the parameters it starts
        from) and `texts()` (what it trains on) are called only when it must be trained."""
        if _record(member) != record:
            began = time.perf_counter()
            windows = packed_windows(tokenizer, texts(), recipe.seq_len, bos, seed)
            batches = random_batches(windows, recipe.batch_size, seed)
            params, loss = train(
                config, start(), batches, steps=steps, learning_rate=lr, desc=member.name
            )
            training = {"seconds": time.perf_counter() - began, "final_loss": loss}
            _save_member(member, config, params, tokenizer, record, training)
        return models.load(member)[1], json.loads((member / MEMBER).read_text())["training"]

    base_dir = directory / "base"
    if base_from is not None and _record(base_dir) != base_record(recipe):
        source = Path(base_from) / "base"
        if _record(source) == base_record(recipe):
            _copy_member(source, base_dir)
    base, training = trained(
        base_dir,
        base_record(recipe),
        lambda: models.init_params(config, jax.random.key(recipe.seed)),
        lambda: base_mixture(recipe, recipe.seed),
        recipe.seed,
        recipe.base_steps,
        recipe.base_learning_rate,
    )
    trainings = {"base": training}
    log(f"base: {recipe.base_steps} steps, loss {training['final_loss']:.3f}")
    for index, expert in enumerate(recipe.experts):
        params, training = trained(
            directory / f"expert-{expert.domain}",
            expert_record(recipe, index),
            lambda: base,
            lambda: expert_texts(recipe, expert),  # noqa: B023 (called within this iteration)
            expert_batch_seed(recipe, index),
            expert.steps,
            expert.learning_rate,
        )
        distance = _relative_distance(params, base)
        trainings[expert.domain] = training | {"distance_from_base": distance}
        log(
            f"expert {expert.domain}: {expert.steps} steps at lr {expert.learning_rate}, "
            f"loss {training['final_loss']:.3f}, {distance:.3f} from base"
        )
    manifest = {"record": recipe_record(recipe), "training": trainings}
    _write_atomically(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return directory


def _check_ours(directory: Path) -> None:
    """Refuse a directory with entries a build did not write (a zoo.json at its top, or a
    member.json in each entry, marks what a build wrote)."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ZooError(f"{directory}: not a directory; choose another zoo directory")
    if (directory / MANIFEST).is_file():
        return
    foreign = [
        entry.name
        for entry in sorted(directory.iterdir())
        if not entry.name.endswith(PARTIAL) and not (entry / MEMBER).is_file()
    ]
    if foreign:
        raise ZooError(
            f"{directory}: holds {', '.join(foreign)}, not written by a zoo build; "
            "choose another zoo directory"
        )


def _manifest(directory: Path) -> dict:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def _record(member: Path) -> dict | None:
    try:
        return json.loads((member / MEMBER).read_text())["record"]
    except (OSError, ValueError, KeyError):
        return None


def _save_member(member: Path, config, params, tokenizer, record: dict, training: dict) -> None:
    building = member.with_name(member.name + PARTIAL)
    if building.exists():
        shutil.rmtree(building)
    models.save(building, config, params)
    tokenizer.save(str(building / "tokenizer.json"))
    (building / MEMBER).write_text(
        json.dumps({"record": record, "training": training}, indent=2) + "\n"
    )
    _replace(building, member)


def _copy_member(source: Path, member: Path) -> None:
    building = member.with_name(member.name + PARTIAL)
    if building.exists():
        shutil.rmtree(building)
    shutil.copytree(source, building)
    _replace(building, member)


def _replace(building: Path, member: Path) -> None:
    """Move a complete member into place; the member it replaces was written by a build (the
    directory passed `_check_ours`)."""
    if member.exists():
        shutil.rmtree(member)
    building.rename(member)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + PARTIAL)
    temporary.write_text(text)
    temporary.replace(path)


def _relative_distance(params, base) -> float:
    """||params - base|| / ||base|| over all parameters."""
    diff = sum(
        float(np.sum((np.asarray(a) - np.asarray(b)) ** 2))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base), strict=True)
    )
    norm = sum(float(np.sum(np.asarray(b) ** 2)) for b in jax.tree.leaves(base))
    return (diff / norm) ** 0.5


def training_seconds(directory: str | Path) -> dict[str, float]:
    """How long each member of a built zoo took to train ("base", then each expert's domain),
    as its manifest records it."""
    trainings = _manifest(Path(directory)).get("training", {})
    return {member: training["seconds"] for member, training in trainings.items()}


def zoo_members(directory: str | Path) -> tuple[Path, list[Path]]:
    """(base checkpoint, expert checkpoints in the recipe's fixed order) of a built zoo."""
    directory = Path(directory)
    manifest = _manifest(directory)
    if "record" not in manifest:
        raise ZooError(f"{directory}: no complete zoo there; build it with scripts/make_zoo.py")
    record = manifest["record"]["recipe"]
    experts = [directory / f"expert-{e['domain']}" for e in record["experts"]]
    return directory / "base", experts
