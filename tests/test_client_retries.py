"""`FeatureClient(retry_seconds=...)`: reads, and puts with a `write_id` of rows held in memory, ride through a server
that goes away and comes back on its address, as a replica does in a rolling restart; without it they fail at once.
A put is sent again however it was cut off (its server away, its write process killed, its commit unconfirmed by
the catalog, its server killed between its commit and its answer) and lands exactly once."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import os
import signal
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pytest
from pyiceberg.catalog import load_catalog

from flight_client import FeatureClient, UnavailableError, WriteResult
from flight_server.transport.service import FeatureFlightServer
from tests.conftest import catalog_env, free_ports, listening, sqlite_catalog, start_server, wait_until
from tests.test_crash_group_commit import frozen_without_locks
from tests.test_group_commit import committed_ids
from tests.test_orphans import folder
from tests.test_write_process import alive, serving

TABLE = "tests.drivers"
T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


def drivers(n: int, first: int = 0) -> pa.Table:
    return pa.table(
        {
            "driver_id": pa.array(range(first, first + n), pa.int64()),
            "event_timestamp": pa.array([T0] * n, pa.timestamp("us", "UTC")),
            "rate": pa.array([float(i) for i in range(n)], pa.float64()),
        }
    )


class _Retried(logging.Handler):
    """Set once the client says it will try again: the moment to bring the server back."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "trying again" in record.getMessage():
            self.event.set()


def back_once_retried(start: Callable[[], FeatureFlightServer]) -> tuple[threading.Thread, list[FeatureFlightServer]]:
    """A thread that starts the server again once the client has been refused and said it retries."""
    retried = _Retried()
    logger = logging.getLogger("flight_client.client")
    logger.addHandler(retried)
    logger.setLevel(logging.INFO)
    started: list[FeatureFlightServer] = []

    def restart() -> None:
        try:
            if retried.event.wait(60):
                started.append(start())
        finally:
            logger.removeHandler(retried)

    thread = threading.Thread(target=restart)
    thread.start()
    return thread, started


def test_reads_are_tried_again_until_the_server_is_back(tmp_path: Path) -> None:
    """A server stops and a new one starts on its address (a replica restarting): a ticket planned before, a
    training set's plan and a whole-table read each succeed with `retry_seconds`, tried again once refused; without
    it the same read fails at once, and with a short one it fails once the time is up."""
    catalog = sqlite_catalog(tmp_path)
    port = free_ports(1)[0]

    def start() -> FeatureFlightServer:
        return start_server(catalog, port=port)

    server = start()
    location = f"grpc://127.0.0.1:{port}"
    with FeatureClient(location, retry_seconds=60) as client:
        client.write(TABLE, drivers(5), entity_keys=["driver_id"], event_time="event_timestamp")
        info = client.flight_info(TABLE)
        server.shutdown()
        with FeatureClient(location) as impatient, pytest.raises(UnavailableError):
            impatient.read_endpoint(info.endpoints[0])
        with FeatureClient(location, retry_seconds=0.3) as brief, pytest.raises(UnavailableError):
            brief.read_table(TABLE)

        thread, started = back_once_retried(start)
        try:
            rows = client.read_endpoint(info.endpoints[0]).read_all()
        finally:
            thread.join(60)
        assert sorted(rows.column("driver_id").to_pylist()) == [0, 1, 2, 3, 4]
        started.pop().shutdown()

        entities = {"driver_id": [1, 2], "event_timestamp": ["2025-01-02T00:00:00Z"] * 2}
        thread, started = back_once_retried(start)
        try:
            planned = client.training_set_info(entities, [f"{TABLE}:rate"])
        finally:
            thread.join(60)
        assert client.read_endpoint(planned.endpoints[0]).read_all().column("rate").to_pylist() == [1.0, 2.0]
        started.pop().shutdown()

        thread, started = back_once_retried(start)
        try:
            assert client.read_table(TABLE).num_rows == 5
        finally:
            thread.join(60)
        started.pop().shutdown()


def test_retry_seconds_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="retry_seconds"):
        FeatureClient("grpc://127.0.0.1:1", retry_seconds=-1)


DEFINITION = {"entity_keys": ["driver_id"], "event_time": "event_timestamp", "partition_by": []}


def recorded(properties: dict[str, str], write_id: str) -> list[int]:
    """The snapshots of TABLE whose summary records `write_id`, read from the catalog itself (pyiceberg)."""
    table = load_catalog("default", **properties).load_table(TABLE)
    return [
        s.snapshot_id
        for s in table.metadata.snapshots
        if write_id in committed_ids(s.summary.additional_properties if s.summary else {})
    ]


def test_a_put_with_a_write_id_is_sent_again_until_the_server_is_back_and_lands_once(tmp_path: Path) -> None:
    """The server stops and a new one starts on its address: a put with a write_id (rows given as a dict of columns,
    sent again from the table they became) is refused, tried again, and commits once."""
    properties = sqlite_catalog(tmp_path)
    port = free_ports(1)[0]

    def start() -> FeatureFlightServer:
        return start_server(properties, port=port)

    server = start()
    with FeatureClient(f"grpc://127.0.0.1:{port}", retry_seconds=60) as client:
        client.write(TABLE, drivers(2), **DEFINITION)
        server.shutdown()
        thread, started = back_once_retried(start)
        try:
            result = client.write(TABLE, drivers(3, first=10).to_pydict(), write_id="w-back")
        finally:
            thread.join(60)
        assert started, "the put was not refused while the server was away"
        assert (result.duplicate, result.rows, result.write_id) == (False, 3, "w-back")
        assert recorded(properties, "w-back") == [result.snapshot_id]
        again = client.write(TABLE, drivers(3, first=10), write_id="w-back")
        assert (again.duplicate, again.snapshot_id) == (True, result.snapshot_id)
        ids = client.read_table(TABLE).column("driver_id").to_pylist()
        assert sorted(ids) == [0, 1, 10, 11, 12]
        started.pop().shutdown()


@contextlib.contextmanager
def put_at_its_commit(
    client: FeatureClient, database: Path, data: pa.Table, write_id: str
) -> Iterator[tuple[Future[WriteResult], Callable[[], None]]]:
    """A put of `data` to TABLE (in a thread) whose commit waits: the SQLite catalog's write lock is held here
    (`BEGIN IMMEDIATE`: readers go on, a commit waits for it, up to SQLite's busy timeout of 5 s). Yields once the
    put has written the table's next metadata file (just before it asks the catalog to swap it in): the put, and
    the function that releases the lock (which the end calls too)."""
    metadata = folder(client, TABLE) / "metadata"
    written = set(os.listdir(metadata))
    lock = sqlite3.connect(database, isolation_level=None)

    def release() -> None:
        if lock.in_transaction:
            lock.execute("ROLLBACK")

    def committing() -> bool:
        return any(name.endswith(".metadata.json") for name in set(os.listdir(metadata)) - written)

    try:
        lock.execute("BEGIN IMMEDIATE")
        with ThreadPoolExecutor(1) as pool:
            put = pool.submit(client.write, TABLE, data, write_id=write_id)
            try:
                wait_until(lambda: put.done() or committing(), what="the put's commit")
                assert not put.done(), put.result()
                yield put, release
            finally:
                release()
    finally:
        lock.close()


def test_a_put_whose_commit_the_catalog_did_not_confirm_is_sent_again_and_lands_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The catalog does not answer the put's commit in time (its SQLite database locked here past its busy timeout):
    the commit's outcome is unknown, the server answers UNAVAILABLE saying to retry with the same write_id, and the
    client does until the catalog answers again; the put commits once."""
    properties = sqlite_catalog(tmp_path)
    properties["uri"] += "?timeout=0.2"  # SQLite's busy timeout (pysqlite's `timeout`; 5 s by default)
    caplog.set_level(logging.INFO, logger="flight_client.client")
    server = start_server(properties)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}", retry_seconds=60) as client:
            client.write(TABLE, drivers(2), **DEFINITION)
            database = tmp_path / "catalog.db"
            with put_at_its_commit(client, database, drivers(3, first=10), "w-unconfirmed") as (put, release):
                wait_until(lambda: "did not confirm the commit" in caplog.text, what="the put answered UNAVAILABLE")
                release()
                result = put.result(timeout=60)
            assert "Retry a put with the same write_id" in caplog.text
            assert "did not confirm the commit (database is locked)" in caplog.text  # why, through group commit too
            assert (result.duplicate, result.rows) == (False, 3)
            assert recorded(properties, "w-unconfirmed") == [result.snapshot_id]
            assert sorted(client.read_table(TABLE).column("driver_id").to_pylist()) == [0, 1, 10, 11, 12]
    finally:
        server.shutdown()


def patient(tmp_path: Path) -> dict[str, str]:
    """`serving`'s settings for a catalog whose commits wait up to 30 s for its SQLite database's lock (5 s by
    default): the tests hold it while they stop or kill a process, which a busy machine may take seconds to do."""
    return catalog_env({"uri": sqlite_catalog(tmp_path)["uri"] + "?timeout=30"})


def test_a_put_whose_write_process_died_at_its_commit_is_sent_again_and_lands_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The write process SIGKILLed while the put's commit waits for the catalog: the server answers UNAVAILABLE, the
    put may have committed (it did not); the client sends it again and it commits once."""
    properties = sqlite_catalog(tmp_path)
    caplog.set_level(logging.INFO, logger="flight_client.client")
    with serving(tmp_path, **patient(tmp_path)) as (_, location), FeatureClient(location, retry_seconds=60) as client:
        client.write(TABLE, drivers(2), **DEFINITION)
        child = listening(client)
        with put_at_its_commit(client, tmp_path / "catalog.db", drivers(3, first=10), "w-child") as (put, release):
            os.kill(child, signal.SIGKILL)
            wait_until(lambda: not alive(child), what="the write process to end")
            release()
            result = put.result(timeout=60)
        assert "write process stopped" in caplog.text and "trying again" in caplog.text
        assert (result.duplicate, result.rows) == (False, 3)
        assert recorded(properties, "w-child") == [result.snapshot_id]
        assert sorted(client.read_table(TABLE).column("driver_id").to_pylist()) == [0, 1, 10, 11, 12]


@pytest.mark.parametrize("retry_seconds", [60, 0], ids=["retried", "by-hand"])
def test_a_put_whose_server_died_between_its_commit_and_its_answer_is_answered_as_the_duplicate(
    tmp_path: Path, retry_seconds: float
) -> None:
    """The server SIGKILLed after the put's commit and before its answer, then started again on its address: the
    client, cut off, sends the put again and is answered with the snapshot of the first attempt, as a duplicate.
    Without `retry_seconds`, the put fails UNAVAILABLE saying that it may have committed and to send it again with
    the same write_id (gRPC's own words said only that the stream was removed); sent again, the same.

    Deterministic: the put commits in the write process, while the catalog's lock (held here) keeps its commit
    waiting; the serving process is stopped (SIGSTOP) before the lock is released, so the answer it would relay
    cannot leave it; once pyiceberg sees the snapshot in the catalog, the serving process is killed."""
    properties = sqlite_catalog(tmp_path)
    port = free_ports(1)[0]
    with contextlib.ExitStack() as servers:
        process, location = servers.enter_context(serving(tmp_path, port=port, **patient(tmp_path)))
        with FeatureClient(location, retry_seconds=retry_seconds) as client:
            client.write(TABLE, drivers(2), **DEFINITION)
            listening(client)
            database = tmp_path / "catalog.db"
            with put_at_its_commit(client, database, drivers(3, first=10), "w-lost") as (put, release):
                wait_until(functools.partial(frozen_without_locks, process.pid, database), what="the server stopped")
                release()
                wait_until(lambda: bool(recorded(properties, "w-lost")), what="the put's commit")
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                if retry_seconds:
                    assert not put.done()
                    servers.enter_context(serving(tmp_path, port=port, log="server-2.log", **patient(tmp_path)))
                    result = put.result(timeout=60)
                else:
                    with pytest.raises(UnavailableError) as cut:
                        put.result(timeout=60)
                    assert "may have committed" in str(cut.value) and "same write_id" in str(cut.value), cut.value
                    servers.enter_context(serving(tmp_path, port=port, log="server-2.log", **patient(tmp_path)))
                    result = client.write(TABLE, drivers(3, first=10), write_id="w-lost")
            committed = recorded(properties, "w-lost")
            assert (result.duplicate, result.snapshot_id, result.rows) == (True, committed[0], 3)
            assert len(committed) == 1
            assert sorted(client.read_table(TABLE).column("driver_id").to_pylist()) == [0, 1, 10, 11, 12]


def test_puts_that_cannot_be_sent_again_fail_at_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With `retry_seconds`, a put without a write_id (it could commit twice) and a put of a reader (read once) are
    not tried again: they fail at once, saying why."""
    port = free_ports(1)[0]
    caplog.set_level(logging.INFO, logger="flight_client.client")
    with FeatureClient(f"grpc://127.0.0.1:{port}", retry_seconds=60) as client:  # nothing listens there
        with pytest.raises(UnavailableError, match="not tried again: a put without a write_id"):
            client.write(TABLE, drivers(2), **DEFINITION)
        reader = pa.RecordBatchReader.from_batches(drivers(2).schema, drivers(2).to_batches())
        with pytest.raises(UnavailableError, match="not tried again: its rows were a stream"):
            client.write(TABLE, reader, write_id="w-reader", **DEFINITION)
    assert "trying again" not in caplog.text
    with FeatureClient(f"grpc://127.0.0.1:{port}") as impatient, pytest.raises(UnavailableError) as refused:
        impatient.write(TABLE, drivers(2), write_id="w-once", **DEFINITION)
    assert "not tried again" not in str(refused.value)
