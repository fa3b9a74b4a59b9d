"""Reading manifests and manifest lists with readers built once per file schema (`internals._ResolvedAvroFile`)
returns what pyiceberg's own reads return, for tables of different layouts read in turn; and the append producers
built on those reads commit the manifests pyiceberg's own appends commit."""

from __future__ import annotations

import itertools
import pathlib
import sys
import tempfile
import uuid
from enum import Enum
from typing import Any

import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyiceberg.avro.file import AvroFile
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.expressions import EqualTo
from pyiceberg.io import FileIO
from pyiceberg.manifest import DataFile, ManifestEntry, ManifestEntryStatus, ManifestFile, ManifestWriterV2
from pyiceberg.schema import assign_fresh_schema_ids
from pyiceberg.table import Table
from pyiceberg.typedef import Record

from flight_server.changes.commits import live_files
from flight_server.changes.files import write_data_files
from flight_server.changes.history import commit_append
from flight_server.iceberg import internals
from flight_server.iceberg.catalog import partition_spec
from tests.conftest import sqlite_catalog

# Two layouts whose manifests have different Avro schemas (partition types), so that a reader built for one and
# used for the other would misread it.
LAYOUTS = {
    "by_bucket": (pa.schema([pa.field("id", pa.int64()), pa.field("city", pa.string())]), ["bucket(4, id)"]),
    "by_city": (pa.schema([pa.field("city", pa.string()), pa.field("n", pa.float64())]), ["identity(city)"]),
    "flat": (pa.schema([pa.field("id", pa.int64()), pa.field("score", pa.float32())]), []),
}


def plain(value: Any) -> Any:
    """A value with every record spelled out field by field (a `DataFile` compares by its path alone)."""
    if isinstance(value, Record):
        return (type(value).__name__, [plain(value[i]) for i in range(len(value))])
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, Enum):
        return (type(value).__name__, value.value)
    return value


def rows(layout: str, seed: int, count: int) -> pa.Table:
    schema, _ = LAYOUTS[layout]
    columns: dict[str, list[Any]] = {}
    for field in schema:
        if pa.types.is_string(field.type):
            columns[field.name] = [f"c{(seed + i) % 3}" for i in range(count)]
        elif pa.types.is_integer(field.type):
            columns[field.name] = [seed * 100 + i for i in range(count)]
        else:
            columns[field.name] = [(seed + i) / 7 for i in range(count)]
    return pa.table(columns, schema=schema)


def new_table(catalog: SqlCatalog, name: str, layout: str, merge_count: int) -> Table:
    arrow, spec = LAYOUTS[layout]
    schema = assign_fresh_schema_ids(internals.schema_without_ids(arrow))
    properties = {"commit.manifest-merge.enabled": "true", "commit.manifest.min-count-to-merge": str(merge_count)}
    return catalog.create_table(
        ("ns", name), schema=schema, partition_spec=partition_spec(spec, schema), properties=properties
    )


def assert_reads_match(table: Table) -> None:
    """Every snapshot's manifest list, and every manifest (with and without its deleted entries), read both ways."""
    io: FileIO = table.io
    for snapshot in table.snapshots():
        ours, theirs = internals.snapshot_manifests(io, snapshot), snapshot.manifests(io)
        assert plain(ours) == plain(theirs)
        for manifest in theirs:
            for discard in (True, False):
                expected = manifest.fetch_manifest_entry(io, discard_deleted=discard)
                assert plain(internals.manifest_entries(io, manifest, discard)) == plain(expected)


# One step on one of the tables: ("append", rows) or ("delete", the seed whose rows go).
steps = st.lists(
    st.tuples(st.sampled_from(sorted(LAYOUTS)), st.sampled_from(["append", "append", "delete"]), st.integers(0, 4)),
    min_size=3,
    max_size=12,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps, merge_count=st.integers(2, 4))
def test_resolved_reads_are_pyicebergs(steps: list[tuple[str, str, int]], merge_count: int) -> None:
    """Appends (merged every few), deletes (manifests with deleted and existing entries) on tables of three layouts,
    read in turn: the same manifests and entries as pyiceberg reads, field by field."""
    with tempfile.TemporaryDirectory() as tmp:
        catalog = SqlCatalog("reads", **sqlite_catalog(pathlib.Path(tmp)))
        catalog.create_namespace("ns")
        tables = {layout: new_table(catalog, layout, layout, merge_count) for layout in LAYOUTS}
        for layout, step, seed in steps:
            table = tables[layout]
            if step == "append":
                commit_append(internals.MemoTransaction(table), written(table, rows(layout, seed, 3)), {})
            else:
                column = LAYOUTS[layout][0].names[0]
                value: Any = rows(layout, seed, 1).column(column)[0].as_py()
                table.delete(EqualTo(column, value))
            tables[layout] = table = catalog.load_table(("ns", layout))
            assert_reads_match(table)
        for table in tables.values():
            assert_reads_match(table)


def written(table: Table, data: pa.Table) -> list[DataFile]:
    """Data files of `data` for the table, as a put writes them."""
    return write_data_files(table.metadata, data, table.io, None, uuid.uuid4(), itertools.count())


def header(io: FileIO, path: str) -> dict[str, str]:
    """An Avro file's header properties: its schema, partition spec, content, format version and codec."""
    with AvroFile[Record](io.new_input(path)) as file:
        return dict(file.header.meta)


def shape(table: Table, files: dict[str, int]) -> list[list[Any]]:
    """Each snapshot's manifests, in the manifest list's order, as their counts, header and entries (status, which
    of the appended files (-1: one a delete rewrote), which of the table's snapshots added it), sorted: pyiceberg's
    delete rewrites a manifest's entries in no fixed order."""
    position = {s.snapshot_id: i for i, s in enumerate(table.snapshots())}
    result = []
    for snapshot in table.snapshots():
        manifests: list[ManifestFile] = snapshot.manifests(table.io)
        result.append(
            [
                (
                    m.added_files_count,
                    m.existing_files_count,
                    m.deleted_files_count,
                    position.get(m.added_snapshot_id),
                    header(table.io, m.manifest_path),
                    sorted(
                        (
                            e.status.value,
                            files.get(e.data_file.file_path, -1),
                            position.get(e.snapshot_id, -1),
                            e.sequence_number or 0,
                        )
                        for e in m.fetch_manifest_entry(table.io, discard_deleted=False)
                    ),
                )
                for m in manifests
            ]
        )
    return result


def test_appends_commit_what_pyicebergs_appends_commit(tmp_path: pathlib.Path) -> None:
    """The same data files appended one group at a time to two tables, through `commit_append` and through
    pyiceberg's own fast and merge appends (merging on for the first eight, then off), with a delete between: the
    same manifests."""
    catalog = SqlCatalog("appends", **sqlite_catalog(tmp_path))
    catalog.create_namespace("ns")
    ours, theirs = (new_table(catalog, name, "by_bucket", 3) for name in ("ours", "theirs"))
    groups = [written(ours, rows("by_bucket", seed, 4)) for seed in range(12)]
    for i, group in enumerate(groups):
        if i == 8:
            for table in (ours, theirs):
                with table.transaction() as transaction:
                    transaction.set_properties({"commit.manifest-merge.enabled": "false"})
            ours, theirs = catalog.load_table(("ns", "ours")), catalog.load_table(("ns", "theirs"))
        if i == 9:  # a delete leaves manifests of existing and deleted entries only, which later appends keep
            for table in (ours, theirs):
                table.delete(EqualTo("id", 201))
            ours, theirs = catalog.load_table(("ns", "ours")), catalog.load_table(("ns", "theirs"))
        commit_append(internals.MemoTransaction(ours), group, {"group": str(i)})
        with theirs.transaction() as transaction:
            merge = i < 8
            update = transaction.update_snapshot(snapshot_properties={"group": str(i)})
            append = update.merge_append() if merge else update.fast_append()
            with append as producer:
                for data_file in group:
                    producer.append_data_file(data_file)
        ours, theirs = catalog.load_table(("ns", "ours")), catalog.load_table(("ns", "theirs"))
    files = {f.file_path: n for n, group in enumerate(groups) for f in group}
    assert shape(ours, files) == shape(theirs, files)
    assert len(ours.snapshots()) == len(groups) + 1  # and the delete


def manifest_bytes(path: pathlib.Path) -> bytes:
    """An Avro file's bytes with its random sync marker (the last 16 bytes: each block ends with it) zeroed."""
    data = path.read_bytes()
    return data.replace(data[-16:], bytes(16))


def test_data_manifests_are_pyicebergs_byte_for_byte(tmp_path: pathlib.Path) -> None:
    """Manifests of tables of three layouts, written in turn (so that each layout's writer is reused after another's),
    by `DataManifestWriter` and by pyiceberg's own writer: the same bytes but for the sync marker."""
    catalog = SqlCatalog("writes", **sqlite_catalog(tmp_path))
    catalog.create_namespace("ns")
    tables = {layout: new_table(catalog, layout, layout, 100) for layout in LAYOUTS}
    for turn in range(2):
        for layout, table in tables.items():
            files = written(table, rows(layout, turn, 5))
            made = {}
            for kind, writer_class in (("ours", internals.DataManifestWriter), ("theirs", ManifestWriterV2)):
                path = tmp_path / f"{layout}-{turn}-{kind}.avro"
                output = table.io.new_output(path.as_uri())
                with writer_class(table.spec(), table.schema(), output, 42, "gzip") as writer:
                    for data_file in files:
                        writer.add_entry(
                            ManifestEntry.from_args(
                                status=ManifestEntryStatus.ADDED, snapshot_id=42, data_file=data_file
                            )
                        )
                made[kind] = (manifest_bytes(path), writer.to_manifest_file())
            assert made["ours"][0] == made["theirs"][0]
            ours, theirs = made["ours"][1], made["theirs"][1]
            assert (ours.added_files_count, ours.added_rows_count, plain(ours.partitions)) == (
                theirs.added_files_count,
                theirs.added_rows_count,
                plain(theirs.partitions),
            )


def test_an_overwrite_finds_every_file_to_delete_while_threads_switch_often(
    tmp_path: pathlib.Path,
) -> None:
    """An overwrite of a table of 16 one-partition manifests, its deleted entries worked out 60 times on pyiceberg's
    thread pool with the interpreter switching threads every microsecond: every live file is found each time.
    pyiceberg's own evaluator, one per spec shared by the pool's threads, checked a manifest against another's
    partition bounds meanwhile and skipped it (`ValidationException: Missing required files to delete`, met by an
    overwrite beside concurrent reads)."""
    catalog = SqlCatalog("overwrite", **sqlite_catalog(tmp_path))
    catalog.create_namespace("ns")
    table = new_table(catalog, "by_city", "by_city", merge_count=100)
    for seed in range(16):  # one manifest per append, each of a city of its own
        one_city = pa.table({"city": [f"c{seed}"], "n": [float(seed)]}, schema=LAYOUTS["by_city"][0])
        commit_append(internals.MemoTransaction(table), written(table, one_city), {})
        table = catalog.load_table(("ns", "by_city"))
    transaction = internals.MemoTransaction(table)
    live = live_files(table.io, table.current_snapshot())
    assert len(live) == len(table.current_snapshot().manifests(table.io)) == 16
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(60):
            overwrite = internals.overwrite_producer(transaction, {})
            for data_file in live:
                overwrite.delete_data_file(data_file)
            overwrite._build_delete_files_partition_predicate()
            deleted = overwrite._deleted_entries()  # raises ValidationException when a manifest was skipped
            assert sorted(entry.data_file.file_path for entry in deleted) == sorted(f.file_path for f in live)
    finally:
        sys.setswitchinterval(interval)
