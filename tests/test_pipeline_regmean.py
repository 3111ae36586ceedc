"""RegMean merges of checkpoints on disk (`params.gram`): the pipeline equals
`jkarcher.merge(..., method="regmean", gram=...)` on bf16 checkpoints, on one device and on a
mesh, estimates the Grams a config asks for once, and bad Grams fail before an output appears."""

import numpy as np
import pytest
import safetensors.numpy
from helpers_checkpoints import assert_equal_trees, make_models, merge_config, read_all

import jkarcher
from jkarcher import grams, mergekit_yaml, pipeline
from jkarcher.config import ConfigError, validate
from jkarcher.io import CheckpointError
from jkarcher.merge import MergeError

EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Three bf16 tiny models (vocabulary of the test tokenizer) and a calibration text."""
    root = tmp_path_factory.mktemp("regmean")
    models = make_models(root / "in", n=3, vocab_sizes=[320] * 3)
    text = root / "calibration.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return models, text


@pytest.fixture(scope="module")
def estimated(checkpoints):
    """The three models with their Grams estimated on the text beside them."""
    models, text = checkpoints
    config = merge_config(models, text.parent / "unused", method="regmean")
    config.params = {"gram": _estimate(text)}
    pipeline.prepare_statistics(validate(config))
    return models


def _estimate(text):
    return {"text": str(text), "seq_len": 16, "batch_size": 2, "num_batches": 3}


def _merged_by_jkarcher(models, **params):
    """`jkarcher.merge` of the checkpoints' tensors with the Grams saved beside them."""
    trees = [read_all(m) for m in models]
    saved = [safetensors.numpy.load_file(m / grams.GRAMS_NAME) for m in models]
    gram = [{name: g.get(name) for name in tree} for tree, g in zip(trees, saved, strict=True)]
    return jkarcher.merge(trees, method="regmean", gram=gram, **params)


def _run(config):
    pipeline.prepare_statistics(config)
    pipeline.run(pipeline.plan_merge(config))


def test_regmean_of_checkpoints_equals_merge_and_the_grams_are_made_once(checkpoints, tmp_path):
    models, text = checkpoints
    fields = {"method": "regmean", "params": {"gram": _estimate(text), "alpha": 0.8}}
    config = validate(merge_config(models, tmp_path / "out", weights=[1.0, 2.0, 0.5], **fields))
    runs = pipeline.prepare_statistics(config)
    assert [r.path for r in runs] == [m / grams.GRAMS_NAME for m in models]
    assert all(r.batches == 3 and r.tokens > 0 for r in runs)
    stamps = [r.path.stat().st_mtime_ns for r in runs]
    assert pipeline.prepare_statistics(config) == []  # current: made by this text and settings
    assert [r.path.stat().st_mtime_ns for r in runs] == stamps
    pipeline.run(pipeline.plan_merge(config))
    want = _merged_by_jkarcher(models, weights=[1.0, 2.0, 0.5], alpha=0.8)
    written = read_all(tmp_path / "out")
    assert written["model.layers.0.mlp.down_proj.weight"].dtype == np.dtype("bfloat16")
    assert_equal_trees(written, want)
    # The linear layers were solved for, the rest averaged.
    average = jkarcher.merge([read_all(m) for m in models], [1.0, 2.0, 0.5], method="linear")
    for name in written:
        differs = not np.array_equal(written[name], np.asarray(average[name]))
        assert differs == name.endswith(("_proj.weight", "lm_head.weight")), name
    card = (tmp_path / "out" / "README.md").read_text()
    assert "with each model's input Grams (params.gram)" in card


def test_regmean_on_a_mesh_of_eight_devices_equals_one_device(checkpoints, tmp_path):
    models, text = checkpoints
    fields = {"method": "regmean", "dtype": "float32", "params": {"gram": _estimate(text)}}
    _run(validate(merge_config(models, tmp_path / "one", **fields)))
    _run(validate(merge_config(models, tmp_path / "eight", mesh="devices:8", **fields)))
    one, eight = read_all(tmp_path / "one"), read_all(tmp_path / "eight")
    shrunk = [
        {
            n: 0.6 * g + 0.4 * np.diag(np.diag(g))
            for n, g in safetensors.numpy.load_file(m / grams.GRAMS_NAME).items()
        }
        for m in models
    ]
    for name, value in eight.items():
        # The mesh splits each weight's rows: the same solve, its sums in another order, which
        # a condition number kappa turns into 4 n kappa eps of the largest value at most.
        kappa = np.linalg.cond(sum(g[name] for g in shrunk)) if name in shrunk[0] else 1.0
        bound = 4 * one[name].shape[-1] * kappa * EPS32 * np.max(np.abs(one[name]))
        np.testing.assert_allclose(value, one[name], atol=bound, rtol=0, err_msg=name)


def test_a_mergekit_yaml_runs_regmean_with_grams_beside_the_models(estimated, tmp_path):
    models = estimated
    document = tmp_path / "regmean.yml"
    document.write_text(
        "merge_method: regmean\nparameters:\n  gram: beside\n  alpha: 0.5\n"
        "models:\n" + "".join(f"  - model: {p}\n" for p in models) + "dtype: bfloat16\n"
    )
    translation = mergekit_yaml.load(document)
    config = validate(translation.fields | {"output": str(tmp_path / "out"), "mesh": "devices:1"})
    _run(config)
    assert_equal_trees(read_all(tmp_path / "out"), _merged_by_jkarcher(models, alpha=0.5))


def test_missing_or_misshapen_grams_fail_before_anything_is_written(estimated, tmp_path):
    models = estimated
    others = make_models(tmp_path / "others", n=1, vocab_sizes=[320])
    config = validate(
        merge_config(
            [*models[:2], *others], tmp_path / "out", method="regmean", params={"gram": "beside"}
        )
    )
    with pytest.raises(
        CheckpointError, match=r"params.gram, the Grams of model 2 .*no input Grams"
    ):
        pipeline.plan_merge(config)
    name = "model.layers.0.mlp.down_proj.weight"
    wrong = {n: g for n, g in safetensors.numpy.load_file(models[0] / grams.GRAMS_NAME).items()}
    wrong[name] = wrong[name][:4, :4]
    bad = tmp_path / "bad.safetensors"
    safetensors.numpy.save_file(wrong, bad)
    files = [str(bad), str(models[1]), str(models[2])]
    config = validate(
        merge_config(models, tmp_path / "out", method="regmean", params={"gram": files})
    )
    with pytest.raises(
        MergeError,
        match=rf"tensor '{name}' has shape .* its Gram in the Grams of "
        r"model 0 .*bad.safetensors\) has shape \[4, 4\]",
    ):
        pipeline.plan_merge(config)
    del wrong[name]
    safetensors.numpy.save_file(wrong, bad)
    with pytest.raises(MergeError, match=rf"tensor '{name}' has no Gram in the Grams of model 0"):
        pipeline.plan_merge(config)
    assert not (tmp_path / "out").exists()


def test_load_grams_gives_the_pytree_merge_takes(estimated):
    models = estimated
    tree = grams.load_grams(models[0])
    q = tree["model"]["layers_0"]["self_attn"]["q_proj"]
    assert q["weight"].shape == (16, 16) and q.get("bias") is None
    assert tree["model"]["embed_tokens"]["weight"] is None
    np.testing.assert_allclose(q["weight"], q["weight"].T, rtol=1e-6)
    eigenvalues = np.linalg.eigvalsh(np.asarray(q["weight"], np.float64))
    assert eigenvalues.min() > -16 * EPS32 * eigenvalues.max()  # positive semi-definite


def test_a_mergekit_yaml_by_slices_refuses_grams(tmp_path):
    models = make_models(tmp_path, n=2, num_layers=2)
    slices = "".join(
        f"  - sources:\n      - model: {models[0]}\n        layer_range: [{i}, {i + 1}]\n"
        f"      - model: {models[1]}\n        layer_range: [{i}, {i + 1}]\n"
        for i in range(2)
    )
    document = tmp_path / "slices.yml"
    document.write_text("merge_method: regmean\nparameters:\n  gram: beside\nslices:\n" + slices)
    with pytest.raises(ConfigError, match="parameters.gram: per-model statistics are not taken"):
        mergekit_yaml.load(document)
