"""README.md opens with the two commands, CI runs its test command, and its tables are current."""

import re
from pathlib import Path

from jkarcher.methods.table import methods_table_markdown
from jkarcher.zoo import report

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _opening_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block is not None and README.index(block.group(0)) < README.index("\n## ")
    return block.group(1).strip().splitlines()


def test_readme_opens_with_the_demo_and_the_test_commands():
    run_demo, run_tests = _opening_commands()
    assert (
        "pip install -e ." in run_demo and "scripts/merge.py --config configs/demo.py" in run_demo
    )
    assert 'pip install -e ".[test]"' in run_tests and run_tests.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _opening_commands()[1] in ci


def test_methods_table_is_the_registry_s():
    assert methods_table_markdown() in README


def test_results_section_is_marked_for_the_study():
    assert README.index(report.README_BEGIN) < README.index(report.README_END)
