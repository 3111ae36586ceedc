"""mergekit YAML files read: one YAML document (or several: `read_documents`), numbers such as
1e-5 read as numbers, and a model's layer count from its config.json (to check a slice's layer
ranges)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from jkarcher.architecture import layer_count
from jkarcher.config import ConfigError
from jkarcher.io import Checkpoint
from jkarcher.mergekit_yaml.translate import Translation, translate


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers such as 1e-5 as numbers (YAML 1.2; YAML 1.1 reads
    them as text, which mergekit turns into numbers later)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load(path: str | Path, layer_count: Callable[[str], int] | None = None) -> Translation:
    """Read and translate a mergekit YAML file; errors name the file and the field.

    `layer_count(model)` gives a model's number of layers, to check a slice's layer ranges
    (default: `num_hidden_layers` of the model's config.json).
    """
    document = read(path)
    try:
        translation = translate(document, layer_count=layer_count or checkpoint_layer_count)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    text = Path(path).read_text(encoding="utf-8")
    return dataclasses.replace(translation, fields=translation.fields | {"mergekit_config": text})


def read(path: str | Path) -> Any:
    """The one YAML document of a file, parsed (a file of several is a multi-stage merge,
    which `jkarcher.mergekit_yaml.multi` reads)."""
    documents = read_documents(path)
    if len(documents) != 1:
        raise ConfigError(
            f"{path}: holds {len(documents)} YAML documents; a config is one (several, each "
            "with a name, are the stages of a multi-stage merge: jkarcher-yaml runs them)"
        )
    return documents[0]


def read_documents(path: str | Path) -> list[Any]:
    """Every YAML document of a file, parsed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror})") from None
    try:
        documents = list(yaml.load_all(text, Loader=_Loader))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    return documents


def checkpoint_layer_count(model: str) -> int:
    """`num_hidden_layers` of a model's config.json (a local directory or a cached hub id), or
    of its `text_config` (`jkarcher.architecture.layer_count`)."""
    checkpoint = Checkpoint(model)
    count = layer_count(checkpoint.config)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ConfigError(
            f"{checkpoint.path / 'config.json'}: no num_hidden_layers (a positive integer), "
            "which a slice's layer_range is checked against"
        )
    return count
