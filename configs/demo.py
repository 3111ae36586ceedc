"""The built-in demo: merge three tiny random Qwen2-layout experts with the Karcher mean.

    python scripts/merge.py --config configs/demo.py

The experts live under cache/demo. Reading this config writes nothing: the run writes the
experts the first time it needs them (scripts/merge.py makes missing demo experts before it plans
the merge, `jkarcher.demo.make_missing_demo_models`; a second or so). The merge goes to
./demo_out, replaced on each run.
"""

from pathlib import Path

from jkarcher import demo
from jkarcher.config import base_config

REPO = Path(__file__).resolve().parents[1]


def get_config():
    config = base_config()
    config.method = "karcher"
    config.models = [{"path": str(p)} for p in demo.demo_models(REPO / "cache" / "demo")]
    config.dtype = "bfloat16"
    config.output = "demo_out"
    config.overwrite = True
    return config
