"""Group commit: one-row puts from 16 concurrent writers share snapshots, each row lands exactly once, each put
is acknowledged only once the snapshot holding it is in the catalog, a bad put fails alone (whether refused as
it arrives or at the commit of its group), and retries of the same write ids through two servers at once
commit once."""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyiceberg.typedef import Record

from flight_client import FeatureClient, InvalidRequestError
from flight_server.base.locks import LockPool
from flight_server.base.schemas import Conformer, table_arrow_schema
from flight_server.changes import group
from flight_server.changes.files import write_data_files
from flight_server.changes.group import ENABLED_PROPERTY, GroupCommits, Put, Rows
from flight_server.changes.history import PUTS_PROPERTY, WRITE_ID_PROPERTY, WRITE_IDS_PROPERTY, WriteIds
from flight_server.changes.writes import _Checks, _ForFiles
from flight_server.iceberg import internals
from flight_server.iceberg.catalog import FeatureCatalog, FeatureSpec
from flight_server.transport.service import FeatureFlightServer
from flight_server.wire.errors import ConflictError
from flight_server.wire.writes import WriteResult
from tests.conftest import sqlite_catalog, start_server, wait_until
from tests.test_pyiceberg_internals import first_use_during_copy

WRITERS = 16
PUTS_PER_WRITER = 6
T0 = dt.datetime(2025, 3, 1, tzinfo=dt.timezone.utc)
DEFINITION: dict[str, Any] = {"entity_keys": ["id"], "event_time": "ts"}
R = TypeVar("R")


@pytest.fixture(scope="module")
def properties(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return sqlite_catalog(tmp_path_factory.mktemp("group-commit"))


@pytest.fixture(scope="module")
def servers(properties: dict[str, str]) -> Iterator[list[str]]:
    """Two servers (group commit on, the default) on one SQLite catalog."""
    started = [start_server(properties) for _ in range(2)]
    yield [f"grpc://127.0.0.1:{s.port}" for s in started]
    for server in started:
        server.shutdown()


def row(i: int, **extra: pa.Array) -> pa.Table:
    return pa.table(
        {
            "id": pa.array([i], pa.int64()),
            "ts": pa.array([T0 + dt.timedelta(seconds=i)], pa.timestamp("us", "UTC")),
            "value": pa.array([i / 3], pa.float64()),
            **extra,
        }
    )


def create(location: str, name: str) -> None:
    with FeatureClient(location) as client:
        client.write(name, row(-1), **DEFINITION)


def together(location: str, work: Callable[[FeatureClient, int], R], writers: int = WRITERS, **options: Any) -> list[R]:
    """`work(client, writer)` in `writers` threads, each with its own connected client (made with `options`),
    released at once."""
    start = threading.Barrier(writers)

    def run(writer: int) -> R:
        with FeatureClient(location, **options) as client:
            client.health()
            start.wait(timeout=30)
            return work(client, writer)

    with ThreadPoolExecutor(writers) as pool:
        return list(pool.map(run, range(writers)))


def summaries(properties: dict[str, str], name: str) -> list[dict[str, str]]:
    """Every snapshot summary of the table, from the catalog itself (not through a server)."""
    table = FeatureCatalog("default", properties).load(name)
    return [s.summary.additional_properties if s.summary else {} for s in table.metadata.snapshots]


def committed_ids(summary: dict[str, str]) -> list[str]:
    if WRITE_ID_PROPERTY in summary:
        return [summary[WRITE_ID_PROPERTY]]
    return list(json.loads(summary.get(WRITE_IDS_PROPERTY, "{}")))


def scanned(location: str, name: str) -> Counter[int]:
    with FeatureClient(location) as client:
        return Counter(client.scan(name).read_all().column("id").to_pylist())


def test_concurrent_puts_share_snapshots_land_once_and_are_acknowledged_after_their_commit(
    servers: list[str], properties: dict[str, str]
) -> None:
    name = "group.writers"
    create(servers[0], name)
    catalog = FeatureCatalog("default", properties)  # loads the table afresh from the catalog on each call

    def work(client: FeatureClient, writer: int) -> list[WriteResult]:
        results = []
        for i in range(PUTS_PER_WRITER):
            key = writer * PUTS_PER_WRITER + i
            result = client.write(name, row(key), write_id=f"w-{key}")
            # Acknowledged: the snapshot holding the put is already in the catalog, and records its write id.
            snapshot = catalog.load(name).snapshot_by_id(result.snapshot_id)
            assert snapshot is not None and snapshot.summary is not None, f"put {key} acknowledged before its commit"
            assert f"w-{key}" in committed_ids(snapshot.summary.additional_properties)
            results.append(result)
        return results

    results = [r for rs in together(servers[0], work) for r in rs]
    puts = WRITERS * PUTS_PER_WRITER
    assert not any(r.duplicate for r in results) and all(r.rows == r.files == 1 for r in results)
    assert scanned(servers[1], name) == Counter(range(-1, puts))
    written = summaries(properties, name)[1:]  # after the one that created the table
    assert len(written) == len({r.snapshot_id for r in results}) < puts
    assert sum(int(s[PUTS_PROPERTY]) for s in written) == puts
    assert Counter(i for s in written for i in committed_ids(s)) == Counter(f"w-{k}" for k in range(puts))
    shared = [s for s in written if int(s[PUTS_PROPERTY]) > 1]
    assert shared and all(int(s["added-records"]) == int(s[PUTS_PROPERTY]) for s in shared)


def test_a_put_with_a_bad_schema_fails_alone(servers: list[str]) -> None:
    name = "group.bad"
    create(servers[0], name)
    bad = 5

    def work(client: FeatureClient, writer: int) -> str:
        data = row(writer, value=pa.array(["not a number"])) if writer == bad else row(writer)
        try:
            client.write(name, data, write_id=f"w-{writer}")
        except InvalidRequestError as exc:
            return str(exc)
        return "ok"

    answers = together(servers[0], work)
    assert answers[bad] != "ok" and "value" in answers[bad] and "Traceback" not in answers[bad]
    assert answers[:bad] + answers[bad + 1 :] == ["ok"] * (WRITERS - 1)
    assert scanned(servers[1], name) == Counter([-1, *(w for w in range(WRITERS) if w != bad)])


def test_retries_of_the_same_write_ids_through_two_servers_at_once_commit_once(
    servers: list[str], properties: dict[str, str]
) -> None:
    name = "group.retries"
    create(servers[0], name)
    per_server = WRITERS // 2

    def work(client: FeatureClient, writer: int) -> list[WriteResult]:
        # Writer w on the first server and writer w + 8 on the second put the same rows with the same ids.
        keys = [(writer % per_server) * PUTS_PER_WRITER + i for i in range(PUTS_PER_WRITER)]
        return [client.write(name, row(k), write_id=f"w-{k}") for k in keys]

    with ThreadPoolExecutor(2) as pool:
        halves = pool.map(lambda location: together(location, work, per_server), servers)
        results = [r for half in halves for rs in half for r in rs]
    puts = per_server * PUTS_PER_WRITER
    by_id: dict[str | None, list[WriteResult]] = {}
    for result in results:
        by_id.setdefault(result.write_id, []).append(result)
    assert len(by_id) == puts
    for write_id, answers in by_id.items():
        first, again = sorted(answers, key=lambda r: r.duplicate)
        assert (first.duplicate, again.duplicate) == (False, True), write_id
        assert first.snapshot_id == again.snapshot_id and again.rows == again.files == 1, write_id
    assert scanned(servers[1], name) == Counter(range(-1, puts))
    ids = Counter(i for s in summaries(properties, name) for i in committed_ids(s))
    assert ids == Counter(f"w-{k}" for k in range(puts))


def staged(catalog: FeatureCatalog, name: str, key: int) -> Put:
    """A one-row put whose data file is written for the table as it is now, ready to commit."""
    table = catalog.load(name)  # a table of its own (pyiceberg caches properties on the schema it writes for)
    data = row(key)
    chunk = pa.Table.from_batches([Conformer(table_arrow_schema(table.schema()), data.schema)(data.to_batches()[0])])
    spec = FeatureSpec.from_properties(table.metadata.properties)
    files = write_data_files(table.metadata, chunk, table.io, spec, uuid.uuid4(), itertools.count())
    return Put(name, f"w-{key}", files, 1, table.schema(), table.metadata.default_spec_id, time.monotonic() + 60)


def grouped(groups: GroupCommits, locks: LockPool, leader: Put, followers: list[Put]) -> list[Any]:
    """`leader` commits alone while `followers` queue behind it, then they commit as one group; each put's
    result or error."""
    identifier = groups.catalog.identifier(leader.table)
    with ThreadPoolExecutor(1 + len(followers)) as pool:
        with locks(identifier):  # the leader waits for the table's commit lock: a commit in flight
            futures = [pool.submit(groups.commit, identifier, leader)]
            wait_until(lambda: groups.waiting(identifier) == 0, what="the leader's commit")
            futures += [pool.submit(groups.commit, identifier, put) for put in followers]
            wait_until(lambda: groups.waiting(identifier) == len(followers), what="the followers queued")
        return [future.exception() or future.result() for future in futures]


def test_a_put_that_cannot_commit_leaves_its_group_and_the_others_land(
    servers: list[str], properties: dict[str, str]
) -> None:
    name = "group.isolated"
    create(servers[0], name)
    catalog, locks = FeatureCatalog("default", properties), LockPool()
    groups = GroupCommits(catalog, locks, WriteIds())
    stale = staged(catalog, name, 0)  # its file is written for the partition spec that is replaced next
    with catalog.load(name).update_spec() as update:
        update.add_identity("value")
    first, *fresh = [staged(catalog, name, k) for k in range(1, 5)]
    answers = grouped(groups, locks, first, [stale, *fresh])
    assert isinstance(answers[1], ConflictError) and "partitioning" in str(answers[1])
    landed = [answers[0], *answers[2:]]
    assert all(isinstance(a, WriteResult) and not a.duplicate for a in landed)
    assert (
        len({a.snapshot_id for a in answers[2:]}) == 1 != answers[0].snapshot_id
    )  # the three fresh ones: one snapshot

    # A group whose commit fails for a reason no check foresaw (here a data file whose partition cannot be
    # written) is retried one put at a time: only the put that cannot commit fails.
    broken = staged(catalog, name, 5)
    broken.files = [copy.deepcopy(broken.files[0])]
    broken.files[0][3] = Record("not a month", None, None)  # DataFile field 3: the partition
    leader, *others = [staged(catalog, name, k) for k in range(6, 9)]
    answers = grouped(groups, locks, leader, [others[0], broken, others[1]])
    assert isinstance(answers[2], Exception) and not isinstance(answers[2], ConflictError)
    assert all(isinstance(a, WriteResult) for a in (answers[0], answers[1], answers[3]))
    assert scanned(servers[1], name) == Counter([-1, *range(1, 5), *range(6, 9)])
    ids = Counter(i for s in summaries(properties, name) for i in committed_ids(s))
    assert ids == Counter(f"w-{k}" for k in [*range(1, 5), *range(6, 9)])


def test_without_group_commit_every_put_is_its_own_snapshot(tmp_path: Path) -> None:
    properties = sqlite_catalog(tmp_path)
    server: FeatureFlightServer = start_server(properties, group_commit=False)
    location = f"grpc://127.0.0.1:{server.port}"
    try:
        name = "group.off"
        create(location, name)
        # The server's switch turns group commit off for every table, whatever the table's own says.
        set_properties(properties, name, {ENABLED_PROPERTY: "true"})
        writers = 8
        results = together(location, lambda client, writer: client.write(name, row(writer)), writers)
        assert len({r.snapshot_id for r in results}) == writers
        assert all(s[PUTS_PROPERTY] == "1" for s in summaries(properties, name))
        assert scanned(location, name) == Counter(range(-1, writers))
    finally:
        server.shutdown()


def set_properties(properties: dict[str, str], name: str, values: dict[str, str]) -> None:
    with FeatureCatalog("default", properties).load(name).transaction() as transaction:
        transaction.set_properties(values)


def queued_behind_a_commit(server: FeatureFlightServer, name: str, keys: list[int]) -> list[WriteResult]:
    """One-row puts of `keys` through the server, each from its own client, that all arrive while a commit to the
    table is in flight (the test holds the server's commit lock of the table until the first put waits for it
    and the others are queued behind it). Without write ids: a put with one holds a lock of the server's pool of
    write-id locks until its commit, which another put's id may share, and that put would wait there instead
    of queueing."""
    writer = server.parts.writer
    identifier = writer.catalog.identifier(name)
    location = f"grpc://127.0.0.1:{server.port}"

    def put(key: int) -> WriteResult:
        with FeatureClient(location) as client:
            return client.write(name, row(key))

    with ThreadPoolExecutor(len(keys)) as pool:
        with writer._commit_locks(identifier):
            futures = [pool.submit(put, keys[0])]
            wait_until(lambda: writer._groups.waiting(identifier) == 0, what="the first put's commit")
            futures += [pool.submit(put, key) for key in keys[1:]]
            wait_until(lambda: writer._groups.waiting(identifier) == len(keys) - 1, what="the other puts queued")
        return [future.result() for future in futures]


def test_a_table_property_turns_group_commit_off_for_that_table_alone(tmp_path: Path) -> None:
    properties = sqlite_catalog(tmp_path)
    server: FeatureFlightServer = start_server(properties)  # group commit on
    location = f"grpc://127.0.0.1:{server.port}"
    try:
        alone, grouped, unreadable = "group.alone", "group.grouped", "group.unreadable"
        for name in (alone, grouped, unreadable):
            create(location, name)
        set_properties(properties, alone, {ENABLED_PROPERTY: "false"})
        set_properties(properties, unreadable, {ENABLED_PROPERTY: "maybe"})  # not a boolean: stays on
        keys = list(range(5))
        results = {name: queued_behind_a_commit(server, name, keys) for name in (alone, grouped, unreadable)}
        # Off: five snapshots of one put each. On: the first put alone, then the four queued behind it together.
        assert len({r.snapshot_id for r in results[alone]}) == len(keys)
        assert [s[PUTS_PROPERTY] for s in summaries(properties, alone)[1:]] == ["1"] * len(keys)
        for name in (grouped, unreadable):
            assert [s[PUTS_PROPERTY] for s in summaries(properties, name)[1:]] == ["1", str(len(keys) - 1)]
        for name, answers in results.items():
            assert not any(r.duplicate for r in answers) and all(r.rows == r.files == 1 for r in answers)
            assert scanned(location, name) == Counter([-1, *keys])
    finally:
        server.shutdown()


def test_a_commit_whose_outcome_is_unknown_keeps_its_files_and_its_retry_lands_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catalog applies a commit and its answer is lost (a timeout, a dropped connection: a fault no real
    catalog here produces on demand): the put fails, its files stay (the table references them), and the
    client's retry with the same write id finds it committed."""
    server = start_server(sqlite_catalog(tmp_path))
    location, name = f"grpc://127.0.0.1:{server.port}", "group.unknown"
    try:
        create(location, name)
        real = internals._commit_sql  # the SQL catalog's commit (its compare-and-swap of the table's pointer)

        def applied_then_lost(*args: Any, **kwargs: Any) -> Any:
            real(*args, **kwargs)
            raise ConnectionResetError("the catalog's answer was lost")

        with FeatureClient(location) as client:
            monkeypatch.setattr(internals, "_commit_sql", applied_then_lost)
            with pytest.raises(Exception) as failed:
                client.write(name, row(1), write_id="unknown-1")
            assert not isinstance(failed.value, InvalidRequestError)
            monkeypatch.undo()
            assert scanned(location, name) == Counter([-1, 1])  # landed, and its file is still there
            again = client.write(name, row(1), write_id="unknown-1")
            assert again.duplicate
            assert scanned(location, name) == Counter([-1, 1])
    finally:
        server.shutdown()


def rows_by_snapshot(properties: dict[str, str], name: str) -> dict[int, Counter[int]]:
    """The ids of the rows each snapshot added, read from the data files the table's manifests say it added."""
    table = FeatureCatalog("default", properties).load(name)
    entries = table.inspect.entries().to_pylist()
    added: dict[int, Counter[int]] = {}
    for entry in entries:
        path = entry["data_file"]["file_path"].removeprefix("file://")
        ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
        added.setdefault(entry["snapshot_id"], Counter()).update(ids)
    return added


def test_small_puts_of_16_writers_share_data_files_and_each_lands_once_in_the_snapshot_of_its_write_id(
    servers: list[str], properties: dict[str, str]
) -> None:
    name = "group.coalesced"
    create(servers[0], name)

    def work(client: FeatureClient, writer: int) -> list[WriteResult]:
        keys = [writer * PUTS_PER_WRITER + i for i in range(PUTS_PER_WRITER)]
        return [client.write(name, row(k), write_id=f"w-{k}") for k in keys]

    results = [r for rs in together(servers[0], work) for r in rs]
    puts = WRITERS * PUTS_PER_WRITER
    assert not any(r.duplicate for r in results) and all(r.rows == r.files == 1 for r in results)
    written = summaries(properties, name)[1:]
    assert sum(int(s["added-data-files"]) for s in written) < puts  # coalesced: fewer files than puts
    assert scanned(servers[1], name) == Counter(range(-1, puts))
    # Every snapshot added exactly the rows of the write ids it records: a put's id is in the snapshot with its row.
    table = FeatureCatalog("default", properties).load(name)
    added = rows_by_snapshot(properties, name)
    for snapshot in table.metadata.snapshots[1:]:
        assert snapshot.summary is not None
        ids = committed_ids(snapshot.summary.additional_properties)
        assert Counter(f"w-{k}" for k in added[snapshot.snapshot_id].elements()) == Counter(ids)
    assert {r.snapshot_id for r in results} == {s.snapshot_id for s in table.metadata.snapshots[1:]}
    # Each shared file holds the rows of the partition its manifest entry names, and only those.
    for task in table.scan().plan_files():
        rows = pq.read_table(task.file.file_path.removeprefix("file://"))
        found = internals.partitions(table.spec(), table.schema(), rows)
        assert [key.partition for key, _ in found] == [task.file.partition], task.file.file_path


def own_group_commits(
    location: str, properties: dict[str, str], name: str
) -> tuple[FeatureCatalog, LockPool, GroupCommits]:
    """The table, created through the server at `location`, and group commits of the test's own to it."""
    create(location, name)
    catalog, locks = FeatureCatalog("default", properties), LockPool()
    return catalog, locks, GroupCommits(catalog, locks, WriteIds())


def small(catalog: FeatureCatalog, name: str, key: int, write_id: str | None = None, timeout: float = 60) -> Put:
    """A one-row put received for the table as it is now whose rows its group writes (`Rows`), ready to commit."""
    table = catalog.load(name)
    data = row(key)
    chunk = pa.Table.from_batches([Conformer(table_arrow_schema(table.schema()), data.schema)(data.to_batches()[0])])
    spec = FeatureSpec.from_properties(table.metadata.properties)
    rows = Rows(chunk, table.metadata, table.io, spec)
    deadline = time.monotonic() + timeout
    put_id = write_id or f"w-{key}"
    return Put(name, put_id, [], 1, table.schema(), table.metadata.default_spec_id, deadline, rows_left=rows)


def test_a_small_put_refused_at_its_groups_commit_has_none_of_its_rows_committed(
    servers: list[str], properties: dict[str, str]
) -> None:
    name = "group.coalesced-refused"
    catalog, locks, groups = own_group_commits(servers[0], properties, name)
    stale = small(catalog, name, 0)  # received for the partition spec that is replaced next
    with catalog.load(name).update_spec() as update:
        update.add_identity("value")
    first, *fresh = [small(catalog, name, k) for k in range(1, 5)]
    answers = grouped(groups, locks, first, [*fresh[:1], stale, *fresh[1:]])
    assert isinstance(answers[2], ConflictError) and "partitioning" in str(answers[2])
    assert all(isinstance(a, WriteResult) and not a.duplicate for a in (answers[0], answers[1], *answers[3:]))
    assert scanned(servers[1], name) == Counter([-1, *range(1, 5)])
    added = rows_by_snapshot(properties, name)
    assert added[answers[1].snapshot_id] == Counter(range(2, 5))  # the shared files hold the admitted rows only


def test_small_puts_refused_after_their_shared_files_were_written_are_written_out_of_them(
    servers: list[str], properties: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica commits one of the group's write ids while the group's files are written (its commit then
    loses the race), and another put passes its deadline meanwhile: the files are written again without both, and
    the duplicate's row is in the table once."""
    name = "group.coalesced-duplicate"
    catalog, locks, groups = own_group_commits(servers[0], properties, name)
    replica = GroupCommits(FeatureCatalog("default", properties), LockPool(), WriteIds())
    identifier = catalog.identifier(name)
    leader = small(catalog, name, 0)
    duplicate, late = small(catalog, name, 2, "w-dup"), small(catalog, name, 3, timeout=-1)
    others = [small(catalog, name, k) for k in (1, 4, 5)]
    attempts: list[list[str]] = []
    real = group.commit_append

    def replica_commits_first(transaction: Any, files: list[Any], summary: dict[str, str]) -> Any:
        attempts.append([f.file_path for f in files])
        if len(attempts) == 2:  # the followers' group: the other replica commits the same write id just before
            replica.commit(identifier, small(catalog, name, 2, "w-dup"))
        return real(transaction, files, summary)

    monkeypatch.setattr(group, "commit_append", replica_commits_first)
    answers = grouped(groups, locks, leader, [others[0], duplicate, late, *others[1:]])
    assert isinstance(answers[3], ConflictError) and "in time" in str(answers[3])
    assert isinstance(answers[2], WriteResult) and answers[2].duplicate
    landed = [answers[1], *answers[4:]]
    assert all(isinstance(a, WriteResult) and not a.duplicate for a in landed)
    assert (
        len(attempts) == 4
    )  # the leader, the group, the replica's commit (through the same function), the group again
    assert scanned(servers[1], name) == Counter([-1, 0, 1, 2, 4, 5])
    added = rows_by_snapshot(properties, name)
    assert added[landed[0].snapshot_id] == Counter([1, 4, 5])
    assert added[answers[2].snapshot_id] == Counter([2])
    assert not any(Path(p.removeprefix("file://")).exists() for p in attempts[1])  # the refused files are gone
    ids = Counter(i for s in summaries(properties, name) for i in committed_ids(s))
    assert ids == Counter(["w-0", "w-1", "w-dup", "w-4", "w-5"])


class Panic(BaseException):
    """What pyo3 raises when pyiceberg's Rust code panics: no `Exception`."""


@pytest.mark.parametrize("error", [OSError("no space left for this row"), Panic("unaligned buffer")], ids=repr)
def test_when_the_shared_files_cannot_be_written_each_small_put_is_tried_alone(
    servers: list[str], properties: dict[str, str], monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    name = f"group.coalesced_unwritable_{type(error).__name__.lower()}"
    catalog, locks, groups = own_group_commits(servers[0], properties, name)
    real = group.write_data_files
    bad = 3

    def fails_with_bad_rows(metadata: Any, rows: pa.Table, *args: Any) -> Any:
        if bad in rows.column("id").to_pylist():  # a full disk, say, only ever for the files holding this row
            raise error
        return real(metadata, rows, *args)

    monkeypatch.setattr(group, "write_data_files", fails_with_bad_rows)
    leader, *followers = [small(catalog, name, k) for k in range(6)]
    answers = grouped(groups, locks, leader, followers)
    assert answers[bad] is error
    assert all(isinstance(a, WriteResult) for i, a in enumerate(answers) if i != bad)
    assert scanned(servers[1], name) == Counter([-1, *(k for k in range(6) if k != bad)])
    ids = Counter(i for s in summaries(properties, name) for i in committed_ids(s))
    assert ids == Counter(f"w-{k}" for k in range(6) if k != bad)


def test_a_leader_waits_for_the_writers_of_the_last_group_but_no_longer_than_its_commit_took(
    servers: list[str], properties: dict[str, str]
) -> None:
    name = "group.linger"
    catalog, locks, _ = own_group_commits(servers[0], properties, name)
    groups = GroupCommits(catalog, locks, WriteIds(), linger=60)
    identifier = catalog.identifier(name)
    first, second, third, fourth = [small(catalog, name, k) for k in range(4)]
    with ThreadPoolExecutor(4) as pool:
        # Two writers meet: the first put's commit takes 2 s (the test holds the table's commit lock that long),
        # the second queues behind it.
        with locks(identifier):
            alone = pool.submit(groups.commit, identifier, first)
            wait_until(lambda: groups.waiting(identifier) == 0, what="the first put's commit")
            lingering = pool.submit(groups.commit, identifier, second)
            wait_until(lambda: groups.waiting(identifier) == 1, what="the second put queued")
            time.sleep(2)
        alone.result()
        # The second put leads next, and waits for the first writer to put again instead of committing alone.
        wait_until(lambda: groups.waiting(identifier) == 1, what="the second put leading, still queued")
        joined = pool.submit(groups.commit, identifier, third)
        assert lingering.result(timeout=30).snapshot_id == joined.result(timeout=30).snapshot_id
        # Then only one writer puts: its put waits for the other no longer than the last commit took, not the
        # 60 s the server allows.
        last = pool.submit(groups.commit, identifier, fourth).result(timeout=30)
        assert last.snapshot_id not in {alone.result().snapshot_id, joined.result().snapshot_id}
    assert scanned(servers[1], name) == Counter(range(-1, 4))


def test_a_leader_waits_for_puts_still_arriving_a_share_of_its_own_arrival_at_most(
    servers: list[str], properties: dict[str, str]
) -> None:
    """A leader waits for the puts to its table whose rows are still arriving (a batch from several writers at
    once), so that they share its snapshot and files, instead of committing alone; no longer once none is arriving
    (one that failed); not at all when its own rows arrived at once (a one-row put never waits for a big one)."""
    name = "group.arriving"
    catalog, locks, groups = own_group_commits(servers[0], properties, name)
    identifier = catalog.identifier(name)
    first, second, third, fourth = [small(catalog, name, k) for k in range(4)]
    first.received = second.received = 600.0  # it may wait up to a quarter of that: the test's timeouts end sooner
    with ThreadPoolExecutor(1) as pool:
        with groups.receiving(identifier) as arriving:
            leading = pool.submit(groups.commit, identifier, first)
            wait_until(lambda: groups.waiting(identifier) == 1, what="the first put to lead and wait")
            third.arrival = arriving  # its rows have come: it queues
            assert groups.commit(identifier, third).snapshot_id == leading.result(timeout=30).snapshot_id
        groups = GroupCommits(catalog, locks, WriteIds())  # not expecting the last group's two writers again
        with groups.receiving(identifier):  # arriving, then failing before it queues
            alone = pool.submit(groups.commit, identifier, second)
            wait_until(lambda: groups.waiting(identifier) == 1, what="the second put to lead and wait")
        assert alone.result(timeout=30).snapshot_id != leading.result().snapshot_id
        with groups.receiving(identifier):  # its rows came at once: it does not wait
            assert fourth.received == 0.0
            assert groups.commit(identifier, fourth).snapshot_id != alone.result().snapshot_id
    assert scanned(servers[1], name) == Counter(range(-1, 4))


class _HeldCatalog(FeatureCatalog):
    """A catalog whose first `find_for_change` is held, once it has read the catalog, until `release` is set."""

    def __init__(self, properties: dict[str, str]):
        super().__init__("default", properties)
        self.checks = 0
        self.reading = threading.Event()
        self.release = threading.Event()

    def find_for_change(self, table: str) -> Any:
        found = super().find_for_change(table)
        self.checks += 1
        if self.checks == 1:
            self.reading.set()
            assert self.release.wait(30)
        return found


def test_puts_that_arrive_during_a_catalog_check_share_the_next_one_and_see_what_was_committed_before(
    servers: list[str], properties: dict[str, str]
) -> None:
    name = "group.checks"
    create(servers[0], name)
    catalog = _HeldCatalog(properties)
    checks = _Checks(catalog)
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(checks.find_for_change, name)
        assert catalog.reading.wait(30)  # the first put's check has read the catalog, and is still running
        with FeatureClient(servers[1]) as client:
            committed = client.write(name, row(1)).snapshot_id  # acknowledged before the next puts arrive
        later = [pool.submit(checks.find_for_change, name) for _ in range(2)]
        wait_until(lambda: len(checks._tables) == 1 and checks._tables[catalog.identifier(name)].users == 3)
        catalog.release.set()
        tables = [first.result(timeout=30), *(f.result(timeout=30) for f in later)]
    assert catalog.checks == 2  # the first put's check, and one for both puts that arrived during it
    current = [t.current_snapshot().snapshot_id for t in tables]
    assert current[0] != committed and current[1:] == [committed, committed]
    assert len({id(t) for t in tables}) == 3  # each put its own table object (a commit through one changes it)
    assert not checks._tables


def test_puts_commit_while_another_thread_first_uses_the_schema_the_server_shares(tmp_path: Path) -> None:
    """The server's reads, catalog checks and puts share a table's metadata (`FeatureCatalog.read`), and a scan's
    planning caches on its schema at its first use of each cache. A grouped put's commit deep-copied that schema,
    and such a first use in the middle of the copy answered the put INTERNAL ("dictionary changed size during
    iteration"); the planted hook has another thread make that first use at that moment of any copy."""
    server = start_server(sqlite_catalog(tmp_path))
    try:
        location, name = f"grpc://127.0.0.1:{server.port}", "group.shared"
        create(location, name)
        hook = first_use_during_copy(server.parts.catalog.read(name).metadata)  # what the next puts commit on
        results = together(location, lambda client, writer: client.write(name, row(writer)))
        assert all(r.rows == 1 for r in results) and hook.copies == 0
        assert scanned(location, name) == Counter(range(-1, WRITERS))
    finally:
        server.shutdown()


def test_the_copy_puts_write_files_for_shares_the_schema_another_thread_caches_on(tmp_path: Path) -> None:
    """`_ForFiles` copies a table's metadata without its history for the puts of one layout: it shares the schema
    (a deep copy of it fails when another thread first uses the schema meanwhile) and drops the history."""
    catalog = FeatureCatalog("default", sqlite_catalog(tmp_path))
    catalog.ensure_namespace(("group",))
    table = catalog.catalog.create_table(("group", "files"), schema=row(0).schema)
    table.append(row(0))
    hook = first_use_during_copy(table.metadata)
    metadata, arrow = _ForFiles()(table)
    assert hook.copies == 0 and metadata.schema() is table.metadata.schema() and not metadata.snapshots
    assert arrow.names == ["id", "ts", "value"] and table.metadata.snapshots


def batch(writer: int, rows: int = 60_000) -> pa.Table:
    """A pipeline's batch of `rows` feature rows (over 1 MiB of Arrow) for keys of its own, over four days."""
    ids = range(writer * rows, (writer + 1) * rows)
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "ts": pa.array([T0 + dt.timedelta(hours=i % 96) for i in ids], pa.timestamp("us", "UTC")),
            "value": pa.array([i / 3 for i in ids], pa.float64()),
        }
    )


@pytest.mark.parametrize("shared_bytes", [group.MAX_SHARED_BYTES, 2 << 20], ids=["within", "past"])
def test_batches_queued_together_share_one_file_a_partition(
    properties: dict[str, str], monkeypatch: pytest.MonkeyPatch, shared_bytes: int
) -> None:
    """Three writers' batches (each over 1 MiB, one chunk of the write buffer) queue behind a commit in flight: their
    group writes their rows into one file a partition, not one each, and each put counts the files that hold its
    rows; past `MAX_SHARED_BYTES` of rows the rest wait for the next group."""
    monkeypatch.setattr(group, "MAX_SHARED_BYTES", shared_bytes)
    server = start_server(properties, write_chunk_bytes=64 << 20)  # each batch one chunk (the tests' chunks are small)
    location = f"grpc://127.0.0.1:{server.port}"
    name = f"group.batches_{uuid.uuid4().hex[:8]}"
    try:
        create(location, name)
        groups = server.parts.writer._groups
        identifier = groups.catalog.identifier(name)
        assert all(batch(w).nbytes > 1 << 20 for w in range(4))

        def put(writer: int) -> WriteResult:
            with FeatureClient(location) as client:
                return client.write(name, batch(writer))

        with ThreadPoolExecutor(4) as pool:
            with groups._locks(identifier):  # a commit in flight: the first put leads the next, the others queue
                first = pool.submit(put, 0)
                wait_until(lambda: groups.waiting(identifier) == 0, what="the first put to lead")
                rest = [pool.submit(put, w) for w in (1, 2, 3)]
                wait_until(lambda: groups.waiting(identifier) == 3, what="the batches to queue")
            results = [first.result(), *(r.result() for r in rest)]
        partitions = results[0].files
        assert partitions > 1 and all(r.files == partitions and r.rows == 60_000 for r in results)
        added = [int(s["added-data-files"]) for s in summaries(properties, name)[1:]]
        if shared_bytes > 3 * batch(1).nbytes:
            assert added == [partitions, partitions]  # the leader's, then the three batches' shared files
            assert len({r.snapshot_id for r in results[1:]}) == 1
        else:
            assert added == [partitions] * 4  # each batch its own group
        assert scanned(location, name) == Counter(range(-1, 240_000))
    finally:
        server.shutdown()
