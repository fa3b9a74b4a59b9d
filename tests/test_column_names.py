"""Columns whose names Iceberg writers rewrite in the data files (`rate-1` is stored as `rate_x2D1`, a leading
digit too) read back with their values on every path: whole-table scans (cached and direct), appended files,
training sets through the sorted index and through DuckDB, online lookups before and after an append.
Files are matched to such columns by field id, never by name (a by-name read returned nulls)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from flight_client import FeatureClient
from tests.conftest import sqlite_catalog, start_server, wait_until

UTC = dt.timezone.utc
T0 = dt.datetime(2025, 3, 1, tzinfo=UTC)
ODD = ["rate-1", "2nd score", "naïve"]


def rows(start: int, n: int) -> pa.Table:
    ids = list(range(start, start + n))
    return pa.table(
        {
            "driver_id": pa.array([i % 7 for i in ids], pa.int64()),
            "ts": pa.array([T0 + dt.timedelta(minutes=i) for i in ids], pa.timestamp("us", tz="UTC")),
            "rate-1": pa.array([i / 2 for i in ids]),
            "2nd score": pa.array(ids, pa.int64()),
            "naïve": pa.array([f"v{i}" for i in ids]),
        }
    )


@pytest.fixture(params=["cached", "uncached"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A server with its caches on (sorted index, scan cache), or off (DuckDB, direct reads)."""
    sizes = {} if request.param == "cached" else {"historical_cache_bytes": 0, "scan_cache_bytes": 0}
    server = start_server(sqlite_catalog(tmp_path), online_tables=["it.odd"], **sizes)
    yield f"grpc://127.0.0.1:{server.port}"
    server.shutdown()


def test_rewritten_column_names_read_back_on_every_path(location: str) -> None:
    with FeatureClient(location) as client:
        client.write("it.odd", rows(0, 40), entity_keys=["driver_id"], event_time="ts")
        client.write("it.odd", rows(40, 30), entity_keys=["driver_id"], event_time="ts")  # an appended snapshot
        written = pa.concat_tables([rows(0, 40), rows(40, 30)])
        read = client.read_table("it.odd").replace_schema_metadata(None)
        assert read.sort_by("2nd score").select(written.column_names).to_pydict() == written.to_pydict()

        entities = pa.table(
            {
                "driver_id": pa.array([1, 3, 6], pa.int64()),
                "event_timestamp": pa.array([T0 + dt.timedelta(hours=2)] * 3),
            }
        )
        got = client.get_historical_features(entities, [f"it.odd:{c}" for c in ODD]).sort_by("driver_id")
        latest = {d: max(i for i in range(70) if i % 7 == d) for d in (1, 3, 6)}  # all rows precede the entity time
        assert got.column("2nd score").to_pylist() == [latest[d] for d in (1, 3, 6)]
        assert got.column("rate-1").to_pylist() == [latest[d] / 2 for d in (1, 3, 6)]
        assert got.column("naïve").to_pylist() == [f"v{latest[d]}" for d in (1, 3, 6)]

        online = client.get_online_features({"driver_id": [1, 3, 6]}, [f"it.odd:{c}" for c in ODD], apply_ttl=False)
        assert online.column("2nd score").to_pylist() == [latest[d] for d in (1, 3, 6)]
        client.write("it.odd", rows(70, 7), entity_keys=["driver_id"], event_time="ts")  # folded in from its files

        def lookup() -> pa.Table:
            return client.get_online_features({"driver_id": [1, 3, 6]}, [f"it.odd:{c}" for c in ODD], apply_ttl=False)

        wait_until(lambda: lookup().column("2nd score").to_pylist() != [latest[d] for d in (1, 3, 6)], what="refresh")
        online = lookup()
        assert online.column("2nd score").to_pylist() == [70 + d for d in (1, 3, 6)]
        assert online.column("rate-1").to_pylist() == [(70 + d) / 2 for d in (1, 3, 6)]
        assert online.column("naïve").to_pylist() == [f"v{70 + d}" for d in (1, 3, 6)]
