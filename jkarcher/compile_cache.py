"""The persistent cache of compiled leaf functions, shared between runs.

A merge compiles one leaf function per distinct `jkarcher.pipeline.compile.leaf_signature`; for a
Qwen2 checkpoint that is seven compilations of about 0.8 s each on a 2-core machine. JAX's own
persistent cache removes the compilation from a second run, but not the tracing and lowering
that find its cache key: about 0.2 s a leaf, on the same two cores that read and merge. So a
single-process merge keeps its leaves here itself, keyed by what they are compiled from (`key`):
the leaf's signature and mesh, the jkarcher source, the JAX and XLA versions, the devices, the
XLA flags and the JAX settings that change a program. A second run loads each leaf in a few
milliseconds without tracing it. A run of several processes (`jkarcher.distributed`) uses JAX's
persistent cache instead, for every program it compiles.

JAX's persistent cache is off in a single-process run: an executable that JAX loaded from its
cache does not serialize whole, so only executables compiled in this run are stored.

The directory is `JKARCHER_COMPILE_CACHE` (or "off" to keep nothing), else JAX's own
`JAX_COMPILATION_CACHE_DIR`, else `$XDG_CACHE_HOME/jkarcher/jax` (`~/.cache/jkarcher/jax`). Its
files are programs this process will run: it must be the user's own, as JAX's cache must.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path

import jax
from jax.experimental import serialize_executable

OFF = "off"
# JAX settings that change the program a leaf compiles to.
_JAX_SETTINGS = (
    "jax_enable_x64",
    "jax_default_prng_impl",
    "jax_threefry_partitionable",
    "jax_default_matmul_precision",
)

_leaf_directory: Path | None = None


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
    """Keep compiled leaves under `directory` (None: keep nothing). Call it before anything is
    compiled, and after `jkarcher.distributed.initialize`."""
    global _leaf_directory
    if directory is None:
        return
    if jax.process_count() > 1:
        jax.config.update("jax_compilation_cache_dir", str(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        return
    jax.config.update("jax_enable_compilation_cache", False)
    _leaf_directory = directory / "leaves"


def key(*parts: object) -> str | None:
    """The cache key of a leaf compiled from `parts` (their reprs, which must name everything
    the program depends on besides what `key` adds), or None when no leaf cache is enabled."""
    if _leaf_directory is None:
        return None
    devices = [(d.platform, d.device_kind, d.id) for d in jax.devices()]
    settings = [(name, str(getattr(jax.config, name))) for name in _JAX_SETTINGS]
    versions = (jax.__version__, jax.lib.__version__)
    described = repr((_source_digest(), versions, devices, settings, os.environ.get("XLA_FLAGS")))
    return hashlib.sha256((described + repr(parts)).encode()).hexdigest()


def load(leaf_key: str | None) -> jax.stages.Compiled | None:
    """The leaf stored under `leaf_key`, or None where there is none (or it cannot be loaded),
    loaded onto the devices it was compiled for (JAX would otherwise load it onto every
    device: a leaf of a one-device mesh, on a host of eight, would then expect eight shards)."""
    if leaf_key is None or _leaf_directory is None:
        return None
    try:
        payload = (_leaf_directory / leaf_key).read_bytes()
        serialized, in_tree, out_tree, device_ids = pickle.loads(payload)
        by_id = {device.id: device for device in jax.devices()}
        devices = [by_id[i] for i in device_ids]
        return serialize_executable.deserialize_and_load(
            serialized, in_tree, out_tree, execution_devices=devices
        )
    except Exception:  # a missing, partly written or stale entry: compile instead
        return None


def store(leaf_key: str | None, compiled: jax.stages.Compiled) -> None:
    """Keep `compiled` (compiled in this process) under `leaf_key`; a cache that cannot be
    written is skipped, as the merge does not need it."""
    if leaf_key is None or _leaf_directory is None:
        return
    try:
        device_ids = [device.id for device in compiled.runtime_executable().local_devices()]
        payload = pickle.dumps((*serialize_executable.serialize(compiled), device_ids))
        _leaf_directory.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError, NotImplementedError, jax.errors.JaxRuntimeError):
        return
    descriptor, partial = tempfile.mkstemp(dir=_leaf_directory, prefix=".partial-")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(payload)
        os.replace(partial, _leaf_directory / leaf_key)
    except OSError:
        Path(partial).unlink(missing_ok=True)


@functools.cache
def _source_digest() -> str:
    """A digest of every Python file of the jkarcher package: leaves of other code never load."""
    digest = hashlib.sha256()
    package = Path(__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
