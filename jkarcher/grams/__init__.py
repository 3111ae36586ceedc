"""RegMean's statistics: the input Gram matrix of every linear layer of a model on calibration
data, estimated once and saved (docs/design.md, "Module map").

  estimate    `causal_lm_grams`: the Grams of the Flax decoder of `jkarcher.models` on token
              batches (the module's docstring states what is computed)
  checkpoint  `checkpoint_grams`: the Grams of a checkpoint on disk from a text file, saved with
              their recipe
  files       `grams.safetensors` beside a checkpoint, each Gram under its weight's name:
              `gram_tensors` reads its headers, `load_grams` the pytree `jkarcher.merge` takes,
              `gram_recipe` tells a merge whether a saved estimate is current
"""

from jkarcher.grams.files import GRAMS_NAME, gram_recipe, gram_tensors, grams_path, load_grams
from jkarcher.lazy import lazy_names

# The estimators run the Flax model: they load on first use (`jkarcher.lazy`).
__getattr__ = lazy_names(
    __name__, {"causal_lm_grams": "estimate", "checkpoint_grams": "checkpoint"}
)


__all__ = [
    "GRAMS_NAME",
    "causal_lm_grams",
    "checkpoint_grams",
    "gram_recipe",
    "gram_tensors",
    "grams_path",
    "load_grams",
]
