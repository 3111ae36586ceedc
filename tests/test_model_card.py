"""The model card: YAML front matter that names the inputs by hub id or directory name, never by
an absolute local path, in UTF-8; the body's model list; the resolved config."""

import json

import pytest
import yaml

from jkarcher.io.model_card import display_name, model_card

NON_ASCII = ["café-modèle", "模型-中文", "rocket-🚀"]


def card_for(models, base_model=None, resolved_config=None):
    return model_card(
        title="merged",
        method="karcher",
        method_summary="weighted Karcher mean",
        method_citation="a paper",
        models=[(m, 1.0) for m in models],
        base_model=base_model,
        resolved_config=resolved_config or {"method": "karcher"},
    )


def front_matter(card: str) -> str:
    lines = card.splitlines()
    assert lines[0] == "---"
    return "\n".join(lines[1 : lines.index("---", 1)])


def merged_models_list(card: str) -> list[str]:
    """The names in the body's "Merged models" list, without the backticks and weights."""
    section = card.split("## Merged models\n\n")[1].split("\n\n")[0]
    return [line.split("`")[1] for line in section.splitlines()]


def test_front_matter_tags_and_config():
    card = model_card(
        title="merged",
        method="karcher",
        method_summary="weighted Karcher mean",
        method_citation="a paper",
        models=[("org/a", 1.0), ("org/b", 2.0)],
        base_model="org/base",
        resolved_config={"method": "karcher", "params": {"tol": 1e-6}},
    )
    assert yaml.safe_load(front_matter(card)) == {
        "base_model": ["org/base", "org/a", "org/b"],
        "library_name": "transformers",
        "tags": ["merge", "jkarcher", "karcher"],
    }
    assert merged_models_list(card) == ["org/a", "org/b"]
    assert "- `org/a` (weight 1)" in card and "Base model: `org/base`." in card
    body = card.split("```json\n")[1].split("```")[0]
    assert json.loads(body) == {"method": "karcher", "params": {"tol": 1e-6}}


def test_local_directories_are_named_by_their_resolved_name(tmp_path, monkeypatch):
    """An absolute path, "." and "../x/" all give the directory's own name, in the front matter
    and in the body's list alike, and no absolute path appears in either."""
    for name in ("alpha", "beta", "gamma", "base"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "beta")
    card = card_for([str(tmp_path / "alpha"), ".", "../gamma/"], base_model=str(tmp_path / "base"))
    assert yaml.safe_load(front_matter(card))["base_model"] == ["base", "alpha", "beta", "gamma"]
    assert merged_models_list(card) == ["alpha", "beta", "gamma"]
    assert "Base model: `base`." in card
    assert str(tmp_path) not in card


def test_a_hub_id_that_is_a_local_directory_is_named_as_a_directory(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert display_name("org/name") == "name"
    assert display_name("org/absent") == "org/absent"


@pytest.mark.parametrize("inside", ["", "subfolder", "link"])
def test_directories_inside_the_hub_cache_are_named_by_their_hub_id(tmp_path, inside):
    """A snapshot directory, a folder within one, and a link to one give the hub id."""
    snapshot = tmp_path / "hub" / "models--some-org--tiny-qwen" / "snapshots" / "0123abcd"
    (snapshot / "subfolder").mkdir(parents=True)
    path = snapshot / inside
    if inside == "link":
        path = tmp_path / "link"
        path.symlink_to(snapshot, target_is_directory=True)
    assert display_name(path) == "some-org/tiny-qwen"
    card = card_for([str(path)])
    assert yaml.safe_load(front_matter(card))["base_model"] == ["some-org/tiny-qwen"]
    assert merged_models_list(card) == ["some-org/tiny-qwen"]


def test_non_ascii_names_come_out_as_utf8_yaml(tmp_path):
    """Accents, CJK and emoji, as hub ids and as local directory names: the front matter is
    UTF-8 text without escapes, and YAML reads the exact names back; the config block too."""
    for name in NON_ASCII:
        (tmp_path / name).mkdir()
    hub_ids = [f"org/{name}" for name in NON_ASCII]
    local = [str(tmp_path / name) for name in NON_ASCII]
    card = card_for(hub_ids + local, resolved_config={"models": hub_ids})
    front = front_matter(card)
    assert "\\u" not in front and "\\U" not in front
    assert yaml.safe_load(front.encode("utf-8"))["base_model"] == hub_ids + NON_ASCII
    assert merged_models_list(card) == hub_ids + NON_ASCII
    body = card.split("```json\n")[1].split("```")[0]
    assert "\\u" not in body and json.loads(body) == {"models": hub_ids}
    assert card.encode("utf-8").decode("utf-8") == card
