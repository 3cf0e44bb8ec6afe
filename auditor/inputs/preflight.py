"""Checks before any work: the outputs can be written, and what killed runs left behind is cleared.

A run writes into a hidden ``<out>/.<run-id>.partial`` folder and renames it when complete
(``auditor.outputs.write``); a run killed before the rename leaves that folder behind. It is
removed here when it is surely not a running audit's: its owner marker (``mark_partial``) names
a process of this machine that has ended, or, without a marker or from another machine, nothing
in it has changed for ``older_than_s``.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

from auditor.inputs.config import ConfigError

PARTIAL = re.compile(r"^\.(?P<id>[^/]+)\.partial$")
OWNER = ".owner"                 # "<hostname> <pid>" of the run writing a partial folder
STALE_AFTER_S = 6 * 3600         # no write for this long: no live run is writing there


def _probe(folder: Path, prefix: str) -> None:
    """Create and remove a file in ``folder``: the only test of writability that root, ACLs and
    read-only mounts all answer truthfully."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".auditor-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise ConfigError(f"{prefix}: cannot write in {folder}: {e.strerror or e}") from None


def _writable_folder(folder: Path, prefix: str) -> None:
    """``folder`` exists as a writable folder, or can be created (its nearest existing parent is one)."""
    if folder.exists():
        if not folder.is_dir():
            raise ConfigError(f"{prefix}: {folder} is not a folder")
        _probe(folder, prefix)
        return
    parent = folder.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{prefix}: cannot create {folder}: {parent} is not a folder")
    _probe(parent, prefix)


def check_outputs(out: Path, junit: Path | None = None) -> None:
    """Raise a one-line ConfigError when the run folder's parent ``out`` (``--out`` or report.out)
    or the JUnit file's folder cannot be written (or, where missing, created), before any work."""
    _writable_folder(Path(out), "output folder")
    if junit is not None:
        junit = Path(junit)
        if junit.is_dir():
            raise ConfigError(f"--junit {junit}: is a folder; give the path of a file")
        _writable_folder(junit.parent, f"--junit {junit}")
        if junit.exists() and not os.access(junit, os.W_OK):
            raise ConfigError(f"--junit {junit}: the file exists and is read-only")


def mark_partial(folder: Path) -> None:
    """Record this process as the writer of the partial run folder ``folder``."""
    (Path(folder) / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # someone else's process: alive
    return True


def _newest_change(folder: Path) -> float:
    newest = folder.lstat().st_mtime
    for dirpath, dirnames, filenames in os.walk(folder):  # does not follow symlinks
        for name in dirnames + filenames:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except OSError:
                pass
    return newest


def _stale(folder: Path, older_than_s: float, now: float) -> bool:
    try:
        host, pid = (folder / OWNER).read_text().split()
        if host == socket.gethostname():
            return not _alive(int(pid))
    except (OSError, ValueError):
        pass  # no marker (or unreadable): judge by age
    return now - _newest_change(folder) > older_than_s


def clean_stale_partials(out: Path, older_than_s: float = STALE_AFTER_S) -> list[str]:
    """Remove the ``.<id>.partial`` folders in ``out`` that killed runs left; return their names.

    A folder whose marker names a live process of this machine is never removed; one whose
    marker names an ended process is; one without a marker (or from another machine) is removed
    when nothing in it has changed for ``older_than_s`` seconds."""
    out = Path(out)
    if not out.is_dir():
        return []
    removed, now = [], time.time()
    for entry in sorted(out.iterdir()):
        if not PARTIAL.match(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            if _stale(entry, older_than_s, now):
                shutil.rmtree(entry)
                removed.append(entry.name)
        except OSError:
            continue  # being removed by another process, or not ours to remove
    return removed
