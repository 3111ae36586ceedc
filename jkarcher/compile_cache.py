"""The persistent cache of compiled leaf functions, shared between runs.

A merge compiles one leaf function per distinct tensor shape and static parameters; for a Qwen2
checkpoint that is about seven compilations, of about 0.8 s each on a 2-core machine, which the
first tensors wait for. JAX can keep compiled executables on disk, but by default it keeps only
those that took over a second to compile, which no leaf does. `enable` keeps every one, so that
a second merge of the same architecture loads its leaves instead of compiling them.

The directory is `JKARCHER_COMPILE_CACHE` (or "off" to keep nothing), else JAX's own
`JAX_COMPILATION_CACHE_DIR`, else `$XDG_CACHE_HOME/jkarcher/jax` (`~/.cache/jkarcher/jax`).
JAX keys every entry by the program, the JAX and XLA versions and the devices, so a stale entry
is never used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import jax

OFF = "off"


def cache_directory(environ: Mapping[str, str] = os.environ) -> Path | None:
    """Where compiled leaves are kept, from the environment (module docstring); None: nowhere."""
    chosen = environ.get("JKARCHER_COMPILE_CACHE") or environ.get("JAX_COMPILATION_CACHE_DIR")
    if chosen == OFF:
        return None
    if chosen:
        return Path(chosen).expanduser()
    cache_home = environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "jkarcher" / "jax"


def enable(directory: Path | None) -> None:
    """Keep every compiled executable under `directory` (None: leave JAX's cache off)."""
    if directory is None:
        return
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
