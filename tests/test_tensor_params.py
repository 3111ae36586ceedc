"""Values that vary by tensor: gradients over the layers and filters on the tensor name, in the
config (validation, errors that name the field, resolution) and in the pipeline (one place that
resolves them, the grouping of compiled leaves, the merged values)."""

import json

import numpy as np
import pytest
from helpers_checkpoints import make_models, merge_config, read_all

import jkarcher
from jkarcher import pipeline
from jkarcher.config import ConfigError, Gradient, tensor_values, validate

EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
HEAD = "lm_head.weight"


def q_proj(layer):
    return f"model.layers.{layer}.self_attn.q_proj.weight"


def k_proj(layer):
    return f"model.layers.{layer}.self_attn.k_proj.weight"


def up_proj(layer):
    return f"model.layers.{layer}.mlp.up_proj.weight"


def _ties(params=None, models=None):
    """A ties config (two models and a base) as plain data."""
    return {
        "method": "ties",
        "models": models or [{"path": "a"}, {"path": "b"}],
        "base_model": "base",
        "params": params or {},
        "output": "out",
    }


@pytest.mark.parametrize(
    "anchors, position, value",
    [
        ((0.2, 1.0, 0.6), 0.0, 0.2),
        ((0.2, 1.0, 0.6), 0.25, 0.6),
        ((0.2, 1.0, 0.6), 0.5, 1.0),
        ((0.2, 1.0, 0.6), 0.75, 0.8),
        ((0.2, 1.0, 0.6), 1.0, 0.6),
        ((0.7,), 0.4, 0.7),
        ((10, 20), 0.5, 15),
        ((10, 20), 0.25, 12.5),
        ((True, False), 0.5, True),  # not numbers: the anchor at or below the position
        ((True, False), 1.0, False),
        (("tensor", "row", "tensor"), 0.6, "row"),
    ],
)
def test_gradient_interpolates_numbers_and_picks_other_values(anchors, position, value):
    got = Gradient(anchors).at(position)
    assert got == pytest.approx(value) and type(got) is type(value)


def test_filters_fall_back_to_the_shared_value_then_the_default():
    raw = _ties(
        params={
            "density": [
                {"filter": "self_attn", "value": 0.5},
                {"filter": "mlp", "value": {"gradient": [0.2, 1.0]}},
            ],
            "lambda": {"gradient": [1.0, 2.0]},
        },
        models=[
            {"path": "a"},
            {"path": "b", "params": {"density": [{"filter": "q_proj", "value": 0.9}]}},
        ],
    )
    config = validate(raw)
    assert config.varies_by_layer

    def density_and_lambda(name, position):
        _, params = tensor_values(config, name, position)
        return params["density"], params["lambda"]

    assert density_and_lambda(q_proj(0), 0.0) == ((0.5, 0.9), 1.0)
    assert density_and_lambda(k_proj(2), 1.0) == ((0.5, 0.5), 2.0)
    assert density_and_lambda(up_proj(1), 0.5) == ((0.6, 0.6), 1.5)
    assert density_and_lambda(EMBED, 0.0) == ((1.0, 1.0), 1.0)  # no rule matches: the default


def test_a_models_own_value_comes_before_the_shared_one():
    raw = _ties(
        params={"density": {"gradient": [0.2, 0.4]}},
        models=[{"path": "a", "params": {"density": 0.7}}, {"path": "b"}],
    )
    _, params = tensor_values(validate(raw), up_proj(3), 1.0)
    assert params["density"] == (0.7, 0.4)


def test_weights_that_vary_by_tensor():
    raw = _ties(
        models=[
            {"path": "a", "weight": {"gradient": [1.0, 0.0]}},
            {"path": "b", "weight": [{"filter": "mlp", "value": 3}]},
        ]
    )
    config = validate(raw)
    assert tensor_values(config, up_proj(1), 0.25)[0] == (0.75, 3.0)
    assert tensor_values(config, q_proj(1), 1.0)[0] == (0.0, 1.0)  # b: the default weight


@pytest.mark.parametrize(
    "method, base, message",
    [
        ("karcher", None, "the weights sum to zero"),
        ("linear", None, r"the weights \[0.0, 0.0\] sum to 0 .* divides by their sum"),
    ],
)
def test_weights_that_sum_to_zero_on_one_tensor_name_it(method, base, message):
    models = [{"path": "a", "weight": [{"filter": "mlp", "value": 0}]}, {"path": "b", "weight": 0}]
    config = validate(_ties(models=models) | {"method": method, "base_model": base})
    assert tensor_values(config, q_proj(0), 0.0)[0] == (1.0, 0.0)
    with pytest.raises(
        ConfigError, match=r"models\[\*\].weight, tensor '.*mlp.up_proj.weight': " + message
    ):
        tensor_values(config, up_proj(0), 0.0)


def test_ties_takes_weights_that_sum_to_zero_on_a_tensor_as_mergekit_does():
    models = [{"path": "a", "weight": [{"filter": "mlp", "value": 0}]}, {"path": "b", "weight": 0}]
    assert tensor_values(validate(_ties(models=models)), up_proj(0), 0.0)[0] == (0.0, 0.0)


BAD = [
    (
        {"density": {"gradient": [0.5, 1.5]}},
        r"params.density.gradient\[1\]: method 'ties', parameter 'density'=1.5: must be in "
        r"\(0, 1\]",
    ),
    (
        {"density": [{"filter": "mlp", "value": 0}]},
        r"params.density\[0\].value: method 'ties', parameter 'density'=0",
    ),
    ({"density": [{"filtr": "mlp", "value": 0.5}]}, r"params.density\[0\]: unknown field 'filtr'"),
    ({"density": [{"filter": "mlp"}]}, r"params.density\[0\].value: required"),
    ({"density": [{"filter": 3, "value": 0.5}]}, r"params.density\[0\].filter: must be text"),
    ({"density": {"gradient": []}}, r"params.density.gradient: must be a non-empty list"),
    ({"density": {"layers": [0.1]}}, r"params.density: a mapping here is \{'gradient'"),
    ({"density": {"gradient": [[0.1]]}}, r"params.density.gradient\[0\]: must be one value"),
    (
        {"lambda": [0.5, 1.0]},
        r"params.lambda: method 'ties' takes one value of 'lambda' for all models, not a list .*"
        r"'gradient'",
    ),
    ({"density": [0.5, 0.5, 0.5]}, r"params.density: 3 values for 2 models"),
    ({"density": [0.5, [0.1, 0.2]]}, r"params.density\[1\]: a list here is filter rules"),
]


@pytest.mark.parametrize("params, message", BAD)
def test_bad_settings_name_the_field(params, message):
    with pytest.raises(ConfigError, match=message):
        validate(_ties(params=params))


@pytest.mark.parametrize(
    "model, message",
    [
        (
            {"path": "a", "weight": [{"value": "x"}]},
            r"models\[0\].weight\[0\].value: must be a finite number",
        ),
        ({"path": "a", "weight": [0.1, 0.2]}, r"models\[0\].weight: a list here is filter rules"),
        (
            {"path": "a", "weight": {"gradient": [1, "x"]}},
            r"models\[0\].weight.gradient\[1\]: must be a finite number",
        ),
        (
            {"path": "a", "params": {"density": {"gradient": [0.0]}}},
            r"models\[0\].params.density.gradient\[0\]: method 'ties', parameter 'density'=0.0",
        ),
    ],
)
def test_bad_model_settings_name_the_model(model, message):
    with pytest.raises(ConfigError, match=message):
        validate(_ties(models=[model, {"path": "b"}]))


def test_resolution_survives_to_dict():
    raw = _ties(
        params={
            "density": [{"filter": "self_attn", "value": 0.5}, {"value": {"gradient": [0.2, 1.0]}}]
        },
        models=[
            {"path": "a", "weight": {"gradient": [2, 1]}},
            {"path": "b", "params": {"density": [{"filter": "k_proj", "value": 0.8}]}},
        ],
    )
    config = validate(raw)
    again = validate(json.loads(json.dumps(config.to_dict())))
    for name, position in [(q_proj(1), 0.5), (k_proj(0), 0.0), (up_proj(2), 1.0), (HEAD, 0.0)]:
        assert tensor_values(again, name, position) == tensor_values(config, name, position)


# The pipeline: every tensor merges with its own weights and parameters.

LAYERS = 3


def _layered_ties(tmp_path):
    """Two float32 models and a base of three layers, and a ties config whose density follows a
    gradient outside attention, and whose first model weighs 2 in the MLPs."""
    *models, base = make_models(tmp_path / "in", n=3, dtype=np.float32, num_layers=LAYERS)
    config = merge_config(
        models,
        tmp_path / "out",
        method="ties",
        base_model=str(base),
        dtype="float32",
        params={
            "density": [{"filter": "self_attn", "value": 0.5}, {"value": {"gradient": [0.2, 1.0]}}]
        },
    )
    config.models[0]["weight"] = [{"filter": "mlp", "value": 2.0}]
    return models, base, validate(config)


def _expected_settings(name):
    """The weights and density of one tensor, as the config of `_layered_ties` means them."""
    digits = [int(p) for p in name.split(".") if p.isdigit()]
    position = digits[0] / (LAYERS - 1) if digits else 0.0
    density = 0.5 if "self_attn" in name else 0.2 + 0.8 * position
    return [2.0 if "mlp" in name else 1.0, 1.0], density


def test_the_pipeline_merges_each_tensor_with_its_own_settings(tmp_path):
    models, base, config = _layered_ties(tmp_path)
    plan = pipeline.plan_merge(config)
    pipeline.run(plan)
    got = read_all(tmp_path / "out")
    trees, base_tree = [read_all(p) for p in models], read_all(base)
    assert len(got) == 3 + 12 * LAYERS
    for name, value in got.items():
        weights, density = _expected_settings(name)
        want = jkarcher.merge(
            [{name: t[name]} for t in trees],
            weights,
            method="ties",
            base={name: base_tree[name]},
            density=density,
        )[name]
        np.testing.assert_array_equal(value, np.asarray(want), err_msg=name)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "weight varying by tensor" in card and '"gradient"' in card


def test_leaves_are_grouped_and_compiled_per_distinct_parameters(tmp_path):
    _, _, config = _layered_ties(tmp_path)
    plan = pipeline.plan_merge(config)
    order = pipeline.execution_order(plan)
    signatures = [pipeline.leaf_signature(plan.method.name, t) for t in order]
    runs = [s for i, s in enumerate(signatures) if i == 0 or s != signatures[i - 1]]
    assert len(runs) == len(set(signatures))
    densities = {t.settings.params["density"] for t in plan.tasks}
    assert len(densities) == 1 + LAYERS  # attention's 0.5, and one value per layer elsewhere
    assert all(
        _expected_settings(t.name)[1] == pytest.approx(t.settings.params["density"])
        for t in plan.tasks
    )


def test_weights_that_vary_add_no_compilation(tmp_path):
    """Weights are arguments of the compiled leaf: a config whose weights vary by tensor
    compiles exactly the leaves of the same config with constant weights."""
    *models, base = make_models(tmp_path / "in", n=3, num_layers=2)

    def plan_with(weight):
        config = merge_config(models, tmp_path / "out", method="ties", base_model=str(base))
        config.models[1]["weight"] = weight
        return pipeline.plan_merge(validate(config))

    constant = plan_with(1.0)
    varying = plan_with([{"filter": "mlp", "value": 0.5}, {"value": {"gradient": [0.0, 3.0]}}])
    signatures = [
        {pipeline.leaf_signature(p.method.name, t) for t in p.tasks} for p in (constant, varying)
    ]
    assert signatures[0] == signatures[1]
    assert len({t.settings.weights for t in constant.tasks}) == 1
    assert len({t.settings.weights for t in varying.tasks}) > 2


def test_traced_parameters_that_vary_add_no_compilation(tmp_path):
    """mergekit's gradient-slerp: a `t` that varies by layer and filter compiles exactly the
    leaves of a constant `t`, and every tensor still merges with its own `t`."""
    a, b = make_models(tmp_path / "in", n=2, num_layers=LAYERS)

    def plan_with(t, output):
        config = merge_config([a, b], tmp_path / output, method="slerp", params={"t": t})
        return pipeline.plan_merge(validate(config))

    gradient = [
        {"filter": "self_attn", "value": {"gradient": [0.0, 0.5, 1.0]}},
        {"filter": "mlp", "value": {"gradient": [1.0, 0.3, 0.0]}},
        {"value": 0.5},
    ]
    constant, varying = plan_with(0.5, "constant"), plan_with(gradient, "varying")
    assert len({t.settings.params["t"] for t in varying.tasks}) == 4  # 0, 0.3, 0.5, 1
    signatures = [
        {pipeline.leaf_signature(p.method.name, t) for t in p.tasks} for p in (constant, varying)
    ]
    assert signatures[0] == signatures[1]
    pipeline.run(varying)
    got = read_all(tmp_path / "varying")
    models = [read_all(a), read_all(b)]
    for task in varying.tasks:
        t = task.settings.params["t"]
        want = jkarcher.merge([{"x": m[task.name]} for m in models], method="slerp", t=t)["x"]
        np.testing.assert_array_equal(got[task.name], np.asarray(want), err_msg=task.name)


def test_a_required_parameter_that_no_rule_gives_fails_before_writing(tmp_path):
    models = make_models(tmp_path / "in", n=2)
    config = merge_config(
        models,
        tmp_path / "out",
        method="slerp",
        params={"t": [{"filter": "self_attn", "value": 0.3}]},
    )
    with pytest.raises(
        ConfigError,
        match=r"params, tensor 'lm_head.weight': method 'slerp' needs "
        "parameter 't'",
    ):
        pipeline.plan_merge(validate(config))
    assert not (tmp_path / "out").exists()
