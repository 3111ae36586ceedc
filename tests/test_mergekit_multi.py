"""Multi-stage mergekit YAML files, as mergekit-multi runs them: the stages' order, their
outputs and translations, the errors that name the document and the field, the reuse of
finished intermediates, and merges through `jkarcher-yaml` and `jkarcher-merge` equal to those
of `mergekit-multi` itself and of the stages run one by one.

The comparison with mergekit runs where it is installed, and always in CI (CI=true), where a
missing mergekit fails it.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers_checkpoints import make_models, read_all

from jkarcher import mergekit_yaml, pipeline
from jkarcher.config import ConfigError, validate
from jkarcher.io.output_dir import MANIFEST_NAME
from jkarcher.mergekit_yaml import multi
from jkarcher.pipeline.write import MERGEKIT_CONFIG_NAME

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAYERS = 2
# Each stage computes in float32 with a few roundings per value (two products, a sum, a division
# or slerp's trigonometry), and slerp is 1-Lipschitz in its ends: the three stages of two models
# differ from mergekit's by a few float32 ulps of the tensor's largest value.
ULPS = 8


def _stages(text, work="work", output="out", layers=LAYERS):
    documents = list(yaml.safe_load_all(textwrap.dedent(text)))
    return multi.plan_stages(documents, work, output, layer_count=lambda model: layers)


def _linear(name, *models):
    entries = "".join(f"\n  - model: {m}" for m in models)
    return f"name: {name}\nmerge_method: linear\nmodels:{entries}\n"


# The stages: order, outputs, translation.


def test_stages_run_after_the_stages_they_use_and_the_final_one_writes_the_output():
    stages = _stages(
        "---\n".join(
            [_linear("final", "b", "a+adapter"), _linear("b", "a", "m2"), _linear("a", "m0", "m1")]
        )
    )
    assert [s.name for s in stages] == ["a", "b", "final"]
    assert [s.output for s in stages] == [os.path.join("work", "a"), "work/b", "out"]
    assert [s.uses for s in stages] == [(), ("a",), ("b", "a")]
    assert stages[2].fields["models"] == [{"path": "work/b"}, {"path": "work/a", "lora": "adapter"}]
    config = yaml.safe_load(stages[2].fields["mergekit_config"])
    assert config == {
        "merge_method": "linear",
        "models": [{"model": "work/b"}, {"model": "work/a+adapter"}],
    }


def test_the_document_without_a_name_is_the_final_merge_and_runs_last():
    """As in mergekit-multi: the unnamed document writes the output; every named one is a stage
    in the work directory, used or not."""
    unnamed = "merge_method: linear\nmodels: [{model: a}, {model: m2}]\n"
    stages = _stages("---\n".join([_linear("a", "m0", "m1"), unnamed, _linear("b", "m1", "m2")]))
    assert [s.name for s in stages] == ["a", "b", None]
    assert [s.output for s in stages] == [os.path.join("work", "a"), "work/b", "out"]
    assert stages[2].fields["models"] == [{"path": "work/a"}, {"path": "m2"}]


def test_independent_stages_keep_the_order_of_the_file():
    text = "---\n".join(
        [_linear("x", "m0", "m1"), _linear("y", "m1", "m2"), _linear("z", "x", "y")]
    )
    assert [s.name for s in _stages(text)] == ["x", "y", "z"]


def test_every_model_field_may_name_a_stage():
    stages = _stages(
        """\
        name: a
        merge_method: linear
        models: [{model: m0}, {model: m1}]
        ---
        name: b
        merge_method: slerp
        base_model: a
        tokenizer_source: a
        slices:
          - sources:
              - {model: a, layer_range: [0, 2]}
              - {model: m2, layer_range: [0, 2]}
            base_model: a
        parameters: {t: 0.5}
        """
    )
    final = stages[1]
    assert final.uses == ("a",)
    assert yaml.safe_load(final.fields["mergekit_config"])["tokenizer_source"] == "work/a"
    assert [m["path"] for m in final.fields["models"]] == ["work/a", "m2"]


def test_a_stage_output_has_the_layers_of_its_slices():
    """A stage merged from slices has the sum of their lengths, which the layer ranges of a
    stage that uses it are checked against."""
    stacked = """\
        name: stacked
        merge_method: passthrough
        slices:
          - sources: [{model: m0, layer_range: [0, 2]}]
          - sources: [{model: m1, layer_range: [0, 2]}]
        ---
        name: top
        merge_method: passthrough
        slices:
          - sources: [{model: stacked, layer_range: [START, END]}]
        """
    top = _stages(stacked.replace("START", "1").replace("END", "4"))[1]
    assert top.fields["slices"][0]["models"] == [{"path": "work/stacked", "layer_range": [1, 4]}]
    with pytest.raises(ConfigError) as err:
        _stages(stacked.replace("START", "2").replace("END", "5"))
    assert str(err.value).startswith(
        "document 2 (name: top): slices[0].sources[0].layer_range: [2, 5) is outside the 4 "
        "layers of work/stacked"
    )


# The errors: each names the document and the field.


@pytest.mark.parametrize(
    "documents, message",
    [
        (
            [_linear("a", "m0", "m1"), *["merge_method: linear\nmodels: [{model: a}]\n"] * 2],
            "document 3: name: required, since document 2 is the one final merge without a name",
        ),
        (
            [_linear("a", "m0", "m1"), _linear("b", "a", "m1"), _linear("a", "m1", "m2")],
            "document 3: name: 'a' is also the name of document 1",
        ),
        (
            [_linear("a/b", "m0", "m1"), _linear("c", "a/b", "m1")],
            "document 1: name: must be a directory name",
        ),
        (
            [_linear("a", "m0", "m1"), "[1, 2]\n"],
            "document 2: a mergekit config is a mapping of fields",
        ),
        (
            [_linear("a", "c", "m0"), _linear("b", "a", "m1"), _linear("c", "b", "m2")],
            "document 2 (name: b): models[0].model: 'a' makes a cycle of stages "
            "(a uses c uses b uses a)",
        ),
        (
            [_linear("a", "m0", "a"), _linear("b", "a", "m1")],
            "document 1 (name: a): models[1].model: 'a' makes a cycle of stages (a uses a)",
        ),
        (
            [_linear("a", "m0", "m1"), _linear("b", "a", "m1"), _linear("c", "a", "m2")],
            "document 2 (name: b), document 3 (name: c): no other stage uses them",
        ),
        (
            [
                _linear("a", "m0", "m1"),
                "name: b\nmerge_method: linear\nmodels: [{model: a}]\nweights: 1\n",
            ],
            "document 2 (name: b): unknown field 'weights'",
        ),
    ],
)
def test_a_bad_multi_stage_file_is_refused_by_document_and_field(documents, message):
    with pytest.raises(ConfigError) as err:
        _stages("---\n".join(documents))
    assert str(err.value).startswith(message), str(err.value)


def test_an_intermediate_in_the_place_of_the_output_is_refused():
    text = _linear("a", "m0", "m1") + "---\n" + _linear("b", "a", "m1")
    with pytest.raises(ConfigError, match="document 1 .name: a.: name: its intermediate output"):
        _stages(text, work="w", output="w/./a")


@pytest.mark.parametrize("missing", ["a2", "models/missing"])
def test_a_reference_to_no_stage_and_no_model_is_refused_before_anything_runs(missing, tmp_path):
    """A misspelt stage name is reported as such, not as stage b that no other uses."""
    models = [str(m) for m in make_models(tmp_path / "models", n=2, num_layers=LAYERS)]
    path = tmp_path / "multi.yml"
    path.write_text(
        "---\n".join([_linear("c", missing, "a"), _linear("a", *models), _linear("b", *models)])
    )
    with pytest.raises(ConfigError) as err:
        multi.load_stages(path, tmp_path / "work", tmp_path / "out")
    assert str(err.value).startswith(
        f"{path}: document 1 (name: c): models[0].model: '{missing}' is neither the name of a "
        f"stage (c, a, b) nor a model (model '{missing}': no such directory"
    )
    assert not (tmp_path / "work").exists()


def test_a_file_of_one_document_reads_as_before(tmp_path):
    path = tmp_path / "one.yml"
    path.write_text("# one merge\n" + _linear("a", "m0", "m1").removeprefix("name: a\n"))
    (stage,) = multi.load_stages(path, tmp_path / "work", "out", layer_count=lambda m: LAYERS)
    translation = mergekit_yaml.load(path, layer_count=lambda m: LAYERS)
    assert stage.name is None and stage.fields == translation.fields | {"output": "out"}
    assert stage.fields["mergekit_config"] == path.read_text()
    two = tmp_path / "two.yml"
    two.write_text(_linear("a", "m0", "m1") + "---\n" + _linear("b", "a", "m1"))
    with pytest.raises(ConfigError, match="holds 2 YAML documents; a config is one"):
        mergekit_yaml.read(two)


# Reuse of finished intermediates.


def _fake_output(stage, text=None):
    """A complete jkarcher output of `stage` (or of another document, `text`)."""
    directory = Path(stage.output)
    directory.mkdir(parents=True)
    (directory / MERGEKIT_CONFIG_NAME).write_text(text or stage.fields["mergekit_config"])
    manifest = {"written_by": "jkarcher", "entries": [MERGEKIT_CONFIG_NAME]}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_an_intermediate_is_reused_only_if_complete_from_the_same_stage_and_its_inputs_are(
    tmp_path,
):
    text = "---\n".join(
        [
            _linear("a", "m0", "m1"),
            _linear("b", "m1", "m2"),
            _linear("c", "a", "m2"),
            _linear("d", "b", "c"),
        ]
    )
    a, b, c, d = _stages(text, work=str(tmp_path / "work"), output=str(tmp_path / "out"))
    _fake_output(a)
    _fake_output(b, text="merge_method: linear\nmodels: [{model: m9}]\n")
    _fake_output(c)
    _fake_output(d)
    assert multi.reused_stages([a, b, c, d]) == {"a", "c"}  # d is the final output
    (Path(c.output) / "notes.txt").write_text("a user's file")
    assert multi.reused_stages([a, b, c, d]) == {"a"}
    (Path(a.output) / MANIFEST_NAME).unlink()
    assert multi.reused_stages([a, b, c, d]) == set()


# Merges: jkarcher-yaml and jkarcher-merge equal mergekit-multi and the stages one by one.

# The final stage comes first: the stages run in dependency order, not in the file's.
MULTI = """\
    name: final
    merge_method: slerp
    base_model: first
    models:
      - model: first
      - model: second
    parameters:
      t: [0.2, 0.7]
    dtype: float32
    ---
    name: first
    merge_method: linear
    models:
      - model: {m0}
        parameters: {{weight: 0.3}}
      - model: {m1}
        parameters: {{weight: 0.7}}
    dtype: float32
    ---
    name: second
    merge_method: task_arithmetic
    base_model: {m0}
    models:
      - model: {m1}
        parameters: {{weight: 0.5}}
      - model: {m2}
        parameters: {{weight: -0.25}}
    dtype: float32
    """
ENVIRONMENT = {"CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _command(name, *args):
    return subprocess.run(
        [str(BIN / name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=os.environ | ENVIRONMENT,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three tiny bf16 models."""
    return make_models(tmp_path_factory.mktemp("models"), n=3, num_layers=LAYERS)


def _multi_file(directory, models):
    path = directory / "multi.yml"
    path.write_text(textwrap.dedent(MULTI).format(**{f"m{i}": m for i, m in enumerate(models)}))
    return path


@pytest.fixture(scope="module")
def merged(models, tmp_path_factory):
    """The file merged by `jkarcher-yaml` with --intermediate-dir: its directory."""
    root = tmp_path_factory.mktemp("multi")
    path = _multi_file(root, models)
    result = _command("jkarcher-yaml", path, root / "out", "--intermediate-dir", root / "stages")
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def mergekit():
    if importlib.util.find_spec("mergekit") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("mergekit must be installed in CI (pip install -e '.[test]')")
        pytest.skip("mergekit is not installed (pip install -e '.[test]')")


def _assert_close(ours, theirs):
    """Equal within ULPS float32 ulps of each tensor's largest value."""
    assert set(ours) == set(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype == np.float32, name
        assert ours[name].shape == theirs[name].shape, name
        scale = float(np.max(np.abs(theirs[name].astype(np.float64))))
        difference = np.abs(ours[name].astype(np.float64) - theirs[name])
        assert float(np.max(difference)) <= ULPS * np.finfo(np.float32).eps * scale, name


def _assert_equal(ours, theirs):
    assert set(ours) == set(theirs)
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_the_stages_and_the_output_equal_those_of_mergekit_multi(merged, mergekit, tmp_path):
    work = tmp_path / "mergekit"  # mergekit-multi writes every named stage there
    result = _command("mergekit-multi", merged / "multi.yml", "--intermediate-dir", work)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_close(read_all(merged / "out"), read_all(work / "final"))
    for name in ("first", "second"):
        _assert_close(read_all(merged / "stages" / name), read_all(work / name))


def test_an_unnamed_final_merge_equals_mergekit_multis(merged, mergekit, tmp_path):
    """The final document without its name: mergekit-multi writes it to --out-path, as
    jkarcher-yaml writes it to OUT."""
    path = tmp_path / "unnamed.yml"
    path.write_text((merged / "multi.yml").read_text().replace("name: final\n", "", 1))
    ours = _command("jkarcher-yaml", path, tmp_path / "ours", "-I", tmp_path / "our_stages")
    assert ours.returncode == 0, ours.stderr[-3000:]
    theirs = _command(
        "mergekit-multi", path, "--out-path", tmp_path / "theirs", "-I", tmp_path / "stages"
    )
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    _assert_close(read_all(tmp_path / "ours"), read_all(tmp_path / "theirs"))
    assert sorted(p.name for p in (tmp_path / "our_stages").iterdir()) == ["first", "second"]


def test_the_stages_equal_single_document_files_run_one_by_one(merged, models, tmp_path):
    """Each stage, written by hand as a single-document file on the outputs before it, merges
    bit for bit as the multi-stage run did; each stage's mergekit_config.yml is that file."""
    stages = merged / "stages"
    singles = textwrap.dedent(MULTI).format(**{f"m{i}": m for i, m in enumerate(models)})
    singles = singles.replace("model: first", f"model: {stages / 'first'}")
    singles = singles.replace("model: second", f"model: {stages / 'second'}")
    for text in singles.split("---\n"):
        document = yaml.safe_load(text)
        name = document.pop("name")
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        fields = mergekit_yaml.load(path).fields | {"output": str(tmp_path / name)}
        pipeline.run(pipeline.plan_merge(validate(fields)))
        output = merged / "out" if name == "final" else stages / name
        _assert_equal(read_all(tmp_path / name), read_all(output))
        assert yaml.safe_load((output / MERGEKIT_CONFIG_NAME).read_text()) == document


def test_the_merge_command_runs_a_multi_stage_file_with_intermediates_beside_the_output(
    merged, tmp_path
):
    out = tmp_path / "out"
    result = _command(
        "jkarcher-merge", "--mergekit-yaml", merged / "multi.yml", f"--config.output={out}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_equal(read_all(out), read_all(merged / "out"))
    assert sorted(p.name for p in (tmp_path / "out.intermediates").iterdir()) == [
        "first",
        "second",
    ]


def test_a_rerun_keeps_the_finished_stages_and_replaces_only_with_overwrite(models, tmp_path):
    path = _multi_file(tmp_path, models)
    out, stages = tmp_path / "out", tmp_path / "out.intermediates"
    assert _command("jkarcher-yaml", path, out, "--quiet").returncode == 0
    first = read_all(stages / "first")

    rerun = _command("jkarcher-yaml", path, out, "--quiet", "--overwrite")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("merged by an earlier run of the same stage") == 2
    assert "-> " + str(out) in rerun.stdout

    path.write_text(path.read_text().replace("weight: -0.25", "weight: -0.5"))
    refused = _command("jkarcher-yaml", path, out, "--quiet")
    assert refused.returncode == 1
    assert f"output {stages / 'second'} already exists" in refused.stderr
    assert "merging" not in refused.stdout

    changed = _command("jkarcher-yaml", path, out, "--quiet", "--overwrite")
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert f"kept {stages / 'first'}" in changed.stdout
    assert f"-> {stages / 'second'}" in changed.stdout
    _assert_equal(read_all(stages / "first"), first)
    assert "weight: -0.5" in (stages / "second" / MERGEKIT_CONFIG_NAME).read_text()

    eager = _command("jkarcher-yaml", path, out, "--quiet", "--overwrite", "--no-lazy")
    assert eager.returncode == 0, eager.stderr[-3000:]
    starts = [line.split()[0] for line in eager.stdout.splitlines() if line]
    assert "kept" not in starts and starts.count("merging") == 3
    _assert_equal(read_all(stages / "first"), first)


def test_a_directory_jkarcher_did_not_write_is_never_replaced_by_a_stage(models, tmp_path):
    path = _multi_file(tmp_path, models)
    mine = tmp_path / "out.intermediates" / "second"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    result = _command("jkarcher-yaml", path, tmp_path / "out", "--overwrite")
    assert result.returncode == 1
    assert f"output {mine} exists and is not a jkarcher output" in result.stderr
    assert (mine / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yml", "out.intermediates"]
    assert [p.name for p in mine.parent.iterdir()] == ["second"]
