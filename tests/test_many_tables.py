"""A catalog of many feature tables: what a server does per table in the background must not grow with their number
where one query can do for all of them (docs/operations.md, "Many tables")."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pyiceberg.catalog import load_catalog
from sqlalchemy import event

from flight_client import FeatureClient
from flight_server.base.lru import WeightedLru
from flight_server.base.schemas import table_arrow_schema
from flight_server.changes import files, history
from flight_server.changes.history import WRITE_ID_PROPERTY, WriteIds
from flight_server.iceberg.catalog import FeatureCatalog
from flight_server.transport.service import FeatureFlightServer
from tests.conftest import sqlite_catalog, start_server, wait_until

TABLES = 40
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def rows(i: int, value: float) -> pa.Table:
    schema = pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),  # keys and event time: required in the tables the server makes
            pa.field("ts", pa.timestamp("us", "UTC"), nullable=False),
            pa.field(f"f{i}", pa.float64()),
        ]
    )
    return pa.table([[1, 2], [NOW, NOW], [value, value]], schema=schema)


def feature(i: int) -> str:
    return f"many.t{i:02d}:f{i}"


@pytest.fixture(scope="module")
def properties(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return sqlite_catalog(tmp_path_factory.mktemp("many"))


@pytest.fixture(scope="module")
def server(properties: dict[str, str]) -> Iterator[FeatureFlightServer]:
    # Polls only when a write through it wakes them: each poll below is one the test starts.
    server = start_server(properties, online_refresh_seconds=3600.0)
    with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
        for i in range(TABLES):
            client.write(f"many.t{i:02d}", rows(i, 0.0), entity_keys="id", event_time="ts")
        for start in range(0, TABLES, 20):
            client.get_online_features({"id": [1]}, [feature(i) for i in range(start, start + 20)])
    yield server
    server.shutdown()


class Statements:
    """The SQL statements the server's catalog runs while counting."""

    def __init__(self, server: FeatureFlightServer):
        self.engine = server.parts.catalog.catalog.engine  # type: ignore[attr-defined]
        self.count = 0
        event.listen(self.engine, "before_cursor_execute", self._seen)

    def _seen(self, *args: Any) -> None:
        self.count += 1

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


def one_poll(server: FeatureFlightServer, table: str) -> None:
    """Wake the online refresh (as a write through the server does) and wait until it has checked every index."""
    store = server.parts.store
    before = {name: index.checked_at for name, index in store.indexes().items()}
    store.notify(table)
    wait_until(
        lambda: all(index.checked_at > before.get(name, 0.0) for name, index in store.indexes().items()),
        what="a poll of every online index",
    )


def test_a_poll_of_unchanged_tables_asks_the_catalog_once(server: FeatureFlightServer) -> None:
    assert len(server.parts.store.indexes()) == TABLES
    statements = Statements(server)
    try:
        one_poll(server, "many.t00")
        assert statements.count <= 2, f"a poll of {TABLES} unchanged tables ran {statements.count} statements"
    finally:
        statements.close()


def test_a_table_changed_elsewhere_is_refreshed_alone(server: FeatureFlightServer, properties: dict[str, str]) -> None:
    """A change through another replica (here: pyiceberg itself) is seen at the next poll, and only its table costs
    more than the one query; a table dropped and created again under its name serves its new rows."""
    catalog = load_catalog("default", **properties)
    catalog.load_table(("many", "t01")).append(rows(1, 1.0))
    definition = dict(catalog.load_table(("many", "t02")).properties)
    catalog.drop_table(("many", "t02"))
    catalog.create_table(("many", "t02"), rows(2, 2.0).schema, properties=definition).append(rows(2, 2.0))
    one_poll(server, "many.t00")
    with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
        answer = client.get_online_features({"id": [1]}, [feature(1), feature(2), feature(3)])
    assert answer.column("f1").to_pylist() == [1.0]
    assert answer.column("f2").to_pylist() == [2.0]
    assert answer.column("f3").to_pylist() == [0.0]


def test_catalog_pointers(server: FeatureFlightServer) -> None:
    """`metadata_locations` names every table where the catalog points it, as `metadata_location` does one."""
    catalog = server.parts.catalog
    names = [f"many.t{i:02d}" for i in range(TABLES)]
    pointers = catalog.metadata_locations([*names, "many.gone", "elsewhere.t00"])
    assert pointers is not None
    assert sorted(pointers) == names
    assert pointers["many.t05"] == catalog.metadata_location("many.t05")
    assert catalog.metadata_locations([]) == {}


def test_a_round_of_training_set_refreshes_asks_the_catalog_once(
    server: FeatureFlightServer, properties: dict[str, str]
) -> None:
    """The training-set indexes of the tables a training set joined at their current snapshots are brought forward
    as their tables change: a round over 20 unchanged tables costs one query, and a table changed elsewhere is
    still brought forward at the next."""
    joined = range(20, 40)
    entities = pa.table({"id": [1, 2], "event_timestamp": pa.array([NOW, NOW], pa.timestamp("us", "UTC"))})
    with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
        client.get_historical_features(entities, [feature(i) for i in joined])
    cache = server.parts.training.cache
    assert cache.stats()["tables_followed"] == len(joined)
    cache.refresh()  # the first round after a training set finds its indexes current
    statements = Statements(server)
    try:
        cache.refresh()
        assert statements.count <= 2, f"a round over {len(joined)} unchanged tables ran {statements.count} statements"
    finally:
        statements.close()
    ahead = cache.refreshed_ahead
    load_catalog("default", **properties).load_table(("many", "t21")).append(rows(21, 5.0))
    cache.refresh()
    assert cache.refreshed_ahead == ahead + 1
    assert cache.stats()["tables_followed"] == len(joined)


def test_a_listing_reads_no_metadata_of_the_tables_kept_loaded(
    server: FeatureFlightServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`list` (and `list_flights`) answers every table's summary: those the server keeps loaded at the metadata file
    the catalog points them at (here: every table, each with an online index) are not loaded again (a listing of
    300 tables took 0.35-1.5 s, loading each)."""
    catalog = server.parts.catalog
    loaded: list[str] = []
    load = catalog.load
    monkeypatch.setattr(catalog, "load", lambda table: loaded.append(table) or load(table))
    with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
        listed = [t["table"] for t in client.tables() if t["table"].startswith("many.")]
        flights = [info.descriptor.path[0].decode() for info in client._client.list_flights(b"many.")]
    assert listed == flights == [f"many.t{i:02d}" for i in range(TABLES)]
    assert loaded == []


WIDE = 300  # more tables than the caches of tables once kept (256), before they started over


@pytest.fixture(scope="module")
def wide(properties: dict[str, str]) -> list[str]:
    """`WIDE` tables of one snapshot each, committed by a put with a write id (as the server's puts record it)."""
    pyiceberg = load_catalog("default", **properties)
    pyiceberg.create_namespace_if_not_exists("wide")
    names = []
    for i in range(WIDE):
        table = pyiceberg.create_table(("wide", f"t{i:03d}"), rows(0, 0.0).schema)
        table.append(rows(0, float(i)), snapshot_properties={WRITE_ID_PROPERTY: f"put-{i}"})
        names.append(f"wide.t{i:03d}")
    return names


def test_a_round_over_more_tables_than_ever_kept_before_reads_each_once(
    properties: dict[str, str], wide: list[str]
) -> None:
    """Pipelines write hundreds of tables in turn, and every put and read goes through `read`: a second round over
    300 unchanged tables finds each as the first left it (the cache once started over past 256 tables, so a round
    over more parsed every table's metadata again, and held none of them for the next)."""
    catalog = FeatureCatalog("default", properties)
    first = {name: catalog.read(name) for name in wide}
    again = {name: catalog.read(name) for name in wide}
    assert [name for name in wide if again[name] is not first[name]] == []
    assert catalog.cache_stats()["tables"]["entries"] >= len(wide)


def test_write_ids_of_more_tables_than_once_kept_are_read_once(
    properties: dict[str, str], wide: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put with a write id looks for it in its table's history, read incrementally: a second round of puts over
    300 tables reads no snapshot summary again (past 256 tables the ids once started over, and each put of a round
    read its table's whole retained history again: 16 ms at 1,440 snapshots). They keep snapshot ids, not the
    snapshots of tables no longer kept loaded."""
    catalog = FeatureCatalog("default", properties)
    tables = [catalog.read(name) for name in wide]
    ids = WriteIds()
    found = [ids.find(table, f"put-{i}") for i, table in enumerate(tables)]
    assert [result.snapshot_id if result else None for result in found] == [
        table.metadata.current_snapshot_id for table in tables
    ]
    read: list[int] = []
    summaries = history._committed_ids
    monkeypatch.setattr(history, "_committed_ids", lambda snapshot: read.append(1) or summaries(snapshot))
    assert all(ids.find(table, f"put-{i}") is not None for i, table in enumerate(tables))
    assert read == []


def test_a_pass_of_orphan_removals_reads_each_tables_location_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Orphan removal of a table leaves out the folders of the catalog's other tables located inside its own, so it
    needs every other table's location: a pass of automatic maintenance over all the tables (after a start, then
    daily) reads each table's once, not once per table of the pass (tables x tables metadata reads)."""
    tables = 12
    server = start_server(sqlite_catalog(tmp_path), auto_maintenance=True, maintenance_interval_seconds=3600.0)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            for i in range(tables):
                client.write(f"many.t{i:02d}", rows(i, 0.0), entity_keys="id", event_time="ts")
        catalog, upkeep = server.parts.catalog, server.parts.upkeep
        asked: list[str] = []
        location = catalog.location

        def counted(table: str) -> str:
            asked.append(table)
            return location(table)

        monkeypatch.setattr(catalog, "location", counted)
        upkeep._pass()  # what the background thread does each interval (here: not within the test)
        watched = upkeep.tables()
        assert sorted(watched) == [f"many.t{i:02d}" for i in range(tables)]
        assert all(
            w.orphans_checked is not None and w.last is not None and w.last.error is None for w in watched.values()
        )
        assert sorted(asked) == sorted(set(asked)), f"locations read more than once: {len(asked)} reads"
    finally:
        server.shutdown()


def test_write_ids_past_their_cap_forget_the_least_recently_used_tables(
    properties: dict[str, str], wide: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(history, "MAX_WRITE_IDS", 100)
    catalog = FeatureCatalog("default", properties)
    tables = [catalog.read(name) for name in wide]
    ids = WriteIds()
    for i, table in enumerate(tables):
        assert ids.find(table, f"put-{i}") is not None
    kept = ids._tables
    assert len(kept) == 100 and ids._ids == sum(len(seen.ids) for seen in kept.values())
    assert list(kept) == [str(table.metadata.table_uuid) for table in tables[-100:]]


def test_file_contexts_of_tables_written_in_turn_keep_the_recently_used(
    server: FeatureFlightServer, properties: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What writing a table's files needs is kept per table layout, the least recently used going first: a table
    written again keeps its context while others come and go (the first kept went first, however recently used, so
    that more tables than kept, written in turn, worked every context out again at each chunk)."""
    monkeypatch.setattr(files, "_CONTEXTS", WeightedLru(10, lambda _: 1))
    catalog = FeatureCatalog("default", properties)
    tables = [catalog.load(f"many.t{i:02d}") for i in range(11)]

    def context(i: int) -> Any:
        return files._FileContext.of(tables[i].metadata, table_arrow_schema(tables[i].schema()))

    first = [context(i) for i in range(10)]
    assert context(0) is first[0]  # used again: now the most recently used
    context(10)  # one more than kept: the least recently used goes
    assert context(0) is first[0] and context(1) is not first[1]
