"""pyiceberg's private API, in one place: the rest of the server calls the public wrappers here.

pyiceberg 0.12 commits data files only (its deletes are copy-on-write), so the snapshot producers for
deletes, rewrites and replaces build on its `_SnapshotProducer` and `ManifestWriter`. Its helpers for
writing Parquet data files, partitioning rows and converting schemas are private, as are a transaction's
table, the SQL catalog's table layout and the FileIO a catalog gives the tables it loads; the functions here
wrap them. `MemoTransaction` keeps pyiceberg from copying a long history's metadata on every read of a
transaction's metadata. `commit_on_base` stages a
snapshot without pyiceberg's commit retry, which would rebuild it on a newer snapshot than the one the
caller checked, and commits to a SQL catalog without parsing the table's metadata file again (`_commit_sql`).
What a commit wrote and nothing references is deleted, as Iceberg's Java writers do: after `commit_on_base` lands,
the manifests its snapshot does not list (`ListingProducer`); after a commit surely lost, all it wrote, including
the metadata file a catalog wrote before its compare-and-swap (`commit_transaction`).
Appends (`FastAppend`, `MergeAppend`) read the parent's manifest list and the manifests they merge with Avro
readers built once per file schema rather than once per file (`_ResolvedAvroFile`).
`PRIVATE_API` lists every private name used and what is relied on;
`tests/test_pyiceberg_internals.py` checks them, fails when pyiceberg's version is not
`CHECKED_VERSION`, and fails when another module reaches into pyiceberg.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa
from pyiceberg.avro.codecs import AVRO_CODEC_KEY, CODEC_MAPPING_ICEBERG_TO_AVRO
from pyiceberg.avro.decoder import new_decoder
from pyiceberg.avro.file import MAGIC, META_SCHEMA, SYNC_SIZE, AvroFile, AvroFileHeader, AvroOutputFile
from pyiceberg.avro.reader import Reader
from pyiceberg.avro.resolver import construct_writer, resolve_reader, resolve_writer
from pyiceberg.avro.writer import Writer
from pyiceberg.catalog import Catalog, MetastoreCatalog
from pyiceberg.catalog.rest import (
    _RETRY_ARGS,
    SNAPSHOT_LOADING_MODE,
    Capability,
    Endpoints,
    RestCatalog,
    TableResponse,
)
from pyiceberg.catalog.rest.response import _handle_non_200_response
from pyiceberg.catalog.sql import IcebergTables, SqlCatalog
from pyiceberg.exceptions import (
    CommitFailedException,
    CommitStateUnknownException,
    NoSuchTableError,
    TableAlreadyExistsError,
    ValidationException,
)
from pyiceberg.expressions.visitors import manifest_evaluator
from pyiceberg.io import FileIO, OutputFile, load_file_io
from pyiceberg.io.fileformat import FileFormatModel
from pyiceberg.io.pyarrow import (
    _determine_partitions,
    _pyarrow_to_schema_without_ids,
    _to_requested_schema,
)
from pyiceberg.manifest import (
    DEFAULT_READ_VERSION,
    MANIFEST_ENTRY_SCHEMAS,
    MANIFEST_LIST_FILE_SCHEMAS,
    DataFile,
    DataFileContent,
    FileFormat,
    ManifestContent,
    ManifestEntry,
    ManifestEntryStatus,
    ManifestFile,
    ManifestWriter,
    ManifestWriterV2,
    PartitionFieldSummary,
    _inherit_from_manifest,
)
from pyiceberg.partitioning import PartitionKey, PartitionSpec
from pyiceberg.schema import Schema, index_by_id
from pyiceberg.table import CreateTableTransaction, Table, TableProperties, Transaction
from pyiceberg.table.locations import load_location_provider
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.snapshots import (
    Operation,
    Snapshot,
    SnapshotSummaryCollector,
    Summary,
    update_snapshot_summaries,
)
from pyiceberg.table.update import (
    AddSnapshotUpdate,
    AssertTableUUID,
    TableRequirement,
    TableUpdate,
    _apply_table_update,
    _TableMetadataUpdateContext,
    _update_table_metadata_log,
)
from pyiceberg.table.update.snapshot import _FastAppendFiles, _MergeAppendFiles, _OverwriteFiles, _SnapshotProducer
from pyiceberg.typedef import EMPTY_DICT
from pyiceberg.types import StructType
from pyiceberg.utils.datetime import datetime_to_millis
from pyiceberg.utils.properties import property_as_int
from pyiceberg.utils.schema_conversion import AvroSchemaConversion
from requests import HTTPError
from sqlalchemy import Select, Update, bindparam, select, update
from tenacity import retry

from flight_server.base.buffers import aligned
from flight_server.base.metrics import COMMIT_CLOCK_BEHIND, COMMIT_RETRIES
from flight_server.iceberg.metadata_files import write_metadata

log = logging.getLogger(__name__)

CHECKED_VERSION = "0.12.0"  # the pyiceberg release the names below were checked against

PRIVATE_API: dict[str, str] = {
    "pyiceberg.table.update.snapshot._SnapshotProducer": (
        "base of RewriteFiles and DropRemovedEntries: __init__(operation, transaction, io, snapshot_properties=); "
        "they override _manifests, _existing_manifests, _deleted_entries, _summary and _validate_concurrency "
        "(still called by commit()?); RewriteFiles._summary calls the base's with _operation set to OVERWRITE "
        "(it refuses REPLACE); commit_on_base() calls _commit() (the snapshot's updates and its "
        "AssertRefSnapshotId requirement on the head it was built on) and _clean_all_uncommitted() (every manifest "
        "and manifest list it wrote, whichever attempt; discard_written() too); "
        "ListingProducer overrides _manifests (called once by _commit: the manifests the manifest list names); "
        "commit_on_base() deletes those of _written_manifests (every manifest path new_manifest_output() gave) "
        "that it does not name; "
        "they read _transaction, _snapshot_id, _parent_snapshot_id, _io, _compression, "
        "_added_data_files, _deleted_data_files, _commit_window (.base, .head, .is_empty()), new_manifest_output(), "
        "new_manifest_writer(), spec(), schema()"
    ),
    "pyiceberg.manifest.ManifestWriter._meta": "DeleteManifestWriter adds content=deletes to this Avro header property",
    "pyiceberg.table.Transaction._apply": (
        "commit_on_base(): (updates, requirements) stages a producer's snapshot without registering the producer "
        "for commit_transaction's retry, which rebuilds only registered producers"
    ),
    "pyiceberg.table.Transaction._snapshot_producers": (
        "discard_written(): the producers whose commit() was called on the transaction, registered before their "
        "_commit() writes anything (so a producer that failed midway is among them); emptied once committed"
    ),
    "pyiceberg.table.Transaction._rebuild_snapshot_updates": (
        "commit_transaction(): Transaction.commit_transaction calls it only after an attempt raised "
        "CommitFailedException and the refreshed table holds none of the producers' snapshots; an error raised "
        "from it was raised before another attempt was sent (`_rebuilding`)"
    ),
    "pyiceberg.table.Transaction._table": (
        "transaction_io() (the staged table's FileIO) and RewriteFiles._validate_concurrency (the table's metadata "
        "as refreshed for a retry)"
    ),
    "pyiceberg.table.Transaction._stage": (
        "MemoTransaction._stage: (updates, requirements=()) -> the transaction, through which _apply and the retry's "
        "_rebuild_snapshot_updates stage every update (a snapshot's AddSnapshotUpdate among them)"
    ),
    "pyiceberg.table.Transaction._updates": (
        "MemoTransaction.table_metadata: the staged updates, a tuple that is replaced (never changed in place) "
        "whenever an update is staged; with _table.metadata, the only input of Transaction.table_metadata"
    ),
    "pyiceberg.io.pyarrow._determine_partitions": (
        "partitions(): (spec, schema, arrow_table) -> items with .partition_key and .arrow_table_partition"
    ),
    "pyiceberg.io.pyarrow._to_requested_schema": (
        "to_file_schema(): (requested_schema, file_schema, batch, include_field_ids=, format_model=)"
    ),
    "pyiceberg.io.pyarrow._pyarrow_to_schema_without_ids": "schema_without_ids(): (schema) -> Schema without ids",
    "pyiceberg.catalog.sql.SqlCatalog._iceberg_type_filter": (
        "metadata_location_query() and metadata_locations_query(): () -> the condition that leaves views out, or None "
        "(v0 catalog tables)"
    ),
    "pyiceberg.typedef.Record._data": (
        "without_statistics(): a DataFile's fields as a list, column_sizes to upper_bounds at positions 6-11 "
        "(DataFile's properties read them from there)"
    ),
    "pyiceberg.catalog.rest._RETRY_ARGS": (
        "rest_load_body(): the retry RestCatalog.load_table is wrapped in (refresh the token and ask again once on "
        "401 or 419), whose hook calls the first argument's _refresh_token()"
    ),
    "pyiceberg.catalog.rest.RestCatalog._session": (
        "rest_load_body(): the requests Session RestCatalog.load_table sends through (auth, configured headers)"
    ),
    "pyiceberg.catalog.rest.RestCatalog._check_endpoint": (
        "rest_load_body(): (endpoint) raises NotImplementedError when the server does not offer it, as load_table"
    ),
    "pyiceberg.catalog.rest.RestCatalog._split_identifier_for_path": (
        "rest_load_body(): (identifier) -> the namespace and table parts of the url, as load_table fills it"
    ),
    "pyiceberg.catalog.rest.RestCatalog._response_to_table": (
        "rest_table(): (identifier_tuple, table_response) -> the Table load_table returns for that response (its "
        "FileIO from the metadata's properties, the response's config and its storage credentials)"
    ),
    "pyiceberg.catalog.rest.response._handle_non_200_response": (
        "rest_load_body(): (exc, error_handler) raises the exception load_table raises for a status (404: "
        "NoSuchTableError as load_table passes it)"
    ),
    "pyiceberg.catalog.Catalog._load_file_io": (
        "table_io(): (properties, location) -> the FileIO that SqlCatalog.load_table gives a table it loads, with "
        "the catalog's properties overridden by the table's"
    ),
    "pyiceberg.catalog.sql.IcebergTables": (
        "metadata_location_query(), metadata_locations_query() and _commit_sql(): the SQL catalog's ORM table "
        "(catalog_name, table_namespace, table_name, metadata_location, previous_metadata_location), its storage "
        "layout rather than an API"
    ),
    "pyiceberg.catalog.MetastoreCatalog._parse_metadata_version": (
        "_commit_sql(): (metadata_location) -> its version, as SqlCatalog numbers the next metadata file"
    ),
    "pyiceberg.table.update._apply_table_update": (
        "updated_metadata(): (update, base_metadata, context) -> metadata, the singledispatch that "
        "update_table_metadata applies each update with"
    ),
    "pyiceberg.table.update._TableMetadataUpdateContext": "updated_metadata(): () and .has_changes(), as above",
    "pyiceberg.table.update._update_table_metadata_log": (
        "updated_metadata(): (base_metadata, metadata_location, last_updated_ms) -> metadata with the log entry"
    ),
    "pyiceberg.catalog.Catalog._delete_old_metadata": (
        "_commit_sql(): (io, base, metadata) deletes the metadata files the new metadata log dropped, as "
        "Table._do_commit does after a commit"
    ),
    "pyiceberg.catalog.MetastoreCatalog._write_metadata": (
        "commit_transaction(): (metadata, io, metadata_path), through which SqlCatalog.commit_table (and the Glue "
        "and Hive catalogs) write a commit's metadata file before their compare-and-swap, called on the catalog "
        "instance (self._write_metadata), which _record_metadata_writes wraps"
    ),
    "pyiceberg.table.Transaction._requirements": (
        "_commit_sql(): the requirements staged with the updates, emptied with _updates once committed"
    ),
    "pyiceberg.table.update.snapshot._FastAppendFiles": (
        "FastAppend: __init__(operation, transaction, io, snapshot_properties=) as UpdateSnapshot.fast_append "
        "makes it; _existing_manifests() (the parent's live manifests) is overridden"
    ),
    "pyiceberg.table.update.snapshot._OverwriteFiles": (
        "Overwrite: __init__(operation, transaction, io, snapshot_properties=) as UpdateSnapshot.overwrite makes it "
        "(OVERWRITE, or APPEND on a table without a snapshot)"
    ),
    "pyiceberg.table.update.snapshot._SnapshotProducer._build_manifest_evaluator": (
        "Overwrite overrides it (spec_id -> callable(ManifestFile) -> bool), called through a KeyDefaultDict by "
        "_OverwriteFiles._existing_manifests and, on the thread pool, _deleted_entries; it reads partition_filters "
        "(the partition predicate of the files to delete) and _case_sensitive"
    ),
    "pyiceberg.table.update.snapshot._MergeAppendFiles": (
        "MergeAppend: as UpdateSnapshot.merge_append; its merge manager reads manifests through the producer's "
        "fetch_manifest_entry(manifest=, discard_deleted=), which is overridden"
    ),
    "pyiceberg.manifest._inherit_from_manifest": (
        "manifest_entries(): (entry, manifest) -> the entry with sequence numbers and snapshot id inherited, as "
        "ManifestFile.fetch_manifest_entry applies it to each entry read"
    ),
    "pyiceberg.manifest.ManifestWriter._with_partition": (
        "_manifest_layout(): (format_version) -> the manifest entry schema with the spec's partition type, which "
        "ManifestWriter.new_writer builds (twice) for every manifest; it also reads _meta (the header's properties) "
        "and the attributes ManifestWriter.__init__ sets: _spec, _schema, _compression, _output_file"
    ),
    "pyiceberg.avro.file.AvroOutputFile._write_header": (
        "_PreparedAvroOutputFile overrides it: AvroOutputFile.__enter__ calls it after creating self.output_stream "
        "and self.encoder; the header is AvroFileHeader(MAGIC, {**metadata, 'avro.schema': the file schema's Avro "
        "JSON, 'avro.codec': the codec's Avro name}, sync_bytes), written by construct_writer(META_SCHEMA)"
    ),
    "pyiceberg.avro.file.AvroFile._read_header": (
        "_ResolvedAvroFile.__enter__: () -> the file's AvroFileHeader (.meta, with the Avro schema under "
        "'avro.schema'), read from self.decoder, as AvroFile.__enter__ reads it"
    ),
}


def transaction_io(transaction: Transaction) -> FileIO:
    """The FileIO of the table a transaction changes: where a table being created wants its files."""
    return transaction._table.io


class MemoTransaction(Transaction):
    """A `Transaction` that works out `table_metadata` once per change rather than on every read.

    pyiceberg's property applies the staged updates to the table's metadata and deep-copies the result, every
    snapshot of the history included, on each read; a put's snapshot producer reads it 18 times, which was 85%
    of a put's time on a table of 600 snapshots. Its two inputs are replaced, never changed in place (`_updates`
    is a tuple; a commit gives the table new metadata), and metadata models are frozen, so one result serves
    until either input is replaced. It is worked out by `updated_metadata`, which copies nothing that other threads
    using the table's metadata write to."""

    _memo: tuple[TableMetadata, tuple[TableUpdate, ...], TableMetadata] | None = None

    @property
    def table_metadata(self) -> TableMetadata:
        memo = self._memo
        if memo is None or memo[0] is not self._table.metadata or memo[1] is not self._updates:
            base, updates = self._table.metadata, self._updates
            memo = self._memo = (base, updates, updated_metadata(base, updates))
        return memo[2]

    def _stage(self, updates: tuple[TableUpdate, ...], requirements: tuple[TableRequirement, ...] = ()) -> Transaction:
        """Stage the updates, each new snapshot's commit time raised to follow the table's last update
        (`ordered_snapshots`): every snapshot a producer makes passes here, on its first attempt and on pyiceberg's
        retry alike, which rebuilds it on the newer metadata."""
        return super()._stage(ordered_snapshots(self.table_metadata, updates), requirements)


CLOCK_BEHIND_MS = 1000  # a commit time raised by more than this says this machine's clock is behind another writer's

CLOCK_LOG_SECONDS = 60.0  # a lifted commit time is logged at most this often (the counter counts each)

_clock_logged = [-CLOCK_LOG_SECONDS]  # time.monotonic() of the last line (a race logs one line more at worst)


def commit_floor_ms(metadata: TableMetadata) -> int:
    """The earliest time a commit on `metadata` may record: later than the table's last update and than the last
    entries of its snapshot log and metadata log.

    Iceberg's Java `TableMetadata` refuses to load metadata whose snapshot log or metadata log goes back in time by
    more than a minute ("[BUG] Expected sorted snapshot log entries", "Invalid update timestamp"), and time travel by
    time follows the snapshot log: a replica whose clock is behind another's would otherwise commit a snapshot that
    Spark and Trino can no longer load the table past, and that moves earlier times' answers."""
    floor = metadata.last_updated_ms
    if metadata.snapshot_log:
        floor = max(floor, metadata.snapshot_log[-1].timestamp_ms)
    if metadata.metadata_log:
        floor = max(floor, metadata.metadata_log[-1].timestamp_ms)
    return floor + 1


def ordered_snapshots(metadata: TableMetadata, updates: tuple[TableUpdate, ...]) -> tuple[TableUpdate, ...]:
    """The updates with each added snapshot's `timestamp_ms` raised to at least `commit_floor_ms` of `metadata` (and
    past the snapshot added before it), as a monotonic clock: pyiceberg stamps a snapshot with the committing
    machine's clock and checks nothing. A snapshot lifted by more than `CLOCK_BEHIND_MS` is counted
    (`flight_commit_clock_behind_total`) and logged once a minute: some writer's clock disagrees with this one's."""
    floor, staged = commit_floor_ms(metadata), []
    for change in updates:
        if isinstance(change, AddSnapshotUpdate):
            snapshot = change.snapshot
            if snapshot.timestamp_ms < floor:
                if floor - snapshot.timestamp_ms > CLOCK_BEHIND_MS:
                    COMMIT_CLOCK_BEHIND.inc()
                    if (now := time.monotonic()) - _clock_logged[0] >= CLOCK_LOG_SECONDS:
                        _clock_logged[0] = now
                        log.warning(
                            "the table at %s was last updated %.1f s after this machine's clock says now: its "
                            "snapshot %d takes the table's time (is this clock, or another writer's, off?)",
                            metadata.location,
                            (floor - 1 - snapshot.timestamp_ms) / 1000,
                            snapshot.snapshot_id,
                        )
                snapshot = snapshot.model_copy(update={"timestamp_ms": floor})
                change = AddSnapshotUpdate(snapshot=snapshot)
            floor = snapshot.timestamp_ms + 1
        staged.append(change)
    return tuple(staged)


def updated_metadata(
    base: TableMetadata, updates: tuple[TableUpdate, ...], metadata_location: str | None = None
) -> TableMetadata:
    """pyiceberg's `update_table_metadata` (the metadata with the updates applied, checked, and a copy of its own),
    with a copy that shares the entries of its lists and maps (`sharing_entries`) instead of a deep copy of them:
    copying every snapshot was most of a commit's CPU on a table of a few hundred snapshots (28 ms a commit at
    200, 13 ms without), and made a put alone cost twice what it does now. `metadata_location`: the base's file,
    entered in the metadata log when there are updates."""
    context = _TableMetadataUpdateContext()
    metadata = base
    for change in updates:
        metadata = _apply_table_update(change, metadata, context)
    if context.has_changes():
        if metadata_location:
            metadata = _update_table_metadata_log(metadata, metadata_location, base.last_updated_ms)
        if base.last_updated_ms == metadata.last_updated_ms:  # no snapshot: the time of the change, after the last
            now = max(datetime_to_millis(datetime.now().astimezone()), commit_floor_ms(base))
            metadata = metadata.model_copy(update={"last_updated_ms": now})
    metadata.spec().check_compatible(metadata.schema())
    metadata.sort_order().check_compatible(metadata.schema())
    return sharing_entries(metadata)


def sharing_entries(metadata: TableMetadata) -> TableMetadata:
    """A copy of the metadata with lists and maps of its own that shares their entries (snapshots, log entries,
    refs, schemas, specs, sort orders: frozen models) instead of a deep copy of them.

    A deep copy of the history was most of a commit's CPU (see `updated_metadata`). A deep copy of a schema or spec
    that other threads use (the server shares a table's metadata between reads, puts and maintenance) is not safe:
    it iterates the object's `__dict__`, into which pyiceberg caches (`cached_property`) on the object's first use
    of each, so another thread's first use at that moment fails the copy with "dictionary changed size during
    iteration" (a put answered INTERNAL). Sharing them copies nothing that another thread writes to."""
    update: dict[str, Any] = {}
    for name in type(metadata).model_fields:
        value = getattr(metadata, name)
        if isinstance(value, list):
            update[name] = list(value)
        elif isinstance(value, dict):
            update[name] = dict(value)
    return metadata.model_copy(update=update)


def commit_on_base(transaction: Transaction, producer: ListingProducer) -> Table:
    """Commit `transaction` with `producer`'s snapshot on the branch head the transaction was opened on, or not
    at all: a lost race raises `CommitFailedException` (`TableAlreadyExistsError` when creating), a SQL catalog that
    could not be reached `CommitNotSent`, any other failure of the catalog's commit `CommitStateUnknownException`
    (it may have landed).

    `producer.commit()` would register the producer, and `commit_transaction` would then rebuild its snapshot
    on whatever head won the race (`commit.retry.num-retries`): past any check the caller made on the state it
    opened the transaction on (a write id not yet committed, say). Staged unregistered, the snapshot keeps its
    `AssertRefSnapshotId` requirement, which every catalog checks atomically. The manifests and the manifest list it
    wrote are deleted when it surely did not commit; once it committed, the manifests its snapshot does not list
    (`_delete_unlisted`). On `CommitStateUnknownException` every file stays: the snapshot may be the table's."""
    try:
        updates, requirements = producer._commit()
    except BaseException:  # a manifest could not be written: nothing was sent
        producer._clean_all_uncommitted()
        raise
    try:
        transaction._apply(updates, requirements)
        table = commit_staged(transaction)
    except (CommitFailedException, TableAlreadyExistsError):
        COMMIT_RETRIES.inc()
        producer._clean_all_uncommitted()
        raise
    except CommitNotSent:
        producer._clean_all_uncommitted()
        raise
    except CommitStateUnknownException:
        raise
    except Exception as exc:
        # The catalog may have applied the commit before failing (a request timed out after the REST server
        # committed, a database connection dropped at COMMIT): callers must keep the files, never retry blindly.
        raise CommitStateUnknownException(f"the commit's outcome is unknown ({type(exc).__name__})") from exc
    _delete_unlisted(producer)
    return table


def _delete_unlisted(producer: ListingProducer) -> None:
    """Delete the manifests a committed producer wrote that its snapshot does not list, as Iceberg's Java
    `SnapshotProducer` does after a commit (`cleanUncommitted`): a merge-append writes the appended files' manifest,
    then folds it into the merged one. Nothing references them, and orphan removal would find them only days later
    (never with maintenance off). One local file, or one request to an object store, every merge; a failure leaves
    an orphan, the commit stands."""
    listed = producer.listed
    for path in producer._written_manifests:
        if path not in listed:
            try:
                producer._io.delete(path)
            except Exception as exc:
                log.warning("could not delete the manifest %s its commit did not use: %s", path, exc)


def commit_staged(transaction: Transaction) -> Table:
    """Commit the updates staged on `transaction`: on a SQL catalog, on the metadata it was opened on or not at all
    (`_commit_sql`; any commit since fails it with `CommitFailedException`, nothing is applied again on newer
    metadata); through pyiceberg's `commit_transaction` otherwise."""
    if (catalog := _on_sql(transaction)) is not None:
        return _commit_sql(catalog, transaction)
    return commit_transaction(transaction)


def discard_written(transaction: Transaction) -> None:
    """Delete the manifests and manifest lists that the snapshot producers of a transaction that surely did not commit
    wrote. pyiceberg deletes them only when the commit it sent fails; a producer that fails while it writes its
    snapshot (reading a parent's manifest that another replica's snapshot expiry deleted meanwhile, say) leaves those
    it wrote before, as does any failure between the producers' writes and the commit. Nothing references them."""
    for producer in transaction._snapshot_producers:
        producer._clean_all_uncommitted()


def commit_transaction(transaction: Transaction) -> Table:
    """pyiceberg's `commit_transaction` (which rebuilds registered producers' snapshots on a lost race, and deletes
    the manifests and manifest lists of the attempts that did not land), also deleting the metadata files the
    catalog wrote for those attempts: pyiceberg's SQL, Glue and Hive catalogs write the new metadata file before
    their compare-and-swap and leave it when the swap loses (`CommitFailedException`; `TableAlreadyExistsError` for
    a table created meanwhile). Those errors say the attempt surely did not land; after any other, nothing is
    deleted. Once committed, every file written but the table's current and logged metadata files goes.

    An error raised while pyiceberg rebuilt its snapshots for a retry (`_rebuilding`) says no attempt landed: the
    attempts before lost their race, and pyiceberg had just loaded the table and found none of their snapshots in it;
    the rebuild failed before it sent another (it read a manifest that another replica's snapshot expiry deleted
    meanwhile, say). It raises `CommitFailedException`, every file written deleted, rather than an error the caller
    takes for an unknown outcome (keeping them all). Any other error keeps them: raised after an attempt was sent, or
    while the table was loaded to check whether one landed, the commit may be the table's."""
    catalog = transaction._table.catalog
    _record_metadata_writes(catalog)
    written: list[tuple[FileIO, str]] = []
    outer, _WRITTEN.files = _WRITTEN.files, written
    try:
        table = transaction.commit_transaction()
    except (CommitFailedException, TableAlreadyExistsError, ValidationException):
        _delete_metadata_files(written)
        raise
    except Exception as exc:
        if not _rebuilding(exc):  # it may have landed
            raise
        # pyiceberg lost a race and failed to build its retry on the new head: no attempt landed, and it deleted
        # none of their files
        discard_written(transaction)
        _delete_metadata_files(written)
        raise CommitFailedException(f"a concurrent commit won and the retry failed: {type(exc).__name__}") from exc
    finally:
        _WRITTEN.files = outer
    kept = {table.metadata_location, *(entry.metadata_file for entry in table.metadata.metadata_log)}
    _delete_metadata_files([(io, path) for io, path in written if path not in kept])
    return table


def _rebuilding(exc: BaseException) -> bool:
    """Whether `exc` came out of `Transaction._rebuild_snapshot_updates`, which pyiceberg's `commit_transaction` calls
    only after an attempt lost its race (`CommitFailedException`) and the table, loaded again, holds none of the
    attempts' snapshots: nothing was sent since, so none landed."""
    return any(frame.f_code is _REBUILD for frame, _ in traceback.walk_tb(exc.__traceback__))


_REBUILD = Transaction._rebuild_snapshot_updates.__code__


class _MetadataWrites(threading.local):
    """The metadata files (with the FileIO each was written with) a catalog wrote on this thread while
    `commit_transaction` ran; None outside it."""

    files: list[tuple[FileIO, str]] | None = None


_WRITTEN = _MetadataWrites()
_RECORDING = threading.Lock()


def _record_metadata_writes(catalog: Catalog) -> None:
    """Have the catalog's `_write_metadata` (through which metastore catalogs write a commit's metadata file) note
    each file it writes in `_WRITTEN`, once per catalog."""
    with _RECORDING:
        if not isinstance(catalog, MetastoreCatalog) or "_write_metadata" in vars(catalog):
            return  # a REST catalog's server writes the file
        write = catalog._write_metadata

        def recorded(metadata: TableMetadata, io: FileIO, metadata_path: str) -> None:
            if (files := _WRITTEN.files) is not None:
                files.append((io, metadata_path))
            write(metadata, io, metadata_path)

        catalog._write_metadata = recorded  # type: ignore[method-assign]


def _delete_metadata_files(files: list[tuple[FileIO, str]]) -> None:
    """Delete metadata files of commits that did not land (an orphan at worst when it fails)."""
    for io, path in files:
        try:
            io.delete(path)
        except Exception as exc:
            log.warning("could not delete the metadata file %s of a commit that did not land: %s", path, exc)


def _on_sql(transaction: Transaction) -> SqlCatalog | None:
    """The SQL catalog of a transaction that changes an existing table through it (one whose `UPDATE` reports the
    rows it changed, so that a lost race shows), for `_commit_sql`; None otherwise."""
    table = transaction._table
    if isinstance(transaction, CreateTableTransaction) or not table.metadata_location:
        return None
    catalog = table.catalog
    if not isinstance(catalog, SqlCatalog) or not catalog.engine.dialect.supports_sane_rowcount:
        return None
    return catalog


def _commit_sql(catalog: SqlCatalog, transaction: Transaction) -> Table:
    """Commit the transaction's updates to the metadata it was opened on, as pyiceberg's SQL catalog commits them but
    without loading the table again: `SqlCatalog.commit_table` re-reads and parses the current metadata file only to
    check the requirements on it and to compare it with the new one, and the transaction works out its whole new
    metadata (a deep copy) only to read the table's uuid. The requirements are checked on the metadata we hold
    instead, the new metadata shares its entries with it (`updated_metadata`), and the catalog's row changes only if
    it still points at the held metadata's file (the compare-and-swap pyiceberg's own commit ends with): any later
    commit fails this one with `CommitFailedException`, and the metadata file it wrote is deleted."""
    table = transaction._table
    base, location = table.metadata, table.metadata_location
    requirements: tuple[TableRequirement, ...] = (*transaction._requirements, AssertTableUUID(uuid=base.table_uuid))
    for requirement in requirements:
        requirement.validate(base)
    metadata = updated_metadata(base, transaction._updates, location)
    version = catalog._parse_metadata_version(location) + 1
    new_location = load_location_provider(metadata.location, metadata.properties).new_table_metadata_file_location(
        version
    )
    io = load_file_io({**catalog.properties, **metadata.properties}, new_location)  # as the catalog loads it
    write_metadata(metadata, io, new_location)
    *namespace, name = table.name()
    bound = {"catalog": catalog.name, "namespace": ".".join(namespace), "table": name}
    try:
        connection = catalog.engine.connect()  # a pooled session (tested: `pool_pre_ping`) or a new one
    except Exception as exc:
        _delete_lost_metadata(io, new_location)
        raise CommitNotSent(f"the catalog could not be reached to commit ({type(exc).__name__})") from exc
    with connection, connection.begin():  # a failure here: the outcome is unknown (`commit_on_base`)
        swapped = connection.execute(_SWAP, {**bound, "base": location, "location": new_location}).rowcount
    if swapped < 1:
        _delete_lost_metadata(io, new_location)
        raise CommitFailedException(f"Table has been updated by another process: {'.'.join(table.name())}")
    try:
        catalog._delete_old_metadata(table.io, base, metadata)
    except Exception as exc:  # as pyiceberg's commit: the commit stands, the old files stay
        log.warning("could not delete old metadata files of %s after a commit: %s", ".".join(table.name()), exc)
    table.metadata, table.metadata_location = metadata, new_location
    transaction._updates, transaction._requirements = (), ()  # committed, as `commit_transaction` leaves them
    return table


class CommitNotSent(Exception):
    """A commit that surely did not land because nothing of it reached the catalog: the connection to a SQL
    catalog's database failed to open (refused, say), before the statement of the commit was sent. Unlike
    `CommitStateUnknownException` (the connection failed after it), the files written for the commit may go. The
    cause is the catalog library's error, which `base/outages.py` words for clients."""


def _delete_lost_metadata(io: FileIO, location: str) -> None:
    """Delete the metadata file of a commit that surely did not land (an orphan file at worst)."""
    try:
        io.delete(location)
    except Exception as exc:
        log.warning("could not delete the metadata file %s of a lost commit: %s", location, exc)


# The compare-and-swap of a table's metadata location in a SQL catalog (`_commit_sql`), built once.
_SWAP: Update = (
    update(IcebergTables)
    .where(
        IcebergTables.catalog_name == bindparam("catalog"),
        IcebergTables.table_namespace == bindparam("namespace"),
        IcebergTables.table_name == bindparam("table"),
        IcebergTables.metadata_location == bindparam("base"),
    )
    .values(metadata_location=bindparam("location"), previous_metadata_location=bindparam("base"))
)


MAX_READERS = 256  # Avro readers kept (`_ResolvedAvroFile`): one per manifest schema (table layout) and kind read
# (the file's Avro schema, what is read) -> the file's schema and its reader
_READERS: dict[tuple[object, ...], tuple[Schema, Reader]] = {}


class _ResolvedAvroFile(AvroFile[Any]):
    """pyiceberg's `AvroFile`, whose reader is built once per file schema and schema read, not once per file.

    Building it (the header's Avro schema converted to an Iceberg schema, the schema read resolved against it)
    was most of reading a small manifest or manifest list: a tenth of a grouped put's CPU, every commit reading
    the parent's manifest list and every merge each manifest. Readers keep no state between records (a record is
    built anew by each `read`), so one serves every file of that schema, from any thread."""

    __slots__ = ()

    def __enter__(self) -> _ResolvedAvroFile:
        with self.input_file.open() as f:
            self.decoder = new_decoder(f.read())
        self.header = self._read_header()
        assert self.read_schema is not None  # the callers here always name the schema they read
        key = (
            self.header.meta.get("avro.schema"),
            id(self.read_schema),
            *self.read_types.items(),
            None,
            *self.read_enums.items(),
        )
        resolved = _READERS.get(key)
        if resolved is None:
            schema = self.header.get_schema()
            resolved = schema, resolve_reader(schema, self.read_schema, self.read_types, self.read_enums)
            if len(_READERS) >= MAX_READERS:
                _READERS.clear()
            _READERS[key] = resolved
        self.schema, self.reader = resolved
        return self


def manifest_entries(io: FileIO, manifest: ManifestFile, discard_deleted: bool = True) -> list[ManifestEntry]:
    """`ManifestFile.fetch_manifest_entry`: the manifest's entries (the live ones, with `discard_deleted`), read with
    a reader built once per manifest schema (`_ResolvedAvroFile`)."""
    with _ResolvedAvroFile(
        io.new_input(manifest.manifest_path),
        MANIFEST_ENTRY_SCHEMAS[DEFAULT_READ_VERSION],
        read_types={-1: ManifestEntry, 2: DataFile},
        read_enums={0: ManifestEntryStatus, 101: FileFormat, 134: DataFileContent},
    ) as reader:
        return [
            _inherit_from_manifest(entry, manifest)
            for entry in reader
            if not discard_deleted or entry.status != ManifestEntryStatus.DELETED
        ]


def snapshot_manifests(io: FileIO, snapshot: Snapshot) -> list[ManifestFile]:
    """`Snapshot.manifests`: the manifests its manifest list names, read with a reader built once
    (`_ResolvedAvroFile`)."""
    with _ResolvedAvroFile(
        io.new_input(snapshot.manifest_list),
        MANIFEST_LIST_FILE_SCHEMAS[DEFAULT_READ_VERSION],
        read_types={-1: ManifestFile, 508: PartitionFieldSummary},
        read_enums={517: ManifestContent},
    ) as reader:
        return list(reader)


@dataclass(frozen=True)
class _ManifestLayout:
    """What writing a data manifest works out from the table's partition spec and schema alone (`_manifest_layout`)."""

    spec: PartitionSpec  # held, so that the ids `_LAYOUTS` is keyed by are not reused
    schema: Schema
    file_schema: Schema  # the manifest entry schema with the spec's partition type
    writer: Writer  # the entries' Avro writer for that schema
    metadata: dict[str, str]  # the manifest's header properties (its schema, spec, content, format, codec)
    avro_schema: str  # the file schema as the header's Avro JSON


MAX_LAYOUTS = 256  # manifest layouts kept (`_manifest_layout`): one per table layout written to
_LAYOUTS: dict[tuple[int, int, str], _ManifestLayout] = {}


def _manifest_layout(writer: ManifestWriterV2) -> _ManifestLayout:
    """The layout of the manifests `writer` writes, worked out once per spec and schema object (a table's metadata
    shares them between commits): pyiceberg builds the entry schema twice, its Avro writer, its JSON and the header's
    properties (the table schema as JSON) for every manifest, a third of writing a group's manifest."""
    spec, schema = writer._spec, writer._schema
    key = (id(spec), id(schema), writer._compression)
    layout = _LAYOUTS.get(key)
    if layout is None or layout.spec is not spec or layout.schema is not schema:
        file_schema = writer._with_partition(writer.version)
        avro_schema = AvroSchemaConversion().iceberg_to_avro(file_schema, schema_name="manifest_entry")
        layout = _ManifestLayout(
            spec,
            schema,
            file_schema,
            resolve_writer(record_schema=writer._with_partition(DEFAULT_READ_VERSION), file_schema=file_schema),
            writer._meta,
            json.dumps(avro_schema),
        )
        if len(_LAYOUTS) >= MAX_LAYOUTS:
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    return layout


class _PreparedAvroOutputFile(AvroOutputFile[ManifestEntry]):
    """pyiceberg's `AvroOutputFile` of a data manifest, with the writer and header schema of its `_ManifestLayout`
    instead of ones worked out anew: the same bytes (but for the random sync marker every file gets). Its own
    `__init__` sets what pyiceberg's sets, without resolving the writer again."""

    def __init__(self, output_file: OutputFile, layout: _ManifestLayout):
        self.output_file = output_file
        self.file_schema = layout.file_schema
        self.schema_name = "manifest_entry"
        self.sync_bytes = os.urandom(SYNC_SIZE)
        self.writer = layout.writer
        self.metadata = layout.metadata
        self._avro_schema = layout.avro_schema

    def _write_header(self) -> None:
        codec = self.metadata.get(AVRO_CODEC_KEY, TableProperties.WRITE_AVRO_COMPRESSION_DEFAULT)
        codec = CODEC_MAPPING_ICEBERG_TO_AVRO.get(codec, codec)
        meta = {**self.metadata, "avro.schema": self._avro_schema, AVRO_CODEC_KEY: codec}
        _HEADER_WRITER.write(self.encoder, AvroFileHeader(MAGIC, meta, self.sync_bytes))


_HEADER_WRITER = construct_writer(META_SCHEMA)


class DataManifestWriter(ManifestWriterV2):
    """pyiceberg's v2 data manifest writer, whose file's setup is worked out once per table layout
    (`_manifest_layout`)."""

    def new_writer(self) -> AvroOutputFile[ManifestEntry]:
        return _PreparedAvroOutputFile(self._output_file, _manifest_layout(self))


class ListingProducer(_SnapshotProducer[Any]):
    """A snapshot producer that keeps the paths of the manifests its snapshot lists (`listed`), so that those it
    wrote and does not list can be deleted once it committed (`commit_on_base`)."""

    listed: frozenset[str] = frozenset()

    def _manifests(self) -> list[ManifestFile]:
        manifests = super()._manifests()
        self.listed = frozenset(manifest.manifest_path for manifest in manifests)
        return manifests


class Overwrite(ListingProducer, _OverwriteFiles):
    """pyiceberg's overwrite (`UpdateSnapshot.overwrite`), keeping what it lists, each thread with manifest
    evaluators of its own (`_build_manifest_evaluator`)."""

    def _build_manifest_evaluator(self, spec_id: int) -> Callable[[ManifestFile], bool]:
        """pyiceberg's manifest evaluator for the spec, one per thread. pyiceberg's `_deleted_entries` evaluates the
        parent's manifests on its thread pool with one evaluator per spec, which keeps the manifest it is looking at
        in an attribute (`_ManifestEvalVisitor.eval`): two threads at once evaluated one manifest's predicate against
        another's partition bounds, skipped a manifest that held files to delete, and failed the overwrite
        ("Missing required files to delete", an overwrite answered INTERNAL beside concurrent reads)."""
        spec, schema = self.spec(spec_id), self.schema()
        partition_filter, case_sensitive = self.partition_filters[spec_id], self._case_sensitive
        local = threading.local()

        def evaluate(manifest: ManifestFile) -> bool:
            evaluator = getattr(local, "evaluator", None)
            if evaluator is None:
                evaluator = local.evaluator = manifest_evaluator(spec, schema, partition_filter, case_sensitive)
            return bool(evaluator(manifest))

        return evaluate


class FastAppend(ListingProducer, _FastAppendFiles):
    """pyiceberg's fast append (`UpdateSnapshot.fast_append`), reading the parent's manifest list, and the manifests
    a merge folds (`MergeAppend`), through `_ResolvedAvroFile`, and writing data manifests with `DataManifestWriter`."""

    def _existing_manifests(self) -> list[ManifestFile]:
        """The parent snapshot's manifests that still list files (as pyiceberg's own)."""
        if self._parent_snapshot_id is None:
            return []
        parent = self._transaction.table_metadata.snapshot_by_id(self._parent_snapshot_id)
        if parent is None:
            raise ValueError(f"Snapshot could not be found: {self._parent_snapshot_id}")
        return [
            manifest
            for manifest in snapshot_manifests(self._io, parent)
            if manifest.has_added_files()
            or manifest.has_existing_files()
            or manifest.added_snapshot_id == self._snapshot_id
        ]

    def fetch_manifest_entry(self, manifest: ManifestFile, discard_deleted: bool = True) -> list[ManifestEntry]:
        return manifest_entries(self._io, manifest, discard_deleted)

    def new_manifest_writer(self, spec: PartitionSpec) -> ManifestWriter:
        """The writer of a new data manifest (the appended files', or a merge's): a `DataManifestWriter` on a v2
        table."""
        if self._transaction.table_metadata.format_version != 2:
            return super().new_manifest_writer(spec)
        output = self.new_manifest_output()
        return DataManifestWriter(spec, self.schema(), output, self._snapshot_id, self._compression)


class MergeAppend(FastAppend, _MergeAppendFiles):
    """pyiceberg's merge append (`UpdateSnapshot.merge_append`), reading and writing manifests as `FastAppend` does."""


def append_producer(transaction: Transaction, properties: dict[str, str], merge: bool) -> FastAppend:
    """The snapshot producer of an append to the transaction's table: a merge append with `merge`, else a fast
    append, as `transaction.update_snapshot(snapshot_properties=properties)` would make them."""
    kind = MergeAppend if merge else FastAppend
    return kind(Operation.APPEND, transaction, transaction_io(transaction), snapshot_properties=properties)


def overwrite_producer(transaction: Transaction, properties: dict[str, str]) -> Overwrite:
    """The snapshot producer of an overwrite of the transaction's table, as
    `transaction.update_snapshot(snapshot_properties=properties).overwrite()` would make it."""
    operation = Operation.OVERWRITE if transaction.table_metadata.current_snapshot() is not None else Operation.APPEND
    return Overwrite(operation, transaction, transaction_io(transaction), snapshot_properties=properties)


def partitions(spec: PartitionSpec, schema: Schema, rows: pa.Table) -> list[tuple[PartitionKey, pa.Table]]:
    """The rows of each partition of `spec`, with its key. pyiceberg-core transforms the source columns, `aligned`
    first: it panics on the unaligned buffers a Flight stream's batches may have."""
    for field in spec.fields:
        index = rows.schema.get_field_index(_top_level_name(schema, field.source_id) or "")
        if index >= 0:  # the top-level column that is or holds the source
            rows = rows.set_column(index, rows.field(index), aligned(rows.column(index)))
    return [(part.partition_key, part.arrow_table_partition) for part in _determine_partitions(spec, schema, rows)]


def _top_level_name(schema: Schema, field_id: int) -> str | None:
    """The name of the top-level field that is, or holds, field `field_id`."""
    for field in schema.fields:
        if field.field_id == field_id or (
            isinstance(field.field_type, StructType) and field_id in index_by_id(field.field_type)
        ):
            return field.name
    return None


def to_file_schema(
    file_schema: Schema, batch_schema: Schema, batch: pa.RecordBatch, format_model: FileFormatModel
) -> pa.RecordBatch:
    """A batch (of `batch_schema`) as a data file stores it: `file_schema`'s columns, with field ids."""
    return _to_requested_schema(file_schema, batch_schema, batch, include_field_ids=True, format_model=format_model)


def schema_without_ids(arrow: pa.Schema) -> Schema:
    """An Iceberg schema of Arrow fields that carry no field ids (a new table's; assign ids next)."""
    return _pyarrow_to_schema_without_ids(arrow)


def metadata_location_query(catalog: SqlCatalog) -> Select[str | None]:
    """The SQL catalog's query for a table's metadata location, bound by `catalog`, `namespace` and `table`:
    one indexed row, no metadata file read."""
    statement = select(IcebergTables.metadata_location).where(
        IcebergTables.catalog_name == bindparam("catalog"),
        IcebergTables.table_namespace == bindparam("namespace"),
        IcebergTables.table_name == bindparam("table"),
    )
    if (kind := catalog._iceberg_type_filter()) is not None:  # views share the table
        statement = statement.where(kind)
    return statement


def metadata_locations_query(catalog: SqlCatalog) -> Select[str, str, str | None]:
    """The SQL catalog's query for the namespace, name and metadata location of every table in some namespaces,
    bound by `catalog` and `namespaces` (a list): one query however many tables, no metadata file read."""
    statement = select(IcebergTables.table_namespace, IcebergTables.table_name, IcebergTables.metadata_location).where(
        IcebergTables.catalog_name == bindparam("catalog"),
        IcebergTables.table_namespace.in_(bindparam("namespaces", expanding=True)),
    )
    if (kind := catalog._iceberg_type_filter()) is not None:  # views share the table
        statement = statement.where(kind)
    return statement


@retry(**_RETRY_ARGS)  # type: ignore[call-overload]  # typed as dict[str, object] by pyiceberg
def rest_load_body(catalog: RestCatalog, identifier: tuple[str, ...]) -> bytes:
    """The body of the REST catalog's loadTable answer for the table, unparsed: the request `RestCatalog.load_table`
    sends (its session's auth and headers, its url and prefix, its snapshot-loading-mode), and the errors it raises
    (`NoSuchTableError` for 404, a `requests` error when the catalog does not answer), retried as it retries."""
    catalog._check_endpoint(Capability.V1_LOAD_TABLE)
    params = {}
    if mode := catalog.properties.get(SNAPSHOT_LOADING_MODE):
        if mode not in {"all", "refs"}:
            raise ValueError(f"Invalid snapshot-loading-mode: {mode}")
        params["snapshots"] = mode
    url = catalog.url(Endpoints.load_table, prefixed=True, **catalog._split_identifier_for_path(identifier))
    response = catalog._session.get(url, params=params)
    try:
        response.raise_for_status()
    except HTTPError as exc:
        _handle_non_200_response(exc, {404: NoSuchTableError})
    return response.content


def rest_table(
    catalog: RestCatalog, identifier: tuple[str, ...], answer: dict[str, Any], metadata: TableMetadata
) -> Table:
    """The table `RestCatalog.load_table` makes of a loadTable answer (`answer`, its JSON decoded), on `metadata`
    parsed from the answer's `metadata` already (pydantic takes the model as it is)."""
    response = TableResponse.model_validate({**answer, "metadata": metadata})
    return catalog._response_to_table(identifier, response)


def table_io(catalog: Catalog, properties: dict[str, str], location: str) -> FileIO:
    """The FileIO the catalog gives a table it loads (`FeatureCatalog` builds tables from metadata it parsed)."""
    return catalog._load_file_io(properties, location)


class DeleteManifestWriter(ManifestWriterV2):
    """A v2 manifest of delete files (pyiceberg writes data manifests only)."""

    def content(self) -> ManifestContent:
        return ManifestContent.DELETES

    @property
    def _meta(self) -> dict[str, str]:
        return {**super()._meta, "content": "deletes"}


class DropRemovedEntries(_SnapshotProducer["DropRemovedEntries"]):
    """A `replace` snapshot of the parent's files, without the parent's manifests that hold only entries
    of files it removed.

    Those entries are Iceberg's record of what a snapshot removed (other engines' snapshot expiry reads
    it), so the parent keeps them; but readers that plan the current snapshot read every manifest, and
    DuckDB's `iceberg_scan` read a compaction's removed-delete-files manifest on every filtered scan
    (0.94x of the same files written copy-on-write). Iceberg's next commit would drop them anyway.
    """

    def __init__(self, transaction: Transaction, properties: dict[str, str]):
        super().__init__(Operation.REPLACE, transaction, transaction_io(transaction), snapshot_properties=properties)

    def _existing_manifests(self) -> list[ManifestFile]:
        parent = self._transaction.table_metadata.snapshot_by_id(self._parent_snapshot_id or -1)
        if parent is None:
            return []
        return [m for m in parent.manifests(self._io) if m.has_added_files() or m.has_existing_files()]

    def _deleted_entries(self) -> list[ManifestEntry]:
        return []

    def _validate_concurrency(self) -> None:
        """Nothing to check: the `RewriteFiles` before it in the transaction refused the commits it cannot
        sit on, and concurrent appends are fine. (pyiceberg's serializable check would refuse any append, so
        a compaction of a table written every few seconds would never commit.)"""

    def _summary(self, snapshot_properties: dict[str, str] = EMPTY_DICT) -> Summary:
        """The parent's totals: no file changes (pyiceberg's summaries know no `replace`)."""
        parent = self._transaction.table_metadata.snapshot_by_id(self._parent_snapshot_id or -1)
        previous = parent.summary.additional_properties if parent and parent.summary else {}
        totals = {k: v for k, v in previous.items() if k.startswith("total-")}
        return Summary(operation=Operation.REPLACE, **totals, **snapshot_properties)


class RewriteFiles(_SnapshotProducer["RewriteFiles"]):
    """One snapshot that removes `removed` files and adds `added` ones (data or delete files).

    An added file in `sequences` keeps that data sequence number instead of taking the snapshot's: the spec
    lets an ADDED entry carry one explicitly (Java's `RewriteFiles.dataSequenceNumber` does so), so that rows
    rewritten from older files keep their place in commit order (changes/rewrite.py)."""

    def __init__(
        self,
        transaction: Transaction,
        operation: Operation,
        removed: Iterable[DataFile],
        added: Iterable[DataFile],
        properties: dict[str, str],
        sequences: Mapping[str, int] = EMPTY_DICT,
    ):
        super().__init__(operation, transaction, transaction_io(transaction), snapshot_properties=properties)
        self._deleted_data_files = set(removed)
        self._added_data_files = list(added)
        self._sequences = sequences

    def _summary(self, snapshot_properties: dict[str, str] = EMPTY_DICT) -> Summary:
        """pyiceberg's summary (the files and records added and removed, and the new totals), with each added file
        under the spec its manifest has (`_manifests`): pyiceberg's own puts every added file under the current spec,
        and a delete file of an older spec with fewer fields failed it (IndexError). pyiceberg works summaries out for
        `append`, `overwrite` and `delete` only: a `replace` (a compaction) counts its files as an overwrite would."""
        metadata = self._transaction.table_metadata
        schema, specs = metadata.schema(), metadata.specs()
        limit = metadata.properties.get(
            TableProperties.WRITE_PARTITION_SUMMARY_LIMIT, TableProperties.WRITE_PARTITION_SUMMARY_LIMIT_DEFAULT
        )
        collector = SnapshotSummaryCollector(partition_summary_limit=int(limit))
        for file in self._added_data_files:
            spec = metadata.spec() if file.content == DataFileContent.DATA else specs[file.spec_id]
            collector.add_file(data_file=file, partition_spec=spec, schema=schema)
        for file in self._deleted_data_files:
            collector.remove_file(data_file=file, partition_spec=specs[file.spec_id], schema=schema)
        parent = metadata.snapshot_by_id(self._parent_snapshot_id) if self._parent_snapshot_id is not None else None
        operation = Operation.OVERWRITE if self._operation == Operation.REPLACE else self._operation
        summary = update_snapshot_summaries(
            summary=Summary(operation=operation, **collector.build(), **snapshot_properties),
            previous_summary=parent.summary if parent is not None else None,
        )
        if self._operation != Operation.REPLACE:
            return summary
        return Summary(operation=Operation.REPLACE, **summary.additional_properties)

    def _writer(self, content: ManifestContent, spec: PartitionSpec) -> ManifestWriter:
        if content == ManifestContent.DELETES:
            output = self.new_manifest_output()
            return DeleteManifestWriter(spec, self.schema(), output, self._snapshot_id, self._compression)
        return self.new_manifest_writer(spec)

    def _manifests(self) -> list[ManifestFile]:
        # New data files are written with the table's current spec; delete files carry their data file's.
        groups: dict[tuple[ManifestContent, int], list[DataFile]] = {}  # one new manifest each
        default_spec = self._transaction.table_metadata.default_spec_id
        for file in self._added_data_files:
            if file.content == DataFileContent.DATA:
                groups.setdefault((ManifestContent.DATA, default_spec), []).append(file)
            else:
                groups.setdefault((ManifestContent.DELETES, file.spec_id), []).append(file)
        added = []
        for (content, spec_id), files in groups.items():
            with self._writer(content, self.spec(spec_id)) as writer:
                for file in files:
                    writer.add_entry(
                        ManifestEntry.from_args(
                            status=ManifestEntryStatus.ADDED,
                            snapshot_id=self._snapshot_id,
                            sequence_number=self._sequences.get(file.file_path),
                            file_sequence_number=None,
                            data_file=file,
                        )
                    )
            added.append(writer.to_manifest_file())
        new_deletes = [spec_id for content, spec_id in groups if content == ManifestContent.DELETES]
        return added + self._merge_delete_manifests(self._existing_manifests(), new_deletes)

    def _merge_delete_manifests(self, manifests: list[ManifestFile], new: list[int]) -> list[ManifestFile]:
        """Fold a spec's existing delete manifests into one when the commit would leave
        `commit.manifest.min-count-to-merge` (100) of them: each merge-on-read delete adds one, and every
        reader plans through them all (Iceberg's own commits merge manifests likewise)."""
        limit = property_as_int(
            self._transaction.table_metadata.properties,
            TableProperties.MANIFEST_MIN_MERGE_COUNT,
            TableProperties.MANIFEST_MIN_MERGE_COUNT_DEFAULT,
        )
        by_spec: dict[int, list[ManifestFile]] = {}
        for manifest in manifests:
            if manifest.content == ManifestContent.DELETES:
                by_spec.setdefault(manifest.partition_spec_id, []).append(manifest)
        kept = [m for m in manifests if m.content != ManifestContent.DELETES]
        for spec_id, group in by_spec.items():
            if len(group) < 2 or len(group) + new.count(spec_id) < (limit or 0):
                kept += group
                continue
            entries = [e for m in group for e in m.fetch_manifest_entry(self._io, discard_deleted=False)]
            with self._writer(ManifestContent.DELETES, self.spec(spec_id)) as writer:
                for entry in entries:
                    if entry.status != ManifestEntryStatus.DELETED:
                        writer.existing(entry)
                    elif entry.snapshot_id == self._snapshot_id:  # removed by this commit: say so
                        writer.delete(entry)
            kept.append(writer.to_manifest_file())
        return kept

    def _existing_manifests(self) -> list[ManifestFile]:
        """The parent's manifests: as they are, or rewritten with the removed files marked deleted."""
        parent = self._transaction.table_metadata.snapshot_by_id(self._parent_snapshot_id or -1)
        if parent is None:
            return []
        removed = {file.file_path for file in self._deleted_data_files}
        found: set[str] = set()
        manifests = []
        for manifest in parent.manifests(self._io):
            if not (manifest.has_added_files() or manifest.has_existing_files()):
                continue
            entries = manifest.fetch_manifest_entry(self._io, discard_deleted=True)
            if not any(entry.data_file.file_path in removed for entry in entries):
                manifests.append(manifest)
                continue
            with self._writer(manifest.content, self.spec(manifest.partition_spec_id)) as writer:
                for entry in entries:
                    if entry.data_file.file_path in removed:
                        writer.delete(entry)
                        found.add(entry.data_file.file_path)
                    else:
                        writer.existing(entry)
            manifests.append(writer.to_manifest_file())
        if missing := removed - found:
            raise ValidationException(f"{len(missing)} file(s) to replace are no longer in the table")
        return manifests

    def _deleted_entries(self) -> list[ManifestEntry]:
        return []  # `_existing_manifests` marks them, in manifests of their own content

    def _validate_concurrency(self) -> None:
        """Refuse when anything but an append was committed since the change was planned."""
        window = self._commit_window
        if window is None or window.is_empty():
            return
        metadata = self._transaction._table.metadata
        base = window.base.snapshot_id if window.base is not None else None
        snapshot = window.head
        while snapshot is not None and snapshot.snapshot_id != base:
            operation = snapshot.summary.operation if snapshot.summary else None
            if operation != Operation.APPEND:
                raise ValidationException(f"snapshot {snapshot.snapshot_id} ({operation}) was committed concurrently")
            parent = snapshot.parent_snapshot_id
            snapshot = metadata.snapshot_by_id(parent) if parent is not None else None
        if snapshot is None and base is not None:
            raise ValidationException(f"snapshot {base} the change was planned on is no longer an ancestor")


_STATISTICS = slice(6, 12)  # DataFile's column_sizes, value_counts, null/nan counts, lower and upper bounds


def without_statistics(data_file: DataFile) -> DataFile:
    """A copy of `data_file` without its column statistics: what reading it still needs (path, format, partition,
    rows, size, spec), for plans kept after their files were pruned. A file of a 500-column table holds about 3,000
    statistics values (200 KB in memory); without them it takes under 1 KB."""
    slim = copy.copy(data_file)
    slim._data = list(data_file._data)
    slim._data[_STATISTICS] = [None] * (_STATISTICS.stop - _STATISTICS.start)
    return slim
