"""Diagonal Fisher information of a model on calibration data, estimated once and saved
(docs/design.md, "Module map").

  diagonal    the estimator: `diagonal_fisher` of any categorical model through a
              `predict_fn(params, batch)` returning (logits [..., V], targets [...], mask [...]),
              and `causal_lm_fisher` for the Flax decoder of `jkarcher.models` (the module's
              docstring derives the estimator and why it is unbiased)
  checkpoint  `checkpoint_fisher`: the estimate for a checkpoint on disk from a text file, saved
              with its recipe
  files       `fisher.safetensors` beside a checkpoint, with the checkpoint's tensor names
              (`jkarcher.models.save_statistics` writes it): `load_fisher` / `fisher_tensors`
              read it back, and `estimate_recipe` tells a merge whether a saved estimate is
              current
"""

from jkarcher.config import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN, ESTIMATORS
from jkarcher.fisher.files import (
    FISHER_NAME,
    estimate_recipe,
    fisher_path,
    fisher_tensors,
    load_fisher,
)
from jkarcher.lazy import lazy_names

# The estimators run the Flax model: they load on first use (`jkarcher.lazy`).
__getattr__ = lazy_names(
    __name__,
    {
        "Batch": "diagonal",
        "Params": "diagonal",
        "PredictFn": "diagonal",
        "causal_lm_fisher": "diagonal",
        "causal_lm_predictions": "diagonal",
        "diagonal_fisher": "diagonal",
        "next_token_mask": "diagonal",
        "score_objective": "diagonal",
        "checkpoint_fisher": "checkpoint",
    },
)


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SEQ_LEN",
    "ESTIMATORS",
    "FISHER_NAME",
    "Batch",
    "Params",
    "PredictFn",
    "causal_lm_fisher",
    "causal_lm_predictions",
    "checkpoint_fisher",
    "diagonal_fisher",
    "estimate_recipe",
    "fisher_path",
    "fisher_tensors",
    "load_fisher",
    "next_token_mask",
    "score_objective",
]
