"""The installed commands: `jkarcher-yaml CONFIG OUT` with mergekit-yaml's options, and
`jkarcher-merge`; mergekit's conventions for what a run from a mergekit YAML writes
(mergekit_config.yml, shard sizes) and where a multimodal config keeps its layer count."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers_checkpoints import make_models, read_all

from jkarcher import pipeline
from jkarcher.architecture import layer_count
from jkarcher.config import validate
from jkarcher.pipeline.write import MERGEKIT_CONFIG_NAME

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _command(name, *args):
    return subprocess.run(
        [str(BIN / name), *map(str, args)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("models"), n=3, num_layers=2)


def _yaml(tmp_path, models, method="linear", base=None):
    path = tmp_path / "merge.yml"
    base_line = "" if base is None else f"base_model: {base}"
    path.write_text(
        textwrap.dedent(
            f"""\
            # three tiny models, one with a weight that varies over the layers
            models:
              - model: {models[0]}
                parameters:
                  weight: 1.0
              - model: {models[1]}
                parameters:
                  weight: [0.2, 1.0]
              - model: {models[2]}
                parameters:
                  weight: -0.25
            merge_method: {method}
            dtype: bfloat16
            {base_line}
            """
        )
    )
    return path


def test_the_yaml_command_merges_as_the_merge_command_does(tmp_path, models):
    config = _yaml(tmp_path, models)
    ours = _command("jkarcher-yaml", config, tmp_path / "a", "--random-seed", "3")
    assert ours.returncode == 0, ours.stderr
    other = _command(
        "jkarcher-merge", "--mergekit-yaml", config, f"--config.output={tmp_path / 'b'}"
    )
    assert other.returncode == 0, other.stderr
    a, b = read_all(tmp_path / "a"), read_all(tmp_path / "b")
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for output in ("a", "b"):
        written = tmp_path / output / MERGEKIT_CONFIG_NAME
        assert written.read_text() == config.read_text()
        card = (tmp_path / output / "README.md").read_text()
        assert "```yaml\n# three tiny models" in card
        assert "mergekit_config" not in card.split("```json")[1].split("```")[0]


def test_mergekit_yaml_options_set_the_run(tmp_path, models):
    config = _yaml(tmp_path, models)
    out = tmp_path / "out"
    options = ("--out-shard-size", "4K", "--no-copy-tokenizer", "--memory", "30kB")
    result = _command("jkarcher-yaml", config, out, *options)
    assert result.returncode == 0, result.stderr
    assert (
        "more tasks for blocks of rows" in result.stdout
        and "memory budget 0.00 GB" in result.stdout
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert len(read_all(out)) == len(read_all(models[0]))
    assert not (out / "tokenizer.json").exists()


def test_options_that_change_nothing_say_so(tmp_path, models):
    result = _command(
        "jkarcher-yaml",
        _yaml(tmp_path, models),
        tmp_path / "out",
        "--cuda",
        "--lazy-unpickle",
        "-j",
        "4",
        "--write-model-card",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    assert "--cuda: changes nothing, since jkarcher computes on JAX's default devices" in (
        result.stderr
    )
    assert "--lazy-unpickle: changes nothing" in result.stderr
    assert "--num-threads: changes nothing" in result.stderr
    assert "--write-model-card" not in result.stderr  # the default: nothing to say


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["missing.yml", "OUT"], "error: missing.yml: cannot read it"),
        (["CONFIG", "OUT", "--no-such-option"], "error: unrecognized arguments: --no-such-opt"),
        (["CONFIG"], "error: the following arguments are required: out_path"),
        (["KARCHER", "OUT"], "merge.yml: models[2].parameters.weight: method 'karcher' takes"),
        (["CONFIG", "OUT", "--out-shard-size", "5X"], "out_shard_size: cannot read '5X'"),
        (["CONFIG", "OUT", "--memory", "lots"], "memory: cannot read 'lots' as a size"),
        (["TIES", "OUT", "--memory", "20kB"], "a block of one row needs"),
    ],
)
def test_mistakes_are_one_line_before_anything_is_written(tmp_path, models, arguments, message):
    (tmp_path / "k").mkdir()
    (tmp_path / "t").mkdir()
    replace = {
        "CONFIG": _yaml(tmp_path, models),
        "KARCHER": _yaml(tmp_path / "k", models, method="karcher"),
        "TIES": _yaml(tmp_path / "t", models, method="ties", base=models[0]),
        "OUT": tmp_path / "out",
    }
    result = _command("jkarcher-yaml", *[replace.get(a, a) for a in arguments])
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_existing_directory_is_never_replaced(tmp_path, models):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = _command("jkarcher-yaml", _yaml(tmp_path, models), out, "--overwrite")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (out / "notes.txt").read_text() == "mine"


def test_the_merge_command_runs_the_builtin_example(tmp_path):
    result = _command(
        "jkarcher-merge", "--config", ROOT / "configs" / "demo.py", f"--config.output={tmp_path}/o"
    )
    assert result.returncode == 0, result.stderr
    assert "merged 27 tensors" in result.stdout
    assert not (tmp_path / "o" / MERGEKIT_CONFIG_NAME).exists()


@pytest.mark.parametrize(
    "config, count",
    [
        ({"num_hidden_layers": 4}, 4),
        ({"n_layer": 12}, 12),  # GPT-2
        ({"text_config": {"num_hidden_layers": 2}, "vision_config": {}}, 2),
        ({"hidden_size": 8}, None),
    ],
)
def test_the_layer_count_is_found_where_configs_state_it(config, count):
    assert layer_count(config) == count


def test_a_multimodal_config_keeps_its_layer_count_in_text_config(tmp_path):
    models = make_models(tmp_path / "in", n=2, num_layers=3)
    for model in models:
        path = model / "config.json"
        config = json.loads(path.read_text())
        text = {key: config.pop(key) for key in ("num_hidden_layers", "hidden_size")}
        path.write_text(json.dumps(config | {"text_config": text}))
    assert layer_count(json.loads((models[0] / "config.json").read_text())) == 3
    gradient = {"gradient": [0.0, 1.0]}
    config = validate(
        {
            "method": "linear",
            "models": [{"path": str(models[0]), "weight": gradient}, {"path": str(models[1])}],
            "output": str(tmp_path / "out"),
        }
    )
    plan = pipeline.plan_merge(config)
    weights = {t.name: t.settings.weights for t in plan.tasks}
    assert weights["model.layers.0.mlp.up_proj.weight"] == (0.0, 1.0)
    assert weights["model.layers.1.mlp.up_proj.weight"] == (0.5, 1.0)
    assert weights["model.layers.2.mlp.up_proj.weight"] == (1.0, 1.0)
