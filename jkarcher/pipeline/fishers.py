"""The Fisher files of a merge whose method weighs coordinates by each model's diagonal Fisher
(`params.fisher`).

`fisher_files` places each model's file, `prepare_fishers` estimates those the config asks to
estimate, `open_fishers` reads their headers, and `fisher_sources` picks each model's Fisher of
a tensor's rows: the plan checks that each file holds every merged tensor in the model's shape
(a tying model's embedding Fisher serves as its lm_head's). The Fishers are then read like the
models, tensor by tensor, in float32, and given to the leaf as its `fisher` input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

from jkarcher import distributed, fisher
from jkarcher.config import ConfigError, MergeConfig
from jkarcher.errors import MergeError
from jkarcher.io import CheckpointError, StoredTensor, TensorInfo


def fisher_files(config: MergeConfig) -> tuple[Path, ...]:
    """Each model's Fisher file as `params.fisher` places it: a file given, fisher.safetensors
    in a directory given, or fisher.safetensors beside the model."""
    if config.fisher.files is None:
        return tuple(fisher.fisher_path(entry.path) for entry in config.models)
    paths = (Path(p).expanduser() for p in config.fisher.files)
    return tuple(p / fisher.FISHER_NAME if p.is_dir() else p for p in paths)


def prepare_fishers(config: MergeConfig, progress: bool = False) -> list[fisher.FisherRun]:
    """Estimate the Fishers that `params.fisher = {"text": FILE, ...}` asks for and that are not
    yet beside the models, made by the same text and settings; return what was estimated.

    Each estimate is `jkarcher.fisher.checkpoint_fisher` of one model on the text, written
    atomically as fisher.safetensors in the model's directory. With several processes, process
    0 estimates and the others wait for it. Nothing is done for other forms of `params.fisher`.
    """
    if config.fisher is None or config.fisher.estimate is None:
        return []
    settings = dataclasses.asdict(config.fisher.estimate)
    text = Path(settings.pop("text")).expanduser()
    if not text.is_file():
        raise ConfigError(f"params.fisher.text: {text} is not a file")
    recipe = fisher.estimate_recipe(text, **settings)
    runs = []
    if distributed.is_leader():
        for entry, path in zip(config.models, fisher_files(config), strict=True):
            if not fisher.has_recipe(path, recipe):
                runs.append(
                    fisher.checkpoint_fisher(
                        entry.path, text, output=path, progress=progress, **settings
                    )
                )
    distributed.barrier("Fisher estimates written")
    return runs


def open_fishers(config: MergeConfig, labels: Sequence[str]) -> tuple[dict[str, TensorInfo], ...]:
    """The headers of each model's Fisher file; a missing one is an error naming it."""
    opened = []
    for path, entry, label in zip(fisher_files(config), config.models, labels, strict=True):
        try:
            opened.append(fisher.fisher_tensors(entry.path, path))
        except CheckpointError as err:
            raise CheckpointError(f"params.fisher, the Fisher of {label}: {err}") from None
    return tuple(opened)


def fisher_sources(
    sources: Sequence[StoredTensor],
    model_infos: Sequence[StoredTensor],
    fishers: Sequence[Mapping[str, TensorInfo]],
    fisher_labels: Sequence[str],
) -> tuple[TensorInfo, ...]:
    """Each model's Fisher of the rows a tensor merges (`sources[i]`, model i's): the Fisher's
    tensor named like the model's tensor (`model_infos[i]`, the embedding for the lm_head of a
    model that ties them), of its shape."""
    chosen = []
    for full, infos, label, source in zip(
        model_infos, fishers, fisher_labels, sources, strict=True
    ):
        if full.name not in infos:
            raise MergeError(
                f"tensor {full.name!r} is missing from {label}; the Fisher file needs every "
                "tensor the model merges"
            )
        info = infos[full.name]
        if info.shape != full.shape:
            raise MergeError(
                f"tensor {full.name!r} has shape {list(info.shape)} in {label} ({info.file}) "
                f"but {list(full.shape)} in the model ({full.file})"
            )
        chosen.append(info if source.shape == info.shape else info.rows(0, source.shape[0]))
    return tuple(chosen)
