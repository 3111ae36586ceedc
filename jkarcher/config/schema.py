"""The merge config's schema: every field once, with what it means and its default.

A config file `configs/NAME.py` defines `get_config()` returning an `ml_collections.ConfigDict`;
starting from `base_config()` gives every field its default, so that any field can be overridden
on the command line (`--config.output=/tmp/x`). `jkarcher.config.validate` turns the ConfigDict
(or any mapping) into the frozen `MergeConfig` below (docs/design.md, "Data flow").

The dataclasses here are the schema. Each field's comment says what it means; its default is the
validated value that a config leaving the field out gets. Where a config file writes the field
otherwise (text for a size, a typed placeholder for a value that is None until set, "karcher" for
the method a config file starts from), the field's metadata makes that written value. A field
without a default must be given. `FIELDS` (and `MODEL_FIELDS`, `DISTRIBUTED_FIELDS`,
`FISHER_ESTIMATE_FIELDS`), `base_config()` and the defaults `validate` fills in (`defaults()`)
are read from these declarations.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from ml_collections import config_dict

from jkarcher.config.fields import OUTPUT_DTYPES, parse_size
from jkarcher.config.settings import has_gradient, plain

DEFAULT_SHARD_SIZE = "5GB"
DEFAULT_WEIGHT = 1.0
FISHER_INPUT = "fisher"  # the tensor input `params.fisher` feeds
GRAM_INPUT = "gram"  # the tensor input `params.gram` feeds (RegMean's input Grams)
BESIDE = "beside"  # `params.fisher` / `params.gram`: the statistics file in each model's directory
ESTIMATORS = ("true", "empirical")  # of a diagonal Fisher (`jkarcher.fisher`)
DEFAULT_SEQ_LEN = 256  # tokens per window of a Fisher's or Grams' calibration text
DEFAULT_BATCH_SIZE = 8  # windows per batch of a Fisher's or Grams' estimate

_WRITTEN = "written"  # field metadata: makes the value a config file holds before it sets one
_UNDER_PARAMS = "under_params"  # field metadata: a config file writes it as `params.NAME`


def _written(make: Callable[[], Any], default: Any = dataclasses.MISSING) -> Any:
    """A field whose config files start from `make()`, and whose default is `default` (none:
    the field must be given)."""
    return dataclasses.field(default=default, metadata={_WRITTEN: make})


def _placeholder(kind: type) -> Callable[[], Any]:
    """Makes the value of a field that is None until set: a `kind` placeholder, so that
    `--config.NAME=VALUE` reads VALUE as a `kind`."""
    return functools.partial(config_dict.placeholder, kind)


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One model to merge: where it is, its weight, and its own method parameters."""

    # A local checkpoint directory, or a hub id found in the local Hugging Face cache.
    path: str
    # A number >= 0, or a `Gradient` or `Filtered` setting when it varies by tensor.
    weight: Any = DEFAULT_WEIGHT
    # This model's own values of the method's per-model parameters, over those in `params`.
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # A PEFT LoRA adapter directory (or hub id) applied to the model as its tensors are read
    # (mergekit's `model+lora`; `jkarcher.lora.applied`), or None.
    lora: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class SliceModel(ModelEntry):
    """One model of a slice: a `ModelEntry` and the consecutive layers of it that the slice
    merges (`jkarcher.config.slices`)."""

    # The model's layers [start, end): layers start .. end - 1, written [start, end].
    layer_range: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class SliceBase:
    """The base model of a slice: where it is, and the layers of it that the slice merges."""

    # A local checkpoint directory, or a hub id found in the local Hugging Face cache.
    path: str
    # The base model's layers [start, end), as many as each model of the slice gives.
    layer_range: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Slice:
    """Consecutive output layers, each merged from one layer of every model of the slice (the
    k-th layer of the slice from layer start + k of each model's `layer_range`), with the
    slice's own base model and method parameters (mergekit's output slice)."""

    # The slice's models, each {path, layer_range, weight, params}: see `SliceModel`.
    models: tuple[SliceModel, ...]
    # The slice's base model {path, layer_range}, or None.
    base_model: SliceBase | None = None
    # The method's parameters for this slice, resolved as `MergeConfig.params` are; written,
    # they are over the shared `params` (a name the slice gives replaces the shared value, its
    # filter rules falling back to it).
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        start, end = self.models[0].layer_range
        return end - start

    def plain(self) -> dict[str, Any]:
        return {
            "models": [
                {
                    "path": m.path,
                    "layer_range": list(m.layer_range),
                    "weight": plain(m.weight),
                    "params": plain(m.params),
                }
                | ({"lora": m.lora} if m.lora else {})
                for m in self.models
            ],
            "base_model": None
            if self.base_model is None
            else {"path": self.base_model.path, "layer_range": list(self.base_model.layer_range)},
            "params": plain(self.params),
        }


@dataclasses.dataclass(frozen=True)
class FisherEstimate:
    """How the Fishers that are missing beside the models are estimated (`params.fisher` given
    as a mapping; `jkarcher.fisher.checkpoint_fisher` takes these settings)."""

    # The UTF-8 text file to estimate on, tokenized with each model's own tokenizer.json.
    text: str
    # "true" (labels sampled from the model) or "empirical" (the text's next tokens).
    estimator: str = "true"
    # Tokens per window of the text.
    seq_len: int = DEFAULT_SEQ_LEN
    # Windows per batch.
    batch_size: int = DEFAULT_BATCH_SIZE
    # At most this many batches of the text; None: all of it.
    num_batches: int | None = None
    # Seed of the label samples (true Fisher) or random signs (empirical Fisher).
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class GramEstimate:
    """How the input Grams that are missing beside the models are estimated (`params.gram`
    given as a mapping; `jkarcher.grams.checkpoint_grams` takes these settings)."""

    # The UTF-8 text file to estimate on, tokenized with each model's own tokenizer.json.
    text: str
    # Tokens per window of the text.
    seq_len: int = DEFAULT_SEQ_LEN
    # Windows per batch.
    batch_size: int = DEFAULT_BATCH_SIZE
    # At most this many batches of the text; None: all of it.
    num_batches: int | None = None


@dataclasses.dataclass(frozen=True)
class StatisticSettings:
    """Where each model's statistics come from (its diagonal Fisher, `params.fisher`; its input
    Grams, `params.gram`): the files in `files`, one per model (a file, or a directory holding
    the statistic's file, fisher.safetensors or grams.safetensors), or else that file beside
    each model, estimated first where `estimate` is given."""

    # As a list [PATH, ...]: one file or directory per model.
    files: tuple[str, ...] | None = None
    # As a mapping {"text": FILE, ...}: estimated on a text where missing, and written beside
    # each model (`jkarcher.pipeline.prepare_statistics`; an estimate there made by other
    # settings or text is made again).
    estimate: FisherEstimate | GramEstimate | None = None

    def plain(self) -> Any:
        if self.files is not None:
            return list(self.files)
        if self.estimate is not None:
            return dataclasses.asdict(self.estimate)
        return BESIDE


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """How this process joins a merge run by several (`jkarcher.distributed.initialize`).

    Fields left unset are found in the environment as `jax.distributed.initialize` does (Slurm,
    Open MPI, Cloud TPU, JAX_COORDINATOR_ADDRESS).
    """

    # False: one process (the other fields stay unset).
    enabled: bool = False
    # "host:port" of process 0's coordinator.
    coordinator_address: str | None = _written(_placeholder(str), None)
    # How many processes take part.
    num_processes: int | None = _written(_placeholder(int), None)
    # This process's index, 0 .. num_processes - 1.
    process_id: int | None = _written(_placeholder(int), None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MergeConfig:
    """A validated merge config; `params` are resolved (defaults filled, per-model tuples), and
    values that vary by tensor are `Gradient` or `Filtered` settings, which `tensor_values`
    resolves for each tensor.

    Its fields, in order, are those of a config file (`FIELDS`), but for `fisher` and `gram`,
    which a config file writes as `params.fisher` and `params.gram`.
    """

    # Name of a registered merge method (`jkarcher.methods.names()`); config files start from
    # "karcher".
    method: str = _written(lambda: "karcher")
    # The models to merge, each {path, weight (default 1), params}: see `ModelEntry`.
    models: tuple[ModelEntry, ...] = _written(list)
    # Path or hub id of the base model, or None.
    base_model: str | None = _written(_placeholder(str), None)
    # Frankenmerges and merges by slice: the output's layers as consecutive slices, each of its
    # own models' layers, base model and params (see `Slice`), renumbered from 0 in order; the
    # embeddings come from the first slice's models, the other tensors outside the layers
    # (final norm, lm_head) from the last slice's. Given, `models` stays empty and `base_model`
    # unset. Empty: each of `models` gives all its layers.
    slices: tuple[Slice, ...] = _written(list, ())
    # The method's parameters (defaults from the registry); a list gives one value per model,
    # for the parameters that take one; any of them may vary by tensor
    # (`jkarcher.config.settings`). `params.fisher` and `params.gram` are the fields below.
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Output dtype: "bfloat16", "float16" or "float32".
    dtype: str = "bfloat16"
    # Output directory.
    output: Path = dataclasses.field(metadata={_WRITTEN: _placeholder(str)})
    # Most bytes per output file, written as text: "5GB", "500MB", "2GiB", "1000000".
    out_shard_size: int = _written(
        lambda: DEFAULT_SHARD_SIZE, parse_size(DEFAULT_SHARD_SIZE, "out_shard_size")
    )
    # The run's memory budget, as text like out_shard_size ("8GB"; `jkarcher.memory`).
    # None: half the memory available at the start (host, cgroup and accelerator's least).
    memory: int | None = _written(_placeholder(str), None)
    # Seed of the `jax.random` key that random methods draw from.
    seed: int = 0
    # Copy the tokenizer files of the base (or first) model into the output.
    copy_tokenizer: bool = True
    # The chat template set in the output's tokenizer_config.json (needs copy_tokenizer): "auto"
    # (the one most models have), "alpaca", "chatml", "llama3", "mistral", or a template's Jinja
    # text (see `jkarcher.io.chat_template`). None: the template model's is kept.
    chat_template: str | None = _written(_placeholder(str), None)
    # The output's vocabulary (needs copy_tokenizer; not with a Fisher): "base" (the base's,
    # else the first model's tokenizer; with slices, the first slice's), "union" (that one's
    # tokens, then the other models' it lacks) or a model's path (its tokenizer); every model's
    # embedding and lm_head rows are read in its token order (`jkarcher.pipeline.tokenizer`).
    # None: the rows all models share are merged, in the base's (else the first model's)
    # vocabulary.
    tokenizer_source: str | None = _written(_placeholder(str), None)
    # With tokenizer_source: tokens added to the output's vocabulary, each with where its rows
    # come from, {TOKEN: {source, force}} (`jkarcher.config.tokens`).
    tokens: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # With tokenizer_source: the output's embedding rows (and config.json's vocab_size) rounded
    # up to a multiple of this, each row past the tokens a model's mean row. None: no padding.
    pad_to_multiple_of: int | None = _written(_placeholder(int), None)
    # Replace an existing output directory, if it is an earlier jkarcher output (or empty); any
    # other directory is never replaced. On the command line, a config file's overwrite=True
    # covers only the output the file names.
    overwrite: bool = False
    # Merge models whose config.json disagree on the architecture (mergekit's name): by default
    # such models are refused, the differences listed.
    allow_crimes: bool = False
    # The mergekit YAML this config was translated from, as its file holds it (None: a config
    # file): written into the output as mergekit_config.yml, where mergekit keeps its config,
    # and shown in the model card.
    mergekit_config: str | None = _written(_placeholder(str), None)
    # Output format: "safetensors" (a Hugging Face checkpoint) or "orbax" (an Orbax checkpoint in
    # `params/` beside the same config, tokenizer and card files; see `jkarcher.io.orbax_io`).
    # Inputs of either format are recognized by their files.
    format: str = "safetensors"
    # The device mesh the merge runs on, as (axis name, size) pairs, written as text
    # "data:2,model:4" (a config given as a plain dict may use a mapping {"data": 2, "model": 4});
    # one size may be -1 (the devices the other axes leave). None: all devices on one axis.
    # Every tensor is split by rows over all the mesh's devices (`jkarcher.sharding`).
    mesh: tuple[tuple[str, int], ...] | None = _written(_placeholder(str), None)
    # Several processes (hosts) running one merge with `jax.distributed`: see
    # `DistributedSettings`.
    distributed: DistributedSettings = DistributedSettings()
    # Where each model's diagonal Fisher comes from, for the methods that take one (karcher,
    # optionally; fisher_merging, necessarily), written as `params.fisher`: "beside"
    # (fisher.safetensors in each model's directory), [PATH, ...] or {"text": FILE, ...}: see
    # `StatisticSettings`.
    fisher: StatisticSettings | None = dataclasses.field(
        default=None, metadata={_UNDER_PARAMS: FISHER_INPUT}
    )
    # Where each model's input Grams come from, for regmean, written as `params.gram`: "beside"
    # (grams.safetensors in each model's directory), [PATH, ...] or {"text": FILE, ...}: see
    # `StatisticSettings`.
    gram: StatisticSettings | None = dataclasses.field(
        default=None, metadata={_UNDER_PARAMS: GRAM_INPUT}
    )

    @property
    def statistic(self) -> tuple[str, StatisticSettings] | None:
        """(tensor input name, its settings) of the per-model statistic the merge reads, the
        Fisher or the Grams (a config gives at most one), or None."""
        if self.fisher is not None:
            return FISHER_INPUT, self.fisher
        if self.gram is not None:
            return GRAM_INPUT, self.gram
        return None

    @property
    def weights(self) -> tuple[Any, ...]:
        """The models' weights: numbers, or settings where a weight varies by tensor."""
        return tuple(m.weight for m in self.models)

    @property
    def all_models(self) -> tuple[ModelEntry, ...]:
        """Every model entry: those of `models`, or of each slice in turn."""
        return self.models + tuple(m for piece in self.slices for m in piece.models)

    @property
    def out_dtype(self) -> np.dtype:
        return OUTPUT_DTYPES[self.dtype]

    @property
    def varies_by_layer(self) -> bool:
        """Whether a weight or a parameter is a gradient over the layers."""
        return any(has_gradient(s) for s in (*self.weights, *self.params.values()))

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (lists, dicts, strings, numbers), field by field."""
        written = {
            "models": [
                {"path": m.path, "weight": plain(m.weight), "params": plain(m.params)}
                | ({"lora": m.lora} if m.lora else {})
                for m in self.models
            ],
            "slices": [piece.plain() for piece in self.slices],
            "params": plain(self.params)
            | ({self.statistic[0]: self.statistic[1].plain()} if self.statistic else {}),
            "output": str(self.output),
            "mesh": None if self.mesh is None else dict(self.mesh),
            "distributed": dataclasses.asdict(self.distributed),
        }
        return {name: written[name] if name in written else getattr(self, name) for name in FIELDS}


def _file_fields(schema: type) -> list[dataclasses.Field]:
    """The fields of `schema` that a config file writes, in order (all but those it writes
    under `params`)."""
    return [f for f in dataclasses.fields(schema) if _UNDER_PARAMS not in f.metadata]


def _names(schema: type) -> tuple[str, ...]:
    return tuple(f.name for f in _file_fields(schema))


FIELDS = _names(MergeConfig)
MODEL_FIELDS = _names(ModelEntry)
SLICE_FIELDS = _names(Slice)
SLICE_MODEL_FIELDS = _names(SliceModel)
SLICE_BASE_FIELDS = _names(SliceBase)
DISTRIBUTED_FIELDS = _names(DistributedSettings)
FISHER_ESTIMATE_FIELDS = _names(FisherEstimate)
GRAM_ESTIMATE_FIELDS = _names(GramEstimate)


def base_config() -> ml_collections.ConfigDict:
    """A ConfigDict with every field at its default (and `method` at "karcher", `models` empty,
    `output` unset); config files fill in the rest."""
    return _config_dict(MergeConfig)


def defaults(schema: type = MergeConfig) -> dict[str, Any]:
    """The default of every field of `schema` that has one, as a config file writes it, in plain
    data (None for a placeholder): what a config that leaves the field out means by it."""
    written = _config_dict(schema).to_dict()
    return {f.name: written[f.name] for f in _file_fields(schema) if not _required(f)}


def _config_dict(schema: type) -> ml_collections.ConfigDict:
    """The fields of `schema` as a config file starts from them (a field without a default only
    where the file starts from a value)."""
    config = ml_collections.ConfigDict()
    for f in _file_fields(schema):
        if _WRITTEN in f.metadata:
            config[f.name] = f.metadata[_WRITTEN]()
        elif _required(f):
            continue
        elif dataclasses.is_dataclass(f.default):
            config[f.name] = _config_dict(type(f.default))
        elif f.default_factory is not dataclasses.MISSING:
            config[f.name] = ml_collections.ConfigDict(f.default_factory())
        else:
            config[f.name] = f.default
    return config


def _required(f: dataclasses.Field) -> bool:
    """Whether a field has no default (a config must give it)."""
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
