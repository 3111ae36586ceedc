"""Diagonal Fisher information of a model on calibration data, estimated once and saved
(docs/design.md, "Module map").

  diagonal    the estimator: `diagonal_fisher` of any categorical model through a
              `predict_fn(params, batch)` returning (logits [..., V], targets [...], mask [...]),
              and `causal_lm_fisher` for the Flax decoder of `jkarcher.models` (the module's
              docstring derives the estimator and why it is unbiased)
  checkpoint  `checkpoint_fisher`: the estimate for a checkpoint on disk from a text file, saved
              with its recipe
  files       `fisher.safetensors` beside a checkpoint, with the checkpoint's tensor names:
              `save_fisher` writes it, `load_fisher` / `fisher_tensors` read it back, and
              `estimate_recipe` / `has_recipe` tell a merge whether a saved estimate is current
"""

import importlib

from jkarcher.config import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN, ESTIMATORS
from jkarcher.fisher.files import (
    FISHER_NAME,
    estimate_recipe,
    fisher_path,
    fisher_tensors,
    has_recipe,
    load_fisher,
    save_fisher,
)

# The estimators run the Flax model, whose import costs a merge's start about 0.3 s; a merge that
# only reads saved Fishers never needs them, so they load on first use.
_ESTIMATOR_MODULES = {
    "Batch": "diagonal",
    "Params": "diagonal",
    "PredictFn": "diagonal",
    "causal_lm_fisher": "diagonal",
    "causal_lm_predictions": "diagonal",
    "diagonal_fisher": "diagonal",
    "next_token_mask": "diagonal",
    "score_objective": "diagonal",
    "FisherError": "checkpoint",
    "FisherRun": "checkpoint",
    "checkpoint_fisher": "checkpoint",
}


def __getattr__(name: str):
    if name in _ESTIMATOR_MODULES:
        module = importlib.import_module(f"jkarcher.fisher.{_ESTIMATOR_MODULES[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SEQ_LEN",
    "ESTIMATORS",
    "FISHER_NAME",
    "Batch",
    "FisherError",
    "FisherRun",
    "Params",
    "PredictFn",
    "causal_lm_fisher",
    "causal_lm_predictions",
    "checkpoint_fisher",
    "diagonal_fisher",
    "estimate_recipe",
    "fisher_path",
    "fisher_tensors",
    "has_recipe",
    "load_fisher",
    "next_token_mask",
    "save_fisher",
    "score_objective",
]
