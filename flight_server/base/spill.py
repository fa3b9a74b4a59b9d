"""Spill folders: each DuckDB database spills into a folder of its own inside `--duckdb-temp-dir`.

DuckDB names its spill files the same in every database (`duckdb_temp_storage_S64K-0.tmp`, ...), so two databases
spilling into one folder overwrite each other's blocks: they crash (SIGSEGV) or read corrupted rows back (review 24:
a server restarted from the same working directory while its killed predecessor's write process still compacted;
replicas started from one folder). So each process has a folder of its own in the parent, `duckdb-<pid>-<random>`,
locked (`flock`) for as long as the process lives, and each of its databases a folder inside that one. A process
that ended leaves its folder behind (with the spill files of one that was killed); the next process to make a
database in the same parent removes every such folder whose lock nobody holds any more (on POSIX systems: elsewhere
no folder is locked, and none removed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time

try:
    import fcntl
except ImportError:  # not a POSIX system
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

PREFIX = "duckdb-"
# A folder is locked right after it is made: one younger than this may be in that instant, and is left alone.
GRACE_SECONDS = 60.0

_lock = threading.Lock()
_own: dict[str, str] = {}  # parent (its real path) -> this process's folder in it, locked until the process ends


def own_spill_folder(parent: str) -> str:
    """A new folder for one DuckDB database of this process to spill into, in this process's folder in `parent`
    (made at the first call, after removing the folders of processes that ended)."""
    os.makedirs(parent, exist_ok=True)
    key = os.path.realpath(parent)
    with _lock:
        mine = _own.get(key)
        if mine is None or not os.path.isdir(mine):
            remove_abandoned(parent)
            mine = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent)
            if fcntl is not None:
                held = os.open(mine, os.O_RDONLY)  # never closed: the lock goes with the process
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new folder: nobody else holds it
            _own[key] = mine
        return tempfile.mkdtemp(prefix="db-", dir=mine)


def remove_abandoned(parent: str) -> list[str]:
    """Remove the spill folders in `parent` whose process ended (nobody holds their lock); the folders removed."""
    removed: list[str] = []
    if fcntl is None:
        return removed
    with contextlib.suppress(FileNotFoundError), os.scandir(parent) as entries:
        for entry in entries:
            if not entry.name.startswith(PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if time.time() - os.fstat(fd).st_ctime >= GRACE_SECONDS:
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed.append(entry.path)
            except OSError:  # held: its process runs
                pass
            finally:
                os.close(fd)
    if removed:
        log.info("removed %d spill folder(s) of processes that ended: %s", len(removed), removed)
    return removed
