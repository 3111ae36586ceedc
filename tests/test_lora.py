"""LoRA adapters: the truncated SVD against a float64 NumPy reference (Eckart-Young), extraction
end to end through scripts/extract_lora.py into an adapter that PEFT loads and whose logits
reproduce the fine-tuned model's, and the script's refusals.

The PEFT comparisons need torch, transformers and peft; without them they are skipped, except in
CI (CI=true), where they must run.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from helpers_checkpoints import BF16, assert_close_trees, read_all, tokenizer
from helpers_mergekit import run_mergekit_yaml

from jkarcher import demo, mergekit_yaml, pipeline
from jkarcher.config import ConfigError, validate
from jkarcher.io import Checkpoint, CheckpointError
from jkarcher.io.output_dir import MANIFEST_NAME
from jkarcher.lora import kept_rank, lora_factors
from jkarcher.lora.adapter import CONFIG_NAME, WEIGHTS_NAME
from jkarcher.lora.applied import with_adapter
from jkarcher.lora.extraction import (
    ExtractionOptions,
    extract_adapter,
    module_bytes,
    plan_extraction,
)

ROOT = Path(__file__).resolve().parents[1]
EPS32 = float(np.finfo(np.float32).eps)
TRUE_RANK = 2  # of the fine-tune's change to each linear weight, besides its noise
NOISE = 1e-4  # the fine-tune's full-rank noise, against a low-rank change of about 0.01


def _script():
    spec = importlib.util.spec_from_file_location("extract_lora", ROOT / "scripts/extract_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_script(*args):
    """Run the script's main in this process: (exit message or None)."""
    try:
        _script().main([str(a) for a in args])
    except SystemExit as stop:
        return str(stop.code)
    return None


# The SVD against float64 NumPy.


def _matrix_with_spectrum(rows, cols, singular_values, seed):
    """U diag(s) V^T in float32 with orthonormal U, V drawn in float64."""
    rng = np.random.default_rng(seed)
    k = len(singular_values)
    u, _ = np.linalg.qr(rng.standard_normal((rows, k)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, k)))
    return ((u * singular_values) @ v.T).astype(np.float32)


def _tolerance(delta):
    """Backward error of a float32 SVD and of the product B A: a small factor times float32 eps
    times the length of the sums, relative to ||D||_2."""
    return 8 * EPS32 * max(delta.shape) * np.linalg.norm(delta.astype(np.float64), 2)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
@pytest.mark.parametrize("rank", [1, 3, 8, 24])
@pytest.mark.parametrize("distribute_scale", [True, False])
def test_truncated_svd_meets_eckart_young(shape, rank, distribute_scale):
    spectrum = 2.0 ** -np.arange(24, dtype=np.float64)  # distinct, spread over 7 digits
    delta = _matrix_with_spectrum(*shape, spectrum, seed=rank)
    a, b, residual, norm = lora_factors(delta, rank, distribute_scale=distribute_scale)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == (rank, shape[1]) and b.shape == (shape[0], rank)
    reference = delta.astype(np.float64)
    u, s, vt = np.linalg.svd(reference, full_matrices=False)
    discarded = np.sqrt(np.sum(s[rank:] ** 2))
    tolerance = _tolerance(delta)
    assert abs(np.linalg.norm(reference - b @ a) - discarded) <= tolerance
    assert abs(residual - discarded) <= tolerance and abs(norm - np.linalg.norm(s)) <= tolerance
    best = (u[:, :rank] * s[:rank]) @ vt[:rank]
    np.testing.assert_allclose(b @ a, best, atol=tolerance)
    # The split of the singular values: A A^T = diag(s) = B^T B, or A A^T = diag(s^2), B^T B = I.
    gram_a, gram_b = a @ a.T, b.T @ b
    want_a = np.diag(s[:rank] if distribute_scale else s[:rank] ** 2)
    want_b = np.diag(s[:rank]) if distribute_scale else np.eye(rank)
    np.testing.assert_allclose(gram_a, want_a, atol=tolerance)
    np.testing.assert_allclose(gram_b, want_b, atol=tolerance)


def test_full_rank_reproduces_a_bf16_valued_task_matrix():
    rng = np.random.default_rng(0)
    tuned = rng.standard_normal((16, 32)).astype(BF16)
    base = rng.standard_normal((16, 32)).astype(BF16)
    delta = tuned.astype(np.float32) - base.astype(np.float32)
    a, b, residual, _ = lora_factors(delta, 16)
    product = np.asarray(b, np.float64) @ np.asarray(a, np.float64)
    np.testing.assert_allclose(product, delta, atol=_tolerance(delta))
    assert residual <= _tolerance(delta)


def test_kept_rank_follows_max_rank_and_sv_epsilon():
    s = np.array([3.0, 2.0, 1e-3, 1e-6])
    assert kept_rank(s, 8) == 4 and kept_rank(s, 2) == 2
    assert kept_rank(s, 8, sv_epsilon=1e-2) == 2 and kept_rank(s, 8, sv_epsilon=1e-4) == 3
    assert kept_rank(np.zeros(4), 8, sv_epsilon=1e-4) == 1  # a module keeps rank >= 1
    with pytest.raises(ValueError, match="max_rank"):
        kept_rank(s, 0)


# Extraction end to end.


def _config(tie):
    return demo.qwen2_config(
        64,
        hidden_size=16,
        intermediate_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        tie_word_embeddings=tie,
    )


def _fine_tune(base, seed):
    """The base plus, on each linear weight, a rank-2 change of about 0.01 and noise of NOISE;
    norms and embeddings moved by about 0.01; biases as they were."""
    rng = np.random.default_rng(seed)
    tuned = {}
    for name, weight in base.items():
        values = weight.astype(np.float64)
        if name.endswith("proj.weight"):
            left = rng.standard_normal((weight.shape[0], TRUE_RANK))
            right = rng.standard_normal((TRUE_RANK, weight.shape[1]))
            values = values + 0.01 * left @ right + NOISE * rng.standard_normal(weight.shape)
        elif not name.endswith("bias"):
            values = values + 0.01 * rng.standard_normal(weight.shape)
        tuned[name] = values.astype(weight.dtype)
    return tuned


@pytest.fixture(scope="module", params=[(np.float32, False), (BF16, True)], ids=["f32", "bf16"])
def pair(request, tmp_path_factory):
    """A tiny Qwen2 base and a fine-tune of it: float32 and untied, or bf16 with tied
    embeddings."""
    dtype, tie = request.param
    root = tmp_path_factory.mktemp("lora_models")
    config = _config(tie)
    base = demo.random_weights(config, np.random.default_rng(0), dtype)
    demo.write_model(root / "base", base, config, tokenizer())
    demo.write_model(root / "tuned", _fine_tune(base, 1), config, tokenizer())
    return root / "base", root / "tuned", np.dtype(dtype)


def _extract(pair, output, *flags):
    base, tuned, _ = pair
    message = _run_script("--model", tuned, "--base-model", base, "--out-path", output, *flags)
    assert message is None, message
    return output


def test_adapter_files_have_peft_names_and_ranks(pair, tmp_path):
    adapter = _extract(pair, tmp_path / "adapter", "--max-rank", 4)
    assert {p.name for p in adapter.iterdir()} == {CONFIG_NAME, WEIGHTS_NAME, MANIFEST_NAME}
    config = json.loads((adapter / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 4
    assert config["base_model_name_or_path"] == str(pair[0])
    assert set(config["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    assert set(config["modules_to_save"]) == {
        "embed_tokens", "lm_head", "input_layernorm", "post_attention_layernorm", "norm"
    }  # fmt: skip
    tensors = safetensors.numpy.load_file(adapter / WEIGHTS_NAME)
    name = "base_model.model.model.layers.1.self_attn.k_proj"
    assert tensors[f"{name}.lora_A.weight"].shape == (4, 16)
    assert tensors[f"{name}.lora_B.weight"].shape == (8, 4)
    assert tensors["base_model.model.model.norm.weight"].shape == (16,)
    assert tensors["base_model.model.lm_head.weight"].shape == (64, 16)  # tied: the embedding
    assert not any(n.endswith("lora_B.bias") for n in tensors)  # the biases did not change
    assert {t.dtype for t in tensors.values()} == {pair[2]}


def test_embed_lora_decomposes_the_embeddings_transposed(pair, tmp_path):
    adapter = _extract(pair, tmp_path / "adapter", "--max-rank", 64, "--embed-lora")
    config = json.loads((adapter / CONFIG_NAME).read_text())
    assert {"embed_tokens", "lm_head"} <= set(config["target_modules"])
    assert config["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 8
    tensors = safetensors.numpy.load_file(adapter / WEIGHTS_NAME)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (16, 64)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (16, 16)
    assert tensors["base_model.model.lm_head.lora_A.weight"].shape == (16, 16)


@pytest.fixture(scope="module")
def hf():
    try:
        import peft
        import torch
        import transformers
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("torch, transformers and peft are needed (pip install -e '.[test]')")
    return torch, transformers, peft


def _logits(hf, model_dir, adapter=None):
    torch, transformers, peft = hf
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter)
    ids = torch.tensor(np.random.default_rng(0).integers(0, 64, (2, 12)))
    with torch.no_grad():
        return model.eval()(ids).logits.numpy().astype(np.float64)


def test_peft_logits_reproduce_the_fine_tune_within_the_truncation_error(hf, pair, tmp_path):
    base, tuned, dtype = pair
    want = _logits(hf, tuned)
    change = np.abs(want - _logits(hf, base)).max()
    errors = {}
    for rank in (1, TRUE_RANK, 4, 64):
        adapter = _extract(pair, tmp_path / f"r{rank}", "--max-rank", rank, "--dtype", "float32")
        errors[rank] = np.abs(_logits(hf, base, adapter) - want).max()
    # Decreasing with the rank; at the fine-tune's own rank only its noise is left out, within
    # a few times the noise-to-change ratio (NOISE against 0.01 per entry) of the change; full
    # rank leaves the float32 rounding of sums of at most 32 terms.
    assert errors[1] > errors[TRUE_RANK] > errors[4] > errors[64]
    assert errors[TRUE_RANK] <= 4 * NOISE / 0.01 * change < errors[1]
    assert errors[64] <= 8 * 32 * EPS32 * np.abs(want).max()
    # Factors rounded to the models' dtype (the default) add that rounding, relative to the change.
    adapter = _extract(pair, tmp_path / "rounded", "--max-rank", 64)
    rounded = np.abs(_logits(hf, base, adapter) - want).max()
    assert rounded <= max(8 * float(ml_dtypes.finfo(dtype).eps) * change, 2 * errors[64])


# Refusals: one line, a non-zero exit, nothing written.


def test_missing_model_is_one_line(pair, tmp_path):
    base, _, _ = pair
    message = _run_script(
        "--model", tmp_path / "nowhere", "--base-model", base, "--out-path", tmp_path / "out"
    )
    assert message.startswith("error: --model: ") and "nowhere" in message
    assert "\n" not in message and not (tmp_path / "out").exists()


def test_mismatched_shapes_name_the_tensor(pair, tmp_path):
    base, _, dtype = pair
    config = _config(tie=False) | {"intermediate_size": 48}
    other = demo.random_weights(config, np.random.default_rng(2), dtype)
    demo.write_model(tmp_path / "other", other, config, tokenizer())
    message = _run_script(
        "--model", tmp_path / "other", "--base-model", base, "--out-path", tmp_path / "out"
    )
    assert "layers.0.mlp.down_proj.weight' has shape [16, 48]" in message and "[16, 32]" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


def test_rank_below_one_is_refused(pair, tmp_path):
    base, tuned, _ = pair
    message = _run_script(
        "--model", tuned, "--base-model", base, "--out-path", tmp_path / "o", "--max-rank", 0
    )
    assert message == "error: --max-rank: must be >= 1, got 0"


def test_a_budget_too_small_is_refused_before_anything_is_written(pair, tmp_path):
    """--memory below what one module needs (with the factors kept before it) is one line that
    names the tensor and a budget that extracts the adapter; that budget does."""
    base, tuned, _ = pair
    output = tmp_path / "out"
    common = ("--model", tuned, "--base-model", base, "--out-path", output)
    assert _run_script(*common, "--memory", "lots") == (
        "error: --memory: cannot read 'lots' as a size (e.g. 5GB, 500MB, 2GiB)"
    )
    message = _run_script(*common, "--memory", "20kB")
    assert re.fullmatch(
        r"error: tensor '\S+': extracting it needs \S+ \(with the factors kept so far, \S+\) "
        r"within the memory budget of 20kB; --memory (\S+) or more would extract the adapter",
        message,
    ), message
    assert not output.exists()
    suggested = re.search(r"--memory (\S+) or more", message).group(1)
    assert _run_script(*common, "--memory", suggested) is None
    assert (output / CONFIG_NAME).exists()


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(8192, 2048), (2048, 2048), (1024, 6144)])
def test_module_bytes_bound_the_decompositions_peak(shape):
    """`module_bytes` bounds the resident memory that the SVD of a float32 task matrix adds
    (measured as the process's peak, reset before it), and is not over twice it plus 64 MiB."""
    probe = (
        "import re, sys, numpy as np\n"
        "from jkarcher.lora.extract import lora_factors\n"
        "m, n = map(int, sys.argv[1:])\n"
        "def kb(field):\n"
        "    status = open('/proc/self/status').read()\n"
        "    return int(re.search(field + r':\\s*(\\d+)', status).group(1)) * 1024\n"
        "lora_factors(np.ones((8, 8), np.float32), 4)\n"
        "delta = np.random.default_rng(0).standard_normal((m, n)).astype(np.float32)\n"
        "before = kb('VmRSS')\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "lora_factors(delta, 128)\n"
        "print(kb('VmHWM') - before)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, *map(str, shape)], capture_output=True, text=True, check=True
    )
    measured = int(result.stdout.split()[-1])
    m, n = shape
    declared = module_bytes(shape, 4) - m * n * 4  # D itself was held before
    assert measured <= declared <= 2 * measured + 64 * 2**20, (measured, declared)


def test_a_directory_jkarcher_did_not_write_is_never_replaced(pair, tmp_path):
    base, tuned, _ = pair
    output = tmp_path / "mine"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    for flags in ((), ("--overwrite",)):
        message = _run_script("--model", tuned, "--base-model", base, "--out-path", output, *flags)
        assert message.startswith("error: output ") and "\n" not in message
    assert [p.name for p in output.iterdir()] == ["notes.txt"]
    adapter = _extract(pair, tmp_path / "adapter", "--max-rank", 2)
    _extract(pair, adapter, "--max-rank", 3, "--overwrite")  # an earlier output is replaced
    assert json.loads((adapter / CONFIG_NAME).read_text())["r"] == 3


def test_regexes_choose_modules_as_mergekit_does(pair, tmp_path):
    adapter = _extract(pair, tmp_path / "a", "--max-rank", 2, "-i", r"self_attn", "-e", "lm_head")
    config = json.loads((adapter / CONFIG_NAME).read_text())
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    # Norms match no include regex: skipped; the embedding is saved whole; lm_head is excluded.
    assert config["modules_to_save"] == ["embed_tokens"]
    tensors = safetensors.numpy.load_file(adapter / WEIGHTS_NAME)
    assert not any("mlp" in n or "norm" in n or "lm_head" in n for n in tensors)


def test_a_changed_bias_is_written_as_lora_b_bias_and_reported(pair, tmp_path):
    base, tuned, dtype = pair
    weights = read_all(tuned)
    name = "model.layers.0.self_attn.q_proj.bias"
    weights[name] = (weights[name].astype(np.float32) + 0.5).astype(dtype)
    demo.write_model(
        tmp_path / "tuned", weights, json.loads((tuned / "config.json").read_text()), tokenizer()
    )
    plan = plan_extraction(tmp_path / "tuned", base, tmp_path / "a", ExtractionOptions(max_rank=2))
    summary = extract_adapter(plan)
    assert summary.unapplied_biases == (name,)
    assert name in summary.warnings()[0] and "lora_bias" in summary.warnings()[0]
    tensors = safetensors.numpy.load_file(tmp_path / "a" / WEIGHTS_NAME)
    bias = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"]
    want = weights[name].astype(np.float32) - read_all(base)[name].astype(np.float32)
    np.testing.assert_array_equal(bias, want.astype(dtype))
    assert not json.loads((tmp_path / "a" / CONFIG_NAME).read_text())["lora_bias"]


# Adapters applied as models are read: `model+lora` and a model entry's `lora`.


def _materialized(base, adapter_dir):
    """The base with the adapter merged, in float64 NumPy from the stored values: rounded once
    to each tensor's dtype, exact, and the float32 error bound of the sum, (r + 2) eps32 times
    |W| + s |B| |A| (a sum of r products and one addition)."""
    config = json.loads((adapter_dir / CONFIG_NAME).read_text())
    factors = safetensors.numpy.load_file(adapter_dir / WEIGHTS_NAME)
    weights = read_all(base)
    exact, bounds = {}, {}
    for name, weight in weights.items():
        module = name.removesuffix(".weight")
        values, bound = weight.astype(np.float64), np.zeros(weight.shape)
        a = factors.get(f"base_model.model.{module}.lora_A.weight")
        if a is not None:
            a, b = a.astype(np.float64), factors[f"base_model.model.{module}.lora_B.weight"]
            b = b.astype(np.float64)
            rank = config["rank_pattern"].get(module, config["r"])
            scale = config["alpha_pattern"].get(module, config["lora_alpha"]) / rank
            values = values + scale * (b @ a)
            bound = (rank + 2) * EPS32 * (np.abs(weight) + scale * np.abs(b) @ np.abs(a))
        elif f"base_model.model.{name}" in factors:
            values = factors[f"base_model.model.{name}"].astype(np.float64)
        exact[name], bounds[name] = values, bound
    rounded = {n: v.astype(weights[n].dtype) for n, v in exact.items()}
    return rounded, exact, bounds


def test_adapted_tensors_round_the_float32_sum_once(pair, tmp_path):
    base, _, dtype = pair
    adapter = _extract(pair, tmp_path / "adapter", "--max-rank", 2)
    rounded, exact, bounds = _materialized(base, adapter)
    checkpoint = with_adapter(Checkpoint(base), str(adapter))
    assert checkpoint.source == f"{base}+{adapter}" and checkpoint.names() == list(rounded)
    # One rounding of a float32 sum: at most one unit in the last place of the exact value,
    # beyond the float32 error of the sum.
    ulp = float(ml_dtypes.finfo(dtype).eps)
    for name, want in exact.items():
        got = checkpoint.read(name)
        assert got.dtype == dtype, name
        error = np.abs(got.astype(np.float64) - want)
        assert np.all(error <= ulp * np.abs(want) + bounds[name]), name
        rows = checkpoint.info(name).rows(1, 3).read() if want.ndim else None
        if rows is not None:
            np.testing.assert_array_equal(rows, got[1:3], err_msg=name)


def test_a_config_merge_with_lora_equals_merging_the_materialized_model(pair, tmp_path):
    base, tuned, dtype = pair
    adapter = _extract(pair, tmp_path / "adapter", "--max-rank", 2)
    rounded, _, _ = _materialized(base, adapter)
    config = json.loads((base / "config.json").read_text())
    demo.write_model(tmp_path / "materialized", rounded, config, tokenizer())
    others = [{"path": str(tuned)}]
    dtype_name = "float32" if dtype == np.float32 else "bfloat16"
    fields = {"method": "karcher", "mesh": "devices:1", "dtype": dtype_name}
    with_lora = [{"path": str(base), "lora": str(adapter)}, *others]
    plain_models = [{"path": str(tmp_path / "materialized")}, *others]
    merged = {}
    for label, models in (("lora", with_lora), ("materialized", plain_models)):
        config_fields = fields | {"models": models, "output": str(tmp_path / f"out-{label}")}
        pipeline.run(pipeline.plan_merge(validate(config_fields)))
        merged[label] = read_all(tmp_path / f"out-{label}")
    # The inputs differ by at most one unit in the last place and the float32 error of the sum
    # (a few units), and the merge, a mean of two, rounds once more: a small factor of units.
    tolerance = 8 * float(ml_dtypes.finfo(dtype).eps)
    assert_close_trees(merged["lora"], merged["materialized"], tolerance)


def test_lora_in_slices_equals_the_materialized_model(pair, tmp_path):
    """A frankenmerge whose slices read the base with an adapter: layer 0 merged from it and
    the fine-tune, then layer 1 of it alone, as with the adapted model written out; the same
    checkpoint without its adapter is another input."""
    base, tuned, dtype = pair
    adapter = _extract(pair, tmp_path / "adapter", "--max-rank", 2)
    rounded, _, _ = _materialized(base, adapter)
    config = json.loads((base / "config.json").read_text())
    demo.write_model(tmp_path / "materialized", rounded, config, tokenizer())
    dtype_name = "float32" if dtype == np.float32 else "bfloat16"

    def slices(adapted):
        return [
            {
                "models": [
                    adapted | {"layer_range": [0, 1]},
                    {"path": str(tuned), "layer_range": [0, 1]},
                ]
            },
            {"models": [adapted | {"layer_range": [1, 2]}]},
            {"models": [{"path": str(base), "layer_range": [1, 2]}]},
        ]

    merged = {}
    adapted_forms = {
        "lora": {"path": str(base), "lora": str(adapter)},
        "materialized": {"path": str(tmp_path / "materialized")},
    }
    for label, adapted in adapted_forms.items():
        fields = {
            "method": "linear",
            "slices": slices(adapted),
            "dtype": dtype_name,
            "mesh": "devices:1",
            "output": str(tmp_path / f"out-{label}"),
        }
        checked = validate(fields)
        assert checked.slices[0].models[0].lora == adapted.get("lora")
        assert checked.to_dict()["slices"][1]["models"][0].get("lora") == adapted.get("lora")
        pipeline.run(pipeline.plan_merge(checked))
        merged[label] = read_all(tmp_path / f"out-{label}")
    assert "model.layers.2.mlp.up_proj.weight" in merged["lora"]
    # As in the merge of whole models: one unit in the last place apart, and a mean of two.
    tolerance = 8 * float(ml_dtypes.finfo(dtype).eps)
    assert_close_trees(merged["lora"], merged["materialized"], tolerance)
    plain = read_all(base)
    for name in ("mlp.up_proj.weight", "self_attn.q_proj.weight"):
        np.testing.assert_array_equal(
            merged["lora"][f"model.layers.2.{name}"], plain[f"model.layers.1.{name}"]
        )
        assert not np.array_equal(
            merged["lora"][f"model.layers.1.{name}"], plain[f"model.layers.1.{name}"]
        )


def test_lora_entries_are_checked(pair, tmp_path):
    base, tuned, _ = pair
    adapter = _extract(pair, tmp_path / "adapter", "--max-rank", 2)
    config = {
        "method": "linear",
        "models": [{"path": str(tuned), "lora": str(adapter)}],
        "output": str(tmp_path / "o"),
    }
    assert validate(config).models[0].lora == str(adapter)
    assert validate(config).to_dict()["models"][0]["lora"] == str(adapter)
    with pytest.raises(CheckpointError, match=r"models\[0\]: LoRA adapter .*nowhere"):
        pipeline.plan_merge(validate(config | {"models": [{"path": str(base), "lora": "nowhere"}]}))
    # An adapter of another model's shapes: refused by name before anything is written.
    other_config = _config(tie=False) | {"intermediate_size": 48}
    other = demo.random_weights(other_config, np.random.default_rng(3), np.float32)
    demo.write_model(tmp_path / "other", other, other_config, tokenizer())
    with pytest.raises(CheckpointError, match=r"models\[0\]: .*lora_A.weight' has shape"):
        pipeline.plan_merge(
            validate(config | {"models": [{"path": str(tmp_path / "other"), "lora": str(adapter)}]})
        )
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match=r"params.fisher: models\[0\] applies a LoRA adapter"):
        validate(config | {"method": "karcher", "params": {"fisher": "beside"}})


def test_mergekit_yaml_model_plus_lora_is_a_lora_entry():
    document = {
        "models": [{"model": "a+adapter"}, {"model": "b"}],
        "merge_method": "linear",
    }
    translation = mergekit_yaml.translate(document, layer_count=lambda model: 2)
    assert translation.fields["models"][0] == {"path": "a", "lora": "adapter"}
    assert translation.fields["models"][1] == {"path": "b"}
    for model in ("a+b+c", "+adapter", "a+"):
        with pytest.raises(ConfigError, match=r"models\[0\]\.model"):
            mergekit_yaml.translate(document | {"models": [{"model": model}]}, layer_count=len)
    with pytest.raises(ConfigError, match="base_model"):
        mergekit_yaml.translate(document | {"base_model": "a+adapter"}, layer_count=len)


@pytest.fixture(scope="module")
def mergekit():
    if importlib.util.find_spec("mergekit") is None or importlib.util.find_spec("peft") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("mergekit and peft must be installed in CI (pip install -e '.[test]')")
        pytest.skip("mergekit and peft are needed (pip install -e '.[test]')")


@pytest.mark.parametrize("form", ["models", "slices"])
def test_model_plus_lora_merges_equal_mergekit_yaml(mergekit, pair, tmp_path, form):
    base, tuned, dtype = pair
    if dtype != np.float32:
        pytest.skip("mergekit adds the adapter in the model's dtype, rounding twice")
    adapter = _extract(pair, tmp_path / "adapter", "--max-rank", 2)
    path = tmp_path / "merge.yml"
    if form == "models":
        inputs = (
            f"models:\n  - model: {base}+{adapter}\n    parameters:\n      weight: 0.7\n"
            f"  - model: {tuned}\n    parameters:\n      weight: 0.4\n"
        )
    else:
        inputs = (
            f"slices:\n  - sources:\n      - model: {base}+{adapter}\n        layer_range: [0, 2]\n"
            "        parameters:\n          weight: 0.7\n"
            f"      - model: {tuned}\n        layer_range: [0, 2]\n"
            "        parameters:\n          weight: 0.4\n"
            f"      - model: {base}\n        layer_range: [0, 2]\n"
        )
    path.write_text(inputs + f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: float32\n")
    options = ["--lora-merge-cache", tmp_path / "cache"]
    theirs = run_mergekit_yaml({"merge": path}, tmp_path / "theirs", options)["merge"]
    translation = mergekit_yaml.load(path)
    fields = translation.fields | {"output": str(tmp_path / "ours"), "mesh": "devices:1"}
    pipeline.run(pipeline.plan_merge(validate(fields)))
    ours, theirs = read_all(tmp_path / "ours"), read_all(theirs)
    assert set(ours) == set(theirs)
    for name in theirs:
        # float32 sums of a few terms of size <= 1: a few float32 units.
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=1e-6, err_msg=name)
