"""The parsers of a config's scalar fields: paths, sizes, flags, counts, the mesh, the dtype.

Each takes the value a config gives (and the name of its field, where one parser serves several
fields), returns the value `MergeConfig` holds, and raises `ConfigError` naming the field for a
bad one (docs/design.md, "Conventions": errors name the field in one line).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jkarcher.errors import JkarcherError

OUTPUT_DTYPES: dict[str, np.dtype] = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
}
OUTPUT_FORMATS = ("safetensors", "orbax")
_SIZE_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


class ConfigError(JkarcherError):
    """A config field is missing, unknown or has a bad value; the message names the field."""


def check_known(value: Mapping[str, Any], fields: Sequence[str], field: str) -> None:
    """Raise ConfigError naming the first key of `value` that is not one of `fields`."""
    unknown = sorted(set(value) - set(fields))
    if unknown:
        where = f"{field}: " if field else ""
        raise ConfigError(
            f"{where}unknown field {unknown[0]!r} (the fields are: {', '.join(fields)})"
        )


def optional_text(value: Any, field: str) -> str | None:
    """A path or hub id as text (a `Path` becomes text); None stays None."""
    if value is None:
        return None
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{field}: must be a path or hub id, got {value!r}")
    return value


def path(value: Any, field: str) -> str:
    """A path or hub id that must be given."""
    text = optional_text(value, field)
    if text is None:
        raise ConfigError(f"{field}: must be a path, got None")
    return text


def output(value: Any) -> Path:
    """The output directory (`~` expanded)."""
    text = optional_text(value, "output")
    if text is None:
        raise ConfigError("output: required (the directory to write the merged model to)")
    return Path(text).expanduser()


def parse_size(value: Any, field: str) -> int:
    """A byte count from an int or text like "5GB" (10^9), "500MB", "2GiB" (2^31), "1.5G".

    A number followed by B alone is billions of bytes, as mergekit reads its `out_shard_size`
    ("5B", its default, is 5 * 10^9 bytes; "500M" and "1000K" read the same either way).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?(b?)\s*", value, re.IGNORECASE)
        if not match:
            raise ConfigError(f"{field}: cannot read {value!r} as a size (e.g. 5GB, 500MB, 2GiB)")
        number, unit, byte = match.groups()
        unit = "g" if byte and not unit else (unit or "").lower()
        size = int(float(number) * _SIZE_UNITS[unit])
    else:
        raise ConfigError(f"{field}: must be a byte count or text like '5GB', got {value!r}")
    if size <= 0:
        raise ConfigError(f"{field}: must be positive, got {value!r}")
    return size


def size_text(nbytes: float) -> str:
    """A byte count as `parse_size` reads it back, to three significant digits: "1.23GB",
    "456MB", "12.0kB"."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g}{unit}"
    return f"{int(nbytes)}B"


def optional_document(value: Any, field: str) -> str | None:
    """The text of a document (a config file's contents), or None."""
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{field}: must be text (a config file's contents), got {value!r}")
    return value


def flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{field}: must be True or False, got {value!r}")
    return value


def optional_count(value: Any, field: str, least: int) -> int | None:
    """An integer >= `least` (True and False are not integers here); None stays None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{field}: must be an integer >= {least}, got {value!r}")
    return value


def count(value: Any, field: str, least: int) -> int:
    """An integer >= `least` that must be given."""
    if value is None:
        raise ConfigError(f"{field}: must be an integer >= {least}, got None")
    return optional_count(value, field, least)


def seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"seed: must be an integer >= 0, got {value!r}")
    return value


def output_dtype(value: Any) -> str:
    """The name of an output dtype, one of `OUTPUT_DTYPES`."""
    if value not in OUTPUT_DTYPES:
        raise ConfigError(f"dtype: must be one of {', '.join(OUTPUT_DTYPES)}, got {value!r}")
    return value


def output_format(value: Any) -> str:
    """One of `OUTPUT_FORMATS`."""
    if value not in OUTPUT_FORMATS:
        raise ConfigError(f"format: must be one of {', '.join(OUTPUT_FORMATS)}, got {value!r}")
    return value


def mesh(value: Any) -> tuple[tuple[str, int], ...] | None:
    """(axis name, size) pairs from a mapping or text "data:2,model:4"; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        pairs = [part.partition(":") for part in value.split(",")]
        if not all(sep and name.strip() for name, sep, _ in pairs):
            raise ConfigError(f"mesh: cannot read {value!r}; write axes as 'data:2,model:4'")
        value = {name.strip(): _axis_size(size.strip(), name.strip()) for name, _, size in pairs}
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"mesh: must map axis names to sizes, e.g. {{'data': 8}}, got {value!r}")
    axes = []
    for name, size in value.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"mesh: axis name {name!r} is not a Python identifier")
        if isinstance(size, bool) or not isinstance(size, int) or not (size >= 1 or size == -1):
            raise ConfigError(f"mesh.{name}: must be a size >= 1, or -1, got {size!r}")
        axes.append((name, size))
    if sum(size == -1 for _, size in axes) > 1:
        raise ConfigError("mesh: at most one axis may have size -1")
    return tuple(axes)


def _axis_size(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"mesh.{name}: must be a size >= 1, or -1, got {text!r}") from None
