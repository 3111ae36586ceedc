"""Merge methods: one small module per family, each registering its leaf functions.

`get(name)` returns a `MergeMethod` (its `leaf` function, declared parameters, base needs);
`names()` lists them. Importing this package registers every method.
"""

from jkarcher.methods import (  # noqa: F401  (registration side effects)
    arcee_fusion,
    fisher_merging,
    karcher,
    linear,
    model_stock,
    nearswap,
    passthrough,
    ram,
    regmean,
    sce,
    slerp,
    subspace,
    task_arithmetic_methods,
)
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
    unregister,
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
    "unregister",
]
