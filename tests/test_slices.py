"""Merges by slices (mergekit's `slices`): frankenmerges that stack layers of several models, and
merges whose every slice has its own models, base model and parameters.

On tiny bf16 Qwen2-layout models of 4 and 6 layers: each output tensor's sources and settings
as mergekit numbers and places them, every tensor equal to `mergekit-yaml`'s own merge of the
same YAML (bit for bit for stacking; within 2 ulp of the bf16 output for merges), the output
loading and generating in transformers, a `--config` file with `slices` equal to its YAML, and
every bad slice an error naming its field before anything is written. The comparisons with
mergekit run where it is installed, and always in CI (CI=true).
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from helpers_checkpoints import BF16, read_all, tiny_config, tiny_weights, write_tiny
from helpers_mergekit import run_mergekit_yaml

from jkarcher import mergekit_yaml, pipeline
from jkarcher.config import ConfigError, base_config, validate

ROOT = Path(__file__).resolve().parents[1]
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
HEAD = "lm_head.weight"
PER_LAYER = 9  # tensors in each layer of the tiny Llama

# Layers 0..2 of A, then 1..4 of B (as mergekit's examples/orcamini-platy-44layer.yml stacks
# two models' overlapping ranges): 7 layers, the embeddings from A, norm and lm_head from B.
STACKED = """
    slices:
      - sources:
          - model: {a}
            layer_range: [0, 3]
      - sources:
          - model: {b}
            layer_range: [1, 5]
    merge_method: passthrough
    dtype: bfloat16
"""
# A slerp of its own in each slice: t over each slice's two layers, filter rules of the second
# slice falling back to the top-level t; the sources' ranges differ within a slice.
SLERPED = """
    slices:
      - sources:
          - model: {a}
            layer_range: [0, 2]
          - model: {b}
            layer_range: [1, 3]
        parameters:
          t: [0.2, 0.8]
      - sources:
          - model: {a}
            layer_range: [2, 4]
          - model: {b}
            layer_range: [4, 6]
        parameters:
          t:
            - filter: self_attn
              value: [0.9, 0.3]
    merge_method: slerp
    base_model: {a}
    parameters:
      t: 0.4
    dtype: float32
    out_dtype: bfloat16
"""


def _tiny_llama(directory, num_layers, seed):
    """A bf16 Llama of hidden size 16 (a Llama, not a Qwen2: transformers' Qwen2 configs list
    each layer's kind, which mergekit keeps at the template's layer count, so that its outputs
    with more or fewer layers do not save)."""
    config = tiny_config(num_layers=num_layers) | {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "mlp_bias": False,
    }
    weights = {k: v for k, v in tiny_weights(config, seed).items() if not k.endswith("bias")}
    return write_tiny(directory, weights, config)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Model A of 4 layers and model B of 6, bf16, of the same architecture otherwise."""
    root = tmp_path_factory.mktemp("slices_models")
    return {"a": _tiny_llama(root / "four", 4, 0), "b": _tiny_llama(root / "six", 6, 1)}


@pytest.fixture(scope="module")
def yaml_files(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("slices_yaml")
    files = {}
    for name, text in (("stacked", STACKED), ("slerped", SLERPED)):
        files[name] = root / f"{name}.yml"
        files[name].write_text(textwrap.dedent(text).format(**models))
    return files


@pytest.fixture(scope="module")
def ours(yaml_files, tmp_path_factory):
    """jkarcher's merge of each YAML file: its output directory."""
    root = tmp_path_factory.mktemp("slices_ours")
    outputs = {}
    for name, path in yaml_files.items():
        outputs[name] = root / name
        fields = mergekit_yaml.load(path).fields | {"output": str(outputs[name])}
        pipeline.run(pipeline.plan_merge(validate(fields)))
    return outputs


@pytest.fixture(scope="module")
def theirs(yaml_files, tmp_path_factory):
    """`mergekit-yaml`'s merge of each YAML file (one process, CPU, no network)."""
    return run_mergekit_yaml(yaml_files, tmp_path_factory.mktemp("slices_mergekit"))


def _config_json(directory):
    return json.loads((Path(directory) / "config.json").read_text())


def _bf16_ulp(values):
    """The spacing of bf16 numbers at each value's magnitude (8 significant bits)."""
    magnitude = np.maximum(
        np.abs(values), float(ml_dtypes.finfo(ml_dtypes.bfloat16).smallest_normal)
    )
    return np.exp2(np.floor(np.log2(magnitude)) - 7)


# What each output tensor is made of (no mergekit needed).


def _plan(path, tmp_path):
    fields = mergekit_yaml.load(path).fields | {"output": str(tmp_path / "out")}
    return pipeline.plan_merge(validate(fields))


def _sources(task):
    """(the model's directory: "four" for A, "six" for B; the tensor's name there)."""
    return [(Path(s.file).parent.name, s.name) for s in task.sources]


def test_stacked_layers_are_renumbered_from_their_sources(yaml_files, models, tmp_path):
    plan = _plan(yaml_files["stacked"], tmp_path)
    tasks = {t.name: t for t in plan.tasks}
    assert len(tasks) == 7 * PER_LAYER + 3
    wanted = [("four", i) for i in range(3)] + [("six", i) for i in range(1, 5)]
    for out_layer, (directory, layer) in enumerate(wanted):
        name = f"model.layers.{out_layer}.mlp.up_proj.weight"
        assert _sources(tasks[name]) == [(directory, f"model.layers.{layer}.mlp.up_proj.weight")]
    assert [_sources(tasks[name]) for name in (EMBED, NORM, HEAD)] == [
        [("four", EMBED)],
        [("six", NORM)],
        [("six", HEAD)],
    ]
    assert plan.config_updates == {"num_hidden_layers": 7}


def test_each_slice_places_its_gradients_over_its_own_layers(yaml_files, tmp_path):
    tasks = {t.name: t for t in _plan(yaml_files["slerped"], tmp_path).tasks}
    t_of = {name: task.settings.params["t"] for name, task in tasks.items()}
    assert t_of["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(0.2)
    assert t_of["model.layers.1.mlp.down_proj.weight"] == pytest.approx(0.8)
    assert t_of["model.layers.2.self_attn.k_proj.weight"] == pytest.approx(0.9)
    assert t_of["model.layers.3.self_attn.k_proj.weight"] == pytest.approx(0.3)
    assert t_of["model.layers.3.mlp.up_proj.weight"] == pytest.approx(0.4)  # top-level t
    assert t_of[EMBED] == pytest.approx(0.2) and t_of[NORM] == pytest.approx(0.4)  # position 0
    names = [s.name for s in tasks["model.layers.3.mlp.up_proj.weight"].sources]
    assert names == ["model.layers.3.mlp.up_proj.weight", "model.layers.5.mlp.up_proj.weight"]
    assert [s.name for s in tasks["model.layers.1.input_layernorm.weight"].sources] == [
        "model.layers.1.input_layernorm.weight",
        "model.layers.2.input_layernorm.weight",
    ]


def test_the_output_config_counts_every_slices_layers_and_keeps_their_kinds(models, tmp_path):
    """`layer_types`, where the models state it, follows each output layer's source."""
    kinds = {"a": ["full_attention"] * 4, "b": ["sliding_attention"] * 6}
    paths = {}
    for key, layers in (("a", 4), ("b", 6)):
        config = tiny_config(num_layers=layers) | {"layer_types": kinds[key]}
        paths[key] = write_tiny(tmp_path / key, tiny_weights(config, 0), config)
    config = base_config()
    config.method = "passthrough"
    config.slices = [
        {"models": [{"path": str(paths["a"]), "layer_range": [1, 3]}]},
        {"models": [{"path": str(paths["b"]), "layer_range": [0, 3]}]},
    ]
    config.output = str(tmp_path / "out")
    pipeline.run(pipeline.plan_merge(validate(config)))
    written = _config_json(tmp_path / "out")
    assert written["num_hidden_layers"] == 5
    assert written["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 3
    assert len(read_all(tmp_path / "out")) == 5 * (PER_LAYER + 3) + 3  # a Qwen2: q, k, v biases


def test_a_layer_count_kept_in_a_text_config_is_set_there(tmp_path):
    """Models that keep their language model's settings in `text_config` (multimodal ones)."""
    paths = []
    for layers in (4, 6):
        config = tiny_config(num_layers=layers)
        weights = tiny_weights(config, layers)
        nested = {"text_config": {"num_hidden_layers": config.pop("num_hidden_layers")}}
        paths.append(write_tiny(tmp_path / str(layers), weights, config | nested))
    config = _sliced(tmp_path / "out", (paths[0], [0, 4]), (paths[1], [5, 6]))
    plan = pipeline.plan_merge(validate(config))
    assert plan.config_updates == {"text_config": {"num_hidden_layers": 5}}


# Against mergekit-yaml.


def test_a_stacked_frankenmerge_equals_mergekit_bit_for_bit(ours, theirs, models):
    got, want = read_all(ours["stacked"]), read_all(theirs["stacked"])
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype == BF16, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert _config_json(ours["stacked"])["num_hidden_layers"] == 7
    assert _config_json(theirs["stacked"])["num_hidden_layers"] == 7
    source = read_all(models["b"])
    np.testing.assert_array_equal(
        got["model.layers.3.mlp.up_proj.weight"], source["model.layers.1.mlp.up_proj.weight"]
    )


def test_a_slerp_by_slice_equals_mergekit_within_2_ulp(ours, theirs):
    """Both compute in float32 and round once to bf16: each value within 2 ulp of bf16 (the
    float32 rounding differences of two slerp implementations, far below half a bf16 ulp, can
    move a rounding across one bf16 boundary; 2 gives a factor of safety)."""
    got, want = read_all(ours["slerped"]), read_all(theirs["slerped"])
    assert set(got) == set(want) and len(want) == 4 * PER_LAYER + 3
    for name in want:
        assert got[name].dtype == want[name].dtype == BF16, name
        ours_32, theirs_32 = got[name].astype(np.float32), want[name].astype(np.float32)
        ulp = _bf16_ulp(np.maximum(np.abs(ours_32), np.abs(theirs_32)))
        assert np.all(np.abs(ours_32 - theirs_32) <= 2 * ulp), name
    assert _config_json(ours["slerped"])["num_hidden_layers"] == 4


def test_the_output_loads_in_transformers_and_generates(ours):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(ours["stacked"])
    assert model.config.num_hidden_layers == 7 and len(model.model.layers) == 7
    with torch.no_grad():
        tokens = model.generate(
            torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False, pad_token_id=0
        )
    assert tokens.shape == (1, 7)


def test_a_config_file_with_slices_equals_its_yaml(ours, models, tmp_path):
    """The slerp by slice written as jkarcher's own config: slerp's base is its model 0."""
    a, b = str(models["a"]), str(models["b"])
    slices = [
        {
            "models": [{"path": a, "layer_range": [0, 2]}, {"path": b, "layer_range": [1, 3]}],
            "params": {"t": {"gradient": [0.2, 0.8]}},
        },
        {
            "models": [{"path": a, "layer_range": [2, 4]}, {"path": b, "layer_range": [4, 6]}],
            "params": {"t": [{"filter": "self_attn", "value": {"gradient": [0.9, 0.3]}}]},
        },
    ]
    path = tmp_path / "sliced.py"
    path.write_text(
        "from jkarcher.config import base_config\n\n\n"
        "def get_config():\n"
        "    config = base_config()\n"
        "    config.method = 'slerp'\n"
        f"    config.slices = {slices!r}\n"
        "    config.params = {'t': 0.4}\n"
        f"    config.output = {str(tmp_path / 'out')!r}\n"
        "    return config\n"
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "merge.py"), "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    got, want = read_all(tmp_path / "out"), read_all(ours["slerped"])
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert _config_json(tmp_path / "out")["num_hidden_layers"] == 4


# Bad slices: one-line errors naming the field, before anything is written.


def _sliced(output, *pieces):
    """A passthrough config of slices, each (model path, layer range) of one model."""
    slices = [{"models": [{"path": str(path), "layer_range": layers}]} for path, layers in pieces]
    return {"method": "passthrough", "output": str(output), "slices": slices}


@pytest.mark.parametrize(
    "pieces, message",
    [
        (
            [("a", [0, 4]), ("b", [4, 7])],
            r"slices\[1\].models\[0\].layer_range: \[4, 7\) is outside the 6 layers of .*six",
        ),
        ([("a", [3, 3])], r"slices\[0\].models\[0\].layer_range: \[3, 3\) holds no layer"),
        ([("a", [-1, 2])], r"slices\[0\].models\[0\].layer_range: starts at layer -1"),
        ([("a", [0, 2.5])], r"slices\[0\].models\[0\].layer_range: must be \[start, end\)"),
    ],
)
def test_bad_layer_ranges_are_errors_naming_the_field(models, tmp_path, pieces, message):
    output = tmp_path / "out"
    config = _sliced(output, *((models[key], layers) for key, layers in pieces))
    with pytest.raises(ConfigError, match=message):
        pipeline.plan_merge(validate(config))
    assert not output.exists()


def test_slices_whose_models_differ_in_layer_count_are_refused(models, tmp_path):
    piece = {
        "models": [
            {"path": str(models["a"]), "layer_range": [0, 2]},
            {"path": str(models["b"]), "layer_range": [0, 3]},
        ]
    }
    config = {"method": "linear", "output": str(tmp_path / "out"), "slices": [piece]}
    with pytest.raises(ConfigError, match=r"slices\[0\].models\[1\].layer_range: 3 layers"):
        validate(config)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"models": [{"path": "x"}]}, "models, slices: give one of them"),
        ({"base_model": "x"}, "base_model: with slices, each slice gives its own base_model"),
        ({"method": "slerp"}, r"slices\[0\].models: method 'slerp' merges exactly 2 models"),
        ({"method": "ties"}, r"slices\[0\].base_model: method 'ties' needs a base model"),
        ({"slices": [{"models": []}]}, r"slices\[0\].models: must be a non-empty list"),
        ({"slices": [{"modelz": []}]}, r"slices\[0\]: unknown field 'modelz'"),
    ],
)
def test_what_a_config_with_slices_cannot_be_is_named(models, tmp_path, change, message):
    config = _sliced(tmp_path / "out", (models["a"], [0, 2]))
    with pytest.raises(ConfigError, match=message):
        validate(config | change)


@pytest.mark.parametrize(
    "text, old, new, message",
    [
        (STACKED, "[1, 5]", "[2, 7]", r"slices\[1\].sources\[0\].layer_range: \[2, 7\) is outside"),
        (STACKED, "[1, 5]", "[5, 5]", r"slices\[1\].sources\[0\].layer_range: \[5, 5\) holds no"),
        (SLERPED, "[1, 3]", "[1, 4]", r"slices\[0\].sources\[1\].layer_range: 3 layers, but"),
    ],
)
def test_yaml_slices_are_checked_against_the_models_layers(
    models, tmp_path, text, old, new, message
):
    """Errors name the YAML's own fields; the layer counts come from the models' config.json."""
    path = tmp_path / "bad.yml"
    path.write_text(textwrap.dedent(text).format(**models).replace(old, new))
    with pytest.raises(ConfigError, match=message):
        mergekit_yaml.load(path)


def test_a_yaml_slices_base_must_be_among_its_sources(models):
    document = {
        "slices": [{"sources": [{"model": "b", "layer_range": [0, 2]}]}],
        "merge_method": "ties",
        "base_model": "a",
    }
    with pytest.raises(ConfigError, match=r"slices\[0\].sources: the base model a is not among"):
        mergekit_yaml.translate(document, layer_count=lambda model: 4)
