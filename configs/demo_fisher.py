"""The built-in demo with Fisher preconditioning: the Fisher-Karcher mean of the three demo
experts, each weighted per coordinate by its diagonal Fisher.

    python scripts/merge.py --config configs/demo_fisher.py

Reading this config writes nothing. The run writes the experts under cache/demo the first time
it needs them (as for configs/demo.py), then estimates the Fishers on this repository's README.md
(tokenized with the experts' own tokenizer) the first time, and saves them as fisher.safetensors
beside the experts; later runs reuse them while the README and the settings stay the same. The
merge goes to ./demo_fisher_out, replaced on each run.
"""

from pathlib import Path

from jkarcher import demo
from jkarcher.config import base_config

REPO = Path(__file__).resolve().parents[1]


def get_config():
    config = base_config()
    config.method = "karcher"
    config.models = [{"path": str(p)} for p in demo.demo_models(REPO / "cache" / "demo")]
    config.params.fisher = {
        "text": str(REPO / "README.md"),
        "seq_len": 64,
        "batch_size": 4,
        "num_batches": 4,
    }
    config.dtype = "bfloat16"
    config.output = "demo_fisher_out"
    config.overwrite = True
    return config
