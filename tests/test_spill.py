"""DuckDB spill folders (`base/spill.py`): one per database, locked by its process, removed once that process ended;
and review 24's case, a server restarted while its killed predecessor's write process still compacted and spilled
beside it into the same folder, where both crashed (SIGSEGV) or read corrupted rows back."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from flight_client import FeatureClient
from flight_server.base import spill
from tests.conftest import listening, wait_until
from tests.test_write_process import alive, serving, state

SPILL_ROWS = 1_500_000  # a compaction of this many rows spills past SPILL_MEMORY (about 100 MB sorted)
SPILL_MEMORY = "40MB"
SPILLS = ".tmp"  # where DuckDB spills by default, in the server's working directory

# A process that makes a spill folder in the parent given, prints it, and waits for its stdin to close.
HOLDER = (
    "import sys; from flight_server.base.spill import own_spill_folder; "
    "print(own_spill_folder(sys.argv[1]), flush=True); sys.stdin.read()"
)


@contextlib.contextmanager
def holder(parent: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(parent)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdin is not None
    try:
        yield process, Path(process.stdout.readline().strip())
    finally:
        process.stdin.close()
        process.wait(timeout=60)


def test_each_database_spills_into_a_folder_of_its_own_in_its_process_folder(tmp_path: Path) -> None:
    first, second = spill.own_spill_folder(str(tmp_path)), spill.own_spill_folder(str(tmp_path))
    assert first != second and Path(first).parent == Path(second).parent
    assert Path(first).parent.parent == tmp_path and Path(first).parent.name.startswith(f"duckdb-{os.getpid()}-")
    with holder(tmp_path) as (_, other):  # another process: another folder
        assert other.parent.parent == tmp_path and other.parent != Path(first).parent


def test_the_folders_of_processes_that_ended_are_removed_and_those_of_running_ones_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spill, "GRACE_SECONDS", 0.0)  # the folders here are seconds old
    with holder(tmp_path) as (_, ended):
        (ended / "duckdb_temp_storage_S64K-0.tmp").write_bytes(b"spilled")
    killed_process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert killed_process.stdout is not None
    killed = Path(killed_process.stdout.readline().strip())
    killed_process.kill()
    killed_process.wait()
    (tmp_path / "not-ours").mkdir()
    with holder(tmp_path) as (_, running):
        removed = spill.remove_abandoned(str(tmp_path))
        assert sorted(removed) == sorted(str(folder.parent) for folder in (ended, killed))
        assert running.is_dir() and not ended.parent.exists() and not killed.parent.exists()
        assert (tmp_path / "not-ours").is_dir()


def test_a_folder_younger_than_the_grace_is_kept_even_unlocked(tmp_path: Path) -> None:
    """It may be a process's folder in the instant between making it and locking it."""
    with holder(tmp_path) as (_, ended):
        pass
    assert spill.remove_abandoned(str(tmp_path)) == [] and ended.is_dir()


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


def server_in(folder: Path, log: str) -> contextlib.AbstractContextManager[tuple[subprocess.Popen[bytes], str]]:
    """`flight-server serve` run from `folder` on the SQLite catalog there, with a DuckDB memory limit small enough
    that a compaction spills."""
    return serving(folder, log=log, FLIGHT_SERVER_DUCKDB_MEMORY_LIMIT=SPILL_MEMORY, FLIGHT_SERVER_DUCKDB_THREADS="1")


def spilled(folder: Path) -> int:
    """Bytes the server's processes have spilled in their working directory now."""
    return sum(f.stat().st_size for f in (folder / SPILLS).rglob("*") if f.is_file())


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
