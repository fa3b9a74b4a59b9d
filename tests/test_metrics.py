"""Prometheus metrics (`--metrics-port`): a real server process does each kind of call, then its endpoint is
scraped over HTTP and every count is checked against what the calls did."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest
import sqlalchemy
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from pyiceberg.exceptions import CommitFailedException

from flight_client import (
    ConflictError,
    FeatureClient,
    FeatureServerError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from flight_server.base.config import ServerConfig
from flight_server.base.metrics import COMMIT_RETRIES
from flight_server.changes.commits import commit_until
from flight_server.iceberg.catalog import FeatureCatalog
from flight_server.transport.calls import code_of
from flight_server.transport.metrics import ServerMetrics
from flight_server.transport.service import FeatureFlightServer
from tests.conftest import (
    TEST_CHUNK_BYTES,
    healthy,
    local_files,
    sqlite_catalog,
    start_server,
    start_writing_server,
    wait_until,
    write_big,
)
from tests.services import _stop_group, free_ports, postgres_server

UTC = dt.timezone.utc
TABLE = "tests.metered"
ROWS = 5

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of the endpoint, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int, Path]]:
    """A `flight-server serve` process with metrics on: its location, metrics port and log file."""
    tmp = tmp_path_factory.mktemp("metrics")
    port, metrics_port = free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLIGHT_SERVER_")}
    args = ["--port", str(port), "--warehouse", str(tmp / "wh"), "--metrics-port", str(metrics_port)]
    log = tmp / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flight_server", "serve", *args, "--online-refresh-seconds", "0.05"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    location = f"grpc://127.0.0.1:{port}"
    try:
        wait_until(lambda: healthy(location) or proc.poll() is not None, timeout=90, what="the server")
        assert proc.poll() is None, log.read_text()[-3000:]
        yield location, metrics_port, log
    finally:
        _stop_group(proc)


def test_every_kind_of_call_is_counted(server: tuple[str, int, Path]) -> None:
    location, metrics_port, log = server
    rows = pa.table(
        {
            "id": pa.array(range(ROWS), pa.int64()),
            "ts": pa.array([dt.datetime(2026, 1, 1, tzinfo=UTC)] * ROWS, pa.timestamp("us", "UTC")),
            "value": pa.array([float(i) for i in range(ROWS)]),
        }
    )
    with FeatureClient(location, online_sessions=False, request_id="metrics-test") as client:
        client.write(TABLE, rows, entity_keys=["id"], event_time="ts", partition_by=[])
        assert client.read_table(TABLE).num_rows == ROWS
        assert client.get_online_features({"id": [1, 2, 99]}, [f"{TABLE}:value"]).num_rows == 3
        entities = {"id": [0, 1], "event_timestamp": [dt.datetime(2026, 2, 1, tzinfo=UTC)] * 2}
        assert client.get_historical_features(entities, [f"{TABLE}:value"]).num_rows == 2
        with pytest.raises(NotFoundError):
            client.read_table("tests.missing")
    with FeatureClient(location) as client:  # online lookups over a session: one do_exchange
        assert client.get_online_features({"id": [3]}, [f"{TABLE}:value"]).num_rows == 1

    samples = scrape(metrics_port)
    requests = "flight_requests_total"
    assert value(samples, requests, method="do_put", kind="write", code="OK") == 1
    assert value(samples, requests, method="do_get", kind="scan", code="OK") == 1
    assert value(samples, requests, method="do_get", kind="online", code="OK") == 1
    assert value(samples, requests, method="do_get", kind="training_set", code="OK") == 1
    assert value(samples, requests, method="get_flight_info", kind="scan", code="NOT_FOUND") == 1
    assert value(samples, requests, method="do_action", kind="health", code="OK") >= 1
    assert value(samples, "flight_rows_received_total", kind="write") == ROWS
    assert value(samples, "flight_rows_sent_total", kind="scan") == ROWS
    assert value(samples, "flight_rows_sent_total", kind="training_set") == 2
    assert value(samples, "flight_rows_sent_total", kind="online") == 3 + 1  # do_get, then the session's batch
    assert value(samples, "flight_rows_received_total", kind="online") == 1  # the session's keys
    assert value(samples, "flight_bytes_sent_total", kind="scan") >= ROWS * 8 * 3
    assert value(samples, "flight_request_duration_seconds_count", method="do_put", kind="write") == 1
    assert value(samples, "flight_request_duration_seconds_bucket", method="do_put", kind="write", le="+Inf") == 1

    plans = (
        value(samples, "flight_cache_hits_total", cache="plans", process="serving"),
        value(samples, "flight_cache_misses_total", cache="plans", process="serving"),
    )
    assert plans[0] is not None and plans[1] is not None and plans[0] + plans[1] >= 2
    assert value(samples, "flight_cache_entries", cache="plans", process="serving") >= 1
    assert value(samples, "flight_cache_bytes", cache="plans", process="serving") >= 1
    assert value(samples, "flight_cache_entries", cache="training_set", process="serving") == 1
    assert value(samples, "flight_cache_misses_total", cache="training_set", process="serving") == 1
    assert value(samples, "flight_cache_bytes", cache="online_index", process="serving") > 0
    assert value(samples, "flight_cache_max_bytes", cache="positions", process="serving") == 64 << 20
    assert value(samples, "flight_cache_misses_total", cache="scan", process="serving") is not None
    assert value(samples, "flight_online_index_entities", table=TABLE) == ROWS
    assert 0 <= value(samples, "flight_online_index_lag_seconds", table=TABLE) < 30
    assert value(samples, "flight_online_index_refresh_failing", table=TABLE) == 0
    assert value(samples, "flight_commit_retries_total") == 0
    assert value(samples, "flight_commit_conflicts_total") == 0
    assert value(samples, "flight_writes_in_progress") == 0
    assert value(samples, "process_resident_memory_bytes") > 0

    text = log.read_text()  # a failed call's line, its request id in text logs too
    assert "get_flight_info scan NOT_FOUND in" in text and "[metrics-test]" in text


def test_online_index_lag_stays_within_the_refresh_interval(server: tuple[str, int, Path]) -> None:
    """The lag gauge is the time since the index was last checked against its table: the refresh thread
    (every 0.05 s here) keeps it small while refreshes succeed."""
    location, metrics_port, _ = server
    table = "tests.lagged"
    with FeatureClient(location) as client:
        row = {"id": [1], "ts": [dt.datetime(2026, 1, 1, tzinfo=UTC)], "value": [1.0]}
        client.write(table, row, entity_keys=["id"], event_time="ts", partition_by=[])
        client.get_online_features({"id": [1]}, [f"{table}:value"])
    wait_until(
        lambda: (value(scrape(metrics_port), "flight_online_index_lag_seconds", table=table) or 1e9) < 1.0,
        what="a fresh online index",
    )


def test_commit_retries_are_counted() -> None:
    registry = CollectorRegistry()
    registry.register(COMMIT_RETRIES)

    def retries() -> float | None:
        return registry.get_sample_value("flight_commit_retries_total")

    before = retries()
    attempts = iter([CommitFailedException("lost"), CommitFailedException("lost"), None])

    def attempt() -> str:
        failure = next(attempts)
        if failure is not None:
            raise failure
        return "committed"

    assert commit_until(float("inf"), "test", attempt) == "committed"
    assert before is not None and retries() == before + 2


def _drivers(ids: range, extra: bool = False) -> pa.Table:
    rows = pa.table(
        {
            "driver_id": pa.array(ids, pa.int64()),
            "event_timestamp": pa.array([dt.datetime(2026, 1, 1, tzinfo=UTC)] * len(ids), pa.timestamp("us", "UTC")),
            "rate": pa.array([1.0] * len(ids), pa.float64()),
        }
    )
    return rows.append_column("extra", pa.array([1] * len(ids))) if extra else rows


def test_the_write_process_commit_retries_and_conflicts_are_scraped_from_the_serving_process(tmp_path: Path) -> None:
    """A put in the write process loses its commit to a change another engine made to the table's partitioning
    while its files were written: the retry, counted in the write process, and the conflict are scraped from the
    serving process's endpoint."""
    properties = sqlite_catalog(tmp_path)
    port = free_ports(1)[0]
    server = start_writing_server(properties, metrics_port=port)
    table = "tests.raced"
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            client.write(table, _drivers(range(10)), entity_keys=["driver_id"], event_time="event_timestamp")
            before = scrape(port)
            where = client.describe(table)["location"]
            files_before = local_files(where)
            big = _drivers(range(100, 100 + 4 * TEST_CHUNK_BYTES // 16), extra=True)  # evolves: a commit of its own

            def racing_a_repartition() -> Iterator[pa.RecordBatch]:
                batches = big.to_batches(max_chunksize=big.num_rows // 4)
                yield from batches[:-1]
                wait_until(lambda: local_files(where) != files_before, what="the put to write files")
                catalog = FeatureCatalog("default", properties).catalog
                loaded = catalog.load_table(table)
                with loaded.update_spec() as update:
                    update.remove_field("event_timestamp_month")
                loaded = catalog.load_table(table)
                loaded.append(_drivers(range(1000, 1001)).cast(loaded.schema().as_arrow()))
                yield batches[-1]

            stream = pa.RecordBatchReader.from_batches(big.schema, racing_a_repartition())
            with pytest.raises(ConflictError, match="partitioning"):
                client.write(table, stream, evolve=True)
        assert server.parts.writes is not None and server.parts.writes.pid is not None  # it ran there
        after = scrape(port)
        retries, conflicts = "flight_commit_retries_total", "flight_commit_conflicts_total"
        assert (value(after, retries) or 0) - (value(before, retries) or 0) >= 1
        assert (value(after, conflicts) or 0) - (value(before, conflicts) or 0) == 1
    finally:
        server.shutdown()


# The caches every server process keeps: scraped from the write process too, under `process="write"`.
SHARED_CACHES = {
    *("plans", "positions", "tables", "parsed_metadata"),
    *("snapshot_json", "manifest_lists", "manifests", "appended_files", "appended_messages"),
}
CACHE_FAMILIES = ("flight_cache_entries", "flight_cache_bytes", "flight_cache_weight", "flight_cache_hits_total")


def caches_of(samples: Samples, process: str) -> set[str]:
    """The caches of `process` ("serving", "write") that the scrape shows."""
    entries = [dict(labels) for name, labels in samples if name == "flight_cache_entries"]
    return {labels["cache"] for labels in entries if labels["process"] == process}


def started_at(pid: int) -> float:
    """A process's start time, worked out as prometheus_client's `ProcessCollector` does: boot time plus the clock
    ticks from boot to the process's start."""
    boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line[:6] == "btime ")
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
    return boot + ticks / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process figures are read from /proc")
def test_the_write_process_caches_and_figures_are_scraped_from_the_serving_process(tmp_path: Path) -> None:
    """Puts, a maintenance round and a snapshot expiry run in the write process: its caches (`process="write"`,
    beside the same kinds of the serving process) and its memory, CPU time and start time are scraped from the
    serving process's endpoint, as its `health` says them."""
    port = free_ports(1)[0]
    properties = sqlite_catalog(tmp_path)
    server = start_writing_server(properties, metrics_port=port, compact_min_files=3)
    writes = server.parts.writes
    assert writes is not None
    table = "tests.written"
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            client.write(table, _drivers(range(10)), entity_keys=["driver_id"], event_time="event_timestamp")
            for first in (10, 20, 30):
                client.write(table, _drivers(range(first, first + 10)))
            before = scrape(port)
            assert client.run_maintenance(table)["data_files_compacted"] > 0
            assert client.expire_snapshots(table, older_than="2100-01-01T00:00:00Z", retain_last=2)["expired"]
            client.write(table, _drivers(range(40, 50)))
            last = scrape(port)
            client.write(table, _drivers(range(50, 60)))
            after = scrape(port)
            kept = len(client.describe(table)["snapshots"])
            health = client.health()["write_process"]
        pid = writes.pid
        assert pid is not None and health["pid"] == pid  # the same child all along

        def cache(samples: Samples, name: str, cache: str, **labels: str) -> float | None:
            return value(samples, name, cache=cache, process="write", **labels)

        for samples in (before, after):
            assert value(samples, "flight_write_process_up") == 1
            assert caches_of(samples, "write") == SHARED_CACHES
            assert caches_of(samples, "serving") == SHARED_CACHES | {"scan", "training_set", "online_index"}
            assert all("process" in dict(labels) for name, labels in samples if name.startswith(CACHE_FAMILIES))
            assert cache(samples, "flight_cache_max_bytes", "snapshot_json") == 16 << 20
            assert cache(samples, "flight_cache_weight", "appended_files", unit="values") > 0  # its puts' files
            assert cache(samples, "flight_cache_bytes", "appended_messages") > 0  # its answers to them
            assert value(samples, "flight_write_process_resident_memory_bytes") > 50 << 20
            assert value(samples, "flight_write_process_start_time_seconds") == pytest.approx(started_at(pid), abs=0.02)
        json_bytes = cache(after, "flight_cache_bytes", "snapshot_json")
        assert 0 < cache(before, "flight_cache_bytes", "snapshot_json") < json_bytes
        snapshots = FeatureCatalog("default", properties).catalog.load_table(table).metadata.snapshots
        assert json_bytes >= sum(len(snapshot.model_dump_json()) for snapshot in snapshots)  # the file's, at least
        hits = "flight_cache_hits_total"
        assert cache(after, hits, "snapshot_json") > cache(before, hits, "snapshot_json") > 0
        misses = "flight_cache_misses_total"
        # the last put's metadata file: its new snapshot's JSON made, every other one's kept
        assert cache(after, misses, "snapshot_json") - cache(last, misses, "snapshot_json") == 1
        assert cache(after, hits, "snapshot_json") - cache(last, hits, "snapshot_json") == kept - 1
        assert cache(before, "flight_cache_entries", "manifest_lists") == 0  # nothing expired yet
        assert cache(after, "flight_cache_entries", "manifest_lists") >= 4  # the expiry read every snapshot's
        assert cache(after, "flight_cache_weight", "manifests", unit="paths") > 0
        cpu = "flight_write_process_cpu_seconds_total"
        assert 0 < value(before, cpu) <= value(after, cpu)
        # `health` says the same of the write process (nothing ran there in between that uses these caches)
        assert health["caches"].keys() == SHARED_CACHES
        json_kept = health["caches"]["snapshot_json"]
        assert (json_kept["entries"], json_kept["bytes"], json_kept["hits"]) == (
            cache(after, "flight_cache_entries", "snapshot_json"),
            cache(after, "flight_cache_bytes", "snapshot_json"),
            cache(after, hits, "snapshot_json"),
        )
        assert health["process"]["process_start_time_seconds"] == value(
            after, "flight_write_process_start_time_seconds"
        )
    finally:
        server.shutdown()


def test_maintenance_rounds_and_the_sizes_they_leave_are_scraped_per_table(tmp_path: Path) -> None:
    """What each table's maintenance rounds did (here, compactions run in the write process), when the last ran and
    last ran every step, and the table's size as the round left it; a round whose step fails (a data file storage
    lost) counts as failed and leaves the last success where it was. The counts match `health`'s totals."""
    port = free_ports(1)[0]
    server = start_writing_server(sqlite_catalog(tmp_path), metrics_port=port, compact_min_files=3)
    table, other = "tests.maintained", "tests.lost_a_file"
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            for name in (table, other):
                client.write(name, _drivers(range(10)), entity_keys=["driver_id"], event_time="event_timestamp")
                for first in (10, 20, 30):
                    client.write(name, _drivers(range(first, first + 10)))
            assert not any(n.startswith("flight_maintenance_") for n, _ in scrape(port))  # no round yet
            started = dt.datetime.now(UTC).timestamp()
            small = int(client.describe(table)["snapshots"][-1]["summary"]["total-data-files"])
            result = client.run_maintenance(table)
            compacted, added = result["data_files_compacted"], result["data_files_added"]
            assert compacted > added > 0 and result["error"] is None
            files = local_files(client.describe(other)["location"])
            assert files is not None
            min(files).unlink()  # storage lost one of the small files the compaction reads
            failed = client.run_maintenance(other)
            assert failed["error"] is not None and failed["data_files_compacted"] == 0
            samples = scrape(port)
            described = client.describe(table)
            totals = client.health()["maintenance"]
    finally:
        server.shutdown()

    def of(name: str, at: str) -> float | None:
        return value(samples, name, table=at)

    assert of("flight_maintenance_rounds_total", table) == of("flight_maintenance_rounds_total", other) == 1
    assert of("flight_maintenance_failed_rounds_total", table) == 0
    assert of("flight_maintenance_failed_rounds_total", other) == 1
    assert of("flight_maintenance_data_files_compacted_total", table) == compacted
    assert of("flight_maintenance_data_files_compacted_total", other) == 0
    assert of("flight_maintenance_snapshots_expired_total", table) == 0  # all younger than the age to expire
    assert of("flight_maintenance_gave_way_total", table) == 0
    assert started <= of("flight_maintenance_last_round_timestamp_seconds", table) <= dt.datetime.now(UTC).timestamp()
    assert of("flight_maintenance_last_success_timestamp_seconds", table) == of(
        "flight_maintenance_last_round_timestamp_seconds", table
    )
    assert of("flight_maintenance_last_round_timestamp_seconds", other) is not None
    assert of("flight_maintenance_last_success_timestamp_seconds", other) is None  # no round of it ran every step
    summary = described["snapshots"][-1]["summary"]
    assert of("flight_table_snapshots", table) == len(described["snapshots"])  # the puts' and the compaction's
    assert described["snapshots"][-1]["operation"] == "replace"
    left = int(summary["total-data-files"])
    assert of("flight_table_data_files", table) == left == small - compacted + added  # as the compaction left it
    assert of("flight_table_records", table) == described["rows"] == 40
    assert of("flight_table_files_bytes", table) == int(summary["total-files-size"]) > 0
    assert of("flight_table_delete_files", table) == 0
    assert of("flight_table_data_files", other) == small  # nothing compacted
    for field, name in [("rounds", "rounds"), ("errors", "failed_rounds"), ("data_files_compacted", None)]:
        family = f"flight_maintenance_{name or field}_total"
        assert totals[field] == sum(v for (n, _), v in samples.items() if n == family)


def test_a_scrape_neither_waits_for_nor_fails_without_the_write_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the write process starts (its interpreter waits here for a gate the test opens), after it was killed,
    and with none at all (`--no-write-process`), a scrape answers at once, with the serving process's figures, no
    write process's, and `flight_write_process_up` 0 (absent without one); it starts none."""
    gate = tmp_path / "go"
    interpreter = tmp_path / "python"
    interpreter.write_text(f'#!/bin/sh\nwhile [ ! -e "{gate}" ]; do sleep 0.05; done\nexec "{sys.executable}" "$@"\n')
    interpreter.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(interpreter))
    for name in "ab":
        (tmp_path / name).mkdir()
    ports = free_ports(2)
    server = start_server(sqlite_catalog(tmp_path / "a"), metrics_port=ports[0], write_process=True)
    alone = start_server(sqlite_catalog(tmp_path / "b"), metrics_port=ports[1], write_process=False)
    writes = server.parts.writes
    assert writes is not None

    def without_the_write_process(samples: Samples) -> None:
        assert caches_of(samples, "write") == set()
        assert caches_of(samples, "serving") >= SHARED_CACHES
        assert not any(
            name.startswith("flight_write_process_") and name != "flight_write_process_up" for name, _ in samples
        )
        assert value(samples, "process_resident_memory_bytes") > 0

    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            client.write("tests.gated", _drivers(range(3)), entity_keys=["driver_id"], event_time="event_timestamp")
            starting = scrape(ports[0])
            assert writes.stats()["starting"]  # still: the scrape did not wait for it
            without_the_write_process(starting)
            assert value(starting, "flight_write_process_up") == 0
            gate.touch()
            wait_until(lambda: value(scrape(ports[0]), "flight_write_process_up") == 1, what="the write process")
            pid = writes.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: writes.pid is None, what="the write process to die")
            killed = scrape(ports[0])
            without_the_write_process(killed)
            assert value(killed, "flight_write_process_up") == 0
            assert writes.stats()["starts"] == 1 and writes.pid is None  # the scrape started none
            assert value(killed, "flight_writes_in_progress") == 0
        samples = scrape(ports[1])
        without_the_write_process(samples)
        assert value(samples, "flight_write_process_up") is None  # no write process to speak of
    finally:
        server.shutdown()
        alone.shutdown()


def test_a_catalog_that_refuses_connections_leaves_the_write_process_up(tmp_path: Path) -> None:
    """PostgreSQL refusing the catalog's database (`ALLOW_CONNECTIONS false`, its sessions ended): `health` fails,
    as it should, but a scrape still counts the write process up with its caches and figures: an alert on it must
    not fire for an outage of the catalog."""
    port = free_ports(1)[0]
    with postgres_server() as url:
        properties = {"type": "sql", "uri": url, "warehouse": (tmp_path / "wh").as_uri()}
        server = start_writing_server(properties, metrics_port=port)
        try:
            with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
                client.write(TABLE, _drivers(range(3)), entity_keys=["driver_id"], event_time="event_timestamp")
                engine = sqlalchemy.create_engine(url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
                database = sqlalchemy.engine.make_url(url).database
                with engine.connect() as admin:
                    quoted = admin.dialect.identifier_preparer.quote(database)
                    admin.execute(sqlalchemy.text(f"ALTER DATABASE {quoted} WITH ALLOW_CONNECTIONS false"))
                    ended = admin.execute(
                        sqlalchemy.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :db"),
                        {"db": database},
                    )
                    assert ended.rowcount > 0  # the servers' pooled sessions
                engine.dispose()
                with pytest.raises(FeatureServerError):
                    client.health()
            samples = scrape(port)
            assert value(samples, "flight_write_process_up") == 1
            assert caches_of(samples, "write") == SHARED_CACHES
            assert value(samples, "flight_write_process_resident_memory_bytes") > 0
        finally:
            server.shutdown()


def test_servers_in_one_process_count_apart_and_refusals_count(tmp_path: Path) -> None:
    """Two servers in one process keep their own metrics; calls that authentication or the concurrency limit
    refuse (in their middleware, before any handler) are counted too."""
    token = "metrics-reader-token-0123456789"
    for name in "ab":
        (tmp_path / name).mkdir()
    ports = free_ports(2)
    secured = start_server(
        sqlite_catalog(tmp_path / "a"),
        metrics_port=ports[0],
        auth_tokens=[{"name": "reader", "token": token, "permissions": ["read"]}],
    )
    limited = start_server(sqlite_catalog(tmp_path / "b"), metrics_port=ports[1], max_concurrent_requests=1)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{secured.port}") as client, pytest.raises(UnauthenticatedError):
            client.health()
        with FeatureClient(f"grpc://127.0.0.1:{limited.port}") as client, FeatureClient(client.location) as other:
            client.health()
            write_big(client, "tests.big", 2_000_000)  # far beyond flow control
            stream = client.scan("tests.big")
            stream.read_next_batch()  # ...and stop reading: the call holds the only slot
            with pytest.raises(ResourceExhaustedError):
                other.flight_info("tests.big")
            del stream
        unauthenticated = value(
            scrape(ports[0]), "flight_requests_total", method="do_action", kind="", code="UNAUTHENTICATED"
        )
        assert unauthenticated == 1
        samples = scrape(ports[1])
        assert value(samples, "flight_requests_total", method="do_action", kind="health", code="OK") == 1
        exhausted = value(
            samples, "flight_requests_total", method="get_flight_info", kind="", code="RESOURCE_EXHAUSTED"
        )
        assert exhausted == 1
        assert not any(dict(labels).get("code") == "UNAUTHENTICATED" for _, labels in samples)
    finally:
        secured.shutdown()
        limited.shutdown()
    with pytest.raises(OSError):
        scrape(ports[1])  # closed with its server


def test_conflicts_are_told_apart_from_other_unavailable_errors() -> None:
    """CONFLICT and RESOURCE_EXHAUSTED both travel as UNAVAILABLE; the code label takes the kind from the detail."""
    conflict = flight.FlightUnavailableError("lost", extra_info=json.dumps({"code": "CONFLICT"}).encode())
    assert code_of(conflict) == "CONFLICT"
    assert code_of(flight.FlightUnavailableError("gone")) == "UNAVAILABLE"
    assert code_of(pa.ArrowKeyError("no table")) == "NOT_FOUND"
    assert code_of(None) == "OK"
    metrics = ServerMetrics()
    metrics.completed("do_put", "write", code_of(conflict), 0.1)
    assert metrics.registry.get_sample_value("flight_commit_conflicts_total") == 1


def test_a_metrics_port_in_use_is_refused(tmp_path: Path) -> None:
    with flight.FlightServerBase("grpc://127.0.0.1:0") as busy:
        config = ServerConfig(port=0, catalog_properties=sqlite_catalog(tmp_path), metrics_port=busy.port)
        with pytest.raises(ValueError, match="--metrics-port"):
            FeatureFlightServer(config)
