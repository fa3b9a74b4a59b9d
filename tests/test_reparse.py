"""A table's new metadata file, loaded by `FeatureCatalog` reusing the snapshots and log entries it parsed from the
table's previous file (flight_server/iceberg/reparse.py), is exactly what pyiceberg's own full parse gives: after
random sequences of commits by another writer (appends, schema and partition changes, tags, rollbacks, expiry,
properties) and by this catalog's own commits, in format 1 and 2, on SQLite and PostgreSQL. Files that a writer
could not produce (the same snapshot id with other content, another table's uuid or format) reuse nothing; missing
and broken files fail as before."""

from __future__ import annotations

import gzip
import json
import sqlite3
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot
from pyiceberg.types import LongType

from flight_server.iceberg.catalog import FeatureCatalog, own_copy
from flight_server.wire.errors import NotFoundError
from tests.conftest import sqlite_catalog

NAME = "ns.t"
OPERATIONS = (
    *("append", "append", "schema", "spec", "tag", "untag", "rollback", "expire", "property", "own commit"),
    "upgrade",  # format 1 to 2
)


def rows(n: int) -> pa.Table:
    return pa.table({"id": pa.array([n], pa.int64()), "v": pa.array([n * 10], pa.int64())})


def catalogs(
    root: Path, version: str = "2", database: str | None = None, name: str = "default"
) -> tuple[SqlCatalog, FeatureCatalog]:
    """pyiceberg's own catalog (the other writer, and the reference parse) and the server's, on one SQL catalog
    (SQLite under `root`, or the PostgreSQL `database`) with a table of one snapshot."""
    properties = (
        sqlite_catalog(root) if database is None else {"type": "sql", "uri": database, "warehouse": root.as_uri()}
    )
    writer = SqlCatalog(name, **properties)
    writer.create_namespace("ns")
    writer.create_table(NAME, schema=rows(0).schema, properties={"format-version": version}).append(rows(0))
    return writer, FeatureCatalog(name, properties)


def exactly(model: BaseModel) -> str:
    """The model as JSON, where 1, 1.0 and True differ (in Python's == they do not)."""
    return json.dumps(model.model_dump(mode="json"))


def same_as_pyiceberg(table: Table, writer: SqlCatalog, parsed: bool = True) -> None:
    """`table` is what pyiceberg loads for the table now: same models, same values, and (`parsed` from the file,
    not kept from this catalog's own commit) the same fields given."""
    fresh = writer.load_table(NAME)
    mine, theirs = table.metadata, fresh.metadata
    assert type(mine) is type(theirs) and mine == theirs
    assert exactly(mine) == exactly(theirs)
    assert mine.model_dump() == theirs.model_dump()
    assert not parsed or mine.model_fields_set == theirs.model_fields_set
    for kept, fresh_snapshot in zip(mine.snapshots, theirs.snapshots, strict=True):
        assert kept == fresh_snapshot and exactly(kept) == exactly(fresh_snapshot)
        assert not parsed or kept.model_fields_set == fresh_snapshot.model_fields_set
    assert (mine.refs, mine.current_snapshot_id, mine.snapshot_log, mine.metadata_log, mine.statistics) == (
        theirs.refs,
        theirs.current_snapshot_id,
        theirs.snapshot_log,
        theirs.metadata_log,
        theirs.statistics,
    )
    assert table.current_snapshot() == fresh.current_snapshot()
    assert (table.name(), table.metadata_location) == (fresh.name(), fresh.metadata_location)
    assert isinstance(table.catalog, SqlCatalog)
    assert type(table.io) is type(fresh.io)
    # The server's catalog also tests its pooled connections (`sql_pool_settings`), which its FileIO is given too.
    assert {k: v for k, v in table.io.properties.items() if k != "pool_pre_ping"} == fresh.io.properties


def commit(kind: str, writer: SqlCatalog, catalog: FeatureCatalog, data: st.DataObject, step: int) -> None:
    """One commit of `kind` by the other writer (pyiceberg) or through the server's catalog (`own commit`)."""
    table = writer.load_table(NAME)
    snapshots = table.metadata.snapshots
    tags = [name for name, ref in table.metadata.refs.items() if name != "main"]
    if kind == "append":
        table.append(rows(step))
    elif kind == "schema":
        with table.update_schema() as update:
            update.add_column(f"c{step}", LongType())
    elif kind == "spec":
        with table.update_spec() as update:
            if any(field.name == "id" for field in table.spec().fields):
                update.remove_field("id")
            else:
                update.add_identity("id")
    elif kind == "tag":
        snapshot = data.draw(st.sampled_from(snapshots))
        table.manage_snapshots().create_tag(snapshot.snapshot_id, f"pin{step}").commit()
    elif kind == "untag" and tags:
        table.manage_snapshots().remove_tag(data.draw(st.sampled_from(tags))).commit()
    elif kind == "rollback" and (current := table.current_snapshot()) and current.parent_snapshot_id is not None:
        table.manage_snapshots().set_current_snapshot(current.parent_snapshot_id).commit()
    elif kind == "expire":
        protected = {ref.snapshot_id for ref in table.metadata.refs.values()}
        candidates = [s.snapshot_id for s in snapshots if s.snapshot_id not in protected]
        if candidates:
            chosen = data.draw(st.lists(st.sampled_from(candidates), min_size=1, unique=True))
            table.maintenance.expire_snapshots().by_ids(chosen).commit()
    elif kind == "property":
        with table.transaction() as transaction:
            transaction.set_properties({"feature.note": str(data.draw(st.integers(0, 3)))})
    elif kind == "upgrade":
        with table.transaction() as transaction:
            transaction.upgrade_table_version(2)
    elif kind == "own commit":  # a put through this server: it keeps what it committed for `read`
        mine = own_copy(catalog.read(NAME))
        mine.append(rows(step))
        catalog.remember(NAME, mine)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    version=st.sampled_from(["1", "2"]),
    steps=st.lists(st.tuples(st.sampled_from(OPERATIONS), st.booleans()), min_size=1, max_size=10),
    data=st.data(),
)
def test_every_load_is_what_a_full_parse_gives(
    request: pytest.FixtureRequest, kind: str, version: str, steps: list[tuple[str, bool]], data: Any
) -> None:
    """After each commit that is read (`read` True; the others leave several commits between two files parsed),
    `read`, `load` and `location` give what pyiceberg's own load gives, and each snapshot the last parsed file
    had as it is now is the same object (reused, not parsed again; pyiceberg's expiry drops a snapshot's parent
    when it expires it, and an upgrade to format 2 parses every entry again)."""
    with tempfile.TemporaryDirectory() as root:
        database = request.getfixturevalue("postgres_url") if kind == "postgres" else None
        writer, catalog = catalogs(Path(root), version, database, f"c{uuid.uuid4().hex}")
        try:
            replay(writer, catalog, steps, data, int(version))
        finally:  # each example's two engines would hold their pooled connections until collected: PostgreSQL's
            # 100 were used up once, in a test process that had run other PostgreSQL tests before
            writer.engine.dispose()
            sql = catalog.catalog
            assert isinstance(sql, SqlCatalog)
            sql.engine.dispose()


def replay(writer: SqlCatalog, catalog: FeatureCatalog, steps: list[tuple[str, bool]], data: Any, version: int) -> None:
    """`test_every_load_is_what_a_full_parse_gives`'s steps, each checked after its commit when it is read."""
    parsed: dict[int, Snapshot] = {s.snapshot_id: s for s in catalog.read(NAME).metadata.snapshots}
    remembered, last_version = None, version
    for step, (kind, read) in enumerate(steps, start=1):
        commit(kind, writer, catalog, data, step)
        if kind == "own commit":
            remembered = catalog.read(NAME).metadata_location
        if not read:
            continue
        table = catalog.read(NAME)
        same_as_pyiceberg(table, writer, parsed=table.metadata_location != remembered)
        same_as_pyiceberg(catalog.load(NAME), writer)
        assert catalog.location(NAME) == writer.load_table(NAME).location()
        if table.metadata_location == remembered:  # kept from this catalog's own commit, not parsed
            continue
        for snapshot in table.metadata.snapshots:
            before = parsed.get(snapshot.snapshot_id)
            if before == snapshot and table.metadata.format_version == last_version:  # else all parsed
                assert before is snapshot, "a snapshot was parsed again"
        parsed = {s.snapshot_id: s for s in table.metadata.snapshots}
        last_version = table.metadata.format_version


def swap_pointer(root: Path, location: str) -> None:
    """Point the SQL catalog's row at another metadata file, as a commit by another writer does."""
    with sqlite3.connect(root / "catalog.db") as connection:
        connection.execute("UPDATE iceberg_tables SET metadata_location = ? WHERE table_name = 't'", (location,))


def rewritten(table: Table, change: Any, suffix: str = ".metadata.json") -> str:
    """A new metadata file of the table: its current one as JSON, changed by `change` (a writer could not
    produce these files; they test what only a broken or foreign file would do)."""
    path = Path(table.metadata_location.removeprefix("file://"))
    document = json.loads(path.read_text())
    change(document)
    target = path.with_name(f"99999-rewritten{suffix}")
    text = json.dumps(document).encode()
    target.write_bytes(gzip.compress(text) if suffix.startswith(".gz") else text)
    return target.as_uri()


def test_a_snapshot_changed_under_its_id_is_parsed_again(tmp_path: Path) -> None:
    writer, catalog = catalogs(tmp_path)
    before = catalog.read(NAME)

    def relabel(document: dict[str, Any]) -> None:
        document["snapshots"][0]["summary"]["added-records"] = "7"

    swap_pointer(tmp_path, rewritten(before, relabel))
    after = catalog.read(NAME)
    same_as_pyiceberg(after, writer)
    assert after.metadata.snapshots[0].summary["added-records"] == "7"
    assert after.metadata.snapshots[0] is not before.metadata.snapshots[0]


@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")  # the summary's true, as pyiceberg keeps it
def test_summary_values_are_compared_with_their_types(tmp_path: Path) -> None:
    """pyiceberg keeps a summary's values as the file gives them: a model made from `1` does not stand for
    `true`, though Python finds them equal."""
    writer, catalog = catalogs(tmp_path)

    def numbered(value: object) -> Any:
        def change(document: dict[str, Any]) -> None:
            document["snapshots"][0]["summary"]["extra"] = value

        return change

    swap_pointer(tmp_path, rewritten(catalog.read(NAME), numbered(1)))
    assert catalog.read(NAME).metadata.snapshots[0].summary["extra"] == 1
    swap_pointer(tmp_path, rewritten(catalog.read(NAME), numbered(True), ".gz.metadata.json"))
    after = catalog.read(NAME)
    assert after.metadata.snapshots[0].summary["extra"] is True
    same_as_pyiceberg(after, writer)


@pytest.mark.parametrize(
    ("key", "value"), [("table-uuid", "00000000-0000-4000-8000-000000000000"), ("format-version", 3)]
)
def test_another_tables_file_or_format_reuses_nothing(tmp_path: Path, key: str, value: object) -> None:
    """A file with another table uuid or format version (the same snapshots otherwise) is parsed in full."""
    writer, catalog = catalogs(tmp_path)
    before = catalog.read(NAME)

    def changed(document: dict[str, Any]) -> None:
        document[key] = value

    swap_pointer(tmp_path, rewritten(before, changed))
    after = catalog.read(NAME)
    same_as_pyiceberg(after, writer)
    assert not {id(s) for s in after.metadata.snapshots} & {id(s) for s in before.metadata.snapshots}
    assert not {id(e) for e in after.metadata.snapshot_log} & {id(e) for e in before.metadata.snapshot_log}


def test_a_table_dropped_and_created_again(tmp_path: Path) -> None:
    writer, catalog = catalogs(tmp_path)
    before = catalog.read(NAME)
    writer.drop_table(NAME)
    with pytest.raises(NotFoundError, match="'ns.t' does not exist"):
        catalog.read(NAME)
    with pytest.raises(NotFoundError, match="'ns.t' does not exist"):
        catalog.load(NAME)
    writer.create_table(NAME, schema=rows(0).schema).append(rows(1))
    after = catalog.read(NAME)
    same_as_pyiceberg(after, writer)
    assert after.metadata.table_uuid != before.metadata.table_uuid


def test_expired_snapshots_are_gone(tmp_path: Path) -> None:
    """Snapshots expired from the middle of the history leave the middle of the snapshot log too, and the snapshot
    whose parent expired is parsed again: pyiceberg's expiry writes it without its parent."""
    writer, catalog = catalogs(tmp_path)
    for step in range(1, 5):
        writer.load_table(NAME).append(rows(step))
    first = catalog.read(NAME)
    oldest, *expired, orphaned, newest = first.metadata.snapshots
    gone = [s.snapshot_id for s in expired]
    writer.load_table(NAME).maintenance.expire_snapshots().by_ids(gone).commit()
    after = catalog.read(NAME)
    same_as_pyiceberg(after, writer)
    assert [e.snapshot_id for e in after.metadata.snapshot_log] == [s.snapshot_id for s in (oldest, orphaned, newest)]
    without_parent = orphaned.model_copy(update={"parent_snapshot_id": None})
    assert after.metadata.snapshots == [oldest, without_parent, newest]
    assert after.metadata.snapshots[0] is oldest and after.metadata.snapshots[2] is newest


@pytest.mark.parametrize("fault", ["missing", "not json", "not metadata"])
def test_a_file_that_cannot_be_read_fails_as_before(tmp_path: Path, fault: str) -> None:
    """The error pyiceberg's own load gives (the server's answer to it is unchanged)."""
    writer, catalog = catalogs(tmp_path)
    catalog.read(NAME)
    writer.load_table(NAME).append(rows(1))
    path = Path(writer.load_table(NAME).metadata_location.removeprefix("file://"))
    if fault == "missing":
        path.unlink()
    else:
        path.write_text("{" if fault == "not json" else json.dumps({"format-version": 2, "location": 3}))
    with pytest.raises(Exception) as theirs:
        writer.load_table(NAME)
    for attempt in (lambda: catalog.read(NAME), lambda: catalog.load(NAME), lambda: catalog.location(NAME)):
        with pytest.raises(type(theirs.value)) as mine:
            attempt()
        assert str(mine.value) == str(theirs.value)
