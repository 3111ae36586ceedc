"""Where each output tensor comes from: one planner for plain merges and merges by slices
(`jkarcher.pipeline.inputs`, `jkarcher.pipeline.routes`), each output tensor's sources and its
position along the layers, on checkpoints whose tensors are only names."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from jkarcher.config import ConfigError, validate
from jkarcher.errors import MergeError
from jkarcher.pipeline.inputs import open_inputs
from jkarcher.pipeline.routes import plan_routes

# Outside the layers: before them, and after them.
EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def up_proj(layer, part="mlp.up_proj"):
    """A tensor of layer `layer`: a dense MLP's, or (part="mlp.experts.0.up_proj") an expert's."""
    return f"model.layers.{layer}.{part}.weight"


def expert(layer):
    return up_proj(layer, "mlp.experts.0.up_proj")


def _checkpoint(path, names, num_layers=None):
    """A checkpoint holding a [2, 2] tensor for each name, and a config.json stating the layer
    count (none when num_layers is None)."""
    path.mkdir(parents=True)
    save_file({n: np.ones((2, 2), np.float32) for n in names}, str(path / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    if num_layers is not None:
        config["num_hidden_layers"] = num_layers
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def _routes(raw):
    config = validate(raw)
    inputs = open_inputs(config)
    routes, _ = plan_routes(inputs, tie=False)
    return inputs, {route.name: route for route in routes}


def _plain(tmp_path, names, num_layers, **fields):
    models = [_checkpoint(tmp_path / f"m{i}", names, num_layers) for i in range(2)]
    raw = {"method": "linear", "models": [{"path": m} for m in models], "output": "out"}
    return _routes(raw | fields)


@pytest.mark.parametrize(
    "name, num_layers, position",
    [
        (up_proj(0), 5, 0.0),
        (up_proj(2), 5, 0.5),
        ("model.layers.4.self_attn.q_proj.bias", 5, 1.0),
        ("transformer.h.3.attn.c_attn.weight", 4, 1.0),
        (up_proj(0), 1, 1.0),  # a single layer sits at the end, as in mergekit
        (EMBED, 5, 0.0),
        (NORM, 5, 0.0),
        (HEAD, 5, 0.0),  # outside the layers, even after the last one
        (up_proj(5), 5, 0.0),  # numbered past the layers: outside them
    ],
)
def test_a_plain_merge_reads_each_tensor_from_itself_at_its_layers_position(
    tmp_path, name, num_layers, position
):
    _, routes = _plain(tmp_path, [name, NORM], num_layers)
    assert set(routes) == {name, NORM}
    assert routes[name].position == position
    assert routes[name].sources == ((0, name), (1, name))


def test_values_over_the_layers_need_a_layer_count_and_filters_do_not(tmp_path):
    names = [up_proj(0), NORM]
    models = [_checkpoint(tmp_path / f"m{i}", names) for i in range(3)]
    raw = {
        "method": "task_arithmetic",
        "models": [{"path": m} for m in models[:2]],
        "base_model": models[2],
        "output": "o",
    }
    filtered = {"lambda": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]}
    _, routes = _routes(raw | {"params": filtered})
    assert set(routes) == set(names)
    with pytest.raises(ConfigError, match="layer count: .* states no num_hidden_layers"):
        _routes(raw | {"params": {"lambda": {"gradient": [0.5, 1.0]}}})


def test_a_frankenmerge_stacks_each_slices_layers_with_their_own_tensors(tmp_path):
    """Layer 0 is dense and layer 1 holds experts (as DeepSeek-V3's first layers are dense):
    each output layer has the tensors of the layer it comes from."""
    names = [EMBED, up_proj(0), expert(1), NORM, HEAD]
    a = _checkpoint(tmp_path / "a", names, 2)
    b = _checkpoint(tmp_path / "b", names, 2)
    slices = [
        {"models": [{"path": a, "layer_range": [0, 2]}]},
        {"models": [{"path": b, "layer_range": [1, 2]}]},
    ]
    inputs, routes = _routes({"method": "passthrough", "slices": slices, "output": "out"})
    assert sorted(routes) == sorted([EMBED, up_proj(0), expert(1), expert(2), NORM, HEAD])
    assert routes[up_proj(0)].sources == ((0, up_proj(0)),)
    assert routes[expert(1)].position == 1.0
    assert routes[expert(2)].sources == ((1, expert(1)),)
    assert routes[expert(2)].position == 1.0  # the one layer of its slice
    assert routes[EMBED].sources == ((0, EMBED),)  # before the layers: the first slice
    assert routes[NORM].sources == ((1, NORM),)  # after the layers: the last slice
    assert inputs.config_updates["num_hidden_layers"] == 3


def test_an_input_must_hold_what_is_read_from_it_and_nothing_more(tmp_path):
    names = [up_proj(0), up_proj(1), NORM]
    with pytest.raises(MergeError, match=r"'model.layers.1.mlp.up_proj.weight' is missing from "):
        a = _checkpoint(tmp_path / "a", names, 2)
        b = _checkpoint(tmp_path / "b", names[:1] + names[2:], 2)
        _routes({"method": "linear", "models": [{"path": a}, {"path": b}], "output": "o"})
    c = _checkpoint(tmp_path / "c", [*names, "model.rotary.inv_freq"], 2)
    with pytest.raises(MergeError, match=r"'model.rotary.inv_freq' of model 1 .* is not in"):
        _routes({"method": "linear", "models": [{"path": a}, {"path": c}], "output": "o"})
    # In a merge by slices, the layers an input does not give are not its business.
    slices = [{"models": [{"path": a, "layer_range": [0, 1]}, {"path": c, "layer_range": [1, 2]}]}]
    with pytest.raises(MergeError, match=r"'model.rotary.inv_freq' of slices\[0\].models\[1\]"):
        _routes({"method": "linear", "slices": slices, "output": "o"})
    d = _checkpoint(tmp_path / "d", [*names, up_proj(2)], 3)
    slices = [{"models": [{"path": a, "layer_range": [0, 2]}, {"path": d, "layer_range": [1, 3]}]}]
    _, routes = _routes({"method": "linear", "slices": slices, "output": "o"})
    assert routes[up_proj(1)].sources == ((0, up_proj(1)), (1, up_proj(2)))
