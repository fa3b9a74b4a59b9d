"""Iceberg access: the catalog is the registry of feature tables.

A feature table is an ordinary Iceberg table whose table properties name its entity keys, event
time, optional created time and TTL (`FeatureSpec`). Nothing about a table is stored anywhere else,
so every replica, and every other engine, sees the same definitions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pydantic_core import from_json
from pyiceberg.catalog import Catalog, MetastoreCatalog, load_catalog
from pyiceberg.catalog.rest import RestCatalog
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError
from pyiceberg.io import load_file_io
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.refs import SnapshotRefType
from pyiceberg.transforms import (
    BucketTransform,
    DayTransform,
    HourTransform,
    IdentityTransform,
    MonthTransform,
    Transform,
    TruncateTransform,
    YearTransform,
)
from sqlalchemy import Select
from sqlalchemy.exc import IntegrityError

from flight_server.base.config import CatalogError, catalog_failure, redact
from flight_server.base.lru import WeightedLru
from flight_server.base.outages import outage
from flight_server.iceberg.internals import (
    metadata_location_query,
    metadata_locations_query,
    rest_load_body,
    rest_table,
    table_io,
)
from flight_server.iceberg.reparse import Parsed, metadata_text, parse_object
from flight_server.wire.actions import DELETE_MODES
from flight_server.wire.codec import parse_table_name
from flight_server.wire.errors import NotFoundError, RequestError

log = logging.getLogger(__name__)

# Tables kept loaded for reading (`read`), and the raw JSON kept to parse their next metadata files (`_load`), each
# weighed in snapshots (about 2.3 KiB each of models, as much again of JSON): the least recently used go first. Not a
# count of tables: a server of hundreds of tables, each written every minute, goes through all of them in turn, and a
# cap below them all would parse every table's metadata in full at each put and each read.
READ_CACHE_SNAPSHOTS = 100_000
PARSED_SNAPSHOTS = 100_000

KEPT_LOCATIONS = 4096  # tables' locations by metadata file (`location`); past it, the cache starts over

KEPT_ANSWERS = 4096  # REST catalogs: the last loadTable answer's digest per table (`_Answer`), least recently used out

# Table properties: the last snapshot expiry's and the last compaction's records (JSON of a few hundred bytes, each
# replaced by the next), set by their own commits, so that every replica, a restarted one too, and any Iceberg tool
# sees when the table was last expired and compacted, and what that did.
LAST_EXPIRY_PROPERTY = "flight.maintenance.last-expiry"

LAST_COMPACTION_PROPERTY = "flight.maintenance.last-compaction"

PROP_ENTITY_KEYS = "feature.entity-keys"

PROP_EVENT_TIME = "feature.event-time"

PROP_CREATED_TIME = "feature.created-time"

PROP_TTL_SECONDS = "feature.ttl-seconds"

PROP_DELETE_MODE = "write.delete.mode"  # Iceberg's own: copy-on-write or merge-on-read

DEFAULT_BUCKETS = 8

# Iceberg's own table properties, set on the tables the server creates so that a put's cost does not grow with
# the table's history (docs/operations.md, "Long histories"). Tables created elsewhere keep theirs.
NEW_TABLE_HISTORY = {
    # Appends fold the table's small manifests into one once this many would be live: every read plans through
    # each manifest (about 1.5 ms each), and a merge every few puts did not slow puts (docs/operations.md).
    "commit.manifest-merge.enabled": "true",
    "commit.manifest.min-count-to-merge": "10",
    # ... into manifests of at most 128 KB: Iceberg's 8 MB made one, which every merge wrote again whole, so that a
    # put's cost grew with the table's files. A merge now rewrites at most about this much (some 300 entries of an
    # 11-column table), while planning pays about 1.2 ms a manifest on some 16 ms for a full one's entries.
    "commit.manifest.target-size-bytes": "131072",
    # Each commit writes a metadata file; keep the last 100 and delete older ones as commits drop them from the log.
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "100",
}

# `bucket(8, id)`, or `bucket[8](id)` as Iceberg (and `describe`) print a transform.
_TRANSFORM = re.compile(r"^\s*(\w+)\s*(?:\[\s*(\d+)\s*\])?\s*\(\s*(?:(\d+)\s*,\s*)?(.+?)\s*\)\s*$")  # any column name


@dataclass(frozen=True)
class FeatureSpec:
    """What makes a table a feature table: its keys, its clock, and how long a row stays valid."""

    entity_keys: tuple[str, ...]
    event_time: str
    created_time: str | None = None
    ttl_seconds: int | None = None
    # The schema a training set reads the table in (`read_schema`): its indexes are cached per spec, so per schema,
    # and a schema change without a snapshot never serves an index of the old columns. None: not said (definitions).
    schema_id: int | None = None

    @classmethod
    def from_properties(cls, properties: dict[str, str]) -> FeatureSpec | None:
        keys, event_time = properties.get(PROP_ENTITY_KEYS), properties.get(PROP_EVENT_TIME)
        if not keys or not event_time:
            return None
        ttl = properties.get(PROP_TTL_SECONDS)
        return cls(
            entity_keys=tuple(keys.split(",")),
            event_time=event_time,
            created_time=properties.get(PROP_CREATED_TIME) or None,
            ttl_seconds=int(ttl) if ttl else None,
        )

    def to_properties(self) -> dict[str, str]:
        """The table properties that define it (a new table also gets `NEW_TABLE_HISTORY`)."""
        props = {PROP_ENTITY_KEYS: ",".join(self.entity_keys), PROP_EVENT_TIME: self.event_time}
        if self.created_time:
            props[PROP_CREATED_TIME] = self.created_time
        if self.ttl_seconds:
            props[PROP_TTL_SECONDS] = str(self.ttl_seconds)
        return props

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.entity_keys, self.event_time, *((self.created_time,) if self.created_time else ()))

    def require_columns(self, schema: Schema, table: str) -> None:
        """Refuse a table whose definition names columns `schema` lacks: another engine renamed or dropped its key,
        event-time or created-time column, and the properties still name the old column (reads and writes by
        those names would fail deep inside, INTERNAL)."""
        names = {f.name for f in schema.fields}
        missing = [c for c in self.columns if c not in names]
        if missing:
            raise RequestError(
                f"table {table!r}: its feature definition names column(s) {missing}, which the table does not have "
                f"(columns: {[f.name for f in schema.fields]}); renamed or dropped by another engine? Set the table "
                f"properties {PROP_ENTITY_KEYS!r}, {PROP_EVENT_TIME!r} and {PROP_CREATED_TIME!r} to its columns"
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "entity_keys": list(self.entity_keys),
            "event_time": self.event_time,
            "created_time": self.created_time,
            "ttl_seconds": self.ttl_seconds,
        }


MAX_TRANSFORM_WIDTH = (1 << 31) - 1


def default_partitioning(spec: FeatureSpec) -> list[str]:
    """Month of the event time (time ranges prune whole months) and a bucket of the first key
    (a key lookup reads one bucket in eight). docs/configuration.md explains the choice."""
    return [f"month({spec.event_time})", f"bucket({DEFAULT_BUCKETS}, {spec.entity_keys[0]})"]


def partition_spec(fields: list[str], schema: Schema) -> PartitionSpec:
    """Parse `["month(ts)", "bucket(8, driver_id)"]` into a spec over `schema`."""
    partition_fields = []
    for index, text in enumerate(fields):
        match = _TRANSFORM.match(text)
        if not match:
            raise RequestError(f"partition field {text!r} is not of the form transform(column) or bucket(N, column)")
        name, bracketed, width, column = match.groups()
        if bracketed is not None and width is not None:
            raise RequestError(f"partition field {text!r}: give N once, as bucket(N, col) or bucket[N](col)")
        width = width if bracketed is None else bracketed
        transform: Transform[Any, Any]
        simple = {
            "identity": IdentityTransform,
            "year": YearTransform,
            "month": MonthTransform,
            "day": DayTransform,
            "hour": HourTransform,
        }
        if name in simple and width is None:
            transform = simple[name]()
        elif name in ("bucket", "truncate") and width is not None:
            size = int(width) if len(width) <= 10 else 0  # Iceberg keeps N as a 32-bit int; 0 would divide by zero
            if not 1 <= size <= MAX_TRANSFORM_WIDTH:
                raise RequestError(f"partition field {text!r}: N must be from 1 to {MAX_TRANSFORM_WIDTH}")
            transform = BucketTransform(size) if name == "bucket" else TruncateTransform(size)
        else:
            raise RequestError(
                f"partition field {text!r}: unknown transform; use identity, year, month, day, "
                "hour, bucket(N, col) or truncate(N, col)"
            )
        try:
            source = schema.find_field(column)
        except ValueError:
            raise NotFoundError(f"partition field {text!r}: no column {column!r}") from None
        if not transform.can_transform(source.field_type):
            raise RequestError(f"partition field {text!r}: cannot apply {name} to a {source.field_type} column")
        partition_fields.append(
            PartitionField(
                source_id=source.field_id,
                field_id=1000 + index,
                transform=transform,
                name=avro_name(f"{column}_{name}"),
            )
        )
    return PartitionSpec(*partition_fields)


def avro_name(name: str) -> str:
    """`name` as an Avro name (`[A-Za-z_][A-Za-z0-9_]*`), other characters as `_x<hex>` as pyiceberg sanitizes
    column names: manifests name partition fields in Avro, and DuckDB's reader refuses any other name by aborting
    the process that reads them (`Engine.metadata_file` refuses such tables instead)."""
    safe = re.sub(r"[^A-Za-z0-9_]", lambda c: f"_x{ord(c.group()):X}", name)
    return f"_{safe}" if safe[:1].isdigit() else safe


# Replicas starting at once on a new SQL catalog race to create its tables: the losers' CREATE fails with
# "already exists" (SQLite) or a duplicate key (PostgreSQL), and a second attempt finds the tables there.
_CREATION_RACE = ("already exists", "duplicate key")
_CREATION_ATTEMPTS = 3


def _load(name: str, properties: dict[str, str]) -> Catalog:
    attempt = 1
    while True:
        try:
            return load_catalog(name, **sql_pool_settings(properties))
        except Exception as exc:  # whatever the catalog library raises, the operator needs one line, no secret
            if attempt < _CREATION_ATTEMPTS and any(race in str(exc).lower() for race in _CREATION_RACE):
                log.info("catalog %r: another server was creating its tables; trying again", name)
                attempt += 1
                continue
            raise CatalogError(catalog_failure(name, properties, exc)) from exc


# SQLAlchemy dialects pyiceberg takes for a SQL catalog without `type` (pyiceberg infers it from the URI).
_SERVER_DATABASES = ("postgresql", "mysql", "mariadb", "oracle", "mssql")


def sql_pool_settings(properties: dict[str, str]) -> dict[str, str]:
    """`properties`, with a SQL catalog's pooled connections tested before use (`pool_pre_ping`) unless they say
    otherwise: a database restarted or failed over ends every session, and without the test each pooled connection
    would fail the next call that takes it (one query more a connection taken, a round trip to the database)."""
    uri = properties.get("uri", "")
    dialect = uri.split(":", 1)[0].split("+", 1)[0]  # `postgresql+psycopg2://...` -> postgresql
    sql = properties.get("type", "sql" if dialect in _SERVER_DATABASES else "") == "sql"
    if not sql or dialect == "sqlite" or "pool_pre_ping" in properties:
        return properties
    return {**properties, "pool_pre_ping": "true"}


@dataclass(frozen=True)
class _Answer:
    """A REST catalog's last loadTable answer for a table `read` keeps, as the kept table was made of it: a body the
    same to the byte (its digest) is the same table, nothing parsed. Else its metadata file and the table's uuid say
    whether the metadata is the kept one (SeaweedFS names a table dropped and created again's files as the dropped
    one's, review 23), and the answer's other keys (config, storage credentials) whether its FileIO is."""

    digest: bytes
    metadata_location: str
    table_uuid: uuid.UUID
    rest: dict[str, Any]

    def made(self, table: Table) -> bool:
        """Whether `table` is what this answer says (its metadata file, of the same table)."""
        return table.metadata_location == self.metadata_location and table.metadata.table_uuid == self.table_uuid


class FeatureCatalog:
    """The pyiceberg catalog, with the lookups and errors the server needs."""

    def __init__(self, name: str, properties: dict[str, str], default_namespace: str = "default"):
        self.name = name
        self.properties = properties
        self.default_namespace = default_namespace
        self.catalog: Catalog = _load(name, properties)
        # By table name: the last loaded for reading (see `read`).
        self._read: WeightedLru[str, Table] = WeightedLru(READ_CACHE_SNAPSHOTS, lambda t: len(t.metadata.snapshots) + 1)
        self._locations: dict[str, str] = {}  # by metadata file: its table's location (see `location`)
        # By table name, for tables `read` keeps: the last file parsed (`_load`), its entries' raw JSON beside their
        # models (about as much again as the models), for the tables of `PARSED_SNAPSHOTS` snapshots in all at most.
        self._parsed: WeightedLru[str, Parsed] = WeightedLru(PARSED_SNAPSHOTS, lambda kept: len(kept.snapshots) + 1)
        # By table name, REST catalogs: what the catalog answered when `read` last made its table (see `_fetch`).
        self._answers: WeightedLru[str, _Answer] = WeightedLru(KEPT_ANSWERS, lambda _: 1)
        log.info("catalog %r: %s", name, redact(properties))

    def cache_stats(self) -> dict[str, dict[str, Any]]:
        """The tables `read` keeps, and what is kept to parse their next metadata files (weighed in snapshots), for
        metrics and `health`."""
        return {"tables": self._read.stats("snapshots"), "parsed_metadata": self._parsed.stats("snapshots")}

    @property
    def names_metadata_files(self) -> bool:
        """Whether pyiceberg writes the tables' metadata files, each name with a uuid (SQL, Glue, Hive...: its
        `MetastoreCatalog`s), so that a path's content never changes. A REST catalog's server writes and names them:
        SeaweedFS's are `<location>/metadata/v<N>.metadata.json`, the same again for a table dropped and created again
        under its name (review 23)."""
        return isinstance(self.catalog, MetastoreCatalog)

    def identifier(self, table: str) -> tuple[str, ...]:
        return parse_table_name(table, self.default_namespace)

    def metadata_location(self, table: str) -> str | None:
        """Where the catalog points the table now, when it can say so cheaply (SQL catalogs: one indexed
        row, no metadata file read; REST catalogs: one loadTable request, its metadata not parsed); None otherwise,
        or when it has no such table (`load` to know).

        Metadata files are never rewritten, so on SQL catalogs an unchanged pointer means an unchanged table (`read`);
        a REST server may name a table dropped and created again's files as the dropped one's (`_Answer`).
        """
        identifier = self.identifier(table)
        if self._rest is None:
            return self._locate(identifier)
        try:
            _, kept, answer = self._answer(self._rest, identifier)
        except NotFoundError:
            return None
        if kept is not None:
            return kept.metadata_location
        location = answer.get("metadata-location") if isinstance(answer, dict) else None
        return location if isinstance(location, str) else None

    @property
    def _rest(self) -> RestCatalog | None:
        return self.catalog if isinstance(self.catalog, RestCatalog) else None

    def _answer(self, catalog: RestCatalog, identifier: tuple[str, ...]) -> tuple[bytes, Table | None, Any]:
        """The REST catalog's loadTable answer for the table now: its body's digest, and either the table `read` keeps
        when the body is the one it was made of, to the byte (`_Answer`), or else the body's JSON decoded (no pydantic;
        None if it is no JSON). `NotFoundError` when the catalog has no such table; the catalog's other errors as
        pyiceberg's `load_table` raises them."""
        try:
            body = rest_load_body(catalog, identifier)
        except (NoSuchTableError, NoSuchNamespaceError):
            raise NotFoundError(f"table {'.'.join(identifier)!r} does not exist") from None
        digest = hashlib.sha1(body, usedforsecurity=False).digest()
        name = ".".join(identifier)
        kept, answer = self._read.peek(name), self._answers.peek(name)
        if kept is not None and answer is not None and answer.digest == digest and answer.made(kept):
            return digest, kept, None
        try:
            return digest, None, from_json(body)
        except ValueError:
            return digest, None, None

    def _fetch(self, catalog: RestCatalog, identifier: tuple[str, ...], keep: bool) -> Table:
        """The table as the REST catalog answers loadTable now (one request): the one `read` keeps when the answer is
        the one it was made of (to the byte, or the same metadata file of the same table: nothing parsed), else made
        of this answer, its metadata parsed reusing the entries of the last one parsed here (`reparse`) for a table
        `read` keeps (`keep`) or had kept. An answer that does not read as a loadTable answer is loaded again by
        pyiceberg, with its errors, as before."""
        name = ".".join(identifier)
        digest, same, answer = self._answer(catalog, identifier)
        if same is not None:
            return same
        kept = self._read.peek(name)
        try:
            if not isinstance(answer, dict):
                raise ValueError("the loadTable answer is no JSON object")
            location, raw = answer["metadata-location"], answer["metadata"]
            rest = {key: value for key, value in answer.items() if key != "metadata"}
            seen = _Answer(digest, location, uuid.UUID(raw["table-uuid"]), rest)
            if kept is not None and seen.made(kept):  # the same metadata; its FileIO too if the rest is the same
                previous = self._answers.peek(name)
                unchanged = previous is not None and previous.rest == rest
                table = kept if unchanged else rest_table(catalog, identifier, answer, kept.metadata)
            else:
                reusing = keep or name in self._parsed
                metadata = self._reparse(name, raw) if reusing else parse_object(raw, None)[0]
                table = rest_table(catalog, identifier, answer, metadata)
        except Exception:  # pyiceberg's own load below says what is wrong, as it did before
            log.debug("table %r: the catalog's answer loaded again by pyiceberg", name, exc_info=True)
            self._answers.discard(name)
            return self._load(identifier, None, keep=False)
        if keep:
            self._answers.put(name, seen)
        return table

    def _locate(self, identifier: tuple[str, ...]) -> str | None:
        if self._pointer is None or not isinstance(self.catalog, SqlCatalog):
            return None
        *namespace, name = identifier
        with self.catalog.engine.connect() as connection:
            bound = {"catalog": self.catalog.name, "namespace": ".".join(namespace), "table": name}
            return connection.execute(self._pointer, bound).scalar()

    def metadata_locations(self, tables: Collection[str]) -> dict[str, str] | None:
        """Where the catalog points each of `tables` now (`ns.table` -> metadata file; a table it does not have is
        left out), in one query (SQL catalogs: polling many tables costs one round trip, not one each, and reads the
        rows of their namespaces alone, not those of a catalog shared with other engines); None where the catalog
        cannot say so cheaply, or fails (the pollers then look at each table on their own, which says why). None on
        REST catalogs too: they answer one table a request, which is what each poller's own look (`read`) costs, and
        an unchanged table costs no parse there either; a location alone would not tell a table created again under
        its name from the dropped one there (`_Answer`), and with a write process the online refresh looks from it,
        off the serving process."""
        if self._pointers is None or not isinstance(self.catalog, SqlCatalog):
            return None
        names = {".".join(self.identifier(table)) for table in tables}
        if not names:
            return {}
        bound = {"catalog": self.catalog.name, "namespaces": sorted({name.rpartition(".")[0] for name in names})}
        try:
            with self.catalog.engine.connect() as connection:
                rows = connection.execute(self._pointers, bound)
                found = {f"{namespace}.{name}": location for namespace, name, location in rows if location}
        except Exception as exc:
            log.debug("the catalog's pointers not read at once: %s", outage(exc) or exc)
            return None
        return {name: location for name, location in found.items() if name in names}

    @cached_property
    def _pointers(self) -> Select[str, str, str | None] | None:
        return metadata_locations_query(self.catalog) if isinstance(self.catalog, SqlCatalog) else None

    @cached_property
    def _pointer(self) -> Select[str | None] | None:
        """The SQL catalog's query for a table's metadata location (built once: building costs more than running)."""
        return metadata_location_query(self.catalog) if isinstance(self.catalog, SqlCatalog) else None

    def load(self, table: str) -> Table:
        """The table, or `NotFoundError` naming it. A table of its own: a commit through it changes no other."""
        identifier = self.identifier(table)
        if self._rest is not None:
            loaded = self._fetch(self._rest, identifier, keep=False)
            return own_copy(loaded) if loaded is self._read.peek(".".join(identifier)) else loaded
        reusing = ".".join(identifier) in self._parsed  # else no use for the pointer: pyiceberg reads it
        return self._load(identifier, self._locate(identifier) if reusing else None, keep=False)

    def read(self, table: str) -> Table:
        """The table for reading: the one loaded last while the catalog still points at the same metadata
        file (SQL catalogs say so from one row; REST catalogs by their loadTable answer, one request whose
        metadata is parsed only when it changed: `_fetch`), else loaded now. Shared between requests: never commit
        through it (`find_for_change` gives a copy to change). Reading a long history's metadata costs
        tens of milliseconds per request otherwise (30 ms for a table of 101 snapshots), and under the GIL
        (every online refresh poll)."""
        identifier = self.identifier(table)
        name = ".".join(identifier)
        if self._rest is not None:
            loaded = self._fetch(self._rest, identifier, keep=True)
            if loaded is not self._read.peek(name):
                self._read.put(name, loaded)
            return loaded
        pointer = self._locate(identifier)
        if pointer is None:
            loaded = self.load(table)
            self._read.put(name, loaded)  # not to read again (no pointer says it is current), but for `read_snapshot`
            return loaded
        cached = self._read.get(name, lambda kept: kept.metadata_location == pointer)
        if cached is not None:
            return cached
        loaded = self._load(identifier, pointer, keep=True)
        self._read.put(name, loaded)
        return loaded

    def current(self, tables: list[str]) -> Iterator[Table]:
        """Each of `tables` as it is now, for listings: as `read` keeps it where the catalog still points there (SQL
        catalogs say so for all in one query, REST catalogs table by table: `load`), else loaded (and not kept: a
        listing of every table would push the tables in use out). A table dropped since it was listed is left out."""
        pointers = self.metadata_locations(tables)
        for table in tables:
            name = ".".join(self.identifier(table))
            kept = self._read.peek(name)
            if kept is not None and pointers is not None and pointers.get(name) == kept.metadata_location:
                yield kept
                continue
            try:
                yield self.load(table)
            except NotFoundError:
                continue

    def read_snapshot(self, table: str, snapshot_id: int | None) -> Table:
        """The table for reading `snapshot_id` (a pinned read: an endpoint ticket, time travel by id): as `read`,
        but while the catalog is unavailable, the table as `read` last loaded it, if it has that snapshot. A
        snapshot never changes, so the workers of a training job go on reading the tickets they were given through
        a catalog's restart or failover. A read of the current state (`snapshot_id` None) still fails: only the
        catalog knows what is current."""
        try:
            return self.read(table)
        except Exception as exc:
            if snapshot_id is None or outage(exc) is None:
                raise
            kept = self._read.peek(".".join(self.identifier(table)))
            if kept is None or kept.metadata.snapshot_by_id(snapshot_id) is None:
                raise
            log.debug("table %r: snapshot %s read as last loaded, the catalog being unavailable", table, snapshot_id)
            return kept

    def location(self, table: str) -> str:
        """The table's location (or `NotFoundError`), loading its metadata only when the catalog points it at a
        metadata file not seen before (SQL catalogs say so from one row), and leaving `read`'s cache alone:
        orphan removal asks this of every table of the catalog. On REST catalogs: from the loadTable answer, its
        metadata not parsed."""
        identifier = self.identifier(table)
        if self._rest is not None:
            _, kept, answer = self._answer(self._rest, identifier)
            if kept is not None:
                return kept.metadata.location
            metadata = answer.get("metadata") if isinstance(answer, dict) else None
            location = metadata.get("location") if isinstance(metadata, dict) else None
            if isinstance(location, str):
                return location
        pointer = self._locate(identifier)
        if pointer is not None and pointer in self._locations:
            return self._locations[pointer]
        loaded = self._load(identifier, pointer, keep=False)
        if len(self._locations) >= KEPT_LOCATIONS:
            self._locations.clear()
        self._locations[loaded.metadata_location] = loaded.metadata.location
        return loaded.metadata.location

    def _load(self, identifier: tuple[str, ...], pointer: str | None, keep: bool) -> Table:
        """The table at the metadata file `pointer` (from `_locate`), its snapshots and log entries reused from the
        last file of the table parsed here (`reparse`: a new file of a long history costs its new entries, not
        all of them), for a table `read` keeps (`keep`) or had kept. Otherwise, and whenever that fails, as
        pyiceberg loads it, with its errors."""
        name = ".".join(identifier)
        if pointer is not None and (keep or name in self._parsed):
            previous = self._read.peek(name)
            try:
                io = previous.io if previous is not None else load_file_io(self.catalog.properties, pointer)
                metadata = self._reparse(name, from_json(metadata_text(io, pointer)))
            except Exception:  # pyiceberg's own load below says what is wrong, as it did before
                log.debug("table %r: parsing %s again in full", name, pointer, exc_info=True)
            else:
                io = table_io(self.catalog, metadata.properties, pointer)
                return Table(identifier, metadata, pointer, io=io, catalog=self.catalog)
        try:
            return self.catalog.load_table(identifier)
        except (NoSuchTableError, NoSuchNamespaceError):
            raise NotFoundError(f"table {name!r} does not exist") from None

    def _reparse(self, name: str, data: dict[str, Any]) -> TableMetadata:
        """The table's metadata in `data` (JSON decoded), parsed reusing the entries of the last metadata parsed here
        for it (`reparse`), which this one then stands for (`_load`, `_fetch`)."""
        metadata, parsed = parse_object(data, self._parsed.get(name))
        if parsed is None:
            self._parsed.discard(name)
        else:
            self._parsed.put(name, parsed)
        return metadata

    def find_for_change(self, table: str) -> Table | None:
        """The table to change, or None when it does not exist (yet): from the metadata `read` holds while the
        catalog still points at it (a put then parses no metadata file before its commit), as a `Table` of its
        own, since a commit replaces the metadata of the object it went through."""
        try:
            return own_copy(self.read(table))
        except NotFoundError:
            return None

    def remember(self, table: str, committed: Table) -> None:
        """Keep the table as a commit through this server left it for `read` (it points at what the commit
        wrote), so the next put or read of an unchanged table parses no metadata file (on REST catalogs, the next
        answer names its metadata file: `_fetch`)."""
        if self._pointer is not None or self._rest is not None:
            self._read.put(".".join(self.identifier(table)), own_copy(committed))

    def ensure_namespace(self, namespace: tuple[str, ...]) -> None:
        """Create the namespace unless it exists, also when another replica creates it at the same moment:
        both see it missing, and the SQL catalog refuses the second insert with an IntegrityError (other
        catalogs say it already exists, which pyiceberg takes as success). Either way it exists now."""
        try:
            self.catalog.create_namespace_if_not_exists(namespace)
        except IntegrityError:
            if not self.catalog.namespace_exists(namespace):
                raise
            log.debug("namespace %s was created concurrently", ".".join(namespace))

    def table_names(self) -> list[str]:
        """Every table in every namespace, as `ns.table`."""
        names: list[str] = []
        pending = list(self.catalog.list_namespaces())
        seen: set[tuple[str, ...]] = set()
        while pending:
            namespace = tuple(pending.pop())
            if namespace in seen:
                continue
            seen.add(namespace)
            names.extend(".".join(identifier) for identifier in self.catalog.list_tables(namespace))
            with contextlib.suppress(NotImplementedError, NoSuchNamespaceError):
                pending.extend(self.catalog.list_namespaces(namespace))
        return sorted(set(names))


def own_copy(table: Table) -> Table:
    """A `Table` object of its own on the same metadata: a commit through it replaces only its metadata."""
    return Table(table.name(), table.metadata, table.metadata_location, table.io, table.catalog, table.config)


def feature_spec(table: Table, schema: Schema | None = None) -> FeatureSpec:
    """The table's feature definition, its columns in `schema` (the table's current one unless given); a
    `RequestError` when it has none (it cannot serve features) or names a column `schema` lacks."""
    spec = FeatureSpec.from_properties(table.metadata.properties)
    if spec is None:
        raise RequestError(f"table {table_name(table)!r} is not a feature table (it has no entity keys and event time)")
    spec.require_columns(schema if schema is not None else table.schema(), table_name(table))
    return spec


def table_name(table: Table) -> str:
    return ".".join(table.name())


def pins(metadata: TableMetadata) -> dict[str, int]:
    """The table's pins: its Iceberg tags, by name (snapshot expiry keeps their snapshots)."""
    return {
        name: ref.snapshot_id for name, ref in metadata.refs.items() if ref.snapshot_ref_type == SnapshotRefType.TAG
    }


def describe(table: Table, max_snapshots: int = 100) -> dict[str, Any]:
    """A table's definition and history, as the `describe` action returns it."""
    metadata = table.metadata
    spec = FeatureSpec.from_properties(metadata.properties)
    current = table.current_snapshot()
    # In commit order (the metadata's), not by time: a writer whose clock is behind another's stamps a later
    # snapshot with an earlier time (Iceberg's Java writers allow a minute), which sorting by time would list
    # before older ones, and could leave out of the last `max_snapshots`, the current one included.
    snapshots = metadata.snapshots[-max_snapshots:]
    return {
        "table": table_name(table),
        "feature": spec.as_dict() if spec else None,
        "schema": [
            {"id": f.field_id, "name": f.name, "type": str(f.field_type), "required": f.required}
            for f in table.schema().fields
        ],
        "partition_spec": [
            f"{f.transform}({table.schema().find_column_name(f.source_id)})" for f in table.spec().fields
        ],
        "current_snapshot_id": current.snapshot_id if current else None,
        "rows": int(current.summary.get("total-records") or 0) if current and current.summary else 0,
        "snapshots": [
            {
                "snapshot_id": s.snapshot_id,
                "parent_id": s.parent_snapshot_id,
                "timestamp_ms": s.timestamp_ms,
                "operation": s.summary.operation.value if s.summary else None,
                "summary": {k: v for k, v in (s.summary.additional_properties if s.summary else {}).items()},
            }
            for s in snapshots
        ],
        "location": table.location(),
        "format_version": metadata.format_version,
        "delete_mode": metadata.properties.get(PROP_DELETE_MODE, DELETE_MODES[0]),
        "pins": pins(metadata),
        "last_expiry": maintenance_record(metadata, LAST_EXPIRY_PROPERTY),
        "last_compaction": maintenance_record(metadata, LAST_COMPACTION_PROPERTY),
    }


def maintenance_record(metadata: TableMetadata, key: str) -> dict[str, Any] | None:
    """The record the table's last expiry or compaction (`key`) left in its properties, if it left one that reads
    as such (another tool may have set the property to anything)."""
    raw = metadata.properties.get(key)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
