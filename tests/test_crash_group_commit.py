"""Exactly-once under group commit while processes die. 16 writers put one row at a time, each put with its own
write id, and retry a failed put with the same id until it is acknowledged, while the write process (or a whole
server) is SIGKILLed several times, at moments when groups commit (`MOMENTS`). Then every id's row is in the table
once, added by the one snapshot whose summary records the id, which is the snapshot its put was acknowledged with;
a retry of any id answers that snapshot as a duplicate; the table reads whole (no file it references is missing);
and removing orphan files removes what the killed puts left, nothing the table references."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import itertools
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pyiceberg.catalog import load_catalog

from flight_client import ConflictError, FeatureClient, FeatureServerError, UnavailableError, WriteResult
from tests.conftest import listening, sqlite_catalog, wait_until
from tests.test_group_commit import WRITERS, committed_ids, create, row, rows_by_snapshot, scanned, together
from tests.test_orphans import folder, paths, referenced, stored
from tests.test_write_process import alive, children, serving, state

KEYS = 10_000  # writer w puts the rows of keys w * KEYS, w * KEYS + 1, ... (until the killer is done)
PATIENCE = 60.0  # seconds within which a put is acknowledged, its retries included
SEED = 20261205  # the moments of the kills
FROZEN = 1  # the server kill (counted from 0) before which its write process is stopped for a while


@dataclass
class Acknowledged:
    """A put's answer, and the failed attempts before it."""

    key: int
    result: WriteResult
    failures: list[FeatureServerError]


@dataclass
class Chaos:
    """What the writers and the killer share: the servers (one, or two replicas on the catalog), which of them are
    being replaced, the acknowledgements so far."""

    servers: list[subprocess.Popen[bytes]]
    locations: list[str]
    failover: bool = False  # whole servers are killed: a writer whose server went retries at the other at once
    down: set[int] = field(default_factory=set)  # the servers being replaced (their index)
    acknowledged: int = 0
    answers: Counter[int] = field(default_factory=Counter)  # acknowledgements per writer
    kills: int = 0
    stop: threading.Event = field(default_factory=threading.Event)  # the writers put no more
    lock: threading.Lock = field(default_factory=threading.Lock)

    def location(self, writer: int) -> str:
        """Where the writer puts now: its own server (writers take turns), else the other."""
        server = writer % len(self.locations)
        if server in self.down:
            server = (server + 1) % len(self.locations)
        return self.locations[server]

    def retryable(self, exc: FeatureServerError) -> bool:
        """Whether a client is told to retry: a lost race, the write process stopped, or (when servers are killed) a
        server that cannot be reached or went away during the call."""
        if isinstance(exc, ConflictError):
            return True
        return isinstance(exc, UnavailableError) and (self.failover or "write process stopped" in str(exc))

    def going(self, _: object) -> bool:
        return not self.stop.is_set()

    def put(self, client: Callable[[str], FeatureClient], name: str, writer: int, key: int) -> Acknowledged:
        """Put the row of `key` with its write id until it is acknowledged (`client`: the writer's client for a
        location); any error a client is not told to retry fails the test, and so does a put not acknowledged
        within `PATIENCE`."""
        deadline, failures = time.monotonic() + PATIENCE, []
        while True:
            try:
                result = client(self.location(writer)).write(name, row(key), write_id=f"w-{key}")
            except FeatureServerError as exc:
                if not self.retryable(exc) or time.monotonic() > deadline:
                    raise
                failures.append(exc)
                continue
            with self.lock:
                self.acknowledged += 1
                self.answers[writer] += 1
            return Acknowledged(key, result, failures)


def may_have_committed(failure: FeatureServerError) -> bool:
    """Whether the failed attempt may have committed, as its error says (a lost race, a server not reached, a write
    process that stopped before the call reached it: nothing was)."""
    message = str(failure)
    return isinstance(failure, UnavailableError) and not (
        "nothing was committed" in message or "cannot reach the feature server" in message
    )


# When a kill comes, in turn: as soon as a commit changed the catalog (its puts are not answered yet); within 50 ms
# after an answer, at random (a group's commit ended: the next one starts); as soon as a commit has written its
# manifest list; as soon as it has begun its metadata file (both before it swaps the table's metadata in).
MOMENTS = ("committed", "after an answer", "manifest list", "metadata file")


def write_while_killing(
    catalog: Path, name: str, chaos: Chaos, kill: Callable[[int, int], None], kills: int
) -> list[Acknowledged]:
    """The writers' puts while `kill(server, child)` runs `kills` times, on each server in turn. Before each, the
    server's write process `child` listens (the one started after the last kill: the server's only child) and the
    writers have had a few more answers, a random number; then the kill comes at the next of its `MOMENTS`
    (`catalog`: the SQLite catalog's file). The writers put until a few answers after the last kill (a restart takes
    seconds, while puts run in the serving process). Returns every put's `Acknowledged`."""
    rng, killed = random.Random(SEED), set[int]()

    def answered(count: int) -> None:
        seen = chaos.acknowledged
        wait_until(lambda: chaos.acknowledged >= seen + count or writing.done(), timeout=PATIENCE, what="answers")

    def changed(moment: str, look: Callable[[], set[object]]) -> None:
        """Wait until `look` finds something new (polled every millisecond: a commit takes a few)."""
        before, deadline = look(), time.monotonic() + PATIENCE
        while not look() - before:
            assert time.monotonic() < deadline and not writing.done(), f"no {moment} within {PATIENCE}s"
            time.sleep(0.001)

    def moment(k: int, metadata: Path) -> None:
        """Return at the moment of kill `k`."""
        if (moment := MOMENTS[k % len(MOMENTS)]) == "after an answer":
            answered(1)
            time.sleep(rng.uniform(0, 0.05))  # not a wait for anything: the moment, at random
        elif moment == "committed":  # the file changed, and its rollback journal is gone: the transaction ended
            journal = catalog.with_name(f"{catalog.name}-journal")
            first = catalog.stat().st_mtime_ns
            changed(moment, lambda: set() if journal.exists() else {catalog.stat().st_mtime_ns} - {first})
        else:
            kind = "snap-" if moment == "manifest list" else ".metadata.json"
            changed(moment, lambda: {file for file in os.listdir(metadata) if kind in file})

    def work(client: FeatureClient, writer: int) -> list[Acknowledged]:
        with contextlib.ExitStack() as opened:
            clients = {chaos.locations[0]: client}

            def at(location: str) -> FeatureClient:
                if location not in clients:
                    clients[location] = opened.enter_context(FeatureClient(location, timeout=PATIENCE))
                return clients[location]

            keys = itertools.takewhile(chaos.going, range(writer * KEYS, (writer + 1) * KEYS))
            return [chaos.put(at, name, writer, key) for key in keys]

    with ThreadPoolExecutor(1) as pool:
        writing = pool.submit(together, chaos.locations[0], work, WRITERS, timeout=PATIENCE)
        try:
            for k in range(kills):
                server = k % len(chaos.servers)
                with FeatureClient(chaos.locations[server]) as client:
                    child = listening(client, other_than=killed)
                    metadata = folder(client, name) / "metadata"
                assert children(chaos.servers[server].pid) == {child}
                answered(rng.randint(5, 40))
                moment(k, metadata)
                kill(server, child)
                killed.add(child)
                chaos.kills += 1
            answered(WRITERS)
        finally:
            chaos.stop.set()
        acknowledged = [a for acks in writing.result() for a in acks]
    assert chaos.kills == kills, f"the writers stopped after {chaos.kills} kills"
    return acknowledged


def check_exactly_once(location: str, properties: dict[str, str], name: str, acknowledged: list[Acknowledged]) -> None:
    """Every write id's row in the table once, in the snapshot that records the id and answered its put (and a
    retry's); the table read whole through the server and by pyiceberg itself; then orphan files removed."""
    keys = [a.key for a in acknowledged]  # each writer's from the first of its keys on, in order
    assert keys == [w * KEYS + i for w in range(WRITERS) for i in range(sum(k // KEYS == w for k in keys))]
    puts, everything = len(keys), Counter([-1, *keys])  # -1: the row that created the table
    assert scanned(location, name) == everything
    table = load_catalog("default", **properties).load_table(name)
    read = table.scan().to_arrow()  # every data file the table references is there
    assert read.num_rows == puts + 1 and Counter(read.column("id").to_pylist()) == everything

    # Each write id is recorded by one snapshot, the one its put was acknowledged with, which added its row alone.
    recorded: dict[str, list[int]] = {}
    for snapshot in table.metadata.snapshots:
        for write_id in committed_ids(snapshot.summary.additional_properties if snapshot.summary else {}):
            recorded.setdefault(write_id, []).append(snapshot.snapshot_id)
    assert recorded == {f"w-{a.key}": [a.result.snapshot_id] for a in acknowledged}
    added = rows_by_snapshot(properties, name)
    for snapshot in table.metadata.snapshots[1:]:
        ids = committed_ids(snapshot.summary.additional_properties if snapshot.summary else {})
        assert Counter(f"w-{k}" for k in added[snapshot.snapshot_id].elements()) == Counter(ids)
    assert len(table.metadata.snapshots) - 1 < puts  # group commit grouped
    for put in acknowledged:
        assert (put.result.write_id, put.result.rows, put.result.files) == (f"w-{put.key}", 1, 1)
        # A first answer is never a duplicate, nor one after attempts that all said nothing was committed.
        assert not put.result.duplicate or any(may_have_committed(f) for f in put.failures), put

    def again(client: FeatureClient, writer: int) -> list[WriteResult]:
        return [client.write(name, row(k), write_id=f"w-{k}") for k in keys if k // KEYS == writer]

    retried = [r for rs in together(location, again) for r in rs]
    for put, retry in zip(acknowledged, retried, strict=True):
        assert (retry.duplicate, retry.snapshot_id, retry.write_id) == (True, put.result.snapshot_id, f"w-{put.key}")
        assert (retry.rows, retry.files) == (1, 1)
    assert scanned(location, name) == everything

    # The files the killed puts wrote and never committed are orphans: removed, and nothing the table references.
    # What the table references is listed once (with pyiceberg, over every snapshot: a second or two here): removing
    # orphans commits nothing, so the same list holds after it, and any file it wrote would show up as unreferenced.
    with FeatureClient(location) as client:
        root = folder(client, name)
        kept = referenced(properties, name)
        leaked = stored(root) - kept
        removed = client.remove_orphan_files(name, older_than=dt.datetime.now(dt.timezone.utc))
    assert paths(removed["files"]) == leaked and removed["files_deleted"] == len(leaked)
    assert stored(root) == kept
    assert scanned(location, name) == everything
    assert Counter(load_catalog("default", **properties).load_table(name).scan().to_arrow()["id"].to_pylist()) == (
        everything
    )


def frozen_without_locks(pid: int, catalog: Path) -> bool:
    """SIGSTOP the process; True once it stopped holding no lock on the SQLite catalog's file, else it goes on
    (SIGCONT). A process stopped holding SQLite's lock (reading or committing) would stop every writer of the
    catalog: no server can help that."""
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: all(state(int(task.name)) == "T" for task in Path(f"/proc/{pid}/task").iterdir()))
    locks = [line.replace("->", "").split() for line in Path("/proc/locks").read_text().splitlines()]
    inode = str(catalog.stat().st_ino)
    if not any(lock[4] == str(pid) and lock[5].rsplit(":", 1)[1] == inode for lock in locks):
        return True
    os.kill(pid, signal.SIGCONT)
    return False


def test_puts_land_exactly_once_while_the_write_process_is_killed_during_group_commits(tmp_path: Path) -> None:
    name = "chaos.child"
    with serving(tmp_path) as (process, location), FeatureClient(location) as client:
        create(location, name)
        chaos = Chaos([process], [location])

        def kill(server: int, child: int) -> None:
            """SIGKILL the write process (the next put starts another)."""
            os.kill(child, signal.SIGKILL)
            wait_until(lambda: not alive(child), what="the write process to end")

        acknowledged = write_while_killing(tmp_path / "catalog.db", name, chaos, kill, kills=5)
        wait_until(lambda: client.health()["write_process"]["starts"] == 6, what="the write process to start again")
        assert any(f for a in acknowledged for f in a.failures if "write process stopped" in str(f))
        check_exactly_once(location, sqlite_catalog(tmp_path), name, acknowledged)


def test_puts_land_exactly_once_while_servers_are_killed_during_group_commits_and_replaced(tmp_path: Path) -> None:
    """Two servers on the catalog, each writer putting through one of them; a killed server's writers retry at the
    other at once, while the killed server's write process may still commit their puts (it ends by itself); a new
    server replaces it, at a new location. Once, the write process is stopped (SIGSTOP) before its server is killed,
    and resumed only once every writer was answered again: the puts it held, already committed by their retries,
    must not commit again when it goes on."""
    name, started, abandoned = "chaos.server", itertools.count(), set[int]()
    with contextlib.ExitStack() as servers:
        pairs = [servers.enter_context(serving(tmp_path, log=f"server-{next(started)}.log")) for _ in range(2)]
        chaos = Chaos([process for process, _ in pairs], [location for _, location in pairs], failover=True)
        create(chaos.locations[0], name)

        def kill(server: int, child: int) -> None:
            """SIGKILL the server (its write process `child` ends by itself), and start another in its place."""
            frozen = chaos.kills == FROZEN
            if frozen:
                stopped = functools.partial(frozen_without_locks, child, tmp_path / "catalog.db")
                wait_until(stopped, what="a moment the write process holds no lock on the catalog")
            with chaos.lock:
                answered = chaos.answers.copy()
            chaos.down.add(server)
            os.kill(chaos.servers[server].pid, signal.SIGKILL)
            abandoned.add(child)
            chaos.servers[server].wait()
            if frozen:

                def caught_up() -> bool:
                    return all(chaos.answers[w] > answered[w] for w in range(WRITERS))

                try:
                    wait_until(caught_up, timeout=PATIENCE, what="every writer answered again")
                finally:
                    os.kill(child, signal.SIGCONT)
            replaced = servers.enter_context(serving(tmp_path, log=f"server-{next(started)}.log"))
            chaos.servers[server], chaos.locations[server] = replaced
            chaos.down.discard(server)

        acknowledged = write_while_killing(tmp_path / "catalog.db", name, chaos, kill, kills=3)
        assert any(may_have_committed(f) for a in acknowledged for f in a.failures)
        check_exactly_once(chaos.locations[1], sqlite_catalog(tmp_path), name, acknowledged)
    wait_until(lambda: not any(alive(pid) for pid in abandoned), timeout=60, what="the old write processes to end")
