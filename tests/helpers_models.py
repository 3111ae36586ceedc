"""Tiny checkpoints, tokenizers and texts for the model, diagnostics and script tests."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from jkarcher.models import ModelConfig, param_shapes, save

WORDS = (
    "the a merged model keeps its shape while averages shrink norms and ranks collapse "
    "across layers of every sphere geodesic mean weight token"
).split()
SPECIALS = ["<unk>", "<s>"]
VOCAB_SIZE = 64  # >= len(SPECIALS) + len(WORDS)


def tiny_text(num_words: int, seed: int = 0) -> str:
    """Sentences of random words from WORDS, one per line."""
    rng = np.random.default_rng(seed)
    words = rng.choice(WORDS, size=num_words)
    return "\n".join(" ".join(words[i : i + 9]) + "." for i in range(0, num_words, 9))


def save_tokenizer(directory: str | Path, bos: bool) -> Tokenizer:
    """A word-level tokenizer.json over WORDS (plus '.'), prepending <s> when `bos`."""
    vocab = {token: i for i, token in enumerate([*SPECIALS, ".", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    Path(directory).mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(Path(directory) / "tokenizer.json"))
    return tokenizer


def tiny_config(model_type: str, **overrides) -> ModelConfig:
    """Hidden 32, 2 layers, 4 query heads over 2 key/value heads, vocabulary VOCAB_SIZE."""
    fields = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    fields.update(overrides)
    return ModelConfig.qwen2(**fields) if model_type == "qwen2" else ModelConfig.llama(**fields)


def random_params(config: ModelConfig, seed: int, scale: float = 0.3):
    """Parameters with every leaf ~ N(0, scale^2) (norm weights and biases included), so that all
    of them visibly shape the outputs."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32),
        param_shapes(config),
    )


def save_tiny_checkpoint(directory: str | Path, config: ModelConfig, seed: int, bos: bool) -> Path:
    """A random tiny checkpoint with config.json, model.safetensors and tokenizer.json."""
    save(directory, config, random_params(config, seed))
    save_tokenizer(directory, bos)
    return Path(directory)
