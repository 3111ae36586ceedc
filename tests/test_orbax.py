"""Orbax checkpoints: HF <-> Orbax round trips lose nothing, Orbax inputs and Orbax output give
the merge that safetensors ones give, and bad pytrees fail with the tensor or file named."""

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers_checkpoints import make_models, merge_config, read_all, tiny_config, write_tiny

from jkarcher import pipeline
from jkarcher.config import validate
from jkarcher.io import CheckpointError
from jkarcher.io.orbax_io import (
    PARAMS_DIR,
    OrbaxCheckpoint,
    hf_to_orbax,
    open_checkpoint,
    orbax_to_hf,
    save_params,
)
from jkarcher.io.output_dir import MANIFEST_NAME

ROOT = Path(__file__).resolve().parents[1]
UP_PROJ = "model.layers.0.mlp.up_proj.weight"


def _assert_identical(got: dict, want: dict):
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert got[name].tobytes() == value.tobytes(), name


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def _odd_tensors_model(tmp_path: Path) -> Path:
    """A tiny model in three safetensors shards, with an int64, a bool and a scalar tensor."""
    config = tiny_config()
    weights = read_all(make_models(tmp_path / "plain", n=1)[0])
    weights["model.position_ids"] = np.arange(8, dtype=np.int64)
    weights["model.mask"] = np.array([True, False, True])
    weights["model.scale"] = np.array(0.5, dtype=ml_dtypes.bfloat16)
    return write_tiny(tmp_path / "hf", weights, config, max_shard_bytes=3000)


def test_hf_to_orbax_and_back_loses_nothing(tmp_path):
    source = _odd_tensors_model(tmp_path)
    orbax_dir = hf_to_orbax(source, tmp_path / "orbax")
    assert sorted(p.name for p in orbax_dir.iterdir() if p.is_dir()) == [PARAMS_DIR]
    back = orbax_to_hf(orbax_dir, tmp_path / "back", max_shard_bytes=3000)
    _assert_identical(read_all(back), read_all(source))
    written = _files(back)
    assert json.loads(written.pop(MANIFEST_NAME))["written_by"] == "jkarcher"
    assert written == _files(source)


def test_orbax_params_use_the_flax_model_layout(tmp_path):
    source = make_models(tmp_path / "hf", n=1)[0]
    orbax_dir = hf_to_orbax(source, tmp_path / "orbax")
    params = ocp.StandardCheckpointer().restore(orbax_dir / PARAMS_DIR)
    up_proj = params["model"]["layers_0"]["mlp"]["up_proj"]["weight"]
    np.testing.assert_array_equal(np.asarray(up_proj), read_all(source)[UP_PROJ])
    assert open_checkpoint(orbax_dir).names() == open_checkpoint(source).names()


def test_convert_script_round_trip(tmp_path):
    source = make_models(tmp_path / "hf", n=1)[0]
    for args in (
        ["--source", source, "--output", tmp_path / "orbax", "--to=orbax"],
        ["--source", tmp_path / "orbax", "--output", tmp_path / "back", "--to=safetensors"],
    ):
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "convert.py"), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
    _assert_identical(read_all(tmp_path / "back"), read_all(source))


@pytest.mark.parametrize("mesh", ["devices:1", "devices:8"])
def test_orbax_inputs_and_output_merge_as_safetensors_do(tmp_path, mesh):
    hf = make_models(tmp_path / "hf", n=4, vocab_sizes=[64, 60, 64, 64])
    orbax = [hf_to_orbax(path, tmp_path / "orbax" / path.name) for path in hf]
    fields = dict(method="dare_ties", mesh=mesh)

    def merge(models, output, **more):
        config = merge_config(models[:3], output, base_model=str(models[3]), **fields, **more)
        pipeline.run(pipeline.plan_merge(validate(config)))
        return output

    want = read_all(merge(hf, tmp_path / "from-hf"))
    _assert_identical(read_all(merge(orbax, tmp_path / "from-orbax")), want)
    mixed = [orbax[0], hf[1], orbax[2], hf[3]]
    written = merge(mixed, tmp_path / "as-orbax", format="orbax")
    assert {"config.json", "README.md", "tokenizer.json"} <= set(_files(written))
    _assert_identical(read_all(orbax_to_hf(written, tmp_path / "back")), want)


def _save_bare(directory: Path, params) -> None:
    """A plain Orbax checkpoint of `params`, as JAX training code writes one."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory, params)


def test_a_bare_orbax_checkpoint_is_a_model(tmp_path):
    hf = make_models(tmp_path / "hf", n=2)
    tensors = read_all(hf[1])
    params = {"model": {"layers_0": {"mlp": {"up_proj": {"weight": tensors[UP_PROJ]}}}}}
    _save_bare(tmp_path / "bare", params)
    bare = OrbaxCheckpoint(tmp_path / "bare")
    assert bare.names() == [UP_PROJ] and bare.config == {}
    np.testing.assert_array_equal(bare.read(UP_PROJ), tensors[UP_PROJ])
    np.testing.assert_array_equal(bare.info(UP_PROJ).rows(2, 5).shape, (3, 16))


def test_orbax_errors_name_the_tensor_or_file(tmp_path):
    with pytest.raises(CheckpointError, match="tensor 'empty' has no elements"):
        save_params(tmp_path / "a", {"empty": np.zeros((0, 3), np.float32)})
    with pytest.raises(CheckpointError, match=r"tensor 'a\.\.b' cannot be written"):
        save_params(tmp_path / "b", {"a..b": np.ones(3, np.float32)})
    with pytest.raises(CheckpointError, match="'x.y' lies inside another tensor's path"):
        save_params(tmp_path / "c", {"x": np.ones(3, np.float32), "x.y": np.ones(3, np.float32)})
    _save_bare(tmp_path / "list", {"layers": [np.ones(3, np.float32)]})
    with pytest.raises(CheckpointError, match="list: holds a pytree that is not nested dicts"):
        OrbaxCheckpoint(tmp_path / "list")
    with pytest.raises(CheckpointError, match="has no tensor 'nope'"):
        OrbaxCheckpoint(hf_to_orbax(make_models(tmp_path / "hf", n=1)[0], tmp_path / "o")).info(
            "nope"
        )
