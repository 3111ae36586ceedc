"""Qwen2.5-0.5B and its Instruct version, merged with the Karcher mean (equal weights, bfloat16).

    python scripts/merge.py --config configs/qwen05b_pair.py

Both models must be in the local Hugging Face cache; the merge never uses the network.
"""

from jkarcher.config import base_config


def get_config():
    config = base_config()
    config.method = "karcher"
    config.models = [
        {"path": "Qwen/Qwen2.5-0.5B", "weight": 1.0},
        {"path": "Qwen/Qwen2.5-0.5B-Instruct", "weight": 1.0},
    ]
    config.dtype = "bfloat16"
    config.output = "merged/qwen2.5-0.5b-karcher-pair"
    return config
