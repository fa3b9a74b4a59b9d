"""Memory over months of traffic: what a server keeps per table, per write id and per call is bounded, and what it
kept for a dropped table goes (docs/operations.md "Memory", "What grows with what"). Each test asserts a registry's
size after many distinct ids, not the resident memory, which the allocator and the bounded caches blur."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyiceberg.catalog import load_catalog

from flight_client import FeatureClient
from flight_server.base import logs
from flight_server.changes import upkeep
from flight_server.reads import duck
from flight_server.reads.duck import Engine
from flight_server.transport.service import FeatureFlightServer
from tests.conftest import sqlite_catalog, start_server, wait_until
from tests.services import free_ports
from tests.test_metrics import scrape

START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def rows(first: int, count: int) -> pa.Table:
    ids = list(range(first, first + count))
    return pa.table(
        {
            "id": pa.array([i % 7 for i in ids], pa.int64()),
            "ts": pa.array([START + dt.timedelta(minutes=i) for i in ids], pa.timestamp("us", "UTC")),
            "x": pa.array([i * 0.5 for i in ids]),
        }
    )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[FeatureFlightServer, FeatureClient, dict[str, str], int]]:
    """A server (no automatic maintenance, as `start_server` has it) with metrics on, its client and catalog."""
    properties = sqlite_catalog(tmp_path)
    (metrics_port,) = free_ports(1)
    server = start_server(properties, metrics_port=metrics_port, online_refresh_seconds=0.2)
    with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
        yield server, client, properties, metrics_port
    server.shutdown()


def table_labels(port: int, prefix: str) -> set[str]:
    """The tables that per-table metrics name, of those whose name starts with `prefix`."""
    return {
        dict(labels)["table"]
        for _, labels in scrape(port)
        if "table" in dict(labels) and dict(labels)["table"].startswith(prefix)
    }


def test_tables_created_and_dropped_leave_bounded_state(
    served: tuple[FeatureFlightServer, FeatureClient, dict[str, str], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tables created, used (puts, maintenance rounds, online lookups) and dropped day after day: the maintenance
    records and their /metrics label sets stay within `MAX_WATCHED`, and puts alone record nothing where no
    background round will ever read it. Before: `Upkeep.notify` recorded every table a put wrote, with or without
    automatic maintenance, and a dropped table was forgotten only at its next round, which without the background
    thread never came; each added a `Watched` and its label sets of `flight_maintenance_*`/`flight_table_*`."""
    server, client, properties, metrics_port = served
    catalog = load_catalog("default", **properties)
    monkeypatch.setattr(upkeep, "MAX_WATCHED", 4, raising=False)
    for day in range(10):
        name = f"days.t{day}"
        client.write(name, rows(0, 20), entity_keys=["id"], event_time="ts")
        client.write(name, rows(20, 1), entity_keys=["id"], event_time="ts", write_id=uuid.uuid4().hex)
        client.run_maintenance(name)
        client.get_online_features({"id": [1]}, [f"{name}:x"])
        catalog.drop_table(name)
    for day in range(10):
        client.write(f"written.t{day}", rows(0, 5), entity_keys=["id"], event_time="ts")
    watched = server.parts.upkeep.tables()
    assert len(watched) <= 4, sorted(watched)
    assert not [name for name in watched if name.startswith("written.")]  # puts alone record nothing here
    assert len(table_labels(metrics_port, "days.")) <= 4
    # The online indexes of dropped tables go at their next refresh, their label sets with them.
    wait_until(lambda: not [t for t in server.parts.store._indexes if t.startswith("days.")], what="drops")
    assert not [t for t in table_labels(metrics_port, "days.") if t not in watched]


def test_write_ids_kept_are_those_of_retained_snapshots(
    served: tuple[FeatureFlightServer, FeatureClient, dict[str, str], int],
) -> None:
    """Every put of a pipeline carries a new `write_id`: the ids remembered for retries are those of the snapshots
    the table still has, so expiry bounds them (a put that finds no snapshot expired reads only the new ones)."""
    server, client, _, _ = served
    table = "ids.t"
    client.write(table, rows(0, 5), entity_keys=["id"], event_time="ts")
    for number in range(40):
        client.write(table, rows(5 + number, 1), entity_keys=["id"], event_time="ts", write_id=f"put-{number}")
    client.expire_snapshots(table, older_than=dt.datetime.now(dt.timezone.utc), retain_last=3)
    client.write(table, rows(100, 1), entity_keys=["id"], event_time="ts", write_id="after-expiry")
    seen = server.parts.writer._write_ids._tables  # the one registry keyed by write id
    assert sum(len(table_ids.ids) for table_ids in seen.values()) <= 4


def test_per_call_registries_empty_between_calls(
    served: tuple[FeatureFlightServer, FeatureClient, dict[str, str], int],
) -> None:
    """What a server keeps per call (the call each thread serves, for log lines; the calls the idle watch times;
    the per-key locks) is gone once the calls end, whatever their request ids."""
    server, client, _, _ = served
    table = "calls.t"
    client.write(table, rows(0, 50), entity_keys=["id"], event_time="ts")
    for number in range(30):
        with FeatureClient(f"grpc://127.0.0.1:{server.port}", request_id=f"req-{number}") as caller:
            caller.read_table(table)
            caller.get_online_features({"id": [number % 7]}, [f"{table}:x"])
            caller.write(table, rows(50 + number, 1), entity_keys=["id"], event_time="ts", write_id=f"w{number}")
    wait_until(lambda: not logs._CALLS, what="calls to unbind")
    assert not server.parts.writer._commit_locks._locks


def evicted_ranges(engine: Engine) -> int:
    """The ranges of files the engine's current database keeps in its file cache with their content evicted."""
    with engine.cursor() as cursor:
        row = cursor.execute("SELECT count(*) FILTER (NOT loaded) FROM duckdb_external_file_cache()").fetchone()
    return int(row[0]) if row else 0


def test_file_cache_forgets_files_of_versions_past(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A table whose versions keep changing brings DuckDB new files to read with each (metadata, manifest lists,
    manifests, data); its file cache never forgets one: content evicted past the memory limit leaves its entry, ~1 KB
    a range, for good. The engine reads through a new database once the cache keeps more than
    `FILE_CACHE_MAX_EVICTED` such ranges (those in memory, the working set, are not counted), and a reader of the old
    one streams to its end."""
    monkeypatch.setattr(duck, "FILE_CACHE_MAX_EVICTED", 100)
    monkeypatch.setattr(duck, "FILE_CACHE_CHECK_SECONDS", 0.0)
    engine = Engine(memory_limit="8MB", threads=1, temp_dir=str(tmp_path / "spill"), file_cache=True)
    first = tmp_path / "0.parquet"
    pq.write_table(pa.table({"id": pa.array(range(300_000), pa.int64())}), first, row_group_size=10_000)
    streaming = engine.cursor().execute(f"SELECT id FROM '{first}'").to_arrow_reader(1000)
    head = streaming.read_next_batch()
    peak = 0
    for number in range(1, 80):  # the file under new names, as a new version's files are (62 ranges cached each)
        path = tmp_path / f"{number}.parquet"
        os.link(first, path)
        with engine.cursor() as cursor:
            assert cursor.execute(f"SELECT sum(id) FROM '{path}'").fetchone() == (44_999_850_000,)
        peak = max(peak, evicted_ranges(engine))
    assert 0 < peak <= 2 * duck.FILE_CACHE_MAX_EVICTED, peak
    assert head.num_rows + sum(batch.num_rows for batch in streaming) == 300_000
    engine.close()
    # Ranges still in memory are the working set: however many, they stay.
    monkeypatch.setattr(duck, "FILE_CACHE_MAX_EVICTED", 10)
    engine = Engine(memory_limit="256MB", threads=1, temp_dir=str(tmp_path / "spill"), file_cache=True)
    with engine.cursor() as cursor:
        assert cursor.execute(f"SELECT sum(id) FROM '{first}'").fetchone() == (44_999_850_000,)
    assert not engine.renew_file_cache()
    engine.close()
