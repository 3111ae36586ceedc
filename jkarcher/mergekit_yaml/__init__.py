"""mergekit YAML configs, run by jkarcher: a mergekit config as the fields of a jkarcher config.

    python scripts/merge.py --mergekit-yaml ties.yml --config.output=merged

`translate(document, layer_count=...)` maps a parsed mergekit config (a dict) to the fields that
`jkarcher.config.validate` checks, with notes on what it accepts without effect; `read(path)`
parses a file and `load(path)` does both. What jkarcher cannot honour is an error that names the
field of the YAML file; nothing is dropped silently (docs/design.md, "Data flow").

What maps to what:
  merge_method                    method (the same names and parameters)
  models[i].model                 a model's path (a local directory, or a hub id in the local cache)
  models[i].parameters.weight     the model's weight (else parameters.weight, else 1)
  models[i].parameters.NAME       the model's own value of a per-model parameter (density, ...)
  parameters.NAME                 params.NAME
  a list of values                {"gradient": [...]}: interpolated over the layers
  - filter: TEXT  value: V        the same filter rules, first match wins
  base_model                      base_model; where mergekit merges the base as one of the
                                  models (slerp's t = 0 end; linear, passthrough and karcher, whose
                                  mergekit versions have no base role), jkarcher's model 0
  out_dtype, else dtype           dtype, the output dtype (arithmetic is float32 whatever the
                                  dtype)
  tokenizer_source: base          the base model's tokenizer (the output's reference model)
  slices                          one slice whose sources all span every layer, as models;
                                  other slices as slices, each source's layer_range with it (a
                                  slice's base_model among its sources); a slice's parameters
                                  and base_model come before the top-level ones
jkarcher's models are mergekit's in their order, less the base model, which mergekit lists among
them or adds to them.

  reader     reading a YAML file (`read`, `load`)
  translate  the translation of the fields (`translate`, `Translation`)
  values     parameter values in jkarcher's form, what changes nothing, the YAML's structure
  outputs    the output's dtype and tokenizer
  multi      multi-stage files, as mergekit-multi runs them (`load_stages`, `plan_stages`)
"""

from jkarcher.mergekit_yaml.reader import checkpoint_layer_count, load, read
from jkarcher.mergekit_yaml.translate import FIELDS, REFUSED_FIELDS, Translation, translate

__all__ = [
    "FIELDS",
    "REFUSED_FIELDS",
    "Translation",
    "checkpoint_layer_count",
    "load",
    "read",
    "translate",
]
