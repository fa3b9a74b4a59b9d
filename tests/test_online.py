"""Online serving: latest features per entity from the in-memory index, kept fresh by refreshes."""

from __future__ import annotations

import datetime as dt
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pyiceberg.catalog import load_catalog
from pyiceberg.types import DoubleType

from flight_client import FeatureClient, InvalidRequestError, NotFoundError, ResourceExhaustedError
from flight_server.iceberg.catalog import FeatureCatalog, FeatureSpec
from flight_server.online import index
from flight_server.online.index import MISSING, TAIL_CHUNKS, IndexState, OnlineIndex, Rows
from flight_server.online.lookups import Answer
from tests.conftest import start_server, wait_until

UTC = dt.timezone.utc
BASE = dt.datetime(2025, 6, 1, tzinfo=UTC)
TTL_HOURS = 2
REFRESH_SECONDS = 0.05


def hours(h: int | None) -> dt.datetime | None:
    return None if h is None else BASE + dt.timedelta(hours=h)


@pytest.fixture(scope="module")
def catalog_properties(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root: Path = tmp_path_factory.mktemp("online")
    return {"type": "sql", "uri": f"sqlite:///{root / 'c.db'}", "warehouse": root.as_uri()}


@pytest.fixture(scope="module")
def location(catalog_properties: dict[str, str]) -> Iterator[str]:
    server = start_server(catalog_properties, online_refresh_seconds=REFRESH_SECONDS)
    yield f"grpc://127.0.0.1:{server.port}"
    server.shutdown()


def suffix() -> str:
    return uuid.uuid4().hex[:10]


# Table A: composite key (k1 int, k2 string), a created time and a two-hour TTL.
# Table B: key k1 only (int32), no created time, no TTL. Tiny domains make ties, TTL edges,
# unknown and duplicate entities common.
a_rows = st.lists(
    st.tuples(
        st.integers(0, 3),
        st.sampled_from(["x", "y"]),
        st.integers(0, 6),
        st.none() | st.integers(0, 3),
        st.none() | st.floats(-9, 9),
    ),
    min_size=1,
    max_size=25,
    unique_by=lambda r: (r[0], r[1], r[2], r[3]),
)
b_rows = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 6), st.none() | st.sampled_from(["p", "q"])),
    min_size=1,
    max_size=15,
    unique_by=lambda r: (r[0], r[1]),
)
entities = st.lists(
    st.tuples(st.none() | st.integers(0, 4), st.none() | st.sampled_from(["x", "y", "z"])), min_size=1, max_size=20
)


def latest(rows: list[tuple[Any, ...]], until: int | None, ttl: int | None, now: int) -> Any:
    """The reference: among one entity's rows (key, ts, created, value) that have an event time,
    at or before `until` and no older than the TTL before `now`, the latest; the created time
    breaks ties and a null created time loses."""
    found = [r for r in rows if r[1] is not None and (until is None or r[1] <= until)]
    if ttl is not None:
        found = [r for r in found if r[1] >= now - ttl]
    return max(found, key=lambda r: (r[1], -1 if r[2] is None else r[2]), default=None)


def reference(
    keys: list[tuple[Any, Any]], a: list, b: list, now: int, until: int | None = None, ttl: bool = True
) -> list[dict[str, Any]]:
    out = []
    for k1, k2 in keys:
        a_match = [((r[0], r[1]), r[2], r[3], r[4]) for r in a if (r[0], r[1]) == (k1, k2)]
        b_match = [(r[0], r[1], None, r[2]) for r in b if r[0] == k1]
        best_a = latest(a_match, until, TTL_HOURS if ttl else None, now)
        best_b = latest(b_match, until, None, now)
        out.append(
            {
                "k1": k1,
                "k2": k2,
                "a_value": best_a[3] if best_a else None,
                "b_value": best_b[3] if best_b else None,
                "a__ts": hours(best_a[1]) if best_a else None,
                "b__when": hours(best_b[1]) if best_b else None,
            }
        )
    return out


def write_pair(client: FeatureClient, a: list, b: list, name: str) -> tuple[str, str]:
    table_a, table_b = f"online.a_{name}", f"online.b_{name}"
    half = len(a) // 2
    for part in (a[:half], a[half:]):  # two snapshots
        if part:
            client.write(
                table_a,
                pa.table(
                    {
                        "k1": pa.array([r[0] for r in part], pa.int64()),
                        "k2": [r[1] for r in part],
                        "ts": pa.array([hours(r[2]) for r in part], pa.timestamp("us", tz="UTC")),
                        "created": pa.array([hours(r[3]) for r in part], pa.timestamp("us", tz="UTC")),
                        "value": pa.array([r[4] for r in part], pa.float64()),
                    }
                ),
                entity_keys=["k1", "k2"],
                event_time="ts",
                created_time="created",
                ttl=dt.timedelta(hours=TTL_HOURS),
            )
    client.write(
        table_b,
        pa.table(
            {
                "k1": pa.array([r[0] for r in b], pa.int32()),
                "when": pa.array([hours(r[1]) for r in b], pa.timestamp("us", tz="UTC")),
                "value": pa.array([r[2] for r in b], pa.string()),
            }
        ),
        entity_keys=["k1"],
        event_time="when",
    )
    return table_a, table_b


def as_rows(result: pa.Table) -> list[dict[str, Any]]:
    return result.rename_columns(["k1", "k2", "a_value", "b_value", "a__ts", "b__when"]).to_pylist()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=a_rows, b=b_rows, keys=entities, now=st.integers(0, 9), as_of=st.integers(-1, 7))
# Always tried: a row exactly at the TTL bound, and a tie on event time broken by the created time.
@example(a=[(0, "x", 3, None, 1.5)], b=[(0, 0, "p")], keys=[(0, "x")], now=5, as_of=5)
@example(
    a=[(1, "y", 2, 1, 1.0), (1, "y", 2, 0, 2.0), (1, "y", 2, None, 3.0)],
    b=[(1, 2, "q")],
    keys=[(1, "y")] * 2,
    now=2,
    as_of=2,
)
def test_online_matches_reference(location: str, a: list, b: list, keys: list, now: int, as_of: int) -> None:
    with FeatureClient(location) as client:
        table_a, table_b = write_pair(client, a, b, suffix())
        features = [f"{table_a}:value", f"{table_b}:value"]
        request = {"k1": [k[0] for k in keys], "k2": [k[1] for k in keys]}
        kwargs: dict[str, Any] = {"full_feature_names": True, "request_time": hours(now)}
        got = client.get_online_features(request, features, **kwargs)
        assert got.schema.names == [
            "k1",
            "k2",
            f"a_{table_a.split('_', 1)[1]}__value",
            f"b_{table_b.split('_', 1)[1]}__value",
            f"a_{table_a.split('_', 1)[1]}__ts",
            f"b_{table_b.split('_', 1)[1]}__when",
        ]
        assert as_rows(got) == reference(keys, a, b, now)
        assert as_rows(client.get_online_features(request, features, apply_ttl=False, **kwargs)) == reference(
            keys, a, b, now, ttl=False
        )
        # A point lookup into history: the TTL counts back from as_of.
        past = client.get_online_features(request, features, as_of=hours(as_of), full_feature_names=True)
        assert as_rows(past) == reference(keys, a, b, as_of, until=as_of)
        # One table at a time, and one entity at a time: the answers the index serves without assembling columns.
        expected = reference(keys, a, b, now)
        alone_a = client.get_online_features(request, features[:1], **kwargs)
        assert alone_a.rename_columns(["k1", "k2", "a_value", "a__ts"]).to_pylist() == [
            {c: row[c] for c in ("k1", "k2", "a_value", "a__ts")} for row in expected
        ]
        for i, (k1, k2) in enumerate(keys[:3]):
            one_a = client.get_online_features({"k1": [k1], "k2": [k2]}, features[:1], **kwargs)
            assert one_a.schema == alone_a.schema
            assert one_a.to_pylist() == alone_a.slice(i, 1).to_pylist()
            one_b = client.get_online_features({"k1": [k1]}, features[1:], **kwargs)
            assert one_b.rename_columns(["k1", "b_value", "b__when"]).to_pylist() == [
                {c: expected[i][c] for c in ("k1", "b_value", "b__when")}
            ]
        # Without a request time, lookups go over sessions (streams kept open): the same answers as calls.
        lookups = [(request, features), (request, features[:1]), ({"k1": request["k1"]}, features[1:])]
        lookups += [({"k1": [k1], "k2": [k2]}, features) for k1, k2 in keys[:3]]
        with FeatureClient(location, online_sessions=False) as calls:
            for entities, wanted in lookups:
                options: dict[str, Any] = {"apply_ttl": False, "full_feature_names": True}
                over_session = client.get_online_features(entities, wanted, **options)
                assert over_session.equals(calls.get_online_features(entities, wanted, **options), True)


def driver_rows(ids: list[int], hour: int, value: float, created: int = 0) -> pa.Table:
    return pa.table(
        {
            "driver_id": pa.array(ids, pa.int64()),
            "ts": pa.array([hours(hour)] * len(ids), pa.timestamp("us", tz="UTC")),
            "created": pa.array([hours(created)] * len(ids), pa.timestamp("us", tz="UTC")),
            "rate": pa.array([value + i for i in ids], pa.float64()),
        }
    )


def write_drivers(client: FeatureClient, table: str, data: pa.Table, **kwargs: Any) -> int:
    result = client.write(table, data, entity_keys=["driver_id"], event_time="ts", created_time="created", **kwargs)
    return result.snapshot_id


def rates(client: FeatureClient, table: str, ids: list[int]) -> list[Any]:
    got = client.get_online_features({"driver_id": ids}, [f"{table}:rate"], apply_ttl=False)
    return got.column("rate").to_pylist()


def indexed_snapshot(client: FeatureClient, table: str) -> int | None:
    online = client.describe(table)["online"]
    return online["snapshot_id"] if online else None


def test_refreshes_apply_appends_incrementally_and_rebuild_otherwise(server: str, backend: dict[str, str]) -> None:
    table = f"tests.online_{suffix()}"
    ids = list(range(50))
    with FeatureClient(server) as client:
        write_drivers(client, table, driver_rows(ids, 1, 100.0))
        assert rates(client, table, [0, 49, 50]) == [100.0, 149.0, None]
        built = client.describe(table)["online"]
        assert built["entities"] == 50 and built["rebuilds"] == 0 and built["appends"] == 0

        # Appends: newer rows win, older ones do not, equal times go to the later created time.
        write_drivers(client, table, driver_rows(ids[:10], 2, 200.0))
        write_drivers(client, table, driver_rows(ids[10:20], 0, 300.0))
        write_drivers(client, table, driver_rows(ids[20:30], 1, 400.0, created=1))
        last = write_drivers(client, table, driver_rows([60, 61], 1, 500.0))
        wait_until(lambda: indexed_snapshot(client, table) == last, what="the index to reach the last append")
        expected = [200.0 + i for i in ids[:10]] + [100.0 + i for i in ids[10:20]]
        expected += [400.0 + i for i in ids[20:30]] + [100.0 + i for i in ids[30:]] + [560.0, 561.0]
        assert rates(client, table, ids + [60, 61]) == expected
        online = client.describe(table)["online"]
        assert online["rebuilds"] == 0 and online["appends"] >= 1 and online["entities"] == 52

        # The incremental result equals a full build on a fresh server.
        fresh = start_server(backend)
        try:
            with FeatureClient(f"grpc://127.0.0.1:{fresh.port}") as other:
                assert rates(other, table, ids + [60, 61]) == expected
        finally:
            fresh.shutdown()

        # An overwrite replaces everything: the index is rebuilt, vanished entities read as nulls.
        last = write_drivers(client, table, driver_rows([1, 2], 3, 700.0), mode="overwrite")
        wait_until(lambda: indexed_snapshot(client, table) == last, what="the index to reach the overwrite")
        assert rates(client, table, [1, 2, 3]) == [701.0, 702.0, None]
        assert client.describe(table)["online"]["rebuilds"] >= 1


def test_the_catalog_pointer_polled_by_refreshes_and_reads_is_the_tables(server: str, backend: dict[str, str]) -> None:
    """SQL catalogs say where a table's metadata is without reading it (what each refresh poll asks
    first), REST catalogs in their loadTable answer, whose metadata is parsed only when it changed."""
    table = f"tests.pointer_{suffix()}"
    catalog = FeatureCatalog("default", backend)
    assert catalog.metadata_location(table) is None  # no such table yet
    with FeatureClient(server) as client:
        write_drivers(client, table, driver_rows([1], 1, 1.0))
        first = catalog.load(table).metadata_location
        write_drivers(client, table, driver_rows([1], 2, 1.0))
    second = catalog.load(table).metadata_location
    assert first != second
    assert catalog.metadata_location(table) == second
    # Reads reuse the loaded table while the pointer stands, and follow it when it moves.
    read = catalog.read(table)
    assert read.metadata_location == second
    assert catalog.read(table) is read
    with FeatureClient(server) as client:
        write_drivers(client, table, driver_rows([1], 3, 1.0))
    assert catalog.read(table).metadata_location == catalog.load(table).metadata_location != second


def test_a_put_through_another_replica_is_visible(server: str, second_server: str) -> None:
    table = f"tests.online_{suffix()}"
    with FeatureClient(server) as reader, FeatureClient(second_server) as writer:
        write_drivers(writer, table, driver_rows([1, 2], 1, 10.0))
        assert rates(reader, table, [1, 2]) == [11.0, 12.0]
        write_drivers(writer, table, driver_rows([2, 3], 2, 20.0))
        wait_until(lambda: rates(reader, table, [1, 2, 3]) == [11.0, 22.0, 23.0], what="the other replica's put")


def test_reads_during_writes_see_complete_rows(location: str) -> None:
    table = f"online.busy_{suffix()}"
    ids = list(range(200))
    errors: list[str] = []
    done = threading.Event()
    with FeatureClient(location) as client:
        write_drivers(client, table, driver_rows(ids, 0, 0.0))

        def read() -> None:
            with FeatureClient(location) as mine:
                while not done.is_set():
                    got = mine.get_online_features({"driver_id": ids}, [f"{table}:rate"], apply_ttl=False)
                    for i, rate, ts in zip(ids, got.column("rate").to_pylist(), got.column(2).to_pylist(), strict=True):
                        # The write at hour h sets rate = 1000 h + id: value and time must come from one row.
                        if rate is None or ts != hours(round((rate - i) / 1000)):
                            errors.append(f"driver {i}: rate {rate} with time {ts}")

        readers = [threading.Thread(target=read) for _ in range(3)]
        for thread in readers:
            thread.start()
        for hour in range(1, 8):
            final = write_drivers(client, table, driver_rows(ids[hour * 10 :], hour, 1000.0 * hour))
        wait_until(lambda: indexed_snapshot(client, table) == final, what="the last write")
        done.set()
        for thread in readers:
            thread.join()
        assert errors == []
        assert rates(client, table, [0, 199]) == [0.0, 7199.0]


def test_the_memory_cap_refuses_a_table(catalog_properties: dict[str, str]) -> None:
    server = start_server(catalog_properties, online_max_bytes=10_000)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            small, large = f"online.small_{suffix()}", f"online.large_{suffix()}"
            write_drivers(client, small, driver_rows([1], 1, 1.0))
            write_drivers(client, large, driver_rows(list(range(5000)), 1, 1.0))
            assert rates(client, small, [1]) == [2.0]
            with pytest.raises(ResourceExhaustedError, match="memory cap"):
                rates(client, large, [1])
            assert rates(client, small, [1]) == [2.0]  # the server still serves the rest
            assert client.health()["online"]["tables"] == 1
    finally:
        server.shutdown()


def test_tables_named_at_start_are_indexed_before_any_request(
    location: str, catalog_properties: dict[str, str]
) -> None:
    table = f"online.preload_{suffix()}"
    with FeatureClient(location) as writer:
        write_drivers(writer, table, driver_rows([1, 2, 3], 1, 1.0))
    server = start_server(catalog_properties, online_tables=[table])
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            wait_until(lambda: client.describe(table)["online"] is not None, what="the start-up build")
            assert client.describe(table)["online"]["entities"] == 3
    finally:
        server.shutdown()


def test_large_batches_stream_and_match_inline(location: str) -> None:
    table = f"online.many_{suffix()}"
    with FeatureClient(location) as client:
        write_drivers(client, table, driver_rows(list(range(0, 30_000, 2)), 1, 0.0))
        keys = list(range(25_000))  # more than fit inline: streamed over do_exchange
        streamed = client.get_online_features({"driver_id": keys}, [f"{table}:rate"], apply_ttl=False)
        assert streamed.num_rows == 25_000
        assert streamed.column("rate").to_pylist() == [float(k) if k % 2 == 0 else None for k in keys]
        inline = client.get_online_features({"driver_id": keys[:1000]}, [f"{table}:rate"], apply_ttl=False)
        assert inline.to_pylist() == streamed.slice(0, 1000).to_pylist()
        frame = pd.DataFrame({"driver_id": keys[:10]})  # small frames go inline too, readers always stream
        assert client.get_online_features(frame, [f"{table}:rate"], apply_ttl=False).equals(inline.slice(0, 10))
        reader = pa.RecordBatchReader.from_batches(
            pa.schema([("driver_id", pa.int64())]), [pa.record_batch([keys[:10]], names=["driver_id"])]
        )
        assert client.get_online_features(reader, [f"{table}:rate"], apply_ttl=False).equals(inline.slice(0, 10))


def test_ttl_counts_from_now_unless_switched_off(location: str) -> None:
    table = f"online.ttl_{suffix()}"
    now = dt.datetime.now(UTC)
    with FeatureClient(location) as client:
        data = pa.table(
            {
                "driver_id": pa.array([1, 2], pa.int64()),
                "ts": pa.array([now - dt.timedelta(minutes=5), now - dt.timedelta(hours=3)], pa.timestamp("us", "UTC")),
                "rate": [1.0, 2.0],
            }
        )
        client.write(table, data, entity_keys=["driver_id"], event_time="ts", ttl=dt.timedelta(hours=1))
        fresh = client.get_online_features({"driver_id": [1, 2]}, [f"{table}:rate"])
        assert fresh.column("rate").to_pylist() == [1.0, None]
        kept = client.get_online_features({"driver_id": [1, 2]}, [f"{table}:rate"], apply_ttl=False)
        assert kept.column("rate").to_pylist() == [1.0, 2.0]


def test_tables_must_agree_on_key_types(location: str) -> None:
    name = suffix()
    with FeatureClient(location) as client:
        client.write(
            f"online.ints_{name}",
            pa.table({"id": [1], "ts": pa.array([hours(0)], pa.timestamp("us", "UTC")), "x": [1.0]}),
            entity_keys=["id"],
            event_time="ts",
        )
        client.write(
            f"online.strs_{name}",
            pa.table({"id": ["1"], "ts": pa.array([hours(0)], pa.timestamp("us", "UTC")), "y": [1.0]}),
            entity_keys=["id"],
            event_time="ts",
        )
        with pytest.raises(InvalidRequestError, match="key 'id' is int64 in .* but string in"):
            client.get_online_features({"id": [1]}, [f"online.ints_{name}:x", f"online.strs_{name}:y"])


def test_a_dropped_table_loses_its_index(location: str, catalog_properties: dict[str, str]) -> None:
    table = f"online.dropped_{suffix()}"
    with FeatureClient(location) as client:
        write_drivers(client, table, driver_rows([1], 1, 1.0))
        assert rates(client, table, [1]) == [2.0]
        indexed = client.health()["online"]["tables"]
        load_catalog("default", **catalog_properties).drop_table(tuple(table.split(".")))
        wait_until(lambda: client.health()["online"]["tables"] == indexed - 1, what="the index to be dropped")
        with pytest.raises(NotFoundError, match="does not exist"):
            rates(client, table, [1])


def test_a_column_added_to_a_feature_table_is_served(location: str, catalog_properties: dict[str, str]) -> None:
    """A feature column added to the schema (pyiceberg's `update_schema`, no new snapshot) is null for the rows
    written before it, and served once rows carry it; the index's rebuild asked for the column in files that
    predate it, and failed (DuckDB: column not found), leaving the index behind its table."""
    table = f"online.evolved_{suffix()}"
    with FeatureClient(location) as client:
        write_drivers(client, table, driver_rows([1, 2], 1, 1.0))
        assert rates(client, table, [1, 2]) == [2.0, 3.0]
        with load_catalog("default", **catalog_properties).load_table(table).update_schema() as update:
            update.add_column("bonus", DoubleType())

        def bonus(ids: list[int]) -> list[Any]:
            got = client.get_online_features({"driver_id": ids}, [f"{table}:rate", f"{table}:bonus"], apply_ttl=False)
            return list(zip(got.column("rate").to_pylist(), got.column("bonus").to_pylist(), strict=True))

        def served() -> bool:
            try:
                return bonus([1, 2]) == [(2.0, None), (3.0, None)]
            except NotFoundError:  # the index has not caught up with the new schema yet
                return False

        wait_until(served, what="the added column to be served")
        later = driver_rows([2], 2, 5.0).append_column("bonus", pa.array([0.5]))
        write_drivers(client, table, later)
        wait_until(lambda: bonus([1, 2]) == [(2.0, None), (7.0, 0.5)], what="the rows with the column to be served")


def test_a_new_shape_is_rebuilt_from_the_planners_read_alone(
    catalog_properties: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refresh planned in another process (the write process; here the store's own `plan` stands in for it) that
    read the whole table after more than appends is used as it is when the table's definition changed too (a TTL
    set, rows deleted): the serving side threw it away and read the whole table again itself."""
    server = start_server(catalog_properties, online_refresh_seconds=3600)  # refreshed by this test alone
    table = f"online.reshaped_{suffix()}"
    try:
        store = server.parts.store
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            write_drivers(client, table, driver_rows([1, 2, 3], 1, 1.0))
            assert rates(client, table, [1, 2, 3]) == [2.0, 3.0, 4.0]
            wait_until(lambda: store.refresh(table) == "current", what="the write's refresh to end")
            iceberg = load_catalog("default", **catalog_properties).load_table(table)
            with iceberg.transaction() as change:
                change.set_properties({"feature.ttl-seconds": "86400"})
                change.delete("driver_id = 2")
            whole: list[str] = []
            read = store._read_latest

            def counted(*args: Any) -> Any:
                whole.extend(["whole table"] if args[3] is None else [])
                return read(*args)

            monkeypatch.setattr(store, "_read_latest", counted)
            monkeypatch.setattr(store, "planner", store.plan)
            assert store.refresh(table) == "rebuilt in the write process"
            assert whole == ["whole table"]
            assert rates(client, table, [1, 2, 3]) == [2.0, None, 4.0]
            expired = client.get_online_features({"driver_id": [1]}, [f"{table}:rate"])  # the TTL now applies
            assert expired.column("rate").to_pylist() == [None]
    finally:
        server.shutdown()


def test_a_refresh_whose_snapshots_in_between_expire_meanwhile_rebuilds(
    catalog_properties: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Following the appends since the indexed snapshot reads the manifests of the snapshots in between, which no read
    holds: an expiry that deletes them meanwhile (brought into that moment by wrapping `appended_since`; the expiry is
    real) has the index rebuilt from the current snapshot at once, as when they expired before, not the refresh fail
    (an ERROR in the log, `online.error` in `describe`, the appends served only from the next poll on)."""
    server = start_server(catalog_properties, online_refresh_seconds=3600)  # refreshed by this test alone
    table = f"online.expired_between_{suffix()}"
    try:
        store = server.parts.store
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            write_drivers(client, table, driver_rows([1], 1, 1.0))
            assert rates(client, table, [1, 2, 3]) == [2.0, None, None]
            wait_until(lambda: store.refresh(table) == "current", what="the write's refresh to end")
            iceberg = load_catalog("default", **catalog_properties).load_table(table)
            for driver in (2, 3):  # appends by another writer (another engine, say): this server is not told
                iceberg.append(driver_rows([driver], 1, 1.0).cast(iceberg.schema().as_arrow()))
            expired: list[dict[str, Any]] = []
            real, once = index.appended_since, threading.Lock()

            def expired_meanwhile(*args: Any, **kwargs: Any) -> Any:
                if once.acquire(blocking=False):  # the first call: the expiry's commit wakes the refresh thread too
                    now = dt.datetime.now(dt.timezone.utc)
                    expired.append(client.expire_snapshots(table, older_than=now, retain_last=1))
                return real(*args, **kwargs)

            monkeypatch.setattr(index, "appended_since", expired_meanwhile)
            assert store.refresh(table) == "rebuilt"
            assert len(expired[0]["expired"]) == 2  # the indexed snapshot and the one in between
            assert rates(client, table, [1, 2, 3]) == [2.0, 3.0, 4.0]
            assert client.describe(table)["online"]["error"] is None
    finally:
        server.shutdown()


def test_a_failed_refresh_is_described_without_the_servers_paths(
    catalog_properties: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A refresh that fails (here a data file lost from storage: neither its rows nor the whole table can be read)
    keeps the last index serving, logs the failure once with its whole text, and shows `describe` what a client may
    see of it: its kind, no server path."""
    server = start_server(catalog_properties, online_refresh_seconds=REFRESH_SECONDS)
    table = f"online.lost_{suffix()}"
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            write_drivers(client, table, driver_rows([1], 1, 1.0))
            assert rates(client, table, [1, 2]) == [2.0, None]
            iceberg = load_catalog("default", **catalog_properties).load_table(table)
            iceberg.append(driver_rows([2], 1, 1.0).cast(iceberg.schema().as_arrow()))  # not through this server
            lost = Path(
                iceberg.current_snapshot()
                .manifests(iceberg.io)[0]
                .fetch_manifest_entry(iceberg.io)[0]
                .data_file.file_path.removeprefix("file://")
            )
            lost.unlink()
            wait_until(lambda: client.describe(table)["online"]["error"] is not None, what="the refresh to fail")
            error = client.describe(table)["online"]["error"]  # DuckDB's error, which read the whole table
            assert re.fullmatch(r"internal error \(\w+\); the server's log has the details", error), error
            assert rates(client, table, [1, 2]) == [2.0, None]  # the last index serves on
        failed = [r for r in caplog.records if r.getMessage().startswith(f"online index {table}: refresh failed")]
        assert len(failed) == 1 and str(lost) in caplog.text
    finally:
        server.shutdown()


def test_sessions_outlive_a_server_restart_and_a_table_recreated(catalog_properties: dict[str, str]) -> None:
    """A client's open session breaks when its server restarts, or ends when a table's columns change:
    the next lookup opens a new session and answers, whatever happened in between."""
    table = f"online.recreated_{suffix()}"
    server = start_server(catalog_properties, online_refresh_seconds=REFRESH_SECONDS)
    port = server.port
    with FeatureClient(f"grpc://127.0.0.1:{port}") as client:
        write_drivers(client, table, driver_rows([1, 2], 1, 1.0))
        assert rates(client, table, [1]) == [2.0]
        server.shutdown()
        server = start_server(catalog_properties, online_refresh_seconds=REFRESH_SECONDS, port=port)
        try:
            assert rates(client, table, [2]) == [3.0]
            load_catalog("default", **catalog_properties).drop_table(tuple(table.split(".")))
            recreated = driver_rows([1], 2, 0.0).set_column(3, "rate", pa.array(["fast"]))
            write_drivers(client, table, recreated)
            # The open session answered float rates: once the server re-indexes, it ends that call.
            wait_until(lambda: rates(client, table, [1]) == ["fast"], what="the recreated table's rows")
        finally:
            server.shutdown()


# Appends to one index: batches of (key, event hour, created hour or None, value), each key once per batch (a
# refresh applies the latest row per key of the appended files).
appends = st.lists(
    st.lists(
        st.tuples(st.integers(0, 30), st.integers(0, 5), st.none() | st.integers(0, 3), st.integers(-99, 99)),
        max_size=25,
        unique_by=lambda row: row[0],
    ),
    max_size=12,
)


def index_rows(rows: list[tuple[int, int, int | None, int]]) -> pa.Table:
    return pa.table(
        {
            "k": pa.array([r[0] for r in rows], pa.int64()),
            "ts": pa.array([hours(r[1]) for r in rows], pa.timestamp("us", tz="UTC")),
            "created": pa.array([hours(r[2]) for r in rows], pa.timestamp("us", tz="UTC")),
            "value": pa.array([r[3] for r in rows], pa.int64()),
        }
    )


@settings(max_examples=60, deadline=None)
# Always tried: keys replaced often enough to compact (more replaced rows than entities), in steps of 2.
@example(batches=[[(k, hour, None, 10 * hour + k) for k in range(5)] for hour in range(4)], tail_rows=3, compact_step=2)
@given(batches=appends, tail_rows=st.integers(1, 40), compact_step=st.integers(1, 9))
def test_appends_to_an_index_match_reference(batches: list, tail_rows: int, compact_step: int) -> None:
    """Incremental refreshes (`OnlineIndex.apply`, with the rows kept as a base and a few tail chunks, merged and
    compacted `COMPACT_STEP` entities at a time on the way) answer what the latest row per key of everything appended
    says: the later event time, a tie to the later created time (a null one loses), a full tie to the later append."""
    spec = FeatureSpec(("k",), "ts", "created")
    first = index_rows(batches[0] if batches else [])
    state = IndexState(1, 0, spec, Rows.of(first, spec), {r[0]: i for i, r in enumerate(batches[0] if batches else [])})
    index = OnlineIndex("t", state, 0.0, "empty")
    latest: dict[int, tuple[int, int, int]] = {}
    for number, batch in enumerate(batches):
        for key, event, created, value in batch:
            rank = (event, -1 if created is None else created, number)
            if key not in latest or rank >= latest[key][:3]:
                latest[key] = (*rank, value)
        if number:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr("flight_server.online.index.TAIL_ROWS", tail_rows)
                patch.setattr("flight_server.online.index.COMPACT_STEP", compact_step)
                index.apply(index_rows(batch), number + 1)
        assert index.state.rows.table.column(0).num_chunks <= TAIL_CHUNKS + 1
        keys = list(range(32))
        rows, positions = index.lookup(keys)
        got = [None if p == MISSING else rows.table.column("value")[int(p)].as_py() for p in positions]
        assert got == [latest[k][3] if k in latest else None for k in keys]
    assert len(index.state.positions) == len(latest)


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(0, 12), min_size=1, max_size=TAIL_CHUNKS + 1), data=st.data())
def test_rows_taken_from_chunks_match_one_take_of_the_whole(sizes: list[int], data: st.DataObject) -> None:
    """A lookup of several entities takes their rows from an index of several chunks (base and tails, empty ones
    too) chunk by chunk (`Answer.take`: Arrow's own take copies the whole table first): the same rows, in request
    order, duplicates kept, a row of nulls for each missing entity (unknown, or known but past the TTL cutoff, which
    `lookup` marks missing at a valid position), as one take from the table in one chunk. With the column types
    features have, a dictionary column's chunks each with a dictionary of their own, as separate appends give."""
    rows = sum(sizes)
    categories = ["abcde"[(i // 2) % 5] if i % 7 else None for i in range(rows)]  # each chunk sees other values
    whole = pa.table(
        {
            "k": pa.array(range(rows), pa.int64()),
            "s": pa.array([str(i) if i % 3 else None for i in range(rows)], pa.string()),
            "ts": pa.array([i * 1_000_003 if i % 4 else None for i in range(rows)], pa.timestamp("us", tz="UTC")),
            "l": pa.array([list(range(i % 4)) if i % 5 else None for i in range(rows)], pa.list_(pa.int64())),
            "d": pa.array(categories, pa.string()).dictionary_encode(),
        }
    )
    chunks, start = [], 0
    for size in sizes:
        own = pa.array(categories[start : start + size], pa.string()).dictionary_encode()
        chunks.append(whole.slice(start, size).set_column(4, "d", own))
        start += size
    wanted = data.draw(st.lists(st.integers(MISSING, rows - 1) if rows else st.just(MISSING), max_size=20))
    positions = np.array(wanted, np.int64)
    expired = np.array(data.draw(st.lists(st.booleans(), min_size=len(wanted), max_size=len(wanted))), bool)
    missing = (positions == MISSING) | expired
    got = Answer(pa.concat_tables(chunks)).take(positions, missing)
    expected = whole.take(pa.array(positions, mask=missing))
    assert got.schema == expected.schema
    assert got.drop_columns(["d"]).equals(expected.drop_columns(["d"]))
    assert got["d"].to_pylist() == expected["d"].to_pylist()


def test_refreshes_larger_than_the_tail_leave_the_base_uncopied(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refresh past `TAIL_ROWS` adds a tail chunk and leaves the base where it is (copying it at every such refresh
    cost 0.94 s for a 5M-row index); the tail is merged into the base once it passes an eighth of it; past
    `TAIL_CHUNKS` chunks the tail alone is combined."""
    monkeypatch.setattr("flight_server.online.index.TAIL_ROWS", 100)
    spec = FeatureSpec(("k",), "ts", "created")
    rows = Rows.of(index_rows([(k, 1, None, k) for k in range(8_000)]), spec)
    base = rows.table.column("value").chunk(0).buffers()[1].address
    for step in range(1, 5):  # 4 refreshes of 200 rows each: 800 rows of tail, under 8,000 / 8
        rows = rows.extend(Rows.of(index_rows([(k, 2, None, -k) for k in range(200 * step, 200 * step + 200)]), spec))
        assert rows.table.column("value").chunk(0).buffers()[1].address == base
        assert rows.table.column(0).num_chunks == step + 1
    rows = rows.extend(Rows.of(index_rows([(k, 3, None, 5) for k in range(200)]), spec))  # past TAIL_CHUNKS
    assert [len(c) for c in rows.table.column(0).chunks] == [8_000, 1_000]  # the tail in one chunk
    assert rows.table.column("value").chunk(0).buffers()[1].address == base
    rows = rows.extend(Rows.of(index_rows([(k, 3, None, 7) for k in range(1_000)]), spec))  # past an eighth: merged
    assert rows.table.column(0).num_chunks == 1
    assert rows.table.num_rows == len(rows.event_us) == len(rows.created_us) == 10_000
    assert rows.table.column("value").to_pylist()[-1_201:] == [-999] + [5] * 200 + [7] * 1_000
