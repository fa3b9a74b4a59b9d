"""Entity tables split once for all the endpoints of a training set (`training/entities.py` EntitySplits): each
endpoint must give exactly the rows, in exactly the order, that it gives when it reads its part by itself."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flight_client import FeatureClient
from flight_client.plans import Endpoint, ReadPlan, plan_training_set
from flight_server.training.entities import PART, EntitySplits, split_sql
from flight_server.training.plan import partition_expression
from flight_server.transport.service import FeatureFlightServer
from tests.conftest import sqlite_catalog, start_server

BASE = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
FEATURES = ["splits.rates:rate", "splits.rates:level"]
_names = itertools.count()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FeatureFlightServer, FeatureFlightServer]]:
    """Two servers on one catalog: one splitting entity tables once (the default), one whose endpoints each read
    their part by themselves (the reference)."""
    catalog = sqlite_catalog(Path(tmp_path_factory.mktemp("splits")))
    split, alone = start_server(catalog), start_server(catalog)
    alone.parts.training.splits = EntitySplits(0)
    with FeatureClient(f"grpc://127.0.0.1:{split.port}") as client:
        client.write(
            "splits.rates",
            pa.table(
                {
                    "k": pa.array([k % 7 for k in range(60)], pa.int64()),
                    "ts": pa.array([BASE + dt.timedelta(hours=h % 13) for h in range(60)], pa.timestamp("us", "UTC")),
                    "rate": [float(i) for i in range(60)],
                    "level": [i % 4 for i in range(60)],
                }
            ),
            entity_keys=["k"],
            event_time="ts",
        )
    yield split, alone
    split.shutdown()
    alone.shutdown()


def location(server: FeatureFlightServer) -> str:
    return f"grpc://127.0.0.1:{server.port}"


def read(server: FeatureFlightServer, endpoint: Endpoint) -> pa.Table:
    with flight.connect(location(server)) as client:
        return client.do_get(flight.Ticket(endpoint.ticket)).read_all()


def write_entities(server: FeatureFlightServer, rows: list[tuple[int, int, float | None, str | None]]) -> str:
    name = f"splits.entities_{next(_names)}"
    table = pa.table(
        {
            "k": pa.array([r[0] for r in rows], pa.int64()),
            "event_timestamp": pa.array([BASE + dt.timedelta(hours=r[1]) for r in rows], pa.timestamp("us", "UTC")),
            "label": pa.array([r[2] for r in rows], pa.float64()),
            "note": pa.array([r[3] for r in rows], pa.string()),
        }
    )
    with FeatureClient(location(server)) as client:
        client.write(name, table, entity_keys=["k"], event_time="event_timestamp")
    return name


@contextlib.contextmanager
def splits_of(server: FeatureFlightServer, max_bytes: int) -> Iterator[EntitySplits]:
    """The server's entity splits replaced by ones within `max_bytes` (a budget of their own) for a while."""
    kept = server.parts.training.splits
    server.parts.training.splits = EntitySplits(max_bytes)
    try:
        yield server.parts.training.splits
    finally:
        server.parts.training.splits = kept


def assert_read_as_alone(servers: tuple[FeatureFlightServer, FeatureFlightServer], plan: ReadPlan) -> None:
    """Every endpoint of `plan` gives the rows, in the order, that it gives read alone."""
    split, alone = servers
    for endpoint in plan.endpoints:
        assert isinstance(endpoint, Endpoint)
        assert read(split, endpoint).equals(read(alone, endpoint))


entity_rows = st.lists(
    st.tuples(
        st.integers(0, 9),  # keys and hours few, so that ties in time and in key are common
        st.integers(0, 15),
        st.none() | st.sampled_from([0.0, 1.0, -2.5]),
        st.none() | st.sampled_from(["a", "b"]),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=entity_rows, partitions=st.integers(1, 6), entity_filter=st.sampled_from([None, "k >= 3", "label = 1"]))
def test_each_endpoint_reads_what_it_reads_alone(
    servers: tuple[FeatureFlightServer, FeatureFlightServer],
    rows: list[tuple[int, int, float | None, str | None]],
    partitions: int,
    entity_filter: str | None,
) -> None:
    split, alone = servers
    name = write_entities(split, rows)
    plan = plan_training_set(location(split), name, FEATURES, partitions=partitions, entity_filter=entity_filter)
    builds = split.parts.training.splits.builds
    parts = [read(split, e) for e in plan.endpoints if isinstance(e, Endpoint)]
    assert len(parts) == len(plan.endpoints)
    for got, endpoint in zip(parts, plan.endpoints, strict=True):
        assert isinstance(endpoint, Endpoint)
        assert got.equals(read(alone, endpoint))  # the same rows, in the same order
    kept = [r for r in rows if entity_filter is None or (r[0] >= 3 if "k" in entity_filter else r[2] == 1)]
    assert sum(p.num_rows for p in parts) == len(kept)
    assert split.parts.training.splits.builds - builds == (len(plan.endpoints) > 1)  # split once, if at all


def test_split_once_for_every_endpoint_and_epoch(servers: tuple[FeatureFlightServer, FeatureFlightServer]) -> None:
    split, alone = servers
    splits = split.parts.training.splits
    name = write_entities(split, [(k % 10, k % 16, float(k % 3), "n") for k in range(200)])
    plan = plan_training_set(location(split), name, FEATURES, partitions=4)
    endpoints = [e for e in plan.endpoints if isinstance(e, Endpoint)]
    builds = splits.builds
    with ThreadPoolExecutor(4) as pool:  # the endpoints of an epoch come together, as read_flight sends them
        first = list(pool.map(lambda e: read(split, e), endpoints))
    assert splits.builds == builds + 1
    second = [read(split, e) for e in endpoints]  # the next epoch
    assert splits.builds == builds + 1
    expected = [read(alone, e) for e in endpoints]
    assert all(a.equals(b) and b.equals(c) for a, b, c in zip(first, second, expected, strict=True))
    assert sum(t.num_rows for t in first) == 200

    # Other partitions are another split; a new snapshot of the entity table too, and its rows are read.
    plan = plan_training_set(location(split), name, FEATURES, partitions=3)
    assert sum(read(split, e).num_rows for e in plan.endpoints if isinstance(e, Endpoint)) == 200
    assert splits.builds == builds + 2
    with FeatureClient(location(split)) as client:
        client.write(name, pa.table({"k": [1], "event_timestamp": [BASE], "label": [0.5], "note": ["new"]}))
    plan = plan_training_set(location(split), name, FEATURES, partitions=4)
    again = [read(split, e) for e in plan.endpoints if isinstance(e, Endpoint)]
    assert sum(t.num_rows for t in again) == 201
    assert splits.builds == builds + 3
    assert split.parts.memory.stats()["caches"]["entity_splits"]["bytes"] > 0


def test_a_split_that_does_not_fit_is_not_made(servers: tuple[FeatureFlightServer, FeatureFlightServer]) -> None:
    split, alone = servers
    with splits_of(split, 1024) as splits:  # bytes: less than the table's rows
        name = write_entities(split, [(k % 10, k % 16, None, "x" * (k % 5)) for k in range(300)])
        assert_read_as_alone(servers, plan_training_set(location(split), name, FEATURES, partitions=3))
        assert splits.builds == 0


def test_a_split_never_evicts_the_index_its_training_set_reads(tmp_path: Path) -> None:
    """A budget with room for the training set's index but not for the split too: the split is not made, rather
    than evicting the index (the two would evict each other endpoint after endpoint, every epoch)."""
    catalog = sqlite_catalog(tmp_path)
    probe = start_server(catalog)
    try:
        with FeatureClient(location(probe)) as client:
            features = pa.table(
                {
                    "k": pa.array(range(20_000), pa.int64()),
                    "ts": pa.array([BASE] * 20_000, pa.timestamp("us", "UTC")),
                    "rate": pa.array(range(20_000), pa.float64()),
                    "level": pa.array(range(20_000), pa.int64()),
                }
            )
            client.write("splits.rates", features, entity_keys=["k"], event_time="ts")
        name = write_entities(probe, [(k, k % 16, 1.0, None) for k in range(20_000)])
        plan = plan_training_set(location(probe), name, FEATURES, partitions=4)
        alone = [read(probe, e) for e in plan.endpoints if isinstance(e, Endpoint)]
        caches = probe.parts.memory.stats()["caches"]
        index, split = caches["training_set"]["bytes"], caches["entity_splits"]["bytes"]
        assert index > 0 and split > 0
    finally:
        probe.shutdown()
    server = start_server(catalog, memory_budget_bytes=index + split // 2)
    try:
        plan = plan_training_set(location(server), name, FEATURES, partitions=4)
        for _ in range(2):  # epochs
            got = [read(server, e) for e in plan.endpoints if isinstance(e, Endpoint)]
            assert all(a.equals(b) for a, b in zip(got, alone, strict=True))
        assert (server.parts.training.cache.builds, server.parts.training.splits.builds) == (1, 0)
        assert server.parts.memory.stats()["caches"]["training_set"]["evictions"]["budget"] == 0
    finally:
        server.shutdown()


def test_a_split_larger_than_its_estimate_is_made_once(
    servers: tuple[FeatureFlightServer, FeatureFlightServer],
) -> None:
    """Long strings pass the estimate (and the cap): the split made by the first endpoint is not kept, and the
    others read their parts by themselves instead of each making the whole split again."""
    split, alone = servers
    with splits_of(split, 300_000) as splits:  # bytes: above the estimate, below the rows' real size
        name = write_entities(split, [(k % 10, k % 16, None, f"{k:0500d}") for k in range(2_000)])
        plan = plan_training_set(location(split), name, FEATURES, partitions=4)
        for _ in range(2):  # epochs
            assert_read_as_alone(servers, plan)
        assert splits.builds == 1


def test_the_part_column_is_a_bigint() -> None:
    """Parts as int64, not HUGEINT (decimal128 in Arrow, a Python Decimal a row for numpy)."""
    part = partition_expression("", ("k",), [pa.int64()])
    with duckdb.connect() as db:
        db.execute("CREATE TABLE t AS SELECT range AS k FROM range(1000)")
        split = db.execute(split_sql('"k"', "FROM t WHERE true", '"k"', part), [4]).to_arrow_table()
    assert split.schema.field(PART).type == pa.int64()
    assert set(split.column(PART).to_pylist()) == {0, 1, 2, 3}
    assert split.column(PART).to_pylist() == sorted(split.column(PART).to_pylist())
