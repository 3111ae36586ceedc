"""The output directory: where a merge may write, and how its output appears only when complete.

Every output is written into a hidden staging directory beside it,
`.NAME.incomplete-HOST-PID-RANDOM` (HOST a hash of the host name, PID the writing process), and
renamed to NAME once everything in it is written; just before the rename, a manifest
(`.jkarcher-output.json`) records every entry jkarcher put there. So a directory called NAME is
always complete, and it can be told apart from a user's own directory.

A user's files are never deleted. With `overwrite`, an existing output is replaced only when it
is empty or an earlier jkarcher output holding nothing but the entries its manifest lists; any
other directory is refused with a few of its files named. Never replaced, with or without
`overwrite`: the working directory, the home directory, the root, a parent of any of them, and
a directory that is, holds or lies inside an input.

A staging directory whose process died (SIGKILL, a crash, a lost power) is removed by the next
run that writes the same output on the same host, with a warning that names it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from jkarcher.errors import JkarcherError

STAGING_MARK = ".incomplete-"
REPLACED_MARK = ".replaced-"
MANIFEST_NAME = ".jkarcher-output.json"
# Room kept free beyond the tensor data, for headers, config, tokenizer files and the card.
SIDE_FILES_BYTES = 64 * 2**20
# At most this many of a directory's files are named in an error.
FILES_NAMED = 5

log = logging.getLogger("jkarcher")


class OutputError(JkarcherError):
    """The output directory cannot be written as asked; the message names it."""


def check_output_dir(
    output: str | os.PathLike, inputs: Sequence[str | os.PathLike], overwrite: bool
) -> None:
    """Refuse, before any work, an output that a merge may not write (module docstring): one
    that overlaps an input, a protected directory, an existing directory without `overwrite`
    or one that jkarcher did not write, or a place that cannot be written."""
    target = Path(output).expanduser().resolve()
    for source in inputs:
        source = Path(source).resolve()
        if target == source or source in target.parents:
            raise OutputError(f"output {target} is inside the input model directory {source}")
        if target in source.parents:
            raise OutputError(f"the input model directory {source} is inside output {target}")
    _check_not_protected(target)
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise OutputError(f"output {target} exists and is not a directory")
        if not overwrite:
            raise OutputError(
                f"output {target} already exists; choose another output, or set overwrite=True "
                "(--config.overwrite=True) to replace an earlier jkarcher output"
            )
        check_replaceable(target)
    _check_writable(target)


def check_replaceable(target: Path) -> None:
    """Raise OutputError unless `target` is empty or an earlier jkarcher output holding only
    what its manifest lists."""
    entries = sorted(entry.name for entry in target.iterdir())
    if not entries:
        return
    listed = _manifest_entries(target)
    if listed is None:
        raise OutputError(
            f"output {target} exists and is not a jkarcher output (it holds "
            f"{_some(entries)}); it is never replaced: choose another output, or remove it "
            "yourself"
        )
    foreign = [name for name in entries if name not in listed and name != MANIFEST_NAME]
    if foreign:
        raise OutputError(
            f"output {target} is an earlier jkarcher output, but it also holds files jkarcher "
            f"did not write ({_some(foreign)}); it is not replaced: move those files, or "
            "choose another output"
        )


def check_free_space(output: str | os.PathLike, nbytes: int) -> None:
    """Raise OutputError when the disk that will hold `output` has less than `nbytes` (plus
    room for the side files) free."""
    target = Path(output).expanduser().resolve()
    place = _existing_ancestor(target.parent)
    free = shutil.disk_usage(place).free
    if free < nbytes + SIDE_FILES_BYTES:
        raise OutputError(
            f"not enough free space for output {target}: the merge writes "
            f"{nbytes / 1e9:.2f} GB, and the disk holding {place} has {free / 1e9:.2f} GB free"
        )


def staging_token() -> str:
    """A staging directory's suffix: this host's tag, this process's id and a random part."""
    return f"{host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def host_tag() -> str:
    """Eight hex digits that name this host (a hash of its name)."""
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def remove_stale_staging(output: str | os.PathLike) -> list[Path]:
    """Remove the staging directories of `output` left by processes of this host that no
    longer run, with a warning for each; return them."""
    target = Path(output).expanduser().absolute()
    prefix = f".{target.name}{STAGING_MARK}"
    if not target.parent.is_dir():
        return []
    removed = []
    for entry in sorted(target.parent.iterdir()):
        if not entry.name.startswith(prefix) or not entry.is_dir() or entry.is_symlink():
            continue
        host, _, rest = entry.name.removeprefix(prefix).partition("-")
        pid = rest.partition("-")[0]
        if host == host_tag() and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            log.warning(
                "removed %s, left unfinished by process %s, which no longer runs", entry, pid
            )
            removed.append(entry)
    return removed


@contextlib.contextmanager
def staged_directory(
    output: str | os.PathLike,
    overwrite: bool,
    *,
    token: str | None = None,
    leader: bool = True,
    barrier: Callable[[str], None] | None = None,
) -> Iterator[Path]:
    """Yield a fresh hidden directory beside `output`; rename it to `output` when the block ends.

    If the block raises (or is interrupted), the staging directory is deleted and `output` is left
    as it was. With `overwrite`, an existing output is replaced if `check_replaceable` allows it
    (checked again at the rename). Staging directories of dead processes are removed first.

    Several processes write one output by all passing the same `token` (which names the staging
    directory; `staging_token()` of one of them) and a `barrier(name)` that returns once every
    process has called it; the one `leader` creates the directory, and renames it only after
    every process has left its block without an error.
    """
    target = Path(output).expanduser().absolute()
    staging = target.parent / f".{target.name}{STAGING_MARK}{token or staging_token()}"
    wait = barrier or (lambda name: None)
    if leader:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(target)
        staging.mkdir()
    wait("staging directory created")
    try:
        yield staging
        wait("every part of the output written")
        if leader:
            _write_manifest(staging)
            _move_into_place(staging, target, overwrite)
    except BaseException:
        if leader:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    if not (target.exists() or target.is_symlink()):
        os.rename(staging, target)
        return
    if not overwrite:
        raise OutputError(f"output {target} appeared while this one was written; kept it as it is")
    check_replaceable(target)
    replaced = target.parent / f".{target.name}{REPLACED_MARK}{uuid.uuid4().hex[:8]}"
    os.rename(target, replaced)
    os.rename(staging, target)
    shutil.rmtree(replaced)


def _write_manifest(directory: Path) -> None:
    entries = sorted(entry.name for entry in directory.iterdir() if entry.name != MANIFEST_NAME)
    manifest = {"written_by": "jkarcher", "entries": entries}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def _manifest_entries(directory: Path) -> set[str] | None:
    """The entries a jkarcher output's manifest lists, or None when there is no valid one."""
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("written_by") != "jkarcher":
        return None
    entries = manifest.get("entries")
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        return None
    return set(entries)


def _check_not_protected(target: Path) -> None:
    """Refuse the working directory, the home directory, the root and their parents."""
    protected = {
        Path.cwd().resolve(): "the working directory",
        Path.home().resolve(): "the home directory",
    }
    for place, what in protected.items():
        if target == place or target in place.parents:
            relation = "is" if target == place else "is a parent of"
            raise OutputError(f"output {target} {relation} {what}; it is never written over")
    if target == Path(target.anchor):
        raise OutputError(f"output {target} is the root directory; it is never written over")


def _check_writable(target: Path) -> None:
    place = _existing_ancestor(target.parent)
    if not place.is_dir():
        raise OutputError(f"output {target}: {place} is not a directory")
    if not os.access(place, os.W_OK | os.X_OK):
        raise OutputError(f"output {target}: cannot write in {place} (read-only or no permission)")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _some(names: Sequence[str]) -> str:
    shown = ", ".join(names[:FILES_NAMED])
    more = len(names) - FILES_NAMED
    return f"{shown} and {more} more" if more > 0 else shown
