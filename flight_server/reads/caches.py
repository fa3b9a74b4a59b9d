"""What a server keeps between reads, keyed so that it is never stale: plans by (table, snapshot, filter), row
positions by delete file; and the snapshots its reads are streaming from. One `ReadCaches` per server
(`transport.components`), handed to every read with its plan.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from pyiceberg.table import FileScanTask

from flight_server.reads.inuse import SnapshotsInUse

PLAN_CACHE_ENTRIES = 256  # plans of recent reads kept (by table, snapshot and filter)
PLAN_CACHE_MAX_FILES = 10_000  # larger plans are not kept
POSITION_CACHE_BYTES = 64 << 20


class PlanCache:
    """Plans of recent reads by (table, snapshot, filter): a snapshot never changes, and planning reads
    every manifest in Python (10 delete manifests cost a scan of a 1M-row table 0.70x of copy-on-write)."""

    def __init__(self, entries: int, max_files: int):
        self._entries, self._max_files = entries, max_files
        self._plans: OrderedDict[tuple[str, int | None, str], list[FileScanTask] | None] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int | None, str]) -> tuple[bool, list[FileScanTask] | None]:
        with self._lock:
            if key not in self._plans:
                return False, None
            self._plans.move_to_end(key)
            return True, self._plans[key]

    def put(self, key: tuple[str, int | None, str], tasks: list[FileScanTask] | None) -> None:
        if tasks is not None and len(tasks) > self._max_files:
            return  # a plan that large is better planned again than kept
        with self._lock:
            self._plans[key] = tasks
            while len(self._plans) > self._entries:
                self._plans.popitem(last=False)


class PositionCache:
    """Row positions read from position delete files, by (delete file, data file); the least recently used
    go past `max_bytes`. The files never change, and a table's readers read the same ones over and over
    (Iceberg's Spark executors cache them likewise)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> np.ndarray | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: tuple[str, str], value: np.ndarray) -> None:
        with self._lock:
            if key not in self._entries:
                self._entries[key] = value
                self._bytes += value.nbytes
            while self._bytes > self.max_bytes:
                self._bytes -= self._entries.popitem(last=False)[1].nbytes


@dataclass(frozen=True)
class ReadCaches:
    """The caches of one server's reads."""

    plans: PlanCache = field(default_factory=lambda: PlanCache(PLAN_CACHE_ENTRIES, PLAN_CACHE_MAX_FILES))
    positions: PositionCache = field(default_factory=lambda: PositionCache(POSITION_CACHE_BYTES))
    in_use: SnapshotsInUse = field(default_factory=SnapshotsInUse)  # what snapshot expiry must keep
