"""The merges of mergekit's own test suite, run by jkarcher and by `mergekit-yaml` on the same
tiny models (Llama, Granite, GPT-2 and LLaVA, built by transformers and saved in safetensors, as
mergekit's tests build theirs), every tensor equal within 2 float32 ulp.

The models are float32 (random, so that top-k selections have no ties) and every config asks
for float32 output, so both compute in float32 and differ only by the order of their sums.
Configs whose methods draw random masks (DARE, DELLA) are not compared: the two draw different
numbers. Of a LLaVA checkpoint as transformers saves it, mergekit writes the vision tower and
the projector (renamed) and leaves out the language model; jkarcher writes every tensor under
its own name, and the tensors both write are compared. The comparisons run where mergekit is
installed, and always in CI (CI=true).
"""

import textwrap

import numpy as np
import pytest
from helpers_checkpoints import read_all
from helpers_mergekit import require_oracle, run_mergekit_yaml

from jkarcher import mergekit_yaml, pipeline
from jkarcher.config import validate

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

LAYERS = 2
ULPS = 2
# The methods whose coefficients come from sums over each tensor (or its rows).
REDUCING = ("slerp", "nuslerp", "multislerp", "model_stock")
# arcee_fusion: the share of a tensor's entries that may lie on its threshold.
BOUNDARY_SHARE = 0.002
# mergekit's test of karcher stops its iterations at this tangent norm.
KARCHER_TOL = 1e-5


def _llama():
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_attention_heads=16,
            num_hidden_layers=LAYERS,
        )
    )


def _granite():
    return transformers.GraniteForCausalLM(
        transformers.GraniteConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_hidden_layers=LAYERS,
        )
    )


def _gpt2():
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=64, n_positions=64, n_ctx=64, n_embd=32, n_head=2, n_layer=LAYERS
        )
    )


def _llava():
    vision = transformers.CLIPVisionConfig(
        image_size=32,
        patch_size=4,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        hidden_size=64,
        intermediate_size=128,
    )
    text = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=16,
        num_hidden_layers=LAYERS,
    )
    return transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16)
    )


# Each model of the configs: how it is built. Each is built with its own seed.
MODELS = {
    "model_a": _llama,
    "model_b": _llama,
    "model_c": _llama,
    "granite_a": _granite,
    "granite_b": _granite,
    "gpt2_like": _gpt2,
    "vlm_a": _llava,
    "vlm_b": _llava,
    "vlm_c": _llava,
}


def _two_models(a, b, method, base=None, parameters=None, weights=(0.6, 0.4)):
    """A config merging models a and b (weights 0.6 and 0.4) by `method`."""
    lines = ["models:"]
    for model, weight in zip((a, b), weights, strict=True):
        lines += [f"  - model: {{{model}}}", "    parameters:", f"      weight: {weight}"]
    lines.append(f"merge_method: {method}")
    if base is not None:
        lines.append(f"base_model: {{{base}}}")
    if parameters:
        lines.append("parameters:")
        lines += [f"  {key}: {value}" for key, value in parameters.items()]
    return "\n".join(lines)


def _nuslerps(prefix, a, b, c):
    """nuslerp without and with a base model, row-wise or not, flattened or not; and weights
    that sum to zero."""
    configs = {}
    for base in (None, c):
        for row_wise in ("false", "true"):
            for flatten in ("false", "true"):
                name = f"{prefix}nuslerp_base={base}_row_wise={row_wise}_flatten={flatten}"
                parameters = {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}
                configs[name] = _two_models(a, b, "nuslerp", base, parameters)
    parameters = {"nuslerp_row_wise": "false", "nuslerp_flatten": "false"}
    configs[f"{prefix}nuslerp_zero_sum"] = _two_models(
        a, b, "nuslerp", c, parameters, weights=(-0.5, 0.5)
    )
    return configs


def _shared(prefix, a, b, c):
    """The configs mergekit runs on both its Llama and its LLaVA models."""
    return {
        f"{prefix}linear": _two_models(a, b, "linear"),
        f"{prefix}slerp": _two_models(a, b, "slerp", a, {"t": 0.35}),
        **_nuslerps(prefix, a, b, c),
        f"{prefix}task_arithmetic": _two_models(a, b, "task_arithmetic", c),
        f"{prefix}breadcrumbs": _two_models(a, b, "breadcrumbs", c),
        f"{prefix}ties": _two_models(a, b, "ties", c, {"density": 0.3}),
        f"{prefix}model_stock": _two_models(b, c, "model_stock", a),
        f"{prefix}model_stock_filter_wise": _two_models(
            b, c, "model_stock", a, {"filter_wise": "true"}
        ),
    }


CONFIGS = {
    "granite_copy": "models:\n  - model: {granite_a}\nmerge_method: passthrough",
    "granite_linear": _two_models("granite_a", "granite_b", "linear"),
    "granite_slerp": _two_models("granite_a", "granite_b", "slerp", "granite_a", {"t": 0.5}),
    "gpt2_copy": "models:\n  - model: {gpt2_like}\nmerge_method: passthrough",
    "gpt2_stack": textwrap.dedent(f"""\
        slices:
          - sources:
              - model: {{gpt2_like}}
                layer_range: [0, {LAYERS}]
          - sources:
              - model: {{gpt2_like}}
                layer_range: [0, {LAYERS}]
        merge_method: passthrough"""),
    "passthrough_scale": textwrap.dedent("""\
        models:
          - model: {model_a}
            parameters:
              scale:
                - filter: o_proj
                  value: 0
                - value: 1
        merge_method: passthrough"""),
    **_shared("", "model_a", "model_b", "model_c"),
    "sce": _two_models("model_a", "model_b", "sce", "model_c", {"select_topk": 0.5}),
    "ram": _two_models("model_a", "model_b", "ram", "model_c"),
    "ramplus_tl": _two_models(
        "model_a", "model_b", "ramplus_tl", "model_c", {"r": 0.05, "alpha": 1.0}
    ),
    "multislerp": _two_models("model_a", "model_b", "multislerp", "model_c"),
    "arcee_fusion": _two_models("model_a", "model_b", "arcee_fusion", "model_a"),
    "nearswap": _two_models("model_a", "model_b", "nearswap", "model_a", {"t": 0.0001}),
    "karcher": _two_models(
        "model_a", "model_b", "karcher", "model_c", {"max_iter": 5, "tol": KARCHER_TOL}
    ),
    **_shared("vlm_", "vlm_a", "vlm_b", "vlm_c"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each model of MODELS saved in safetensors, float32, with its own seed."""
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for seed, (name, build) in enumerate(MODELS.items()):
        torch.manual_seed(seed)
        build().save_pretrained(root / name, safe_serialization=True)
        paths[name] = str(root / name)
    return paths


@pytest.fixture(scope="module")
def config_files(models, tmp_path_factory):
    """Each config as a YAML file with float32 output."""
    root = tmp_path_factory.mktemp("configs")
    files = {}
    for name, text in CONFIGS.items():
        files[name] = root / f"{name.replace('=', '_')}.yml"
        files[name].write_text(text.format(**models) + "\ndtype: float32\n")
    return files


@pytest.fixture(scope="module")
def mergekit_outputs(config_files, tmp_path_factory):
    """Each config merged by `mergekit-yaml`, all in one process."""
    require_oracle()
    return run_mergekit_yaml(config_files, tmp_path_factory.mktemp("mergekit_out"))


def _method(name):
    return next(
        line.split(": ")[1] for line in CONFIGS[name].splitlines() if line.startswith("merge_")
    )


def _tolerance(name, tensor):
    """ULPS float32 ulp of the tensor's largest entry; times log2 of its size for the methods
    whose coefficients come from sums over the tensor (or its rows), whose rounding error grows
    as log2(n) ulp in pairwise summation. The Karcher iterations stop once the tangent norm is
    below KARCHER_TOL, which leaves each merge's direction up to about that many radians from
    the mean: the two outputs may differ by 2 KARCHER_TOL times the tensor's norm."""
    ulp = float(np.spacing(np.max(np.abs(tensor))))
    if _method(name) in REDUCING:
        return ULPS * ulp * np.log2(tensor.size)
    if _method(name) == "karcher":
        return ULPS * ulp + 2 * KARCHER_TOL * float(np.linalg.norm(tensor))
    return ULPS * ulp


def _chose_differently(ours, theirs, model, base):
    """Entries where `model` and `base` differ and one merge took one, the other the other."""
    took_other = ((ours == model) & (theirs == base)) | ((ours == base) & (theirs == model))
    return took_other & (model != base)


def _llava_checkpoint_name(mergekit_name):
    """A tensor's name in the LLaVA checkpoints, for its name in mergekit's output."""
    return mergekit_name.removeprefix("model.")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_merge_equals_mergekit_yaml(name, config_files, mergekit_outputs, models, tmp_path):
    fields = mergekit_yaml.load(config_files[name]).fields | {"output": str(tmp_path / "ours")}
    pipeline.run(pipeline.plan_merge(validate(fields)))
    ours, theirs = read_all(tmp_path / "ours"), read_all(mergekit_outputs[name])
    if name.startswith("vlm_"):
        # jkarcher keeps the checkpoints' names; mergekit renames the LLaVA tensors it writes.
        assert set(ours) == set(read_all(models["vlm_a"]))
        theirs = {_llava_checkpoint_name(key): value for key, value in theirs.items()}
        assert set(theirs) == {key for key in ours if not key.startswith("language_model.")}
    else:
        assert set(ours) == set(theirs)
    if _method(name) == "arcee_fusion":
        base, model = read_all(models["model_a"]), read_all(models["model_b"])
    for tensor in theirs:
        assert ours[tensor].dtype == theirs[tensor].dtype == np.float32, tensor
        assert ours[tensor].shape == theirs[tensor].shape, tensor
        outside = np.abs(ours[tensor] - theirs[tensor]) > _tolerance(name, theirs[tensor])
        if _method(name) == "arcee_fusion":
            # An entry whose importance is within rounding of the threshold may be kept by one
            # merge and not by the other: rare, and then each took one model's value.
            flipped = _chose_differently(ours[tensor], theirs[tensor], model[tensor], base[tensor])
            assert flipped.sum() <= BOUNDARY_SHARE * flipped.size, tensor
            outside &= ~flipped
        assert not np.any(outside), tensor
