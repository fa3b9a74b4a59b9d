"""What a server keeps between reads, keyed so that it is never stale: plans by (table, snapshot, filter), row
positions by delete file, decoded rows by data file; and the snapshots its reads are streaming from. One
`ReadCaches` per server (`transport.components`), handed to every read with its plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from pyiceberg.table import FileScanTask

from flight_server.base.lru import WeightedLru
from flight_server.base.memory import MemoryBudget
from flight_server.iceberg.lineage import VALUE_BYTES, files_weight
from flight_server.reads.inuse import SnapshotsInUse

# Plans of recent reads kept (by table, snapshot and filter), weighed as the appended files are (`files_weight`, in
# values of `VALUE_BYTES`, about 70 bytes in memory) plus `TASK_WEIGHT` a task: 140 MB at most, within the memory
# budget. Their data files keep no statistics (`plan_tasks`), so a task weighs `FILE_WEIGHT` (8) and `TASK_WEIGHT` (8)
# whatever its table's width (1,135 bytes measured with tracemalloc: the task, its file's copy, the path and partition
# it shares with the file read): 125,000 tasks. A soak filled 256 plans, the former count-bounded cap, with 28,000
# files, which would have been several GB of a wide table's with their statistics.
PLAN_CACHE_BYTES = 140 << 20
TASK_WEIGHT = 8
POSITION_CACHE_BYTES = 64 << 20


PlanKey = tuple[str, int | None, int, str]  # table uuid, snapshot, the table's current schema, filter


class PlanCache(WeightedLru[PlanKey, tuple[list[FileScanTask] | None, int]]):
    """Plans of recent reads by (table, snapshot, current schema, filter): a snapshot never changes, pyiceberg binds
    a filter's names in the table's current schema (which a schema change replaces without a snapshot), and
    planning reads every manifest in Python (10 delete manifests cost a scan of a 1M-row table 0.70x of copy-on-write).
    Bounded by weight: its files' (`files_weight`) and its filter's text (`_plan_weight`), in bytes, within `budget`
    too when given. A plan is kept with that text's length, so that a kept plan of None is no miss."""

    def __init__(self, max_bytes: int, budget: MemoryBudget | None = None):
        super().__init__(max_bytes, _plan_bytes, budget, "plans")

    def plan(self, key: PlanKey) -> tuple[bool, list[FileScanTask] | None]:
        """Whether a plan is kept for `key`, and the plan."""
        kept = self.get(key)
        return (True, kept[0]) if kept is not None else (False, None)

    def keep(self, key: PlanKey, tasks: list[FileScanTask] | None) -> None:
        self.put(key, (tasks, len(key[3])))


def _plan_bytes(kept: tuple[list[FileScanTask] | None, int]) -> int:
    return _plan_weight(kept) * VALUE_BYTES


def _plan_weight(kept: tuple[list[FileScanTask] | None, int]) -> int:
    """A kept plan's weight: its data and delete files' (`files_weight`; a delete file shared by tasks counts once),
    and its filter's text (the key) with an entry's own overhead, in values of `VALUE_BYTES`."""
    tasks, key_chars = kept
    weight = 4 + key_chars // VALUE_BYTES
    if tasks is None:
        return weight
    deletes = {id(f): f for task in tasks for f in task.delete_files}
    own = TASK_WEIGHT * len(tasks)
    return weight + own + files_weight([task.file for task in tasks]) + files_weight(list(deletes.values()))


class PositionCache(WeightedLru[tuple[str, str], np.ndarray]):
    """Row positions read from position delete files, by (delete file, data file); the least recently used
    go past `max_bytes` (or when the memory `budget` needs room). The files never change, and a table's readers read
    the same ones over and over (Iceberg's Spark executors cache them likewise)."""

    def __init__(self, max_bytes: int, budget: MemoryBudget | None = None):
        super().__init__(max_bytes, lambda positions: positions.nbytes, budget, "positions")


FileKey = tuple[str, tuple[str, ...], tuple[str, ...]]  # data file, columns, its position delete files
# What an entry holds beyond its rows' buffers: the batches' Python objects and schemas, its key, the allocator's
# pages (20,000 entries of 5 to 50 rows took 7.7-11 KB each in all, 0.3-2.8 KB of it buffers). Counted, so that a
# table written a few rows a put (a file each) does not fill memory past the cache's size unseen: a soak's
# serving process held twice what its scan cache counted.
FILE_ENTRY_BYTES = 8 << 10


class FileCache:
    """Decoded rows of data files that whole-table scans read, without their deleted rows, by (data file,
    columns, position delete files); the least recently used go past `max_bytes` (0: nothing kept), or when
    the server's memory budget needs room (`base.memory`).

    Training jobs read the same snapshot every epoch and from every worker: a cached file streams from
    memory instead of being decoded again. Data files never change, so an entry is never stale, and a
    table's next snapshot shares every file it did not replace (an append decodes only its new files).
    """

    def __init__(self, max_bytes: int, budget: MemoryBudget | None = None):
        self.max_bytes = max_bytes
        self._entries: dict[FileKey, list[pa.RecordBatch]] = {}
        self._account = (budget or MemoryBudget(max_bytes)).account("scan", max_bytes, self._entries.pop)
        self._lock = self._account.lock  # the budget's: its evictions drop entries here
        self.hits = self.misses = 0

    def reserve(self, size: int) -> bool:
        """Whether a scan may hold `size` more bytes to put here later: what scans collect counts against the
        cache's size and the budget with what it holds (each of 16 parallel endpoints collecting up to the whole
        cache would otherwise hold 16 times it)."""
        return self._account.reserve(size)

    def release(self, size: int) -> None:
        """A scan no longer holds `size` bytes of its reservation (it gave up, or put less than it reserved)."""
        self._account.release(size)

    def get(self, key: FileKey) -> list[pa.RecordBatch] | None:
        with self._lock:
            batches = self._entries.get(key)
            if batches is None:
                self.misses += 1
                return None
            self.hits += 1
            self._account.touch(key)
            return batches

    def put(self, key: FileKey, batches: list[pa.RecordBatch], reserved: bool = False) -> int:
        """Keep a file's rows if they fit, counted with `FILE_ENTRY_BYTES`; `reserved`: the caller reserved the rows,
        and its reservation becomes the entry (or is released if the rows are not kept). Returns the rows' size."""
        size = sum(batch.nbytes for batch in batches)
        with self._lock:
            if self._account.admit(key, size + FILE_ENTRY_BYTES, size if reserved else 0):
                self._entries.setdefault(key, batches)
        return size

    def stats(self) -> dict[str, int]:
        with self._lock:
            account = self._account.stats()
            return {
                "files": len(self._entries),
                "bytes": account["bytes"],
                "max_bytes": self.max_bytes,
                "collecting": account["reserved"],
                "hits": self.hits,
                "misses": self.misses,
            }


@dataclass(frozen=True)
class ReadCaches:
    """The caches of one server's reads."""

    plans: PlanCache = field(default_factory=lambda: PlanCache(PLAN_CACHE_BYTES))
    positions: PositionCache = field(default_factory=lambda: PositionCache(POSITION_CACHE_BYTES))
    files: FileCache = field(default_factory=lambda: FileCache(0))
    in_use: SnapshotsInUse = field(default_factory=SnapshotsInUse)  # what snapshot expiry must keep
