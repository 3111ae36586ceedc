"""The merge config: its schema, defaults and validation (docs/design.md, "Data flow").

A config file `configs/NAME.py` defines `get_config()` returning an `ml_collections.ConfigDict`;
starting from `base_config()` gives every field its default, so that any field can be overridden
on the command line (`--config.output=/tmp/x`). `validate` turns the ConfigDict (or any mapping)
into a frozen `MergeConfig`, checking each field and the method's parameters through the
registry; every error names the field.

  schema     the fields, each with what it means and its default (`MergeConfig`, `FIELDS`,
             `base_config`)
  settings   values that vary by tensor (gradients over the layers, filters on the tensor name)
             and their resolution for one tensor (`tensor_values`)
  slices     the `slices` field (frankenmerges and merges by slice), checked slice by slice
  validate   `validate` and `distributed_settings`
  params     the method's parameters resolved through the registry
  fields     the parsers of scalar fields (sizes, paths, flags, counts, the mesh, the dtype)
  tokens     the `tokens` field (tokens added to a vocabulary that tokenizer_source builds)
"""

from jkarcher.config.fields import (
    OUTPUT_DTYPES,
    OUTPUT_FORMATS,
    ConfigError,
    parse_size,
)
from jkarcher.config.schema import (
    BESIDE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_SEQ_LEN,
    DEFAULT_SHARD_SIZE,
    DEFAULT_WEIGHT,
    DISTRIBUTED_FIELDS,
    ESTIMATORS,
    FIELDS,
    FISHER_ESTIMATE_FIELDS,
    FISHER_INPUT,
    GRAM_ESTIMATE_FIELDS,
    GRAM_INPUT,
    MODEL_FIELDS,
    DistributedSettings,
    FisherEstimate,
    GramEstimate,
    MergeConfig,
    ModelEntry,
    StatisticSettings,
    base_config,
)
from jkarcher.config.settings import (
    Filtered,
    Gradient,
    Rule,
    setting_at,
    tensor_values,
)
from jkarcher.config.validate import distributed_settings, validate

__all__ = [
    "BESIDE",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SEQ_LEN",
    "DEFAULT_SHARD_SIZE",
    "DEFAULT_WEIGHT",
    "DISTRIBUTED_FIELDS",
    "ESTIMATORS",
    "FIELDS",
    "FISHER_ESTIMATE_FIELDS",
    "FISHER_INPUT",
    "GRAM_ESTIMATE_FIELDS",
    "GRAM_INPUT",
    "MODEL_FIELDS",
    "OUTPUT_DTYPES",
    "OUTPUT_FORMATS",
    "ConfigError",
    "DistributedSettings",
    "Filtered",
    "FisherEstimate",
    "Gradient",
    "GramEstimate",
    "MergeConfig",
    "ModelEntry",
    "Rule",
    "StatisticSettings",
    "base_config",
    "distributed_settings",
    "parse_size",
    "setting_at",
    "tensor_values",
    "validate",
]
