"""mergekit YAML configs: the translation into a jkarcher config (every field mapped, what cannot
be honoured refused by name), per-tensor values equal to mergekit's own resolution, and merges
equal to those of `mergekit-yaml` itself on tiny checkpoints.

The translation tests need no mergekit. The comparisons with mergekit run where it is installed,
and always in CI (CI=true), where a missing mergekit fails them.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers_checkpoints import BF16, make_models, read_all
from helpers_mergekit import require_oracle, run_mergekit_yaml

from jkarcher import demo, mergekit_yaml, pipeline
from jkarcher.config import ConfigError, validate

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 4
TOLERANCE = 1e-6


def _translate(document, layers=LAYERS):
    return mergekit_yaml.translate(document, layer_count=lambda model: layers)


def _paths(translation):
    return [m["path"] for m in translation.fields["models"]]


# The translation.


def test_models_form_maps_every_field():
    document = {
        "models": [
            {"model": "base"},
            {"model": "a", "parameters": {"weight": 0.7, "density": [0.3, 0.9]}},
            {
                "model": "b",
                "parameters": {
                    "weight": {"filter": "mlp", "value": 2},
                    "density": [{"filter": "self_attn", "value": 0.5}, {"value": [0.8, 0.4]}],
                },
            },
            {"model": "c"},
        ],
        "merge_method": "ties",
        "base_model": "base",
        "parameters": {"normalize": True, "lambda": 1.1, "weight": 0.5, "int8_mask": True},
        "dtype": "torch.float16",
    }
    translation = _translate(document)
    assert translation.fields == {
        "method": "ties",
        "models": [
            {"path": "a", "weight": 0.7, "params": {"density": {"gradient": [0.3, 0.9]}}},
            {
                "path": "b",
                "weight": [{"filter": "mlp", "value": 2}, {"value": 0.5}],
                "params": {
                    "density": [
                        {"filter": "self_attn", "value": 0.5},
                        {"value": {"gradient": [0.8, 0.4]}},
                    ]
                },
            },
            {"path": "c", "weight": 0.5},
        ],
        "base_model": "base",
        "params": {"normalize": True, "lambda": 1.1},
        "dtype": "float16",
    }
    notes = "\n".join(translation.notes)
    assert "parameters.int8_mask: ignored" in notes
    assert "dtype: float16 is mergekit's compute dtype; jkarcher computes in float32" in notes
    validate(translation.fields | {"output": "out"})


@pytest.mark.parametrize(
    "method, listed, paths, base_model",
    [
        ("ties", ["a", "b"], ["a", "b"], "base"),
        ("ties", ["a", "base", "b"], ["a", "b"], "base"),
        ("slerp", ["a"], ["base", "a"], None),  # the base is slerp's t = 0 end: model 0
        ("slerp", ["a", "base"], ["base", "a"], None),
        ("linear", ["a", "base"], ["base", "a"], None),  # merged as one more model
        ("karcher", ["a", "b"], ["base", "a", "b"], None),
    ],
)
def test_where_the_base_model_goes(method, listed, paths, base_model):
    document = {
        "models": [{"model": m} for m in listed],
        "merge_method": method,
        "base_model": "base",
        "parameters": {"t": 0.5} if method == "slerp" else {},
    }
    translation = _translate(document)
    assert _paths(translation) == paths
    assert translation.fields["base_model"] == base_model


def test_the_base_models_own_parameters_are_ignored_with_a_note():
    document = {
        "models": [{"model": "base", "parameters": {"weight": 1.0}}, {"model": "a"}],
        "merge_method": "task_arithmetic",
        "base_model": "base",
    }
    translation = _translate(document)
    assert _paths(translation) == ["a"]
    assert any(n.startswith("models[0].parameters: ignored") for n in translation.notes)


def test_karchers_weights_are_ignored_as_mergekit_ignores_them():
    """mergekit's karcher weighs every model equally, whatever weights the YAML gives."""
    document = {
        "models": [
            {"model": "a", "parameters": {"weight": 0.6}},
            {"model": "b", "parameters": {"weight": 0.4}},
        ],
        "merge_method": "karcher",
        "parameters": {"weight": 2.0},
    }
    translation = _translate(document)
    assert [m.get("weight") for m in translation.fields["models"]] == [None, None]
    assert sum("weighs every model equally" in n for n in translation.notes) == 3


def test_one_slice_over_every_layer_is_the_models_form():
    asked = []

    def layer_count(model):
        asked.append(model)
        return LAYERS

    document = {
        "slices": [
            {
                "sources": [
                    {"model": "a", "layer_range": [0, LAYERS], "parameters": {"weight": 2}},
                    {"model": "b", "layer_range": [0, LAYERS]},
                ],
                "base_model": "a",
                "parameters": {"t": [{"filter": "mlp", "value": [0.2, 0.4]}]},
            }
        ],
        "merge_method": "slerp",
        "base_model": "b",
        "parameters": {"t": 0.6},
        "dtype": "float32",
    }
    translation = mergekit_yaml.translate(document, layer_count=layer_count)
    assert asked == ["a", "b"]
    assert translation.fields["models"] == [{"path": "a", "weight": 2}, {"path": "b"}]
    assert translation.fields["params"] == {
        "t": [{"filter": "mlp", "value": {"gradient": [0.2, 0.4]}}, {"value": 0.6}]
    }


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layer_range": [0, LAYERS - 1]}, r"sources\[1\].layer_range: 3 layers, but .* gives 4"),
        ({"layer_range": [1, LAYERS + 1]}, r"sources\[1\].layer_range: \[1, 5\) is outside the 4"),
        ({"layer_range": [2, 2]}, r"slices\[0\].sources\[1\].layer_range: \[2, 2\) holds no"),
        ({"layer_range": None}, r"slices\[0\].sources\[1\].layer_range: must be \[start, end\)"),
        ({"weight": 1}, r"slices\[0\].sources\[1\]: unknown field 'weight'"),
    ],
)
def test_slice_layer_ranges_that_cannot_be_merged_are_refused(change, message):
    source = {"model": "b", "layer_range": [0, LAYERS]} | change
    document = {
        "slices": [{"sources": [{"model": "a", "layer_range": [0, LAYERS]}, source]}],
        "merge_method": "linear",
    }
    with pytest.raises(ConfigError, match=message):
        _translate(document)


def test_several_slices_are_jkarcher_slices_and_residual_weight_is_noted():
    piece = {"sources": [{"model": "a", "layer_range": [0, LAYERS]}], "residual_weight": 0.3}
    part = {"sources": [{"model": "b", "layer_range": [1, 3]}]}
    fields = _translate({"slices": [piece, part], "merge_method": "linear"}).fields
    assert "models" not in fields
    assert fields["slices"] == [
        {"models": [{"path": "a", "layer_range": [0, 4]}], "base_model": None, "params": {}},
        {"models": [{"path": "b", "layer_range": [1, 3]}], "base_model": None, "params": {}},
    ]
    notes = _translate({"slices": [piece], "merge_method": "linear"}).notes
    assert any(n.startswith("slices[0].residual_weight: ignored") for n in notes)


def test_passthroughs_per_model_scale_is_its_scale():
    document = {
        "models": [{"model": "a", "parameters": {"scale": [{"filter": "mlp", "value": 0.5}]}}],
        "merge_method": "passthrough",
        "parameters": {"scale": 2.0},
    }
    translation = _translate(document)
    assert translation.fields["models"] == [{"path": "a"}]
    assert translation.fields["params"] == {
        "scale": [{"filter": "mlp", "value": 0.5}, {"value": 2.0}]
    }


def test_task_arithmetics_density_and_rescale_are_ignored_with_notes():
    document = {
        "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}}],
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "parameters": {"rescale": True, "lambda": 0.8},
    }
    translation = _translate(document)
    assert translation.fields["params"] == {"lambda": 0.8}
    assert translation.fields["models"] == [{"path": "a", "weight": 1.0}]
    notes = "\n".join(translation.notes)
    assert "parameters.rescale: ignored" in notes
    assert "models[0].parameters.density: ignored" in notes


@pytest.mark.parametrize(
    "dtype, out_dtype, ours, note",
    [
        ("bfloat16", None, "bfloat16", "compute dtype"),
        ("float32", "bfloat16", "bfloat16", None),
        (None, "float16", "float16", None),
        ("float64", "float32", "float32", "compute dtype"),
        (None, None, "bfloat16", "neither is given"),
    ],
)
def test_output_dtype(dtype, out_dtype, ours, note):
    document = {
        "models": [{"model": "a"}],
        "merge_method": "linear",
        "dtype": dtype,
        "out_dtype": out_dtype,
    }
    translation = _translate(document)
    assert translation.fields["dtype"] == ours
    dtype_notes = [n for n in translation.notes if n.startswith("dtype")]
    assert (note in dtype_notes[0]) if note else not dtype_notes


def _tokenizer_document(source, base):
    return {
        "models": [{"model": "a"}, {"model": "b"}],
        "merge_method": "task_arithmetic" if base else "linear",
        "base_model": base,
        "tokenizer_source": source,
    }


@pytest.mark.parametrize(
    "source, ours", [("base", "base"), ("union", "union"), ("b", "b"), ("x", "x")]
)
def test_tokenizer_source_is_jkarchers(source, ours):
    fields = _translate(_tokenizer_document(source, "x")).fields
    assert fields["tokenizer_source"] == ours


@pytest.mark.parametrize(
    "source, base, message",
    [
        ("base", None, "tokenizer_source: 'base' needs a base_model"),
        ("union", None, "tokenizer_source: 'union' needs a base_model"),
        ("b", None, "tokenizer_source: 'b' needs a base_model"),
        ("b@main", "x", r"tokenizer_source: .* names a revision"),
    ],
)
def test_tokenizer_sources_without_a_base_model_are_refused(source, base, message):
    with pytest.raises(ConfigError, match=message):
        _translate(_tokenizer_document(source, base))


def _ties(**changes):
    document = {
        "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b"}],
        "merge_method": "ties",
        "base_model": "base",
        "parameters": {"density": 0.5},
    }
    return document | changes


REFUSED = [
    (_ties(modules={"text": {}}), "modules: merges of several modules"),
    (_ties(tokenizer={"source": "base"}, tokenizer_source="base"), "tokenizer, tokenizer_sour"),
    (_ties(name="first"), r"unknown field 'name' \(jkarcher reads: models, slices"),
    (_ties(merge_method="soup"), "merge_method: unknown merge method 'soup'"),
    (_ties(merge_method=None), "merge_method: required"),
    (_ties(slices=[]), "models, slices: give exactly one of them"),
    (_ties(models=None), "models, slices: give exactly one of them"),
    (_ties(models=[{"model": "a+b+adapter"}]), r"models\[0\].model: 'a\+b\+adapter': jkarcher"),
    (_ties(base_model="b+adapter"), r"base_model: 'b\+adapter': jkarcher applies a LoRA adapter"),
    (_ties(models=[{"model": "org/a@main"}]), r"models\[0\].model: .* names a revision"),
    (_ties(models=[{"model": "a", "weight": 1}]), r"models\[0\]: unknown field 'weight'"),
    (_ties(models=[{"parameters": {}}]), r"models\[0\].model: required"),
    (_ties(models=[{"model": "a"}, {"model": "a"}]), r"models\[1\].model: a is listed twice"),
    (_ties(models=[]), "models: must be a non-empty list"),
    (_ties(parameters={"foo": 1}), "parameters.foo: method 'ties' has no parameter 'foo'"),
    (_ties(parameters=[1]), "parameters: must be a mapping"),
    (_ties(parameters={"lambda": []}), "parameters.lambda: an empty list gives no value"),
    (_ties(parameters={"density": [0.5, {"value": 1}]}), r"parameters.density\[1\]: must be one"),
    (
        _ties(parameters={"density": [{"filtr": "mlp", "value": 1}]}),
        r"parameters.density\[0\]: unknown field 'filtr'",
    ),
    (_ties(parameters={"density": [{"filter": "mlp"}]}), r"parameters.density\[0\].value: requir"),
    (
        _ties(parameters={"density": [{"filter": 2, "value": 1}]}),
        r"parameters.density\[0\].filter: must be text",
    ),
    (
        {"models": [{"model": "a"}], "merge_method": "karcher", "parameters": {"weight": -1}},
        "parameters.weight: method 'karcher' takes weights >= 0, since the Karcher mean is",
    ),
    (
        {
            "models": [{"model": "a", "parameters": {"weight": [1, -0.5]}}, {"model": "b"}],
            "merge_method": "karcher",
        },
        r"models\[0\].parameters.weight: method 'karcher' takes weights >= 0, .* got -0.5",
    ),
    (
        _ties(models=[{"model": "a", "parameters": {"gama": 0.1}}]),
        r"models\[0\].parameters.gama: method 'ties' has no parameter 'gama'",
    ),
    (
        _ties(models=[{"model": "a", "parameters": {"lambda": 0.1}}]),
        r"models\[0\].parameters.lambda: method 'ties' takes one value of 'lambda' for all models",
    ),
    (_ties(dtype="int8"), "dtype: must be one of bfloat16, float16, float32, float64"),
    (_ties(dtype="float64"), "dtype: jkarcher writes bfloat16, float16, float32, not float64"),
    (_ties(out_dtype="float64"), "out_dtype: jkarcher writes"),
    ([1, 2], "a mergekit config is a mapping of fields"),
]


@pytest.mark.parametrize("document, message", REFUSED)
def test_what_cannot_be_honoured_is_an_error_naming_the_field(document, message):
    with pytest.raises(ConfigError, match=message):
        _translate(document)


def test_values_jkarcher_refuses_are_named_by_its_config(tmp_path):
    """Values a method cannot take are checked by jkarcher's config, whose fields are the
    translation's (params for parameters; models without the base model)."""
    translation = _translate(_ties(parameters={"density": [1.0, 1.5]}))
    with pytest.raises(ConfigError, match=r"params.density.gradient\[1\]: .*'density'=1.5"):
        validate(translation.fields | {"output": str(tmp_path)})


def test_read_takes_numbers_in_exponent_form(tmp_path):
    path = tmp_path / "merge.yml"
    path.write_text(
        "merge_method: karcher\nparameters:\n  tol: 1e-5\n  eps: 2E+1\n  max_iter: 20\n"
        "models:\n  - model: a\n"
    )
    assert mergekit_yaml.read(path)["parameters"] == {"tol": 1e-5, "eps": 20.0, "max_iter": 20}


@pytest.mark.parametrize(
    "text, message",
    [
        ("a: 1\n---\nb: 2\n", "holds 2 YAML documents"),
        ("models: [\n", "not valid YAML"),
        (None, "cannot read it"),
        ("merge_method: linear\nmodels:\n  - model: a\nname: x\n", "unknown field 'name'"),
    ],
)
def test_load_errors_name_the_file(tmp_path, text, message):
    path = tmp_path / "merge.yml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        mergekit_yaml.load(path)
    assert str(err.value).startswith(f"{path}: ")


def test_the_example_config_plans_on_the_demo_models(tmp_path, monkeypatch):
    demo.ensure_demo_models(ROOT / "cache" / "demo")
    monkeypatch.chdir(ROOT)
    translation = mergekit_yaml.load(ROOT / "configs" / "mergekit_ties_example.yml")
    config = validate(translation.fields | {"output": str(tmp_path / "out")})
    plan = pipeline.plan_merge(config)
    assert config.method == "ties" and config.base_model.endswith("expert-a")
    # the demo models have two layers: density 0.9 at the first (and outside the layers), 0.5
    assert {t.settings.params["density"] for t in plan.tasks} == {(0.9, 0.7), (0.5, 0.7)}
    assert len({t.settings.weights for t in plan.tasks}) == 2
    assert any("int8_mask" in n for n in translation.notes)


# Against mergekit itself: tiny float32 checkpoints of four layers.

CASES = {
    "linear": """
        models:
          - model: {m1}
            parameters:
              weight: 0.6
          - model: {m2}
            parameters:
              weight: [0.2, 1.0, 0.4]
          - model: {m3}
            parameters:
              weight:
                - filter: self_attn
                  value: 2.0
                - value: 0.5
        merge_method: linear
        dtype: float32
    """,
    "ties": """
        models:
          - model: {m0}
          - model: {m1}
            parameters:
              density: [0.3, 0.9]
              weight: 0.7
          - model: {m2}
            parameters:
              density:
                - filter: self_attn
                  value: 0.5
                - value: [0.8, 0.4]
        merge_method: ties
        base_model: {m0}
        parameters:
          weight:
            - filter: mlp
              value: 1.3
            - value: 0.9
          normalize: true
          int8_mask: true
        dtype: float32
    """,
    "task_arithmetic": """
        models:
          - model: {m1}
            parameters:
              weight: 0.4
          - model: {m2}
            parameters:
              weight: [0.1, 0.9]
        merge_method: task_arithmetic
        base_model: {m0}
        parameters:
          lambda: 0.8
        dtype: float32
    """,
    "slerp_slice": """
        slices:
          - sources:
              - model: {m0}
                layer_range: [0, 4]
              - model: {m1}
                layer_range: [0, 4]
        merge_method: slerp
        base_model: {m0}
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: float32
    """,
    "model_stock": """
        models:
          - model: {m1}
          - model: {m2}
          - model: {m3}
        merge_method: model_stock
        base_model: {m0}
        dtype: float32
    """,
    # Task vectors of the tiny models are ~N(0, 0.03): these epsilons leave each entry changed
    # by none, one or several models.
    "ram": """
        models:
          - model: {m1}
          - model: {m2}
          - model: {m3}
        merge_method: ram
        base_model: {m0}
        parameters:
          epsilon: [0.02, 0.04]
        dtype: float32
    """,
    "ramplus_tl": """
        models:
          - model: {m1}
          - model: {m2}
          - model: {m3}
        merge_method: ramplus_tl
        base_model: {m0}
        parameters:
          r: [0.2, 0.8]
          alpha: 1.0
          epsilon: 0.03
        dtype: float32
    """,
    "breadcrumbs_ties": """
        models:
          - model: {m1}
            parameters:
              weight: 1.0
              density: 0.8
              gamma: [0.02, 0.1]
          - model: {m2}
            parameters:
              weight: 0.5
              density: [0.9, 0.6]
        merge_method: breadcrumbs_ties
        base_model: {m0}
        dtype: float32
    """,
    "multislerp": """
        models:
          - model: {m1}
            parameters:
              weight: 1.0
          - model: {m2}
            parameters:
              weight: [0.5, 2.0]
        merge_method: multislerp
        base_model: {m0}
        dtype: float32
    """,
    "nuslerp": """
        models:
          - model: {m1}
            parameters:
              weight: [1.0, 0.2]
          - model: {m2}
            parameters:
              weight: 0.6
        merge_method: nuslerp
        dtype: float32
    """,
    "task_negation": """
        models:
          - model: {m1}
            parameters:
              weight: 1.0
          - model: {m2}
            parameters:
              weight: -0.5
        merge_method: task_arithmetic
        base_model: {m0}
        dtype: float32
    """,
    "linear_signed": """
        models:
          - model: {m1}
            parameters:
              weight: 1.0
          - model: {m2}
            parameters:
              weight: [1.0, -0.5]
          - model: {m3}
            parameters:
              weight: -0.25
        merge_method: linear
        dtype: float32
    """,
    "nuslerp_zero_sum": """
        models:
          - model: {m1}
            parameters:
              weight: 1.0
          - model: {m2}
            parameters:
              weight: -1.0
        merge_method: nuslerp
        base_model: {m0}
        dtype: float32
    """,
    "sce": """
        models:
          - model: {m1}
          - model: {m2}
          - model: {m3}
        merge_method: sce
        base_model: {m0}
        parameters:
          select_topk: [0.4, 0.9]
          int8_mask: true
        dtype: float32
    """,
    "passthrough": """
        models:
          - model: {m1}
            parameters:
              scale:
                - filter: mlp
                  value: 0.5
                - value: 2.0
        merge_method: passthrough
        dtype: float32
    """,
}
# mergekit's own examples/*.yml (mergekit 0.1.5's repository), each on the tiny models: the same
# fields, methods, parameters, gradients and filters; float32 output, so that both tools' values
# compare to float32 rounding. examples/orcamini-platy-44layer.yml, a passthrough stack that
# changes the layer count, runs in tests/test_slices.py on Llama-layout models.
EXAMPLES = {
    "examples/arcee_fusion.yml": """
        models:
          - model: {m0}
          - model: {m1}
        merge_method: arcee_fusion
        base_model: {m0}
        dtype: float32
    """,
    "examples/bio-merge.yml": """
        models:
          - model: {m1}
            parameters:
              density: 0.5
              weight: 0.5
          - model: {m2}
            parameters:
              density: 0.5
              weight: 0.5
        merge_method: ties
        base_model: {m0}
        parameters:
          normalize: false
          int8_mask: true
        dtype: float32
    """,
    "examples/gradient-slerp.yml": """
        slices:
          - sources:
              - model: {m0}
                layer_range: [0, 4]
              - model: {m1}
                layer_range: [0, 4]
        merge_method: slerp
        base_model: {m0}
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: float32
    """,
    "examples/linear.yml": """
        models:
          - model: {m0}
            parameters:
              weight: 1.0
          - model: {m1}
            parameters:
              weight: 0.3
          - model: {m2}
            parameters:
              weight: 0.5
        merge_method: linear
        dtype: float32
    """,
    "examples/ties.yml": """
        models:
          - model: {m1}
            parameters:
              density: [1, 0.7, 0.1]
              weight: 1.0
          - model: {m2}
            parameters:
              density: 0.5
              weight: [0, 0.3, 0.7, 1]
          - model: {m3}
            parameters:
              density: 0.33
              weight:
                - filter: mlp
                  value: 0.5
                - value: 0
        merge_method: ties
        base_model: {m0}
        parameters:
          normalize: true
          int8_mask: true
        dtype: float32
    """,
}
CASES |= EXAMPLES


@pytest.fixture(scope="module")
def mergekit():
    require_oracle()


@pytest.fixture(scope="module")
def case_files(tmp_path_factory):
    """Each case as a YAML file on four tiny float32 models m0..m3."""
    root = tmp_path_factory.mktemp("mergekit_yaml")
    models = make_models(root / "models", n=4, dtype=np.float32, num_layers=LAYERS)
    paths = {f"m{i}": str(p) for i, p in enumerate(models)}
    files = {}
    for name, text in CASES.items():
        files[name] = root / f"{name.replace('/', '_').removesuffix('.yml')}.yml"
        files[name].write_text(textwrap.dedent(text).format(**paths))
    return files


@pytest.fixture(scope="module")
def mergekit_outputs(mergekit, case_files, tmp_path_factory):
    """Each case merged by the `mergekit-yaml` command (its entry point, all cases in one
    process), on the CPU and without network."""
    return run_mergekit_yaml(case_files, tmp_path_factory.mktemp("mergekit_out"))


def _ours(path, output, **fields):
    translation = mergekit_yaml.load(path)
    pipeline.run(
        pipeline.plan_merge(validate(translation.fields | {"output": str(output)} | fields))
    )
    return read_all(output)


def _max_difference(ours, theirs):
    assert set(ours) == set(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype == np.float32, name
        assert ours[name].shape == theirs[name].shape, name
    return max(float(np.max(np.abs(ours[n] - theirs[n]))) for n in theirs)


@pytest.mark.parametrize("case", list(CASES))
def test_merges_equal_mergekit_yaml(case, case_files, mergekit_outputs, tmp_path):
    ours = _ours(case_files[case], tmp_path / "ours")
    assert _max_difference(ours, read_all(mergekit_outputs[case])) <= TOLERANCE


def _mergekit_resolution(path, scratch):
    """mergekit's planned settings of each tensor: (shared parameters, {model: its parameters})."""
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache, SaveTensor
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    config = MergeConfiguration.model_validate(yaml.safe_load(Path(path).read_text()))
    options = MergeOptions()
    LoaderCache().setup(options)
    reference = config.base_model or (config.models or config.slices[0].sources)[0].model
    planner = MergePlanner(
        config,
        get_architecture_info(config, options),
        options=options,
        out_model_config=reference.config(),
    )
    return {
        task.tensor_name: (
            dict(task.tensor_task.parameters),
            {str(m): dict(p) for m, p in task.tensor_task.input_parameters.items()},
        )
        for task in planner.plan_to_disk(out_path=str(scratch))
        if isinstance(task, SaveTensor)
    }


@pytest.mark.parametrize(
    "case", ["linear", "ties", "slerp_slice", "breadcrumbs_ties", "passthrough"]
)
def test_every_tensors_values_equal_mergekits_resolution(case, case_files, mergekit, tmp_path):
    config = validate(
        mergekit_yaml.load(case_files[case]).fields | {"output": str(tmp_path / "out")}
    )
    plan = pipeline.plan_merge(config)
    theirs = _mergekit_resolution(case_files[case], tmp_path / "unused")
    assert {t.name for t in plan.tasks} == set(theirs)
    paths = [m.path for m in config.models]
    compared = 0
    for task in plan.tasks:
        shared, per_model = theirs[task.name]
        for name, value in task.settings.params.items():
            if name in shared:
                assert value == shared[name], (task.name, name)
                compared += 1
            values = value if isinstance(value, tuple) else (value,) * len(paths)
            for path, v in zip(paths, values, strict=True):
                if name in per_model.get(path, {}):
                    assert v == per_model[path][name], (task.name, name, path)
                    compared += 1
        for path, weight in zip(paths, task.settings.weights, strict=True):
            if "weight" in per_model.get(path, {}):
                assert weight == per_model[path]["weight"], (task.name, path)
                compared += 1
    assert compared >= len(plan.tasks)


@pytest.fixture(scope="module")
def bf16_example(mergekit, tmp_path_factory):
    """The repository's own configs/mergekit_ties_example.yml on three tiny bfloat16 models
    (float32 compute, bfloat16 output, as jkarcher always computes), and mergekit-yaml's merge
    of it: (config file, mergekit's output, the models by config name)."""
    root = tmp_path_factory.mktemp("bf16_example")
    models = make_models(root / "models", n=3, num_layers=LAYERS)
    text = (ROOT / "configs" / "mergekit_ties_example.yml").read_text()
    for name, path in zip(("expert-a", "expert-b", "expert-c"), models, strict=True):
        text = text.replace(f"cache/demo/qwen2-tiny-v1-seed0/{name}", str(path))
    config = root / "example.yml"
    config.write_text(text.replace("dtype: bfloat16", "dtype: float32\nout_dtype: bfloat16"))
    output = run_mergekit_yaml({"example": config}, root)["example"]
    return config, output, dict(zip(("a", "b", "c"), models, strict=True))


def _on_a_trim_boundary(base, model, density):
    """Where a model's task vector equals its k-th largest magnitude, k = max(1, int(d D)):
    the entries among which mergekit's choice follows torch's unstable sort."""
    delta = np.abs(model.astype(np.float32) - base.astype(np.float32))
    if density >= 1:
        return np.zeros(delta.shape, bool)
    k = max(1, int(density * delta.size))
    return delta == np.sort(delta.reshape(-1))[::-1][k - 1]


def test_the_example_config_on_bf16_models_equals_mergekit_off_trim_ties(bf16_example, tmp_path):
    """Every entry equals mergekit's bit for bit except where a model's task vector is tied at
    its trim boundary; there the fixed tie rule may keep another entry than torch's sort (on
    these models: 4 entries differ, of the 128 on a boundary, of 9552)."""
    config, theirs_dir, models = bf16_example
    ours = _ours(config, tmp_path / "ours")
    theirs = read_all(theirs_dir)
    plan = pipeline.plan_merge(
        validate(mergekit_yaml.load(config).fields | {"output": str(tmp_path / "unused")})
    )
    trees = {key: read_all(path) for key, path in models.items()}
    entries = boundary = differing = 0
    for task in plan.tasks:
        name = task.name
        assert ours[name].dtype == theirs[name].dtype == np.dtype(BF16), name
        tied = np.zeros(task.shape, bool)
        for key, density in zip("bc", task.settings.params["density"], strict=True):
            tied |= _on_a_trim_boundary(trees["a"][name], trees[key][name], density)
        differ = ours[name] != theirs[name]
        assert not np.any(differ & ~tied), name
        entries += tied.size
        boundary += int(tied.sum())
        differing += int(differ.sum())
    assert differing <= boundary < 0.05 * entries, (differing, boundary, entries)


def _merge_script(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "merge.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_merge_script_runs_a_mergekit_yaml(case_files, mergekit_outputs, tmp_path):
    out = tmp_path / "out"
    result = _merge_script(
        "--mergekit-yaml",
        case_files["ties"],
        f"--config.output={out}",
        "--config.out_shard_size=3000",
    )
    assert result.returncode == 0, result.stderr
    assert "int8_mask: ignored" in result.stderr and "merged 51 tensors" in result.stdout
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert _max_difference(read_all(out), read_all(mergekit_outputs["ties"])) <= TOLERANCE


def test_the_merge_script_refuses_a_bad_mergekit_yaml(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("merge_method: ties\nbase_model: b+lora\nmodels:\n  - model: a\n")
    result = _merge_script("--mergekit-yaml", path, f"--config.output={tmp_path / 'out'}")
    assert result.returncode == 1
    assert f"error: {path}: base_model: 'b+lora': jkarcher applies a LoRA adapter" in result.stderr
    assert not (tmp_path / "out").exists()
    both = _merge_script("--mergekit-yaml", path, "--config", ROOT / "configs" / "demo.py")
    assert both.returncode != 0 and "exclude each other" in both.stderr


def test_command_line_fields_override_the_mergekit_yaml(tmp_path):
    path = tmp_path / "linear.yml"
    path.write_text("merge_method: linear\ndtype: float32\nmodels:\n  - model: a\n")
    result = _merge_script(
        "--mergekit-yaml", path, f"--config.output={tmp_path / 'out'}", "--config.method=nope"
    )
    assert result.returncode == 1
    assert f"error: {path}, as a jkarcher config: method: unknown merge method 'nope'" in (
        result.stderr
    )
