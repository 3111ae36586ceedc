"""Merge methods: one small module per family, each registering its leaf functions.

`get(name)` returns a `MergeMethod` (its `leaf` function, declared parameters, base needs);
`names()` lists them. Importing this package registers every method.
"""

from jkarcher.methods import karcher, linear  # noqa: F401  (registration side effects)
from jkarcher.methods.registry import (
    BASE_NONE,
    BASE_OPTIONAL,
    BASE_REQUIRED,
    MergeMethod,
    MethodError,
    Param,
    get,
    names,
    register,
)

__all__ = [
    "BASE_NONE",
    "BASE_OPTIONAL",
    "BASE_REQUIRED",
    "MergeMethod",
    "MethodError",
    "Param",
    "get",
    "names",
    "register",
]
