"""The config schema: defaults, validation errors that name the field, the shipped config files."""

import importlib.util
import shutil
from pathlib import Path

import pytest

from jkarcher import demo, methods
from jkarcher.config import ConfigError, base_config, parse_size, validate
from jkarcher.methods.registry import REQUIRED, MergeMethod, Param, positive

ROOT = Path(__file__).resolve().parents[1]


def _config(**fields):
    config = base_config()
    config.models = [{"path": "a"}, {"path": "b", "weight": 2}]
    config.output = "out"
    for name, value in fields.items():
        setattr(config, name, value)
    return config


def _per_model_method(monkeypatch):
    """Make, for one test, a method with a per-model parameter (and one without default) that
    `methods.get` finds by its name."""
    method = MergeMethod(
        name="per_model_probe",
        leaf=lambda stacked, weights, base=None, *, key=None, scale=1.0, needed=None: stacked[0],
        params=(
            Param("scale", 1.0, "per-model scale", per_model=True, check=positive),
            Param("needed", REQUIRED, "a value without default", per_model=True, check=positive),
        ),
    )
    registered = methods.get
    monkeypatch.setattr(
        methods, "get", lambda name: method if name == method.name else registered(name)
    )
    return method


def test_defaults_are_filled_and_resolved():
    config = validate(_config())
    assert config.method == "karcher" and config.dtype == "bfloat16"
    assert config.weights == (1.0, 2.0)
    assert config.params == methods.get("karcher").resolve({}, 2, False)
    assert config.out_shard_size == 5 * 10**9
    assert (config.seed, config.copy_tokenizer, config.overwrite) == (0, True, False)
    assert config.base_model is None and config.output == Path("out")


def test_plain_dicts_are_accepted_and_to_dict_round_trips():
    raw = {"method": "linear", "models": [{"path": "a"}], "output": "o", "params": {}}
    config = validate(raw)
    assert validate(config.to_dict()) == config


def test_method_params_go_through_the_registry():
    config = validate(_config(params={"max_iter": 7, "block": "row"}))
    assert config.params["max_iter"] == 7 and config.params["block"] == "row"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"colour": "blue"}, "unknown field 'colour'"),
        ({"method": "nope"}, "method: unknown merge method 'nope'"),
        ({"method": "regmean"}, "params.gram: method 'regmean' needs each model's input Grams"),
        ({"params": {"nope": 1}}, "params: method 'karcher' has no parameter 'nope'"),
        ({"params": {"max_iter": 0}}, "params: method 'karcher', parameter 'max_iter'=0"),
        ({"models": []}, "models: must be a non-empty list"),
        ({"models": [{"weight": 1.0}]}, r"models\[0\].path: required"),
        ({"models": [{"path": "a", "w": 1}]}, r"models\[0\]: unknown field 'w'"),
        ({"models": [{"path": "a", "weight": "1"}]}, r"models\[0\].weight: must be a finite"),
        (
            {"models": [{"path": "a", "weight": -1.0}]},
            r"models\[0\].weight: method 'karcher' takes weights >= 0, since the Karcher mean",
        ),
        (
            {"models": [{"path": "a", "weight": 0}, {"path": "b", "weight": 0.0}]},
            r"models\[\*\].weight: the weights sum to zero",
        ),
        (
            {"models": [{"path": "a", "params": {"tol": 1e-3}}]},
            r"models\[\*\].params.tol: method 'karcher' takes one value",
        ),
        ({"method": "linear", "base_model": "base"}, "base_model: method 'linear' takes no base"),
        ({"dtype": "int8"}, "dtype: must be one of bfloat16, float16, float32"),
        ({"output": None}, "output: required"),
        ({"out_shard_size": "lots"}, "out_shard_size: cannot read 'lots'"),
        ({"out_shard_size": 0}, "out_shard_size: must be positive"),
        ({"seed": -1}, "seed: must be an integer >= 0"),
        ({"copy_tokenizer": "yes"}, "copy_tokenizer: must be True or False"),
        ({"overwrite": 1}, "overwrite: must be True or False"),
    ],
)
def test_bad_values_name_the_field(fields, message):
    raw = _config().to_dict() | fields
    with pytest.raises(ConfigError, match=message):
        validate(raw)


def test_unknown_field_is_rejected_by_the_config_dict_too():
    config = _config()
    config.extra = 1
    with pytest.raises(ConfigError, match="unknown field 'extra'"):
        validate(config)


@pytest.mark.parametrize(
    "text, size",
    [
        ("5GB", 5 * 10**9),
        ("500MB", 5 * 10**8),
        ("2GiB", 2**31),
        ("1.5g", 15 * 10**8),
        ("100", 100),
        (123, 123),
        ("64 KiB", 65536),
        ("5B", 5 * 10**9),
        ("2b", 2 * 10**9),
        ("500M", 5 * 10**8),
        ("1000K", 10**6),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text, "out_shard_size") == size


@pytest.mark.parametrize("text", ["5B", "1B", "500M", "1000K", "123", "2b", "750m"])
def test_mergekits_shard_sizes_mean_what_they_mean_in_mergekit(text):
    common = pytest.importorskip("mergekit.common", reason="mergekit is not installed")
    assert parse_size(text, "out_shard_size") == common.parse_kmb(text)


def test_per_model_params_override_the_shared_value(monkeypatch):
    _per_model_method(monkeypatch)
    raw = _config(method="per_model_probe", params={"scale": 0.5, "needed": 3.0}).to_dict()
    raw["models"][1]["params"] = {"scale": 2.0}
    config = validate(raw)
    assert config.params == {"scale": (0.5, 2.0), "needed": 3.0}


def test_per_model_params_errors_name_the_model(monkeypatch):
    _per_model_method(monkeypatch)
    raw = _config(method="per_model_probe").to_dict()
    raw["models"][1]["params"] = {"needed": 2.0}
    with pytest.raises(ConfigError, match=r"models\[0\].params.needed: required"):
        validate(raw)
    raw["models"][0]["params"] = {"needed": -2.0}
    with pytest.raises(ConfigError, match=r"params: .*'needed'=-2.0: must be a number > 0"):
        validate(raw)


def _load_config_file(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_qwen14b_config_is_the_papers_pool():
    config = validate(_load_config_file("qwen14b"))
    assert config.method == "karcher" and config.dtype == "bfloat16"
    assert len(config.models) == 11 and set(config.weights) == {1.0}
    assert config.models[0].path == "Qwen/Qwen2.5-14B"
    assert "prithivMLmods/Galactic-Qwen-14B-Exp2" in [m.path for m in config.models]


def test_qwen05b_pair_config():
    config = validate(_load_config_file("qwen05b_pair"))
    assert [m.path for m in config.models] == ["Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct"]


def test_demo_config_names_the_demo_models_and_writes_nothing(tmp_path):
    """Reading configs/demo.py only names the demo experts; a copy of it in an empty tree finds
    its models under that tree's cache/demo and leaves the tree empty."""
    config = validate(_load_config_file("demo"))
    expected = demo.demo_models(ROOT / "cache" / "demo")
    assert [m.path for m in config.models] == [str(p) for p in expected]
    assert config.output == Path("demo_out") and config.overwrite
    (tmp_path / "configs").mkdir()
    for name in ("demo", "demo_fisher"):
        copy = tmp_path / "configs" / f"{name}.py"
        shutil.copy(ROOT / "configs" / f"{name}.py", copy)
        spec = importlib.util.spec_from_file_location(f"copied_{name}", copy)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        paths = [m["path"] for m in module.get_config().models]
        assert paths == [str(p) for p in demo.demo_models(tmp_path / "cache" / "demo")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs"]


def test_missing_demo_models_are_made_for_the_paths_that_name_them(tmp_path):
    a, b, c = demo.demo_models(tmp_path / "cache", seed=3)
    other = tmp_path / "other" / "expert-a"
    assert demo.make_missing_demo_models([None, str(other), "org/model"]) == []
    assert not other.exists() and not (tmp_path / "cache").exists()
    assert demo.make_missing_demo_models([str(b), c]) == [a, b, c]
    assert all((p / "model.safetensors").is_file() for p in (a, b, c))
    (a / "mine.txt").write_text("kept")
    assert demo.make_missing_demo_models([a, b]) == []
    assert (a / "mine.txt").read_text() == "kept"
    assert demo.ensure_demo_models(tmp_path / "cache", seed=3) == [a, b, c]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [a.parent.name]
