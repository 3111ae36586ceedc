"""Multi-stage merges, as mergekit-multi runs them: a file of several YAML documents, each a
mergekit config with a `name` (but for at most one, the final merge), where a stage's name
stands for its merged model in the models of the others.

A stage's name may be the model of `models[i].model`, `base_model`, `slices[i].base_model`,
`slices[i].sources[j].model` or `tokenizer_source` (with a LoRA adapter: `name+adapter`) of any
other stage, before or after it in the file. The stages run in dependency order (each after
the stages it uses, else in the order of the file; the final stage last). Each writes
`<work dir>/<name>`, except the final stage, which writes the requested output: the document
without a name, else the one stage that no other stage uses. Each stage's
mergekit_config.yml is its own document, without `name` and with the stages it uses as their
directories: a single-document config that mergekit-yaml or jkarcher-yaml runs as it is.

`plan_stages` is pure: parsed documents in, the stages with their jkarcher config fields out;
`load_stages` reads a file, and `reused_stages` tells which intermediates an earlier run left.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from jkarcher.config import ConfigError
from jkarcher.errors import JkarcherError
from jkarcher.io.hf import resolve_checkpoint_dir
from jkarcher.io.output_dir import MANIFEST_NAME, OutputError, check_replaceable
from jkarcher.mergekit_yaml.reader import checkpoint_layer_count, load, read_documents
from jkarcher.mergekit_yaml.translate import translate
from jkarcher.pipeline.write import MERGEKIT_CONFIG_NAME

# tokenizer_source values that are not models.
TOKENIZER_WORDS = ("base", "union")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One merge of a multi-stage file: its `name` (None for the unnamed final document),
    the `fields` of its jkarcher config (with `output` and `mergekit_config`), the translation's
    `notes`, and the names of the stages it `uses`."""

    name: str | None
    fields: dict[str, Any]
    notes: tuple[str, ...]
    uses: tuple[str, ...] = ()

    @property
    def output(self) -> str:
        return self.fields["output"]


def plan_stages(
    documents: Sequence[Any],
    work_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    layer_count: Callable[[str], int],
) -> list[Stage]:
    """The stages of parsed mergekit documents, in the order they run, each translated
    (`translate`) after its stage-name references are replaced by those stages' outputs.

    `layer_count(model)` gives the layers of a model that is not a stage; a stage's output has
    those of its reference model (the base, else the first) or, merged from slices, the sum of
    its slices' lengths. Errors name the document and the field.
    """
    names = _names(documents)
    references = [list(_references(document)) for document in documents]
    order = _order(names, references)
    final = _final(names, references)
    order = [i for i in order if names[i] != final] + [names.index(final)]
    outputs = {
        name: str(output) if name == final else os.path.join(work_dir, name) for name in names
    }
    for name in names:
        if name != final and os.path.normpath(outputs[name]) == os.path.normpath(output):
            raise ConfigError(
                f"{_where(names.index(name), name)}: name: its intermediate output "
                f"{outputs[name]} is the final output; choose another intermediate directory"
            )
    counts: dict[str, int] = {}

    def count(model: str) -> int:
        return counts[model] if model in counts else layer_count(model)

    stages = []
    for index in order:
        name, where = names[index], _where(index, names[index])
        document = copy.deepcopy(documents[index])
        document.pop("name", None)
        uses = []
        for _, reference, place, key in _references(document):
            model, plus, adapter = reference.partition("+")
            if model in outputs:
                place[key] = outputs[model] + plus + adapter
                uses.append(model)
        try:
            translation = translate(document, layer_count=count)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        counts[outputs[name]] = _output_layers(translation.fields, count)
        text = yaml.safe_dump(document, sort_keys=False)
        fields = translation.fields | {"output": outputs[name], "mergekit_config": text}
        stages.append(Stage(name, fields, translation.notes, tuple(dict.fromkeys(uses))))
    return stages


def load_stages(
    path: str | os.PathLike,
    work_dir: str | os.PathLike,
    output: str | os.PathLike,
    layer_count: Callable[[str], int] | None = None,
) -> list[Stage]:
    """The stages of a mergekit YAML file (`plan_stages`), each model that is not a stage found
    on disk or in the local HF cache first; errors name the file. A file of one document without
    a `name` is one stage, as `load` reads it, that writes `output`."""
    if not holds_stages(path):
        translation = load(path, layer_count)
        return [Stage(None, translation.fields | {"output": str(output)}, translation.notes)]
    documents = read_documents(path)
    try:
        names = _names(documents)
        for index, document in enumerate(documents):
            for field, reference, _, _ in _references(document):
                if reference.partition("+")[0] not in names:
                    _check_model(names, index, field, reference)
        return plan_stages(
            documents, work_dir, output, layer_count=layer_count or checkpoint_layer_count
        )
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def holds_stages(path: str | os.PathLike) -> bool:
    """Whether a mergekit YAML file is a multi-stage merge: several documents, or one named."""
    documents = read_documents(path)
    return len(documents) > 1 or any(isinstance(d, dict) and "name" in d for d in documents)


def default_work_dir(output: str | os.PathLike) -> str:
    """Where the intermediates go unless told: `OUTPUT.intermediates`, beside the output."""
    path = Path(output)
    return str(path.with_name(path.name + ".intermediates"))


def reused_stages(stages: Sequence[Stage]) -> set[str]:
    """The intermediate stages whose output an earlier run left complete: a jkarcher output
    that holds nothing else and whose mergekit_config.yml is this stage's document, and whose
    stages it uses are reused too (mergekit-multi's lazy runs). The final output is never
    reused."""
    final = stages[-1].name
    reused: set[str] = set()
    for stage in stages:
        if stage.name != final and set(stage.uses) <= reused and _holds(stage):
            reused.add(stage.name)
    return reused


def _holds(stage: Stage) -> bool:
    """Whether the stage's output is a complete jkarcher output of the stage's document."""
    directory = Path(stage.output)
    if not (directory / MANIFEST_NAME).is_file():
        return False
    try:
        check_replaceable(directory)
        written = (directory / MERGEKIT_CONFIG_NAME).read_text(encoding="utf-8")
    except (OutputError, OSError, UnicodeDecodeError):
        return False
    return written == stage.fields["mergekit_config"]


def _check_model(names: list[str | None], index: int, field: str, reference: str) -> None:
    """A model that is not a stage is a local directory, or a hub id in the local cache."""
    try:
        resolve_checkpoint_dir(reference.partition("+")[0])
    except JkarcherError as err:
        raise ConfigError(
            f"{_where(index, names[index])}: {field}: {reference!r} is neither the name of a "
            f"stage ({', '.join(filter(None, names))}) nor a model ({err})"
        ) from None


def _names(documents: Sequence[Any]) -> list[str | None]:
    """Each document's name: a directory name, unique; None for the one document without."""
    seen: dict[str | None, int] = {}
    for index, document in enumerate(documents):
        where = _where(index, None)
        if not isinstance(document, dict):
            raise ConfigError(
                f"{where}: a mergekit config is a mapping of fields, got {document!r}"
            )
        name = document.get("name")
        if name is None and None in seen:
            raise ConfigError(
                f"{where}: name: required, since {_where(seen[None], None)} is the one final "
                "merge without a name (the others are stages, which the others name)"
            )
        if name is None:
            seen[None] = index
            continue
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "+" in name:
            raise ConfigError(
                f"{where}: name: must be a directory name (not '.' or '..', without '/' or "
                f"'+'), got {name!r}"
            )
        if name in seen:
            raise ConfigError(
                f"{where}: name: {name!r} is also the name of {_where(seen[name], None)}"
            )
        seen[name] = index
    return list(seen)


def _references(document: dict) -> Iterator[tuple[str, str, dict, str]]:
    """Each model reference of a document: (field, text, the mapping that holds it, its key)."""
    places: list[tuple[str, Any]] = [("", document)]
    for i, entry in enumerate(_list(document.get("models"))):
        places.append((f"models[{i}].", entry))
    for i, piece in enumerate(_list(document.get("slices"))):
        places.append((f"slices[{i}].", piece))
        for j, source in enumerate(_list(piece.get("sources") if isinstance(piece, dict) else [])):
            places.append((f"slices[{i}].sources[{j}].", source))
    for prefix, place in places:
        if not isinstance(place, dict):
            continue
        keys = ("base_model", "tokenizer_source") if prefix == "" else ("base_model", "model")
        for key in keys:
            value = place.get(key)
            if isinstance(value, str) and not (
                key == "tokenizer_source" and value in TOKENIZER_WORDS
            ):
                yield prefix + key, value, place, key


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _order(names: list[str | None], references: list[list]) -> list[int]:
    """The documents' indices, each after the stages it uses (depth first, in file order);
    a cycle is an error that names the reference closing it."""
    index_of = {name: i for i, name in enumerate(names)}
    order: list[int] = []
    path: list[int] = []

    def visit(index: int) -> None:
        if index in order:
            return
        path.append(index)
        for field, reference, _, _ in references[index]:
            used = index_of.get(reference.partition("+")[0])
            if used is None:
                continue
            if used in path:
                cycle = [names[i] for i in path[path.index(used) :]] + [names[used]]
                raise ConfigError(
                    f"{_where(index, names[index])}: {field}: {reference!r} makes a cycle of "
                    f"stages ({' uses '.join(cycle)})"
                )
            visit(used)
        path.pop()
        order.append(index)

    for index in range(len(names)):
        visit(index)
    return order


def _final(names: list[str | None], references: list[list]) -> str | None:
    """The unnamed stage, else the one stage that no other stage uses."""
    if None in names:
        return None
    used = {ref.partition("+")[0] for refs in references for _, ref, _, _ in refs}
    unused = [i for i, name in enumerate(names) if name not in used]
    if len(unused) > 1:
        listed = ", ".join(_where(i, names[i]) for i in unused)
        raise ConfigError(
            f"{listed}: no other stage uses them, but one final stage writes the output; make "
            "the others models of it, or merge them from files of their own"
        )
    return names[unused[0]]


def _output_layers(fields: dict, count: Callable[[str], int]) -> int:
    """The layers of a stage's output: its reference model's, or the sum of its slices'."""
    if "slices" in fields:
        ranges = [piece["models"][0]["layer_range"] for piece in fields["slices"]]
        return sum(end - start for start, end in ranges)
    return count(fields.get("base_model") or fields["models"][0]["path"])


def _where(index: int, name: str | None) -> str:
    return f"document {index + 1}" + (f" (name: {name})" if name else "")
