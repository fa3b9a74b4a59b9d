"""Per-key locks held only while in use: one commit or one index build per table at a time."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Hashable, Iterator


class LockPool:
    """A lock per key, made when a thread first wants it and dropped once none holds or waits for it (so memory does
    not grow with the keys). Commits through this server to one table take turns on it, each on the latest state,
    instead of failing and sleeping through pyiceberg's retry back-off; the in-memory indexes build one table or
    snapshot at a time. Two keys never share a lock: a request for a cached index must not wait for another
    table's build (a fixed pool of locks by hash made that happen to one pair of keys in 64)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Hashable, tuple[threading.Lock, int]] = {}  # key -> (its lock, threads holding or waiting)

    @contextlib.contextmanager
    def __call__(self, key: Hashable) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (None, 0))
            lock = lock or threading.Lock()
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                users = self._locks[key][1] - 1
                if users:
                    self._locks[key] = (lock, users)
                else:
                    del self._locks[key]
