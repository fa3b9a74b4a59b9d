"""Outages of what the server depends on, and what clients see during and after them: a PostgreSQL catalog restarted
(every pooled session ends) or refusing connections for a while, a commit whose outcome the catalog never confirmed,
and the object store (SeaweedFS's S3) stopped in the middle of a put and of a scan, then started again. The server
stays up throughout and serves again as soon as the service is back: calls that need the missing service answer
UNAVAILABLE with a message naming it (no traceback, server path or password), online lookups keep answering from
their index, and a put retried with its write_id commits once (docs/operations.md, "Failure behaviour")."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import sqlalchemy
from click.testing import CliRunner
from pyiceberg.exceptions import CommitStateUnknownException, ServerError, ServiceUnavailableError

from flight_client import FeatureClient, FeatureServerError, UnavailableError, WriteResult
from flight_server.base.outages import OutageLog, missing_file, outage
from flight_server.cli import health
from flight_server.iceberg import internals
from flight_server.online.store import refresh_error
from tests.conftest import local_files, start_server, start_writing_server, wait_until
from tests.services import (
    S3_ACCESS_KEY,
    S3_REGION,
    S3_SECRET_KEY,
    free_ports,
    pg_ctl,
    postgres_server,
    seaweedfs_server,
    start_seaweedfs,
    stop_seaweedfs,
)
from tests.test_metrics import scrape, value

UTC = dt.UTC
TABLE = "tests.drivers"
SMALL = "tests.small"
PASSWORD = "pg-s3cret-word"  # in the catalog's URI (trust authentication ignores it): never in a client's message
DAY = dt.datetime(2026, 1, 1, tzinfo=UTC)


def drivers(ids: range, rate: float = 1.0) -> pa.Table:
    return pa.table(
        {
            "driver_id": pa.array(ids, pa.int64()),
            "event_timestamp": pa.array([DAY] * len(ids), pa.timestamp("us", "UTC")),
            "rate": pa.array([rate] * len(ids), pa.float64()),
        }
    )


def first_write(client: FeatureClient, table: str = TABLE) -> None:
    client.write(table, drivers(range(3)), entity_keys=["driver_id"], event_time="event_timestamp")


def entities(*ids: int) -> pa.Table:
    later = DAY + dt.timedelta(days=1)
    return pa.table({"driver_id": pa.array(ids, pa.int64()), "event_timestamp": pa.array([later] * len(ids))})


def sql_catalog(url: str, warehouse: str) -> dict[str, str]:
    return {"type": "sql", "uri": url.replace("postgres@", f"postgres:{PASSWORD}@"), "warehouse": warehouse}


def admin(url: str) -> sqlalchemy.Engine:
    """A superuser's connection to the cluster's `postgres` database, outside the catalog's database."""
    return sqlalchemy.create_engine(url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")


def refuse_connections(url: str, refuse: bool = True, of: int | None = None) -> None:
    """The catalog's database refuses new connections and its sessions end (`refuse`), or takes them again: as
    tests/test_metrics.py makes PostgreSQL refuse, a primary gone with no replica promoted yet. With `of` (a process
    id) only that process's sessions end: the others' pooled sessions go on working, as when a network partition
    cuts one host off the database."""
    engine = admin(url)
    database = sqlalchemy.engine.make_url(url).database
    with engine.connect() as connection:
        quoted = connection.dialect.identifier_preparer.quote(database)
        connection.execute(sqlalchemy.text(f"ALTER DATABASE {quoted} WITH ALLOW_CONNECTIONS {str(not refuse).lower()}"))
        if refuse:
            ports = sorted(tcp_ports(of)) if of is not None else None
            connection.execute(
                sqlalchemy.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :db"
                    + (" AND client_port = ANY(:ports)" if ports is not None else "")
                ),
                {"db": database, "ports": ports},
            )
    engine.dispose()


def tcp_ports(pid: int) -> set[int]:
    """The local ports of process `pid`'s TCP sockets (from /proc: its descriptors' socket inodes)."""
    fds = Path(f"/proc/{pid}/fd")
    inodes = set()
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):  # closed since it was listed
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def unavailable(call: object, service: str) -> FeatureServerError:
    """The error of a call made while `service` is away: UNAVAILABLE, naming it, one clean line."""
    assert callable(call)
    with pytest.raises(UnavailableError) as raised:
        call()
    message = str(raised.value)
    assert raised.value.code == "UNAVAILABLE", message
    assert f"the {service} is unavailable" in message or "did not confirm the commit" in message, message
    for leak in ("Traceback", "/tmp", "postgresql", PASSWORD, 'File "', "sqlalche.me", "http://"):
        assert leak not in message, message
    return raised.value


def rows_of(client: FeatureClient, table: str = TABLE) -> list[int]:
    return sorted(client.read_table(table).column("driver_id").to_pylist())


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture
def database(postgres: str) -> Iterator[str]:
    """The URL of a fresh catalog database of the module's cluster, so that each test starts from no tables."""
    name = f"outage_{uuid.uuid4().hex[:12]}"
    with admin(postgres).connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    yield postgres.rsplit("/", 1)[0] + "/" + name


def test_a_restarted_postgresql_catalog_is_used_again_at_once_by_both_processes(database: str, tmp_path: Path) -> None:
    """`pg_ctl restart` ends every session the serving process and the write process pooled. The next calls of
    each kind succeed at the first try: pooled connections are tested before use (`pool_pre_ping`, which the server
    sets on a SQL catalog of a database server), so no call fails on a dead one. Without it the first call of each
    process failed (`OperationalError: server closed the connection unexpectedly`): INTERNAL, UNAVAILABLE since the
    server tells a catalog outage from a bug."""
    server = start_writing_server(sql_catalog(database, (tmp_path / "wh").as_uri()))
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}", timeout=30) as client:
            first_write(client)  # in the write process: its pool holds a session now
            assert rows_of(client) == [0, 1, 2]  # and the serving process's
            pg_ctl(database, "restart", "-m", "fast")
            assert client.health()["status"] == "ok"  # the serving process first: nothing warmed its pool
            assert client.describe(TABLE)["rows"] == 3
            assert rows_of(client) == [0, 1, 2]
            assert client.get_historical_features(entities(1), [f"{TABLE}:rate"]).column("rate").to_pylist() == [1.0]
            assert client.write(TABLE, drivers(range(3, 5))).rows == 2  # the write process's first call since
            assert client.run_maintenance(TABLE)["table"] == TABLE
            assert rows_of(client) == [0, 1, 2, 3, 4]
    finally:
        server.shutdown()


def test_a_catalog_that_refuses_connections_for_a_while(
    database: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """PostgreSQL refuses the catalog's database and ends its sessions while a put streams (after it wrote a
    file), then takes connections again. The put answers UNAVAILABLE naming the catalog, and its files are deleted.

    During: online lookups answer from their index (stale, not failing), its lag grows and its refreshes are
    counted failing, their failure is logged once (not at every poll); scans, training sets, describe, health,
    maintenance, puts, lookups `as_of` a time and those of a table not indexed yet answer UNAVAILABLE naming the
    catalog; the put (in the write process) leaves no file. A scan whose files the scan cache holds fails too: it
    promises the table's current snapshot, which only the catalog knows; but tickets planned before the outage (a
    scan's, a training set's) and a scan of a snapshot by id are read, as the server last loaded the table: a
    snapshot never changes. The failed maintenance round is counted
    (`flight_maintenance_failed_rounds_total`, which `FlightMaintenanceFailing` watches). After: everything works
    without restarting the server, the index catches up (and the log says its refreshes work again), and the put
    retried with its write_id commits once."""
    warehouse = tmp_path / "wh"
    metrics = free_ports(1)[0]
    server = start_writing_server(
        sql_catalog(database, warehouse.as_uri()), metrics_port=metrics, online_refresh_seconds=0.1
    )
    caplog.set_level(logging.INFO, logger="flight_server")
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}", timeout=30) as client:
            first_write(client)
            lookup = {"driver_id": [1, 2]}
            assert client.get_online_features(lookup, [f"{TABLE}:rate"]).column("rate").to_pylist() == [1.0, 1.0]
            assert rows_of(client) == [0, 1, 2]  # now in the scan cache
            planned = client.flight_info(TABLE)
            trained = client.training_set_info(
                {"driver_id": [1, 2], "event_timestamp": [DAY.isoformat()] * 2}, [f"{TABLE}:rate"]
            )
            expected = client.read_endpoint(trained.endpoints[0]).read_all()
            pinned = client.describe(TABLE)["current_snapshot_id"]
            first_write(client, SMALL)  # no online index
            location = client.describe(TABLE)["location"]
            files = local_files(location)
            labels = {"table": TABLE}

            schema = drivers(range(0)).schema

            def refusing() -> Iterator[pa.RecordBatch]:
                """A put's batches; the catalog refuses once the put wrote a file of its own."""
                yield from big(1_000, 20_000, 4)
                wait_until(lambda: len(local_files(location) or ()) > len(files or ()), what="a file of the put")
                refuse_connections(database)
                yield from big(81_000, 20_000, 2)

            capfd.readouterr()
            mark = len(caplog.records)
            midway = pa.RecordBatchReader.from_batches(schema, refusing())
            unavailable(lambda: client.write(TABLE, midway, write_id="w-big"), "catalog")
            assert local_files(location) == files  # the files it wrote were deleted
            wait_until(lambda: value(scrape(metrics), "flight_online_index_refresh_failing", **labels) == 1)
            lag = value(scrape(metrics), "flight_online_index_lag_seconds", **labels) or 0.0
            wait_until(
                lambda: (value(scrape(metrics), "flight_online_index_lag_seconds", **labels) or 0.0) > lag + 1.0,
                what="the index lag to grow",
            )
            stale = client.get_online_features(lookup, [f"{TABLE}:rate"])
            assert stale.column("rate").to_pylist() == [1.0, 1.0]
            logged = [r.getMessage() for r in caplog.records[mark:] if "online" in r.getMessage()]  # refreshes'
            # Ten polls or more, logged once per distinct failure: the first poll may meet its session ended (a
            # failure of its own) before the others meet connections refused.
            assert 1 <= len(logged) <= 2 and all("refresh failed; serving snapshot" in m for m in logged), logged
            child = [
                line for line in capfd.readouterr().err.splitlines() if "failed: the catalog is unavailable" in line
            ]
            assert 1 <= len(child) <= 2, child  # the write process, which plans each refresh (as above)

            unavailable(lambda: client.read_table(TABLE), "catalog")
            # Tickets planned before pin their snapshots, which never change: read as the server last loaded the
            # table, as a training job's workers would go on reading through a catalog's failover.
            assert sorted(client.read_endpoint(planned.endpoints[0]).read_all().column("driver_id").to_pylist()) == [
                0,
                1,
                2,
            ]
            assert client.read_endpoint(trained.endpoints[0]).read_all().equals(expected)
            by_id = client.read_table(TABLE, snapshot_id=pinned)  # time travel to a snapshot by its id, likewise
            assert sorted(by_id.column("driver_id").to_pylist()) == [0, 1, 2]
            pinned_set = client.get_historical_features(entities(1), [f"{TABLE}:rate"], snapshot_ids={TABLE: pinned})
            assert pinned_set.column("rate").to_pylist() == [1.0]  # a training set pinning every table it reads
            unavailable(lambda: client.read_table(TABLE, as_of=DAY), "catalog")  # only the catalog knows the log now
            unavailable(lambda: client.get_online_features(lookup, [f"{SMALL}:rate"]), "catalog")
            unavailable(lambda: client.get_online_features(lookup, [f"{TABLE}:rate"], as_of=DAY), "catalog")
            unavailable(lambda: client.get_historical_features(entities(1), [f"{TABLE}:rate"]), "catalog")
            unavailable(lambda: client.describe(TABLE), "catalog")
            unavailable(client.health, "catalog")
            ready = client.health(catalog=False)  # a readiness check: the server answers, the catalog aside
            assert ready["status"] == "ok" and ready["catalog_checked"] is False
            probe = CliRunner().invoke(health, ["--location", client.location, "--no-catalog"])
            assert probe.exit_code == 0, probe.output
            assert CliRunner().invoke(health, ["--location", client.location]).exit_code == 1
            unavailable(lambda: client.run_maintenance(TABLE), "catalog")
            assert value(scrape(metrics), "flight_maintenance_failed_rounds_total", **labels) == 1  # alerts see it
            unavailable(lambda: client.write(TABLE, drivers(range(3, 5), 2.0), write_id="w-1"), "catalog")
            assert local_files(location) == files  # the put's files were deleted

            refuse_connections(database, refuse=False)
            assert client.health()["catalog_checked"] is True and client.health()["status"] == "ok"
            written = client.write(TABLE, drivers(range(3, 5), 2.0), write_id="w-1")
            again = client.write(TABLE, drivers(range(3, 5), 2.0), write_id="w-1")
            assert again.duplicate and again.snapshot_id == written.snapshot_id
            assert rows_of(client) == [0, 1, 2, 3, 4]
            whole = pa.RecordBatchReader.from_batches(schema, big(1_000, 20_000, 6))
            assert client.write(TABLE, whole, write_id="w-big").rows == 120_000
            assert client.write(TABLE, drivers(range(1_000, 1_001)), write_id="w-big").duplicate
            assert len(rows_of(client)) == 120_005
            wait_until(
                lambda: (
                    client.get_online_features({"driver_id": [3]}, [f"{TABLE}:rate"]).column("rate").to_pylist()
                    == [2.0]
                ),
                what="the online index to catch up",
            )
            samples = scrape(metrics)
            assert value(samples, "flight_online_index_refresh_failing", **labels) == 0
            assert (value(samples, "flight_online_index_lag_seconds", **labels) or 0.0) < 5.0
            assert any("refreshes work again" in r.getMessage() for r in caplog.records)
            assert client.run_maintenance(TABLE)["error"] is None
            samples = scrape(metrics)
            assert value(samples, "flight_maintenance_rounds_total", **labels) == 2
            assert value(samples, "flight_maintenance_failed_rounds_total", **labels) == 1
    finally:
        server.shutdown()


def test_describe_says_why_online_refreshes_fail_while_the_catalog_is_away_from_the_write_process(
    database: str, tmp_path: Path
) -> None:
    """The write process (which plans each online refresh) loses the catalog: its sessions end and the database
    refuses new ones, while the serving process's pooled session goes on answering `describe`. The table's `online`
    says why its refreshes fail, in the outage's words (not `internal error (FlightUnavailableError)`, the class of
    the relayed error), and says nothing once the catalog answers again."""
    server = start_writing_server(sql_catalog(database, (tmp_path / "wh").as_uri()), online_refresh_seconds=0.1)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}", timeout=30) as client:
            first_write(client)
            assert client.get_online_features({"driver_id": [1]}, [f"{TABLE}:rate"]).column("rate").to_pylist() == [1.0]
            assert client.describe(TABLE)["online"]["error"] is None
            child = client.health()["write_process"]["pid"]
            errors: list[str | None] = []

            def failing() -> bool:
                try:
                    errors.append(client.describe(TABLE)["online"]["error"])
                except UnavailableError:  # the serving process's one pooled session was in use (a refresh's poll)
                    return False
                return errors[-1] is not None

            refuse_connections(database, of=child)
            try:
                wait_until(failing, what="a refresh to fail")
            finally:
                refuse_connections(database, refuse=False)
            error = errors[-1]
            assert error is not None and error.startswith("the catalog is unavailable ("), error
            assert "\n" not in error and "internal error" not in error, error
            for leak in ("Traceback", "/tmp", "postgresql", PASSWORD, "Flight"):
                assert leak not in error, error
            wait_until(lambda: client.describe(TABLE)["online"]["error"] is None, what="refreshes to work again")
    finally:
        server.shutdown()


@pytest.mark.parametrize("write_process", [False, True])
def test_a_commit_the_catalog_never_confirmed_keeps_its_files_and_its_retry_commits_once(
    database: str, tmp_path: Path, write_process: bool
) -> None:
    """The catalog's session ends while the put's commit waits on the table's row (another session locks it): the
    outcome is unknown to the server, which keeps the put's files and answers UNAVAILABLE telling to retry with the
    write_id; the retry commits once. In the serving process (`--no-write-process`) and in the write process."""
    warehouse = tmp_path / "wh"
    start = start_writing_server if write_process else start_server
    server = start(sql_catalog(database, warehouse.as_uri()))
    name = sqlalchemy.engine.make_url(database).database
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}", timeout=30) as client:
            first_write(client)
            before = set((warehouse / "tests").rglob("*.parquet"))
            catalog = sqlalchemy.create_engine(database)
            with catalog.connect() as locker:
                locker.execute(
                    sqlalchemy.text("SELECT 1 FROM iceberg_tables WHERE table_name = 'drivers' FOR UPDATE")
                )  # the commit's compare-and-swap waits on this row
                outcome: list[BaseException | None] = []

                def put() -> None:
                    try:
                        client.write(TABLE, drivers(range(3, 5), 2.0), write_id="w-unknown")
                        outcome.append(None)
                    except FeatureServerError as exc:
                        outcome.append(exc)

                putting = threading.Thread(target=put)
                putting.start()
                with admin(database).connect() as connection:
                    waiting = sqlalchemy.text(
                        "SELECT pid FROM pg_stat_activity WHERE datname = :db AND wait_event_type = 'Lock'"
                    )
                    blocked: list[int] = []
                    wait_until(
                        lambda: bool(blocked.extend(connection.execute(waiting, {"db": name}).scalars()) or blocked),
                        what="the commit to wait on the row",
                    )
                    connection.execute(sqlalchemy.text("SELECT pg_terminate_backend(:pid)"), {"pid": blocked[0]})
                putting.join(30)
                locker.rollback()
            catalog.dispose()
            error = outcome[0]
            assert isinstance(error, UnavailableError), error
            assert "did not confirm the commit" in str(error) and "write_id" in str(error), str(error)
            assert "Traceback" not in str(error) and PASSWORD not in str(error)
            assert set((warehouse / "tests").rglob("*.parquet")) > before  # kept: the table might reference them
            assert rows_of(client) == [0, 1, 2]  # it had not landed
            written = client.write(TABLE, drivers(range(3, 5), 2.0), write_id="w-unknown")
            assert not written.duplicate
            assert client.write(TABLE, drivers(range(3, 5), 2.0), write_id="w-unknown").duplicate
            assert rows_of(client) == [0, 1, 2, 3, 4]
    finally:
        server.shutdown()


@pytest.mark.parametrize("mode", ["append", "overwrite"])
def test_a_commit_the_catalog_refused_outright_deletes_its_files_and_its_retry_commits_once(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """PostgreSQL refuses connections from the moment the put's commit writes its metadata file, after the put's
    last read of the catalog: the commit's connection fails to open, so nothing of it was sent and it surely did not
    land. The put answers UNAVAILABLE naming the catalog (not `did not confirm the commit`), and every file written
    for it (data, manifests, metadata) is deleted; its retry with the write_id commits once. A plain append (its
    group's commit) and an overwrite (committed alone). The hook only picks the moment; the refusal is real."""
    warehouse = tmp_path / "wh"
    server = start_server(sql_catalog(database, warehouse.as_uri()))
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}", timeout=30) as client:
            first_write(client)
            before = files_under(warehouse)
            write_metadata = internals.write_metadata

            def refusing(*args: Any) -> None:
                monkeypatch.setattr(internals, "write_metadata", write_metadata)  # once
                refuse_connections(database)
                write_metadata(*args)

            monkeypatch.setattr(internals, "write_metadata", refusing)

            def put() -> WriteResult:
                return client.write(TABLE, drivers(range(3, 5), 2.0), mode=mode, write_id="w-refused")

            error = unavailable(put, "catalog")
            assert "did not confirm" not in str(error) and "write_id" not in str(error), str(error)
            assert files_under(warehouse) == before  # nothing left of it
            refuse_connections(database, refuse=False)
            assert not put().duplicate
            assert put().duplicate
            assert rows_of(client) == ([0, 1, 2, 3, 4] if mode == "append" else [3, 4])
    finally:
        server.shutdown()


def files_under(folder: Path) -> set[Path]:
    """Every file under `folder`: data, manifests, manifest lists, metadata."""
    return {path for path in folder.rglob("*") if path.is_file()}


def s3_files(properties: dict[str, str], prefix: str) -> set[str]:
    """The Parquet objects under `prefix` (`bucket/path`) of the object store."""
    store = pafs.S3FileSystem(
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
        region=S3_REGION,
        endpoint_override=properties["s3.endpoint"],
        scheme="http",
    )
    found = store.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return {f.path for f in found if f.path.endswith(".parquet")}


def big(start: int, count: int, batches: int) -> Iterator[pa.RecordBatch]:
    for i in range(batches):
        ids = range(start + i * count, start + (i + 1) * count)
        yield from drivers(ids).to_batches()


def test_the_object_store_stopped_during_a_put_and_a_scan(database: str) -> None:
    """SeaweedFS (the warehouse's S3; the catalog is PostgreSQL) stops while a put streams, after it wrote a file,
    and between a scan's plan and its read; then starts again on its ports and data. The put fails UNAVAILABLE
    naming the object store and commits nothing; the scan fails as clearly, within the client's timeout, while a
    scan of files the scan cache holds and online lookups keep answering; after the restart the same server scans
    and writes, the put retried with its write_id commits once, and the files the failed put could not delete
    while the store was away are what `remove_orphan_files` removes. Puts in the write process.

    A second server uses SeaweedFS's REST catalog, which goes away with it (puts in the serving process): its
    lookups keep answering, its puts and `health` answer UNAVAILABLE naming the catalog, and after the restart its
    put retried with its write_id commits once."""
    with seaweedfs_server() as weed:
        s3 = {k: v for k, v in weed.items() if k.startswith("s3.")}
        properties = {**sql_catalog(database, "s3://warehouse/outage"), **s3}
        server = start_writing_server(properties)
        rest = start_server(dict(weed), online_refresh_seconds=0.1)
        try:
            with (
                FeatureClient(f"grpc://127.0.0.1:{server.port}", timeout=60) as client,
                FeatureClient(f"grpc://127.0.0.1:{rest.port}", timeout=60) as other,
            ):
                first_write(client)
                location = client.describe(TABLE)["location"].removeprefix("s3://")
                before = s3_files(weed, location)
                schema = drivers(range(0)).schema

                def stopping() -> Iterator[pa.RecordBatch]:
                    """The put's batches; the object store stops once the put wrote a file of its own."""
                    yield from big(1_000, 20_000, 4)  # several chunks of `TEST_CHUNK_BYTES`
                    wait_until(lambda: len(s3_files(weed, location)) > len(before), what="a file of the put")
                    stop_seaweedfs(weed)
                    yield from big(81_000, 20_000, 2)

                unavailable(
                    lambda: client.write(TABLE, pa.RecordBatchReader.from_batches(schema, stopping()), write_id="big"),
                    "object store",
                )
                start_seaweedfs(weed)
                assert rows_of(client) == [0, 1, 2]  # nothing committed
                left = s3_files(weed, location) - before
                whole = pa.RecordBatchReader.from_batches(schema, big(1_000, 20_000, 6))
                assert client.write(TABLE, whole, write_id="big").rows == 120_000
                again = client.write(TABLE, drivers(range(1_000, 1_001)), write_id="big")
                assert again.duplicate

                lookup = {"driver_id": [1]}
                first_write(client, SMALL)
                assert rows_of(client, SMALL) == [0, 1, 2]  # in the scan cache now
                assert client.get_online_features(lookup, [f"{SMALL}:rate"]).column("rate").to_pylist() == [1.0]
                first_write(other)
                assert other.get_online_features(lookup, [f"{TABLE}:rate"]).column("rate").to_pylist() == [1.0]
                info = client.flight_info(TABLE)  # planned with the store up, read with it down
                stop_seaweedfs(weed)
                try:
                    unavailable(lambda: client.read_endpoint(info.endpoints[0]).read_all(), "object store")
                    assert rows_of(client, SMALL) == [0, 1, 2]  # its decoded files in the scan cache
                    online = client.get_online_features(lookup, [f"{SMALL}:rate"])
                    assert online.column("rate").to_pylist() == [1.0]  # from the index in memory
                    online = other.get_online_features(lookup, [f"{TABLE}:rate"])
                    assert online.column("rate").to_pylist() == [1.0]
                    unavailable(lambda: other.write(TABLE, drivers(range(1, 2), 2.0), write_id="rest-1"), "catalog")
                    unavailable(other.health, "catalog")
                finally:
                    start_seaweedfs(weed)
                assert len(rows_of(client)) == 120_003
                assert not other.write(TABLE, drivers(range(1, 2), 2.0), write_id="rest-1").duplicate
                assert other.write(TABLE, drivers(range(1, 2), 2.0), write_id="rest-1").duplicate
                assert len(rows_of(other)) == 4
                wait_until(
                    lambda: other.get_online_features(lookup, [f"{TABLE}:rate"]).column("rate").to_pylist() == [2.0],
                    what="the REST catalog's online index to catch up",
                )

                assert left  # what the failed put wrote, and could not delete while the store was away
                removed = client.remove_orphan_files(TABLE, older_than=dt.datetime.now(UTC))
                assert left <= {p.removeprefix("s3://") for p in removed["files"]}, removed
                assert not (s3_files(weed, location) & left)
                assert len(rows_of(client)) == 120_003
        finally:
            rest.shutdown()
            server.shutdown()


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (
            ServiceUnavailableError("503: slow down"),
            "the catalog is unavailable (it answered: ServiceUnavailableError)",
        ),
        (ServerError("502: bad gateway"), "the catalog is unavailable (it answered: ServerError)"),
        (
            OSError("When reading key 'a/b.parquet': AWS Error SERVICE_UNAVAILABLE during GetObject operation"),
            "the object store is unavailable (service unavailable)",
        ),
        (CommitStateUnknownException("the commit's outcome is unknown (ServerError)"), "did not confirm the commit"),
        (OSError(errno.ENOSPC, "No space left on device"), None),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/warehouse/x.parquet"), None),
        (ValueError("a bug"), None),
    ],
)
def test_which_failures_are_outages(error: Exception, message: str | None) -> None:
    """A REST catalog's 5xx answers (which SeaweedFS does not give on demand) are outages of the catalog, an S3 error
    saying the store is busy or away one of the object store; a full disk, a missing file and a bug are not."""
    found = outage(error)
    assert (found is None) if message is None else (found is not None and message in found), found


def test_a_refresh_failing_in_the_serving_process_says_why_in_one_line() -> None:
    """Without a write process the refresh meets the catalog library's error itself: `describe` shows the outage's
    message for a connection refused (a real one: no server listens on the port), and a bug's class alone."""
    engine = sqlalchemy.create_engine(f"postgresql+psycopg2://postgres:{PASSWORD}@127.0.0.1:{free_ports(1)[0]}/x")
    with pytest.raises(sqlalchemy.exc.OperationalError) as refused:
        engine.connect()
    engine.dispose()
    message = refresh_error(refused.value)
    assert message.startswith("the catalog is unavailable (connection refused)"), message
    assert PASSWORD not in message and "127.0.0.1" not in message
    bug = refresh_error(ValueError("/srv/warehouse/x.parquet is odd"))
    assert bug == "internal error (ValueError); the server's log has the details"


def test_calls_failing_for_an_outage_are_logged_once_a_minute_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    """The first call failing with a message is logged; the next ones within the minute are counted, and the first
    line after it says how many there were."""
    log = OutageLog(logging.getLogger("tests.outages"))
    caplog.set_level(logging.WARNING, logger="tests.outages")
    error = ConnectionRefusedError(111, "Connection refused")
    for _ in range(3):
        log.failed("do_get", "the catalog is unavailable (connection refused)", error)
    log.failed("do_put", "the object store is unavailable (network connection)", error)  # another message
    assert [r.getMessage().split(" (ConnectionRefusedError")[0] for r in caplog.records] == [
        "do_get failed: the catalog is unavailable (connection refused)",
        "do_put failed: the object store is unavailable (network connection)",
    ]
    log.every = 0.0  # as if the minute had passed
    log.failed("do_get", "the catalog is unavailable (connection refused)", error)
    assert "; 2 more call(s) failed so in the last 0 s" in caplog.records[-1].getMessage()


def test_a_missing_file_is_told_apart_from_an_object_store_outage() -> None:
    """`missing_file`: FileNotFoundError, and pyarrow's S3 "no such key" for an object deleted between its opening
    and its reading (a plain OSError, as SeaweedFS answered a compaction whose base another replica expired), say a
    file is gone (a race lost to an expiry, when the snapshot planned on is gone too); an unreachable store does not."""
    assert missing_file(FileNotFoundError("Cannot open file, does not exist: s3://b/t/metadata/snap-1.avro"))
    assert missing_file(OSError("AWS Error RESOURCE_NOT_FOUND during GetObject operation: "))
    assert missing_file(OSError("AWS Error NO_SUCH_KEY during GetObject operation: The specified key does not exist."))
    unreachable = OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7, Couldn't connect")
    assert not missing_file(unreachable) and outage(unreachable) is not None
    assert not missing_file(PermissionError("Cannot open file, access denied: s3://b/t/data/x.parquet"))
    assert not missing_file(ValueError("AWS Error NO_SUCH_KEY"))
