"""The paper's pairwise setting (its Table 2): a base model and one instruct-like fine-tune of it,
merged at several model sizes.

The paper merges each Qwen2.5 base with its instruct model at three sizes and finds the Karcher
mean ahead by a small margin, "as expected when geometric discrepancies between models are
limited" (Wang, Ye, Yin 2026, Sec. 4.2). Here each size is a base pre-trained as the fine-tune
zoo's base is (same data, steps and learning rate; only its width and depth change), and its
instruct model is fine-tuned from it on every task's prompts and answers at once
(`jkarcher.zoo.training.INSTRUCT`), with half of its texts from the base's mixture. Each seed
draws the instruct model's data and batch order afresh; the base is shared. A cell is one
(size, seed): the base and its instruct model merged by every method that merges two models.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import safetensors.numpy

from jkarcher.zoo.distances import angle_degrees
from jkarcher.zoo.recipes import FINETUNE, ExpertRecipe, ZooRecipe
from jkarcher.zoo.training import INSTRUCT


@dataclasses.dataclass(frozen=True)
class Size:
    """One model size: hidden width and number of layers (the MLP is 3x as wide)."""

    name: str
    hidden_size: int
    layers: int


SIZES = (Size("64x2", 64, 2), Size("96x3", 96, 3), Size("128x4", 128, 4))  # 128x4: the zoo's
INSTRUCT_TUNING = ExpertRecipe(INSTRUCT, steps=600, learning_rate=1e-3, general_share=0.5)


def size_recipe(
    size: Size, seed: int, base: ZooRecipe = FINETUNE, step_scale: float = 1.0
) -> ZooRecipe:
    """The zoo of one cell: `base`'s recipe at the size's width and depth, with one instruct
    expert (`step_scale` times its steps, at least 1) of expert seed `seed`."""
    steps = max(1, round(step_scale * INSTRUCT_TUNING.steps))
    instruct = dataclasses.replace(INSTRUCT_TUNING, steps=steps)
    return dataclasses.replace(
        base,
        hidden_size=size.hidden_size,
        layers=size.layers,
        experts=(instruct,),
        expert_seed=seed,
    )


def pair_distances(base_dir: Path, expert_dirs: list[Path]) -> dict[str, float]:
    """How far the one expert is from the base, over the whole model in float64:

        weight angle    arccos <W_0, W_1> / (||W_0|| ||W_1||)   (degrees)
        relative norm   ||W_1 - W_0|| / ||W_0||

    and the number of parameters."""
    (expert_dir,) = expert_dirs
    base, expert = (
        safetensors.numpy.load_file(d / "model.safetensors") for d in (base_dir, expert_dir)
    )
    w0 = np.concatenate([np.asarray(base[n], np.float64).ravel() for n in sorted(base)])
    w1 = np.concatenate([np.asarray(expert[n], np.float64).ravel() for n in sorted(base)])
    return {
        "weight_angle": angle_degrees(w0, w1),
        "relative_norm": float(np.linalg.norm(w1 - w0) / np.linalg.norm(w0)),
        "parameters": int(w0.size),
    }
