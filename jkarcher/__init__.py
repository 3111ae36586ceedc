"""jkarcher: merge fine-tuned models in weight space with the weighted Karcher mean, in JAX."""

from jkarcher import methods
from jkarcher.errors import JkarcherError, MergeError
from jkarcher.karcher import KarcherInfo, karcher_mean
from jkarcher.merge import merge

__version__ = "0.1.0"

__all__ = ["JkarcherError", "KarcherInfo", "MergeError", "karcher_mean", "merge", "methods"]
