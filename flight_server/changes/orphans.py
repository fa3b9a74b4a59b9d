"""Orphan files: files under a table's folders that no metadata references, such as those a put was writing
when its server died (the put committed nothing, so nothing points at them and nothing else deletes them).

`remove_orphan_files` lists the table's `data/` and `metadata/` folders, takes away every file the table's
metadata references (the current metadata file and those of its metadata log, statistics files, and every
snapshot's manifest list, manifests, data and delete files), and deletes what is left if it is older than a
margin: 3 days by default, as Iceberg's Spark procedure, because a put, delete or compaction still running on
any server or engine has written files that no metadata references until it commits.

Another table's files are never candidates: the folders of every other table of the catalog whose location is this
table's or inside it are left out, and a location that another table shares is refused (its files are that table's
too, and its metadata is not read here). The server creates tables at locations of their own (`changes/writes.py`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
from pyarrow.fs import FileSelector, FileSystem, FileType
from pyiceberg.io import FileIO
from pyiceberg.io.pyarrow import PyArrowFileIO
from pyiceberg.table.metadata import TableMetadata

from flight_server.changes.reachable import snapshot_files
from flight_server.iceberg.catalog import FeatureCatalog, table_name
from flight_server.wire.actions import OrphanFilesRequest, OrphanFilesResult
from flight_server.wire.codec import format_timestamp, parse_timestamp
from flight_server.wire.errors import NotFoundError, RequestError, StorageError

log = logging.getLogger(__name__)

DEFAULT_MARGIN = dt.timedelta(days=3)

SHORT_MARGIN = dt.timedelta(days=1)  # below this, a change still running may lose its files: say so in the log

FOLDERS = ("data", "metadata")

MAX_LISTED = 1000  # file names in a reply; the counts cover every file

DELETE_THREADS = 8  # object stores delete one file per request


@dataclass(frozen=True)
class StoredFile:
    """A file found under the table's folders: its location as the table's metadata would write it."""

    location: str
    size: int
    modified: dt.datetime | None


def referenced_files(io: FileIO, metadata: TableMetadata, metadata_location: str) -> set[str]:
    """Every file the table's metadata references, as the locations it writes them."""
    paths = {metadata_location, *(entry.metadata_file for entry in metadata.metadata_log)}
    paths.add(f"{metadata.location.rstrip('/')}/metadata/version-hint.text")  # Hadoop tables' pointer: Spark keeps it
    paths |= {stats.statistics_path for stats in (*metadata.statistics, *metadata.partition_statistics)}
    for snapshot in metadata.snapshots:
        paths |= snapshot_files(io, snapshot)
    return paths


def stored_files(io: PyArrowFileIO, folder: str) -> list[StoredFile]:
    """The files under `folder` (a location), recursively; none when it does not exist."""
    scheme, netloc, path = io.parse_location(folder, io.properties)
    fs: FileSystem = io.fs_by_scheme(scheme, netloc)
    found = fs.get_file_info(FileSelector(path, recursive=True, allow_not_found=True))
    return [
        StoredFile(folder + info.path[len(path) :], info.size, info.mtime)
        for info in found
        if info.type == FileType.File and info.path.startswith(path + "/")
    ]


def holds_files(io: FileIO, location: str, table: str) -> bool:
    """Whether any file lies under the folder `location` (for the table `table`), listed one folder at a time up to
    the first file, so a table's whole listing is not read. pyarrow lists the folder's children (on S3 the prefix
    `.../t/`, not `.../t`, which `.../t2` also starts with). A listing that fails (a folder the server may not read,
    a file where a folder should be, an object store's error) is a `StorageError` naming the table."""
    arrow = pyarrow_io(io)
    try:
        scheme, netloc, path = arrow.parse_location(location.rstrip("/"), arrow.properties)
        fs: FileSystem = arrow.fs_by_scheme(scheme, netloc)
        pending = [path]
        while pending:
            folder = pending.pop()
            try:
                listed = fs.get_file_info(FileSelector(folder, recursive=False, allow_not_found=True))
            except FileNotFoundError:  # removed since its parent was listed: a racing replica's files cleaned up
                continue
            for info in listed:
                if info.type == FileType.File:
                    return True
                if info.type == FileType.Directory:
                    pending.append(info.path)
    except (OSError, pa.ArrowException) as exc:
        reason = f": {os.strerror(exc.errno)}" if isinstance(exc, OSError) and exc.errno else ""
        raise StorageError(
            f"could not list the files at the location of table {table!r} ({type(exc).__name__}{reason}); "
            "the server's log has the details"
        ) from exc
    return False


def pyarrow_io(io: FileIO) -> PyArrowFileIO:
    """The FileIO as pyarrow's, whose file systems list folders (fsspec's FileIO has no listing of its own here)."""
    return io if isinstance(io, PyArrowFileIO) else PyArrowFileIO(io.properties)


def remove_orphan_files(
    catalog: FeatureCatalog, request: OrphanFilesRequest, locations: dict[str, str] | None = None
) -> OrphanFilesResult:
    """Delete (or with `dry_run` only list) the table's orphan files older than the request's margin. `locations`
    (table name -> location, filled as they are read) shares the other tables' locations between the tables of one
    round of maintenance: each table's removal needs every other table's, and reading them afresh for each would
    cost tables x tables metadata reads a round (those written since the last round parsed again)."""
    now = dt.datetime.now(dt.timezone.utc)
    if request.older_than is not None:
        older_than = parse_timestamp(request.older_than, "older_than")
    else:
        older_than = now - DEFAULT_MARGIN
    table = catalog.load(request.table)
    io = pyarrow_io(table.io)
    location = table.metadata.location.rstrip("/")
    name = table_name(table)
    others = _other_tables_folders(catalog, name, io, location, {} if locations is None else locations)
    stored = [
        file
        for folder in FOLDERS
        for file in stored_files(io, f"{location}/{folder}")
        if not any(_key(io, file.location).startswith(other) for other in others)
    ]
    # Listed first, referenced second: a change committed in between has its files referenced.
    table.refresh()
    referenced = {_key(io, path) for path in referenced_files(io, table.metadata, table.metadata_location)}
    unreferenced = [file for file in stored if _key(io, file.location) not in referenced]
    orphans = sorted(
        (file for file in unreferenced if file.modified is not None and file.modified < older_than),
        key=lambda file: file.location,
    )
    if not request.dry_run and older_than > now - SHORT_MARGIN:
        log.warning(
            "removing orphan files of %s older than %s: a put, delete or compaction running longer than that on "
            "any server loses its uncommitted files, and its commit then references missing files",
            name,
            format_timestamp(older_than),
        )
    deleted = [] if request.dry_run else _delete(io, orphans)
    log.info(
        "orphan files of %s older than %s: %d (%d bytes), %s %d; %d newer kept",
        name,
        format_timestamp(older_than),
        len(orphans),
        sum(file.size for file in orphans),
        "dry run, deleted" if request.dry_run else "deleted",
        len(deleted),
        len(unreferenced) - len(orphans),
    )
    return OrphanFilesResult(
        table=name,
        older_than=format_timestamp(older_than),
        dry_run=request.dry_run,
        orphan_files=len(orphans),
        orphan_bytes=sum(file.size for file in orphans),
        files_deleted=len(deleted),
        bytes_deleted=sum(file.size for file in deleted),
        files=[file.location for file in orphans[:MAX_LISTED]],
        recent_files=len(unreferenced) - len(orphans),
    )


def _other_tables_folders(
    catalog: FeatureCatalog, name: str, io: PyArrowFileIO, location: str, locations: dict[str, str]
) -> list[str]:
    """The data and metadata folders (as file system paths ending in `/`) of the catalog's other tables located
    inside this table's location, whose files the listing finds but this table's metadata does not reference; a
    `RequestError` when another table has the same location, or one cannot be read (it might). The catalog's tables
    are listed afresh; their locations are taken from `locations` where given, else read (and added there)."""
    own = _key(io, location)
    folders: list[str] = []
    for other in catalog.table_names():
        if other == name:
            continue
        try:
            if other not in locations:
                locations[other] = catalog.location(other)
            where = _key(io, locations[other].rstrip("/"))
        except NotFoundError:  # dropped since it was listed
            continue
        except Exception as exc:  # unreadable metadata (missing, corrupt, unreachable): it might share the folders
            log.warning("orphan removal of %s refused: table %s cannot be read", name, other, exc_info=True)
            raise RequestError(
                f"orphan removal of {name!r} refused: table {other!r} cannot be read ({type(exc).__name__}), "
                "so whether it keeps files under this table's location is unknown; nothing was deleted"
            ) from None
        if where == own:
            log.warning("orphan removal of %s refused: table %s has the same location %s", name, other, location)
            raise RequestError(
                f"orphan removal of {name!r} refused: table {other!r} has the same location, so files this table "
                "does not reference may be that table's; nothing was deleted"
            )
        if where.startswith(own + "/"):
            folders.extend(f"{where}/{folder}/" for folder in FOLDERS)
    return folders


def _key(io: PyArrowFileIO, location: str) -> str:
    """A location as its file system's path, so that `file:/x`, `file:///x` and `/x` are one file."""
    return io.parse_location(location, io.properties)[2]


def _delete(io: FileIO, files: list[StoredFile]) -> list[StoredFile]:
    """Delete the files, several at a time; those that could not be deleted are logged and left out."""

    def delete(file: StoredFile) -> bool:
        try:
            io.delete(file.location)
        except FileNotFoundError:  # someone else removed it: it is gone all the same
            return True
        except OSError:
            log.warning("could not delete orphan file %s", file.location, exc_info=True)
            return False
        return True

    with ThreadPoolExecutor(DELETE_THREADS, thread_name_prefix="orphan-delete") as pool:
        done = list(pool.map(delete, files))
    return [file for file, ok in zip(files, done, strict=True) if ok]
