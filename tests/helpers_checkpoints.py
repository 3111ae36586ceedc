"""Tiny Qwen2-layout checkpoints for the I/O, pipeline and script tests.

The models are small enough to merge in well under a second, and their shapes are chosen so that
only a few distinct shapes need compiling: hidden 16 with 2 query and 2 key/value heads, an MLP
of width 16, one layer.
"""

from __future__ import annotations

import functools
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors.numpy

from jkarcher import demo, pipeline
from jkarcher.config import base_config, validate
from jkarcher.io import Checkpoint

BF16 = np.dtype(ml_dtypes.bfloat16)


def tiny_config(vocab_size: int = 64, tie: bool = False, num_layers: int = 1) -> dict:
    """The config.json of a Qwen2 with hidden size 16 (one layer unless told)."""
    return demo.qwen2_config(
        vocab_size,
        hidden_size=16,
        intermediate_size=16,
        num_layers=num_layers,
        num_heads=2,
        num_kv_heads=2,
        tie_word_embeddings=tie,
    )


@functools.cache
def tokenizer():
    return demo.build_tokenizer()


def tiny_weights(config: dict, seed: int, dtype=BF16) -> dict[str, np.ndarray]:
    """Random weights for `config`, different for every seed."""
    return demo.random_weights(config, np.random.default_rng(seed), dtype)


def write_tiny(
    directory: Path, weights: dict[str, np.ndarray], config: dict, max_shard_bytes=None
) -> Path:
    """One complete HF checkpoint directory (weights, config, tokenizer, generation config)."""
    return demo.write_model(directory, weights, config, tokenizer(), max_shard_bytes)


def make_models(
    root: Path,
    n: int = 3,
    *,
    vocab_sizes: list[int] | None = None,
    ties: list[bool] | None = None,
    dtype=BF16,
    max_shard_bytes: int | None = None,
    first_seed: int = 0,
    num_layers: int = 1,
) -> list[Path]:
    """`n` tiny models under `root` (model0, model1, ...), optionally of different vocabularies
    or tying choices, or with more layers."""
    paths = []
    for i in range(n):
        vocab = vocab_sizes[i] if vocab_sizes else 64
        tie = ties[i] if ties else False
        config = tiny_config(vocab, tie, num_layers)
        weights = tiny_weights(config, first_seed + i, dtype)
        paths.append(write_tiny(root / f"model{i}", weights, config, max_shard_bytes))
    return paths


def read_all(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory, by name."""
    checkpoint = Checkpoint(directory)
    return {name: checkpoint.read(name) for name in checkpoint.names()}


def merge_config(models: list[Path], output: Path, weights=None, **fields):
    """A ConfigDict merging `models` (with `weights`, default 1) into `output`; bf16 karcher on
    one device (so that it equals `jkarcher.merge` bit for bit) unless `fields` say otherwise."""
    config = base_config()
    config.models = [
        {"path": str(p), "weight": 1.0 if weights is None else weights[i]}
        for i, p in enumerate(models)
    ]
    config.output = str(output)
    config.mesh = "devices:1"
    for name, value in fields.items():
        setattr(config, name, value)
    return config


def write_fisher(model: Path, seed: int, path: Path | None = None) -> dict[str, np.ndarray]:
    """A made-up diagonal Fisher of a checkpoint (positive float32, log-normal over three orders
    of magnitude, one tensor per weight of the model) saved as `path` (default
    fisher.safetensors beside the model); returns it by tensor name."""
    rng = np.random.default_rng(seed)
    checkpoint = Checkpoint(model)
    fisher = {
        name: np.exp(rng.normal(0.0, 1.5, checkpoint.info(name).shape)).astype(np.float32)
        for name in checkpoint.names()
    }
    safetensors.numpy.save_file(fisher, path or Path(model) / "fisher.safetensors")
    return fisher


def write_grams(model: Path, seed: int) -> dict[str, np.ndarray | None]:
    """Made-up input Grams of a checkpoint's linear weights (X^T X / T of T = 2 in random inputs
    with scales of their own per coordinate) saved as grams.safetensors beside the model;
    returns them by tensor name, None for the tensors without one."""
    rng = np.random.default_rng(seed)
    checkpoint = Checkpoint(model)
    grams = {}
    for name in checkpoint.names():
        if name.endswith(("_proj.weight", "lm_head.weight")):
            inputs = checkpoint.info(name).shape[1]
            x = rng.standard_normal((2 * inputs, inputs)) * rng.uniform(0.3, 3.0, inputs)
            grams[name] = (x.T @ x / len(x)).astype(np.float32)
    safetensors.numpy.save_file(grams, Path(model) / "grams.safetensors")
    return {name: grams.get(name) for name in checkpoint.names()}


def merge_checkpoints(models: list[Path], output: Path, **fields):
    """Plan and run the merge that `merge_config(models, output, **fields)` describes; returns
    (plan, summary)."""
    plan = pipeline.plan_merge(validate(merge_config(models, output, **fields)))
    return plan, pipeline.run(plan)


def assert_equal_trees(got: dict, want: dict) -> None:
    """The same tensor names, dtypes and values, bit for bit."""
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], np.asarray(want[name]), err_msg=name)


def assert_close_trees(got: dict, want: dict, tolerance: float) -> None:
    """The same tensor names and dtypes, every value within `tolerance` times the largest
    magnitude of its tensor in `want`."""
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        scale = max(float(np.abs(want[name]).max()), np.finfo(np.float32).tiny)
        assert float(np.abs(got[name] - want[name]).max()) <= tolerance * scale, name
