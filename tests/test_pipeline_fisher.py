"""Fisher-weighted merges of checkpoints on disk (`params.fisher`): the pipeline equals
`jkarcher.merge(..., fisher=...)`, estimates what a config asks to estimate, and every bad Fisher
fails before an output appears, naming the file, the tensor and the model."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from helpers_checkpoints import (
    assert_equal_trees,
    make_models,
    merge_checkpoints,
    merge_config,
    read_all,
    write_fisher,
)

import jkarcher
from jkarcher import pipeline
from jkarcher.config import ConfigError, validate
from jkarcher.io import CheckpointError
from jkarcher.merge import MergeError
from jkarcher.models.calibration import CalibrationError

ROOT = Path(__file__).resolve().parents[1]
EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def _expected(models, fishers, **kwargs):
    return jkarcher.merge([read_all(p) for p in models], fisher=fishers, **kwargs)


def test_fisher_karcher_from_files_and_directories_equals_merge(tmp_path):
    models = make_models(tmp_path, n=3)
    elsewhere = tmp_path / "fishers"
    (elsewhere / "second").mkdir(parents=True)
    fishers = [
        write_fisher(models[0], 0, elsewhere / "first.safetensors"),
        write_fisher(models[1], 1, elsewhere / "second" / "fisher.safetensors"),
        write_fisher(models[2], 2),
    ]
    files = [elsewhere / "first.safetensors", elsewhere / "second", models[2]]
    weights = [1.0, 2.0, 0.5]
    plan, _ = merge_checkpoints(
        models, tmp_path / "out", weights=weights, params={"fisher": list(map(str, files))}
    )
    want = _expected(models, fishers, weights=weights)
    assert_equal_trees(read_all(tmp_path / "out"), want)
    plain = jkarcher.merge([read_all(p) for p in models], weights)
    assert not np.array_equal(np.asarray(want[EMBED]), np.asarray(plain[EMBED]))
    source_bytes = sum(a.nbytes for m in models for a in read_all(m).values())
    assert plan.bytes_to_read == source_bytes + sum(a.nbytes for f in fishers for a in f.values())
    card = (tmp_path / "out" / "README.md").read_text()
    assert "first.safetensors" in card and "with each model's diagonal Fisher" in card


def test_fisher_merging_beside_the_models_on_a_mesh_equals_one_device(tmp_path):
    models = make_models(tmp_path, n=2, dtype=np.float32)
    fishers = [write_fisher(m, seed) for seed, m in enumerate(models)]
    fields = {"method": "fisher_merging", "dtype": "float32", "params": {"fisher": "beside"}}
    merge_checkpoints(models, tmp_path / "one", **fields)
    merge_checkpoints(models, tmp_path / "eight", mesh="devices:8", **fields)
    want = _expected(models, fishers, method="fisher_merging")
    assert_equal_trees(read_all(tmp_path / "one"), want)
    for name, value in read_all(tmp_path / "eight").items():
        np.testing.assert_allclose(value, np.asarray(want[name]), rtol=2e-6, err_msg=name)


def test_fisher_field_is_checked_against_the_method(tmp_path):
    models = [str(p) for p in make_models(tmp_path, n=2)]

    def check(match, **fields):
        with pytest.raises(ConfigError, match=match):
            validate(merge_config(models, tmp_path / "out", **fields))

    check(
        r"params.fisher: method 'fisher_merging' needs each model's diagonal Fisher",
        method="fisher_merging",
    )
    check(
        r"params.fisher: method 'linear' takes no diagonal Fisher; the methods that do are "
        r"fisher_merging, karcher",
        method="linear",
        params={"fisher": "beside"},
    )
    check(r"params.fisher: 1 paths for 2 models", params={"fisher": [models[0]]})
    check(r"params.fisher: unknown field 'steps'", params={"fisher": {"text": "t", "steps": 3}})
    check(r"params.fisher.text: required", params={"fisher": {"seq_len": 8}})
    check(
        r"params.fisher.estimator: must be one of true, empirical",
        params={"fisher": {"text": "t", "estimator": "exact"}},
    )
    check(
        r"params.fisher.seq_len: must be an integer >= 2",
        params={"fisher": {"text": "t", "seq_len": 1}},
    )
    check(r"params.fisher: must be 'beside'", params={"fisher": 3})
    resolved = validate(merge_config(models, tmp_path / "o", params={"fisher": {"text": "t"}}))
    assert resolved.to_dict()["params"]["fisher"] == {
        "text": "t",
        "estimator": "true",
        "seq_len": 256,
        "batch_size": 8,
        "num_batches": None,
        "seed": 0,
    }
    assert "fisher" not in resolved.params


def test_a_missing_fisher_fails_before_anything_is_written(tmp_path):
    models = make_models(tmp_path, n=2)
    write_fisher(models[0], 0)
    config = validate(merge_config(models, tmp_path / "out", params={"fisher": "beside"}))
    with pytest.raises(
        CheckpointError,
        match=r"the Fisher of model 1 \(.*model1\).*no Fisher "
        r"estimate; compute one with `python scripts/fisher.py",
    ):
        pipeline.plan_merge(config)
    assert not (tmp_path / "out").exists()


def test_a_fisher_of_another_model_fails_naming_tensor_file_and_model(tmp_path):
    models = make_models(tmp_path, n=2)
    (other,) = make_models(tmp_path / "other", n=1, vocab_sizes=[80])
    write_fisher(models[0], 0)
    write_fisher(other, 1, models[1] / "fisher.safetensors")
    config = validate(merge_config(models, tmp_path / "out", params={"fisher": "beside"}))
    with pytest.raises(
        MergeError,
        match=r"tensor 'lm_head.weight' has shape \[80, 16\] in the "
        r"Fisher of model 1 \(.*model1\) \(.*model1/fisher.safetensors\) but "
        r"\[64, 16\] in the model",
    ):
        pipeline.plan_merge(config)
    fisher_1 = write_fisher(models[1], 1)
    del fisher_1["model.norm.weight"]
    safetensors.numpy.save_file(fisher_1, models[1] / "fisher.safetensors")
    with pytest.raises(
        MergeError,
        match=r"tensor 'model.norm.weight' is missing from the Fisher "
        r"of model 1",
    ):
        pipeline.plan_merge(config)
    assert not (tmp_path / "out").exists()


def test_nan_in_a_fisher_fails_naming_it_and_leaves_no_output(tmp_path):
    models = make_models(tmp_path, n=3)
    for seed, model in enumerate(models):
        estimate = write_fisher(model, seed)
    estimate["model.norm.weight"][3] = np.nan
    safetensors.numpy.save_file(estimate, models[2] / "fisher.safetensors")
    with pytest.raises(
        MergeError,
        match=r"tensor 'model.norm.weight': the Fisher of model 2 "
        r"\(.*model2\) holds NaN or Inf values \(file .*model2/fisher.safetensors",
    ):
        merge_checkpoints(models, tmp_path / "out", params={"fisher": "beside"})
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model0", "model1", "model2"]


def test_a_text_the_models_tokenizer_overruns_fails_before_estimating(tmp_path):
    models = make_models(tmp_path, n=2)  # vocabulary 64, tokenizer of 320 tokens
    text = tmp_path / "calibration.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 4)
    estimate = {"fisher": {"text": str(text)}}
    config = validate(merge_config(models, tmp_path / "out", params=estimate))
    with pytest.raises(
        CalibrationError,
        match=r"calibration.txt: .*model0/tokenizer.json gives token "
        r"id \d+ on this text, but the model's vocab_size \(config.json\) is 64",
    ):
        pipeline.prepare_statistics(config)
    assert not (models[0] / "fisher.safetensors").exists()
    missing = validate(merge_config(models, tmp_path / "out", params={"fisher": {"text": "nope"}}))
    with pytest.raises(ConfigError, match=r"params.fisher.text: nope is not a file"):
        pipeline.prepare_statistics(missing)


def test_fishers_follow_vocabulary_trimming_and_tied_embeddings(tmp_path):
    models = make_models(tmp_path, n=2, vocab_sizes=[64, 72], ties=[False, True])
    for seed, model in enumerate(models):
        write_fisher(model, seed)
    plan = pipeline.plan_merge(
        validate(
            merge_config(models, tmp_path / "out", params={"fisher": "beside"}, allow_crimes=True)
        )
    )
    head = next(t for t in plan.tasks if t.name == HEAD)
    assert [f.name for f in head.statistics] == [HEAD, EMBED]  # model 1 ties: its embedding's
    assert [f.shape for f in head.statistics] == [s.shape for s in head.sources] == [(64, 16)] * 2
    assert all(f.file.name == "fisher.safetensors" for t in plan.tasks for f in t.statistics)


@pytest.mark.slow
def test_fishers_estimated_on_a_text_are_made_once_and_merged(tmp_path):
    models = make_models(tmp_path / "in", n=2, vocab_sizes=[320, 320])  # the tokenizer's
    text = tmp_path / "calibration.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    estimate = {"text": str(text), "seq_len": 16, "batch_size": 2, "num_batches": 2}
    config = validate(merge_config(models, tmp_path / "out", params={"fisher": estimate}))
    runs = pipeline.prepare_statistics(config)
    assert [r.path for r in runs] == [m / "fisher.safetensors" for m in models]
    assert all(r.batches == 2 and r.tokens > 0 for r in runs)
    stamps = [r.path.stat().st_mtime_ns for r in runs]
    assert pipeline.prepare_statistics(config) == []  # current: made by this text and settings
    assert [r.path.stat().st_mtime_ns for r in runs] == stamps
    reseeded = validate(
        merge_config(models, tmp_path / "out", params={"fisher": estimate | {"seed": 1}})
    )
    assert len(pipeline.prepare_statistics(reseeded)) == 2

    config_file = tmp_path / "fisher_config.py"
    config_file.write_text(
        "from jkarcher.config import base_config\n\n\n"
        "def get_config():\n"
        "    config = base_config()\n"
        f"    config.models = {[{'path': str(p)} for p in models]!r}\n"
        f"    config.output = {str(tmp_path / 'out')!r}\n"
        "    config.method = 'fisher_merging'\n"
        f"    config.params.fisher = {estimate!r}\n"
        "    return config\n"
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "merge.py"), "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("true Fisher over") == 2  # seed 0 again: both made anew
    fishers = [safetensors.numpy.load_file(m / "fisher.safetensors") for m in models]
    want = _expected(models, fishers, method="fisher_merging")
    assert_equal_trees(read_all(tmp_path / "out"), want)
    card = json.dumps((tmp_path / "out" / "README.md").read_text())
    assert "calibration.txt" in card
