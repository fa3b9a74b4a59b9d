"""Issue 15, the smaller ones: each test fails on the code before its fix."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flight_client import ConflictError, FeatureClient, FeatureServerError, ResourceExhaustedError, UnauthenticatedError
from flight_server.base.config import redact
from flight_server.iceberg.catalog import FeatureCatalog
from flight_server.transport.auth import LOGIN_FAILURES, LOGIN_WINDOW_SECONDS, LoginThrottle
from flight_server.transport.limits import ACTION_HEADROOM, ConcurrencyLimit
from flight_server.wire.errors import LimitError
from tests.conftest import answers, serve_replicas, sqlite_catalog, start_server, wait_until, write_big
from tests.test_idle import Client

SECRET_KEYS = [
    "s3.access-key-id",
    "s3.secret-access-key",
    "s3.session-token",
    "token",
    "password",
    "credential",
    "adls.account-key",
    "client.access-key-id",
    "S3_ACCESS_KEY_ID",
]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_looking_keys_are_redacted_at_any_depth(key: str) -> None:
    shown = redact(
        {
            key: "AKIAHUNTER2",
            "uri": "postgresql://u:hunter2@db/x",
            "s3.endpoint": "http://s3",
            "nested": {"deeper": {key: "AKIAHUNTER2"}, "list": [{key: "AKIAHUNTER2"}, "http://u:hunter2@h/"]},
        }
    )
    assert "AKIAHUNTER2" not in repr(shown) and "hunter2" not in repr(shown)
    assert shown[key] == "***" and shown["nested"]["deeper"][key] == "***"
    assert shown["s3.endpoint"] == "http://s3"
    assert shown["uri"] == "postgresql://u:***@db/x"


def test_access_key_id_not_logged_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    properties = {**sqlite_catalog(tmp_path), "s3.access-key-id": "AKIAEXAMPLEKEYID", "s3.region": "eu-west-1"}
    with caplog.at_level(logging.INFO, logger="flight_server.iceberg.catalog"):
        FeatureCatalog("hardening", properties)
    assert "s3.region" in caplog.text and "AKIAEXAMPLEKEYID" not in caplog.text


def test_health_answers_while_stalled_streams_hold_every_slot(tmp_path: Path) -> None:
    server = start_server(sqlite_catalog(tmp_path), max_concurrent_requests=2, batch_rows=8192)
    location = f"grpc://127.0.0.1:{server.port}"
    try:
        with FeatureClient(location) as client:
            write_big(client, "busy.big", 1_000_000)
        stalled = [Client("scan", location, "busy.big") for _ in range(2)]
        try:
            assert [c.line() for c in stalled] == ["stalled", "stalled"]
            assert not answers(location), "the stalled scans hold both slots"
            with FeatureClient(location, timeout=5) as probe:
                assert all(probe.health()["status"] == "ok" for _ in range(20))
                with ThreadPoolExecutor(ACTION_HEADROOM) as pool:  # probes at once, as many as the headroom
                    statuses = list(pool.map(lambda _: probe.health()["status"], range(4 * ACTION_HEADROOM)))
                assert statuses == ["ok"] * 4 * ACTION_HEADROOM
        finally:
            for c in stalled:
                c.close()
        wait_until(lambda: answers(location), what="the slots of the killed clients")
    finally:
        server.shutdown()


def test_actions_beyond_the_limits_are_bounded_by_the_headroom() -> None:
    limit = ConcurrencyLimit(1)
    get, action = flight.CallInfo(flight.FlightMethod.DO_GET), flight.CallInfo(flight.FlightMethod.DO_ACTION)
    stream = limit.start_call(get, {})
    beyond = [limit.start_call(action, {}) for _ in range(ACTION_HEADROOM)]
    with pytest.raises(flight.FlightError, match="maximum of 1 concurrent requests"):
        limit.start_call(action, {})
    beyond.pop().call_completed(None)
    beyond.append(limit.start_call(action, {}))  # its place came back
    with pytest.raises(flight.FlightError, match="maximum of 1 concurrent requests"):
        limit.start_call(get, {})  # streams never use the headroom
    stream.call_completed(None)
    limit.start_call(action, {}).call_completed(None)  # a free slot is taken before the headroom
    assert (limit.active, limit.headroom) == (0, ACTION_HEADROOM)


PASSWORD = "the-right-password-0123"
LOGINS = [
    {"name": "notebooks", "token": "notebooks-token-0123456789", "permissions": ["read"], "password": PASSWORD},
    {"name": "analyst", "token": "analyst-token-0123456789ab", "permissions": ["read"], "password": PASSWORD},
]


def login(location: str, name: str, password: str) -> str:
    """How a basic-authentication login ends: "ok", or the class of the error."""
    try:
        FeatureClient(location, username=name, password=password).close()
    except (UnauthenticatedError, ResourceExhaustedError) as exc:
        return type(exc).__name__
    return "ok"


def test_password_guessing_is_throttled_per_name(tmp_path: Path) -> None:
    server = start_server(sqlite_catalog(tmp_path), auth_tokens=LOGINS)
    location = f"grpc://127.0.0.1:{server.port}"
    assert server.auth is not None
    now = [0.0]
    server.auth.logins.clock = lambda: now[0]
    try:
        guesses = [login(location, "notebooks", f"guess-{i:012d}") for i in range(200)]
        refused = 200 - LOGIN_FAILURES
        assert guesses == ["UnauthenticatedError"] * LOGIN_FAILURES + ["ResourceExhaustedError"] * refused
        with pytest.raises(ResourceExhaustedError, match=r"too many failed logins for 'notebooks'; retry in 60 s"):
            FeatureClient(location, username="notebooks", password=PASSWORD)  # the right password waits too
        assert login(location, "analyst", PASSWORD) == "ok"  # other names are not held back
        now[0] = LOGIN_WINDOW_SECONDS - 1
        assert login(location, "notebooks", PASSWORD) == "ResourceExhaustedError"
        now[0] = LOGIN_WINDOW_SECONDS  # the window has passed: the right password logs in
        assert login(location, "notebooks", PASSWORD) == "ok"
    finally:
        server.shutdown()


def test_login_throttle_window_and_concurrent_guesses() -> None:
    now = [100.0]
    throttle = LoginThrottle(failures=3, window=10.0, clock=lambda: now[0])
    stamps = [throttle.attempt("a") for _ in range(3)]  # in flight at once: each counts until it succeeds
    with pytest.raises(LimitError, match=r"too many failed logins for 'a'; retry in 10 s"):
        throttle.attempt("a")
    throttle.succeeded("a", stamps[0])
    throttle.attempt("a")  # the successful one is not held against the name
    now[0] = 109.5
    with pytest.raises(LimitError, match="retry in 1 s"):
        throttle.attempt("a")
    now[0] = 110.0
    throttle.attempt("a")  # the oldest failure has left the window
    throttle.attempt("b")


# Feature rows (key, event time in whole microseconds, as Iceberg stores them): one key after 1970, one
# before (where truncating toward zero is not rounding down), a few microseconds apart.
TTL_SECONDS = 1
TTL_NS = TTL_SECONDS * 1_000_000_000
BASES_US = {1: 1_700_000_000_000_000, 2: -1_000_000_000}
FEATURES = [(k, base + d) for k, base in BASES_US.items() for d in (0, 1, 2, 5, 1000, 1001)]


def expected_value(key: int, entity_ns: int) -> int | None:
    """The contract in plain integers: equal key, `feature.ts <= entity.ts`, `feature.ts >= entity.ts - ttl`,
    latest wins (the value is the row's event time in microseconds)."""
    times = [us for k, us in FEATURES if k == key and entity_ns - TTL_NS <= us * 1000 <= entity_ns]
    return max(times, default=None)


@pytest.fixture(scope="module")
def ns_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A server joining through the sorted indexes and one through DuckDB, on one catalog with a TTL table."""
    catalog = sqlite_catalog(tmp_path_factory.mktemp("ns-warehouse"))
    servers = {"index": start_server(catalog), "duckdb": start_server(catalog, historical_cache_bytes=0)}
    locations = {path: f"grpc://127.0.0.1:{server.port}" for path, server in servers.items()}
    rows = pa.table(
        {
            "k": pa.array([k for k, _ in FEATURES], pa.int64()),
            "ts": pa.array([us for _, us in FEATURES], pa.int64()).cast(pa.timestamp("us", "UTC")),
            "value": pa.array([us for _, us in FEATURES], pa.int64()),
        }
    )
    with FeatureClient(locations["index"]) as client:
        client.write("ns.features", rows, entity_keys=["k"], event_time="ts", ttl=TTL_SECONDS, partition_by=[])
    yield locations
    for server in servers.values():
        server.shutdown()


# An entity time: near a feature time (the `<=` bound) or a TTL after one (the TTL bound), to the nanosecond.
entity_times = st.builds(
    lambda key, us, after, ns: (key, (us + after) * 1000 + ns),
    st.sampled_from([1, 2]),
    st.sampled_from([us for _, us in FEATURES]),
    st.sampled_from([0, TTL_NS // 1000]),
    st.integers(-2500, 2500),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entities=st.lists(entity_times, min_size=1, max_size=20), naive=st.booleans())
@example(entities=[(1, (BASES_US[1] + 1001 + 1_000_000) * 1000 + 999)], naive=False)  # the latest: 999 ns too old
@example(entities=[(2, (BASES_US[2] + 1001 + 1_000_000) * 1000 + 1)], naive=True)  # 1 ns too old, before 1970
@example(entities=[(2, (BASES_US[2] + 5) * 1000 - 1)], naive=False)  # 1 ns before a feature, before 1970
def test_ttl_bound_is_exact_for_nanosecond_entity_times(
    ns_servers: dict[str, str], entities: list[tuple[int, int]], naive: bool
) -> None:
    rows = pa.table(
        {
            "k": pa.array([k for k, _ in entities], pa.int64()),
            "event_timestamp": pa.array([ns for _, ns in entities], pa.int64()).cast(
                pa.timestamp("ns", None if naive else "UTC")
            ),
        }
    )
    want = [expected_value(k, ns) for k, ns in entities]
    for path, location in ns_servers.items():
        with FeatureClient(location) as client:
            result = client.get_historical_features(rows, ["ns.features:value"])
        assert result.column("value").to_pylist() == want, path
        # Entity columns come back unchanged, nanoseconds included (DuckDB keeps aware timestamps in microseconds).
        assert result.schema.field("event_timestamp").type == rows.schema.field("event_timestamp").type, path
        assert result.column("event_timestamp").cast(pa.int64()).to_pylist() == [ns for _, ns in entities], path


@pytest.fixture(scope="module")
def sqlite_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Two `flight-server serve` processes on one SQLite catalog file."""
    tmp = tmp_path_factory.mktemp("sqlite-replicas")
    with serve_replicas(
        tmp, sqlite_catalog(tmp), lambda *_: {"FLIGHT_SERVER_DUCKDB_MEMORY_LIMIT": "512MB"}
    ) as locations:
        yield locations


def racing_write(location: str, table: str, barrier: threading.Barrier) -> str:
    """Create `table` by writing to it once all racers are ready: "ok", "conflict", or the error."""
    rows = pa.table(
        {
            "id": pa.array([1, 2], pa.int64()),
            "ts": pa.array([dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)] * 2, pa.timestamp("us", "UTC")),
        }
    )
    with FeatureClient(location) as client:
        barrier.wait()
        try:
            client.write(table, rows, entity_keys=["id"], event_time="ts", partition_by=[])
        except ConflictError:
            return "conflict"  # nothing was committed: safe to retry
        except FeatureServerError as exc:
            return f"{type(exc).__name__}: {exc}"
    return "ok"


@pytest.mark.parametrize("same_table", [False, True])
def test_replicas_racing_to_create_a_namespace_and_table(sqlite_replicas: list[str], same_table: bool) -> None:
    """Two replicas create the first table of a new namespace at the same moment (the same table, or two
    tables): both succeed, or the loser gets a conflict that is safe to retry; never INTERNAL."""
    for round in range(8):
        namespace = f"race_{'same' if same_table else 'two'}_{round}"
        tables = [f"{namespace}.t"] * 2 if same_table else [f"{namespace}.a", f"{namespace}.b"]
        barrier = threading.Barrier(2)
        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(racing_write, sqlite_replicas, tables, [barrier] * 2))
        if same_table:  # the loser appends to the winner's table, or may retry
            assert set(outcomes) <= {"ok", "conflict"} and "ok" in outcomes, (round, outcomes)
        else:
            assert outcomes == ["ok", "ok"], (round, outcomes)
        written = Counter(table for table, outcome in zip(tables, outcomes, strict=True) if outcome == "ok")
        with FeatureClient(sqlite_replicas[1]) as client:
            assert {t: client.scan(t).read_all().num_rows for t in written} == {t: 2 * n for t, n in written.items()}
