"""The built-in demo: merge three tiny random Qwen2-layout experts with the Karcher mean.

    python scripts/merge.py --config configs/demo.py

The experts are written under cache/demo the first time (a second or so); the merge goes to
./demo_out, replaced on each run.
"""

from pathlib import Path

from jkarcher import demo
from jkarcher.config import base_config

REPO = Path(__file__).resolve().parents[1]


def get_config():
    config = base_config()
    config.method = "karcher"
    config.models = [{"path": str(p)} for p in demo.ensure_demo_models(REPO / "cache" / "demo")]
    config.dtype = "bfloat16"
    config.output = "demo_out"
    config.overwrite = True
    return config
