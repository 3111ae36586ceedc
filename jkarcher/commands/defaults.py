"""Every field at its default: the config that `jkarcher-merge --mergekit-yaml FILE.yml` starts
from, so that `--config.output=DIR` (and any other `--config.FIELD=VALUE`) sets the run's fields.
"""

from jkarcher.config import base_config


def get_config():
    return base_config()
