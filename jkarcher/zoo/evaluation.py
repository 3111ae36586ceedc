"""Scoring a model on every zoo domain: exact match on held-out tasks, perplexity on held-out text.

Task domains are scored by greedy decoding after `prompt=` and comparing the text up to the first
newline with the answer. Text domains are scored by next-token accuracy (the score) and perplexity
on held-out windows. All shapes are fixed, so each model compiles the decoder once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from jkarcher.models import ModelConfig, forward, next_token_stats
from jkarcher.zoo.domains import ANSWER_MARK, DOMAINS, Domain, format_example, task_examples
from jkarcher.zoo.tokenizer import BOS, PAD
from jkarcher.zoo.training import domain_texts, packed_windows

PROMPT_TOKENS = 24
ANSWER_TOKENS = 8


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Held-out data of every domain, tokenized once and shared by all the models scored."""

    task_prompts: dict[str, np.ndarray]  # domain -> [B, PROMPT_TOKENS] left-padded ids
    task_masks: dict[str, np.ndarray]
    task_answers: dict[str, list[str]]
    text_windows: dict[str, np.ndarray]  # domain -> [M, seq_len] held-out text or examples


def build_eval_set(
    tokenizer: Tokenizer, *, examples: int, text_windows: int, seq_len: int, seed: int
) -> EvalSet:
    """`examples` held-out prompts per task domain (all it has where a domain has fewer) and
    `text_windows` windows per text domain."""
    prompts, masks, answers, windows = {}, {}, {}, {}
    bos = tokenizer.token_to_id(BOS)
    for d in DOMAINS:
        if d.kind == "task":
            pairs = task_examples(d, examples, "eval", seed, at_most=True)
            prompts[d.name], masks[d.name] = _left_padded(
                tokenizer, [p + ANSWER_MARK for p, _ in pairs], bos
            )
            answers[d.name] = [a for _, a in pairs]
            texts = [format_example(p, a) for p, a in pairs]
        else:
            texts = domain_texts(d.name, "eval", 4 * text_windows * seq_len, seed)
        windows[d.name] = packed_windows(tokenizer, texts, seq_len, bos, seed)[:text_windows]
    return EvalSet(prompts, masks, answers, windows)


def _left_padded(tokenizer: Tokenizer, prompts: list[str], bos: int):
    pad = tokenizer.token_to_id(PAD)
    tokens = np.full((len(prompts), PROMPT_TOKENS), pad, np.int32)
    mask = np.zeros_like(tokens)
    for row, prompt in enumerate(prompts):
        ids = [bos, *tokenizer.encode(prompt, add_special_tokens=False).ids]
        if len(ids) > PROMPT_TOKENS:
            raise ValueError(f"prompt {prompt!r} is longer than {PROMPT_TOKENS} tokens")
        tokens[row, -len(ids) :] = ids
        mask[row, -len(ids) :] = 1
    return tokens, mask


@functools.partial(jax.jit, static_argnums=0)
def greedy_answers(config: ModelConfig, params, prompts: jax.Array, mask: jax.Array) -> jax.Array:
    """ANSWER_TOKENS greedy tokens after each left-padded prompt: [B, ANSWER_TOKENS]."""
    batch = prompts.shape[0]
    tokens = jnp.concatenate([prompts, jnp.zeros((batch, ANSWER_TOKENS), prompts.dtype)], 1)
    live = jnp.concatenate([mask, jnp.zeros((batch, ANSWER_TOKENS), mask.dtype)], 1)

    def step(k, state):
        tokens, live = state
        logits, _ = forward(config, params, tokens, live)
        position = PROMPT_TOKENS + k
        chosen = jnp.argmax(logits[:, position - 1], axis=-1).astype(tokens.dtype)
        return tokens.at[:, position].set(chosen), live.at[:, position].set(1)

    tokens, _ = jax.lax.fori_loop(0, ANSWER_TOKENS, step, (tokens, live))
    return tokens[:, PROMPT_TOKENS:]


def exact_match(config, params, tokenizer: Tokenizer, evals: EvalSet, name: str) -> float:
    """Share of held-out prompts whose greedy answer (up to a newline) equals the answer."""
    generated = np.asarray(
        greedy_answers(config, params, evals.task_prompts[name], evals.task_masks[name])
    )
    correct = 0
    for ids, answer in zip(generated, evals.task_answers[name], strict=True):
        text = tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
        correct += text.split("\n", 1)[0] == answer
    return correct / len(generated)


def text_scores(config, params, evals: EvalSet, name: str) -> tuple[float, float]:
    """(next-token accuracy, perplexity) on a domain's held-out windows."""
    windows = jnp.asarray(evals.text_windows[name])
    nll, correct, count = next_token_stats(config, params, windows, jnp.ones_like(windows))
    return float(correct / count), float(jnp.exp(nll / count))


def evaluate(config, params, tokenizer: Tokenizer, evals: EvalSet) -> dict[str, dict]:
    """{domain: {"score": ..., "perplexity": ...}} for every domain.

    The score is exact-match accuracy for tasks and next-token accuracy for text; perplexity is
    on held-out text, or on the held-out examples written out as `prompt=answer` lines.
    """
    results = {}
    for d in DOMAINS:
        results[d.name] = _score(config, params, tokenizer, evals, d)
    return results


def _score(config, params, tokenizer, evals, d: Domain) -> dict[str, float]:
    accuracy, perplexity = text_scores(config, params, evals, d.name)
    if d.kind == "task":
        accuracy = exact_match(config, params, tokenizer, evals, d.name)
    return {"score": accuracy, "perplexity": perplexity}
