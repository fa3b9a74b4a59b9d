"""pyiceberg's private API stays in flight_server/iceberg/internals.py, and still is what that module relies on.

Private names change without notice between pyiceberg releases; keeping them in one module, listed in its
`PRIVATE_API`, makes an upgrade one file to re-check. These tests fail on any other pyiceberg version than
the one checked, when a private name or the signature used is gone, and when another module reaches in.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import itertools
import pathlib
import threading
import uuid
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyiceberg
import pytest
import requests
from pydantic_core import from_json
from pyiceberg.catalog import load_catalog
from pyiceberg.catalog.rest import RestCatalog
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import CommitFailedException, NoSuchTableError, TableAlreadyExistsError
from pyiceberg.io import FileIO
from pyiceberg.io.fileformat import FileFormatFactory
from pyiceberg.io.pyarrow import pyarrow_to_schema
from pyiceberg.manifest import FileFormat, ManifestWriter
from pyiceberg.partitioning import PartitionKey
from pyiceberg.schema import Schema, assign_fresh_schema_ids
from pyiceberg.table import Table, Transaction
from pyiceberg.table.metadata import TableMetadata, TableMetadataUtil
from pyiceberg.table.update import update_table_metadata
from pyiceberg.table.update.snapshot import CommitWindow
from pyiceberg.types import DoubleType

from flight_server.changes.files import write_data_files
from flight_server.changes.orphans import referenced_files
from flight_server.iceberg import internals
from flight_server.iceberg.catalog import partition_spec
from tests.conftest import sqlite_catalog

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "flight_server"
INTERNALS = PACKAGE / "iceberg" / "internals.py"

# Private attributes that modules other than internals.py may read, as (path under flight_server, attribute):
# add one only for an object whose private API is known to be stable (none so far).
# The memory budget and its accounts are one unit (base/memory.py): they share each other's private parts.
ALLOWED_PRIVATE: frozenset[tuple[str, str]] = frozenset(
    {
        *(
            ("base/memory.py", name)
            for name in ("_evict_oldest", "_oldest_stamp", "_make_room", "_entries", "_stamp", "_fixed")
        ),
        ("transport/offload.py", "_exit"),  # os._exit: the write process never outlives its server
        ("cli.py", "_exit"),  # os._exit: a stopped server ends before native libraries' destructors can abort it
    }
)

# Private names that are instance attributes: checked on a real object (`test_a_real_transaction_and_producer`).
INSTANCE_ATTRIBUTES = {
    "pyiceberg.table.Transaction._table",
    "pyiceberg.table.Transaction._updates",
    "pyiceberg.table.Transaction._requirements",
    "pyiceberg.table.Transaction._snapshot_producers",
    "pyiceberg.catalog.rest.RestCatalog._session",  # `test_the_rest_wrappers_on_a_real_rest_catalog`
}

# The parameters internals.py passes, in order (by position or keyword), of each private callable.
PARAMETERS = {
    "pyiceberg.table.update.snapshot._SnapshotProducer": ("operation", "transaction", "io", "snapshot_properties"),
    "pyiceberg.io.pyarrow._determine_partitions": ("spec", "schema", "arrow_table"),
    "pyiceberg.io.pyarrow._to_requested_schema": (
        "requested_schema",
        "file_schema",
        "batch",
        "include_field_ids",
        "format_model",
    ),
    "pyiceberg.io.pyarrow._pyarrow_to_schema_without_ids": ("schema",),
    "pyiceberg.catalog.sql.SqlCatalog._iceberg_type_filter": ("self",),
    "pyiceberg.catalog.Catalog._load_file_io": ("self", "properties", "location"),
    "pyiceberg.table.Transaction._apply": ("self", "updates", "requirements"),
    "pyiceberg.catalog.MetastoreCatalog._parse_metadata_version": ("metadata_location",),
    "pyiceberg.table.update._apply_table_update": ("update", "base_metadata", "context"),
    "pyiceberg.table.update._update_table_metadata_log": ("base_metadata", "metadata_location", "last_updated_ms"),
    "pyiceberg.catalog.Catalog._delete_old_metadata": ("io", "base", "metadata"),
    "pyiceberg.catalog.MetastoreCatalog._write_metadata": ("metadata", "io", "metadata_path"),
    "pyiceberg.table.update.snapshot._FastAppendFiles": ("operation", "transaction", "io", "snapshot_properties"),
    "pyiceberg.table.update.snapshot._MergeAppendFiles": ("operation", "transaction", "io", "snapshot_properties"),
    "pyiceberg.table.update.snapshot._OverwriteFiles": ("operation", "transaction", "io", "snapshot_properties"),
    "pyiceberg.manifest._inherit_from_manifest": ("entry", "manifest"),
    "pyiceberg.avro.file.AvroFile._read_header": ("self",),
    "pyiceberg.catalog.rest.RestCatalog._check_endpoint": ("self", "endpoint"),
    "pyiceberg.catalog.rest.RestCatalog._split_identifier_for_path": ("self", "identifier"),
    "pyiceberg.catalog.rest.RestCatalog._response_to_table": ("self", "identifier_tuple", "table_response"),
    "pyiceberg.catalog.rest.response._handle_non_200_response": ("exc", "error_handler"),
}

# What the snapshot producers override, call or read on `_SnapshotProducer` (see its entry in PRIVATE_API).
PRODUCER_METHODS = (
    "_commit",
    "_clean_all_uncommitted",
    "_manifests",
    "_existing_manifests",
    "_deleted_entries",
    "_summary",
    "_validate_concurrency",
    "new_manifest_output",
    "new_manifest_writer",
    "spec",
    "schema",
)
PRODUCER_ATTRIBUTES = (
    "_transaction",
    "_snapshot_id",
    "_parent_snapshot_id",
    "_io",
    "_compression",
    "_added_data_files",
    "_deleted_data_files",
    "_commit_window",
    "_written_manifests",
)


def resolve(dotted: str) -> object:
    """What a dotted name names: its longest importable module, then attributes."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            found = inspect.getattr_static(found, attribute)
        return found
    raise ImportError(dotted)


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def owned(node: ast.expr) -> bool:
    """Whether an attribute is read off the object's own class: `self`, `cls` or `super()`."""
    if isinstance(node, ast.Name):
        return node.id in ("self", "cls")
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def private_uses(source: str) -> list[tuple[int, str, str]]:
    """Private pyiceberg names imported, and private attributes read off anything but self, cls or super(),
    as (line, code, the private name)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pyiceberg":
            module = node.module or ""
            private = [part for part in module.split(".") if is_private(part)]
            private += [alias.name for alias in node.names if is_private(alias.name)]
            found += [(node.lineno, f"from {module} import ...", name) for name in private]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "pyiceberg":
                    found += [(node.lineno, f"import {alias.name}", part) for part in parts if is_private(part)]
        elif isinstance(node, ast.Attribute) and is_private(node.attr) and not owned(node.value):
            found.append((node.lineno, ast.unparse(node), node.attr))
    return found


def test_pyiceberg_is_the_version_checked() -> None:
    if pyiceberg.__version__ != internals.CHECKED_VERSION:
        names = "\n".join(f"  - {name}: {what}" for name, what in internals.PRIVATE_API.items())
        pytest.fail(
            f"pyiceberg is {pyiceberg.__version__}; flight_server/iceberg/internals.py was checked against "
            f"{internals.CHECKED_VERSION}. It uses pyiceberg's private API, which may change in any release: "
            f"re-check each name below in the new release's source (still there, same parameters, same meaning, "
            f"still called where the producers expect), run tests/test_deletes.py (it compares the snapshots "
            f"and manifests the producers commit), then set CHECKED_VERSION.\n{names}"
        )


@pytest.mark.parametrize("name", sorted(set(internals.PRIVATE_API) - INSTANCE_ATTRIBUTES))
def test_private_name_exists(name: str) -> None:
    try:
        resolve(name)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"pyiceberg no longer has {name} ({exc}); internals.py relies on it: {internals.PRIVATE_API[name]}")


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_private_signature(name: str) -> None:
    target = resolve(name)
    function = target.__init__ if inspect.isclass(target) else target
    assert callable(function), f"{name} is no longer callable"
    parameters = list(inspect.signature(function).parameters)
    wanted = [p for p in PARAMETERS[name] if p in parameters]
    positions = [parameters.index(p) for p in wanted]
    assert wanted == list(PARAMETERS[name]) and positions == sorted(positions), (
        f"{name}{inspect.signature(function)} no longer takes {PARAMETERS[name]} in that order; "
        f"internals.py relies on: {internals.PRIVATE_API[name]}"
    )


def test_snapshot_producer_hooks() -> None:
    producer = resolve("pyiceberg.table.update.snapshot._SnapshotProducer")
    missing = [m for m in PRODUCER_METHODS if not callable(getattr(producer, m, None))]
    assert not missing, f"_SnapshotProducer has no {missing}; RewriteFiles and DropRemovedEntries override or call them"
    assert isinstance(inspect.getattr_static(ManifestWriter, "_meta"), property)
    assert {"base", "head"} <= {f.name for f in dataclasses.fields(CommitWindow)} and callable(CommitWindow.is_empty)


def test_every_private_import_is_listed() -> None:
    """internals.py's `PRIVATE_API` names each private pyiceberg name it imports (what these tests check)."""
    imported = set()
    for node in ast.walk(ast.parse(INTERNALS.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pyiceberg"):
            imported |= {f"{node.module}.{alias.name}" for alias in node.names if is_private(alias.name)}
    assert imported - set(internals.PRIVATE_API) == set()


def test_a_real_transaction_and_producer(tmp_path: pathlib.Path) -> None:
    """Each wrapper, and the attributes the producers read, on a real table of an SQL catalog."""
    catalog = SqlCatalog("internals", **sqlite_catalog(tmp_path))
    catalog.create_namespace("ns")
    arrow = pa.schema([pa.field("id", pa.int64(), nullable=False), pa.field("city", pa.string())])
    schema = assign_fresh_schema_ids(internals.schema_without_ids(arrow))
    assert isinstance(schema, Schema) and schema.column_names == ["id", "city"]
    table = catalog.create_table(("ns", "t"), schema=schema, partition_spec=partition_spec(["bucket(2, id)"], schema))
    with catalog.engine.connect() as connection:
        bound = {"catalog": catalog.name, "namespace": "ns", "table": "t"}
        located = connection.execute(internals.metadata_location_query(catalog), bound).scalar()
    assert located == table.metadata_location
    io = internals.table_io(catalog, table.metadata.properties, table.metadata_location)
    assert type(io) is type(table.io) and io.properties == table.io.properties

    transaction = table.transaction()
    assert isinstance(internals.transaction_io(transaction), FileIO)
    producer = internals.DropRemovedEntries(transaction, {})
    missing = [a for a in PRODUCER_ATTRIBUTES if a not in vars(producer)]
    assert not missing, f"_SnapshotProducer no longer sets {missing}; RewriteFiles and DropRemovedEntries read them"
    producer.commit()  # registered (discard_written deletes what it wrote), though the transaction is not committed
    assert transaction._snapshot_producers == [producer]
    internals.discard_written(transaction)
    assert not producer._written_manifest_lists

    rows = pa.table({"id": [1, 2, 3, 4], "city": ["a", "b", "c", "d"]}, schema=arrow)
    parts = internals.partitions(table.spec(), table.schema(), rows)
    assert all(isinstance(key, PartitionKey) for key, _ in parts) and sum(p.num_rows for _, p in parts) == 4
    batch_schema = pyarrow_to_schema(rows.schema, name_mapping=table.schema().name_mapping)
    batch = internals.to_file_schema(
        table.schema(), batch_schema, rows.to_batches()[0], FileFormatFactory.get(FileFormat.PARQUET)
    )
    assert batch.schema.field("id").metadata == {b"PARQUET:field_id": b"1"}


def test_commit_on_base_is_not_rebuilt_on_a_newer_snapshot(tmp_path: pathlib.Path) -> None:
    """A snapshot committed through `commit_on_base` fails when another commit won, where pyiceberg's own retry
    would rebuild it on the winner; a retry-free commit deletes its manifests, and commits on a fresh base."""
    catalog = SqlCatalog("internals", **sqlite_catalog(tmp_path))
    catalog.create_namespace("ns")
    rows = pa.table({"id": pa.array([1, 2], pa.int64())})
    table = catalog.create_table(("ns", "t"), schema=rows.schema)

    def appending(table: Table) -> tuple[Transaction, Any]:
        transaction = table.transaction()
        append = internals.append_producer(transaction, {}, merge=False)
        for data_file in write_data_files(table.metadata, rows, table.io, None, uuid.uuid4(), itertools.count()):
            append.append_data_file(data_file)
        return transaction, append

    transaction, loser = appending(table)
    winner = catalog.load_table(("ns", "t"))
    winner.append(rows)
    with pytest.raises(CommitFailedException):
        internals.commit_on_base(transaction, loser)
    assert [s.snapshot_id for s in catalog.load_table(("ns", "t")).snapshots()] == [winner.snapshots()[0].snapshot_id]
    manifests = {p.name for p in tmp_path.rglob("*.avro")}
    assert not any(str(loser.commit_uuid) in name for name in manifests)
    assert len(list(tmp_path.rglob("*.metadata.json"))) == 2  # the loser's metadata file was deleted

    transaction, fresh = appending(catalog.load_table(("ns", "t")))
    committed = internals.commit_on_base(transaction, fresh)
    assert len(committed.snapshots()) == 2 and committed.current_snapshot().snapshot_id == fresh.snapshot_id


def unreferenced(table: Table) -> list[str]:
    """The files under the table's location that its metadata does not reference (what orphan removal lists)."""
    root = pathlib.Path(urlparse(table.location()).path)
    stored = {f.as_uri() for f in root.rglob("*") if f.is_file()}
    return sorted(stored - referenced_files(table.io, table.metadata, table.metadata_location))


def test_a_retried_commit_leaves_no_file_of_the_attempt_that_lost_the_swap(tmp_path: pathlib.Path) -> None:
    """pyiceberg's commit (deletes and compactions commit through it, rebuilt on a lost race) on a SQL catalog: when
    another commit lands between the catalog's read of the table and its compare-and-swap, the lost attempt's
    metadata file, manifest list and manifest are deleted, and the retry commits."""
    catalog = SqlCatalog("internals", **sqlite_catalog(tmp_path))
    catalog.create_namespace("ns")
    rows = pa.table({"id": pa.array([1, 2], pa.int64())})
    table = catalog.create_table(("ns", "t"), schema=rows.schema)
    load = catalog.load_table
    raced: list[str] = []

    def raced_after_loading(identifier: Any) -> Table:
        loaded = load(identifier)
        if not raced:  # the first load is the commit's own: another writer commits right after it
            raced.append(loaded.metadata_location)
            load(identifier).append(rows)
        return loaded

    transaction = internals.MemoTransaction(table)
    append = internals.append_producer(transaction, {}, merge=False)
    for data_file in write_data_files(table.metadata, rows, table.io, None, uuid.uuid4(), itertools.count()):
        append.append_data_file(data_file)
    append.commit()  # registered: pyiceberg's commit rebuilds it on a lost race
    catalog.load_table = raced_after_loading  # type: ignore[method-assign]
    committed = internals.commit_transaction(transaction)
    assert raced and len(committed.snapshots()) == 2  # the other writer's append, then this one, rebuilt on it
    reloaded = load(("ns", "t"))
    assert reloaded.metadata_location == committed.metadata_location and len(reloaded.scan().to_arrow()) == 4
    assert unreferenced(committed) == []


def test_a_table_created_meanwhile_leaves_no_metadata_file_of_the_losing_creation(tmp_path: pathlib.Path) -> None:
    """Two creations of one table (replicas' first puts to a new name), the first committed after the second's
    catalog found no table: the catalog refuses the second's row, and its metadata file is deleted."""
    catalog = SqlCatalog("internals", **sqlite_catalog(tmp_path))
    catalog.create_namespace("ns")
    schema = pa.schema([pa.field("id", pa.int64())])
    first, second = (catalog.create_table_transaction(("ns", "t"), schema=schema) for _ in range(2))
    load = catalog.load_table
    looked: list[bool] = []

    def created_after_looking(identifier: Any) -> Table:
        if looked:
            return load(identifier)
        looked.append(True)  # the second's commit looks first; the first's commit then creates the table
        try:
            return load(identifier)
        finally:
            internals.commit_staged(first)

    catalog.load_table = created_after_looking  # type: ignore[method-assign]
    with pytest.raises(TableAlreadyExistsError):
        internals.commit_staged(second)
    assert unreferenced(catalog.load_table(("ns", "t"))) == []


def test_commit_on_base_swaps_the_sql_catalog_pointer_without_loading_the_table(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits to a SQL catalog check the metadata they were opened on, not a fresh load of it: the catalog then
    points at each new metadata file, which holds what pyiceberg's own commit would have written, old files are
    deleted as the table's properties say, and a commit on a state another change replaced (a property, here)
    fails and leaves no file."""
    catalog = SqlCatalog("internals", **sqlite_catalog(tmp_path))
    catalog.create_namespace("ns")
    rows = pa.table({"id": pa.array([1, 2], pa.int64())})
    history = {"write.metadata.delete-after-commit.enabled": "true", "write.metadata.previous-versions-max": "1"}
    table = catalog.create_table(("ns", "t"), schema=rows.schema, properties=history)
    loads = []
    monkeypatch.setattr(catalog, "load_table", lambda identifier: loads.append(identifier))

    def append(table: Table) -> Table:
        transaction = internals.MemoTransaction(table)
        producer = internals.append_producer(transaction, {"k": "v"}, merge=False)
        for data_file in write_data_files(table.metadata, rows, table.io, None, uuid.uuid4(), itertools.count()):
            producer.append_data_file(data_file)
        return internals.commit_on_base(transaction, producer)

    for _ in range(3):
        before = table.metadata_location
        table = append(table)
        assert table.metadata_location != before and table.metadata.metadata_log[-1].metadata_file == before
    assert loads == []
    monkeypatch.undo()
    stored = catalog.load_table(("ns", "t"))
    assert stored.metadata_location == table.metadata_location and stored.metadata == table.metadata
    assert [s.summary["k"] for s in stored.snapshots() if s.summary] == ["v"] * 3
    assert len(stored.scan().to_arrow()) == 6
    assert sorted(tmp_path.rglob("*.metadata.json")) == sorted(
        pathlib.Path(urlparse(m).path)
        for m in [stored.metadata.metadata_log[-1].metadata_file, stored.metadata_location]
    )

    stale = Table(stored.name(), stored.metadata, stored.metadata_location, stored.io, catalog)
    stored.transaction().set_properties({"a": "1"}).commit_transaction()
    files = sorted(tmp_path.rglob("*.metadata.json"))
    with pytest.raises(CommitFailedException):
        append(stale)
    assert sorted(tmp_path.rglob("*.metadata.json")) == files
    assert catalog.load_table(("ns", "t")).metadata_location == stored.metadata_location


def test_updated_metadata_is_pyicebergs_and_shares_only_the_history(tmp_path: pathlib.Path) -> None:
    """`updated_metadata` gives what pyiceberg's `update_table_metadata` gives (a new column, a property, a snapshot,
    the metadata log), in lists and maps of its own that share their entries (frozen models) with the base."""
    catalog = SqlCatalog("internals", **sqlite_catalog(tmp_path))
    catalog.create_namespace("ns")
    rows = pa.table({"id": pa.array([1, 2], pa.int64())})
    table = catalog.create_table(("ns", "t"), schema=rows.schema)
    table.append(rows)
    table.append(rows)
    transaction = Transaction(table)
    with transaction.update_schema() as change:
        change.add_column("x", DoubleType())
    transaction.set_properties({"a": "1"})
    append = transaction.update_snapshot().fast_append()
    for data_file in write_data_files(table.metadata, rows, table.io, None, uuid.uuid4(), itertools.count()):
        append.append_data_file(data_file)
    updates = (*transaction._updates, *append._commit()[0])  # the snapshot's updates, not staged
    base, location = table.metadata, table.metadata_location
    ours = internals.updated_metadata(base, updates, location)
    theirs = update_table_metadata(base, updates, metadata_location=location)
    assert ours == theirs and ours.metadata_log[-1].metadata_file == location and len(ours.snapshots) == 3
    assert all(a is b for a, b in zip(ours.snapshots, base.snapshots, strict=False))
    assert ours.snapshots is not base.snapshots and ours.refs is not base.refs
    assert ours.schemas[0] is base.schemas[0] and ours.partition_specs[0] is base.partition_specs[0]
    assert ours.schemas is not base.schemas and ours.properties is not base.properties
    assert internals.updated_metadata(base, ()) == update_table_metadata(base, ())


class FirstUseDuringCopy:
    """Planted in a schema's `__dict__` (`first_use_during_copy`): a deep copy of the schema, as it reaches this
    entry, has another thread use the schema for the first time (its name mapping, as a read's planning does),
    which pyiceberg caches into that `__dict__`. The moment that failed a put with "dictionary changed size during
    iteration" (INTERNAL), made to happen every time a copy iterates the schema."""

    def __init__(self, schema: Schema):
        self.schema = schema
        self.copies = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> FirstUseDuringCopy:
        self.copies += 1
        other = threading.Thread(target=lambda: self.schema.name_mapping)
        other.start()
        other.join()
        return self


def first_use_during_copy(metadata: TableMetadata) -> FirstUseDuringCopy:
    """Plant `FirstUseDuringCopy` in the current schema of `metadata`, whose name mapping it makes uncached."""
    schema = metadata.schema()
    schema.__dict__.pop("name_mapping", None)
    hook = schema.__dict__["_first_use_during_copy"] = FirstUseDuringCopy(schema)
    return hook


def test_updated_metadata_copies_nothing_another_thread_caches_on(tmp_path: pathlib.Path) -> None:
    """The server shares a table's metadata between threads; pyiceberg caches on a schema at its first use of each
    cache, so a deep copy of it fails if another thread uses it at that moment. The commit's copy is safe then."""
    catalog = SqlCatalog("internals", **sqlite_catalog(tmp_path))
    catalog.create_namespace("ns")
    rows = pa.table({"id": pa.array([1, 2], pa.int64())})
    table = catalog.create_table(("ns", "t"), schema=rows.schema)
    transaction = Transaction(table)
    transaction.set_properties({"a": "1"})
    first_use_during_copy(table.metadata)
    with pytest.raises(RuntimeError, match="changed size during iteration"):  # the hook works: a deep copy fails
        table.metadata.model_copy(deep=True)
    hook = first_use_during_copy(table.metadata)
    updated = internals.updated_metadata(table.metadata, transaction._updates, table.metadata_location)
    assert updated.properties["a"] == "1" and "a" not in table.metadata.properties
    assert internals.sharing_entries(table.metadata) == table.metadata and hook.copies == 0


def test_memo_transaction_follows_staged_updates_and_commits(tmp_path: pathlib.Path) -> None:
    """`MemoTransaction.table_metadata` is computed once per state, and is what pyiceberg's property gives."""
    catalog = SqlCatalog("internals", **sqlite_catalog(tmp_path))
    catalog.create_namespace("ns")
    rows = pa.table({"id": pa.array([1, 2], pa.int64())})
    table = catalog.create_table(("ns", "t"), schema=rows.schema)
    transaction = internals.MemoTransaction(table)
    assert isinstance(transaction._updates, tuple)
    first = transaction.table_metadata
    assert transaction.table_metadata is first and first == Transaction(table).table_metadata
    transaction.set_properties({"a": "1"})
    assert transaction.table_metadata.properties["a"] == "1"
    append = internals.append_producer(transaction, {}, merge=False)
    for data_file in write_data_files(first, rows, table.io, None, uuid.uuid4(), itertools.count()):
        append.append_data_file(data_file)
    committed = internals.commit_on_base(transaction, append)
    assert transaction.table_metadata == committed.metadata and committed.current_snapshot() is not None
    assert catalog.load_table(("ns", "t")).metadata.properties["a"] == "1"


@pytest.mark.parametrize(
    "source",
    [
        "from pyiceberg.io.pyarrow import _determine_partitions",
        "from pyiceberg.table._private import thing",
        "import pyiceberg._private",
        "io = transaction._table.io",
        "kind = self.catalog._iceberg_type_filter()",
    ],
)
def test_the_check_catches(source: str) -> None:
    assert private_uses(source)


@pytest.mark.parametrize(
    "source",
    [
        "from pyiceberg.io.pyarrow import pyarrow_to_schema",
        "self._open = {}",
        "cls._cache.clear()",
        "meta = super()._meta",
        "name = type(x).__name__",
    ],
)
def test_the_check_allows(source: str) -> None:
    assert not private_uses(source)


def test_only_internals_uses_private_api() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == INTERNALS:
            continue
        where = path.relative_to(PACKAGE).as_posix()
        for line, code, name in private_uses(path.read_text()):
            if (where, name) not in ALLOWED_PRIVATE:
                found.append(f"flight_server/{where}:{line}: {code}")
    assert not found, (
        "private API used outside flight_server/iceberg/internals.py (wrap it there in a public function, list it "
        "in PRIVATE_API, or allow it in ALLOWED_PRIVATE if it is not pyiceberg's):\n" + "\n".join(found)
    )


def test_without_statistics_drops_the_six_statistics_and_keeps_every_other_field() -> None:
    from pyiceberg.manifest import DataFile, DataFileContent, FileFormat
    from pyiceberg.typedef import Record

    statistics = ("column_sizes", "value_counts", "null_value_counts", "nan_value_counts")
    statistics += ("lower_bounds", "upper_bounds")
    full = DataFile.from_args(
        content=DataFileContent.DATA,
        file_path="s3://bucket/t/data/00000-0-a.parquet",
        file_format=FileFormat.PARQUET,
        partition=Record(3),
        record_count=10,
        file_size_in_bytes=1234,
        **{name: {1: b"x" if "bounds" in name else 5} for name in statistics},
        split_offsets=[4],
        sort_order_id=0,
    )
    full.spec_id = 2
    slim = internals.without_statistics(full)
    assert all(getattr(slim, name) is None for name in statistics)
    assert all(getattr(full, name) for name in statistics)  # a copy: the file planned is left as it was
    kept = [n for n in dir(DataFile) if isinstance(getattr(DataFile, n), property) and n not in statistics]
    assert {n: getattr(slim, n) for n in kept} == {n: getattr(full, n) for n in kept}
    assert "record_count" in kept and "spec_id" in kept and slim == full  # equal by path, as pyiceberg compares


def test_the_rest_wrappers_on_a_real_rest_catalog(seaweedfs: dict[str, str]) -> None:
    """`rest_load_body` asks what `RestCatalog.load_table` asks, through its session, and `rest_table` makes of the
    answer the table it makes; a table the catalog lacks raises what it raises."""
    catalog = load_catalog("s3", **seaweedfs)
    assert isinstance(catalog, RestCatalog) and isinstance(catalog._session, requests.Session)
    catalog.create_namespace_if_not_exists("tests")
    identifier = ("tests", f"internals_{uuid.uuid4().hex[:10]}")
    created = catalog.create_table(identifier, pa.schema([pa.field("id", pa.int64())]))
    created.append(pa.table({"id": pa.array([1, 2], pa.int64())}))
    answer = from_json(internals.rest_load_body(catalog, identifier))
    loaded = catalog.load_table(identifier)
    assert answer["metadata-location"] == loaded.metadata_location
    metadata = TableMetadataUtil.parse_obj(answer["metadata"])
    table = internals.rest_table(catalog, identifier, answer, metadata)
    assert table.metadata is metadata and table.metadata == loaded.metadata
    assert table.name() == loaded.name() and table.metadata_location == loaded.metadata_location
    assert type(table.io) is type(loaded.io) and table.io.properties.keys() == loaded.io.properties.keys()
    assert table.scan().to_arrow()["id"].to_pylist() == [1, 2]
    with pytest.raises(NoSuchTableError):
        internals.rest_load_body(catalog, ("tests", "no_such_table"))
