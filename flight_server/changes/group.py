"""Group commit: appends to one table that arrive while a commit to it is in flight share the next snapshot.

A commit to an Iceberg table writes a manifest, a manifest list and a whole new metadata file, and
commits to one table take turns: one snapshot per put caps a table at a few tens of puts a second,
however many writers there are. Here each put writes its data files itself (in parallel with the
others, as before) and then queues them. The first put to find no commit in flight leads: it takes
what is queued (up to `MAX_PUTS`, `MAX_FILES` and `MAX_ID_BYTES` of write ids) and commits it all as
one snapshot, under the table's commit lock and on exactly the state whose history it checked, with
every put's `write_id` in the summary (`put_summary`). Puts that queue meanwhile wait for that commit
to end and then make the next group, so an acknowledgement always follows the commit of its put.

With many writers, the puts a commit answers come back while the next commit runs, behind the puts that
queued during the one before: groups would alternate between two halves of the writers, each half paying a
whole commit. So a leader first waits (`linger`) until as many puts are queued as the last commit answered
and left queued, but never longer than that commit took, nor than `linger`: a single writer, and writers
that do not meet, never wait; a writer that stops costs the next put one commit's time at most. A leader also
waits for the puts to its table whose rows are still arriving (`receiving`: a batch several writers send at once,
which seldom end together), at most a quarter of the time its own rows took to arrive (`RECEIVING_SHARE`), so that
their rows share its files instead of the first to end committing its own: a put waits for others no longer than
a fraction of its own transfer, and a one-row put never waits long for a big one.

A put whose rows fit in one chunk of the write buffer (`--write-chunk-mb`: all but the largest puts) writes no
data file of its own: its rows wait in the queue, and the leader writes the rows of all such puts its group
admitted into one set of data files (split by the table's partitioning, as any put's are), committed with the
other puts' files. A put costs its share of one file per partition then, not files of its own: for one-row puts
that was most of a grouped put's CPU, and puts of a batch from several writers at once make one file a partition
instead of one each (four writers' 125,000 wide rows: 24 files instead of 96, in 35-40 % less time). At most
`MAX_SHARED_BYTES` of rows go into one group's shared files. The leader checks every put before writing its rows
(write id, schema, partitioning), and rewrites the shared files without the puts a later check refuses (after a
lost race, past a deadline), so a refused put's rows are never committed; when the shared write or its commit
fails, each put is tried alone.

What concerns one put fails that put alone: its `write_id` already committed (it is answered as a
duplicate and leaves the group), a schema its files no longer fit, its own commit deadline. A lost
race to another writer loads the table and tries again; any other failure of a group of several is
retried one put at a time, so that a put that cannot commit does not sink the others.

A table whose property `flight.group-commit.enabled` is false gets one snapshot per put on every server
(as `--no-group-commit` gives every table of one server): for tables whose readers or tools expect each
put's own snapshot, or whose puts must not wait for others' commits.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.exceptions import CommitFailedException, CommitStateUnknownException
from pyiceberg.io import FileIO
from pyiceberg.manifest import DataFile
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.utils.properties import property_as_bool

from flight_server.base.locks import LockPool
from flight_server.base.outages import missing_file
from flight_server.changes.commits import delete_files, expired_under
from flight_server.changes.files import partition_counts, partition_values, write_data_files
from flight_server.changes.history import Committed, WriteIds, commit_append, put_summary
from flight_server.iceberg.catalog import FeatureCatalog, FeatureSpec, table_name
from flight_server.iceberg.internals import MemoTransaction, partitions
from flight_server.wire.errors import ConflictError
from flight_server.wire.writes import WriteResult

log = logging.getLogger(__name__)

MAX_PUTS = 256  # puts in one snapshot
MAX_FILES = 4096  # data files in one snapshot: its manifest lists them all
MAX_ID_BYTES = 64 << 10  # write ids in one snapshot summary, which every later metadata file repeats
ENABLED_PROPERTY = "flight.group-commit.enabled"  # a table's switch; the server's is --group-commit
# The Arrow rows of queued puts one group writes into its shared files at most (the leader's own always): the rest
# wait for the next group. Each such put holds its rows until then as it would while writing them itself (one chunk
# of the write buffer at most); the shared write sorts them into one copy.
MAX_SHARED_BYTES = 512 << 20
LINGER_SECONDS = 0.1  # the longest a leader waits for the writers of the table's last group (`_linger`)
# A leader waits for puts to its table still being received at most this share of the time its own rows took to
# arrive (`_linger`): puts of one batch from several writers then share one group, at a bounded cost in latency.
RECEIVING_SHARE = 0.25
MAX_TABLES = 1024  # tables whose last group size is remembered once their queue is dropped


@dataclass(frozen=True)
class Rows:
    """A put's rows left to its group's shared files, fitted to the table schema, and what writing them needs."""

    data: pa.Table
    metadata: TableMetadata  # the table (schema, partitioning, properties) the put was received for
    io: FileIO
    spec: FeatureSpec | None


@dataclass(eq=False)
class Put:
    """An append waiting for its commit: its data files, the schema they were written with, what came of it."""

    table: str
    write_id: str | None
    files: list[DataFile]
    rows: int
    schema: Schema
    spec_id: int  # the partition spec the files were written for (pyiceberg's DataFile leaves its own unset)
    deadline: float  # monotonic time after which a lost race fails the put with CONFLICT
    grouped: bool = True  # whether the put may share its snapshot (the table's `ENABLED_PROPERTY`)
    rows_left: Rows | None = None  # the put's rows, for its group to write (`files` is empty then)
    shared_files: int = 0  # the data files of the shared write that hold the put's rows
    received: float = 0.0  # seconds its rows took to arrive (`_linger`)
    arrival: Arrival | None = None  # its registration as a put still being received (`GroupCommits.receiving`)
    result: WriteResult | None = None
    error: BaseException | None = None
    done: bool = False  # set (under the queue's lock) once `result` or `error` is final
    # Set once the put may go on: answered (`done`), or still queued when a commit ended (it may lead the next). A put
    # waits on its own event, so that the end of a commit wakes each of its puts once, none of them queueing for the
    # queue's lock behind the others (as all the waiters of one condition did, woken at once).
    woken: threading.Event = field(default_factory=threading.Event)

    @property
    def file_count(self) -> int:
        """The data files that hold the put's rows (its own, or those of its group's shared write)."""
        return len(self.files) if self.rows_left is None else self.shared_files

    @property
    def id_bytes(self) -> int:
        return len(json.dumps(self.write_id)) + 16 if self.write_id is not None else 0


@dataclass(eq=False)
class Arrival:
    """A put to a table registered while its rows are received (`GroupCommits.receiving`), until it queues."""

    queued: bool = False


@dataclass(eq=False)
class _Queue:
    """One table's waiting puts, and whether one of them leads a commit now."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    arrived: threading.Condition = field(init=False)  # a put queued (what a lingering leader waits for)
    waiting: list[Put] = field(default_factory=list)
    leading: bool = False
    users: int = 0  # puts using the queue: it is dropped when none is left
    receiving: int = 0  # puts to the table whose rows are still arriving (`GroupCommits.receiving`)
    expected: int = 1  # puts the next group may expect (`GroupCommits._linger`)
    wanted: int = 0  # the queued puts a lingering leader waits for (0: none lingers), so only the last wakes it
    last_commit: float = 0.0  # seconds the last group's commit took

    def __post_init__(self) -> None:
        self.arrived = threading.Condition(self.lock)


class GroupCommits:
    """Commits appends to existing tables in groups; `max_puts=1` commits each put in its own snapshot."""

    def __init__(
        self,
        catalog: FeatureCatalog,
        locks: LockPool,
        write_ids: WriteIds,
        max_puts: int = MAX_PUTS,
        linger: float = LINGER_SECONDS,
    ):
        self.catalog = catalog
        self.max_puts = max_puts
        self.linger = linger
        self._locks = locks
        self._write_ids = write_ids
        self._queues: dict[Hashable, _Queue] = {}
        self._expected: dict[Hashable, tuple[int, float]] = {}  # `_Queue.expected`, `.last_commit` of tables whose
        # queue was dropped (all its puts were answered)
        self._queues_lock = threading.Lock()

    def commit(self, identifier: Hashable, put: Put) -> WriteResult:
        """Commit `put` alone or with others, and return once the snapshot that holds it is committed (a
        duplicate's answer is the earlier snapshot's; its files are the caller's to delete)."""
        queue = self._enter(identifier)
        try:
            with queue.lock:
                queue.waiting.append(put)
                if put.arrival is not None and not put.arrival.queued:
                    put.arrival.queued = True
                    queue.receiving -= 1
                if queue.wanted and (len(queue.waiting) >= queue.wanted or queue.receiving == 0):
                    queue.arrived.notify()
                leads = _lead(queue, put)
            while not leads:
                put.woken.wait()
                if put.done:  # set before `woken`
                    return _outcome(put)
                with queue.lock:
                    if put.done:
                        return _outcome(put)
                    leads = _lead(queue, put)
            with queue.lock:
                self._linger(queue, put)
                group = self._take(queue, put)
            started = time.monotonic()
            try:
                self._commit_group(identifier, group)
            finally:
                with queue.lock:
                    queue.last_commit = time.monotonic() - started
                    queue.leading = False
                    for member in group:
                        member.done = True
                    # The writers of this group may put again, and those queued meanwhile are waiting: together
                    # what the next leader can expect.
                    queue.expected = len(group) + len(queue.waiting)
                    successor = queue.waiting[0] if queue.waiting else None  # leads next, unless an arrival does
                for member in group:
                    member.woken.set()
                if successor is not None:
                    successor.woken.set()
            return _outcome(put)
        finally:
            self._leave(identifier, queue)

    @contextlib.contextmanager
    def receiving(self, identifier: Hashable) -> Iterator[Arrival]:
        """Register a put to the table whose rows are being received, until it queues for its commit (`Put.arrival`)
        or fails: a leader may wait for it a while (`_linger`)."""
        queue = self._enter(identifier)
        arrival = Arrival()
        with queue.lock:
            queue.receiving += 1
        try:
            yield arrival
        finally:
            with queue.lock:
                if not arrival.queued:  # failed before it queued: a leader waiting for it need not
                    arrival.queued = True
                    queue.receiving -= 1
                    if queue.wanted and queue.receiving == 0:
                        queue.arrived.notify()
            self._leave(identifier, queue)

    def _enter(self, identifier: Hashable) -> _Queue:
        with self._queues_lock:
            queue = self._queues.get(identifier)
            if queue is None:
                expected, last_commit = self._expected.pop(identifier, (1, 0.0))
                queue = self._queues[identifier] = _Queue(expected=expected, last_commit=last_commit)
            queue.users += 1
            return queue

    def _leave(self, identifier: Hashable, queue: _Queue) -> None:
        with self._queues_lock:
            queue.users -= 1
            if queue.users == 0:
                del self._queues[identifier]
                if queue.expected > 1:  # its writers are likely to put again in a moment
                    self._expected[identifier] = (queue.expected, queue.last_commit)
                    if len(self._expected) > MAX_TABLES:  # the table whose writers met longest ago goes
                        del self._expected[next(iter(self._expected))]

    def _linger(self, queue: _Queue, leader: Put) -> None:
        """Before taking its group (the queue's lock held), wait for as many puts as the last commit answered and
        left queued, at most as long as that commit took and `linger`; or, while puts to the table are still being
        received, for them, at most `RECEIVING_SHARE` of the time the leader's own rows took to arrive (see the
        module's docstring)."""
        if self.linger <= 0 or self.max_puts == 1 or not leader.grouped:
            return
        if queue.expected > len(queue.waiting):  # the last group's writers
            deadline = time.monotonic() + min(self.linger, queue.last_commit)
            queue.wanted, arriving = min(queue.expected, self.max_puts), False
        elif queue.receiving and len(queue.waiting) < self.max_puts:  # puts still arriving
            deadline = time.monotonic() + RECEIVING_SHARE * leader.received
            queue.wanted, arriving = self.max_puts, True
        else:
            return
        try:
            while len(queue.waiting) < queue.wanted and not (arriving and not queue.receiving):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                queue.arrived.wait(left)
        finally:
            queue.wanted = 0

    def _take(self, queue: _Queue, leader: Put) -> list[Put]:
        """The leader and the puts queued longest, within the group's bounds; the rest stay queued. A put of a
        table that turned group commit off is a group of its own."""
        group, files, id_bytes, shared = [leader], _files(leader), leader.id_bytes, _shared_bytes(leader)
        rest: list[Put] = []
        for put in queue.waiting:
            if put is leader:
                continue
            fits = (
                leader.grouped
                and put.grouped
                and len(group) < self.max_puts
                and files + _files(put) <= MAX_FILES
                and id_bytes + put.id_bytes <= MAX_ID_BYTES
                and shared + _shared_bytes(put) <= MAX_SHARED_BYTES
            )
            if fits:
                group.append(put)
                files, id_bytes = files + _files(put), id_bytes + put.id_bytes
                shared += _shared_bytes(put)
            else:
                rest.append(put)
        queue.waiting = rest
        return group

    def _commit_group(self, identifier: Hashable, group: list[Put]) -> None:
        """Give every put of the group its result or its error; whatever goes wrong, none is left without."""
        try:
            with self._locks(identifier):
                self._commit(group)
        except BaseException as exc:  # the server is stopping, say: every put not yet answered fails with it
            for put in group:
                if put.result is None and put.error is None:
                    put.error = exc
            if not isinstance(exc, Exception):
                raise

    def _commit(self, group: list[Put]) -> None:
        """Commit the group's files as one snapshot on the table's latest state (only on that state: a write id
        checked absent stays absent); after a lost race, load the table and check again. The puts' rows
        are written only for the puts admitted on the state committed on (`_SharedFiles`)."""
        name = group[0].table
        live = group
        shared = _SharedFiles()
        table = self.catalog.find_for_change(name) or self.catalog.load(name)  # dropped meanwhile: NotFoundError
        while True:
            live = [put for put in live if self._admit(put, table)]
            try:
                added = shared.write([put for put in live if put.rows_left is not None])
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # also a panic in pyiceberg's Rust code, which is no `Exception`
                self._each_alone(live, name, exc)
                return
            if not live:
                return
            properties = put_summary([Committed(p.write_id, p.rows, p.file_count) for p in live])
            try:
                files = [f for p in live for f in p.files] + added
                committed = commit_append(MemoTransaction(table), files, properties)
                break
            except CommitFailedException:
                live = [put for put in live if not _past_deadline(put)]
                table = self.catalog.load(name)
            except CommitStateUnknownException as exc:
                for put in live:  # each put keeps its files, and the shared ones stay: the table may reference them
                    put.error = CommitStateUnknownException(str(exc))
                    put.error.__cause__ = exc  # why the catalog did not answer, for the client's message
                return
            except Exception as exc:
                if missing_file(exc) and (now := expired_under(self.catalog, name, table)) is not None:
                    live = [put for put in live if not _past_deadline(put)]  # a lost race: its base was expired
                    table = now
                    continue
                shared.write([])  # not committed: the puts written into them are tried alone
                self._each_alone(live, name, exc)
                return
        self.catalog.remember(name, committed)
        snapshot = committed.current_snapshot()
        assert snapshot is not None
        log.info(
            "%d puts, %d rows to %s: snapshot %s", len(live), sum(p.rows for p in live), name, snapshot.snapshot_id
        )
        for put in live:
            put.result = WriteResult(
                table_name(committed), snapshot.snapshot_id, put.rows, put.file_count, put.write_id
            )

    def _each_alone(self, live: list[Put], name: str, exc: BaseException) -> None:
        """After a failure of the group's file write or commit: a put alone fails with it, several are each
        committed alone, so that only a put that cannot commit fails."""
        if len(live) == 1:
            live[0].error = exc
            return
        log.warning("group commit of %d puts to %s failed (%s); committing each alone", len(live), name, exc)
        for put in live:
            self._commit([put])

    def _admit(self, put: Put, table: Table) -> bool:
        """Whether the put may commit on `table`; if not, it gets its answer: the earlier commit of its write id,
        or CONFLICT when the table's schema or partitioning changed so that its files no longer fit (the new
        snapshot's manifest records every file under the table's current partition spec)."""
        if put.write_id is not None and (prior := self._write_ids.find(table, put.write_id)) is not None:
            put.result = prior
            return False
        if not same_fields(table.schema(), put.schema):
            changed = "schema"
        elif put.spec_id != table.metadata.default_spec_id:
            changed = "partitioning"
        else:
            return True
        put.error = ConflictError(
            f"table {put.table!r} was changed concurrently to another {changed}; nothing was committed"
        )
        return False

    def waiting(self, identifier: Hashable) -> int | None:
        """Puts to the table queued behind the commit to it in flight; None when no commit is in flight."""
        with self._queues_lock:
            queue = self._queues.get(identifier)
        if queue is None:
            return None
        with queue.lock:
            return len(queue.waiting) if queue.leading else None


class _SharedFiles:
    """The data files a group's leader wrote for its puts' rows, and for which puts: written again without
    the puts a later check refused, so that the snapshot holds exactly the admitted puts' rows."""

    def __init__(self) -> None:
        self.puts: list[Put] = []
        self.files: list[DataFile] = []
        self.io: FileIO | None = None

    def write(self, puts: list[Put]) -> list[DataFile]:
        """The shared files of exactly these puts' rows (none for none); the files of other puts, never committed,
        are deleted. A failed write leaves no file (`write_data_files`) and no put written."""
        if [id(p) for p in puts] == [id(p) for p in self.puts]:
            return self.files
        if self.io is not None:
            delete_files(self.io, [f.file_path for f in self.files])
        self.puts, self.files, self.io = [], [], None
        by_schema: dict[tuple[int, int], list[Put]] = {}  # puts received for different schemas: files of each
        for put in puts:
            assert put.rows_left is not None
            by_schema.setdefault((put.rows_left.metadata.current_schema_id, put.spec_id), []).append(put)
        write_uuid, counter = uuid.uuid4(), itertools.count()
        written: list[DataFile] = []
        try:
            for members in by_schema.values():
                first = members[0].rows_left
                assert first is not None
                rows = pa.concat_tables([m.rows_left.data for m in members if m.rows_left is not None])
                if rows.num_rows and rows.column(0).num_chunks > len(members) * 4:  # one-row puts' many tiny chunks
                    rows = rows.combine_chunks()
                # The partition values that split the rows into files also count each put's partitions: worked out once.
                several = len(members) > 1 and not first.metadata.spec().is_unpartitioned()
                values = partition_values(first.metadata, rows) if several else None
                files = write_data_files(first.metadata, rows, first.io, first.spec, write_uuid, counter, values)
                written += files
                self.io = first.io
                counts = _partitions_of_each(first.metadata, rows, members, values)
                for member, count in zip(members, counts, strict=True):
                    member.shared_files = count if count is not None else len(files)
        except BaseException:
            if self.io is not None:
                delete_files(self.io, [f.file_path for f in written])
            self.io = None
            raise
        self.puts, self.files = puts, written
        return written


def _partitions_of_each(
    metadata: TableMetadata, rows: pa.Table, puts: list[Put], values: pa.Table | None
) -> list[int | None]:
    """How many partitions each put's rows (in `rows` one after the other) fall in: the shared files that hold
    them, unless a partition's rows rolled over into several files of the target size (None: all the files)."""
    spec = metadata.spec()
    if spec.is_unpartitioned() or len(puts) == 1:  # one put's rows: all the files are its own
        return [None] * len(puts)
    counted = partition_counts(metadata, rows, [put.rows for put in puts], values)  # a seventh of pyiceberg's time
    if counted is not None:
        return list(counted)
    column = f"_put_{uuid.uuid4().hex}"  # no column of the table's
    index = pa.array([i for i, put in enumerate(puts) for _ in range(put.rows)], pa.int32())
    counts = [0] * len(puts)
    for _, part in partitions(spec, metadata.schema(), rows.append_column(column, index)):
        for i in pc.unique(part.column(column)).to_pylist():
            counts[i] += 1
    return list(counts)


def _lead(queue: _Queue, put: Put) -> bool:
    """Whether the put, queued, leads the next commit now (the queue's lock held); if not, it waits for its `woken`,
    which the commit in flight sets when it ends (with the put's answer, or to let it lead the next one)."""
    if queue.leading:
        put.woken.clear()
        return False
    queue.leading = True
    return True


def _files(put: Put) -> int:
    """The data files the put adds to its snapshot, for `MAX_FILES`: a put whose rows its group writes counts one
    (they share files with the other such puts', one per partition)."""
    return len(put.files) if put.rows_left is None else 1


def _shared_bytes(put: Put) -> int:
    """The Arrow bytes of rows the put leaves to its group's shared files (`MAX_SHARED_BYTES`)."""
    return put.rows_left.data.nbytes if put.rows_left is not None else 0


def group_commit_enabled(metadata: TableMetadata) -> bool:
    """Whether the table lets its puts share snapshots: its `ENABLED_PROPERTY`, on unless set false (a value
    that is not a boolean leaves it on, with a warning)."""
    try:
        return property_as_bool(metadata.properties, ENABLED_PROPERTY, True)
    except ValueError:
        log.warning(
            "table property %s=%r is not a boolean; group commit stays on",
            ENABLED_PROPERTY,
            metadata.properties.get(ENABLED_PROPERTY),
        )
        return True


def _past_deadline(put: Put) -> bool:
    """Fail the put with CONFLICT once its commit deadline passed (it lost every race until then)."""
    if time.monotonic() <= put.deadline:
        return False
    put.error = ConflictError(
        f"could not commit to {put.table!r} in time because of concurrent writes; nothing was committed"
    )
    return True


def _outcome(put: Put) -> WriteResult:
    if put.error is not None:
        raise put.error
    assert put.result is not None
    return put.result


def same_fields(a: Schema, b: Schema) -> bool:
    """Whether files written for schema `b` read correctly under `a` (same ids, names and types)."""
    if a is b:  # metadata versions that only add snapshots share their schema objects
        return True
    ids_a = {f.field_id: (f.name, f.field_type) for f in a.fields}
    return all(ids_a.get(f.field_id) == (f.name, f.field_type) for f in b.fields)
