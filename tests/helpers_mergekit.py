"""mergekit (and FusionBench) as test oracles: whether they are installed, and `mergekit-yaml`
run on YAML files.

Tests that need an oracle are skipped without it, except in CI (CI=true), where it must be
installed and they fail instead.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

# mergekit-yaml's entry point on each (config, output) pair of the arguments, in one process.
RUN_MERGEKIT_YAML = """
import sys
from mergekit.scripts.run_yaml import main
options = sys.argv[1].split()
for config, out in zip(sys.argv[2::2], sys.argv[3::2]):
    main([config, out, "--quiet", *options], standalone_mode=False)
"""


def require_oracle(module: str = "mergekit") -> None:
    """Skip the calling test without the test oracle `module` (mergekit, or FusionBench's
    `fusion_bench`), or fail it in CI."""
    if module not in sys.modules and importlib.util.find_spec(module) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{module} must be installed in CI (pip install -e '.[test]')")
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")


def run_mergekit_yaml(
    files: Mapping[str, Path], root: Path, options: Sequence[str] = ()
) -> dict[str, Path]:
    """Each YAML file merged by `mergekit-yaml` (with `options`) into root / its name's stem, on
    the CPU and without network; returns the outputs by the files' keys."""
    require_oracle()
    outputs = {key: root / Path(path).stem for key, path in files.items()}
    arguments = [str(a) for key in files for a in (files[key], outputs[key])]
    environment = os.environ | {
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", RUN_MERGEKIT_YAML, " ".join(map(str, options)), *arguments],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return outputs
