"""Print the README's table of merge methods (Markdown), generated from the method registry.

python scripts/methods_table.py
"""

from __future__ import annotations

from absl import app

from jkarcher.methods.table import methods_table_markdown


def main(argv: list[str]) -> None:
    del argv
    print(methods_table_markdown())


if __name__ == "__main__":
    app.run(main)
