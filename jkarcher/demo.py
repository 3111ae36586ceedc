"""A small built-in example: tiny random Qwen2-layout checkpoints in HF layout, made on first use.

The example is three "experts" that share a random base and differ by small random updates, each
a complete HF directory that `transformers` loads: `config.json` (Qwen2ForCausalLM),
`model.safetensors` in bfloat16, a byte-level BPE `tokenizer.json` trained on a built-in text (no
download), `tokenizer_config.json` and `generation_config.json`. The same seed gives the same
bytes. They live in `ROOT/qwen2-tiny-v1-seedN/expert-{a,b,c}` (`demo_models(root, seed)`).

When they are made: reading a config never writes anything (`configs/demo.py` only names the
directories, `demo_models`). A run makes them: `scripts/merge.py` calls
`make_missing_demo_models` with the config's model paths before it plans the merge, which writes
the experts of every path that names a demo expert (by the directory names above) and is not there
yet, and nothing else; `ensure_demo_models(root)` does the same for one root. So
`python scripts/merge.py --config configs/demo.py` works on a fresh clone, and so does a mergekit
YAML that names the demo experts. The builders are public so that tests can make variants (other
vocabulary sizes, tied embeddings, sharded weights).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np
import tokenizers

from jkarcher.io.output_dir import staged_directory
from jkarcher.io.writer import save_checkpoint, write_json

DEMO_MODELS = ("expert-a", "expert-b", "expert-c")
DEMO_VERSION = "qwen2-tiny-v1"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_CORPUS = (
    "The weighted Karcher mean averages directions on the unit sphere.",
    "Merging models in weight space needs no training data and no gradients.",
    "A fine-tuned model moves a little away from its base; several such moves can be combined.",
    "Each tensor keeps the average length of its sources while its direction is averaged.",
    "Small examples run in seconds, and larger ones stream one tensor at a time from disk.",
    "def merge(models, weights):\n    return sum(w * m for w, m in zip(weights, models))\n",
)


def qwen2_config(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
) -> dict:
    """A `config.json` for a Qwen2ForCausalLM of the given size."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "bfloat16",
    }


def qwen2_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every weight of a Qwen2ForCausalLM with its shape, under the HF names."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes |= {
            f"{layer}.self_attn.q_proj.weight": (hidden, hidden),
            f"{layer}.self_attn.q_proj.bias": (hidden,),
            f"{layer}.self_attn.k_proj.weight": (kv, hidden),
            f"{layer}.self_attn.k_proj.bias": (kv,),
            f"{layer}.self_attn.v_proj.weight": (kv, hidden),
            f"{layer}.self_attn.v_proj.bias": (kv,),
            f"{layer}.self_attn.o_proj.weight": (hidden, hidden),
            f"{layer}.mlp.gate_proj.weight": (inter, hidden),
            f"{layer}.mlp.up_proj.weight": (inter, hidden),
            f"{layer}.mlp.down_proj.weight": (hidden, inter),
            f"{layer}.input_layernorm.weight": (hidden,),
            f"{layer}.post_attention_layernorm.weight": (hidden,),
        }
    shapes["model.norm.weight"] = (hidden,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes


def random_weights(
    config: dict, rng: np.random.Generator, dtype=ml_dtypes.bfloat16
) -> dict[str, np.ndarray]:
    """Random weights for `config`: N(0, 0.02) matrices and biases, norms near 1."""
    weights = {}
    for name, shape in qwen2_shapes(config).items():
        values = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        if name.endswith("norm.weight"):
            values += np.float32(1.0)
        weights[name] = values.astype(dtype)
    return weights


def fine_tuned(
    base: dict[str, np.ndarray], rng: np.random.Generator, scale: float = 0.005
) -> dict[str, np.ndarray]:
    """The base plus a small random update of relative size about `scale / 0.02` per tensor."""
    return {
        name: (
            x.astype(np.float32) + np.float32(scale) * rng.standard_normal(x.shape, np.float32)
        ).astype(x.dtype)
        for name, x in base.items()
    }


def build_tokenizer(vocab_size: int = 320) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer trained on a built-in text (deterministic, no download)."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return tokenizer


def write_model(
    directory: str | os.PathLike,
    weights: dict[str, np.ndarray],
    config: dict,
    tokenizer: tokenizers.Tokenizer,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write one complete HF checkpoint directory (weights, config, tokenizer, generation)."""
    directory = Path(directory)
    save_checkpoint(directory, weights, max_shard_bytes)
    write_model_files(directory, config, tokenizer)
    return directory


def write_model_files(
    directory: str | os.PathLike, config: dict, tokenizer: tokenizers.Tokenizer
) -> None:
    """Write a checkpoint's files other than its weights: config, tokenizer, generation."""
    directory = Path(directory)
    write_json(directory / "config.json", config)
    tokenizer.save(str(directory / "tokenizer.json"))
    write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": SPECIAL_TOKENS[0],
            "pad_token": SPECIAL_TOKENS[0],
            "model_max_length": config["max_position_embeddings"],
        },
    )
    eos = tokenizer.token_to_id(SPECIAL_TOKENS[0])
    write_json(
        directory / "generation_config.json",
        {"bos_token_id": eos, "eos_token_id": eos, "max_new_tokens": 32, "do_sample": False},
    )


def write_demo_models(directory: str | os.PathLike, seed: int = 0) -> list[Path]:
    """Write the demo experts (a shared random base plus small updates) under `directory`."""
    rng = np.random.default_rng(seed)
    tokenizer = build_tokenizer()
    vocab_size = -(-tokenizer.get_vocab_size() // 64) * 64
    config = qwen2_config(vocab_size)
    base = random_weights(config, rng)
    return [
        write_model(Path(directory) / name, fine_tuned(base, rng), config, tokenizer)
        for name in DEMO_MODELS
    ]


def demo_models(root: str | os.PathLike, seed: int = 0) -> list[Path]:
    """The directories of the demo experts under `root` (whether or not they are written yet)."""
    directory = Path(root).expanduser() / f"{DEMO_VERSION}-seed{seed}"
    return [directory / name for name in DEMO_MODELS]


def ensure_demo_models(root: str | os.PathLike, seed: int = 0) -> list[Path]:
    """The demo experts' directories under `root`, written first if they are not there yet."""
    paths = demo_models(root, seed)
    directory = paths[0].parent
    if not directory.is_dir():
        with staged_directory(directory, overwrite=False) as staging:
            write_demo_models(staging, seed)
    return paths


def make_missing_demo_models(paths: Iterable[str | os.PathLike | None]) -> list[Path]:
    """Write the demo experts that `paths` name and that are not there yet; other paths (and
    None) are left alone. Returns the directories of the experts written.

    A path names a demo expert when it is `ROOT/qwen2-tiny-v1-seedN/expert-a` (or -b, -c), as
    `demo_models(ROOT, N)` gives; the three experts of that ROOT and N are written together.
    """
    written: list[Path] = []
    for path in paths:
        if path is None:
            continue
        path = Path(path).expanduser()
        seed = re.fullmatch(rf"{re.escape(DEMO_VERSION)}-seed(\d+)", path.parent.name)
        if seed and path.name in DEMO_MODELS and not path.parent.is_dir():
            written += ensure_demo_models(path.parent.parent, int(seed.group(1)))
    return written
