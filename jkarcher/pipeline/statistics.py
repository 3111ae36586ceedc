"""The statistics files of a merge whose method reads each model's statistics besides its
weights: the diagonal Fisher (`params.fisher`) or the input Grams of its linear layers
(`params.gram`, RegMean's).

`statistic_files` places each model's file, `prepare_statistics` estimates those the config asks
to estimate, `open_statistics` reads their headers, and `statistic_sources` picks each model's
statistic of a tensor: the plan checks that each Fisher file holds every merged tensor in the
model's shape (a tying model's embedding Fisher serves as its lm_head's), and that the Gram
files hold, for the same weights in every model, Grams of their input size. The statistics are
then read like the models, tensor by tensor, in float32, and given to the leaf as its `fisher` or
`gram` input; a tensor without Grams (embeddings, norms, biases) is merged without.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from jax.sharding import Mesh, NamedSharding

from jkarcher import distributed, fisher, grams
from jkarcher.config import FISHER_INPUT, GRAM_INPUT, ConfigError, MergeConfig
from jkarcher.errors import MergeError
from jkarcher.io import CheckpointError, StoredTensor, TensorInfo
from jkarcher.io.statistics_files import has_recipe
from jkarcher.sharding import padded_shape, replicated, row_sharding


@dataclasses.dataclass(frozen=True)
class _Kind:
    """What the pipeline needs of one kind of statistic: its noun in messages, its file's name
    and place beside a model, how to read a file's headers, its recipe, and its estimator
    (reached on first use, since it imports Flax)."""

    noun: str
    file_name: str
    beside: Callable[[str], Path]
    headers: Callable[[str, Path], dict[str, TensorInfo]]
    recipe: Callable[..., dict[str, str]]
    estimate: Callable[..., object]


_KINDS = {
    FISHER_INPUT: _Kind(
        "the Fisher",
        fisher.FISHER_NAME,
        fisher.fisher_path,
        fisher.fisher_tensors,
        fisher.estimate_recipe,
        lambda *args, **kwargs: fisher.checkpoint_fisher(*args, **kwargs),
    ),
    GRAM_INPUT: _Kind(
        "the Grams",
        grams.GRAMS_NAME,
        grams.grams_path,
        grams.gram_tensors,
        grams.gram_recipe,
        lambda *args, **kwargs: grams.checkpoint_grams(*args, **kwargs),
    ),
}


def statistic_files(config: MergeConfig) -> tuple[Path, ...]:
    """Each model's statistics file as `params.fisher` or `params.gram` places it: a file
    given, the statistic's file (fisher.safetensors, grams.safetensors) in a directory given,
    or that file beside the model."""
    name, settings = config.statistic
    kind = _KINDS[name]
    if settings.files is None:
        return tuple(kind.beside(entry.path) for entry in config.models)
    paths = (Path(p).expanduser() for p in settings.files)
    return tuple(p / kind.file_name if p.is_dir() else p for p in paths)


def prepare_statistics(config: MergeConfig, progress: bool = False) -> list:
    """Estimate the statistics that `params.fisher` or `params.gram` = {"text": FILE, ...} asks
    for and that are not yet beside the models, made by the same text and settings; return what
    was estimated (`jkarcher.models.calibration.CalibrationRun`s).

    Each estimate is `jkarcher.fisher.checkpoint_fisher` or `jkarcher.grams.checkpoint_grams`
    of one model on the text, written atomically in the model's directory. With several
    processes, process 0 estimates and the others wait for it. Nothing is done for the other
    forms of the settings.
    """
    if config.statistic is None or config.statistic[1].estimate is None:
        return []
    name, settings = config.statistic
    estimate = dataclasses.asdict(settings.estimate)
    text = Path(estimate.pop("text")).expanduser()
    if not text.is_file():
        raise ConfigError(f"params.{name}.text: {text} is not a file")
    kind = _KINDS[name]
    recipe = kind.recipe(text, **estimate)
    runs = []
    if distributed.is_leader():
        for entry, path in zip(config.models, statistic_files(config), strict=True):
            if not has_recipe(path, recipe):
                runs.append(
                    kind.estimate(entry.path, text, output=path, progress=progress, **estimate)
                )
    distributed.barrier("statistics estimates written")
    return runs


def open_statistics(
    config: MergeConfig, labels: Sequence[str]
) -> tuple[dict[str, TensorInfo], ...]:
    """The headers of each model's statistics file; a missing one is an error naming it."""
    name = config.statistic[0]
    opened = []
    for path, entry, label in zip(statistic_files(config), config.models, labels, strict=True):
        try:
            opened.append(_KINDS[name].headers(entry.path, path))
        except CheckpointError as err:
            noun = _KINDS[name].noun
            raise CheckpointError(f"params.{name}, {noun} of {label}: {err}") from None
    return tuple(opened)


def statistic_labels(name: str, labels: Sequence[str]) -> tuple[str, ...]:
    """What each model's statistics are called in messages: 'the Fisher of model 0 (PATH)'."""
    return tuple(f"{_KINDS[name].noun} of {label}" for label in labels)


def statistic_sources(
    name: str,
    sources: Sequence[StoredTensor],
    model_infos: Sequence[StoredTensor],
    opened: Sequence[Mapping[str, TensorInfo]],
    labels: Sequence[str],
) -> tuple[TensorInfo, ...]:
    """Each model's statistic of the tensor that `sources[i]` (model i's rows of it) merges:
    the Fisher of those rows, or the Gram of the tensor's inputs, () where no model has Grams
    of it (a tensor that is not a linear layer's weight)."""
    if name == FISHER_INPUT:
        return _fisher_sources(sources, model_infos, opened, labels)
    return _gram_sources(model_infos, opened, labels)


def _fisher_sources(sources, model_infos, opened, labels) -> tuple[TensorInfo, ...]:
    """The Fisher's tensor named like the model's tensor (`model_infos[i]`, the embedding for
    the lm_head of a model that ties them), of its shape, cut to the rows merged."""
    chosen = []
    for full, infos, label, source in zip(model_infos, opened, labels, sources, strict=True):
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


def _gram_sources(model_infos, opened, labels) -> tuple[TensorInfo, ...]:
    """The Gram named like the weight, [in, in] for a weight [out, in], in every model or none."""
    names = [full.name for full in model_infos]
    having = [name in infos for name, infos in zip(names, opened, strict=True)]
    if not any(having):
        return ()
    if not all(having):
        lacking, having_one = having.index(False), having.index(True)
        raise MergeError(
            f"tensor {names[lacking]!r} has no Gram in {labels[lacking]}, but has one in "
            f"{labels[having_one]}; the Gram files must hold the same weights"
        )
    chosen = []
    for full, infos, label in zip(model_infos, opened, labels, strict=True):
        info = infos[full.name]
        inputs = full.shape[-1]
        if len(full.shape) != 2 or info.shape != (inputs, inputs):
            raise MergeError(
                f"tensor {full.name!r} has shape {list(full.shape)} in the model ({full.file}), "
                f"but its Gram in {label} ({info.file}) has shape {list(info.shape)}, not "
                f"{[inputs, inputs]}"
            )
        chosen.append(info)
    return tuple(chosen)


def statistic_placement(
    name: str, source_shape: tuple[int, ...], statistic_shape: tuple[int, ...], mesh: Mesh
) -> tuple[tuple[int, ...], NamedSharding]:
    """(global shape, sharding) a statistic is read with: a Fisher split by rows and padded like
    its tensor's sources; a Gram [in, in] whole on every device (the leaf needs all of it for
    each row of the weight)."""
    if name == FISHER_INPUT:
        shape = padded_shape(source_shape, mesh)
        return shape, row_sharding(mesh, len(shape))
    return tuple(statistic_shape), replicated(mesh)
