"""Training sets: the point-in-time contract against a plain reference, reproducibility, endpoints."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute below)
import pyarrow.flight as flight
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flight_client import FeatureClient, InvalidRequestError, NotFoundError, read_flight
from flight_server.base.config import ServerConfig
from flight_server.wire.reads import HistoricalRequest
from flight_server.wire.writes import end_marker
from tests.conftest import start_server

UTC = dt.timezone.utc
BASE = dt.datetime(2025, 6, 1, tzinfo=UTC)
TTL_HOURS = 2


def hours(h: int | None) -> dt.datetime | None:
    return None if h is None else BASE + dt.timedelta(hours=h)


@pytest.fixture(scope="module")
def catalog_properties(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root: Path = tmp_path_factory.mktemp("historical")
    return {"type": "sql", "uri": f"sqlite:///{root / 'c.db'}", "warehouse": root.as_uri()}


@pytest.fixture(scope="module", params=["sorted index", "duckdb"])
def location(request: pytest.FixtureRequest, catalog_properties: dict[str, str]) -> Iterator[str]:
    """A server per join path: feature snapshots sorted and cached (the default), or DuckDB's ASOF join."""
    cache = ServerConfig.historical_cache_bytes if request.param == "sorted index" else 0
    server = start_server(catalog_properties, historical_cache_bytes=cache)
    yield f"grpc://127.0.0.1:{server.port}"
    server.shutdown()


# Table A: composite key (k1 int, k2 string), a created time, a TTL of two hours.
# Table B: key k1 only, no created time, no TTL. Keys and hours are tiny so that ties, TTL edges,
# unknown entities and duplicates happen all the time.
k1s = st.integers(0, 3)
k2s = st.sampled_from(["x", "y"])
a_rows = st.lists(
    st.tuples(k1s, k2s, st.integers(0, 6), st.none() | st.integers(0, 3), st.none() | st.floats(-9, 9)),
    min_size=1,
    max_size=25,
    unique_by=lambda r: (r[0], r[1], r[2], r[3]),
)
b_rows = st.lists(
    st.tuples(k1s, st.integers(0, 6), st.none() | st.sampled_from(["p", "q", "r"])),
    min_size=1,
    max_size=15,
    unique_by=lambda r: (r[0], r[1]),
)
entity_rows = st.lists(
    st.tuples(
        st.none() | st.integers(0, 4),
        st.none() | st.sampled_from(["x", "y", "z"]),
        st.none() | st.integers(-1, 9),
        st.integers(0, 1),
    ),
    min_size=1,
    max_size=30,
)


def reference(entities: list[tuple[Any, ...]], a: list[tuple[Any, ...]], b: list[tuple[Any, ...]]) -> list[dict]:
    """The contract, written as plainly as possible."""
    out = []
    for k1, k2, h, label in entities:
        row = {"k1": k1, "k2": k2, "ts": hours(h), "label": label, "a_value": None, "b_value": None}
        if h is None:  # no time, no match
            out.append(row)
            continue
        if k1 is not None and k2 is not None:
            matches = [r for r in a if r[0] == k1 and r[1] == k2 and h - TTL_HOURS <= r[2] <= h]
            if matches:
                best = max(matches, key=lambda r: (r[2], -1 if r[3] is None else r[3]))
                row["a_value"] = best[4]
        if k1 is not None:
            matches = [r for r in b if r[0] == k1 and r[1] <= h]
            if matches:
                row["b_value"] = max(matches, key=lambda r: r[1])[2]
        out.append(row)
    return out


def write_tables(client: FeatureClient, a: list[tuple[Any, ...]], b: list[tuple[Any, ...]]) -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:10]
    table_a, table_b = f"pit.a_{suffix}", f"pit.b_{suffix}"
    client.write(
        table_a,
        pa.table(
            {
                "k1": pa.array([r[0] for r in a], pa.int64()),
                "k2": [r[1] for r in a],
                "ts": pa.array([hours(r[2]) for r in a], pa.timestamp("us", tz="UTC")),
                "created": pa.array([hours(r[3]) for r in a], pa.timestamp("us", tz="UTC")),
                "value": pa.array([r[4] for r in a], pa.float64()),
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
                "k1": pa.array([r[0] for r in b], pa.int32()),  # a different integer width than the entities
                "when": pa.array([hours(r[1]) for r in b], pa.timestamp("us", tz="UTC")),
                "value": pa.array([r[2] for r in b], pa.string()),
            }
        ),
        entity_keys=["k1"],
        event_time="when",
    )
    return table_a, table_b


def entity_table(entities: list[tuple[Any, ...]]) -> pa.Table:
    return pa.table(
        {
            "k1": pa.array([e[0] for e in entities], pa.int64()),
            "k2": pa.array([e[1] for e in entities], pa.string()),
            "ts": pa.array([hours(e[2]) for e in entities], pa.timestamp("us", tz="UTC")),
            "label": pa.array([e[3] for e in entities], pa.int64()),
        }
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=a_rows, b=b_rows, entities=entity_rows)
def test_training_set_matches_reference(location: str, a: list, b: list, entities: list) -> None:
    with FeatureClient(location) as client:
        table_a, table_b = write_tables(client, a, b)
        result = client.get_historical_features(
            entity_table(entities),
            [f"{table_a}:value", f"{table_b}:value"],
            entity_time="ts",
            full_feature_names=True,
        )
    got = result.rename_columns(["k1", "k2", "ts", "label", "a_value", "b_value"]).to_pylist()
    assert got == reference(entities, a, b)


def _demo(client: FeatureClient) -> tuple[str, str, pd.DataFrame]:
    suffix = uuid.uuid4().hex[:10]
    drivers, customers = f"pit.drivers_{suffix}", f"pit.customers_{suffix}"
    client.write(
        drivers,
        pd.DataFrame(
            {
                "driver_id": [1, 1, 2, 2],
                "event_timestamp": [hours(0), hours(5), hours(1), hours(3)],
                "rate": [0.1, 0.5, 0.2, 0.3],
            }
        ),
        entity_keys=["driver_id"],
        event_time="event_timestamp",
    )
    client.write(
        customers,
        pd.DataFrame({"customer_id": ["a", "b"], "event_timestamp": [hours(0), hours(0)], "tier": ["gold", "silver"]}),
        entity_keys=["customer_id"],
        event_time="event_timestamp",
    )
    entities = pd.DataFrame(
        {
            "driver_id": [2, 1, 1, 3, 2, 1],
            "customer_id": ["a", "b", "a", "a", "b", None],
            "event_timestamp": [hours(2), hours(6), hours(4), hours(6), hours(9), hours(5)],
            "label": [1, 0, 1, 1, 0, 1],
        }
    )
    return drivers, customers, entities


EXPECTED_RATE = [0.2, 0.5, 0.1, None, 0.3, 0.5]
EXPECTED_TIER = ["gold", "silver", "gold", "gold", "silver", None]


def test_entity_sources_agree(location: str) -> None:
    with FeatureClient(location) as client:
        drivers, customers, entities = _demo(client)
        features = [f"{drivers}:rate", f"{customers}:tier"]
        streamed = client.get_historical_features(entities, features)
        assert streamed.column("rate").to_pylist() == EXPECTED_RATE
        assert streamed.column("tier").to_pylist() == EXPECTED_TIER
        assert streamed.select(list(entities.columns)).to_pandas().equals(entities)

        inline = client.get_historical_features(entities.to_dict("list"), features)
        assert inline.to_pylist() == streamed.to_pylist()

        naive = entities.assign(event_timestamp=entities["event_timestamp"].dt.tz_localize(None))
        as_utc = client.get_historical_features(naive, features)
        assert as_utc.column("rate").to_pylist() == EXPECTED_RATE
        assert as_utc.column("event_timestamp").type.tz is None  # passed through unchanged
        assert as_utc.column("event_timestamp").to_pylist() == naive["event_timestamp"].tolist()

        table = f"{drivers}_entities"
        client.write(table, entities.dropna(), entity_keys=["driver_id"], event_time="event_timestamp")
        server_side = client.get_historical_features(table, features, partitions=3)
        key = [("driver_id", "ascending"), ("event_timestamp", "ascending")]
        expected = streamed.filter(pa.compute.is_valid(streamed.column("customer_id")))
        assert server_side.sort_by(key).to_pylist() == expected.sort_by(key).to_pylist()
        meta = json.loads(server_side.schema.metadata[b"flight.snapshots"])
        assert meta["entities"]["table"] == table and set(meta["features"]) == {drivers, customers}

        filtered = read_flight(location, table, features=features, entity_filter="label = 1")
        assert filtered["label"].eq(1).all() and len(filtered) == 3


def test_endpoints_partition_the_result(location: str) -> None:
    with FeatureClient(location) as client:
        drivers, customers, entities = _demo(client)
        table = f"{drivers}_entities"
        client.write(table, entities.dropna(), entity_keys=["driver_id"], event_time="event_timestamp")
        features = [f"{drivers}:rate"]
        whole = client.get_historical_features(table, features, partitions=1).to_pylist()
        shards = [list(client.iter_historical_features(table, features, rank=r, world_size=3)) for r in range(3)]
        rows = [row for shard in shards for batch in shard for row in batch.to_pylist()]
        key = lambda r: (r["event_timestamp"], r["driver_id"])  # noqa: E731
        assert sorted(rows, key=key) == sorted(whole, key=key)
        # A feature table keyed by int32 splits the same way as the int64 entity keys.
        narrow = f"{drivers}_int32"
        client.write(
            narrow,
            pa.table(
                {
                    "driver_id": pa.array([1, 2, 3], pa.int32()),
                    "event_timestamp": pa.array([hours(0)] * 3, pa.timestamp("us", tz="UTC")),
                    "score": [10, 20, 30],
                }
            ),
            entity_keys=["driver_id"],
            event_time="event_timestamp",
        )
        parts = client.get_historical_features(table, [f"{narrow}:score"], partitions=4)
        assert sorted(parts.column("score").to_pylist()) == sorted(
            {1: 10, 2: 20, 3: 30}[d] for d in entities.dropna()["driver_id"]
        )
        local = [list(client.iter_historical_features(entities, features, rank=r, world_size=2)) for r in range(2)]
        assert sum(b.num_rows for shard in local for b in shard) == len(entities)


def test_pinned_snapshots_reproduce_the_result(location: str) -> None:
    with FeatureClient(location) as client:
        drivers, customers, entities = _demo(client)
        features = [f"{drivers}:rate", f"{customers}:tier"]
        first = client.get_historical_features(entities, features)
        pins = json.loads(first.schema.metadata[b"flight.snapshots"])["features"]
        client.write(drivers, pd.DataFrame({"driver_id": [2], "event_timestamp": [hours(2)], "rate": [9.9]}))
        client.write(customers, pd.DataFrame({"customer_id": ["a"], "event_timestamp": [hours(1)], "tier": ["x"]}))
        assert client.get_historical_features(entities, features).to_pylist() != first.to_pylist()
        again = client.get_historical_features(entities, features, snapshot_ids=pins)
        assert again.to_pylist() == first.to_pylist()


def test_feature_names(location: str) -> None:
    with FeatureClient(location) as client:
        drivers, customers, entities = _demo(client)
        named = client.get_historical_features(entities, [f"{drivers}:rate"], full_feature_names=True)
        assert named.column_names[-1] == f"{drivers.split('.')[-1]}__rate"
        client.write(
            drivers, pd.DataFrame({"driver_id": [1], "event_timestamp": [hours(0)], "label": [1]}), evolve=True
        )
        with pytest.raises(InvalidRequestError, match=r"\['label'\] would appear twice"):
            client.get_historical_features(entities, [f"{drivers}:label"])


BAD = {
    "unknown feature": (lambda d, c: [f"{d}:nope"], None, NotFoundError, "has no column 'nope'"),
    "unknown table": (lambda d, c: ["pit.nowhere:x"], None, NotFoundError, "does not exist"),
    "malformed ref": (lambda d, c: ["no-colon"], None, InvalidRequestError, "not of the form 'table:feature'"),
    "missing timestamp": (lambda d, c: [f"{d}:rate"], "when", InvalidRequestError, "no timestamp column 'when'"),
    "missing key": (
        lambda d, c: [f"{c}:tier"],
        "drop customer_id",
        InvalidRequestError,
        "lack key column 'customer_id'",
    ),
    "wrong key type": (
        lambda d, c: [f"{d}:rate"],
        "string driver_id",
        InvalidRequestError,
        "'driver_id' is (large_)?string but",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests(location: str, case: str) -> None:
    features, change, error, message = BAD[case]
    with FeatureClient(location) as client:
        drivers, customers, entities = _demo(client)
        entity_time = "event_timestamp"
        if change == "when":
            entity_time = "when"
        elif change == "drop customer_id":
            entities = entities.drop(columns=["customer_id"])
        elif change == "string driver_id":
            entities = entities.assign(driver_id=entities["driver_id"].astype(str))
        with pytest.raises(error, match=message):
            client.get_historical_features(entities, features(drivers, customers), entity_time=entity_time)
        assert client.health()["status"] == "ok"


REFUSED_IN_A_LOOP = """
import sys
import pandas as pd
import pyarrow as pa
from flight_client import FeatureClient, NotFoundError
location, feature, count, kind = sys.argv[1], f"{sys.argv[2]}:nope", int(sys.argv[3]), sys.argv[4]
size = 3_000 if kind == "48 KB" else 1  # 3,000 rows of 16 bytes: more than the 32 KB sent before reading
rows = pd.DataFrame({"driver_id": range(size), "event_timestamp": pd.Timestamp("2026-01-01", tz="UTC")})
with FeatureClient(location) as client:
    for _ in range(count):
        entity_rows = pa.Table.from_pandas(rows).to_reader() if kind == "reader" else rows
        try:
            client.get_historical_features(entity_rows, [feature])
        except NotFoundError:
            pass
"""


@pytest.mark.parametrize("kind", ["one row", "48 KB", "reader"])
def test_refused_training_sets_never_abort_the_client(location: str, kind: str) -> None:
    """A training set the server refuses at once (an unknown feature), asked 400 times with entity rows of one row,
    of 48 KB, or streamed from a RecordBatchReader: the client's thread that sent the rows half-closed the stream
    while the reader saw the call end, and Arrow Flight let both half-close: gRPC aborted the process ('API misuse
    of type GRPC_CALL_ERROR_TOO_MANY_OPERATIONS') in most such runs. The rows now end with the end-of-stream
    marker, and only the reading thread half-closes."""
    with FeatureClient(location) as client:
        drivers, _, _ = _demo(client)
    run = subprocess.run(
        [sys.executable, "-c", REFUSED_IN_A_LOOP, location, drivers, "400", kind],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("ending", ["half-close", "end-of-stream marker"])
def test_entity_rows_end_either_way(location: str, ending: str) -> None:
    """A plain Flight client ends its entity rows by half-closing (as other languages' do); one that promised
    the end-of-stream marker by sending it, after which the server answers without waiting for a half-close.
    Both get FeatureClient's answer."""
    with FeatureClient(location) as client:
        drivers, customers, entities = _demo(client)
        features = [f"{drivers}:rate", f"{customers}:tier"]
        expected = client.get_historical_features(entities, features)
        marked = ending != "half-close"
        request = HistoricalRequest(features, end_marker=marked)
        rows = pa.Table.from_pandas(entities, preserve_index=False)
        writer, reader = client._client.do_exchange(flight.FlightDescriptor.for_command(request.to_bytes()))
        with writer:
            writer.begin(rows.schema)
            writer.write_table(rows)
            if marked:
                writer.write_metadata(pa.py_buffer(end_marker(rows.num_rows)))
            else:
                writer.done_writing()
            answer = reader.read_all()
    assert answer.to_pylist() == expected.to_pylist()


def test_plain_table_is_not_a_feature_table(location: str, catalog_properties: dict[str, str]) -> None:
    from pyiceberg.catalog import load_catalog

    catalog = load_catalog("default", **catalog_properties)
    catalog.create_namespace_if_not_exists("pit")
    name = f"pit.plain_{uuid.uuid4().hex[:8]}"
    catalog.create_table(name, schema=pa.schema([("driver_id", pa.int64()), ("x", pa.float64())]))
    with FeatureClient(location) as client:
        _, _, entities = _demo(client)
        with pytest.raises(InvalidRequestError, match="not a feature table"):
            client.get_historical_features(entities, [f"{name}:x"])


def _random_tables(rng: np.random.Generator, rows: int) -> tuple[pa.Table, pa.Table]:
    """Two feature tables over 2,000 keys: one keyed (k, c) with created-time ties, one keyed by int32 k."""
    k = rng.integers(0, 2_000, rows)
    c = rng.choice(np.array(["x", "y", "z"]), rows)
    ts = rng.integers(0, 5_000, rows)
    tie = np.flatnonzero(rng.random(rows) < 0.1)
    tie = tie[tie > 0]
    k[tie], c[tie], ts[tie] = k[tie - 1], c[tie - 1], ts[tie - 1]
    created = ts + rng.permutation(rows)  # distinct: every tie has one winner
    created_null = np.zeros(rows, dtype=bool)
    created_null[tie] = rng.random(len(tie)) < 0.3  # an unknown created time loses its tie
    x = pa.table(
        {
            "k": pa.array(k),
            "c": pa.array(c),
            "ts": pa.array(ts * 60_000_000, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "created": pa.array(created * 60_000_000, pa.int64(), mask=created_null).cast(pa.timestamp("us", tz="UTC")),
            "x": pa.array(rng.normal(size=rows), mask=rng.random(rows) < 0.05),
            "tag": pa.array(rng.choice(np.array(["p", "q", "r"]), rows)),
        }
    )
    yk, yts = np.unique(np.stack([rng.integers(0, 2_000, rows), rng.integers(0, 5_000, rows)]), axis=1)
    y = pa.table(
        {
            "k": pa.array(yk, pa.int32()),
            "when": pa.array(yts * 60_000_000, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "y": pa.array(rng.integers(0, 100, len(yk))),
        }
    )
    return x, y


def test_sorted_index_equals_duckdb_join_on_larger_data(catalog_properties: dict[str, str]) -> None:
    """200K streamed entity rows (unknown and null keys, null times, duplicates) against two 50K-row
    tables: the sorted-index join and DuckDB's agree exactly, also when the cache is too small for
    one table, and the indexes are built once per snapshot."""
    rng = np.random.default_rng(7)
    x, y = _random_tables(rng, 50_000)
    suffix = uuid.uuid4().hex[:8]
    names = f"pit.x_{suffix}", f"pit.y_{suffix}"
    n = 200_000
    entities = pa.table(
        {
            "k": pa.array(rng.integers(-10, 2_010, n), mask=rng.random(n) < 0.01),
            "c": pa.array(rng.choice(np.array(["x", "y", "z", "w"]), n), mask=rng.random(n) < 0.01),
            "at": pa.array(rng.integers(-100, 5_100, n) * 60_000_000, pa.int64(), mask=rng.random(n) < 0.01).cast(
                pa.timestamp("us")  # naive: UTC
            ),
            "label": pa.array(np.arange(n)),
        }
    )
    features = [f"{names[1]}:y", f"{names[0]}:x", f"{names[0]}:tag"]
    servers = [
        start_server(catalog_properties),
        start_server(catalog_properties, historical_cache_bytes=0),
        start_server(catalog_properties, historical_cache_bytes=3 << 20),  # y fits, x does not
    ]
    try:
        locations = [f"grpc://127.0.0.1:{s.port}" for s in servers]
        with FeatureClient(locations[0]) as client:
            client.write(names[0], x, entity_keys=["k", "c"], event_time="ts", created_time="created")
            client.write(names[1], y, entity_keys=["k"], event_time="when", ttl=dt.timedelta(minutes=500))
        results = []
        for location in locations:
            with FeatureClient(location) as client:
                results.append(client.get_historical_features(entities, features, entity_time="at"))
                results.append(client.get_historical_features(entities, features, entity_time="at"))
        assert results[0].column_names == ["k", "c", "at", "label", "y", "x", "tag"]
        assert results[0].column("label").to_pylist() == list(range(n))
        assert results[0].column("x").null_count < n // 2  # most rows found a feature row
        for result in results[1:]:
            assert result.equals(results[0])
        with FeatureClient(locations[0]) as client:
            assert client.health()["training_set_cache"]["builds"] == 2  # once per table, not per request
        with FeatureClient(locations[2]) as client:
            cache = client.health()["training_set_cache"]
            assert cache["snapshots"] == 1 and 0 < cache["bytes"] <= cache["max_bytes"]  # y, not x
    finally:
        for server in servers:
            server.shutdown()


def test_new_snapshots_are_indexed_when_asked_for(location: str) -> None:
    with FeatureClient(location) as client:
        drivers, customers, entities = _demo(client)
        features = [f"{drivers}:rate"]
        before = client.get_historical_features(entities, features)
        client.write(drivers, pd.DataFrame({"driver_id": [2], "event_timestamp": [hours(2)], "rate": [9.9]}))
        after = client.get_historical_features(entities, features)
        assert before.column("rate").to_pylist() == EXPECTED_RATE
        assert after.column("rate").to_pylist() == [9.9, *EXPECTED_RATE[1:]]
        pins = json.loads(before.schema.metadata[b"flight.snapshots"])["features"]
        assert client.get_historical_features(entities, features, snapshot_ids=pins).equals(before)


def test_online_as_of_answers_alike_before_and_after_the_snapshot_is_sorted(location: str) -> None:
    """An online `as_of` lookup never sorts a snapshot itself (DuckDB answers), but uses one a training
    set has sorted; the answer is the same."""
    with FeatureClient(location) as client:
        drivers, _, entities = _demo(client)
        features = [f"{drivers}:rate"]
        keys = {"driver_id": [1, 2, 3, 1]}
        before = client.get_online_features(keys, features, as_of=hours(4)).to_pylist()
        builds = client.health()["training_set_cache"]["builds"]
        client.get_historical_features(entities, features)
        sorted_now = client.health()["training_set_cache"]["builds"] > builds
        assert sorted_now == (client.health()["training_set_cache"]["max_bytes"] > 0)
        after = client.get_online_features(keys, features, as_of=hours(4)).to_pylist()
    assert [r["rate"] for r in before] == [0.1, 0.3, None, 0.1]
    assert after == before
