"""How far a zoo's experts are from the base and from each other, per tensor family.

With base weights W_0 and expert weights W_i, expert i's task vector is tau_i = W_i - W_0. Over
the tensors of one family (the same role in every layer: `self_attn.q_proj.weight`, `mlp.up_proj
.weight`, `embed_tokens.weight`, ...), flattened and concatenated, this reports

    relative norm    ||tau_i|| / ||W_0||
    task angle       arccos <tau_i, tau_j> / (||tau_i|| ||tau_j||)    (between two experts)
    weight angle     arccos <W_i, W_j> / (||W_i|| ||W_j||)            (what the Karcher mean sees)

as the mean over experts (relative norm) or over pairs (angles), in float64. The weight angle is
the geodesic distance on the unit sphere between the normalized weights, the distance the paper's
Karcher mean averages over (Wang, Ye, Yin 2026, Sec. 3.4).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import safetensors.numpy

LAYER_PREFIX = re.compile(r"^model\.layers\.\d+\.")


def tensor_family(name: str) -> str:
    """A Hugging Face tensor name without its layer index: `model.layers.3.mlp.up_proj.weight`
    -> `mlp.up_proj.weight`; `model.embed_tokens.weight` -> `embed_tokens.weight`."""
    return LAYER_PREFIX.sub("", name).removeprefix("model.")


def angle_degrees(a: np.ndarray, b: np.ndarray) -> float:
    """arccos <a, b> / (||a|| ||b||), in degrees."""
    cosine = float(a @ b) / (float(np.linalg.norm(a)) * float(np.linalg.norm(b)))
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def family_distances(
    base: Mapping[str, np.ndarray],
    experts: Sequence[Mapping[str, np.ndarray]],
    family: Callable[[str], str] = tensor_family,
) -> dict[str, dict[str, float]]:
    """{family: {"relative_norm", "task_angle", "weight_angle"}} over the experts (at least two),
    with the degrees of the angles; families in the order their first tensor appears.

    `family` names each tensor's family; `lambda name: "model"` gives the whole model's.
    """
    families: dict[str, list[str]] = {}
    for name in base:
        families.setdefault(family(name), []).append(name)
    rows = {}
    for family, names in families.items():
        w0 = np.concatenate([np.asarray(base[n], np.float64).ravel() for n in names])
        weights = [
            np.concatenate([np.asarray(e[n], np.float64).ravel() for n in names]) for e in experts
        ]
        tasks = [w - w0 for w in weights]
        pairs = list(itertools.combinations(range(len(experts)), 2))
        rows[family] = {
            "relative_norm": float(np.mean([np.linalg.norm(t) for t in tasks]))
            / float(np.linalg.norm(w0)),
            "task_angle": float(np.mean([angle_degrees(tasks[i], tasks[j]) for i, j in pairs])),
            "weight_angle": float(
                np.mean([angle_degrees(weights[i], weights[j]) for i, j in pairs])
            ),
        }
    return rows


def checkpoint_distances(
    base: Path, experts: Sequence[Path], family: Callable[[str], str] = tensor_family
) -> dict[str, dict[str, float]]:
    """`family_distances` of a zoo's saved members (each a `model.safetensors` directory)."""
    weights = [safetensors.numpy.load_file(d / "model.safetensors") for d in (base, *experts)]
    return family_distances(weights[0], weights[1:], family)


def distance_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """The distances as a Markdown table, one row per tensor family."""
    lines = [
        "| tensor family | task vector norm / base norm | angle between task vectors | "
        "angle between experts' weights |",
        "|---|---|---|---|",
    ]
    for family, row in rows.items():
        lines.append(
            f"| {family} | {row['relative_norm']:.4f} | {row['task_angle']:.1f}° | "
            f"{row['weight_angle']:.3f}° |"
        )
    return "\n".join(lines)
