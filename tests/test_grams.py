"""RegMean's input Grams from the Flax forward, against Grams of the layers' inputs computed
outside the model in float64."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_models import VOCAB_SIZE, random_params, save_tiny_checkpoint, tiny_config, tiny_text

import jkarcher
from jkarcher import grams, models
from jkarcher.grams import causal_lm_grams
from jkarcher.pytree_leaves import path_name

EPS32 = float(np.finfo(np.float32).eps)
ROOT = Path(__file__).resolve().parents[1]


def _batch(seed=0, batch=3, length=10, padding=3):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB_SIZE, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[1, -padding:] = 0  # right padding in one row, left in another
    mask[2, :padding] = 0
    return tokens, mask


def _mean_gram(inputs, mask):
    """1/T sum over real tokens of x x^T, float64."""
    rows = np.asarray(inputs, np.float64)[np.asarray(mask, bool)]
    return rows.T @ rows / len(rows)


def _rms_norm(x, weight, eps):
    x = np.asarray(x, np.float64)
    return np.asarray(weight) * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


@pytest.fixture(scope="module")
def model():
    config = tiny_config("qwen2")
    return config, random_params(config, seed=1)


def test_grams_are_the_mean_outer_products_of_each_layers_inputs(model):
    config, params = model
    tokens, mask = _batch()
    grams = causal_lm_grams(config, params, [(tokens, mask)])
    _, hidden = models.forward(config, params, jnp.asarray(tokens), jnp.asarray(mask))
    layer0 = params["model"]["layers_0"]
    normed = _rms_norm(hidden[0], layer0["input_layernorm"]["weight"], config.rms_norm_eps)
    expected = {
        ("model", "layers_0", "self_attn", name): _mean_gram(normed, mask)
        for name in ("q_proj", "k_proj", "v_proj")
    }
    expected[("lm_head",)] = _mean_gram(hidden[-1], mask)  # the last state is already normed
    for path, gram in expected.items():
        node = grams
        for key in path:
            node = node[key]
        scale = np.max(np.abs(gram))
        # float32 activations: a few eps relative per entry, summed over the hidden size.
        np.testing.assert_allclose(
            node["weight"], gram, atol=8 * config.hidden_size * EPS32 * scale
        )


def test_every_linear_weight_has_a_gram_and_nothing_else_does(model):
    config, params = model
    grams = causal_lm_grams(config, params, [_batch()])
    flat_params = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    flat_grams = dict(jax.tree_util.tree_flatten_with_path(grams, is_leaf=lambda x: x is None)[0])
    assert flat_params.keys() == flat_grams.keys()
    linear = 0
    for path, weight in flat_params.items():
        name, gram = path_name(path), flat_grams[path]
        if name.endswith("_proj/weight") or name == "lm_head/weight":
            linear += 1
            assert gram.shape == (weight.shape[1], weight.shape[1]) and gram.dtype == jnp.float32
            np.testing.assert_allclose(gram, gram.T, rtol=1e-6, err_msg=name)
        else:
            assert gram is None, name
    assert linear == 7 * config.num_hidden_layers + 1  # q k v o gate up down per layer, lm_head


def test_padding_changes_nothing_and_batches_add_up(model):
    config, params = model
    tokens, mask = _batch(seed=2)
    whole = causal_lm_grams(config, params, [(tokens, mask)])
    garbage = np.where(mask == 1, tokens, (tokens + 7) % VOCAB_SIZE)  # other ids under padding
    split = causal_lm_grams(config, params, [(garbage[:1], mask[:1]), (garbage[1:], mask[1:])])
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(split), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.max(np.abs(a)))


def test_regmean_of_a_model_with_itself_is_the_model(model):
    config, params = model
    grams = causal_lm_grams(config, params, [_batch()])
    # The 24 real tokens span fewer than the 32 and 48 input dimensions: alpha < 1 (the
    # default) keeps the system positive definite where alpha = 1 would leave it singular.
    merged = jkarcher.merge([params, params], method="regmean", gram=[grams, grams])
    leaves = zip(jax.tree.leaves(merged), jax.tree.leaves(params), strict=True)
    for (a, b), gram in zip(
        leaves, jax.tree.leaves(grams, is_leaf=lambda x: x is None), strict=True
    ):
        kappa = 1.0 if gram is None else np.linalg.cond(0.6 * gram + 0.4 * np.diag(np.diag(gram)))
        # The solve's forward error: a few eps times the size times the condition number.
        np.testing.assert_allclose(a, b, atol=4 * a.shape[-1] * kappa * EPS32 * np.max(np.abs(b)))


def test_batches_without_a_real_token_are_refused(model):
    config, params = model
    tokens, mask = _batch()
    with pytest.raises(ValueError, match="no real token"):
        causal_lm_grams(config, params, [(tokens, np.zeros_like(mask))])


def test_the_script_writes_the_grams_that_the_estimator_gives(tmp_path):
    config = tiny_config("qwen2")
    directory = save_tiny_checkpoint(tmp_path / "qwen", config, seed=0, bos=False)
    text = tmp_path / "calibration.txt"
    text.write_text(tiny_text(200))
    script = [sys.executable, str(ROOT / "scripts" / "grams.py"), f"--checkpoint={directory}"]
    settings = ["--seq_len=16", "--batch_size=4", "--num_batches=2"]
    result = subprocess.run(
        [*script, f"--text={text}", *settings], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "input Grams over" in result.stdout
    batches = models.text_batches(
        directory, text.read_text(), seq_len=16, batch_size=4, max_batches=2
    )
    expected = causal_lm_grams(config, models.load(directory)[1], batches)
    loaded = grams.load_grams(directory)
    pairs = zip(jax.tree.leaves(loaded), jax.tree.leaves(expected), strict=True)
    for a, b in pairs:
        np.testing.assert_array_equal(a, b)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = subprocess.run([*script, f"--text={empty}"], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.strip().endswith(
        "empty.txt: too short, it gives no token to estimate on"
    )
    assert "Traceback" not in result.stderr
