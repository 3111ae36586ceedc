"""The command-line programs (docs/design.md, "Module map").

merge       `jkarcher-merge` (and `python scripts/merge.py`): a config file, or a mergekit YAML,
            with `--config.FIELD=VALUE` overrides
mergekit    `jkarcher-yaml CONFIG OUT [flags]`: a mergekit YAML with mergekit-yaml's command line
running     what both share: quiet interruption, running a validated config with its progress
defaults    the config every field at its default, that `--mergekit-yaml` runs start from
"""
