"""The DuckDB engine that executes reads: one database, one cursor per request.

Extensions come from their PyPI wheels (`duckdb-extension-*`), never from `INSTALL`, which
needs the internet. Object-storage credentials are taken from the catalog's (or the table's)
FileIO properties, so DuckDB reads exactly what pyiceberg would. A query run for a call whose
client has cancelled or gone is interrupted (`Engine.interruptible`), so it stops costing CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import duckdb
import pyarrow.flight as flight
from pyiceberg.table.metadata import TableMetadata

from flight_server.base.metrics import DUCKDB_REOPENED
from flight_server.base.spill import own_spill_folder
from flight_server.iceberg.catalog import avro_name
from flight_server.wire.errors import RequestError

log = logging.getLogger(__name__)

# DuckDB scans registered Arrow data through Acero, which warns about (and would otherwise pass on)
# the unaligned buffers Flight hands over; copying just those buffers is what it should do.
os.environ.setdefault("ACERO_ALIGNMENT_HANDLING", "reallocate")

EXTENSIONS = ("avro", "httpfs", "iceberg")


def extension_path(name: str) -> Path:
    """The `.duckdb_extension` file shipped in the `duckdb-extension-<name>` wheel."""
    module = importlib.import_module(f"duckdb_extension_{name}")
    assert module.__file__ is not None, f"duckdb_extension_{name} is a regular package"
    path = Path(module.__file__).parent / "extensions" / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
    if not path.exists():
        raise RuntimeError(
            f"{path} is missing: install duckdb-extension-{name}=={duckdb.__version__} (matching duckdb)"
        )
    return path


def local_path(location: str) -> str:
    """A location DuckDB can open: `file://` URIs become paths, `s3a://` becomes `s3://`."""
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return parsed.path
    if parsed.scheme in ("s3a", "s3n"):
        return "s3://" + location.split("://", 1)[1]
    return location


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


CANCEL_POLL_SECONDS = 0.05


class CancelWatch:
    """One thread that interrupts the cursors of watched calls once their client has cancelled or gone.

    Polling is the only way to learn of it (Flight signals nothing), and one thread for every call keeps
    the common path to two dict operations; it sleeps while no query is watched. `is_cancelled` is
    never called after its watch ends, when the call (and its context) may be gone.
    """

    def __init__(self) -> None:
        self._calls: dict[int, tuple[duckdb.DuckDBPyConnection, Callable[[], bool]]] = {}
        self._keys = itertools.count()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextlib.contextmanager
    def watch(self, cursor: duckdb.DuckDBPyConnection, is_cancelled: Callable[[], bool]) -> Iterator[None]:
        """Interrupt `cursor`'s queries while the block runs, once `is_cancelled()`; the interrupted query
        raises `FlightCancelledError` out of the block."""
        key = next(self._keys)
        with self._changed:
            self._calls[key] = (cursor, is_cancelled)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="duckdb-cancel-watch", daemon=True)
                self._thread.start()
            self._changed.notify()
        try:
            yield
        except duckdb.InterruptException:
            raise flight.FlightCancelledError("the client cancelled the call: its query was interrupted") from None
        finally:
            with self._changed:
                del self._calls[key]

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()

    def _run(self) -> None:
        with self._changed:
            while not self._closed:
                for cursor, is_cancelled in self._calls.values():
                    if is_cancelled():  # interrupted again each poll: a later query on the cursor stops too
                        cursor.interrupt()
                self._changed.wait(CANCEL_POLL_SECONDS if self._calls else None)


def object_storage(properties: Mapping[str, str]) -> bool:
    """Whether a catalog's tables may be on object storage: all but those of a catalog whose warehouse is a local
    folder and that configures no FileIO of S3, GCS or Azure (a REST or Glue catalog may name no warehouse, or one
    that is no URL: an ARN, a name)."""
    local = properties.get("warehouse", "").startswith(("file:", "/"))
    return not local or any(key.startswith(("s3.", "gcs.", "adls.")) for key in properties)


# DuckDB's file cache forgets no file it read: content it evicts (past `memory_limit`) leaves its entry, ~1 KB a
# cached range, and a table whose versions keep changing brings new files (metadata, manifest lists, manifests, data)
# with each. Past this many evicted ranges the engine reads through a new database, the old one freed once its last
# query ends: a bound on that bookkeeping (~100 MB). Ranges still in memory are not counted: `memory_limit` bounds
# them, and a working set that fits is never dropped.
FILE_CACHE_MAX_EVICTED = 100_000
FILE_CACHE_CHECK_SECONDS = 60.0  # how often `Engine.cursor` counts them

METADATA_NAMES_KEPT = 1000  # metadata file names `Engine.metadata_file` keeps of one table folder


@dataclass
class _MetadataFolder:
    """The metadata files of one table folder an engine had DuckDB read: the table's uuid, the names it read for
    it (None: more than `METADATA_NAMES_KEPT`), and those read for earlier tables there (None: perhaps any)."""

    table_uuid: str
    names: set[str] | None = field(default_factory=set)
    earlier: set[str] | None = field(default_factory=set)


class Engine:
    """A DuckDB database configured for this server; hand out cursors with `cursor()`.

    `file_cache=False` turns off DuckDB's external file cache, which keeps what it read of every file (at least
    ~20 KB each), deleted files too, until queries need the memory, i.e. up to `memory_limit`: it saves fetching an
    object store's files again (`object_storage`), but for an engine that reads each file once (the write
    process's refresh plans, compactions and deletes, whose files are then deleted) or reads local files, which
    the operating system's page cache holds already, it only grows. With it on, the engine moves to a new database
    once the cache keeps `FILE_CACHE_MAX_EVICTED` evicted ranges (`renew_file_cache`). `unique_metadata_names`: the
    catalog names each metadata file with a uuid (`FeatureCatalog.names_metadata_files`), so that `metadata_file`
    need not watch for a path that comes back with other content."""

    def __init__(
        self,
        memory_limit: str = "4GB",
        threads: int | None = None,
        temp_dir: str | None = None,
        file_cache: bool = True,
        unique_metadata_names: bool = False,
    ):
        config: dict[str, str | bool | int | float | list[str]] = {
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "memory_limit": memory_limit,
            "enable_external_file_cache": file_cache,
        }
        if threads:
            config["threads"] = threads
        self._config, self._temp_dir = config, temp_dir or ".tmp"  # DuckDB's own default is .tmp, shared
        self._secrets: dict[str, str] = {}  # by fingerprint: the statement that made each (`use_storage`)
        self._con, spill = self._connect()
        self._lock = threading.Lock()
        self._file_cache = file_cache
        self._next_count = time.monotonic() + FILE_CACHE_CHECK_SECONDS
        self._cancel_watch = CancelWatch()
        self._watch_metadata = file_cache and not unique_metadata_names
        self._metadata_read: dict[str, _MetadataFolder] = {}  # by table folder (`metadata_file`)
        self._copies = os.path.join(os.path.dirname(spill), f"metadata-{os.path.basename(spill)}")

    def _connect(self) -> tuple[duckdb.DuckDBPyConnection, str]:
        """A new database, with the extensions and S3 credentials, and the folder of its own it spills into."""
        spill = own_spill_folder(self._temp_dir)
        con = duckdb.connect(config={**self._config, "temp_directory": spill})
        for name in EXTENSIONS:
            con.execute(f"LOAD {_literal(str(extension_path(name)))}")
        for statement in self._secrets.values():
            con.execute(statement)
        return con, spill

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor for one request (a DuckDB connection is not safe to share between threads). A database that a
        fatal error invalidated (DuckDB then refuses every query until a restart: an assertion of its iceberg
        extension on one table's files would fail every read of every table) is replaced by a new one first, and so
        is one whose file cache keeps more than `FILE_CACHE_MAX_EVICTED` evicted ranges (`renew_file_cache`)."""
        if self._file_cache and time.monotonic() >= self._next_count:
            self.renew_file_cache()
        con = self._con
        try:
            cursor = con.cursor()
            cursor.execute("SET TimeZone = 'UTC'")
        except duckdb.FatalException:
            with self._lock:
                if self._con is con:  # not replaced by another thread meanwhile
                    log.error("DuckDB's database was invalidated by a fatal error (logged with its call): opening anew")
                    self._con, _ = self._connect()  # the old one is left to its cursors: closing it would abort
                    DUCKDB_REOPENED.inc()
            cursor = self._con.cursor()
            cursor.execute("SET TimeZone = 'UTC'")
        return cursor

    def renew_file_cache(self) -> bool:
        """Read through a new database (an empty file cache) when the current one's file cache keeps more than
        `FILE_CACHE_MAX_EVICTED` ranges whose content it evicted; whether it did. The old database stays with the
        cursors and readers that use it, and goes with the last of them (closing it would abort their queries)."""
        with self._lock:
            if time.monotonic() < self._next_count:  # another thread just counted
                return False
            self._next_count = time.monotonic() + FILE_CACHE_CHECK_SECONDS
            try:
                with self._con.cursor() as counter:
                    found = counter.execute("SELECT count(*) FILTER (NOT loaded) FROM duckdb_external_file_cache()")
                    (evicted,) = found.fetchone() or (0,)
            except duckdb.Error:  # an invalidated database: `cursor` replaces it
                return False
            if evicted <= FILE_CACHE_MAX_EVICTED:
                return False
            self._con, _ = self._connect()
        log.info("DuckDB's file cache kept %d ranges of files it evicted: reading through a new database", evicted)
        return True

    def metadata_file(self, location: str, metadata: TableMetadata) -> str:
        """Where `iceberg_scan` reads a table's metadata file (at `location`, loaded as `metadata`) from.

        DuckDB's file cache takes a path's content never to change, and checks it by ETag: a REST server names the
        metadata files itself, SeaweedFS's `v<N>.metadata.json` again for a table dropped and created again, and
        SeaweedFS answers `ETag: ""` for each, so the cache kept answering the dropped table's file. A path this
        engine read for another table (another uuid) in the same folder is therefore replaced by a local copy of
        `metadata` named by its content; every other path, and all data and manifest files (named with uuids, with
        real ETags), are read and cached as they are."""
        unreadable = sorted(
            {f.name for spec in metadata.partition_specs for f in spec.fields if avro_name(f.name) != f.name}
        )
        if unreadable:  # DuckDB's Avro reader would abort the process
            raise RequestError(
                f"this read goes through DuckDB, which cannot read the table's manifests: its partition fields "
                f"{unreadable} are not Avro names (letters, digits and _); reads that need no filter still work"
            )
        path = local_path(location)
        if not self._watch_metadata:
            return path
        folder, _, name = path.rpartition("/")
        table_uuid = str(metadata.table_uuid)
        with self._lock:
            read = self._metadata_read.get(folder)
            if read is None:
                read = self._metadata_read[folder] = _MetadataFolder(table_uuid)
            elif read.table_uuid != table_uuid:  # another table at this location now
                earlier = None if read.names is None or read.earlier is None else read.earlier | read.names
                read = self._metadata_read[folder] = _MetadataFolder(table_uuid, earlier=earlier)
            stale = read.earlier is None or name in read.earlier
            if not stale and read.names is not None:
                read.names.add(name)
                if len(read.names) > METADATA_NAMES_KEPT:
                    read.names = None  # too many to keep: should another table come here, copy all its files
        return self._copy(metadata) if stale else path

    def _copy(self, metadata: TableMetadata) -> str:
        """A local file of `metadata`, named by its content (so that no cache can hold other content for its
        path), serialized as pyiceberg writes metadata files; in this process's spill folder, removed with it."""
        text = metadata.model_dump_json(exclude_none=True).encode()
        path = os.path.join(self._copies, f"{hashlib.sha256(text).hexdigest()}.metadata.json")
        if not os.path.exists(path):
            os.makedirs(self._copies, exist_ok=True)
            part = f"{path}.{threading.get_ident()}.part"
            with open(part, "wb") as file:
                file.write(text)
            os.replace(part, path)
        return path

    def interruptible(
        self, cursor: duckdb.DuckDBPyConnection, is_cancelled: Callable[[], bool] | None
    ) -> contextlib.AbstractContextManager[None]:
        """A block whose queries on `cursor` are interrupted once the call's client has cancelled or gone
        (`is_cancelled`, e.g. Flight's `context.is_cancelled`; None: no call to watch). The call must outlive
        the block: results streamed after it are not watched."""
        return self._cancel_watch.watch(cursor, is_cancelled) if is_cancelled else contextlib.nullcontext()

    def close(self) -> None:
        """Stop the cancel watch. The database itself is left to the process's exit: DuckDB aborts the process
        when a database closes under cursors that other threads still hold."""
        self._cancel_watch.close()

    def use_storage(self, properties: Mapping[str, str]) -> None:
        """Make the S3 credentials in pyiceberg FileIO `properties` available to DuckDB (idempotent)."""
        key_id = properties.get("s3.access-key-id")
        endpoint = properties.get("s3.endpoint")
        if not key_id and not endpoint:
            return
        fingerprint = hashlib.sha256(repr(sorted(properties.items())).encode()).hexdigest()[:16]
        with self._lock:
            if fingerprint in self._secrets:
                return
            options = ["TYPE s3", f"REGION {_literal(properties.get('s3.region', 'us-east-1'))}"]
            if key_id:
                options.append(f"KEY_ID {_literal(key_id)}")
                options.append(f"SECRET {_literal(properties.get('s3.secret-access-key', ''))}")
            if token := properties.get("s3.session-token"):
                options.append(f"SESSION_TOKEN {_literal(token)}")
            if endpoint:
                url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
                options.append(f"ENDPOINT {_literal(url.netloc)}")
                options.append(f"USE_SSL {'true' if url.scheme == 'https' else 'false'}")
                style = "vhost" if properties.get("s3.force-virtual-addressing") == "true" else "path"
                options.append(f"URL_STYLE {_literal(style)}")
            statement = f"CREATE OR REPLACE SECRET s3_{fingerprint} ({', '.join(options)})"
            self._con.execute(statement)
            self._secrets[fingerprint] = statement
            log.info("DuckDB: S3 credentials registered for endpoint %s", endpoint or "AWS default")
