"""The write process (`--write-process`): puts, deletes and compactions relayed to a child process give the
same results as in the serving process; a child killed mid-put fails that put with UNAVAILABLE, commits nothing,
and the next write starts a new one; the child never outlives its server."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest
from pyiceberg.catalog import MetastoreCatalog
from pyiceberg.catalog.rest import RestCatalog
from pyiceberg.catalog.sql import SqlCatalog

from flight_client import FeatureClient, FeatureServerError, ResourceExhaustedError, UnavailableError
from flight_server.base.config import ServerConfig
from flight_server.iceberg.catalog import FeatureCatalog
from flight_server.reads.duck import Engine, object_storage
from flight_server.reads.paths import files_relation
from flight_server.transport import offload
from flight_server.transport.offload import WriteProcess, WriteProcessError, child_config
from flight_server.transport.service import FeatureFlightServer
from flight_server.wire.errors import ConflictError
from tests.conftest import (
    catalog_env,
    healthy,
    listening,
    sqlite_catalog,
    start_server,
    start_writing_server,
    wait_until,
)
from tests.services import free_ports
from tests.test_roundtrip import (  # run here again against a server whose writes go through its write process
    test_batch_failing_validation_midstream_leaves_nothing,
    test_broken_stream_commits_nothing,
)

KEYS = {"entity_keys": ["id"], "event_time": "ts"}
__all__ = ["test_batch_failing_validation_midstream_leaves_nothing", "test_broken_stream_commits_nothing"]


@pytest.fixture(scope="module")
def server(backend: dict[str, str]) -> Iterator[str]:
    """The tests imported above get a server with its write process on (conftest's keeps writes in process)."""
    served = start_writing_server(backend)
    yield f"grpc://127.0.0.1:{served.port}"
    served.shutdown()


def rows(ids: list[int], ts: int, value: float) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "ts": pa.array([ts] * len(ids), pa.timestamp("us", "UTC")),
            "value": pa.array([value + i for i in ids], pa.float64()),
        }
    )


def changes(client: FeatureClient, table: str) -> list[object]:
    """A sequence of puts (one retried), a delete, a compaction and a maintenance round; what each answered
    (without snapshot ids), the rows left and the online answer."""
    answers: list[object] = []
    put = client.write(table, rows([1, 2, 3], 10, 0.5), **KEYS)
    answers.append((put.rows, put.files, put.duplicate))
    first = client.write(table, rows([3, 4], 20, 1.5), write_id="w-1")
    again = client.write(table, rows([3, 4], 20, 1.5), write_id="w-1")
    answers.append((first.rows, again.duplicate, again.snapshot_id == first.snapshot_id))
    deleted = client.delete(table, keys={"id": [2]})
    answers.append({k: v for k, v in deleted.items() if k not in ("snapshot_id", "table")})
    compacted = client.compact(table)
    answers.append({k: v for k, v in compacted.items() if k not in ("snapshot_id", "table")})
    done = client.run_maintenance(table)
    answers.append(sorted(done))
    answers.append(client.read_table(table).sort_by([("id", "ascending"), ("ts", "ascending")]).to_pylist())
    online = client.get_online_features({"id": [1, 2, 3, 4]}, [f"{table}:value"], apply_ttl=False)
    answers.append(online.select(["id", "value"]).to_pylist())
    return answers


def test_changes_through_the_write_process_answer_as_in_the_serving_process(backend: dict[str, str]) -> None:
    servers = [start_writing_server(backend), start_server(backend, write_process=False)]
    try:
        results = []
        for server, name in zip(servers, ("wp.on", "wp.off"), strict=True):
            with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
                results.append(changes(client, name))
        assert servers[0].parts.writes is not None and servers[0].parts.writes.pid is not None  # it did run there
        assert servers[1].parts.writes is None
        assert results[0] == results[1]
    finally:
        for server in servers:
            server.shutdown()


def test_automatic_maintenance_compacts_in_the_write_process(tmp_path: Path) -> None:
    """A maintenance round's compaction of small files runs in the write process: rewrites in the serving process
    fail here, and the round still compacts, and reports it as it does in process."""
    server = start_writing_server(sqlite_catalog(tmp_path), compact_min_files=5)

    def in_the_serving_process(*args: object, **kwargs: object) -> None:
        raise AssertionError("a rewrite in the serving process")

    server.parts.maintenance.rewrite_once = in_the_serving_process  # type: ignore[method-assign]
    table = "wp.compacted"
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            client.write(table, rows([0], 10, 0.5), **KEYS)
            for ts in range(11, 16):  # one key: one partition gathers the small files
                client.write(table, rows([0], ts, 0.5))
            result = client.run_maintenance(table)
            assert (result["data_files_compacted"], result["data_files_added"]) == (6, 1)
            assert result["error"] is None and result["gave_way"] == []
            assert client.read_table(table).column("id").to_pylist() == [0] * 6
            assert client.run_maintenance(table)["data_files_compacted"] == 0  # one file now: nothing to do
    finally:
        server.shutdown()


def test_an_index_rebuilt_after_a_delete_is_read_in_the_write_process(tmp_path: Path) -> None:
    """After a copy-on-write delete (more than appends) the online index is rebuilt from the table's latest rows read
    in the write process: the serving process's own reads fail here, and the lookups still see the new rows."""
    server = start_writing_server(sqlite_catalog(tmp_path), online_refresh_seconds=0.05)
    table = "wp.rebuilt"
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            client.write(table, rows([1, 2], 10, 0.5), **KEYS)
            assert client.get_online_features({"id": [1]}, [f"{table}:value"], apply_ttl=False).num_rows == 1
            index = server.parts.store.peek(table)
            assert index is not None

            def in_the_serving_process(*args: object, **kwargs: object) -> None:
                raise AssertionError("a read in the serving process")

            server.parts.store._read_latest = in_the_serving_process  # type: ignore[method-assign]
            client.write(table, rows([1], 20, 5.5))
            client.delete(table, keys={"id": [2]}, mode="copy-on-write")
            snapshot = client.describe(table)["current_snapshot_id"]
            wait_until(lambda: index.state.snapshot_id == snapshot, what="the index to follow the delete")
            assert index.rebuilds == 1 and index.error is None
            online = client.get_online_features({"id": [1, 2]}, [f"{table}:value"], apply_ttl=False)
            assert online.column("value").to_pylist() == [6.5, None]
    finally:
        server.shutdown()


def test_refusals_keep_their_status_and_message(tmp_path: Path) -> None:
    properties = sqlite_catalog(tmp_path)
    servers = [start_writing_server(properties), start_server(properties, write_process=False)]
    try:
        refusals = []
        for server, name in zip(servers, ("bad.on", "bad.off"), strict=True):
            with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
                client.write(name, rows([1], 1, 0.0), **KEYS)
                seen = []
                for call in (
                    lambda c=client, n=name: c.write(n, pa.table({"id": ["text"]})),
                    lambda c=client: c.write("bad.missing", rows([1], 1, 0.0)),
                    lambda c=client, n=name: c.write(n, rows([], 1, 0.0)),
                    lambda c=client, n=name: c.delete(n, filter="nope = 1"),
                    lambda c=client: c.compact("bad.missing"),
                ):
                    with pytest.raises(FeatureServerError) as refused:
                        call()
                    seen.append(
                        (type(refused.value).__name__, refused.value.code, str(refused.value).replace(name, "T"))
                    )
                refusals.append(seen)
        assert refusals[0] == refusals[1]
    finally:
        for server in servers:
            server.shutdown()


def children(pid: int) -> set[int]:
    """The processes `pid` started (any of its threads)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
            found.update(int(child) for child in (task / "children").read_text().split())
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has ended)."""
    return state(pid) not in (None, "Z")


def state(pid: int) -> str | None:
    """The state of process (or thread) `pid`: R running, S sleeping, T stopped, Z a zombie...; None once gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # gone before it was opened, or while it was read
        return None


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A `flight-server serve` process with its write process on, and its location."""
    with serving(tmp_path) as served:
        yield served


@contextlib.contextmanager
def serving(
    tmp_path: Path, port: int | None = None, log: str = "server.log", **settings: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A `flight-server serve` process (its write process on) on the SQLite catalog in `tmp_path`, at `port` (a free
    one by default: a server started again at the same port is where its clients were), with more `settings`
    (`FLIGHT_SERVER_*` variables), run from `tmp_path` (where DuckDB spills by default) and logging to `log` there;
    at the end it is killed if it still runs, and its write process ends."""
    port = port or free_ports(1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLIGHT_SERVER_")}
    env.update(catalog_env(sqlite_catalog(tmp_path)), FLIGHT_SERVER_PORT=str(port), FLIGHT_SERVER_WRITE_PROCESS="1")
    env.update(settings, PYTHONPATH=str(Path(__file__).resolve().parent.parent))  # this checkout's code, run anywhere
    with (tmp_path / log).open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "flight_server", "serve", "--no-auto-maintenance"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a service manager starts it
        )
    location = f"grpc://127.0.0.1:{port}"
    try:
        wait_until(lambda: healthy(location) or process.poll() is not None, timeout=90, what=location)
        assert process.poll() is None, (tmp_path / log).read_text()[-3000:]
        yield process, location
    finally:
        started = children(process.pid) if process.poll() is None else set()
        process.kill()
        process.wait()
        for child in started:  # each ends by itself once its server is gone
            wait_until(lambda c=child: not alive(c), timeout=60, what="the write process to end")


def test_a_write_process_killed_mid_put_fails_that_put_and_the_next_one_starts_a_new_one(
    server_process: tuple[subprocess.Popen[bytes], str],
) -> None:
    process, location = server_process
    with FeatureClient(location) as client:
        first = client.write("kill.t", rows([1, 2], 10, 0.0), **KEYS)
        child = listening(client)
        assert children(process.pid) == {child}
        snapshots = len(client.describe("kill.t")["snapshots"])

        def batches() -> Iterator[pa.RecordBatch]:
            yield from rows([1], 20, 5.0).to_batches()
            os.kill(child, signal.SIGKILL)
            wait_until(lambda: not alive(child), what="the write process to end")
            yield from rows([2], 20, 5.0).to_batches()

        stream = pa.RecordBatchReader.from_batches(rows([], 0, 0.0).schema, batches())
        with pytest.raises(FeatureServerError) as stopped:
            client.write("kill.t", stream, write_id="w-kill")
        assert stopped.value.code == "UNAVAILABLE"  # no kind: as when a server goes away, it may have committed
        assert "write process stopped" in str(stopped.value) and "may have committed" in str(stopped.value)
        assert len(client.describe("kill.t")["snapshots"]) == snapshots  # nothing committed
        online = client.get_online_features({"id": [1, 2]}, ["kill.t:value"], apply_ttl=False)
        assert online.column("value").to_pylist() == [1.0, 2.0]  # still serving
        retried = client.write("kill.t", rows([1, 2], 20, 5.0), write_id="w-kill")
        again = client.write("kill.t", rows([1, 2], 20, 5.0), write_id="w-kill")
        assert not retried.duplicate and again.duplicate and again.snapshot_id == retried.snapshot_id
        assert retried.snapshot_id != first.snapshot_id
        assert len(client.describe("kill.t")["snapshots"]) == snapshots + 1  # committed once
        restarted = listening(client)
        assert restarted != child and children(process.pid) == {restarted}


def test_a_call_cut_off_from_a_write_process_that_runs_on_may_have_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gRPC's own UNAVAILABLE (no kind) from a write process that still runs: the connection between the processes
    broke, perhaps after the commit. A put or a relayed action answers UNAVAILABLE saying so and how to retry, not
    CONFLICT (which says nothing was committed); the server's own calls (maintenance's) still give way as to a lost
    race. No real part breaks that connection while both processes run, so the error is made here."""
    monkeypatch.setattr(offload, "STOPPED_SECONDS", 0.1)  # how long a failed call waits to see the child stop
    writes = WriteProcess(ServerConfig(port=0, catalog_properties=sqlite_catalog(tmp_path)))
    cut = flight.FlightUnavailableError("Stream removed (Socket closed)")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        put = writes._failure(cut, child)
        assert isinstance(put, WriteProcessError) and not getattr(put, "extra_info", None)  # UNAVAILABLE, no kind
        assert "may have committed. Retry a put with the same write_id" in str(put)
        assert "Run delete again" in str(writes._failure(cut, child, "delete"))
        assert isinstance(writes._failure(cut, child, asked=False), ConflictError)
    finally:
        child.kill()
        child.wait()


PLANTED = 20_000  # old orphan files: deleting them keeps the write process busy long enough to be killed in it


def test_an_action_whose_write_process_was_killed_says_to_run_it_again(tmp_path: Path) -> None:
    """The write process SIGKILLed while it removes orphan files (relayed to it: `RELAYED_ACTIONS`): the call fails
    UNAVAILABLE, nothing referenced is lost, and the advice is to run the action again, not the put's (review 24: it
    said to retry a put with its write_id, which the caller of an action has not)."""
    with serving(tmp_path) as (_, location), FeatureClient(location) as client:
        client.write("ops.t", rows(list(range(100)), 10, 0.0), **KEYS)
        child = listening(client)
        root = Path(client.describe("ops.t")["location"].removeprefix("file://"))
        planted = root / "data" / "planted"
        planted.mkdir()
        old = time.time() - 10 * 24 * 3600
        for i in range(PLANTED):
            path = planted / f"{i}.parquet"
            path.write_bytes(b"x")
            os.utime(path, (old, old))
        referenced = {p for p in root.rglob("*") if p.is_file()} - set(planted.iterdir())
        failure: list[Exception] = []

        def remove() -> None:
            try:
                client.remove_orphan_files("ops.t")
            except Exception as exc:  # checked below
                failure.append(exc)

        removing = threading.Thread(target=remove)
        removing.start()
        wait_until(lambda: len(os.listdir(planted)) < PLANTED or not removing.is_alive(), timeout=120, what="deletes")
        os.kill(child, signal.SIGKILL)
        removing.join(timeout=60)
        assert failure and isinstance(failure[0], UnavailableError), failure
        assert referenced <= {p for p in root.rglob("*") if p.is_file()}  # nothing the table uses went
        assert "Run remove_orphan_files again" in str(failure[0]) and "write_id" not in str(failure[0])


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL", "SIGTERM to the process group"])
def test_the_write_process_ends_with_its_server(server_process: tuple[subprocess.Popen[bytes], str], stop: str) -> None:
    process, location = server_process
    with FeatureClient(location) as client:
        client.write("life.t", rows([1], 1, 0.0), **KEYS)
        child = listening(client)
    socket = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[3].decode()  # argv: python -m module socket
    if stop.endswith("group"):  # the write process ignores it, and ends when its server has
        os.killpg(process.pid, signal.SIGTERM)
    else:
        os.kill(process.pid, getattr(signal, stop))
    process.wait(timeout=60)
    wait_until(lambda: not alive(child), timeout=60, what="the write process to end after its server")
    wait_until(lambda: not Path(socket).parent.exists(), what="its socket's folder to go")


def test_an_in_process_server_stops_its_write_process(tmp_path: Path) -> None:
    server: FeatureFlightServer = start_server(sqlite_catalog(tmp_path), write_process=True)
    with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
        assert server.parts.writes is not None and server.parts.writes.pid is None  # started by the first write
        client.write("inproc.t", rows([1], 1, 0.0), **KEYS)
        child = listening(client)
        assert alive(child)
    server.shutdown()
    assert not alive(child)


def test_online_refreshes_are_planned_in_the_write_process(tmp_path: Path) -> None:
    """After a put through a server with a write process, and after one through another replica, its online index
    catches up from the files the write process found and read: the serving process parses none of the new metadata
    and reads no Parquet (it opens no DuckDB cursor), it only merges."""
    properties = sqlite_catalog(tmp_path)
    server = start_writing_server(properties)
    replica = start_server(properties, write_process=False)
    name = "plan.t"
    try:
        with (
            FeatureClient(f"grpc://127.0.0.1:{server.port}") as client,
            FeatureClient(f"grpc://127.0.0.1:{replica.port}") as other,
        ):
            client.write(name, rows([1, 2], 10, 0.0), **KEYS)
            assert client.get_online_features({"id": [1]}, [f"{name}:value"]).column("value").to_pylist() == [1.0]
            index = server.parts.store.peek(name)
            assert index is not None
            engine, opened = server.parts.store.engine, []
            cursor = engine.cursor
            engine.cursor = lambda: opened.append(1) or cursor()  # type: ignore[method-assign]
            for writer, value in ((client, 5.0), (other, 7.0)):
                put = writer.write(name, rows([1], 20 + int(value), value))
                wait_until(lambda p=put: index.state.snapshot_id == p.snapshot_id, what="the index to catch up")
                online = client.get_online_features({"id": [1, 2]}, [f"{name}:value"], apply_ttl=False)
                assert online.column("value").to_pylist() == [value + 1, 2.0]
                assert index.appends >= 1 and index.rebuilds == 0
                kept = server.parts.catalog._read.peek(name)  # what the serving process parsed last
                assert kept is not None and kept.metadata_location not in (index.version or "")
            assert opened == []
    finally:
        server.shutdown()
        replica.shutdown()


def test_an_append_past_the_online_memory_cap_drops_the_index_without_a_read_here(tmp_path: Path) -> None:
    """The write process refuses to read an append whose latest rows pass what the online cap leaves (as the serving
    process would): the index is dropped, the serving process reads nothing for it, and a lookup is refused."""
    server = start_writing_server(sqlite_catalog(tmp_path), online_max_bytes=100_000)
    name = "capped.t"
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            client.write(name, rows(list(range(10)), 10, 0.0), **KEYS)
            assert client.get_online_features({"id": [1]}, [f"{name}:value"]).column("value").to_pylist() == [1.0]
            engine, opened = server.parts.store.engine, []
            cursor = engine.cursor
            engine.cursor = lambda: opened.append(1) or cursor()  # type: ignore[method-assign]
            client.write(name, rows(list(range(10, 5010)), 20, 0.0))
            # The child may take its time on a loaded machine: it has 30 s to plan (`_PLANNING`), this waits longer.
            wait_until(lambda: server.parts.store.peek(name) is None, timeout=60.0, what="the index to be dropped")
            assert opened == []
            engine.cursor = cursor  # type: ignore[method-assign]
            with pytest.raises(ResourceExhaustedError, match="memory cap"):
                client.get_online_features({"id": [1]}, [f"{name}:value"])
    finally:
        server.shutdown()


def test_expiry_keeps_the_snapshot_a_running_scan_reads(tmp_path: Path) -> None:
    """Expiry commits in the write process, beside the puts, and keeps the snapshots the serving process's running
    reads use, which it sends along: a scan of an old snapshot, begun before `expire_snapshots`, keeps it and reads
    all its rows (the write process alone knows no read of it, and would have expired it)."""
    server = start_writing_server(sqlite_catalog(tmp_path), batch_rows=1000)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            old = client.write("expire.t", rows(list(range(200_000)), 10, 0.0), **KEYS).snapshot_id
            client.write("expire.t", rows([1], 20, 0.0), mode="overwrite")
            scan = client.scan("expire.t", snapshot_id=old)
            first = scan.read_next_batch()
            expired = client.expire_snapshots("expire.t", older_than="2100-01-01T00:00:00Z", retain_last=1)
            assert expired["kept_in_use"] == [old] and old not in expired["expired"]
            assert first.num_rows + scan.read_all().num_rows == 200_000
    finally:
        server.shutdown()


def test_a_write_process_that_cannot_start_leaves_the_writes_in_the_serving_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write process is on by default, so a child that cannot start (here an interpreter that exits at once)
    must not cost the server its writes: they run in the serving process, `health` says why, and the start is
    not tried again at every write."""
    monkeypatch.setattr(sys, "executable", "/bin/false")
    server = start_server(sqlite_catalog(tmp_path), write_process=True)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            client.write("t.fallback", rows([1, 2], 10, 0.5), **KEYS)  # starts it (in the background)
            wait_until(lambda: client.health()["write_process"]["start_error"] is not None, what="the start to fail")
            assert client.write("t.fallback", rows([3], 11, 0.5), write_id="w").rows == 1
            assert client.write("t.fallback", rows([3], 11, 0.5), write_id="w").duplicate
            assert sorted(client.read_table("t.fallback").column("id").to_pylist()) == [1, 2, 3]
            state = client.health()["write_process"]
        assert state["pid"] is None and state["starts"] == 1
        assert "did not start" in state["start_error"]
    finally:
        server.shutdown()


def test_a_deep_temporary_folder_still_gets_a_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Unix socket's path has at most 107 bytes (104 on macOS); a deep $TMPDIR puts the child's folder in /tmp."""
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(deep))
    server = start_server(sqlite_catalog(tmp_path), write_process=True)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            assert client.write("t.deep", rows([1], 10, 0.5), **KEYS).rows == 1
            listening(client)
            assert client.write("t.deep", rows([2], 10, 0.5)).rows == 1  # through it
            state = client.health()["write_process"]
        assert state["start_error"] is None and state["starts"] == 1
    finally:
        server.shutdown()


def test_no_write_waits_for_the_write_process_to_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first write starts the write process in the background and runs in the serving process meanwhile; once
    the child listens, writes go there. The child's interpreter here waits for a gate the test opens."""
    gate = tmp_path / "go"
    interpreter = tmp_path / "python"
    interpreter.write_text(f'#!/bin/sh\nwhile [ ! -e "{gate}" ]; do sleep 0.05; done\nexec "{sys.executable}" "$@"\n')
    interpreter.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(interpreter))
    server = start_server(sqlite_catalog(tmp_path), write_process=True)

    def in_the_serving_process(*args: object, **kwargs: object) -> None:
        raise AssertionError("a put in the serving process")

    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}", timeout=60) as client:
            for ts in (10, 11):  # both committed while the child cannot start
                assert client.write("t.gated", rows([1, 2], ts, 0.5), **KEYS).rows == 2
            state = client.health()["write_process"]
            assert state["starting"] and state["pid"] is None and state["starts"] == 1
            gate.touch()
            child = listening(client)
            server.parts.writer.write = in_the_serving_process  # type: ignore[method-assign]
            assert client.write("t.gated", rows([3], 12, 0.5), write_id="w").rows == 1  # through the child
            assert client.write("t.gated", rows([3], 12, 0.5), write_id="w").duplicate
            assert sorted(client.read_table("t.gated").column("id").to_pylist()) == [1, 1, 2, 2, 3]
            state = client.health()["write_process"]
            assert {key: state[key] for key in ("pid", "starting", "starts", "start_error")} == {
                "pid": child,
                "starting": False,
                "starts": 1,
                "start_error": None,
            }
    finally:
        server.shutdown()


def file_cache_bytes(engine: Engine) -> int:
    """What DuckDB's external file cache holds (its copies of the files it read)."""
    found = engine.cursor().execute(
        "SELECT coalesce(sum(memory_usage_bytes), 0) FROM duckdb_memory() WHERE tag = 'EXTERNAL_FILE_CACHE'"
    )
    row = found.fetchone()
    return int(row[0]) if row else 0


def read_once_each(engine: Engine, folder: Path, files: int = 200) -> None:
    """Read `files` small files once each as an online refresh plan reads a put's files (`files_relation`, the latest
    row per key), deleting each afterwards, as compaction and snapshot expiry delete a put's files."""
    folder.mkdir()
    cursor = engine.cursor()
    for i in range(files):
        path = folder / f"{i}.parquet"
        pq.write_table(pa.table({"key": np.arange(50), "value": np.random.default_rng(i).random(50)}), path)
        source, params = files_relation([str(path)], ["key", "value"], cursor)
        cursor.execute(f"SELECT key, arg_max(value, key) FROM {source} GROUP BY key", params).fetchall()
        path.unlink()


def kept_after_reading_once(server: FeatureFlightServer, tmp_path: Path) -> int:
    """What the server's DuckDB keeps of 200 files it read once each (`read_once_each`); the server is stopped."""
    try:
        read_once_each(server.parts.engine, tmp_path / "files")
        return file_cache_bytes(server.parts.engine)
    finally:
        server.shutdown()


def test_the_write_process_keeps_no_copies_of_the_files_it_read(tmp_path: Path) -> None:
    """The write process reads each file once (a put's files for an online refresh plan, the files a compaction or
    a delete replaces, which are then deleted): DuckDB's external file cache, on by default, kept ~20 KB of each
    until the process held --duckdb-memory-limit (a soak's write process grew 170-220 MB a minute, to 1.7 GB in
    seven minutes; with it off it stayed at 310-440 MB), so its engine has it off. (Found by a soak.)"""
    config = child_config(ServerConfig(catalog_properties=sqlite_catalog(tmp_path), duckdb_threads=1))
    server = FeatureFlightServer(config, location=f"grpc+unix://{tmp_path / 'w.sock'}", write_process=True)
    assert kept_after_reading_once(server, tmp_path) < 1 << 20


def test_a_serving_process_keeps_copies_of_files_only_from_object_storage(tmp_path: Path) -> None:
    """The same cache in a serving process on a local warehouse held 519 MB after 23 minutes of a soak (8,200 puts,
    maintenance deleting their files), outside the memory budget: local files are in the page cache already, so it
    is off there. On object storage it saves fetching files again, and stays within --duckdb-memory-limit."""
    assert kept_after_reading_once(start_server(sqlite_catalog(tmp_path), duckdb_threads=1), tmp_path) < 1 << 20
    assert not object_storage(sqlite_catalog(tmp_path))
    assert FeatureCatalog("default", sqlite_catalog(tmp_path)).names_metadata_files
    assert not object_storage({"type": "sql", "uri": "sqlite://", "warehouse": "/data/warehouse"})
    assert object_storage({"type": "sql", "uri": "sqlite://", "warehouse": "s3://bucket/warehouse"})
    assert object_storage({"type": "rest", "uri": "http://catalog", "warehouse": "prod", "s3.endpoint": "http://s3"})


def test_documented_catalogs_of_tables_on_s3_count_as_object_storage() -> None:
    """Catalogs of tables on object storage that name no URL warehouse (a REST catalog that vends it, Glue, S3
    Tables' ARN) count as object storage (review 22), so DuckDB's file cache is on for them. A REST catalog's server
    names the metadata files, the same names again for a table created again (review 23): `Engine.metadata_file`
    watches those paths (tests/test_rest_catalog.py)."""
    rest = {"type": "rest", "uri": "https://iceberg.internal", "credential": "CLIENT_ID:CLIENT_SECRET"}
    glue = {"type": "glue", "glue.region": "us-east-1"}
    s3_tables = {
        "type": "rest",
        "uri": "https://s3tables.us-east-1.amazonaws.com/iceberg",
        "warehouse": "arn:aws:s3tables:us-east-1:111122223333:bucket/features",
        "rest.sigv4-enabled": "true",
    }
    assert [object_storage(p) for p in (rest, glue, s3_tables)] == [True, True, True]
    # pyiceberg names the metadata files of its metastore catalogs (Glue's too), not of REST ones (their servers do)
    assert [issubclass(c, MetastoreCatalog) for c in (RestCatalog, SqlCatalog)] == [False, True]
