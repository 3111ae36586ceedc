"""Where a merge may write: outputs appear only when complete, and a user's files are never lost."""

import collections
import json
import logging
import os
import subprocess
import sys

import pytest

from jkarcher.io import output_dir
from jkarcher.io.output_dir import (
    MANIFEST_NAME,
    STAGING_MARK,
    OutputError,
    check_free_space,
    check_output_dir,
    host_tag,
    remove_stale_staging,
    staged_directory,
)


def _jkarcher_output(path, files=("model.safetensors", "config.json")):
    with staged_directory(path, overwrite=False) as staging:
        for name in files:
            (staging / name).write_text(name)
    return path


def _tree(path):
    """Every file under `path` with its text, to check that nothing was touched."""
    return {str(p.relative_to(path)): p.read_text() for p in path.rglob("*") if p.is_file()}


def test_staged_directory_appears_only_when_complete_with_its_manifest(tmp_path):
    output = tmp_path / "out"
    with staged_directory(output, overwrite=False) as staging:
        (staging / "file").write_text("done")
        assert not output.exists() and staging.parent == tmp_path
        assert staging.name.startswith(f".out{STAGING_MARK}{host_tag()}-{os.getpid()}-")
    assert (output / "file").read_text() == "done"
    manifest = json.loads((output / MANIFEST_NAME).read_text())
    assert manifest == {"written_by": "jkarcher", "entries": ["file"]}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_staged_directory_leaves_nothing_on_error(tmp_path):
    output = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with staged_directory(output, overwrite=False) as staging:
            (staging / "model.safetensors").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_an_earlier_jkarcher_output(tmp_path):
    output = _jkarcher_output(tmp_path / "out", files=("old",))
    with pytest.raises(OutputError, match="appeared"):
        with staged_directory(output, overwrite=False) as staging:
            (staging / "new").write_text("new")
    assert sorted(p.name for p in output.iterdir()) == [MANIFEST_NAME, "old"]
    check_output_dir(output, [], overwrite=True)
    with staged_directory(output, overwrite=True) as staging:
        (staging / "new").write_text("new")
    assert sorted(p.name for p in output.iterdir()) == [MANIFEST_NAME, "new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_replaces_an_empty_directory(tmp_path):
    (tmp_path / "out").mkdir()
    check_output_dir(tmp_path / "out", [], overwrite=True)
    with staged_directory(tmp_path / "out", overwrite=True) as staging:
        (staging / "new").write_text("new")
    assert (tmp_path / "out" / "new").is_file()


def test_overwrite_never_replaces_a_users_directory(tmp_path):
    user = tmp_path / "mine"
    (user / "notes").mkdir(parents=True)
    for name in ("a.txt", "b.txt", "c.txt", "d.txt", "e.txt", "f.txt"):
        (user / name).write_text(name)
    (user / "notes" / "plan.md").write_text("keep me")
    before = _tree(user)
    with pytest.raises(OutputError, match=r"not a jkarcher output .*a\.txt, b\.txt.* and 2 more"):
        check_output_dir(user, [], overwrite=True)
    with pytest.raises(OutputError, match="not a jkarcher output"):
        with staged_directory(user, overwrite=True) as staging:
            (staging / "model.safetensors").write_text("merged")
    assert _tree(user) == before
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_overwrite_keeps_a_jkarcher_output_that_holds_a_users_files(tmp_path):
    output = _jkarcher_output(tmp_path / "out")
    (output / "my-eval.json").write_text("{}")
    before = _tree(output)
    with pytest.raises(OutputError, match=r"files jkarcher did not write \(my-eval\.json\)"):
        check_output_dir(output, [], overwrite=True)
    assert _tree(output) == before


def test_a_forged_or_broken_manifest_does_not_count(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "data.txt").write_text("x")
    for text in ("{oops", json.dumps({"entries": ["data.txt"]}), json.dumps([1, 2])):
        (user / MANIFEST_NAME).write_text(text)
        with pytest.raises(OutputError, match="not a jkarcher output"):
            check_output_dir(user, [], overwrite=True)


@pytest.mark.parametrize(
    "output, what", [(".", "is the working"), ("..", "is a parent of the work")]
)
def test_the_working_directory_and_its_parents_are_never_outputs(
    tmp_path, monkeypatch, output, what
):
    work = tmp_path / "work"
    work.mkdir()
    (work / "file").write_text("x")
    monkeypatch.chdir(work)
    with pytest.raises(OutputError, match=what):
        check_output_dir(output, [], overwrite=True)
    assert (work / "file").read_text() == "x"


def test_the_home_directory_and_the_root_are_never_outputs(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(OutputError, match="is the home directory"):
        check_output_dir("~", [], overwrite=True)
    with pytest.raises(OutputError, match="is a parent of the home directory"):
        check_output_dir(tmp_path, [], overwrite=True)
    with pytest.raises(OutputError, match="root directory|parent of"):
        check_output_dir("/", [], overwrite=True)


@pytest.mark.parametrize(
    "output, problem",
    [("in/sub", "inside the input"), ("in", "inside the input"), (".", "is inside output")],
)
def test_output_may_not_overlap_an_input(tmp_path, output, problem):
    (tmp_path / "in").mkdir()
    with pytest.raises(OutputError, match=problem):
        check_output_dir(tmp_path / output, [tmp_path / "in"], overwrite=True)


def test_existing_output_is_refused_without_overwrite(tmp_path):
    output = _jkarcher_output(tmp_path / "out")
    with pytest.raises(OutputError, match="overwrite=True"):
        check_output_dir(output, [], overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        check_output_dir(tmp_path / "file", [], overwrite=True)


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is not a directory"):
        check_output_dir(tmp_path / "file" / "out", [], overwrite=False)
    monkeypatch.setattr(output_dir.os, "access", lambda path, mode: False)
    with pytest.raises(OutputError, match=f"cannot write in {tmp_path}"):
        check_output_dir(tmp_path / "out", [], overwrite=False)


def test_free_space_is_checked_against_the_output_size(tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(output_dir.shutil, "disk_usage", lambda path: usage(0, 0, 10**9))
    check_free_space(tmp_path / "new" / "out", 10**8)
    with pytest.raises(
        OutputError, match=r"writes 2\.00 GB, and the disk holding .* 1\.00 GB free"
    ):
        check_free_space(tmp_path / "new" / "out", 2 * 10**9)


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_staging_left_by_a_dead_process_is_removed_and_said(tmp_path, caplog):
    dead = tmp_path / f".out{STAGING_MARK}{host_tag()}-{_dead_pid()}-0123abcd"
    alive = tmp_path / f".out{STAGING_MARK}{host_tag()}-{os.getpid()}-0123abcd"
    elsewhere = tmp_path / f".out{STAGING_MARK}ffffffff-{_dead_pid()}-0123abcd"
    other_output = tmp_path / f".other{STAGING_MARK}{host_tag()}-{_dead_pid()}-0123abcd"
    for directory in (dead, alive, elsewhere, other_output):
        directory.mkdir()
        (directory / "model.safetensors").write_text("half")
    with caplog.at_level(logging.WARNING, logger="jkarcher"):
        with staged_directory(tmp_path / "out", overwrite=False) as staging:
            (staging / "config.json").write_text("{}")
    assert not dead.exists()
    assert alive.exists() and elsewhere.exists() and other_output.exists()
    assert f"removed {dead}, left unfinished by process" in caplog.text
    assert remove_stale_staging(tmp_path / "out") == []
