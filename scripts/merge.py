"""Merge checkpoints as a config file or a mergekit YAML says: `jkarcher-merge` from a checkout.

    python scripts/merge.py --config configs/demo.py
    python scripts/merge.py --mergekit-yaml ties.yml --config.output=/data/merged

`python scripts/merge.py --help` (or `jkarcher/commands/merge.py`) tells the rest.
"""

import signal

# Ctrl-C while the libraries load ends the program quietly; `jkarcher-merge` then installs its
# own handlers, which stop a merge with one line and remove what it staged.
signal.signal(signal.SIGINT, signal.SIG_DFL)

from jkarcher.commands import merge  # noqa: E402

if __name__ == "__main__":
    merge.main()
