"""Training the zoo's tiny Qwen2 models with optax: next-token cross-entropy on packed windows.

The base model learns a mixture of every domain; each expert continues from the base on one domain.
Everything is seeded, so a zoo is the same on every run of the same machine and Python.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tokenizers import Tokenizer
from tqdm import tqdm

from jkarcher.models import ModelConfig, forward
from jkarcher.zoo.domains import DOMAINS, domain, format_example, task_examples, text_lines

Params = dict
# Not a domain of its own: every task's prompts and answers at once, the data of an
# instruction-tuned model (the paper's pairwise setting merges a base with its instruct model).
INSTRUCT = "instruct"


def domain_texts(name: str, split: str, count: int, seed: int) -> list[str]:
    """`count` training strings of a domain: formatted task examples, or lines of text; for
    `INSTRUCT`, `count` split evenly over the task domains."""
    if name == INSTRUCT:
        tasks = [d.name for d in DOMAINS if d.kind == "task"]
        return [t for task in tasks for t in domain_texts(task, split, count // len(tasks), seed)]
    d = domain(name)
    if d.kind == "task":
        return [format_example(p, a) for p, a in task_examples(d, count, split, seed)]
    lines = text_lines(name, split)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(lines), size=min(count, len(lines)), replace=False)
    return [lines[i] + "\n" for i in sorted(picks)]


def packed_windows(
    tokenizer: Tokenizer, texts: Sequence[str], seq_len: int, bos_id: int, seed: int
) -> np.ndarray:
    """The texts shuffled, tokenized, concatenated and cut into [M, seq_len] windows.

    Each window starts with BOS; the remainder that does not fill a window is dropped.
    """
    order = np.random.default_rng(seed).permutation(len(texts))
    ids = np.concatenate(
        [tokenizer.encode(texts[i], add_special_tokens=False).ids for i in order]
    ).astype(np.int32)
    body = seq_len - 1
    rows = len(ids) // body
    windows = ids[: rows * body].reshape(rows, body)
    return np.concatenate([np.full((rows, 1), bos_id, np.int32), windows], axis=1)


def random_batches(windows: np.ndarray, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless batches [batch_size, seq_len] drawn from the windows, reshuffled every epoch."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(windows))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield windows[order[start : start + batch_size]]


def next_token_loss(config: ModelConfig, params: Params, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting tokens[:, t + 1] from tokens[:, :t + 1]."""
    logits, _ = forward(config, params, tokens, jnp.ones_like(tokens))
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    targets = tokens[:, 1:, None]
    return -jnp.mean(jnp.take_along_axis(log_probs, targets, axis=-1))


def optimizer(learning_rate: float, steps: int) -> optax.GradientTransformation:
    """AdamW with a short linear warmup and cosine decay, and gradient clipping at norm 1."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        learning_rate,
        warmup_steps=max(1, steps // 20),
        decay_steps=steps,
        end_value=learning_rate / 10,
    )
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))


def train(
    config: ModelConfig,
    params: Params,
    batches: Iterator[np.ndarray],
    *,
    steps: int,
    learning_rate: float,
    desc: str = "training",
) -> tuple[Params, float]:
    """Run `steps` optimizer steps; returns the parameters and the mean loss of the last 10%."""
    opt = optimizer(learning_rate, steps)
    state = opt.init(params)
    step = _train_step(config, opt)
    tail = max(1, steps // 10)
    losses = []
    for i in tqdm(range(steps), desc=desc, unit="step", leave=False):
        params, state, loss = step(params, state, jnp.asarray(next(batches)))
        if i >= steps - tail:
            losses.append(loss)
    return params, float(np.mean(jax.device_get(losses)))


def _train_step(config: ModelConfig, opt: optax.GradientTransformation):
    @jax.jit
    def step(params, state, tokens):
        loss, grads = jax.value_and_grad(functools.partial(next_token_loss, config))(params, tokens)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return step
