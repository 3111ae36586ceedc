"""The 14B pool of Wang, Ye, Yin (2026): eleven Qwen2.5-14B-compatible models, Karcher mean, equal
weights, bfloat16.

    python scripts/merge.py --config configs/qwen14b.py --config.output=/data/qwen14b-karcher

Every model must be in the local Hugging Face cache (e.g. `huggingface-cli download ID`); the
merge itself never uses the network. Their vocabulary sizes differ: the shared rows of the
embeddings are merged and the rest come from the first model (a warning says so).
"""

from jkarcher.config import base_config

POOL = (
    "Qwen/Qwen2.5-14B",
    "Qwen/Qwen2.5-14B-Instruct-1M",
    "Qwen/Qwen2.5-Coder-14B-Instruct",
    "Krystalan/DRT-14B",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
    "nvidia/OpenReasoning-Nemotron-14B",
    "deepcogito/cogito-v1-preview-qwen-14B",
    "arcee-ai/SuperNova-Medius",
    "netease-youdao/Confucius-o1-14B",
    "sthenno-com/miscii-14b-0218",
    "prithivMLmods/Galactic-Qwen-14B-Exp2",
)


def get_config():
    config = base_config()
    config.method = "karcher"
    config.models = [{"path": model, "weight": 1.0} for model in POOL]
    config.dtype = "bfloat16"
    config.output = "merged/qwen2.5-14b-karcher-pool11"
    return config
