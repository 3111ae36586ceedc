"""Streaming merge of checkpoints on disk (Hugging Face or Orbax): plan, read ahead, merge, write,
rename.

Data flows one way (docs/design.md, "Data flow"), each stage a module that imports none after
it:

  `plan`     `plan_merge(config)` reads headers and config files only: every output tensor with
             its sources, all models checked for the same names and shapes (`vocab`: vocabulary
             rows and tied embeddings; `statistics`: Fisher and Gram files), the output layout
             fixed; any problem is an error here, before anything is written. `slices` plans a merge
             by slices: each output layer's sources from its slice's layers.
  `read`     a background thread reads the next tensors, each process only its devices' rows.
  `compile`  a second thread compiles the leaf function ahead for the shapes still to come
             (`placed`: the leaf placed on the mesh).
  `write`    each result streams into its planned place in the output (safetensors or Orbax);
             config, tokenizer files and model card follow.
  `run`      `run(plan)` drives them: the finished directory is renamed into place.

Methods that read each model's statistics besides its weights (its diagonal Fisher,
`params.fisher`; its input Grams, `params.gram`) read their files like the models;
`prepare_statistics(config)` first estimates those a config asks to estimate.
"""

from jkarcher.pipeline.compile import LeafCompiler, leaf_signature
from jkarcher.pipeline.placed import placed_leaf
from jkarcher.pipeline.plan import plan_merge
from jkarcher.pipeline.read import ReadAhead
from jkarcher.pipeline.run import MergeSummary, execution_order, run
from jkarcher.pipeline.statistics import prepare_statistics, statistic_files
from jkarcher.pipeline.tasks import MergePlan, TensorSettings, TensorTask
from jkarcher.pipeline.vocab import EMBED_SUFFIX, LM_HEAD_NAME, ties_embeddings
from jkarcher.pipeline.write import check_complete

__all__ = [
    "EMBED_SUFFIX",
    "LM_HEAD_NAME",
    "LeafCompiler",
    "MergePlan",
    "MergeSummary",
    "ReadAhead",
    "TensorSettings",
    "TensorTask",
    "check_complete",
    "execution_order",
    "leaf_signature",
    "placed_leaf",
    "plan_merge",
    "prepare_statistics",
    "run",
    "statistic_files",
    "ties_embeddings",
]
