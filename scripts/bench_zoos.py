"""The zoos that `scripts/bench_merge.py` times, in bfloat16.

The small zoo has Qwen2.5-0.5B's shapes (about 1 GB per expert), each expert the shared base plus
its own small random update (`jkarcher.demo.fine_tuned`). The big zoo (`--zoo=big`) has
Qwen2.5-3B's shapes (about 6.2 GB each; 5 experts are 31 GB, more than a 24 GB machine's memory).
It is written tensor by tensor into every expert's planned shards at once, so no model is ever
held in memory. Each tensor is a random base (as `jkarcher.demo.random_weights` draws it) plus,
per expert, a quarter of the base shifted by a different number of columns: an update about as
large as the demo experts' and different for every expert, at the cost of a copy rather than a
random draw.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import ml_dtypes
import numpy as np

from jkarcher import demo
from jkarcher.io.output_dir import staged_directory
from jkarcher.io.writer import OutputTensor, ShardWriter, natural_key, plan_shards, write_index

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
SHARD_BYTES = 5 * 10**9  # as Hugging Face shards checkpoints
UPDATE = np.float32(0.25)


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
    names = [f"expert-{i}" for i in range(experts)]
    if directory.is_dir():
        return [directory / name for name in names]
    print(f"making the big zoo under {directory} (once; it streams every tensor)", flush=True)
    config = demo.qwen2_config(**QWEN3B)
    tokenizer = demo.build_tokenizer()
    shapes = demo.qwen2_shapes(config)
    layout = [
        OutputTensor(name, np.dtype(ml_dtypes.bfloat16), shapes[name])
        for name in sorted(shapes, key=natural_key)
    ]
    shards = plan_shards(layout, SHARD_BYTES)
    rng = np.random.default_rng(0)
    with staged_directory(directory, overwrite=False) as staging, contextlib.ExitStack() as stack:
        writers = []
        for name in names:
            (staging / name).mkdir()
            writers.append(stack.enter_context(ShardWriter(staging / name, shards)))
        for tensor in layout:
            base = rng.standard_normal(tensor.shape, np.float32) * np.float32(0.02)
            if tensor.name.endswith("norm.weight"):
                base += np.float32(1.0)
            for shift, writer in enumerate(writers, start=1):
                update = np.roll(base, shift, axis=-1)
                writer.write(tensor.name, (base + UPDATE * update).astype(ml_dtypes.bfloat16))
        stack.close()
        for name in names:
            if len(shards) > 1:
                write_index(staging / name, shards)
            demo.write_model_files(staging / name, config, tokenizer)
    return [directory / name for name in names]
