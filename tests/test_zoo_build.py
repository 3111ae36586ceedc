"""Building a zoo: members reused by their records, builds that resume, a shared base, and
directories a build did not write left alone."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jkarcher.zoo import build
from jkarcher.zoo.build import ZooError, build_zoo, zoo_members
from jkarcher.zoo.recipes import ExpertRecipe, ZooRecipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ZooRecipe(
    hidden_size=16,
    layers=1,
    seq_len=32,
    batch_size=4,
    base_steps=3,
    base_learning_rate=1e-3,
    examples_per_domain=40,
    base_examples_per_task=10,
    experts=(
        ExpertRecipe("successor", 2, 1e-3, general_share=0.5),
        ExpertRecipe("counting", 2, 1e-3, general_share=0.5),
    ),
)


@pytest.fixture
def trained(monkeypatch):
    """The names of the members trained, in order."""
    names = []
    real_train = build.train

    def counting_train(*args, desc, **kwargs):
        names.append(desc)
        return real_train(*args, desc=desc, **kwargs)

    monkeypatch.setattr(build, "train", counting_train)
    return names


def test_a_built_zoo_is_reused_and_only_changed_members_retrain(tmp_path, trained):
    zoo = tmp_path / "zoo"
    build_zoo(zoo, TINY, log=lambda _: None)
    assert trained == ["base", "expert-successor", "expert-counting"]
    base, experts = zoo_members(zoo)
    assert base == zoo / "base"
    assert experts == [zoo / "expert-successor", zoo / "expert-counting"]
    assert all(
        (m / "model.safetensors").is_file() and (m / "member.json").is_file() for m in experts
    )
    build_zoo(zoo, TINY, log=lambda _: None)
    assert len(trained) == 3
    longer = (TINY.experts[0], dataclasses.replace(TINY.experts[1], steps=3))
    build_zoo(zoo, dataclasses.replace(TINY, experts=longer), log=lambda _: None)
    assert trained[3:] == ["expert-counting"]
    manifest = json.loads((zoo / "zoo.json").read_text())
    assert manifest["record"]["recipe"]["experts"][1]["steps"] == 3
    assert set(manifest["training"]) == {"base", "successor", "counting"}


def test_an_interrupted_build_resumes_and_never_looks_complete(tmp_path, monkeypatch, trained):
    zoo = tmp_path / "zoo"
    counted_train = build.train
    interrupt = [True]

    def stop_at_counting(*args, desc, **kwargs):
        if desc == "expert-counting" and interrupt[0]:
            raise KeyboardInterrupt
        return counted_train(*args, desc=desc, **kwargs)

    monkeypatch.setattr(build, "train", stop_at_counting)
    with pytest.raises(KeyboardInterrupt):
        build_zoo(zoo, TINY, log=lambda _: None)
    with pytest.raises(ZooError, match="no complete zoo there"):
        zoo_members(zoo)
    assert not (zoo / "expert-counting").exists()
    interrupt[0] = False
    build_zoo(zoo, TINY, log=lambda _: None)
    assert trained == ["base", "expert-successor", "expert-counting"]
    assert len(zoo_members(zoo)[1]) == 2


def test_zoos_that_differ_in_their_experts_share_the_base(tmp_path, trained):
    build_zoo(tmp_path / "seed0", TINY, log=lambda _: None)
    other = dataclasses.replace(TINY, expert_seed=1)
    build_zoo(tmp_path / "seed1", other, log=lambda _: None, base_from=tmp_path / "seed0")
    assert trained[3:] == ["expert-successor", "expert-counting"]
    first = (tmp_path / "seed0" / "expert-successor" / "model.safetensors").read_bytes()
    assert (tmp_path / "seed1" / "expert-successor" / "model.safetensors").read_bytes() != first
    base = (tmp_path / "seed0" / "base" / "model.safetensors").read_bytes()
    assert (tmp_path / "seed1" / "base" / "model.safetensors").read_bytes() == base


def test_a_directory_with_files_a_build_did_not_write_is_refused_untouched(tmp_path, trained):
    users = tmp_path / "mine"
    (users / "base").mkdir(parents=True)
    (users / "base" / "notes.txt").write_text("keep")
    with pytest.raises(ZooError, match=r"mine: holds base, not written by a zoo build"):
        build_zoo(users, TINY, log=lambda _: None)
    assert (users / "base" / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in users.iterdir()) == ["base"] and not trained
    (tmp_path / "file").write_text("x")
    with pytest.raises(ZooError, match="not a directory"):
        build_zoo(tmp_path / "file", TINY, log=lambda _: None)


def test_make_zoo_refuses_a_users_directory_in_one_line(tmp_path):
    (tmp_path / "results.csv").write_text("mine")
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "make_zoo.py"),
            "--zoo=small",
            f"--zoo_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path}: holds results.csv, not written by a zoo build; "
        "choose another zoo directory"
    ]
    assert (tmp_path / "results.csv").read_text() == "mine"
