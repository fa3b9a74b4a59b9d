"""Per-key locks held only while in use: one commit or one index build per table at a time."""

from __future__ import annotations

import threading
from collections.abc import Hashable


class LockPool:
    """A lock per key (from a fixed pool, so memory does not grow with the keys). Commits through this
    server to one table take turns on it, each on the latest state, instead of failing and sleeping
    through pyiceberg's retry back-off; the in-memory indexes build one table or snapshot at a time."""

    def __init__(self, size: int = 64):
        self._locks = [threading.Lock() for _ in range(size)]

    def __call__(self, key: Hashable) -> threading.Lock:
        return self._locks[hash(key) % len(self._locks)]
