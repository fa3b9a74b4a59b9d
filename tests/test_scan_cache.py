"""The scan cache: whole-table reads of data files already decoded stream from memory, and every answer is
the one an uncached server gives on the same catalog: after appends, deletes (both modes), compaction,
at pinned snapshots, over parallel endpoints; within its byte budget."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from flight_client import FeatureClient
from flight_server.reads.caches import FILE_ENTRY_BYTES, FileCache

from .conftest import sqlite_catalog, start_server

TABLE = "cached.features"
START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def rows(first: int, count: int) -> pa.Table:
    ids = list(range(first, first + count))
    return pa.table(
        {
            "id": pa.array([i % 97 for i in ids], pa.int64()),
            "ts": pa.array([START + dt.timedelta(minutes=i) for i in ids], pa.timestamp("us", "UTC")),
            "n": pa.array(ids, pa.int64()),
            "x": pa.array([i * 0.5 for i in ids]),
        }
    )


def ordered(table: pa.Table) -> pa.Table:
    return table.replace_schema_metadata(None).sort_by("n")


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[FeatureClient, FeatureClient]]:
    """A caching server and an uncaching one on the same catalog."""
    properties = sqlite_catalog(tmp_path)
    cached, plain = start_server(properties), start_server(properties, scan_cache_bytes=0)
    with (
        FeatureClient(f"grpc://127.0.0.1:{cached.port}") as a,
        FeatureClient(f"grpc://127.0.0.1:{plain.port}") as b,
    ):
        yield a, b
    cached.shutdown()
    plain.shutdown()


def same(cached: FeatureClient, plain: FeatureClient, **options: object) -> pa.Table:
    """The caching server's answer, read whole and over parallel endpoints, equal to the plain server's."""
    expected = ordered(plain.read_table(TABLE, **options))  # type: ignore[arg-type]
    assert ordered(cached.read_table(TABLE, **options)).equals(expected)  # type: ignore[arg-type]
    assert ordered(cached.read_table(TABLE, partitions=3, **options)).equals(expected)  # type: ignore[arg-type]
    assert ordered(cached.scan(TABLE, **options).read_all()).equals(expected)  # type: ignore[arg-type]
    return expected


def test_repeated_reads_come_from_memory_and_appends_decode_only_new_files(
    pair: tuple[FeatureClient, FeatureClient],
) -> None:
    cached, plain = pair
    for first in range(0, 300, 100):
        cached.write(TABLE, rows(first, 100), entity_keys=["id"], event_time="ts")
    same(cached, plain)
    stats = cached.health()["scan_cache"]
    assert stats["files"] >= 3 and 0 < stats["bytes"] <= stats["max_bytes"]
    assert stats["collecting"] == 0  # every scan gave its reservation back
    before = stats["hits"], stats["misses"]
    assert ordered(cached.read_table(TABLE)).equals(ordered(plain.read_table(TABLE)))
    stats = cached.health()["scan_cache"]
    assert stats["misses"] == before[1] and stats["hits"] > before[0]  # every file from memory

    cached.write(TABLE, rows(300, 50), entity_keys=["id"], event_time="ts")
    files = stats["files"]
    assert same(cached, plain).num_rows == 350
    after = cached.health()["scan_cache"]
    assert after["files"] > files
    assert after["misses"] - stats["misses"] <= after["files"] - files + 1  # only the new files were decoded


def test_every_answer_equals_an_uncached_server(pair: tuple[FeatureClient, FeatureClient]) -> None:
    """A seeded random history of appends, deletes of both modes, compactions and pins: every snapshot
    read, current and pinned, equals the uncached server's."""
    cached, plain = pair
    chance = random.Random(7)
    cached.write(TABLE, rows(0, 200), entity_keys=["id"], event_time="ts")
    written, pinned = 200, []
    steps = ["append", "copy-on-write", "merge-on-read", "merge-on-read", "compact", "pin"] * 2
    chance.shuffle(steps)
    for step, action in enumerate(steps):
        if action == "append":
            count = chance.randint(1, 80)
            cached.write(TABLE, rows(written, count), entity_keys=["id"], event_time="ts")
            written += count
        elif action in ("copy-on-write", "merge-on-read"):
            low = chance.randrange(written)
            condition = chance.choice([f"id = {chance.randrange(97)}", f"n >= {low} and n < {low + 25}"])
            cached.delete(TABLE, filter=condition, mode=action)
        elif action == "compact":
            cached.compact(TABLE)
        else:
            pinned.append(cached.pin(TABLE, name=f"p{step}")["snapshot_id"])
        same(cached, plain)
        same(cached, plain, columns=["n", "x"])
        for snapshot_id in pinned:
            same(cached, plain, snapshot_id=snapshot_id)


def test_the_cache_keeps_within_its_budget_and_keeps_only_files_read_to_the_end() -> None:
    batch = pa.record_batch({"v": pa.array(range(1000), pa.int64())})  # 8,000 bytes
    entry = 8_000 + FILE_ENTRY_BYTES  # an entry counts its objects beyond the buffers too
    cache = FileCache(2 * entry + 1_000)
    for i in range(5):
        cache.put((f"f{i}", ("v",), ()), [batch])
        assert cache.stats()["bytes"] <= 2 * entry + 1_000
    assert cache.get(("f0", ("v",), ())) is None and cache.get(("f4", ("v",), ())) == [batch]
    cache.put(("huge", ("v",), ()), [batch] * 5)  # larger than the whole budget: not kept
    assert cache.get(("huge", ("v",), ())) is None
    assert cache.stats() == {
        "files": 2,
        "bytes": 2 * entry,
        "max_bytes": 2 * entry + 1_000,
        "collecting": 0,
        "hits": 1,
        "misses": 2,
    }
    # What scans collect to put here later is bounded across all of them, however many run at once.
    assert cache.reserve(12_000) and not cache.reserve(30_000) and cache.reserve(21_000)
    cache.release(33_000)
    assert cache.stats()["collecting"] == 0 and cache.reserve(2 * entry + 1_000)


def test_a_read_from_memory_says_what_it_read_as_a_decoding_read_does(
    pair: tuple[FeatureClient, FeatureClient],
) -> None:
    """A read the cache answers whole (streamed as a table, from C++) has the decoding read's schema, metadata
    (table, snapshot, read path) and rows, for all columns and for some."""
    cached, plain = pair
    for first in range(0, 200, 100):
        cached.write(TABLE, rows(first, 100), entity_keys=["id"], event_time="ts")
    for columns in (None, ["x", "n"]):
        expected = plain.scan(TABLE, columns=columns).read_all()
        cached.scan(TABLE, columns=columns).read_all()  # decodes, and keeps the files
        hits = cached.health()["scan_cache"]["hits"]
        got = cached.scan(TABLE, columns=columns).read_all()
        assert cached.health()["scan_cache"]["hits"] > hits  # this one came from memory
        assert got.schema.equals(expected.schema, check_metadata=True)
        assert got.schema.metadata[b"flight.read_path"] == b"direct"
        assert ordered(got).equals(ordered(expected))
