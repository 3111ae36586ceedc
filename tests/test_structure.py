"""The shape of the package: small modules, and no module that needs another to be imported
first (an import cycle works only in some orders, so each module is imported alone)."""

import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jkarcher"
MOST_LINES = 400


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_no_module_is_over_400_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MOST_LINES
    }
    assert not long, long


def _import_alone(module: str) -> tuple[str, int, str]:
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=os.environ | {"JAX_PLATFORMS": "cpu"},
        timeout=300,
    )
    return module, result.returncode, result.stderr[-2000:]


@pytest.mark.slow
def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    modules = _modules()
    assert "jkarcher.pipeline" in modules and "jkarcher.karcher" in modules
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        failed = [r for r in pool.map(_import_alone, modules) if r[1] != 0]
    assert not failed, failed


def test_the_merge_command_starts_without_the_flax_model():
    """A merge imports the Flax model only to estimate a Fisher (it adds ~0.3 s to every start)."""
    check = (
        "import sys, jkarcher.commands.merge; print(sorted(m for m in sys.modules if 'flax' in m))"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
