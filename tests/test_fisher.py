"""Diagonal Fisher estimation: analytic values of a softmax regression, the decoder's path, the
script that writes fisher.safetensors, and loading it back.

For a softmax regression, logits z = W x + b and p = softmax(z), the score of label y is
d log p(y) / dz_k = [y = k] - p_k, so the squared gradients per prediction are

    (dW_kd)^2 = ([y = k] - p_k)^2 x_d^2,   (db_k)^2 = ([y = k] - p_k)^2,

whose expectation over y ~ p is p_k (1 - p_k) x_d^2 (true Fisher). The estimator squares one
gradient per example, a sum over its positions t of zero-mean terms a_t (a label sample's score,
or a text label's score times a random sign); for independent zero-mean a_t,

    Var[(sum_t a_t)^2] = sum_t (E a_t^4 - (E a_t^2)^2) + 2 sum_{t != s} E a_t^2 E a_s^2,

which gives each coordinate's exact standard error to hold the estimate to.
"""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
from helpers_models import save_tiny_checkpoint, tiny_config, tiny_text

from jkarcher import fisher, models
from jkarcher.io import Checkpoint, CheckpointError, read_tensor

ROOT = Path(__file__).resolve().parents[1]
F32_EPS = float(np.finfo(np.float32).eps)


def sum_rtol(terms: int) -> float:
    """The relative error bound of a float32 sum of `terms` non-negative terms in any order:
    each addition rounds once (relative eps), so the sum is within terms * eps of the exact one,
    whatever the order a compiler or CPU picks."""
    return terms * F32_EPS


CLASSES, FEATURES = 4, 3


# A softmax regression over sequences of P positions: batch {"x": [B, P, D], "y", "mask": [B, P]}.


def softmax_regression(params, batch):
    logits = jnp.einsum("bpd,kd->bpk", batch["x"], params["w"]) + params["b"]
    return logits, batch["y"], batch["mask"]


def regression_problem(seed, examples, positions, masked_share=0.0):
    rng = np.random.default_rng(seed)
    params = {
        "w": rng.standard_normal((CLASSES, FEATURES)).astype(np.float32),
        "b": rng.standard_normal(CLASSES).astype(np.float32),
    }
    data = {
        "x": rng.standard_normal((examples, positions, FEATURES)).astype(np.float32),
        "y": rng.integers(0, CLASSES, (examples, positions)).astype(np.int32),
        "mask": (rng.random((examples, positions)) >= masked_share).astype(np.float32),
    }
    return params, data


def split_batches(data, batch_size):
    size = len(data["y"])
    return [
        {name: array[start : start + batch_size] for name, array in data.items()}
        for start in range(0, size, batch_size)
    ]


def position_moments(params, data, estimator):
    """Per position (n, t) and coordinate: E a^2 and E a^4 of its term a of the example's
    gradient (float64), for the leaves w [N, P, K, D] and b [N, P, K]."""
    x = data["x"].astype(np.float64)
    logits = x @ params["w"].astype(np.float64).T + params["b"]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    mask = data["mask"][..., None].astype(np.float64)
    if estimator == "true":  # moments of [y = k] - p_k over y ~ p
        second = p * (1 - p)
        fourth = p * (1 - p) ** 4 + (1 - p) * p**4
    else:  # ([y = k] - p_k) times a random sign: fixed square, fourth moment its square
        second = (np.eye(CLASSES)[data["y"]] - p) ** 2
        fourth = second**2
    second, fourth = mask * second, mask * fourth
    x2, x4 = x[..., None, :] ** 2, x[..., None, :] ** 4
    return {"w": (second[..., None] * x2, fourth[..., None] * x4), "b": (second, fourth)}


def analytic_fisher_and_error(params, data, estimator):
    """The per-prediction Fisher and the standard error of the estimator, per coordinate."""
    predictions = data["mask"].sum()
    fisher_values, errors = {}, {}
    for name, (second, fourth) in position_moments(params, data, estimator).items():
        fisher_values[name] = second.sum(axis=(0, 1)) / predictions
        cross = second.sum(axis=1) ** 2 - (second**2).sum(axis=1)  # sum_{t != s}
        variance = (fourth - second**2).sum(axis=1) + 2 * cross
        errors[name] = np.sqrt(np.maximum(variance.sum(axis=0), 0)) / predictions
    return fisher_values, errors


def test_empirical_fisher_of_one_prediction_per_example_is_exact():
    params, data = regression_problem(0, examples=300, positions=1)
    estimate = fisher.diagonal_fisher(
        softmax_regression,
        params,
        split_batches(data, 64),
        key=jax.random.key(0),
        estimator="empirical",
    )
    expected, _ = analytic_fisher_and_error(params, data, "empirical")
    for name in ("w", "b"):
        np.testing.assert_allclose(estimate[name], expected[name], rtol=sum_rtol(300), atol=0)


@pytest.mark.parametrize(("estimator", "positions"), [("true", 1), ("true", 5), ("empirical", 5)])
def test_estimate_is_within_five_standard_errors_of_the_analytic_fisher(estimator, positions):
    params, data = regression_problem(1, examples=12000, positions=positions, masked_share=0.3)
    estimate = fisher.diagonal_fisher(
        softmax_regression,
        params,
        split_batches(data, 1000),
        key=jax.random.key(2),
        estimator=estimator,
    )
    expected, errors = analytic_fisher_and_error(params, data, estimator)
    for name in ("w", "b"):
        assert estimate[name].dtype == jnp.float32
        z_scores = (np.asarray(estimate[name], np.float64) - expected[name]) / errors[name]
        assert np.max(np.abs(z_scores)) < 5, (name, z_scores)
        # The standard errors are small, so the test above pins the value down.
        assert np.max(errors[name] / expected[name]) < 0.08


def test_masked_predictions_and_padding_examples_do_not_count():
    params, data = regression_problem(3, examples=40, positions=1)
    padded = {name: np.concatenate([array, array[:8]]) for name, array in data.items()}
    padded["mask"][40:] = 0
    padded["y"][40:] = 0
    key = jax.random.key(4)
    run = lambda d: fisher.diagonal_fisher(
        softmax_regression, params, split_batches(d, 16), key=key, estimator="empirical"
    )
    plain, with_padding = run(data), run(padded)
    for name in ("w", "b"):  # both sums of 40 predictions, grouped differently
        np.testing.assert_allclose(with_padding[name], plain[name], rtol=2 * sum_rtol(40))


def test_bad_estimator_and_empty_data_are_refused():
    params, data = regression_problem(0, examples=4, positions=1)
    with pytest.raises(ValueError, match="estimator must be one of"):
        fisher.diagonal_fisher(
            softmax_regression, params, [data], key=jax.random.key(0), estimator="exact"
        )
    data["mask"][:] = 0
    with pytest.raises(ValueError, match="no predictions"):
        fisher.diagonal_fisher(softmax_regression, params, [data], key=jax.random.key(0))


# The decoder of jkarcher.models.


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A tiny random Qwen2 checkpoint with its tokenizer, and a calibration text file."""
    root = tmp_path_factory.mktemp("fisher")
    directory = save_tiny_checkpoint(root / "qwen", tiny_config("qwen2"), seed=0, bos=False)
    text = root / "calibration.txt"
    text.write_text(tiny_text(200))
    return directory, text


def lm_batches(directory, text, **kwargs):
    return models.text_batches(directory, text.read_text(), seq_len=16, batch_size=4, **kwargs)


def test_decoder_fisher_has_the_params_shapes_and_is_reproducible(qwen):
    directory, text = qwen
    config, params = models.load(directory)
    batches = lm_batches(directory, text)
    run = lambda seed, estimator="true": fisher.causal_lm_fisher(
        config, params, batches, key=jax.random.key(seed), estimator=estimator
    )
    first, again, other = run(0), run(0), run(1)
    assert jax.tree.structure(first) == jax.tree.structure(params)
    for leaf, param in zip(jax.tree.leaves(first), jax.tree.leaves(params), strict=True):
        assert leaf.shape == param.shape and leaf.dtype == jnp.float32
        assert np.all(np.isfinite(leaf)) and np.all(np.asarray(leaf) >= 0)
        assert np.any(np.asarray(leaf) > 0)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other), strict=True):
        assert not np.array_equal(a, b)  # other label samples


def test_decoder_empirical_fisher_of_one_prediction_per_sequence_is_exact(qwen):
    """Rows with two real tokens make one prediction each, so the estimate is exactly the mean
    over rows of the squared gradient of log p(token 1 | token 0), taken here directly."""
    directory, _ = qwen
    config, params = models.load(directory)
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, config.vocab_size, (6, 16)).astype(np.int32)
    mask = np.zeros_like(tokens)
    mask[:5, :2] = 1  # the last row is padding only

    @jax.jit
    @jax.grad
    def score(p, row_tokens, row_mask):
        logits, _ = models.forward(config, p, row_tokens[None], row_mask[None])
        return jax.nn.log_softmax(logits[0, 0])[row_tokens[1]]

    squares = [jax.tree.map(jnp.square, score(params, tokens[r], mask[r])) for r in range(5)]
    expected = jax.tree.map(lambda *s: sum(s) / 5, *squares)
    batches = [(tokens[:4], mask[:4]), (tokens[4:], mask[4:])]
    batches[1] = tuple(np.concatenate([a, np.zeros_like(a)]) for a in batches[1])  # 4 rows
    estimate = fisher.causal_lm_fisher(
        config, params, batches, key=jax.random.key(0), estimator="empirical"
    )
    for name, leaf in models.params_to_hf(estimate).items():
        want = models.params_to_hf(expected)[name]
        np.testing.assert_allclose(
            leaf, want, rtol=1e-4, atol=1e-6 * float(jnp.max(want)), err_msg=name
        )


# Files: scripts/fisher.py, save_statistics, load_fisher, fisher_tensors.


def run_script(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fisher.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_script_writes_fisher_safetensors_beside_the_checkpoint(qwen):
    directory, text = qwen
    result = run_script(
        f"--checkpoint={directory}",
        f"--text={text}",
        "--seq_len=16",
        "--batch_size=4",
        "--num_batches=3",
        "--seed=7",
        "--estimator=empirical",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config, params = models.load(directory)
    path = directory / "fisher.safetensors"
    assert fisher.fisher_path(directory) == path and path.is_file()
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith(".")) == []
    with safetensors.safe_open(path, "numpy") as f:
        assert sorted(f.keys()) == sorted(Checkpoint(directory).names())  # still only the weights
        metadata = f.metadata()
    assert metadata["estimator"] == "empirical" and metadata["seed"] == "7"
    assert sorted(Checkpoint(directory).names()) == sorted(models.params_to_hf(params))
    batches = lm_batches(directory, text, max_batches=3)
    assert metadata["tokens"] == str(
        sum(int(fisher.next_token_mask(mask).sum()) for _, mask in batches)
    )
    expected = fisher.causal_lm_fisher(
        config, params, batches, key=jax.random.key(7), estimator="empirical"
    )
    loaded = fisher.load_fisher(directory)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=0)
    name = "model.layers.1.mlp.up_proj.weight"
    info = fisher.fisher_tensors(directory)[name]
    np.testing.assert_array_equal(read_tensor(info), models.params_to_hf(loaded)[name])


def test_script_output_flag_and_a_too_short_text(qwen, tmp_path):
    directory, text = qwen
    output = tmp_path / "elsewhere.safetensors"
    result = run_script(
        f"--checkpoint={directory}",
        f"--text={text}",
        "--seq_len=16",
        "--batch_size=2",
        "--num_batches=1",
        f"--output={output}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = fisher.load_fisher(directory, output)
    assert all(np.all(np.asarray(leaf) >= 0) for leaf in jax.tree.leaves(loaded))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run_script(f"--checkpoint={directory}", f"--text={empty}", f"--output={output}")
    assert result.returncode != 0 and "gives no token to estimate on" in result.stderr


def test_load_fisher_refuses_a_missing_file_and_another_models_fisher(qwen, tmp_path):
    directory, _ = qwen
    with pytest.raises(CheckpointError, match=r"no Fisher estimate.*scripts/fisher.py"):
        fisher.load_fisher(directory, tmp_path / "none.safetensors")
    other = tiny_config("qwen2", intermediate_size=40)
    other_params = jax.tree.map(
        lambda s: jnp.ones(s.shape, jnp.float32), models.param_shapes(other)
    )
    path = models.save_statistics(other_params, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=r"other.safetensors: tensor 'model.layers.0.mlp"):
        fisher.load_fisher(directory, path)
    del other_params["model"]["norm"]
    path = models.save_statistics(other_params, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match=r"not the Fisher of .* lacks \['model.norm"):
        fisher.load_fisher(directory, path)
