"""The checkpoint pipeline on what users have: bf16 sources rounded once to the output dtype,
models whose architectures differ, results that are not finite, disks that are full or cannot
be written. Every refusal leaves the user's files as they were."""

import errno

import ml_dtypes
import numpy as np
import pytest
from helpers_checkpoints import make_models, merge_checkpoints, read_all, tiny_config, write_tiny
from karcher_reference import karcher_reference, relative_error

from jkarcher import demo
from jkarcher.config import ConfigError, validate
from jkarcher.io import output_dir, writer
from jkarcher.io.output_dir import OutputError
from jkarcher.merge import MergeError

F32_EPS = float(np.finfo(np.float32).eps)
BF16 = np.dtype(ml_dtypes.bfloat16)


def _bf16_representable(values: np.ndarray) -> float:
    """The fraction of float32 values that bfloat16 holds exactly."""
    return float(np.mean(values.astype(BF16).astype(np.float32) == values))


def _no_output(tmp_path, name="out"):
    return not (tmp_path / name).exists() and not list(tmp_path.glob(f".{name}*"))


def test_bfloat16_sources_merged_to_float32_carry_float32_precision(tmp_path):
    """Linear: each entry within (N + 2) eps of sum_i w_i |x_i| / sum_i w_i of the float64
    value (N products and sums, one division, the one rounding to float32); Karcher: relative
    error within the stopping tolerance (1e-6 rad of tangent norm) plus float32 rounding."""
    models = make_models(tmp_path / "in", n=3)
    weights = [1.0, 0.5, 2.0]
    sources = [read_all(p) for p in models]
    merge_checkpoints(
        models, tmp_path / "linear", weights=weights, method="linear", dtype="float32"
    )
    merge_checkpoints(models, tmp_path / "karcher", weights=weights, dtype="float32")
    w = np.asarray(weights)
    for name, got in read_all(tmp_path / "linear").items():
        stacked = np.stack([s[name].astype(np.float64) for s in sources])
        want = np.tensordot(w, stacked, 1) / w.sum()
        bound = (len(w) + 2) * F32_EPS * np.tensordot(w, np.abs(stacked), 1) / w.sum()
        assert got.dtype == np.float32
        assert np.all(np.abs(got - want) <= bound), name
        if got.size >= 64:
            assert _bf16_representable(got) < 0.1, name
    for name, got in read_all(tmp_path / "karcher").items():
        stacked = np.stack([s[name].astype(np.float64) for s in sources])
        assert relative_error(got, karcher_reference(stacked, w)) <= 1e-6 + 16 * F32_EPS, name
        if got.size >= 64:
            assert _bf16_representable(got) < 0.1, name


def test_bfloat16_sources_merged_to_float16_are_rounded_once(tmp_path):
    """The float32 result rounded to float16 is the float64 mean rounded to float16, except
    where the two lie within float32 error of a float16 rounding boundary (then one ulp off)."""
    models = make_models(tmp_path / "in", n=2)
    sources = [read_all(p) for p in models]
    merge_checkpoints(models, tmp_path / "out", method="linear", dtype="float16")
    for name, got in read_all(tmp_path / "out").items():
        want = (sources[0][name].astype(np.float64) + sources[1][name].astype(np.float64)) / 2
        rounded = want.astype(np.float16)
        assert got.dtype == np.float16
        assert np.mean(got == rounded) >= 0.99, name
        ulp = np.spacing(np.abs(rounded).astype(np.float16)).astype(np.float64)
        assert np.all(np.abs(got.astype(np.float64) - rounded) <= ulp), name


def _with_config(root, name, **changes):
    config = tiny_config() | changes
    weights = demo.random_weights(config, np.random.default_rng(len(name)), BF16)
    return write_tiny(root / name, weights, config)


@pytest.mark.parametrize(
    "changes, listed",
    [
        ({"hidden_act": "gelu"}, "hidden_act: model 0 .* 'silu', model 1 .* 'gelu'"),
        ({"rope_theta": 1e6}, "rope_theta: model 0 .* 10000.0, model 1 .* 1000000.0"),
        ({"rms_norm_eps": 1e-5}, "rms_norm_eps"),
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "architectures: .*"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling: model 0 .* None"),
        (
            {"text_config": {"hidden_size": 8}},
            "text_config.hidden_size: model 0 .* 16, model 1 .* 8",
        ),
    ],
)
def test_architectures_that_differ_are_refused_unless_allowed(tmp_path, changes, listed):
    first = _with_config(tmp_path, "first")
    second = _with_config(tmp_path, "second", **changes)
    if "text_config" in changes:
        first = _with_config(tmp_path, "first-mm", text_config={"hidden_size": 16})
    with pytest.raises(MergeError, match=f"architectures differ \\(.*{listed}.*allow_crimes=True"):
        merge_checkpoints([first, second], tmp_path / "out")
    assert _no_output(tmp_path)
    plan, _ = merge_checkpoints([first, second], tmp_path / "out", allow_crimes=True)
    assert any(
        w.startswith("allow_crimes: merging models whose architectures") for w in plan.warnings
    )


def test_vocabulary_sizes_are_not_an_architecture(tmp_path):
    models = make_models(tmp_path / "in", n=2, vocab_sizes=[64, 72])
    plan, _ = merge_checkpoints(models, tmp_path / "out")
    assert not any("allow_crimes" in w for w in plan.warnings)


def test_a_merge_that_overflows_the_output_dtype_is_an_error_naming_it(tmp_path):
    models = make_models(tmp_path / "in", n=2)
    with pytest.raises(
        MergeError,
        match=r"tensor '.*': method task_arithmetic \(lambda=100000000.0, normalize=False; "
        r"weights 1\) gives NaN or Inf values in the output dtype float16",
    ):
        merge_checkpoints(
            models[1:],
            tmp_path / "out",
            method="task_arithmetic",
            base_model=str(models[0]),
            params={"lambda": 1e8},
            dtype="float16",
        )
    assert _no_output(tmp_path)


def test_weights_beyond_float32_are_a_config_error(tmp_path):
    models = make_models(tmp_path / "in", n=2)
    with pytest.raises(ConfigError, match=r"models\[\*\].weight: weight of model 0 is 1e\+39"):
        merge_checkpoints(models, tmp_path / "out", weights=[1e39, 1.0])
    with pytest.raises(ConfigError, match=r"the weights sum to 6e\+38"):
        merge_checkpoints(models, tmp_path / "out", weights=[3e38, 3e38])


def test_a_full_disk_is_found_before_any_work(tmp_path, monkeypatch):
    models = make_models(tmp_path / "in", n=2)
    usage = type("usage", (), {"free": 10})
    monkeypatch.setattr(output_dir.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(OutputError, match="not enough free space for output"):
        merge_checkpoints(models, tmp_path / "out")
    assert _no_output(tmp_path)


def test_a_disk_that_fills_during_the_merge_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    models = make_models(tmp_path / "in", n=2)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.os, "pwrite", full)
    with pytest.raises(OutputError, match="writing output .* failed: No space left on device"):
        merge_checkpoints(models, tmp_path / "out")
    assert _no_output(tmp_path)


def test_a_read_only_place_is_refused_before_any_work(tmp_path, monkeypatch):
    models = make_models(tmp_path / "in", n=2)
    monkeypatch.setattr(output_dir.os, "access", lambda path, mode: False)
    with pytest.raises(OutputError, match="cannot write in"):
        merge_checkpoints(models, tmp_path / "out")
    assert _no_output(tmp_path)


def test_overwrite_replaces_an_earlier_merge_and_never_a_users_directory(tmp_path):
    models = make_models(tmp_path / "in", n=2)
    merge_checkpoints(models, tmp_path / "out", method="linear")
    merge_checkpoints(models, tmp_path / "out", overwrite=True)
    assert "karcher" in (tmp_path / "out" / "README.md").read_text()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match=r"not a jkarcher output \(it holds thesis.tex\)"):
        merge_checkpoints(models, mine, overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_the_working_directory_is_never_an_output(tmp_path, monkeypatch):
    models = make_models(tmp_path / "in", n=2)
    work = tmp_path / "home" / "work"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("keep")
    monkeypatch.chdir(work)
    with pytest.raises(OutputError, match="is the working directory"):
        merge_checkpoints(models, ".", overwrite=True)
    with pytest.raises(OutputError, match="is a parent of the working directory"):
        merge_checkpoints(models, "..", overwrite=True)
    assert [p.name for p in work.iterdir()] == ["notes.txt"]


def test_an_output_config_with_a_bad_value_names_the_field():
    with pytest.raises(ConfigError, match="allow_crimes: must be True or False"):
        validate(
            {"method": "linear", "models": [{"path": "a"}], "output": "o", "allow_crimes": "yes"}
        )
