"""Review 24: servers and write processes SIGKILLed during maintenance (compaction, snapshot expiry, orphan removal),
on the embedded SQLite catalog and PostgreSQL. What the review found wrong, each as a failing test (xfail, strict)
that passes once the cause is fixed."""

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

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from flight_client import FeatureClient, UnavailableError
from tests.conftest import catalog_env, healthy, listening, sqlite_catalog, wait_until
from tests.services import free_ports
from tests.test_write_process import alive, children, serving, state

SPILL_ROWS = 1_500_000  # a compaction of this many rows spills past SPILL_MEMORY (about 100 MB sorted)
SPILL_MEMORY = "40MB"
CHILD_SPILLS = ".tmp.write-process"  # the write process's DuckDB spill folder, in the server's working directory


def wide_rows(start: int, count: int) -> pa.Table:
    ids = pa.array(range(start, start + count), pa.int64())
    return pa.table(
        {
            "id": ids,
            "ts": pa.array([0] * count, pa.timestamp("us", "UTC")),
            "pad": pc.binary_join_element_wise(
                pa.array(["padding-padding-padding-"] * count), pc.cast(ids, pa.string()), ""
            ),
        }
    )


@contextlib.contextmanager
def server_in(folder: Path, log: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`flight-server serve` run from `folder` (its working directory: where DuckDB spills by default) on the SQLite
    catalog there, with a DuckDB memory limit small enough that a compaction spills."""
    port = free_ports(1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLIGHT_SERVER_")}
    env.update(
        catalog_env(sqlite_catalog(folder)),
        FLIGHT_SERVER_PORT=str(port),
        FLIGHT_SERVER_WRITE_PROCESS="1",
        FLIGHT_SERVER_AUTO_MAINTENANCE="0",
        FLIGHT_SERVER_DUCKDB_MEMORY_LIMIT=SPILL_MEMORY,
        FLIGHT_SERVER_DUCKDB_THREADS="1",
        PYTHONPATH=str(Path(__file__).resolve().parent.parent),  # this checkout's code, whatever the folder
    )
    location = f"grpc://127.0.0.1:{port}"
    with (folder / log).open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "flight_server", "serve"],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: healthy(location) or process.poll() is not None, timeout=90, what=location)
        assert process.poll() is None, (folder / log).read_text()[-3000:]
        yield process, location
    finally:
        started = children(process.pid) if process.poll() is None else set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        for child in started:
            wait_until(lambda c=child: not alive(c), timeout=60, what="the write process to end")


def spilled(folder: Path) -> int:
    """Bytes in the write processes' spill folder now."""
    spills = folder / CHILD_SPILLS
    return sum(f.stat().st_size for f in spills.iterdir() if f.is_file()) if spills.is_dir() else 0


@pytest.mark.xfail(
    strict=True,
    reason="a restarted server's write process spills into the folder its killed predecessor's write process still "
    "spills into: DuckDB's fixed temp file names collide; the processes crash (SIGSEGV) or read back garbage",
)
def test_a_server_restarted_while_its_old_write_process_compacts_compacts_safely(tmp_path: Path) -> None:
    """A server SIGKILLed (its serving process alone: the OOM killer's choice, or `kill -9` of the main pid) while its
    write process compacts; that write process goes on with the call it runs (up to STOP_SECONDS), and the server's
    replacement, started as a service manager would from the same working directory, compacts another table in its
    own new write process. Both compactions should land and both tables read whole.

    What is wrong: `child_config` (transport/offload.py) gives every write process the spill folder
    `<--duckdb-temp-dir or .tmp>.write-process`, relative to the working directory, so the old and the new write
    process share it. DuckDB names its spill files `duckdb_temp_storage_S32K-0.tmp` and so on, the same in every
    process, so each overwrites the other's blocks (child_config's own comment says two databases spilling into one
    folder corrupt each other's files; it keeps apart only a serving process and its child). The new write process
    dies of SIGSEGV (exit code -11) mid-compaction, or reads garbage back from its spill: once, `SnapshotRows.rewrite`
    failed with IndexError on a run number no run has (`runs[number]`), a value DuckDB read back corrupted. Garbage
    in the other columns would be written into the compacted files and committed: rows lost or changed. Outside the
    server, two `duckdb.connect` with one `temp_directory` sorting 1.5M rows at 20MB crashed 3 times in 3, and apart
    they never did. Two replicas started from one working directory (as the tests' `replica_processes` start them)
    share `.tmp` and `.tmp.write-process` the same way. Likely fix: a spill folder per process (in the write
    process's private folder, or named by pid), removed when it ends.

    Timing: the old write process is stopped (SIGSTOP) once it has spilled, so that the new one spills beside it
    for certain, and resumed while the new one is spilling; no hook."""
    count = SPILL_ROWS // 4
    with server_in(tmp_path, "load.log") as (_, location), FeatureClient(location, timeout=300) as client:
        for table in ("spill.old", "spill.new"):
            for part in range(4):  # several files of one partition: worth compacting
                client.write(
                    table, wide_rows(part * count, count), entity_keys=["id"], event_time="ts", partition_by=[]
                )
    outcome: dict[str, object] = {}

    def compact(location: str, table: str) -> None:
        try:
            with FeatureClient(location, timeout=300) as client:
                outcome[table] = client.compact(table)
        except Exception as exc:  # the answer is checked below
            outcome[table] = exc

    with contextlib.ExitStack() as stack:
        old, location = stack.enter_context(server_in(tmp_path, "old.log"))
        with FeatureClient(location) as client:
            client.write("spill.started", wide_rows(0, 1), entity_keys=["id"], event_time="ts")  # starts its child
            child = listening(client)
        first = threading.Thread(target=compact, args=(location, "spill.old"))
        first.start()
        wait_until(lambda: spilled(tmp_path) > 0 or bool(outcome), timeout=120, what="the old compaction to spill")
        os.kill(child, signal.SIGSTOP)
        os.kill(old.pid, signal.SIGKILL)  # the serving process alone: its write process goes on with its call
        old.wait()
        first.join(timeout=60)
        try:
            _, replacement = stack.enter_context(server_in(tmp_path, "new.log"))
            with FeatureClient(replacement) as client:
                client.write("spill.started", wide_rows(1, 1))
                listening(client)
            size = spilled(tmp_path)
            second = threading.Thread(target=compact, args=(replacement, "spill.new"))
            second.start()
            wait_until(lambda: spilled(tmp_path) > size or bool(outcome), timeout=120, what="the new one to spill")
        finally:
            os.kill(child, signal.SIGCONT)
        second.join(timeout=300)
        wait_until(lambda: not alive(child), timeout=90, what="the old write process to end")
        assert state(child) is None or not alive(child)
        result = outcome.get("spill.new")
        assert isinstance(result, dict) and result["compacted"], result
        with FeatureClient(replacement, timeout=300) as client:
            for table in ("spill.old", "spill.new"):
                ids = client.read_table(table).column("id")
                assert (len(ids), pc.count_distinct(ids).as_py()) == (SPILL_ROWS, SPILL_ROWS), table
                assert (pc.min(ids).as_py(), pc.max(ids).as_py()) == (0, SPILL_ROWS - 1), table


PLANTED = 20_000  # old orphan files: deleting them keeps the write process busy long enough to be killed in it


@pytest.mark.xfail(
    strict=True,
    reason="an action whose write process was killed answers with the put's advice (retry a put with its write_id)",
)
def test_an_action_whose_write_process_was_killed_says_what_to_do_about_that_action(tmp_path: Path) -> None:
    """The write process SIGKILLed while it removes orphan files (relayed to it: `RELAYED_ACTIONS`). The call fails
    UNAVAILABLE, which is right, and nothing referenced is lost; but the message is the one written for a put: "which
    may have committed; it starts again at the next write. Retry a put with the same write_id: it commits once
    whichever happened". The caller of `remove_orphan_files` (or `compact`, `expire_snapshots`, `pin`, a maintenance
    round's steps) has no write_id and committed nothing of the kind: the advice should be to run the action again,
    which is safe for every one of them. Cause: `WriteProcess._failure` (transport/offload.py) has one message for
    every relayed call."""
    with serving(tmp_path) as (_, location), FeatureClient(location) as client:
        client.write("ops.t", wide_rows(0, 100), entity_keys=["id"], event_time="ts")
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
        assert "write_id" not in str(failure[0]) and "put" not in str(failure[0]), str(failure[0])
