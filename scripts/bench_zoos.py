"""The zoos that `scripts/bench_merge.py` times, in bfloat16.

The small zoo has Qwen2.5-0.5B's shapes (about 1 GB per expert), each expert the shared base plus
its own small random update (`jkarcher.demo.fine_tuned`). The big zoo (`--zoo=big`) has
Qwen2.5-3B's shapes (about 6.2 GB each; 5 experts are 31 GB, more than a 24 GB machine's memory).
The wide zoo (`--zoo=wide`, `bench_wide.py`) has Llama-3-70B's widest tensors: its embedding and
LM head (128256 x 8192, 2.1 GB each) and one decoder layer of its shapes (1.7 GB), 5.9 GB an
expert (47 GB for 8); its `smoke` shapes are the same layout, small, to test the bench.

The big and wide zoos are written by one streaming builder (`stream_zoo`): block of rows by block
of rows (a few tens of MB) into every expert's planned shards at once, so no model, nor even one
whole tensor, is ever held in memory. Each block is a random base (as `jkarcher.demo.random_weights`
draws it) plus, per expert, a quarter of the base shifted by a different number of columns: an
update about as large as the demo experts' and different for every expert, at the cost of a copy
rather than a random draw.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np

from jkarcher import demo
from jkarcher.io.output_dir import staged_directory
from jkarcher.io.writer import OutputTensor, ShardWriter, natural_key, plan_shards, write_index
from jkarcher.models.config import ModelConfig

QWEN05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_layers=24,
    num_heads=14,
    num_kv_heads=2,
    tie_word_embeddings=True,
)
QWEN3B = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=11008,
    num_layers=36,
    num_heads=16,
    num_kv_heads=2,
    tie_word_embeddings=True,
)
# The wide zoo's dimensions (`ModelConfig.llama`'s fields): Llama-3-70B's with one layer, and
# small ones (head_dim 32) to test the bench quickly.
LLAMA3_70B_ONE_LAYER = dict(
    vocab_size=128256,
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=1,
    num_attention_heads=64,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=8192,
)
WIDE_SHAPES = {
    "llama3-70b": LLAMA3_70B_ONE_LAYER,
    "smoke": LLAMA3_70B_ONE_LAYER
    | dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=896,
        num_attention_heads=8,
        num_key_value_heads=2,
    ),
}
WIDE_CONFIG = {"torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 0}  # demo tokenizer
SHARD_BYTES = 5 * 10**9  # as Hugging Face shards checkpoints
UPDATE = np.float32(0.25)
BLOCK_VALUES = 1 << 23  # values in one block of rows that `stream_zoo` draws (32 MB)


def make_zoo(directory: Path, experts: int) -> list[Path]:
    """The small zoo's experts' directories, written once (module docstring)."""
    names = [f"expert-{i}" for i in range(experts)]
    if not directory.is_dir():
        print(f"making the zoo under {directory} (once; about a minute per expert)", flush=True)
        rng = np.random.default_rng(0)
        config = demo.qwen2_config(**QWEN05B)
        tokenizer = demo.build_tokenizer()
        with staged_directory(directory, overwrite=False) as staging:
            base = demo.random_weights(config, rng)
            for name in names:
                demo.write_model(staging / name, demo.fine_tuned(base, rng), config, tokenizer)
    return [directory / name for name in names]


def make_big_zoo(directory: Path, experts: int) -> list[Path]:
    """The big zoo's experts' directories, written once (module docstring)."""
    config = demo.qwen2_config(**QWEN3B)
    return stream_zoo(directory, experts, config, demo.qwen2_shapes(config), "big zoo")


def make_wide_zoo(directory: Path, experts: int, shapes: str) -> list[Path]:
    """The wide zoo's experts' directories, written once (module docstring): `shapes` names
    the dimensions, a key of `WIDE_SHAPES`."""
    config = ModelConfig.llama(**WIDE_SHAPES[shapes]).to_hf() | WIDE_CONFIG
    weights = {
        name: shape
        for name, shape in demo.qwen2_shapes(config).items()
        if not name.endswith(".bias")  # Llama's layout: Qwen2's without the q, k, v biases
    }
    return stream_zoo(directory, experts, config, weights, f"wide zoo ({shapes})")


def stream_zoo(
    directory: Path, experts: int, config: dict, shapes: dict[str, tuple[int, ...]], what: str
) -> list[Path]:
    """`experts` checkpoints of the tensors `shapes` names (and `config`) under `directory`,
    written once, streaming, as the module docstring says: their directories."""
    names = [f"expert-{i}" for i in range(experts)]
    if directory.is_dir():
        missing = [name for name in names if not (directory / name).is_dir()]
        if missing:
            raise FileNotFoundError(f"{directory} has no {missing[0]}: delete it to remake it")
        return [directory / name for name in names]
    layout = [
        OutputTensor(name, np.dtype(ml_dtypes.bfloat16), shapes[name])
        for name in sorted(shapes, key=natural_key)
    ]
    shards = plan_shards(layout, SHARD_BYTES)
    size = experts * sum(shard.nbytes for shard in shards)
    directory.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory.parent).free
    if size > free:
        raise OSError(
            f"the {what} needs {size / 1e9:.1f} GB; {directory.parent} has {free / 1e9:.1f}"
        )
    print(f"making the {what}, {size / 1e9:.1f} GB, under {directory} (once)", flush=True)
    tokenizer = demo.build_tokenizer()
    rng = np.random.default_rng(0)
    with staged_directory(directory, overwrite=False) as staging, contextlib.ExitStack() as stack:
        writers = []
        for name in names:
            (staging / name).mkdir()
            writers.append(stack.enter_context(ShardWriter(staging / name, shards)))
        for tensor in layout:
            for first, stop in row_blocks(tensor.shape):
                shape = (stop - first, *tensor.shape[1:])
                base = rng.standard_normal(shape, np.float32) * np.float32(0.02)
                if tensor.name.endswith("norm.weight"):
                    base += np.float32(1.0)
                for shift, writer in enumerate(writers, start=1):
                    update = np.roll(base, shift, axis=-1)
                    expert = (base + UPDATE * update).astype(ml_dtypes.bfloat16)
                    writer.write_rows(tensor.name, first, expert)
        stack.close()
        for name in names:
            if len(shards) > 1:
                write_index(staging / name, shards)
            demo.write_model_files(staging / name, config, tokenizer)
    return [directory / name for name in names]


def row_blocks(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """The blocks of rows [first, stop) that `stream_zoo` draws a tensor in: a vector whole, a
    matrix in blocks of at most `BLOCK_VALUES` values (at least one row each)."""
    if len(shape) < 2:
        return [(0, shape[0])]
    rows = max(1, BLOCK_VALUES // math.prod(shape[1:]))
    return [(first, min(first + rows, shape[0])) for first in range(0, shape[0], rows)]
