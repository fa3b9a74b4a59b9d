"""The snapshots this server's reads are reading right now, so that snapshot expiry keeps their files.

A read holds its snapshot for as long as its result streams: `holding` wraps the reader and lets go once the
reader is exhausted, closed or dropped (the client finished, cancelled or went away, or the stream never
started). Counted per (table uuid, snapshot id): two reads of one snapshot hold it twice. Only this server's
reads are known here; reads on other replicas are protected by expiry's age rule alone.

Some snapshots are asked again soon after a read ends: the entity table of a training set over a table on the
server, by the job's next epoch (its feature tables' snapshots stay with their cached indexes, `AsofCache`). Those
are remembered (`remember`) and kept as the training-set cache keeps its indexes: the most recent few per table,
for ten minutes (`kept`).
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import pyarrow as pa

Held = tuple[str, int]  # (table uuid, snapshot id)

RECENT_SECONDS = 600.0  # a remembered snapshot is kept this long after it was last asked for (as the cache's indexes)
RECENT_PER_TABLE = 4  # ... the most recently asked of a table's, at most


class SnapshotsInUse:
    """A ref-counted set of the snapshots reads are streaming from."""

    def __init__(self) -> None:
        self._counts: Counter[Held] = Counter()
        self._lock = threading.Lock()
        self._quiet: list[Callable[[], None]] = []  # called once when the last running read ends
        self._asked: dict[Held, float] = {}  # remembered snapshots: when last asked for (`time.monotonic`)

    def when_quiet(self, call: Callable[[], None]) -> None:
        """Call `call` once no read runs: now if none does, else when the last running one ends (once, however often
        it was asked for meanwhile: reads that never stop would pile up calls). Background work that competes with
        reads for the cores (folding training-set indexes) waits for that moment."""
        with self._lock:
            if self._counts:
                if call not in self._quiet:
                    self._quiet.append(call)
                return
        call()

    def busy(self) -> bool:
        """Whether a read is streaming now."""
        with self._lock:
            return bool(self._counts)

    def snapshots(self, table_uuid: str) -> set[int]:
        """The snapshots of one table that a running read uses."""
        with self._lock:
            return {snapshot for (uuid, snapshot), count in self._counts.items() if uuid == table_uuid}

    def remember(self, held: Iterable[tuple[str, int | None]]) -> None:
        """Snapshots that the same job will ask for again (a training set's entity table): `kept` keeps them."""
        now = time.monotonic()
        with self._lock:
            for uuid, snapshot in held:
                if snapshot is not None:
                    self._asked.pop((uuid, snapshot), None)  # to the end: the dict is in the order last asked
                    self._asked[(uuid, snapshot)] = now
            self._forget(now - RECENT_SECONDS)

    def kept(self, table_uuid: str) -> set[int]:
        """The snapshots of one table that snapshot expiry keeps for this server's reads: those a running read
        uses, and the `RECENT_PER_TABLE` remembered ones asked for most recently within `RECENT_SECONDS`."""
        with self._lock:
            self._forget(time.monotonic() - RECENT_SECONDS)
            recent = [snapshot for (uuid, snapshot) in self._asked if uuid == table_uuid][-RECENT_PER_TABLE:]
            running = {snapshot for (uuid, snapshot) in self._counts if uuid == table_uuid}
        return running | set(recent)

    def _forget(self, since: float) -> None:
        """Drop the remembered snapshots last asked for before `since` (the oldest first in the dict)."""
        while self._asked:
            key, when = next(iter(self._asked.items()))
            if when >= since:
                return
            del self._asked[key]

    @contextlib.contextmanager
    def hold(self, held: Iterable[tuple[str, int | None]]) -> Iterator[None]:
        """Hold the snapshots (None: a table without one) for the block."""
        release = self._take(held)
        try:
            yield
        finally:
            release()

    def holding(self, held: Iterable[tuple[str, int | None]], reader: pa.RecordBatchReader) -> pa.RecordBatchReader:
        """`reader`, holding the snapshots from now until it is exhausted, closed or dropped, also unread: taken
        before a planning `hold` ends, the snapshots are never let go in between (expiry could take them then, and
        background work waiting for no read would start beside this one)."""
        release = self._take(held)

        def batches() -> Iterator[pa.RecordBatch]:
            try:
                yield from reader
            finally:
                release()

        stream = batches()
        weakref.finalize(stream, release)  # a generator never started runs no `finally`
        return pa.RecordBatchReader.from_batches(reader.schema, stream)

    def _take(self, held: Iterable[tuple[str, int | None]]) -> Callable[[], None]:
        """Count the snapshots as held; returns what lets them go (once, however often it is called)."""
        keys = [(uuid, snapshot) for uuid, snapshot in held if snapshot is not None]
        with self._lock:
            self._counts.update(keys)
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                self._counts.subtract(keys)
                for key in keys:
                    if self._counts[key] <= 0:
                        del self._counts[key]
                quiet: list[Callable[[], None]] = []
                if not self._counts:
                    quiet, self._quiet = self._quiet, []
            for call in quiet:
                call()

        return release
