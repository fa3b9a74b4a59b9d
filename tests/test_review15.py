"""Review 15: maintenance beside reads. Rows that tie on keys, event time and created time go to the row committed
last (training/plan.py); a table corrected by putting a row again at the same event time relies on it. These tests
check that rewrites (compaction, copy-on-write deletes) and the online index keep that answer."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pyiceberg.catalog import load_catalog
from pyiceberg.types import DoubleType

from flight_client import FeatureClient, NotFoundError
from tests.conftest import sqlite_catalog, start_server, wait_until

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
KEYS = {"entity_keys": ["id"], "event_time": "ts", "partition_by": []}


def rows(ids: list[int], values: list[float]) -> pa.Table:
    """Rows of `ids`, all at the same event time `T0` (so rows of one id tie fully), with `values`."""
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "ts": pa.array([T0] * len(ids), pa.timestamp("us", "UTC")),
            "v": pa.array(values, pa.float64()),
        }
    )


def training_set(client: FeatureClient, table: str, ids: list[int]) -> list[float]:
    entities = {"id": ids, "event_timestamp": [T0 + dt.timedelta(hours=1)] * len(ids)}
    return client.get_historical_features(entities, [f"{table}:v"]).column("v").to_pylist()


def online(client: FeatureClient, table: str, ids: list[int], as_of: dt.datetime | None = None) -> list[float]:
    found = client.get_online_features({"id": ids}, [f"{table}:v"], apply_ttl=False, as_of=as_of)
    return found.column("v").to_pylist()


def not_yet(lookup: Callable[..., list[float]], *args: Any) -> list[float] | None:
    """`lookup(*args)`, None while the online index has no such column (NOT_FOUND): a refresh between two schema
    changes built it in the schema between them."""
    try:
        return lookup(*args)
    except NotFoundError:
        return None


@pytest.fixture
def catalog(tmp_path: Path) -> dict[str, str]:
    return sqlite_catalog(tmp_path)


@pytest.fixture
def client(catalog: dict[str, str]) -> Iterator[FeatureClient]:
    server = start_server(catalog, online_refresh_seconds=0.05)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            yield client
    finally:
        server.shutdown()


def test_a_compaction_keeps_the_last_put_of_a_full_tie(client: FeatureClient) -> None:
    """Five puts of the same ids at the same event time (each a correction of the one before): a training set
    answers the last put's values before a compaction and after it."""
    table = "r15.compacted"
    ids = [1, 2, 3]
    for value in range(1, 6):
        client.write(table, rows(ids, [float(value)] * len(ids)), **KEYS)
    assert training_set(client, table, ids) == [5.0] * len(ids)
    assert client.compact(table)["compacted"]
    assert training_set(client, table, ids) == [5.0] * len(ids)


def test_deleting_one_key_leaves_the_full_ties_of_another(client: FeatureClient) -> None:
    """A put of ids 1 and 9, then a correction of id 1 at the same event time: deleting id 9 (its file rewritten
    without it) changes nothing for id 1, in training sets or online lookups."""
    table = "r15.deleted"
    client.write(table, rows([1, 9], [1.0, 1.0]), **KEYS)
    client.write(table, rows([1], [2.0]), **KEYS)
    assert training_set(client, table, [1]) == [2.0]
    assert client.delete(table, keys={"id": [9]}, mode="copy-on-write")["rows_deleted"] == 1
    assert training_set(client, table, [1]) == [2.0]


def test_online_lookups_settle_full_ties_as_training_sets(client: FeatureClient) -> None:
    """One put holding several rows per id at the same event time: online lookups (an index built from the whole
    table) answer the row a training set and an `as_of` lookup answer, the last of each id's rows."""
    table = "r15.ties"
    n = 2000
    client.write(table, rows([i % 100 for i in range(n)], [float(i) for i in range(n)]), **KEYS)
    ids = list(range(100))
    expected = [float(n - 100 + i) for i in ids]
    assert training_set(client, table, ids) == expected
    assert online(client, table, ids, as_of=T0 + dt.timedelta(hours=1)) == expected
    assert online(client, table, ids) == expected


def test_time_travel_into_an_expired_gap_is_refused_not_answered_from_an_older_snapshot(
    client: FeatureClient,
) -> None:
    """A pinned snapshot, then two more; expiry keeps the pinned one and the newest and expires the one in between.
    A scan as of a time when the expired snapshot was current cannot be answered: it is refused, not answered from
    the pinned snapshot (which lacks the rows put in between, and was not current then)."""
    table = "r15.travel"
    client.write(table, rows([1], [1.0]), **KEYS)
    pinned = client.pin(table)["snapshot_id"]
    client.write(table, rows([2], [2.0]), **KEYS)
    between = client.describe(table)["snapshots"][-1]
    client.write(table, rows([3], [3.0]), **KEYS)
    when = between["timestamp_ms"]  # then `between` was current: ids 1 and 2
    assert sorted(client.scan(table, as_of=when).read_all().column("id").to_pylist()) == [1, 2]
    expired = client.expire_snapshots(table, older_than=dt.datetime.now(dt.timezone.utc), retain_last=1)
    assert expired["expired"] == [between["snapshot_id"]] and expired["kept_pinned"] == [pinned]
    with pytest.raises(NotFoundError):
        client.scan(table, as_of=when).read_all()


def test_a_column_dropped_and_added_again_reads_as_new(client: FeatureClient, catalog: dict[str, str]) -> None:
    """A feature column dropped and added again under the same name (say, to change its type) is a new column
    (another field id): the rows written before have no value in it, as pyiceberg reads them, in scans, training
    sets and online lookups alike (the latter from the index's next refresh)."""
    table = "r15.readded"
    client.write(table, rows([1, 2], [1.0, 2.0]), **KEYS)
    assert online(client, table, [1, 2]) == [1.0, 2.0]
    for change in ("drop", "add"):
        with load_catalog("default", **catalog).load_table(table).update_schema() as update:
            update.delete_column("v") if change == "drop" else update.add_column("v", DoubleType())
    assert load_catalog("default", **catalog).load_table(table).scan().to_arrow().column("v").to_pylist() == [None] * 2
    assert client.scan(table).read_all().column("v").to_pylist() == [None, None]
    assert training_set(client, table, [1, 2]) == [None, None]
    # Lookups never ask the catalog: the index follows the new schema at its next refresh (rebuilt in it); one
    # between the drop and the add has no `v` (NOT_FOUND) until the next.
    wait_until(
        lambda: not_yet(online, client, table, [1, 2]) == [None, None], what="the online index in the new schema"
    )


def test_following_a_table_leaves_its_old_snapshots_to_expire(client: FeatureClient, catalog: dict[str, str]) -> None:
    """A table written a row at a time whose training-set index the server keeps current (brought forward after
    every put): automatic maintenance still expires the snapshots no read uses, so the metadata every put rewrites
    stays bounded. At most the snapshot a request last asked for is kept for the cache besides the newest."""
    table = "r15.followed"
    client.write(table, rows([0], [0.0]), **KEYS)
    training_set(client, table, [0])  # at the current snapshot: the server follows the table from now on
    puts = 20
    for n in range(1, puts + 1):
        client.write(table, rows([n], [float(n)]), **KEYS)
        wait_until(
            lambda n=n: client.health()["training_set_cache"]["refreshed_ahead"] >= n,  # type: ignore[misc]
            what="the index brought forward",
        )
    with load_catalog("default", **catalog).load_table(table).transaction() as transaction:
        transaction.set_properties(
            {"history.expire.max-snapshot-age-ms": "1", "history.expire.min-snapshots-to-keep": "1"}
        )
    done = client.run_maintenance(table)
    assert done["kept_in_use"] <= 1, done
    assert len(client.describe(table)["snapshots"]) <= 2


def test_orphan_removal_leaves_the_files_of_a_table_renamed_away(
    client: FeatureClient, catalog: dict[str, str]
) -> None:
    """A table renamed (kept as a backup, say) and a new one put under its old name: the new table's orphan removal
    (automatic maintenance runs it daily on the tables the server writes, for files past 3 days: here for every
    file) deletes nothing the renamed table reads."""
    client.write("r15.features", rows([1], [1.0]), **KEYS)
    load_catalog("default", **catalog).rename_table("r15.features", "r15.backup")
    client.write("r15.features", rows([2], [2.0]), **KEYS)
    removed = client.remove_orphan_files("r15.features", older_than=dt.datetime.now(dt.timezone.utc))
    assert removed["files_deleted"] == 0, removed["files"]
    assert client.scan("r15.backup").read_all().column("v").to_pylist() == [1.0]
