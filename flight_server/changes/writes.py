"""Writes: one `do_put` stream becomes exactly one Iceberg snapshot, or nothing at all.

Batches are checked and fitted to the table schema as they arrive, gathered into chunks of
bounded size and written as Parquet data files. Only after the stream ended intact (no
cancellation, end-of-stream marker matching when the client promised one) are the files
committed, in one transaction that also creates the table or evolves its schema when asked.
Any failure deletes the files written so far. A `write_id` recorded in the snapshot summary
makes retries idempotent: every commit attempt is conditional on the table state whose history was
checked for the id, so the same id put through several replicas at once commits once. Appends to an
existing table that arrive while a commit to it is in flight share the next snapshot (changes/group.py).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
from pyiceberg.exceptions import (
    CommitFailedException,
    CommitStateUnknownException,
    NoSuchNamespaceError,
    ServerError,
    TableAlreadyExistsError,
)
from pyiceberg.io import FileIO
from pyiceberg.manifest import DataFile, DataFileContent
from pyiceberg.partitioning import PartitionSpec
from pyiceberg.schema import Schema, assign_fresh_schema_ids
from pyiceberg.table import Table, Transaction
from pyiceberg.table.metadata import TableMetadata

from flight_server.base.locks import LockPool
from flight_server.base.outages import missing_file
from flight_server.base.schemas import Conformer, new_table_schema, table_arrow_schema
from flight_server.base.streams import chunks, stream_schema
from flight_server.changes.commits import delete_files, expired_under, live_files
from flight_server.changes.files import (
    PARQUET_DEFAULTS,
    layout_key,
    moved_files,
    parquet_options,
    writable_partitioning,
    write_data_files,
)
from flight_server.changes.group import (
    LINGER_SECONDS,
    MAX_PUTS,
    Arrival,
    GroupCommits,
    Put,
    Rows,
    group_commit_enabled,
    same_fields,
)
from flight_server.changes.history import Committed, WriteIds, commit_append, put_summary
from flight_server.changes.orphans import holds_files
from flight_server.iceberg.catalog import (
    NEW_TABLE_HISTORY,
    FeatureCatalog,
    FeatureSpec,
    default_partitioning,
    own_copy,
    partition_spec,
    table_name,
)
from flight_server.iceberg.internals import (
    MemoTransaction,
    commit_on_base,
    overwrite_producer,
    schema_without_ids,
    sharing_entries,
    transaction_io,
)
from flight_server.wire.errors import CancelledError, ConflictError, LimitError, RequestError
from flight_server.wire.writes import WriteRequest, WriteResult, parse_end_marker

log = logging.getLogger(__name__)

# A new table's namespace made by another replica a moment before: a REST catalog that creates namespaces
# non-atomically (SeaweedFS) answers 500 while that creation is under way, or 404 to a table created right after it
# (review 23). The new table's staging is tried again this often, 50 ms later and twice as long each time.
NEW_NAMESPACE_TRIES = 6


def _check_feature_columns(spec: FeatureSpec, stream: pa.Schema) -> None:
    for column in spec.columns:
        if stream.get_field_index(column) < 0:
            raise RequestError(f"column {column!r} named as a key or time column is not in the stream ({stream.names})")
    for time_column in (spec.event_time, spec.created_time):
        if time_column and not pa.types.is_timestamp(stream.field(time_column).type):
            raise RequestError(f"time column {time_column!r} must be a timestamp, got {stream.field(time_column).type}")
    for key in spec.entity_keys:
        t = stream.field(key).type
        if pa.types.is_floating(t) or pa.types.is_nested(t) or pa.types.is_null(t):
            raise RequestError(f"entity key {key!r} cannot have type {t}: use integers, strings, dates or timestamps")


@dataclass
class _Staged:
    """A transaction ready to receive data files, and the schema batches must have."""

    transaction: Transaction
    io: FileIO
    target: pa.Schema
    metadata: TableMetadata  # what the data files are written for
    spec: FeatureSpec | None
    table: Table | None  # the table as the transaction started from it; None when creating
    evolved: bool = False  # the transaction adds columns too


class Writer:
    """Runs `do_put` streams against the catalog."""

    def __init__(
        self,
        catalog: FeatureCatalog,
        chunk_bytes: int,
        commit_timeout: float,
        locks: LockPool,
        group_commit: bool = True,
        linger: float = LINGER_SECONDS,
    ):
        self.catalog = catalog
        self.chunk_bytes = chunk_bytes
        self.commit_timeout = commit_timeout
        self._id_locks = [threading.Lock() for _ in range(64)]
        self._write_ids = WriteIds()
        self._commit_locks = locks
        self._for_files = _ForFiles()
        self._checks = _Checks(catalog)
        self._groups = GroupCommits(catalog, locks, self._write_ids, MAX_PUTS if group_commit else 1, linger)
        self._active = 0
        self._active_lock = threading.Lock()

    @property
    def in_progress(self) -> int:
        """Writes being received or committed right now (reported by the `health` action)."""
        return self._active

    def write(
        self,
        request: WriteRequest,
        reader: flight.MetadataRecordBatchReader,
        is_cancelled: Callable[[], bool],
    ) -> WriteResult:
        with self._active_lock:
            self._active += 1
        try:
            return self._write_once(request, reader, is_cancelled)
        finally:
            with self._active_lock:
                self._active -= 1

    def _write_once(
        self, request: WriteRequest, reader: flight.MetadataRecordBatchReader, is_cancelled: Callable[[], bool]
    ) -> WriteResult:
        identifier = self.catalog.identifier(request.table)
        if request.write_id is None:
            return self._write(request, reader, is_cancelled, self._checks.find_for_change(request.table))
        # Serialise retries of one write_id on this server, so a retry arriving while the first
        # attempt still streams waits for it and then answers with its snapshot.
        with self._id_locks[hash((identifier, request.write_id)) % len(self._id_locks)]:
            table = self._checks.find_for_change(request.table)
            if table is not None:
                prior = self._write_ids.find(table, request.write_id)
                if prior is not None:
                    _drain(reader)
                    log.info(
                        "write %s to %s already committed as snapshot %s",
                        request.write_id,
                        prior.table,
                        prior.snapshot_id,
                    )
                    return prior
            return self._write(request, reader, is_cancelled, table)

    def _write(
        self,
        request: WriteRequest,
        reader: flight.MetadataRecordBatchReader,
        is_cancelled: Callable[[], bool],
        table: Table | None,
    ) -> WriteResult:
        """Write the stream to `table` (as loaded for this put; None when it does not exist yet)."""
        schema = stream_schema(reader, "write")
        staged = self._stage(request, schema, table)
        if not self._groups_rows(request, staged):
            return self._receive(request, reader, is_cancelled, staged, schema, None)
        with self._groups.receiving(self.catalog.identifier(request.table)) as arrival:
            return self._receive(request, reader, is_cancelled, staged, schema, arrival)

    def _receive(
        self,
        request: WriteRequest,
        reader: flight.MetadataRecordBatchReader,
        is_cancelled: Callable[[], bool],
        staged: _Staged,
        schema: pa.Schema,
        arrival: Arrival | None,
    ) -> WriteResult:
        """Receive the stream's rows into data files (or, a put that fits in one chunk, for its group to write),
        then commit them; `arrival`: the put's registration with group commit while it is received."""
        started = time.monotonic()
        conform = Conformer(staged.target, schema)
        files: list[DataFile] = []
        write_uuid, counter = uuid.uuid4(), itertools.count()
        pending: list[pa.RecordBatch] = []
        pending_bytes = rows = 0
        declared_rows: int | None = None
        # A full chunk's files are written on another thread while the next chunk arrives; one at a time, so a put
        # holds at most two chunks.
        background: ThreadPoolExecutor | None = None
        writing: Future[list[DataFile]] | None = None

        def collect() -> None:
            nonlocal writing
            if writing is not None:
                done, writing = writing, None
                files.extend(done.result())

        def flush(last: bool) -> None:
            nonlocal pending, pending_bytes, background, writing
            collect()
            if pending:
                chunk = pa.Table.from_batches(pending, schema=staged.target)
                write = functools.partial(
                    write_data_files, staged.metadata, chunk, staged.io, staged.spec, write_uuid, counter
                )
                if last:
                    files.extend(write())
                else:
                    background = background or ThreadPoolExecutor(1, thread_name_prefix="put-files")
                    writing = background.submit(write)
            pending, pending_bytes = [], 0

        try:
            for chunk in chunks(reader, "write", "; nothing was committed"):
                if chunk.app_metadata is not None:
                    declared_rows = parse_end_marker(chunk.app_metadata.to_pybytes())
                if chunk.data is not None and chunk.data.num_rows:
                    if declared_rows is not None:
                        raise RequestError("the write stream sent data after its end-of-stream marker")
                    batch = conform(chunk.data)
                    pending.append(batch)
                    rows += batch.num_rows
                    pending_bytes += batch.nbytes
                    if pending_bytes >= self.chunk_bytes:
                        flush(last=False)
            if is_cancelled():
                raise CancelledError(f"the client cancelled the write after {rows} rows; nothing was committed")
            if request.end_marker and declared_rows is None:
                raise RequestError(
                    f"the write stream ended after {rows} rows without its end-of-stream marker "
                    "(the client was cut off?); nothing was committed"
                )
            if declared_rows is not None and declared_rows != rows:
                raise RequestError(
                    f"the client says it sent {declared_rows} rows but {rows} arrived; nothing was committed"
                )
            if rows == 0:
                raise RequestError("the write stream is empty: nothing to write")
            unwritten = not files and writing is None  # no chunk flushed (nor being written in the background)
            received = time.monotonic() - started
            if unwritten and arrival is not None:  # the put fits in one chunk: its group writes it
                data = pa.Table.from_batches(pending, schema=staged.target)
                left = Rows(data, staged.metadata, staged.io, staged.spec)
                return self._commit(request, staged, files, rows, left, arrival, received)
            flush(last=True)
            return self._commit(request, staged, files, rows, None, arrival, received)
        except CommitStateUnknownException:
            log.warning("commit to %s may have landed; keeping its %d data files", request.table, len(files))
            raise
        except BaseException as exc:
            with contextlib.suppress(BaseException):  # a chunk that failed deleted its own files
                collect()
            delete_files(staged.io, [f.file_path for f in files])
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise LimitError(
                    f"the warehouse ran out of space after {rows} rows of the write to {request.table!r} "
                    f"({os.strerror(exc.errno)}); nothing was committed and its files were deleted"
                ) from exc
            raise
        finally:
            if background is not None:
                background.shutdown()

    def _stage(self, request: WriteRequest, stream: pa.Schema, table: Table | None) -> _Staged:
        """Open the transaction the write commits: create the table, or maybe evolve it."""
        identifier = self.catalog.identifier(request.table)
        if table is None:
            return self._stage_new(request, identifier, stream)
        spec = FeatureSpec.from_properties(table.metadata.properties)
        _check_declared_spec(request, spec, table_name(table))
        if spec is not None:  # files are sorted by its columns
            spec.require_columns(table.schema(), table_name(table))
        _check_declared_layout(request, table)
        try:  # before any row is read: a table whose files cannot be written fails the put up front
            parquet_options(table.metadata.properties)
        except ValueError as exc:
            raise RequestError(f"cannot write to {table_name(table)!r}: {exc}; nothing was written") from None
        writable_partitioning(table.metadata)
        transaction = MemoTransaction(table)
        new_columns = [f for f in stream if f.name not in table.schema().column_names] if request.evolve else []
        if new_columns:
            added = new_table_schema(pa.schema(new_columns), required=())
            with transaction.update_schema() as update:
                update.union_by_name(added)
            log.info("write to %s adds columns %s", table_name(table), added.names)
        if new_columns:
            metadata = transaction.table_metadata
            target = table_arrow_schema(metadata.schema())
        else:
            metadata, target = self._for_files(table)
        return _Staged(transaction, table.io, target, metadata, spec, table, bool(new_columns))

    def _stage_new(self, request: WriteRequest, identifier: tuple[str, ...], stream: pa.Schema) -> _Staged:
        if not request.entity_keys or not request.event_time:
            raise RequestError(
                f"table {'.'.join(identifier)!r} does not exist; to create it, name its entity_keys and event_time"
            )
        spec = FeatureSpec(tuple(request.entity_keys), request.event_time, request.created_time, request.ttl_seconds)
        _check_feature_columns(spec, stream)
        arrow = new_table_schema(stream, required=(*spec.entity_keys, spec.event_time))
        schema = assign_fresh_schema_ids(schema_without_ids(arrow))
        partitioning = partition_spec(
            request.partition_by if request.partition_by is not None else default_partitioning(spec), schema
        )
        properties = {**NEW_TABLE_HISTORY, **PARQUET_DEFAULTS, **spec.to_properties()}
        for attempt in range(NEW_NAMESPACE_TRIES):
            try:
                self.catalog.ensure_namespace(identifier[:-1])
                transaction = self._create_at_free_location(identifier, schema, partitioning, properties)
                break
            except (NoSuchNamespaceError, ServerError) as exc:
                if attempt == NEW_NAMESPACE_TRIES - 1:
                    raise
                log.info("creating %s: %s; trying again", ".".join(identifier), exc)
                time.sleep(0.05 * 2**attempt)
        io = transaction_io(transaction)  # where the catalog wants the new table's files
        metadata = transaction.table_metadata
        return _Staged(transaction, io, table_arrow_schema(metadata.schema()), metadata, spec, None)

    def _create_at_free_location(
        self, identifier: tuple[str, ...], schema: Schema, partitioning: PartitionSpec, properties: dict[str, str]
    ) -> Transaction:
        """Create the table at the catalog's default location, or at `<default>-<short uuid>` when files are
        already there (a table renamed away or dropped without purge keeps them): a table that shared its location
        would take the other's files for its own orphans."""
        transaction = self.catalog.catalog.create_table_transaction(
            identifier, schema=schema, partition_spec=partitioning, properties=properties
        )
        default = transaction.table_metadata.location.rstrip("/")
        if not holds_files(transaction_io(transaction), default, ".".join(identifier)):
            return transaction
        location = f"{default}-{uuid.uuid4().hex[:8]}"
        log.warning("%s is created at %s: its default location %s holds files", ".".join(identifier), location, default)
        return self.catalog.catalog.create_table_transaction(
            identifier, schema=schema, location=location, partition_spec=partitioning, properties=properties
        )

    def _groups_rows(self, request: WriteRequest, staged: _Staged) -> bool:
        """Whether the put shares its snapshot and, if it fits in one chunk, its group writes its rows into shared
        data files (`Rows`): a plain append to a table whose puts share snapshots, on a server that groups them.
        A leader may wait for such a put while its rows arrive."""
        plain = request.mode == "append" and staged.table is not None and not staged.evolved
        return plain and self._groups.max_puts > 1 and group_commit_enabled(staged.metadata)

    def _commit(
        self,
        request: WriteRequest,
        staged: _Staged,
        files: list[DataFile],
        rows: int,
        left: Rows | None,
        arrival: Arrival | None,
        received: float,
    ) -> WriteResult:
        """Commit the files (or the put's rows, which its group writes: `left`) in a snapshot; on a lost race, retry on
        the new table state. A plain append shares its snapshot with the appends to the table queued while the
        commit before it ran (`GroupCommits`; `arrival` and `received`, the seconds its rows took, for its leader)."""
        deadline = time.monotonic() + self.commit_timeout
        identifier = self.catalog.identifier(request.table)
        if request.mode == "append" and staged.table is not None and not staged.evolved:  # only adds data files
            schema, spec_id = staged.metadata.schema(), staged.metadata.default_spec_id
            grouped = group_commit_enabled(staged.metadata)
            put = Put(request.table, request.write_id, files, rows, schema, spec_id, deadline, grouped, left)
            put.received, put.arrival = received, arrival
            result = self._groups.commit(identifier, put)
            if result.duplicate:
                delete_files(staged.io, [f.file_path for f in files])
            return result
        properties = put_summary([Committed(request.write_id, rows, len(files))])
        # Writers on this server take turns to commit to a table: each commits on the latest state at
        # once, instead of failing and reloading. Writers elsewhere make a commit fail; it is retried here.
        try:
            with self._commit_locks(identifier):
                table = self._commit_loop(request, staged, files, properties, deadline)
        except _AlreadyCommitted as done:
            delete_files(staged.io, [f.file_path for f in files])
            return done.result
        self.catalog.remember(request.table, table)
        snapshot = table.current_snapshot()
        assert snapshot is not None
        log.info(
            "%s %d rows in %d files to %s: snapshot %s",
            request.mode,
            rows,
            len(files),
            table_name(table),
            snapshot.snapshot_id,
        )
        return WriteResult(table_name(table), snapshot.snapshot_id, rows, len(files), request.write_id)

    def _commit_loop(
        self, request: WriteRequest, staged: _Staged, files: list[DataFile], properties: dict[str, str], deadline: float
    ) -> Table:
        """Check the table's history, then commit on exactly that state; when another commit won meanwhile (on
        any replica or engine), load the table and do both again."""
        table, transaction = staged.table, staged.transaction
        placed = _Placed(staged, files)
        try:
            while True:
                if table is not None:
                    _check_history(request, staged, table, self._write_ids)
                try:
                    committed = _commit_files(transaction, request.mode, placed.files_for(transaction), properties)
                    break
                except TableAlreadyExistsError:
                    created_concurrently = True
                except (CommitFailedException, OSError) as exc:
                    if isinstance(exc, OSError) and (
                        not missing_file(exc)
                        or table is None
                        or expired_under(self.catalog, request.table, table) is None
                    ):
                        raise  # not a missing file; or the files of a snapshot the table still has: lost, no race
                    if time.monotonic() > deadline:
                        raise ConflictError(
                            f"could not commit to {request.table!r} within {self.commit_timeout:.0f}s "
                            "of concurrent writes; nothing was committed"
                        ) from None
                    created_concurrently = False
                table = self.catalog.load(request.table)
                transaction = self._retry_transaction(request, staged, table, created_concurrently)
        except CommitStateUnknownException:
            raise  # the copies may be committed: kept (and the files written, as any put's then)
        except BaseException:
            placed.discard()
            raise
        placed.committed()
        return committed

    def _retry_transaction(
        self, request: WriteRequest, staged: _Staged, table: Table, created_concurrently: bool
    ) -> Transaction:
        """A fresh transaction on the table as it is now, if the written files still fit it."""
        transaction = MemoTransaction(table)
        if request.evolve:
            extra = pa.schema([f for f in staged.target if f.name not in table.schema().column_names])
            if len(extra):
                with transaction.update_schema() as update:
                    update.union_by_name(new_table_schema(extra, required=()))
        if not same_fields(transaction.table_metadata.schema(), staged.transaction.table_metadata.schema()):
            raise ConflictError(
                f"table {request.table!r} was created or changed concurrently with a different schema; "
                "nothing was committed"
            )
        # The snapshot's manifest records the files under the table's current spec: files partitioned for
        # another would be filed under wrong partition values.
        if transaction.table_metadata.spec() != staged.metadata.spec():
            raise ConflictError(
                f"table {request.table!r} was created or changed concurrently with another partitioning; "
                "nothing was committed"
            )
        if created_concurrently:
            _check_declared_spec(request, FeatureSpec.from_properties(table.metadata.properties), request.table)
            _check_declared_layout(request, table)
            log.info("table %s was created concurrently; appending to it", request.table)
        return transaction


class _Placed:
    """A put's data files where the table it commits to keeps its data. A put that creates a table writes its files
    at the location it staged the table at; when another put created the table first, at another location (the
    default one held the first put's files, not yet committed), the files are copied under the winner's location
    (`moved_files`) before they are appended to it, so that no file of the table lies outside its location, where
    orphan removal, a purge on drop and tools that go by location would miss it. The files written are deleted
    once the copies are committed (by the caller when they are not: `Writer._write`); the copies when they are not."""

    def __init__(self, staged: _Staged, files: list[DataFile]):
        self.written, self.io, self.location = files, staged.io, staged.metadata.location.rstrip("/")
        self.files, self.files_io, self.files_location = files, staged.io, self.location

    def files_for(self, transaction: Transaction) -> list[DataFile]:
        """The files, under the location of the table the transaction commits to (copied there if need be)."""
        metadata = transaction.table_metadata
        location = metadata.location.rstrip("/")
        if location != self.files_location:
            self.discard()
            if location != self.location:
                io = transaction_io(transaction)
                self.files = moved_files(self.written, self.io, metadata, io)
                self.files_io, self.files_location = io, location
                log.info("%d data files of a put copied to %s, where the table was created", len(self.files), location)
        return self.files

    def discard(self) -> None:
        """Delete the copies (not committed), if any: the files are where they were written again."""
        if self.files is not self.written:
            delete_files(self.files_io, [f.file_path for f in self.files])
        self.files, self.files_io, self.files_location = self.written, self.io, self.location

    def committed(self) -> None:
        """The copies are committed: the files written are no one's."""
        if self.files is not self.written:
            delete_files(self.io, [f.file_path for f in self.written])


@dataclass(eq=False)
class _Check:
    """The catalog checks of one table by puts to it on this server (`_Checks`)."""

    changed: threading.Condition = field(default_factory=threading.Condition)
    started: int = 0  # checks started so far
    finished: int = 0  # the number of the last check that ended (one runs while started > finished)
    table: Table | None = None  # what that check found (None: no such table)
    failed: bool = False  # that check raised (each put waiting for it checks again itself)
    users: int = 0  # puts using the entry: it is dropped when none is left


class _Checks:
    """The table as the catalog has it when a put arrives (`FeatureCatalog.find_for_change`), one catalog check for
    many puts: a put that arrives while a check of its table runs takes the result of the next check, which
    starts after it arrived (so it sees every commit acknowledged before it arrived), together with every other
    put that arrived meanwhile. A check was a tenth of a grouped put's CPU (0.3-0.4 ms under load), made by each
    of the puts that group commit then commits together; a single writer's puts check one by one, as before."""

    def __init__(self, catalog: FeatureCatalog):
        self.catalog = catalog
        self._tables: dict[tuple[str, ...], _Check] = {}
        self._lock = threading.Lock()

    def find_for_change(self, name: str) -> Table | None:
        key = self.catalog.identifier(name)
        with self._lock:
            check = self._tables.setdefault(key, _Check())
            check.users += 1
        try:
            with check.changed:
                wanted = check.started + 1  # the first check to start after this put arrived
                while check.started > check.finished and check.finished < wanted:
                    check.changed.wait()
                if check.finished >= wanted:
                    if check.failed:
                        return self.catalog.find_for_change(name)
                    return None if check.table is None else own_copy(check.table)
                check.started += 1
                number = check.started
            table: Table | None = None
            failed = True
            try:
                table = self.catalog.find_for_change(name)
                failed = False
            finally:
                with check.changed:
                    check.finished, check.table, check.failed = number, table, failed
                    check.changed.notify_all()
            return table
        finally:
            with self._lock:
                check.users -= 1
                if check.users == 0:
                    del self._tables[key]


class _ForFiles:
    """Copies of tables' metadata to write data files for, without the history: files need only its schema,
    partitioning, properties and location, and a whole copy costs milliseconds per hundred snapshots.

    One copy per table layout (`layout_key`: the metadata files that only add snapshots share one), shared by
    the puts that write for it: a deep copy per put was a fifth of a grouped put's CPU, and it let pyiceberg's
    caches on the copy's schema (name mapping, field indexes) start empty every time. It shares the table's
    schema, spec and sort order objects (`sharing_entries`): a deep copy of them would fail when another thread
    that uses the table's metadata at that moment caches on them. With it, the Arrow schema of the table's rows,
    which a put fits its batches to (0.2-0.3 ms a put, worked out per put). The newest `KEPT` are kept."""

    KEPT = 64

    def __init__(self) -> None:
        self._copies: dict[tuple[Any, ...], tuple[TableMetadata, pa.Schema]] = {}
        self._lock = threading.Lock()

    def __call__(self, table: Table) -> tuple[TableMetadata, pa.Schema]:
        key = layout_key(table.metadata)
        with self._lock:
            found = self._copies.get(key)
        if found is not None:
            return found
        history: dict[str, Any] = {"snapshots": [], "snapshot_log": [], "metadata_log": [], "refs": {}}
        stripped = table.metadata.model_copy(update={**history, "statistics": [], "partition_statistics": []})
        copy = sharing_entries(stripped)
        made = (copy, table_arrow_schema(copy.schema()))
        with self._lock:
            found = self._copies.setdefault(key, made)
            while len(self._copies) > self.KEPT:
                del self._copies[next(iter(self._copies))]
        return found


class _AlreadyCommitted(Exception):
    def __init__(self, result: WriteResult):
        self.result = result


def _check_history(request: WriteRequest, staged: _Staged, table: Table, write_ids: WriteIds) -> None:
    """Whether the put may commit on `table`: not if its `write_id` is already there, nor for an overwrite
    if rows were added since it started (it would drop them unseen)."""
    if request.write_id and (prior := write_ids.find(table, request.write_id)) is not None:
        raise _AlreadyCommitted(prior)
    if request.mode == "overwrite" and table is not staged.table:
        base = staged.table.current_snapshot() if staged.table is not None else None
        if (added := _added_since(table, base.snapshot_id if base else None)) is not None:
            raise ConflictError(
                f"snapshot {added} added rows to {request.table!r} while this overwrite was written; "
                "nothing was committed"
            )


def _commit_files(transaction: Transaction, mode: str, files: list[DataFile], properties: dict[str, str]) -> Table:
    """One snapshot of the files, committed only on the state the transaction was opened on (`commit_on_base`)."""
    if mode != "overwrite":
        return commit_append(transaction, files, properties)
    overwrite = overwrite_producer(transaction, properties)
    for data_file in _live_data_files(transaction):
        overwrite.delete_data_file(data_file)
    for data_file in files:
        overwrite.append_data_file(data_file)
    return commit_on_base(transaction, overwrite)


def _added_since(table: Table, base: int | None) -> int | None:
    """The latest snapshot that added data files on top of snapshot `base` (the current one when `base` is no
    longer its ancestor), or None."""
    current = snapshot = table.current_snapshot()
    while snapshot is not None and snapshot.snapshot_id != base:
        summary = snapshot.summary.additional_properties if snapshot.summary else {}
        if int(summary.get("added-data-files", 0)):
            return snapshot.snapshot_id
        parent = snapshot.parent_snapshot_id
        snapshot = table.snapshot_by_id(parent) if parent is not None else None
    if snapshot is None and base is not None and current is not None:
        return current.snapshot_id
    return None


def _live_data_files(transaction: Transaction) -> list[DataFile]:
    files = live_files(transaction_io(transaction), transaction.table_metadata.current_snapshot())
    return [file for file in files if file.content == DataFileContent.DATA]


def _check_declared_spec(request: WriteRequest, spec: FeatureSpec | None, name: str) -> None:
    """A write may repeat the table's definition, but not contradict it."""
    named = {
        "entity_keys": tuple(request.entity_keys) if request.entity_keys else None,
        "event_time": request.event_time,
        "created_time": request.created_time,
        "ttl_seconds": request.ttl_seconds,
    }
    declared = {key: value for key, value in named.items() if value is not None}
    if not declared:
        return  # most puts to a table name nothing of its definition: no copy of it to compare
    actual = asdict(spec) if spec else {}
    for key, value in declared.items():
        if actual.get(key) != value:
            raise RequestError(f"table {name!r} has {key}={actual.get(key)!r}; the write says {value!r}")


def _check_declared_layout(request: WriteRequest, table: Table) -> None:
    """A write to an existing table may repeat its partitioning (a pipeline that always sends its definition,
    or one that lost the race to create the table), but not ask for another."""
    if request.partition_by is None:
        return

    def layout(spec: PartitionSpec) -> list[tuple[int, str]]:
        return [(f.source_id, str(f.transform)) for f in spec.fields]

    if layout(table.spec()) != layout(partition_spec(request.partition_by, table.schema())):
        raise RequestError(
            f"table {table_name(table)!r} exists with another partitioning ({table.spec()}); partition_by "
            "applies only when a write creates a table (or repeats its partitioning)"
        )


def _drain(reader: flight.MetadataRecordBatchReader) -> None:
    """Read and drop a stream whose rows are already committed, so the client can finish."""
    for _ in chunks(reader, "write"):
        pass
