"""Names of a package that load their module on first use, so that importing the package stays
cheap (the Fisher and Gram estimators run the Flax model, whose import costs a merge's start
about 0.3 s, and a merge that only reads saved statistics never needs them)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(package: str, modules: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` that imports `package.modules[name]` when `name` is
    first asked for and returns its attribute `name`."""

    def module_getattr(name: str) -> Any:
        if name in modules:
            return getattr(importlib.import_module(f"{package}.{modules[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return module_getattr
