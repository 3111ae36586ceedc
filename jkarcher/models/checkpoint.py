"""HF checkpoints <-> the decoder's parameter pytree.

A parameter's path in the pytree is its HF tensor name split on "." with "layers.{i}" written
"layers_{i}" (`model.layers.3.mlp.up_proj.weight` <-> ("model", "layers_3", "mlp", "up_proj",
"weight")), and every tensor keeps its HF shape, so the mapping is a renaming in both directions.
Weights are read one tensor at a time through `jkarcher.io.Checkpoint`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jkarcher.io import Checkpoint, CheckpointError
from jkarcher.models.config import ModelConfig, load_config
from jkarcher.models.transformer import Params, param_shapes

# Tensors some checkpoints carry that the forward recomputes or does not use.
_UNUSED = re.compile(r"(.*\.rotary_emb\.inv_freq|lm_head\.weight)$")


def hf_name(path: tuple[str, ...]) -> str:
    """("model", "layers_3", "mlp", "up_proj", "weight") -> "model.layers.3.mlp.up_proj.weight"."""
    return re.sub(r"(^|\.)layers_(\d+)(?=\.|$)", r"\1layers.\2", ".".join(path))


def param_path(name: str) -> tuple[str, ...]:
    """`model.layers.3.mlp.up_proj.weight` -> ("model", "layers_3", "mlp", "up_proj", "weight")."""
    return tuple(re.sub(r"(^|\.)layers\.(\d+)(?=\.|$)", r"\1layers_\2", name).split("."))


def params_to_hf(params: Params) -> dict[str, jax.Array]:
    """The pytree as a flat {HF tensor name: array} dict."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {hf_name(tuple(key.key for key in path)): leaf for path, leaf in leaves}


def expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The HF tensor names this architecture needs, with their shapes."""
    return {name: tuple(s.shape) for name, s in params_to_hf(param_shapes(config)).items()}


def load_params(
    checkpoint: str | os.PathLike | Checkpoint, config: ModelConfig, dtype=jnp.float32
) -> Params:
    """Read a checkpoint's weights into the pytree, cast to `dtype`, one tensor at a time.

    Every needed tensor must be present with the expected shape, and no tensor may be left over
    (other than rotary caches, or `lm_head.weight` when embeddings are tied), so a checkpoint of
    another architecture fails here, naming the tensor and the file, instead of running wrongly.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    expected = expected_tensors(config)
    missing = sorted(set(expected) - set(ckpt.names()))
    if missing:
        raise CheckpointError(
            f"{ckpt.path}: lacks {len(missing)} tensors that a {config.model_type} model with "
            f"this config needs, e.g. {missing[:3]}"
        )
    extra = sorted(n for n in ckpt.names() if n not in expected and not _UNUSED.match(n))
    if extra:
        raise CheckpointError(
            f"{ckpt.path}: has {len(extra)} tensors a {config.model_type} model does not use, "
            f"e.g. {extra[:3]}; is config.json for another architecture?"
        )
    params: Params = {}
    for name, shape in expected.items():
        info = ckpt.info(name)
        if info.shape != shape:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} has shape {list(info.shape)}, the config "
                f"implies {list(shape)}"
            )
        _set(params, param_path(name), jnp.asarray(ckpt.read(name), dtype=dtype))
    return params


def load(checkpoint_dir: str | os.PathLike, dtype=jnp.float32) -> tuple[ModelConfig, Params]:
    """(config, params) of an HF checkpoint directory (`config.json` + safetensors weights)."""
    ckpt = Checkpoint(checkpoint_dir)
    config = load_config(ckpt.path)
    return config, load_params(ckpt, config, dtype)


def save(directory: str | os.PathLike, config: ModelConfig, params: Params, dtype=None) -> Path:
    """Write `config.json` and `model.safetensors` that `transformers` loads as this model.

    `dtype` (default: each leaf's own) is the storage dtype, e.g. jnp.bfloat16.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: np.asarray(jax.device_get(leaf if dtype is None else leaf.astype(dtype)))
        for name, leaf in params_to_hf(params).items()
    }
    safetensors.numpy.save_file(tensors, directory / "model.safetensors", {"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n")
    return directory


def save_statistics(
    statistics: Params, path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write per-tensor statistics of a model (a pytree with the parameters' structure, None
    where a tensor has none) as float32 safetensors under the HF tensor names, with `metadata`.

    The file is written to a temporary name in the same directory and renamed into place, so
    an interrupted run never leaves a partial file under `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: np.asarray(jax.device_get(leaf), np.float32)
        for name, leaf in params_to_hf(statistics).items()
    }
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        safetensors.numpy.save_file(tensors, temporary, dict(metadata or {}))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
