"""The Flax Qwen2 / Llama forward against transformers' PyTorch models, and its HF I/O."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_models import random_params, save_tokenizer, tiny_config, tiny_text

from jkarcher import models
from jkarcher.io import CheckpointError
from jkarcher.models.config import MODEL_TYPES

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
LENGTHS = (12, 7, 3)  # a right-padded batch: full, half and short rows

PARITY_CASES = {
    "qwen2-untied": ("qwen2", {"tie_word_embeddings": False}),
    "qwen2-tied-linear-rope": (
        "qwen2",
        {
            "tie_word_embeddings": True,
            "rope_theta": 1000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        },
    ),
    "llama-untied-llama3-rope-biases": (
        "llama",
        {
            "tie_word_embeddings": False,
            "attention_bias": True,
            "mlp_bias": True,
            "rope_theta": 100.0,  # wavelengths 6 to 200: llama3 keeps, blends and divides
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "llama-tied-head-dim-16": ("llama", {"tie_word_embeddings": True, "head_dim": 16}),
}


def _hf_model(model_type, overrides, seed=0):
    """A tiny random transformers model (every parameter ~ N(0, 0.3^2)), in eval mode."""
    kwargs = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        **overrides,
    )
    if model_type == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kwargs))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _padded_batch(vocab_size, lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, size=(len(lengths), max(lengths)), dtype=np.int32)
    mask = (np.arange(max(lengths))[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    return tokens, mask


def _torch_outputs(model, tokens, mask):
    with torch.no_grad():
        out = model(
            torch.from_numpy(tokens).long(),
            attention_mask=torch.from_numpy(mask).long(),
            output_hidden_states=True,
        )
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_logits_and_hidden_states_match_transformers(case, tmp_path):
    model_type, overrides = PARITY_CASES[case]
    hf_model = _hf_model(model_type, overrides)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    config, params = models.load(tmp_path)
    assert config.tie_word_embeddings == overrides["tie_word_embeddings"]
    assert ("lm_head" in params) != config.tie_word_embeddings

    tokens, mask = _padded_batch(config.vocab_size)
    logits, hidden_states = models.forward(config, params, tokens, mask)
    hf_logits, hf_hidden_states = _torch_outputs(hf_model, tokens, mask)

    real = mask.astype(bool)
    assert np.abs(hf_logits[real]).max() > 1.0  # the comparison is not between near-zeros
    np.testing.assert_allclose(np.asarray(logits)[real], hf_logits[real], atol=TOL, rtol=0)
    assert len(hidden_states) == len(hf_hidden_states) == config.num_hidden_layers + 1
    for mine, theirs in zip(hidden_states, hf_hidden_states, strict=True):
        np.testing.assert_allclose(np.asarray(mine)[real], theirs[real], atol=TOL, rtol=0)


def test_a_left_padded_sequence_gives_its_unpadded_logits():
    config = tiny_config("llama", rope_theta=100.0)
    params = random_params(config, seed=3)
    tokens, _ = _padded_batch(config.vocab_size, lengths=(9,), seed=1)
    alone, _ = models.forward(config, params, tokens, np.ones_like(tokens))
    padded_tokens = np.concatenate([np.full((1, 4), 7, np.int32), tokens], axis=1)
    padded_mask = np.concatenate([np.zeros((1, 4), np.int32), np.ones_like(tokens)], axis=1)
    padded, _ = models.forward(config, params, padded_tokens, padded_mask)
    np.testing.assert_allclose(np.asarray(padded)[:, 4:], np.asarray(alone), atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type,tied", [("qwen2", False), ("llama", True)])
def test_saved_checkpoint_loads_in_transformers_with_the_same_logits(model_type, tied, tmp_path):
    config = tiny_config(model_type, tie_word_embeddings=tied, rope_theta=500.0)
    params = random_params(config, seed=5)
    models.save(tmp_path, config, params)

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf_model).__name__ == MODEL_TYPES[model_type]
    tokens, mask = _padded_batch(config.vocab_size, seed=2)
    hf_logits, _ = _torch_outputs(hf_model, tokens, mask)
    logits, _ = models.forward(config, params, tokens, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], hf_logits[real], atol=TOL, rtol=0)

    loaded_config, loaded = models.load(tmp_path)
    assert loaded_config == config
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_hf_names_and_param_paths_are_inverse():
    config = tiny_config("llama", num_hidden_layers=12)
    names = models.expected_tensors(config)
    assert "model.layers.11.self_attn.q_proj.weight" in names
    assert names["model.layers.0.mlp.gate_proj.weight"] == (48, 32)
    assert names["lm_head.weight"] == (64, 32)
    for name in names:
        assert models.hf_name(models.param_path(name)) == name
    assert models.param_path("model.layers.10.mlp.up_proj.weight") == (
        "model",
        "layers_10",
        "mlp",
        "up_proj",
        "weight",
    )


def test_tied_models_have_no_lm_head_and_qwen2_has_qkv_bias_only():
    names = models.expected_tensors(tiny_config("qwen2", tie_word_embeddings=True))
    assert "lm_head.weight" not in names
    assert {"q_proj", "k_proj", "v_proj"} == {
        n.split(".")[-2] for n in names if n.endswith(".bias")
    }


def _write_config(tmp_path, **fields):
    """A tiny Qwen2 config.json with `fields` changed (None removes a field)."""
    hf = tiny_config("qwen2").to_hf() | fields
    hf = {key: value for key, value in hf.items() if value is not None}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return tmp_path


def test_config_reads_the_older_rope_spelling(tmp_path):
    hf = tiny_config("llama").to_hf()
    hf.update(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 4.0})
    config = models.ModelConfig.from_hf(hf)
    assert (config.rope_theta, config.rope_type, config.rope_factor) == (5e5, "linear", 4.0)
    newer = {k: v for k, v in hf.items() if k not in ("rope_theta", "rope_scaling")}
    newer["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}
    assert models.ModelConfig.from_hf(newer) == config


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"model_type": "mistral"}, "model_type 'mistral' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope type 'yarn'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks low_freq_factor"),
        ({"vocab_size": None}, "missing field 'vocab_size'"),
    ],
)
def test_config_refuses_what_it_cannot_run_naming_the_file(tmp_path, fields, message):
    path = _write_config(tmp_path, **fields)
    with pytest.raises(models.ModelConfigError, match=message) as error:
        models.load_config(path)
    assert str(path / "config.json") in str(error.value)


def test_loading_checks_names_and_shapes(tmp_path):
    config = tiny_config("qwen2")
    params = random_params(config, seed=0)
    models.save(tmp_path / "ok", config, params)

    del params["model"]["layers_1"]["mlp"]["up_proj"]
    models.save(tmp_path / "missing", config, params)
    with pytest.raises(CheckpointError, match="lacks 1 tensors"):
        models.load(tmp_path / "missing")

    params = random_params(config, seed=0)
    params["model"]["layers_0"]["self_attn"]["q_norm"] = {"weight": jnp.ones(8)}
    models.save(tmp_path / "extra", config, params)
    with pytest.raises(CheckpointError, match=r"model.layers.0.self_attn.q_norm.weight"):
        models.load(tmp_path / "extra")

    wider = tiny_config("qwen2", intermediate_size=40)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.down_proj.weight' has shape"):
        models.load_params(tmp_path / "ok", wider)


def test_bfloat16_loading_casts_every_leaf(tmp_path):
    config = tiny_config("llama")
    models.save(tmp_path, config, random_params(config, seed=0), dtype=jnp.bfloat16)
    _, params = models.load(tmp_path, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    tokens, mask = _padded_batch(config.vocab_size)
    logits, _ = models.forward(config, params, tokens, mask)
    assert logits.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(logits)))


def test_next_token_stats_count_real_predictions_only():
    config = tiny_config("qwen2")
    params = random_params(config, seed=1)
    tokens, mask = _padded_batch(config.vocab_size)
    logits, _ = models.forward(config, params, tokens, mask)
    log_probs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    nll = correct = 0.0
    for row, length in enumerate(LENGTHS):
        for t in range(length - 1):
            target = tokens[row, t + 1]
            nll -= log_probs[row, t, target]
            correct += float(np.argmax(log_probs[row, t]) == target)
    got_nll, got_correct, count = models.next_token_stats(config, params, tokens, mask)
    assert float(count) == sum(length - 1 for length in LENGTHS)
    np.testing.assert_allclose(float(got_nll), nll, rtol=1e-5)
    assert float(got_correct) == correct


def test_selected_hidden_states_are_forwards_hidden_states():
    config = tiny_config("llama")
    params = random_params(config, seed=2)
    tokens, mask = _padded_batch(config.vocab_size)
    _, hidden_states = models.forward(config, params, tokens, mask)
    chosen = models.selected_hidden_states(config, (2, 0), params, tokens, mask)
    np.testing.assert_array_equal(chosen, np.stack([hidden_states[2], hidden_states[0]]))


def test_gradients_flow_to_every_parameter():
    config = tiny_config("qwen2")
    params = random_params(config, seed=4)
    tokens, mask = _padded_batch(config.vocab_size)

    def loss(p):
        nll, _, count = models.next_token_stats(config, p, tokens, mask)
        return nll / count

    grads = jax.grad(loss)(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("bos", [False, True])
def test_text_becomes_fixed_shape_windows_with_leading_specials(tmp_path, bos):
    tokenizer = save_tokenizer(tmp_path, bos=bos)
    assert models.leading_special_tokens(tokenizer) == ([1] if bos else [])
    text = tiny_text(100)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    batches = models.text_batches(tmp_path, text, seq_len=16, batch_size=3)
    rows = [
        tokens[r, : mask[r].sum()].tolist()
        for tokens, mask in batches
        for r in range(3)
        if mask[r].sum()
    ]
    assert all(tokens.shape == mask.shape == (3, 16) for tokens, mask in batches)
    prefix = [1] if bos else []
    assert all(row[: len(prefix)] == prefix for row in rows)
    assert [t for row in rows for t in row[len(prefix) :]] == ids
    assert len(models.text_batches(tmp_path, text, seq_len=16, batch_size=3, max_batches=2)) == 2
    whole = models.text_batches(tmp_path, text, seq_len=16, batch_size=3, drop_remainder=True)
    assert len(whole) == sum(len(row) == 16 for row in rows) // 3
    assert all(mask.all() for _, mask in whole)
    largest = max(ids + prefix)
    models.text_batches(tmp_path, text, seq_len=16, batch_size=3, vocab_size=largest + 1)
    with pytest.raises(models.TokenizerError, match=rf"tokenizer.json gives token id {largest} "):
        models.text_batches(tmp_path, text, seq_len=16, batch_size=3, vocab_size=largest)


def test_init_params_follow_the_hf_initialization():
    config = tiny_config("qwen2", num_hidden_layers=1, initializer_range=0.05)
    params = models.init_params(config, jax.random.key(0), jnp.bfloat16)
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(
        lambda s: s.shape, models.param_shapes(config)
    )
    flat = models.params_to_hf(params)
    assert {leaf.dtype for leaf in flat.values()} == {jnp.dtype(jnp.bfloat16)}
    for name, leaf in flat.items():
        values = np.asarray(leaf, np.float32)
        if "norm" in name:
            np.testing.assert_array_equal(values, 1.0)
        elif name.endswith(".bias"):
            np.testing.assert_array_equal(values, 0.0)
        else:
            assert abs(values.std() - 0.05) < 0.01, name
