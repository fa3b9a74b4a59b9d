"""Bounded request cost: filters too large to parse cheaply are refused before parsing, and pinned
snapshots must name tables the request uses."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from pyiceberg.schema import Schema
from pyiceberg.types import LongType, NestedField, StringType

from flight_client import FeatureClient, InvalidRequestError, PermissionDeniedError, ResourceExhaustedError
from flight_server.base.filters import (
    MAX_FILTER_CHARS,
    MAX_FILTER_DEPTH,
    MAX_FILTER_OPERATORS,
    MAX_FILTER_VALUES,
    check_filter_cost,
    parse_filter,
)
from flight_server.training import join, sets
from flight_server.transport.service import FeatureFlightServer
from flight_server.wire.errors import LimitError
from flight_server.wire.reads import EntitySource, HistoricalRequest, OnlineRequest
from tests.conftest import sqlite_catalog, start_server

UTC = dt.timezone.utc
T0 = dt.datetime(2025, 1, 1, tzinfo=UTC)
SCHEMA = Schema(NestedField(1, "a", LongType()), NestedField(2, "s", StringType()))


def in_list(n: int) -> str:
    """A valid filter of `n` key values, as a client with a key set might write it (100,000 keys: 0.8 MB)."""
    return "a in (" + ", ".join(str(1_000_000 + i) for i in range(n)) + ")"


def or_chain(n: int) -> str:
    return " or ".join(f"a = {i}" for i in range(n))


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return sqlite_catalog(Path(tmp_path_factory.mktemp("bounded")))


@pytest.fixture(scope="module")
def location(catalog: dict[str, str]) -> Iterator[str]:
    """A server holding `tests.drivers` (keys 0-99) and `tests.trips` (entity rows)."""
    server = start_server(catalog)
    location = f"grpc://127.0.0.1:{server.port}"
    with FeatureClient(location) as client:
        n = 100
        times = pa.array([T0] * n, pa.timestamp("us", "UTC"))
        drivers = pa.table({"a": pa.array(range(n), pa.int64()), "ts": times, "rate": pa.array(range(n), pa.float64())})
        client.write("tests.drivers", drivers, entity_keys=["a"], event_time="ts", partition_by=[])
        trips = pa.table({"a": pa.array(range(n), pa.int64()), "event_timestamp": times})
        client.write("tests.trips", trips, entity_keys=["a"], event_time="event_timestamp", partition_by=[])
    yield location
    server.shutdown()


@pytest.mark.parametrize(
    "text, what",
    [
        (in_list(MAX_FILTER_VALUES + 1), f"{MAX_FILTER_VALUES + 1:,} values"),
        (or_chain(MAX_FILTER_OPERATORS + 2), f"{MAX_FILTER_OPERATORS + 1:,} and/or/not operators"),
        ("(" * (MAX_FILTER_DEPTH + 1) + "a = 1" + ")" * (MAX_FILTER_DEPTH + 1), "levels of parentheses"),
        ("s = '" + "x" * MAX_FILTER_CHARS + "'", f"filter of {MAX_FILTER_CHARS + 6:,} characters"),
    ],
)
def test_filters_over_a_limit_are_refused_with_the_numbers(text: str, what: str) -> None:
    with pytest.raises(LimitError, match=what) as refused:
        parse_filter(text, SCHEMA)
    assert "entity rows" in str(refused.value) and "delete(keys=...)" in str(refused.value)


def test_filters_at_the_limits_parse() -> None:
    """The largest filters allowed are legitimate: they parse, and words inside strings count as values."""
    for text in (
        in_list(MAX_FILTER_VALUES),
        or_chain(MAX_FILTER_OPERATORS + 1),
        "(" * MAX_FILTER_DEPTH + "a = 1" + ")" * MAX_FILTER_DEPTH,
        "s in (" + ", ".join(f"'{i} and ( or not'" for i in range(MAX_FILTER_VALUES)) + ")",
    ):
        parse_filter(text, SCHEMA)


def test_the_check_is_cheap() -> None:
    """Counting a 0.8 MB filter's values takes milliseconds; parsing it took 33 s of server CPU."""
    started = time.perf_counter()
    with pytest.raises(LimitError):
        check_filter_cost(in_list(100_000)[: MAX_FILTER_CHARS - 1])
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.scan("tests.drivers", filter=in_list(100_000)).read_all(),
        lambda c: c.scan("tests.drivers", filter=or_chain(30_000)).read_all(),
        lambda c: c.get_historical_features("tests.trips", ["tests.drivers:rate"], entity_filter=in_list(100_000)),
        lambda c: c.delete("tests.drivers", filter=in_list(100_000)),
    ],
    ids=["scan IN list", "scan OR chain", "training set entity filter", "delete"],
)
def test_huge_filters_are_refused_at_once(location: str, call: Callable[[FeatureClient], object]) -> None:
    """A 0.4-0.8 MB filter (under the request size limit) is refused before any parsing: at once, not after
    30-60 s of server CPU."""
    started = time.monotonic()
    with FeatureClient(location) as client, pytest.raises(ResourceExhaustedError, match="entity rows"):
        call(client)
    assert time.monotonic() - started < 5


def test_pins_of_tables_the_request_does_not_use_are_refused(location: str) -> None:
    """A typo in a pin would otherwise give an unpinned training set that cannot be reproduced."""
    features = ["tests.drivers:rate"]
    entities = {"a": [1, 2], "event_timestamp": [T0.isoformat(), T0.isoformat()]}
    with FeatureClient(location) as client:
        pins = json.loads(client.get_historical_features("tests.trips", features).schema.metadata[b"flight.snapshots"])
        good = {**pins["features"], "tests.trips": pins["entities"]["snapshot_id"]}
        assert client.get_historical_features("tests.trips", features, snapshot_ids=good).num_rows == 100
        typos = {"tests.driver": 1, "drivers": 1}  # a misspelt table; another namespace's (the default one)
        streamed = pa.table({"a": [1], "event_timestamp": pa.array([T0])})
        for rows, unused, used in (
            ("tests.trips", "['default.drivers', 'tests.driver']", "['tests.drivers', 'tests.trips']"),
            (entities, "['default.drivers', 'tests.driver', 'tests.trips']", "['tests.drivers']"),
            (streamed, "['default.drivers', 'tests.driver', 'tests.trips']", "['tests.drivers']"),
        ):
            with pytest.raises(InvalidRequestError) as refused:
                client.get_historical_features(rows, features, snapshot_ids={**good, **typos})
            expected = f"snapshot_ids pin table(s) {unused} that this request does not use; it uses {used}"
            assert str(refused.value).startswith(expected), refused.value
        with pytest.raises(InvalidRequestError, match="pin 'default.drivers' twice"):
            client.get_historical_features(entities, features, snapshot_ids={"default.drivers": 1, "drivers": 2})


def test_pins_count_as_tables_for_the_token_namespaces(tmp_path: Path) -> None:
    """A token of one namespace may not name another namespace's table in a pin either."""
    tokens = [
        {"name": "ops", "token": "ops-token-0123456789", "permissions": ["read", "write"]},
        {"name": "team", "token": "team-token-0123456789", "permissions": ["read"], "namespaces": ["team_a"]},
    ]
    server = start_server(sqlite_catalog(tmp_path), auth_tokens=tokens)
    location = f"grpc://127.0.0.1:{server.port}"
    rows = pa.table({"a": pa.array([1], pa.int64()), "ts": pa.array([T0]), "rate": [0.5]})
    try:
        with FeatureClient(location, token="ops-token-0123456789") as ops:
            for name in ("team_a.drivers", "team_b.drivers"):
                ops.write(name, rows, entity_keys=["a"], event_time="ts", partition_by=[])
            other = ops.describe("team_b.drivers")["current_snapshot_id"]
        entities = {"a": [1], "event_timestamp": [T0.isoformat()]}
        with FeatureClient(location, token="team-token-0123456789") as team:
            assert team.get_historical_features(entities, ["team_a.drivers:rate"]).column("rate").to_pylist() == [0.5]
            with pytest.raises(PermissionDeniedError, match="may not use namespace 'team_b'"):
                team.get_historical_features(entities, ["team_a.drivers:rate"], snapshot_ids={"team_b.drivers": other})
    finally:
        server.shutdown()


class SlowJoin:
    """Makes every DuckDB training-set join take minutes (a cross join of 6 billion rows in front of it) and
    reports, with events, when one starts and how it ends."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.started, self.finished = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        real_sql, real_run = join.join_sql, sets.run_historical

        def slow_sql(*args: Any) -> tuple[str, list[Any]]:
            sql, params = real_sql(*args)
            self.started.set()
            slow = "SELECT count(*) AS n FROM range(100000000) a, range(60) b WHERE (a.range * b.range) % 1000003 = 7"
            return f"WITH __slow AS ({slow}) SELECT q.* FROM ({sql}) q, __slow WHERE __slow.n >= 0", params

        def run(*args: Any) -> pa.RecordBatchReader:
            try:
                return real_run(*args)
            except BaseException as exc:
                self.error = exc
                raise
            finally:
                self.finished.set()

        monkeypatch.setattr(join, "join_sql", slow_sql)
        monkeypatch.setattr(sets, "run_historical", run)


@pytest.fixture
def duckdb_joins(
    catalog: dict[str, str], location: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[FeatureFlightServer, SlowJoin]]:
    """A server whose training sets all take the DuckDB join (no sorted indexes), made slow."""
    server = start_server(catalog, historical_cache_bytes=0)
    slow = SlowJoin(monkeypatch)
    yield server, slow
    server.shutdown()


def test_a_cancelled_exchange_interrupts_its_duckdb_join(duckdb_joins: tuple[FeatureFlightServer, SlowJoin]) -> None:
    """The client cancels a streamed training set while the server runs its join: the query stops within a
    poll, instead of running on for minutes, and the server answers the next call."""
    server, slow = duckdb_joins
    location = f"grpc://127.0.0.1:{server.port}"
    request = HistoricalRequest(["tests.drivers:rate"])
    entities = pa.table({"a": pa.array(range(1000), pa.int64()), "event_timestamp": pa.array([T0] * 1000)})
    with flight.connect(location) as raw:
        writer, reader = raw.do_exchange(flight.FlightDescriptor.for_command(request.to_bytes()))
        writer.begin(entities.schema)
        writer.write_table(entities)
        writer.done_writing()
        assert slow.started.wait(30), "the join never started"
        reader.cancel()
        cancelled = time.monotonic()
        assert slow.finished.wait(30), "the join went on after the client cancelled"
    assert isinstance(slow.error, duckdb.InterruptException)
    assert time.monotonic() - cancelled < 5
    with FeatureClient(location) as client:
        assert client.health()["status"] == "ok"


def test_a_cancelled_training_set_ticket_interrupts_its_duckdb_join(
    duckdb_joins: tuple[FeatureFlightServer, SlowJoin],
) -> None:
    """`do_get` of a training set: the join it runs before the first batch stops once the call is cancelled."""
    server, slow = duckdb_joins
    cancelled = threading.Event()
    request = HistoricalRequest(["tests.drivers:rate"], entities=EntitySource(table="tests.trips"))
    opened = threading.Thread(target=lambda: slow.started.wait(30) and cancelled.set())
    opened.start()
    with pytest.raises(flight.FlightCancelledError, match="client cancelled"):
        server.parts.training.open(request, cancelled.is_set)
    opened.join()
    assert isinstance(slow.error, duckdb.InterruptException)


@pytest.mark.parametrize(
    "request_",
    [
        HistoricalRequest(["tests.drivers:rate"], entities=EntitySource(table="tests.trips")),
        OnlineRequest(["tests.drivers:rate"], entities={"a": [1, 2]}, as_of=T0.isoformat()),
    ],
    ids=["training set", "online lookup as of a time"],
)
def test_a_cancelled_ticket_interrupts_its_duckdb_join(
    duckdb_joins: tuple[FeatureFlightServer, SlowJoin], request_: HistoricalRequest | OnlineRequest
) -> None:
    """A `do_get` whose client gives up (its deadline passes) while the server joins before the first batch:
    through the service, the query stops within a poll and the server answers the next call."""
    server, slow = duckdb_joins
    location = f"grpc://127.0.0.1:{server.port}"
    with flight.connect(location) as raw, pytest.raises(flight.FlightTimedOutError):
        raw.do_get(flight.Ticket(request_.to_bytes()), flight.FlightCallOptions(timeout=3)).read_all()
    gave_up = time.monotonic()
    assert slow.started.is_set(), "the join never started"
    assert slow.finished.wait(30), "the join went on after the client gave up"
    assert isinstance(slow.error, duckdb.InterruptException)
    assert time.monotonic() - gave_up < 5
    with FeatureClient(location) as client:
        assert client.health()["status"] == "ok"
