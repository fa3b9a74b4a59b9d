"""Full ties (rows of one entity with the same event time and created time) go to the row committed last, and
within one put to its last row: in training sets, `as_of` lookups and online lookups, before and after
compactions (whole or partial) and deletes (copy-on-write or merge-on-read). Random puts full of ties, checked
against a plain reference after every step."""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from pyiceberg.catalog import load_catalog
from pyiceberg.manifest import DataFileContent
from pyiceberg.table.locations import load_location_provider
from pyiceberg.table.snapshots import Operation

from flight_client import FeatureClient
from flight_server.changes.rewrite import Plan, SnapshotRows
from flight_server.iceberg.lineage import data_file_name, written_order
from flight_server.transport.service import FeatureFlightServer
from tests.conftest import sqlite_catalog, start_server, wait_until

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
TIMES = [T0, T0 + dt.timedelta(minutes=1)]  # two event times: most rows of an id tie fully with another
IDS = list(range(8))
AFTER = T0 + dt.timedelta(hours=1)


class Reference:
    """What every read should answer: per id, the row of the latest event time, then of the last put, then the
    last of that put's rows."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple[dt.datetime, int, int, float]] = {}
        self.puts = 0

    def put(self, ids: list[int], times: list[dt.datetime], values: list[float]) -> None:
        self.puts += 1
        for row, (i, t, v) in enumerate(zip(ids, times, values, strict=True)):
            self.rows[i] = max(self.rows.get(i, (t, -1, -1, v)), (t, self.puts, row, v))

    def delete(self, i: int) -> None:
        self.rows.pop(i, None)

    def values(self) -> list[float | None]:
        return [self.rows[i][3] if i in self.rows else None for i in IDS]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FeatureFlightServer]:
    server = start_server(sqlite_catalog(Path(tmp_path_factory.mktemp("ties"))), online_refresh_seconds=0.05)
    yield server
    server.shutdown()


@pytest.fixture
def client(served: FeatureFlightServer) -> Iterator[FeatureClient]:
    with FeatureClient(f"grpc://127.0.0.1:{served.port}") as client:
        yield client


def check(client: FeatureClient, table: str, reference: Reference, step: str) -> None:
    expected = reference.values()
    entities = {"id": IDS, "event_timestamp": [AFTER] * len(IDS)}
    trained = client.get_historical_features(entities, [f"{table}:v"]).column("v").to_pylist()
    assert trained == expected, f"training set after {step}"
    as_of = client.get_online_features({"id": IDS}, [f"{table}:v"], apply_ttl=False, as_of=AFTER)
    assert as_of.column("v").to_pylist() == expected, f"as_of lookup after {step}"

    def online() -> list[float | None]:
        found = client.get_online_features({"id": IDS}, [f"{table}:v"], apply_ttl=False)
        return list(found.column("v").to_pylist())

    wait_until(lambda: online() == expected, timeout=20, what=f"online lookups after {step}: {online()} != {expected}")


@pytest.mark.parametrize("seed", range(6))
def test_full_ties_go_to_the_last_commit_through_rewrites(client: FeatureClient, seed: int) -> None:
    rng = random.Random(seed)
    table = f"ties.t{seed}"
    partition_by = ["bucket(2, id)"] if seed % 2 else []
    reference = Reference()
    value = 0.0

    def put() -> None:
        nonlocal value
        ids = [rng.choice(IDS) for _ in range(rng.randint(1, 12))]
        times = [rng.choice(TIMES) for _ in ids]
        values = [value + k for k in range(len(ids))]
        value += len(ids)
        data = pa.table(
            {
                "id": pa.array(ids, pa.int64()),
                "ts": pa.array(times, pa.timestamp("us", "UTC")),
                "v": pa.array(values, pa.float64()),
            }
        )
        client.write(table, data, entity_keys=["id"], event_time="ts", partition_by=partition_by)
        reference.put(ids, times, values)

    for _ in range(5):
        put()
    check(client, table, reference, "the puts")
    for step in range(8):
        action = rng.choice(["put", "compact", "compact some", "copy-on-write", "merge-on-read"])
        if action == "put":
            for _ in range(rng.randint(1, 3)):
                put()
        elif action == "compact":
            client.compact(table)
        elif action == "compact some":
            client.compact(table, filter=f"id < {rng.randint(1, len(IDS) - 1)}")
        else:
            gone = rng.choice(IDS)
            client.delete(table, keys={"id": [gone]}, mode=action)
            reference.delete(gone)
        check(client, table, reference, f"step {step} ({action})")


def test_a_put_that_lands_during_a_compaction_wins_its_full_ties(
    served: FeatureFlightServer, client: FeatureClient
) -> None:
    """A correction put while a compaction rewrites the rows it corrects is committed after them: it still wins."""
    table = "ties.during"
    reference = Reference()

    def put(value: float) -> None:
        data = pa.table(
            {
                "id": pa.array(IDS, pa.int64()),
                "ts": pa.array([T0] * len(IDS), pa.timestamp("us", "UTC")),
                "v": pa.array([value] * len(IDS), pa.float64()),
            }
        )
        client.write(table, data, entity_keys=["id"], event_time="ts", partition_by=[])
        reference.put(IDS, [T0] * len(IDS), [value] * len(IDS))

    put(1.0)
    put(2.0)

    def compaction_with_a_put_meanwhile(rows: SnapshotRows) -> Plan:
        scope = [f for f in rows.files if f.content == DataFileContent.DATA]
        added, scope = rows.rewrite("TRUE", [], scope)
        put(3.0)  # commits between the rewrite's plan and its commit
        return Plan(Operation.REPLACE, scope, added, sum(f.record_count for f in added), tidy=True)

    assert served.parts.maintenance.rewrite_once(table, "compact", compaction_with_a_put_meanwhile).committed
    check(client, table, reference, "a compaction with a put meanwhile")


def tied_rows(ids: list[int], values: list[float]) -> pa.Table:
    """Rows of `ids` all at `T0`: rows of one id tie fully (same key, event time, no created time)."""
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "ts": pa.array([T0] * len(ids), pa.timestamp("us", "UTC")),
            "v": pa.array(values, pa.float64()),
        }
    )


def test_a_put_of_many_files_answers_its_last_row_of_a_full_tie(tmp_path: Path) -> None:
    """A put of more files than ten (two chunks into the default layout's 16 partitions) whose second chunk puts
    keys again at the same event time: every read answers the later row ("within one put, its last row"). A put's
    files are named `00000-<n>-<write uuid>.parquet`, `n` counting up as they are written; ranked by path as text,
    file 10 came before file 2 and some keys answered their superseded row (review 21). `written_order` ranks
    them by the number."""
    server = start_server(sqlite_catalog(tmp_path), write_chunk_bytes=64 << 10)
    try:
        filler = 2000  # rows of other keys: about one 64 KiB chunk
        keys = list(range(8))  # one per bucket, in both chunks
        ids = [*range(100, 100 + filler), *keys, *range(100 + filler, 100 + 2 * filler), *keys]
        values = [0.0] * filler + [1.0] * 8 + [0.0] * filler + [2.0] * 8
        data = tied_rows(ids, values)
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            put = client.write(
                "ties.put",
                pa.RecordBatchReader.from_batches(data.schema, data.to_batches(500)),
                entity_keys="id",
                event_time="ts",
            )
            assert put.files > 10
            trained = client.get_historical_features({"id": keys, "event_timestamp": [T0] * 8}, "ties.put:v")
            online = client.get_online_features({"id": keys}, "ties.put:v")
        assert online["v"].to_pylist() == [2.0] * 8
        assert trained["v"].to_pylist() == [2.0] * 8
    finally:
        server.shutdown()


def test_a_compaction_into_many_files_keeps_the_answer_of_a_full_tie(tmp_path: Path) -> None:
    """A full tie put in two commits goes to the later put, and a compaction into more files than ten (a small
    `write.target-file-size-bytes`; in production a partition past 5 GiB at Iceberg's 512 MiB default) keeps that
    answer (docs/operations.md, "Full ties and rewrites"). The compaction writes the rows in commit order into
    files numbered as it goes, all of one commit: ranked by path as text, file 39 came before file 5, and the
    compaction silently changed past training sets (review 21)."""
    catalog = sqlite_catalog(tmp_path)
    server = start_server(catalog, write_chunk_bytes=16 << 10, batch_rows=500)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            first = tied_rows(list(range(100, 2100)), [0.0] * 2000)
            client.write("ties.compact", first, entity_keys="id", event_time="ts", partition_by=[])
            client.write("ties.compact", tied_rows([1], [1.0]))
            client.write("ties.compact", tied_rows(list(range(2100, 10100)), [0.0] * 8000))
            client.write("ties.compact", tied_rows([1], [2.0]))  # the correction
            request = ({"id": [1], "event_timestamp": [T0]}, "ties.compact:v")
            assert client.get_historical_features(*request)["v"].to_pylist() == [2.0]
            with load_catalog("default", **catalog).load_table("ties.compact").transaction() as transaction:
                transaction.set_properties({"write.target-file-size-bytes": "2500"})
            assert client.compact("ties.compact")["data_files_added"] > 10
            assert client.get_online_features({"id": [1]}, "ties.compact:v", as_of=T0)["v"].to_pylist() == [2.0]
            assert client.get_historical_features(*request)["v"].to_pylist() == [2.0]
    finally:
        server.shutdown()


def test_written_order_ranks_a_commits_files_as_they_were_written() -> None:
    """By write, then task and file number as numbers; names of other writers by name, the path last."""
    write = "3f2a9c1e-0000-4000-8000-000000000001"
    ours = [f"s3://b/t/data/id_bucket=1/{data_file_name(n, uuid.UUID(write), 'parquet')}" for n in (10, 2, 0)]
    java = [f"s3://b/t/data/00001-7-{write}-{n:05d}.parquet" for n in (3, 1)]  # Java: <partition>-<task>-<op>-<n>
    other = ["s3://b/t/data/b.parquet", "s3://b/t/data/a.parquet"]
    ranked = sorted([*ours, *java, *other], key=written_order)
    assert ranked.index(ours[2]) < ranked.index(ours[1]) < ranked.index(ours[0])
    assert ranked.index(java[1]) < ranked.index(java[0]) and ranked.index(other[1]) < ranked.index(other[0])


def test_a_put_over_the_target_size_answers_its_last_row_of_a_full_tie(tmp_path: Path) -> None:
    """A put past `write.target-file-size-bytes` in one partition, rows of each id tying fully in pairs: every read
    answers the pair's later row. The rows are cut into consecutive runs (`consecutive_runs`); pyiceberg's first-fit
    bin packing put later, smaller batches into earlier files, which then ranked first (review 22)."""
    catalog = sqlite_catalog(tmp_path)
    server = start_server(catalog)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            seed = pa.table(
                {
                    "id": pa.array([-1], pa.int64()),
                    "ts": pa.array([T0], pa.timestamp("us", "UTC")),
                    "s": ["x"],
                    "v": pa.array([0.0], pa.float64()),
                }
            )
            client.write("ties.pack", seed, entity_keys="id", event_time="ts", partition_by=[])
            with load_catalog("default", **catalog).load_table("ties.pack").transaction() as transaction:
                transaction.set_properties({"write.target-file-size-bytes": "2000"})
            pairs = 50  # ids 1..50 each twice in a row (a full tie, the second row the later one), after id 0
            ids = [0] + [1 + i // 2 for i in range(2 * pairs)]
            data = pa.table(
                {
                    "id": pa.array(ids, pa.int64()),
                    "ts": pa.array([T0] * len(ids), pa.timestamp("us", "UTC")),
                    "s": ["x" * (1 if i < 40 else 60) for i in range(len(ids))],
                    "v": pa.array([float(i) for i in range(len(ids))], pa.float64()),
                }
            )
            assert client.write("ties.pack", data).files > 1
            keys = list(range(1, pairs + 1))
            online = client.get_online_features({"id": keys}, "ties.pack:v", as_of=T0)["v"].to_pylist()
            trained = client.get_historical_features({"id": keys, "event_timestamp": [T0] * pairs}, "ties.pack:v")
        expected = [float(2 * i) for i in keys]  # the row of id i put last is row 2i
        assert online == expected
        assert trained["v"].to_pylist() == expected
    finally:
        server.shutdown()


def test_written_order_of_files_named_by_the_object_store_layout_without_partitioned_paths() -> None:
    """The object-store layout without partition folders puts hash bits before a file's name: `written_order` still
    ranks a write's files by their numbers (review 22: the bits were read as the task, file 10 before file 2)."""
    properties = {"write.object-storage.enabled": "true", "write.object-storage.partitioned-paths": "false"}
    locations = load_location_provider("s3://bucket/features/t", properties)
    write = "3f2a9c1e-0000-4000-8000-000000000001"
    paths = [locations.new_data_location(f"00000-{n}-{write}.parquet") for n in range(12)]
    assert sorted(paths, key=written_order) == paths, [p.rsplit("/", 1)[-1] for p in sorted(paths, key=written_order)]


def test_written_order_ranks_other_writers_names_by_name() -> None:
    """Other writers' names that begin with numbers (daily exports added in one backfill) rank by name, not as a
    task and file number (review 22)."""
    days = ["s3://b/t/data/2024-01-31.parquet", "s3://b/t/data/2024-02-01.parquet"]
    assert sorted(days, key=written_order) == days
