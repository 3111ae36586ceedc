"""scripts/merge.py end to end: the demo config, command-line overrides, errors as exit codes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_checkpoints import make_models, read_all

ROOT = Path(__file__).resolve().parents[1]


def _merge_script(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "merge.py"), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _tiny_config_file(tmp_path, models):
    path = tmp_path / "tiny_config.py"
    path.write_text(
        "from jkarcher.config import base_config\n\n\n"
        "def get_config():\n"
        "    config = base_config()\n"
        f"    config.models = {[{'path': str(p), 'weight': 1.0} for p in models]!r}\n"
        f"    config.output = {str(tmp_path / 'out')!r}\n"
        "    return config\n"
    )
    return path


def test_demo_config_merges_the_builtin_example(tmp_path):
    demo = ROOT / "configs" / "demo.py"
    result = _merge_script("--config", demo, f"--config.output={tmp_path / 'o'}")
    assert result.returncode == 0, result.stderr
    assert "merged 27 tensors" in result.stdout and "GB/s" in result.stdout
    out = tmp_path / "o"
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    assert len(read_all(out)) == 27


@pytest.mark.slow
def test_fisher_demo_config_estimates_fishers_and_merges_with_them(tmp_path):
    config = ROOT / "configs" / "demo_fisher.py"
    result = _merge_script("--config", config, f"--config.output={tmp_path / 'o'}")
    assert result.returncode == 0, result.stderr
    assert "merged 27 tensors" in result.stdout
    experts = sorted((ROOT / "cache" / "demo").glob("*/expert-*"))
    assert len(experts) >= 3 and all((e / "fisher.safetensors").is_file() for e in experts)
    card = (tmp_path / "o" / "README.md").read_text()
    assert "with each model's diagonal Fisher" in card and "README.md" in card
    assert len(read_all(tmp_path / "o")) == 27


def test_overrides_reach_the_merge(tmp_path):
    models = make_models(tmp_path / "in", n=2)
    config = _tiny_config_file(tmp_path, models)
    result = _merge_script(
        "--config",
        config,
        "--config.method=linear",
        "--config.dtype=float32",
        "--config.out_shard_size=2000",
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert {a.dtype.name for a in read_all(out).values()} == {"float32"}
    card = (out / "README.md").read_text()
    assert json.loads(card.split("```json\n")[1].split("```")[0])["method"] == "linear"


def test_bad_config_exits_with_the_field_named(tmp_path):
    models = make_models(tmp_path / "in", n=2)
    config = _tiny_config_file(tmp_path, models)
    result = _merge_script("--config", config, "--config.method=nope")
    assert result.returncode == 1
    assert "error: method: unknown merge method 'nope'" in result.stderr
    assert not (tmp_path / "out").exists()
    result = _merge_script("--config", config, "--config.colour=blue")
    assert result.returncode != 0 and "colour" in result.stderr


def test_bad_input_exits_before_writing(tmp_path):
    models = make_models(tmp_path / "in", n=2)
    (models[1] / "model.safetensors").rename(models[1] / "pytorch_model.bin")
    result = _merge_script("--config", _tiny_config_file(tmp_path, models))
    assert result.returncode == 1
    assert "error: models[1]:" in result.stderr and "pickled" in result.stderr
    assert not (tmp_path / "out").exists()
