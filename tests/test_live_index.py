"""Training sets on live tables: the sorted index of a snapshot extended by the rows appended since an older one
answers exactly as one sorted from scratch, in memory (every encoding `test_asof` reaches) and through a real
catalog with appends, deletes, compactions and pins; and a server brings its indexes forward ahead of demand."""

from __future__ import annotations

import datetime as dt
import gc
import threading
import tracemalloc
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pyiceberg.catalog import load_catalog

from flight_client import FeatureClient
from flight_server.base.config import ServerConfig
from flight_server.base.schemas import micros
from flight_server.iceberg.catalog import FeatureCatalog, FeatureSpec
from flight_server.reads.caches import ReadCaches
from flight_server.reads.duck import Engine
from flight_server.reads.inuse import SnapshotsInUse
from flight_server.training import asof
from flight_server.training.asof import AsofCache, AsofIndex
from tests.conftest import sqlite_catalog, start_server, wait_until
from tests.test_asof import YEAR, entity_rows, feature_rows, reference, table, texts


def answers(index: AsofIndex, source: pa.Table, entities: list[tuple[Any, ...]], spec: FeatureSpec) -> list[Any]:
    """Every column of the row each entity gets, with and without the TTL."""
    probe = pa.table(
        {
            "k": pa.array([e[0] for e in entities], pa.int64()),
            "t": pa.array([e[1] for e in entities], pa.large_string()),
            "ts": pa.array([e[2] for e in entities], pa.int64()).cast(pa.timestamp("s")),
        }
    )
    entity_us, valid = micros(probe.column("ts"))
    out = []
    for apply_ttl in (True, False):
        at, known = index.match([probe.column(k) for k in spec.entity_keys], entity_us, valid, ttl=apply_ttl)
        out.append({c: index.take(c, at, known).to_pylist() for c in source.column_names})
    return out


@settings(max_examples=300, deadline=None)
@given(
    rows=feature_rows,
    entities=entity_rows,
    composite=st.booleans(),
    ttl=st.none() | st.integers(1, 10),
    cuts=st.lists(st.integers(0, 40), max_size=4),
    crowded=st.booleans(),
)
@example(
    rows=[(1, "a", 5, 0), (1, "a", 5, 1)], entities=[(1, "a", 5)], composite=False, ttl=None, cuts=[1], crowded=False
)
@example(
    rows=[(1, "a", 5, 1), (1, "a", 5, 0)], entities=[(1, "a", 5)], composite=False, ttl=None, cuts=[1], crowded=False
)
@example(
    rows=[(k, "a", 1, 0) for k in range(1, 6)],
    entities=[(k, "a", 5) for k in range(1, 6)],
    composite=False,
    ttl=None,
    cuts=[1, 2, 3],
    crowded=False,
)
@example(
    rows=[(1, "a", 5, 0), (1, "a", 1, 0), (1, "a", 5, 1)],
    entities=[(1, "a", 5), (1, "a", 2)],
    composite=False,
    ttl=None,
    cuts=[1],
    crowded=False,
)
@example(
    rows=[(2, "b", 1, 0), (1, "a", 2, 0)],
    entities=[(1, "a", 3), (2, "b", 3)],
    composite=False,
    ttl=None,
    cuts=[1],
    crowded=False,
)
@example(
    rows=[(2, "b", 1, 0), (2, "a", 2, 0), (1, "b", 2, 0)],
    entities=[(1, "b", 3), (2, "b", 3), (2, "a", 3)],
    composite=True,
    ttl=None,
    cuts=[2],
    crowded=False,
)
def test_extended_index_matches_reference(
    rows: list[tuple[Any, ...]],
    entities: list[tuple[Any, ...]],
    composite: bool,
    ttl: int | None,
    cuts: list[int],
    crowded: bool,
) -> None:
    """Rows appended in several steps (`cuts`), each extending the last index: the answers are the reference's,
    the stamps stay strictly sorted, and older generations keep answering as they did. The examples: a tie on
    (key, time) across two steps goes to the latest created, whichever step brought it, also behind a row
    inserted before it; a new key (or key pair) sorting before the old ones renumbers them; a branch off a
    generation that grew in place."""
    if crowded:
        rows = rows + [(1000 + i, "a", (7_000 if i % 2 else -30) * YEAR, None) for i in range(25)]
    seen = [(r[0], r[1] if composite else None, r[2], r[3]) for r in rows]
    rows = [r for i, r in enumerate(rows) if seen.index(seen[i]) == i]
    spec = FeatureSpec(("k", "t") if composite else ("k",), "ts", "created", ttl)
    source = table(rows)
    bounds = [0, *sorted({min(c, len(rows)) for c in cuts} - {0}), len(rows)]
    index = AsofIndex.build("t", 0, spec, source.slice(0, bounds[1]))
    generations = [(index, answers(index, source, entities, spec))]
    for step, (low, high) in enumerate(zip(bounds[1:], bounds[2:], strict=False), 1):
        index = index.extend(step, source.slice(low, high - low))
        generations.append((index, answers(index, source, entities, spec)))
    # Columns grow in place where they can: every generation still answers as it did, and a second extension of
    # an earlier one (a branch) copies instead of writing over its successor's rows.
    for generation, before in generations:
        assert answers(generation, source, entities, spec) == before
    if len(generations) > 3:  # the first generation was built, so the second is the first with room to grow
        other = source.slice(bounds[-2], bounds[-1] - bounds[-2])  # not the rows the third generation added
        branch = generations[1][0].extend(99, other)
        built = AsofIndex.build("t", 99, spec, pa.concat_tables([source.slice(0, bounds[2]), other]))
        assert answers(branch, source, entities, spec) == answers(built, source, entities, spec)
        assert all(answers(g, source, entities, spec) == before for g, before in generations)
    assert len(index.runs) <= len(generations)  # one run per step that added a usable row
    for run in index.runs:
        stamps = run.stamps[: len(run)]
        assert bool((stamps[1:] >= stamps[:-1]).all())
    got = answers(index, source, entities, spec)
    folded = index.folded()
    assert answers(folded, source, entities, spec) == got and len(folded.runs) == min(
        len(index.runs), 1 + index.fold_start()
    )
    for (apply_ttl, limit), found in zip(((True, ttl), (False, None)), got, strict=True):
        chosen = [reference(rows, e, composite, limit) for e in entities]
        for column in source.column_names:
            want = [None if i is None else source.column(column)[i].as_py() for i in chosen]
            assert found[column] == want, (column, apply_ttl)


@settings(max_examples=300, deadline=None)
@given(
    stamps=st.lists(st.integers(0, 6), max_size=40).map(sorted),
    created=st.lists(st.integers(0, 3), min_size=40, max_size=40),
    chosen=st.none() | st.sets(st.integers(0, 39)),
    seed=st.integers(0, 2**32 - 1),
)
@example(stamps=[1, 1, 1], created=[0, 2, 1] + [0] * 37, chosen={1, 2}, seed=0)  # two of a tie's stamps given
def test_ties_settled_around_given_stamps_as_a_plain_sort(
    stamps: list[int], created: list[int], chosen: set[int] | None, seed: int
) -> None:
    """`_settle_ties` orders each run of equal stamps by (created, row), only the runs holding a position of `around`
    when given (a fold's new stamps), and moves each row's event time with it: as sorting each such run in Python."""
    rows = np.random.default_rng(seed).permutation(len(stamps)).astype(np.int64)
    around = None if chosen is None else np.array(sorted(p for p in chosen if p < len(stamps)), dtype=np.int64)
    want = rows.tolist()
    start = 0
    for end in range(1, len(stamps) + 1):
        if end == len(stamps) or stamps[end] != stamps[start]:
            if around is None or any(start <= p < end for p in around.tolist()):
                want[start:end] = sorted(want[start:end], key=lambda r: (created[r], r))
            start = end
    got, event_us = rows.copy(), rows * 10
    later = np.array(created, dtype=np.int64)
    asof._settle_ties(np.array(stamps, dtype=np.int64), got, event_us, lambda at: later[at], around)
    assert got.tolist() == want and (event_us == got * 10).all()


def test_small_appends_fold_among_themselves_and_large_ones_into_the_first() -> None:
    """Runs after the first that hold no more than 1/16 of its stamps together are folded among themselves, the
    first run untouched (the fold costs their rows, not a pass over the large run); past that, into the first.
    Either answers as the index read whole."""
    rows = [(k % 7, "a", (k * 3) % 50, k) for k in range(400)]
    entities = [(k, "a", t) for k in range(8) for t in (0, 10, 25, 49, 60)]
    spec = FeatureSpec(("k",), "ts", "created", None)
    source = table(rows)
    index = AsofIndex.build("t", 0, spec, source.slice(0, 320))
    for step in range(5):  # 20 stamps after the first run's 320: under 1/16
        index = index.extend(step + 1, source.slice(320 + 4 * step, 4))
    assert len(index.runs) == 6 and index.fold_start() == 1
    folded = index.folded()
    assert len(folded.runs) == 2 and folded.runs[0] is index.runs[0]
    whole = answers(AsofIndex.build("t", 5, spec, source.slice(0, 340)), source, entities, spec)
    assert answers(folded, source, entities, spec) == answers(index, source, entities, spec) == whole
    larger = folded.extend(6, source.slice(340, 60))  # 80 stamps after the first run's 320: past 1/16
    assert larger.fold_start() == 0 and len(larger.folded().runs) == 1
    whole = answers(AsofIndex.build("t", 6, spec, source), source, entities, spec)
    assert answers(larger.folded(), source, entities, spec) == whole


# Few keys and times, so that rows tie on (keys, time) and on created time too, within and across runs.
tied_rows = st.lists(
    st.tuples(st.sampled_from([1, 2]), texts, st.none() | st.integers(0, 3), st.none() | st.integers(0, 2)),
    max_size=30,
)
step = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 12)),
    st.tuples(st.just("delete"), st.lists(st.integers(0, 200), min_size=1, max_size=4)),
    st.tuples(st.just("fold")),
)


@settings(max_examples=300, deadline=None)
@given(
    rows=feature_rows | tied_rows,
    entities=entity_rows,
    composite=st.booleans(),
    ttl=st.none() | st.integers(1, 10),
    first=st.integers(0, 3),
    steps=st.lists(step, max_size=8),
    large=st.booleans(),
)
@example(  # rows tied on (key, time, created) in three runs: the newest wins, and once deleted the one before
    rows=[(1, "a", 5, 0), (1, "a", 5, 1), (1, "a", 5, 1)],
    entities=[(1, "a", 5)],
    composite=True,
    ttl=None,
    first=1,
    steps=[("append", 1), ("append", 1), ("delete", [2]), ("fold",), ("delete", [1])],
    large=False,
)
@example(  # a fold keeps each stamp's event time, which the TTL reads
    rows=[(1, "a", 0, 0), (2, "a", 10, 0), (1, "a", 11, 0)],
    entities=[(2, "a", 12), (1, "a", 12)],
    composite=False,
    ttl=5,
    first=2,
    steps=[("append", 1), ("fold",)],
    large=False,
)
@example(  # a fold merges an older run's row created later than the newer run's, tied on (key, time)
    rows=[(1, "a", 5, 2), (1, "a", 5, 1)],
    entities=[(1, "a", 5)],
    composite=True,
    ttl=None,
    first=1,
    steps=[("append", 1), ("fold",)],
    large=False,
)
def test_runs_with_deletes_match_reference(
    rows: list[tuple[Any, ...]],
    entities: list[tuple[Any, ...]],
    composite: bool,
    ttl: int | None,
    first: int,
    steps: list[tuple[Any, ...]],
    large: bool,
) -> None:
    """An index brought forward by random appends (a run each), deletes (masked rows) and folds answers after
    every step as the plain loop over the rows still there, and every earlier generation as it did. Ties on
    (keys, time) abound (`tied_rows`), also on created time, where the later row wins. With
    `large`, every run is searched as a large one is (in stamp order, for all entity rows)."""
    small_run = asof._SMALL_RUN
    asof._SMALL_RUN = 0 if large else small_run
    try:
        check_runs(rows, entities, composite, ttl, first, steps)
    finally:
        asof._SMALL_RUN = small_run


def check_runs(
    rows: list[tuple[Any, ...]],
    entities: list[tuple[Any, ...]],
    composite: bool,
    ttl: int | None,
    first: int,
    steps: list[tuple[Any, ...]],
) -> None:
    spec = FeatureSpec(("k", "t") if composite else ("k",), "ts", "created", ttl)
    source = table(rows)
    first = min(len(rows), first)
    index = AsofIndex.build("t", 0, spec, source.slice(0, first))
    present, gone = first, set[int]()
    generations = []
    for number, op in enumerate(steps, 1):
        if op[0] == "append":
            more = min(op[1], len(rows) - present)
            index = index.extend(number, source.slice(present, more))
            present += more
        elif op[0] == "delete" and present:
            doomed = sorted({i % present for i in op[1]} - gone)
            index = index.masked(number, np.array(doomed, dtype=np.int64), None)
            gone.update(doomed)
        elif op[0] == "fold":
            index = index.folded()
        assert index.row_count == present and index.dead == len(gone)
        generations.append((index, answers(index, source, entities, spec)))
        kept = [r if i < present and i not in gone else (None, None, None, None) for i, r in enumerate(rows)]
        for (apply_ttl, limit), found in zip(((True, ttl), (False, None)), generations[-1][1], strict=True):
            chosen = [reference(kept, e, composite, limit) for e in entities]
            want = [None if i is None else source.column("row")[i].as_py() for i in chosen]
            assert found["row"] == want, (number, op, apply_ttl)
    for generation, before in generations:
        assert answers(generation, source, entities, spec) == before


EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SPEC = FeatureSpec(("k",), "ts", "created")
# Every (key, second) with an unknown created time or one of 0-3: unique, so that the winner of a tie is defined.
row = st.tuples(st.integers(0, 5), st.integers(0, 20), st.none() | st.integers(0, 3))
operation = st.one_of(
    st.tuples(st.just("append"), st.lists(row, min_size=1, max_size=12)),
    st.tuples(
        st.just("delete"),
        st.lists(st.integers(0, 5), min_size=1, max_size=2),
        st.sampled_from(["merge-on-read", "copy-on-write"]),
    ),
    st.tuples(st.just("compact")),
    st.tuples(st.just("pin")),
)


@pytest.fixture(scope="module")
def catalog_properties(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return sqlite_catalog(tmp_path_factory.mktemp("live-index"))


@pytest.fixture(scope="module")
def location(catalog_properties: dict[str, str]) -> Iterator[str]:
    server = start_server(catalog_properties)
    yield f"grpc://127.0.0.1:{server.port}"
    server.shutdown()


def feature_rows_table(rows: list[tuple[int, int, int | None]], first: int) -> pa.Table:
    """Rows (key, second, created second) with `v`, a value naming the row."""
    return pa.table(
        {
            "k": pa.array([r[0] for r in rows], pa.int64()),
            "ts": pa.array([EPOCH + dt.timedelta(seconds=r[1]) for r in rows], pa.timestamp("us", "UTC")),
            "created": pa.array(
                [None if r[2] is None else EPOCH + dt.timedelta(seconds=r[2]) for r in rows], pa.timestamp("us", "UTC")
            ),
            "v": pa.array(range(first, first + len(rows)), pa.int64()),
        }
    )


PROBE_KEYS = [k for k in range(7) for _ in range(6)]
PROBE_SECONDS = [s for _ in range(7) for s in (-1, 0, 4, 10, 17, 25)]


def probe_answers(index: AsofIndex) -> list[Any]:
    """`v` of the row each probe (every key 0-6 at a few seconds) gets."""
    keys = pa.chunked_array([pa.array(PROBE_KEYS, pa.int64())])
    times = pa.array([EPOCH + dt.timedelta(seconds=s) for s in PROBE_SECONDS], pa.timestamp("us", "UTC"))
    entity_us, valid = micros(times)
    at, known = index.match([keys], entity_us, valid, ttl=False)
    return index.take("v", at, known).to_pylist()


def reference_answers(snapshot: pa.Table) -> list[Any]:
    """The same, by a plain loop over the snapshot's rows: latest time at or before, ties to the latest created."""
    rows = snapshot.to_pylist()
    out = []
    for key, second in zip(PROBE_KEYS, PROBE_SECONDS, strict=True):
        at = EPOCH + dt.timedelta(seconds=second)
        best = None
        for r in rows:
            if r["k"] == key and r["ts"] <= at:
                rank = (r["ts"], r["created"] or dt.datetime.min.replace(tzinfo=dt.UTC))
                if best is None or rank > best[0]:
                    best = (rank, r["v"])
        out.append(None if best is None else best[1])
    return out


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=st.lists(operation, min_size=1, max_size=5))
def test_maintained_index_matches_rebuilt_and_reference(
    operations: list[tuple[Any, ...]], location: str, catalog_properties: dict[str, str]
) -> None:
    """After each change through a real server, the cache that saw every earlier snapshot answers for the new one
    (extended after appends and merge-on-read deletes, where few rows go, rebuilt after other deletes and
    compactions); at the end every snapshot it answered for (the pinned ones among them) answers as an index
    sorted from scratch and as the plain loop."""
    name = f"tests.live_{uuid.uuid4().hex[:12]}"
    catalog = FeatureCatalog(ServerConfig.catalog_name, catalog_properties)
    maintained = AsofCache(Engine(), ReadCaches(), 1 << 30)
    seen: set[tuple[int, int, int | None]] = set()
    snapshots: list[int] = []
    written = 0
    with FeatureClient(location) as client:
        client.write(
            name, feature_rows_table([(0, 0, 0)], 0), entity_keys=["k"], event_time="ts", created_time="created"
        )
        seen.add((0, 0, 0))
        written = 1
        for op in operations:
            if op[0] == "append":
                fresh = [r for r in dict.fromkeys(op[1]) if r not in seen]
                if not fresh:
                    continue
                seen.update(fresh)
                client.write(name, feature_rows_table(fresh, written))
                written += len(fresh)
            elif op[0] == "delete":
                client.delete(name, keys={"k": op[1]}, mode=op[2])
            elif op[0] == "compact":
                client.compact(name)
            else:
                client.pin(name, name=f"pin{len(snapshots)}")
            table = catalog.read(name)
            current = table.current_snapshot()
            assert current is not None
            if op[0] == "pin" or not snapshots or snapshots[-1] != current.snapshot_id:
                snapshots.append(current.snapshot_id)
            assert maintained.get(table, current.snapshot_id, SPEC) is not None
        appends = sum(1 for op in operations if op[0] == "append")
        masked = sum(1 for op in operations if op[0] == "delete" and op[2] == "merge-on-read")
        assert maintained.builds + maintained.incremental_builds == len(set(snapshots))
        assert maintained.incremental_builds <= appends + masked and maintained.deletes_masked <= masked
        table = catalog.read(name)
        for snapshot_id in snapshots:
            kept = maintained.peek(table, snapshot_id, SPEC)
            assert kept is not None and kept.snapshot_id == snapshot_id
            fresh_index = AsofCache(Engine(), ReadCaches(), 1 << 30).get(table, snapshot_id, SPEC)
            assert fresh_index is not None
            expected = reference_answers(client.scan(name, snapshot_id=snapshot_id).read_all())
            assert probe_answers(kept) == probe_answers(fresh_index) == expected, snapshot_id


def entities(keys: list[int], second: int) -> pa.Table:
    return pa.table(
        {
            "k": pa.array(keys, pa.int64()),
            "event_timestamp": pa.array([EPOCH + dt.timedelta(seconds=second)] * len(keys), pa.timestamp("us", "UTC")),
        }
    )


def cache_stats(client: FeatureClient) -> dict[str, int]:
    stats: dict[str, int] = client.health()["training_set_cache"]
    return stats


def test_indexes_move_forward_ahead_of_demand(catalog_properties: dict[str, str]) -> None:
    """A server that answered a training set from a table's current snapshot extends its index as soon as a put
    through it lands (no poll for an hour), and a replica on the same catalog does so at its next poll: the next
    training set finds the index ready, and a delete has it rebuilt ahead instead."""
    writer = start_server(catalog_properties, online_refresh_seconds=3600)
    replica = start_server(catalog_properties, online_refresh_seconds=0.2)
    name = "tests.live_ahead"
    try:
        with (
            FeatureClient(f"grpc://127.0.0.1:{writer.port}") as client,
            FeatureClient(f"grpc://127.0.0.1:{replica.port}") as other,
        ):
            client.write(
                name,
                feature_rows_table([(k, 0, 0) for k in range(6)], 0),
                entity_keys=["k"],
                event_time="ts",
                created_time="created",
            )
            for c in (client, other):
                assert c.get_historical_features(entities([1, 2], 5), [f"{name}:v"]).column("v").to_pylist() == [1, 2]
                assert cache_stats(c)["builds"] == 1
            client.write(name, feature_rows_table([(2, 3, 0)], 100))
            for c in (client, other):
                wait_until(lambda: cache_stats(c)["refreshed_ahead"] == 1, what="the index brought forward")  # noqa: B023
                assert cache_stats(c)["incremental_builds"] == 1
                assert c.get_historical_features(entities([1, 2], 5), [f"{name}:v"]).column("v").to_pylist() == [1, 100]
                assert cache_stats(c)["builds"] == 1 and cache_stats(c)["incremental_builds"] == 1
            client.delete(name, keys={"k": [2]}, mode="merge-on-read")
            wait_until(lambda: cache_stats(client)["refreshed_ahead"] == 2, what="the index rebuilt ahead")
            assert cache_stats(client)["builds"] == 2
            assert client.get_historical_features(entities([1, 2], 5), [f"{name}:v"]).column("v").to_pylist() == [
                1,
                None,
            ]
            assert cache_stats(client)["builds"] == 2
    finally:
        writer.shutdown()
        replica.shutdown()


def test_a_training_set_is_answered_when_the_snapshots_between_its_cached_index_and_its_own_expire_meanwhile(
    catalog_properties: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bringing a cached index forward is a shortcut: `changed_since` reads the manifests of the snapshots between the
    cached index's and the request's, which no read holds (those two are). An expiry that deletes them meanwhile
    (brought into that moment by wrapping `changed_since`; the expiry is real) has the request's snapshot read whole,
    not the training set fail."""
    server = start_server(catalog_properties, online_refresh_seconds=3600.0)  # no refresh ahead: the request extends
    name = "tests.live_expired_between"
    try:
        with (
            FeatureClient(f"grpc://127.0.0.1:{server.port}") as client,
            FeatureClient(f"grpc://127.0.0.1:{server.port}") as other,
        ):
            cached = client.write(
                name, feature_rows_table([(1, 0, 0)], 1), entity_keys=["k"], event_time="ts", created_time="created"
            ).snapshot_id
            first = client.get_historical_features(entities([1, 2, 3], 5), [f"{name}:v"])  # indexes this snapshot
            assert first.column("v").to_pylist() == [1, None, None]
            table = load_catalog("default", **catalog_properties).load_table(name)
            between = []
            for k in (2, 3):  # appends by another writer (another engine, say): this server is not told
                table.append(feature_rows_table([(k, 0, 0)], k).cast(table.schema().as_arrow()))
                between.append(table.metadata.current_snapshot_id)
            expired: list[dict[str, Any]] = []
            real, once = asof.changed_since, threading.Lock()

            def expired_meanwhile(*args: Any) -> Any:
                if once.acquire(blocking=False):  # the first call (a refresh thread may come too): the snapshot of
                    # k=2's append goes, neither the request's nor the cached index's
                    now = dt.datetime.now(dt.timezone.utc)
                    expired.append(other.expire_snapshots(name, older_than=now, retain_last=1))
                return real(*args)

            monkeypatch.setattr(asof, "changed_since", expired_meanwhile)
            answer = client.get_historical_features(entities([1, 2, 3], 5), [f"{name}:v"])
            assert answer.column("v").to_pylist() == [1, 2, 3]
            assert (expired[0]["expired"], expired[0]["kept_in_use"]) == (between[:1], [cached])
            assert cache_stats(client)["builds"] == 2 and cache_stats(client)["incremental_builds"] == 0  # read whole
    finally:
        server.shutdown()


def test_a_table_too_large_for_the_cache_is_joined_by_duckdb_alone(catalog_properties: dict[str, str]) -> None:
    """With a cache that holds the small table's index but not the large one's, a request joins the large table by
    DuckDB and the small one through its index, and answers exactly as a server that indexes both and one that
    indexes neither: streamed entity rows, and an entity table read in two parts split by the small table's key
    (the large table, keyed by (k, c), must not be pruned by that split). Every (keys, time) is unique there."""
    small, large, people = (f"tests.mixed_{part}_{uuid.uuid4().hex[:8]}" for part in ("small", "large", "people"))
    hybrid = start_server(catalog_properties, historical_cache_bytes=1 << 20)
    indexed = start_server(catalog_properties)
    duck = start_server(catalog_properties, historical_cache_bytes=0)
    count = 40_000
    try:
        with FeatureClient(f"grpc://127.0.0.1:{hybrid.port}") as client:
            client.write(
                small, feature_rows_table([(k, k % 7, 0) for k in range(20)], 0), entity_keys=["k"], event_time="ts"
            )
            client.write(
                large,
                pa.table(
                    {
                        "k": pa.array([i % 20 for i in range(count)], pa.int64()),
                        "c": pa.array([i % 3 for i in range(count)], pa.int64()),
                        "ts": pa.array(
                            [EPOCH + dt.timedelta(seconds=i) for i in range(count)], pa.timestamp("us", "UTC")
                        ),
                        "w": pa.array(range(count), pa.int64()),
                        "text": pa.array([f"row {i}" for i in range(count)]),
                    }
                ),
                entity_keys=["k", "c"],
                event_time="ts",
            )
            probes = pa.table(
                {
                    "k": pa.array([k for k in range(22) for _ in range(4)], pa.int64()),
                    "c": pa.array([c % 3 for c in range(88)], pa.int64()),
                    "event_timestamp": pa.array(
                        [EPOCH + dt.timedelta(seconds=s % 45_000) for s in range(0, 88 * 499, 499)],
                        pa.timestamp("us", "UTC"),
                    ),
                }
            )
            client.write(people, probes, entity_keys=["k"], event_time="event_timestamp")
        features = [f"{small}:v", f"{large}:w", f"{large}:text"]
        results = []
        for server in (hybrid, indexed, duck):
            with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
                streamed = client.get_historical_features(probes, features)
                parts = client.get_historical_features(people, features, partitions=2)
                results.append((streamed.to_pylist(), sorted(parts.to_pylist(), key=lambda r: sorted(r.items()))))
                stats = cache_stats(client)
                assert stats["snapshots"] == {hybrid: 1, indexed: 2, duck: 0}[server], stats
        assert results[0] == results[1] == results[2]
        assert any(r["w"] is not None for r in results[0][0]) and any(r["v"] is not None for r in results[0][0])
    finally:
        for server in (hybrid, indexed, duck):
            server.shutdown()


def ticks(keys: int, rows: int, first: int, seconds: int) -> pa.Table:
    """`rows` feature rows over `keys` keys at the seconds 0..`seconds`: many ties on (key, time). `v` names the
    row."""
    return feature_rows_table([((n * 7) % keys, (n * 13) % seconds, n) for n in range(first, first + rows)], first)


def test_deletes_are_masked_and_runs_folded_with_duckdbs_results(catalog_properties: dict[str, str]) -> None:
    """Through a real server: appends add runs (folded in the background once there is more than one), position
    deletes (merge-on-read) are masked in the generation of the last snapshot instead of read again, a
    copy-on-write delete and a compaction rebuild; after each change the training set equals the DuckDB path's on
    the same snapshot, and the snapshot pinned before the deletes still answers as it did."""
    name = f"tests.masked_{uuid.uuid4().hex[:8]}"
    indexed = start_server(catalog_properties, online_refresh_seconds=3600)
    duck = start_server(catalog_properties, historical_cache_bytes=0)
    probes = pa.table(
        {
            "k": pa.array([k % 23 for k in range(400)], pa.int64()),
            "event_timestamp": pa.array(
                [EPOCH + dt.timedelta(seconds=s % 70) for s in range(0, 400 * 3, 3)], pa.timestamp("us", "UTC")
            ),
        }
    )
    try:
        with (
            FeatureClient(f"grpc://127.0.0.1:{indexed.port}") as client,
            FeatureClient(f"grpc://127.0.0.1:{duck.port}") as other,
        ):

            def same(snapshot_ids: dict[str, int] | None = None) -> pa.Table:
                got = client.get_historical_features(probes, [f"{name}:v"], snapshot_ids=snapshot_ids)
                ids = snapshot_ids or {name: catalog_snapshot(catalog_properties, name)}
                want = other.get_historical_features(probes, [f"{name}:v"], snapshot_ids=ids)
                assert got.column("v").to_pylist() == want.column("v").to_pylist()
                assert got.column("v").null_count < len(got)
                return got

            client.write(name, ticks(20, 400, 0, 60), entity_keys=["k"], event_time="ts", created_time="created")
            same()
            for step in range(5):  # five appends: a run each, folded once there are two
                client.write(name, ticks(21, 10, 1000 + 10 * step, 65))
                same()
            assert cache_stats(client)["builds"] == 1 and cache_stats(client)["incremental_builds"] == 5
            wait_until(lambda: cache_stats(client)["folds"] >= 1, what="the runs folded in the background")
            # The memory budget counts the folded index as it is (a fold changes the index's size).
            assert client.health()["memory"]["caches"]["training_set"]["bytes"] == cache_stats(client)["bytes"]
            same()
            pinned = catalog_snapshot(catalog_properties, name)
            before = same({name: pinned})
            client.delete(name, keys={"k": [3, 7]}, mode="merge-on-read")  # rows of the first file and of runs
            same()
            # Rows of the first file again, behind rows deleted before; and the last append's rows.
            client.delete(name, filter="(v >= 360 AND v < 400) OR v >= 1045", mode="merge-on-read")
            same()
            stats = cache_stats(client)
            assert stats["builds"] == 1 and stats["deletes_masked"] == 2, stats
            assert same({name: pinned}).equals(before)
            client.delete(name, keys={"k": [4]}, mode="copy-on-write")  # removes data files: rebuilt
            same()
            # Rows of files read without the rows deleted before: masked by their positions less those.
            client.delete(name, filter="v >= 300 AND v < 340", mode="merge-on-read")
            same()
            assert cache_stats(client)["deletes_masked"] == 3
            client.compact(name)
            same()
            assert cache_stats(client)["builds"] == 3
    finally:
        indexed.shutdown()
        duck.shutdown()


def catalog_snapshot(catalog_properties: dict[str, str], name: str) -> int:
    current = FeatureCatalog(ServerConfig.catalog_name, catalog_properties).read(name).current_snapshot()
    assert current is not None
    return current.snapshot_id


@pytest.mark.parametrize("created", [True, False], ids=["equal-created", "no-created-column"])
def test_a_full_tie_goes_to_the_later_commit_whether_extended_or_rebuilt(
    catalog_properties: dict[str, str], created: bool
) -> None:
    """Corrections that tie the rows they correct on keys, event time and created time (or in a table without
    created times): the later commit wins, in the index a server brought forward append by append as in the one
    a fresh server (another replica, or this one after an eviction) builds from the same snapshot."""
    follower = start_server(catalog_properties, online_refresh_seconds=3600)
    name = f"tests.live_full_tie_{'created' if created else 'plain'}"

    def rows(first: int) -> pa.Table:
        written = feature_rows_table([(1, 5, 7), (2, 5, 7)], first)
        return written if created else written.drop_columns(["created"])

    try:
        with FeatureClient(f"grpc://127.0.0.1:{follower.port}") as client:
            client.write(name, rows(0), entity_keys=["k"], event_time="ts", created_time="created" if created else None)
            assert client.get_historical_features(entities([1, 2], 9), [f"{name}:v"]).column("v").to_pylist() == [0, 1]
            for first in (100, 200):
                client.write(name, rows(first))
                answer = client.get_historical_features(entities([1, 2], 9), [f"{name}:v"]).column("v").to_pylist()
                assert answer == [first, first + 1], "the later commit wins"
            assert cache_stats(client)["builds"] == 1 and cache_stats(client)["incremental_builds"] == 2
    finally:
        follower.shutdown()
    fresh = start_server(catalog_properties, online_refresh_seconds=3600)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{fresh.port}") as client:
            assert client.get_historical_features(entities([1, 2], 9), [f"{name}:v"]).column("v").to_pylist() == [
                200,
                201,
            ]
            assert cache_stats(client)["builds"] == 1 and cache_stats(client)["incremental_builds"] == 0
    finally:
        fresh.shutdown()


def test_a_cache_without_a_catalog_follows_no_table(
    catalog_properties: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A cache with no catalog to find new snapshots in (its thread only folds) follows no table, so that a round
    of refreshes has nothing to fail on."""
    server = start_server(catalog_properties, online_refresh_seconds=3600)
    name = "tests.live_no_catalog"
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            client.write(name, feature_rows_table([(1, 5, 5)], 0), entity_keys=["k"], event_time="ts")
    finally:
        server.shutdown()
    table = FeatureCatalog(ServerConfig.catalog_name, catalog_properties).read(name)
    cache = AsofCache(Engine(), ReadCaches(), 1 << 30)
    try:
        current = table.current_snapshot()
        assert current is not None
        assert cache.get(table, current.snapshot_id, FeatureSpec.from_properties(table.properties)) is not None
        assert cache.stats()["tables_followed"] == 0
        with caplog.at_level("INFO", logger=asof.__name__):
            cache.refresh()
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
    finally:
        cache.close()


def test_a_full_tie_within_one_commit_is_settled_alike_extended_or_rebuilt(catalog_properties: dict[str, str]) -> None:
    """One commit of many files (one per partition) whose rows tie each other on keys, event time and created
    time: a server that brought its index forward to it and a fresh server that reads the snapshot whole pick the
    same row of each tie (the later file in path order), and so does DuckDB's join."""
    name = "tests.live_full_tie_one_commit"
    keys = list(range(1, 9))
    follower = start_server(catalog_properties, online_refresh_seconds=3600)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{follower.port}") as client:
            client.write(
                name,
                feature_rows_table([(k, 5, 7) for k in keys], 0),
                entity_keys=["k"],
                event_time="ts",
                created_time="created",
                partition_by=["identity(v)"],
            )
            assert client.get_historical_features(entities(keys, 9), [f"{name}:v"]).column("v").to_pylist() == list(
                range(8)
            )
            # A file per row, their paths (v_identity=95 ... v_identity=110) in another order than their values.
            client.write(name, feature_rows_table([(k, 5, 7) for k in keys + keys], 95))
            extended = client.get_historical_features(entities(keys, 9), [f"{name}:v"]).column("v").to_pylist()
            assert cache_stats(client)["builds"] == 1 and cache_stats(client)["incremental_builds"] == 1
    finally:
        follower.shutdown()
    fresh = start_server(catalog_properties, online_refresh_seconds=3600)
    duck = start_server(catalog_properties, historical_cache_bytes=0)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{fresh.port}") as client:
            rebuilt = client.get_historical_features(entities(keys, 9), [f"{name}:v"]).column("v").to_pylist()
            assert cache_stats(client)["builds"] == 1
        with FeatureClient(f"grpc://127.0.0.1:{duck.port}") as client:
            joined = client.get_historical_features(entities(keys, 9), [f"{name}:v"]).column("v").to_pylist()
    finally:
        fresh.shutdown()
        duck.shutdown()
    assert rebuilt == extended == joined
    assert all(v in (95 + i, 103 + i) for i, v in enumerate(extended)), "a row of the later commit"


def test_big_appends_to_every_table_extend_indexes_near_the_cap(catalog_properties: dict[str, str]) -> None:
    """Three tables whose indexes fill most of the cache (as at the benchmark's full size: 2.6 of 4 GiB) each get
    appends of 10 % of their rows, round after round, until they fill 80 % of it: every index is extended, never
    read whole again, although each new generation is as large as the one it extends (they share their columns
    and runs: the cache counts that memory once) and each extension and fold needs room for its work (found among
    older generations, never by evicting another table's index); past that, what does not fit (the index, or the
    work of bringing it forward) goes to DuckDB and nothing is read whole again; results equal DuckDB's on the same
    snapshots throughout."""
    names = [f"tests.near_cap_{part}_{uuid.uuid4().hex[:8]}" for part in ("a", "b", "c")]
    sizes = [8_000, 2_000, 4_000]
    probes = pa.table(
        {
            "k": pa.array([k % 97 for k in range(500)], pa.int64()),
            "event_timestamp": pa.array(
                [EPOCH + dt.timedelta(seconds=s % 9_000) for s in range(0, 500 * 17, 17)], pa.timestamp("us", "UTC")
            ),
        }
    )
    features = [f"{name}:v" for name in names]
    measuring = start_server(catalog_properties, online_refresh_seconds=3600)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{measuring.port}") as client:
            for name, size in zip(names, sizes, strict=True):
                client.write(
                    name, ticks(97, size, 0, 8_000), entity_keys=["k"], event_time="ts", created_time="created"
                )
            client.get_historical_features(probes, features, full_feature_names=True)
            indexed = cache_stats(client)["bytes"]
    finally:
        measuring.shutdown()
    cap = indexed * 100 // 60  # the three indexes take 60 % of the cache: two generations of the largest do not fit
    server = start_server(catalog_properties, online_refresh_seconds=3600, historical_cache_bytes=cap)
    duck = start_server(catalog_properties, historical_cache_bytes=0)
    try:
        with (
            FeatureClient(f"grpc://127.0.0.1:{server.port}") as client,
            FeatureClient(f"grpc://127.0.0.1:{duck.port}") as other,
        ):
            client.get_historical_features(probes, features, full_feature_names=True)
            assert cache_stats(client)["builds"] == 3
            first = sum(sizes)
            for round_ in range(3):
                for name, size in zip(names, sizes, strict=True):
                    client.write(name, ticks(97, size // 10, first, 8_000))
                    first += size // 10
                got = client.get_historical_features(probes, features, full_feature_names=True)
                stats = cache_stats(client)
                assert stats["builds"] == 3 and stats["incremental_builds"] == 3 * (round_ + 1), (round_, stats)
                ids = {name: catalog_snapshot(catalog_properties, name) for name in names}
                assert got.equals(
                    other.get_historical_features(probes, features, snapshot_ids=ids, full_feature_names=True)
                )
            assert client.health()["memory"]["caches"]["training_set"]["bytes"] == cache_stats(client)["bytes"]
            assert cache_stats(client)["bytes"] <= cap
            # Past the cap: an index that does not fit beside the others is not kept (its table goes to DuckDB),
            # rather than pushing out another table's index, which would be read whole, push out another, ...
            for round_ in range(3, 8):
                for name, size in zip(names, sizes, strict=True):
                    client.write(name, ticks(97, size // 10, first, 8_000))
                    first += size // 10
                got = client.get_historical_features(probes, features, full_feature_names=True)
                stats = cache_stats(client)
                assert stats["builds"] == 3, (round_, stats)
                assert stats["incremental_builds"] + stats["too_large"] >= 3 * (round_ + 1), (round_, stats)
                ids = {name: catalog_snapshot(catalog_properties, name) for name in names}
                assert got.equals(
                    other.get_historical_features(probes, features, snapshot_ids=ids, full_feature_names=True)
                )
            assert cache_stats(client)["too_large"] > 0 and cache_stats(client)["bytes"] <= cap
    finally:
        server.shutdown()
        duck.shutdown()


def test_runs_stay_bounded_while_puts_land_every_round(
    catalog_properties: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put lands before every round of the refresh thread (driven here by hand, as `_run` does: refresh, then
    fold): each round brings a new snapshot forward, and still folds happen, so the runs every search goes
    through stay bounded; no older generation waits to be folded; and the refresh thread's own extension of a
    crowded index does not wake it (which made every round leave its folds for later)."""
    monkeypatch.setattr(AsofCache, "_start", lambda self: None)
    name = f"tests.starve_{uuid.uuid4().hex[:8]}"
    server = start_server(catalog_properties, online_refresh_seconds=3600)
    catalog = FeatureCatalog(ServerConfig.catalog_name, catalog_properties)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            client.write(name, ticks(97, 5_000, 0, 8_000), entity_keys=["k"], event_time="ts", created_time="created")
            cache = AsofCache(Engine(), ReadCaches(), 1 << 30, catalog=catalog)
            table = catalog.read(name)
            spec = FeatureSpec.from_properties(table.properties)
            assert cache.get(table, table.current_snapshot().snapshot_id, spec) is not None
            first = 5_000
            for _ in range(12):
                client.write(name, ticks(97, 50, first, 8_000))
                first += 50
                cache._wake.clear()
                cache.refresh()
                cache._fold_all()
                table = catalog.read(name)
                index = cache.peek(table, table.current_snapshot().snapshot_id, spec)
                assert index is not None and len(index.runs) <= asof._FOLD_RUNS + 2, len(index.runs) if index else None
                assert all(key not in cache._owner for key in cache._to_fold), "an older generation queued"
            assert cache.stats()["folds"] >= 2
            # The refresh thread bringing a crowded index forward does not wake itself.
            cache._wake.clear()
            for _ in range(asof._FOLD_RUNS + 1):
                client.write(name, ticks(97, 50, first, 8_000))
                first += 50
                cache._thread = threading.Thread(target=cache.refresh)
                cache._thread.start()
                cache._thread.join()
            assert cache._to_fold and not cache._wake.is_set()
    finally:
        server.shutdown()


@pytest.fixture
def two_tables(
    catalog_properties: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[FeatureClient, FeatureCatalog, FeatureSpec, dict[str, int], tuple[str, str]]]:
    """Two tables of 4,000 rows written through a server's client: the client, the catalog, their spec, the bytes
    of each one's index, their names. Caches made meanwhile start no refresh thread: the test drives its rounds."""
    monkeypatch.setattr(AsofCache, "_start", lambda self: None)
    tag = uuid.uuid4().hex[:8]
    names = (f"tests.two_a_{tag}", f"tests.two_b_{tag}")
    server = start_server(catalog_properties, online_refresh_seconds=3600)
    catalog = FeatureCatalog(ServerConfig.catalog_name, catalog_properties)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            for name in names:
                client.write(
                    name, ticks(97, 4_000, 0, 8_000), entity_keys=["k"], event_time="ts", created_time="created"
                )
            probe = AsofCache(Engine(), ReadCaches(), 1 << 30)
            tables = {name: catalog.read(name) for name in names}
            spec = FeatureSpec.from_properties(tables[names[0]].properties)
            size = {n: probe.get(t, t.current_snapshot().snapshot_id, spec).nbytes() for n, t in tables.items()}
            yield client, catalog, spec, size, names
    finally:
        server.shutdown()


def test_a_refusal_for_another_tables_index_lasts_until_room_is_freed(
    two_tables: tuple[FeatureClient, FeatureCatalog, FeatureSpec, dict[str, int], tuple[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Table A's index brought forward does not fit beside table B's (kept current): A's training sets use
    DuckDB, the refresh thread stops asking (no miss per round, no re-read of A's appends per snapshot); once B's
    index is gone, A's index is brought forward again (B is three times A's size: the room it leaves holds the work
    of bringing A forward too, a copy of its columns among it). Snapshots larger than the whole cap are remembered,
    at most `_TOO_LARGE_KEYS` of them."""
    client, catalog, spec, size, (a, b) = two_tables
    client.write(b, ticks(97, 8_000, 100_000, 8_000))
    tables = {name: catalog.read(name) for name in (a, b)}
    grown = AsofCache(Engine(), ReadCaches(), 1 << 30).get(tables[b], tables[b].current_snapshot().snapshot_id, spec)
    assert grown is not None
    cache = AsofCache(Engine(), ReadCaches(), size[a] + grown.nbytes() + size[a] // 20, catalog=catalog)
    for followed in tables.values():
        assert cache.get(followed, followed.current_snapshot().snapshot_id, spec) is not None
    first = 4_000
    for _ in range(3):
        client.write(a, ticks(97, 800, first, 8_000))
        first += 800
        cache.refresh()
    assert cache.too_large >= 1 and not cache._too_large
    misses = cache.misses
    for _ in range(3):
        cache.refresh()
    assert cache.misses == misses, "the refresh thread asked again for a refused index"
    table = catalog.read(a)
    assert cache.get(table, table.current_snapshot().snapshot_id, spec) is None  # B's index in the way
    b_key = (str(tables[b].metadata.table_uuid), tables[b].current_snapshot().snapshot_id, spec, None)
    with cache._lock:
        cache._account.discard(b_key)
    cache.refresh()  # brought forward ahead again, now that it fits
    assert cache.peek(table, table.current_snapshot().snapshot_id, spec) is not None

    monkeypatch.setattr(asof, "_TOO_LARGE_KEYS", 2)
    small = AsofCache(Engine(), ReadCaches(), size[b] // 2)
    for _ in range(3):
        client.write(b, ticks(97, 10, first, 8_000))
        first += 10
        table = catalog.read(b)
        assert small.get(table, table.current_snapshot().snapshot_id, spec) is None
    assert len(small._too_large) == 2


def test_an_older_generation_in_use_outlives_its_newer_one(
    two_tables: tuple[FeatureClient, FeatureCatalog, FeatureSpec, dict[str, int], tuple[str, str]],
) -> None:
    """A job pinned at snapshot S1 keeps using S1's index while the refresh thread brings it forward to S2 (which
    nobody uses, and which holds the memory they share): when another table's index needs room, S2 goes and S1
    stays, charged alone (it fits), so the next request at S1 is not read whole again."""
    client, catalog, spec, size, (a, c) = two_tables
    cache = AsofCache(Engine(), ReadCaches(), size[a] + size[c] + 20_000, catalog=catalog)
    table = catalog.read(a)
    s1 = table.current_snapshot().snapshot_id
    assert cache.get(table, s1, spec) is not None
    client.write(a, ticks(97, 40, 4_000, 8_000))
    cache.refresh()  # S2 brought forward ahead, sharing S1's memory
    table = catalog.read(a)
    assert cache.peek(table, table.current_snapshot().snapshot_id, spec) is not None
    assert cache.get(table, s1, spec) is not None  # the pinned job
    other = catalog.read(c)
    assert cache.get(other, other.current_snapshot().snapshot_id, spec) is not None
    assert cache.peek(table, table.current_snapshot().snapshot_id, spec) is None
    assert cache.peek(table, s1, spec) is not None
    assert cache.stats()["bytes"] == size[a] + size[c] <= cache.max_bytes
    builds = cache.builds
    assert cache.get(table, s1, spec) is not None and cache.builds == builds


def test_replaced_generations_stay_only_while_a_request_may_ask_for_them(
    two_tables: tuple[FeatureClient, FeatureCatalog, FeatureSpec, dict[str, int], tuple[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A followed table put to again and again: each index brought forward ahead replaces the last one, which goes,
    but the one a job asked for stays (part of the newest, as the generations between them go: not read again), and
    stays alone once a compaction has the newest rebuilt; expiry keeps its snapshot, not those of the indexes built
    ahead. Past `_RECENT_SECONDS` it goes too, unless a read still holds its snapshot."""
    client, catalog, spec, _, (a, _) = two_tables
    cache = AsofCache(Engine(), ReadCaches(), 1 << 30, catalog=catalog)
    table = catalog.read(a)
    uuid_ = str(table.metadata.table_uuid)
    s1 = table.current_snapshot().snapshot_id
    pinned = cache.get(table, s1, spec)  # the job's request
    assert pinned is not None

    def cached() -> set[int | None]:
        return {key[1] for key in cache._indexes if key[0] == uuid_}

    first = 4_000
    for _ in range(3):
        client.write(a, ticks(97, 40, first, 8_000))
        first += 40
        cache.refresh()
    latest = catalog.read(a).current_snapshot().snapshot_id
    assert cached() == {s1, latest} and cache.refreshed_ahead == 3
    assert cache.snapshots(uuid_) == {s1}
    key = (uuid_, s1, spec, None)
    assert cache._owner[key][1] == latest and cache._account.charge(key) < pinned.nbytes()
    builds = (cache.builds, cache.incremental_builds)
    assert cache.get(table, s1, spec) is pinned and (cache.builds, cache.incremental_builds) == builds

    client.compact(a)
    cache.refresh()  # the compacted snapshot is read whole: the index it replaces (never asked for) goes
    compacted = catalog.read(a).current_snapshot().snapshot_id
    assert cache.builds == builds[0] + 1
    assert cached() == {s1, compacted} and cache.snapshots(uuid_) == {s1}
    assert key not in cache._owner and cache._account.charge(key) == pinned.nbytes()

    monkeypatch.setattr(asof, "_RECENT_SECONDS", 0.0)  # the job asked long ago
    with cache.caches.in_use.hold([(uuid_, s1)]):  # ... but a read of it still streams
        assert cache.snapshots(uuid_) == {s1} and cached() == {s1, compacted}
    assert cache.snapshots(uuid_) == set() and cached() == {compacted}


def test_indexes_past_the_run_limit_are_folded_even_when_a_snapshot_waits(
    two_tables: tuple[FeatureClient, FeatureCatalog, FeatureSpec, dict[str, int], tuple[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only the latest generation of each table waits to be folded (an older one's fold is its newer one's); with
    a new snapshot waiting, a round still folds every index past `_MAX_RUNS` runs, not only the most crowded."""
    client, catalog, spec, _, names = two_tables
    cache = AsofCache(Engine(), ReadCaches(), 1 << 30, catalog=catalog)
    for name in names:
        table = catalog.read(name)
        assert cache.get(table, table.current_snapshot().snapshot_id, spec) is not None
    first = 4_000
    for _ in range(3):
        for name in names:
            client.write(name, ticks(97, 800, first, 8_000))
        first += 800
        cache.refresh()
    latest = {
        (str(t.metadata.table_uuid), t.current_snapshot().snapshot_id, spec, None) for t in map(catalog.read, names)
    }
    assert cache._to_fold == latest
    monkeypatch.setattr(asof, "_MAX_RUNS", 2)
    cache._wake.set()
    cache._fold_all()
    assert cache.stats()["folds"] == 2 and not cache._to_fold


def test_a_fold_waits_until_no_read_streams_unless_the_runs_grew_too_large(
    two_tables: tuple[FeatureClient, FeatureCatalog, FeatureSpec, dict[str, int], tuple[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A due fold into the first run is left for later while a read streams (it would take the read's cores), and
    the thread is woken to fold it as soon as the last read ends; runs past half the first's rows are folded beside a
    read all the same, and so is a fold that waited `_FOLD_PATIENCE`; small runs merged among themselves never wait.
    The read here is any snapshot held as reads hold theirs while they stream (`SnapshotsInUse.hold`)."""
    client, catalog, spec, _, names = two_tables
    cache = AsofCache(Engine(), ReadCaches(), 1 << 30, catalog=catalog)
    name = names[0]
    table = catalog.read(name)
    held = [(str(table.metadata.table_uuid), table.current_snapshot().snapshot_id)]
    assert cache.get(table, table.current_snapshot().snapshot_id, spec) is not None

    def folds() -> int:
        return int(cache.stats()["folds"])

    for first in (4_000, 4_050):  # two small runs: merged among themselves, beside a read
        client.write(name, ticks(97, 50, first, 8_000))
        cache.refresh()
    with cache.caches.in_use.hold(held):
        cache._fold_all()
    assert folds() == 1 and not cache._to_fold
    client.write(name, ticks(97, 800, 4_100, 8_000))  # past 1/16 of the first run: into it, due, not forced
    cache.refresh()
    assert len(cache._to_fold) == 1
    cache._wake.clear()
    with cache.caches.in_use.hold(held):
        cache._fold_all()
        assert folds() == 1 and len(cache._to_fold) == 1
        cache._fold_all()  # another round during the same read: one call waits for its end, not two
        assert not cache._wake.is_set() and len(cache.caches.in_use._quiet) == 1
    assert cache._wake.is_set()  # the read ended: fold now, not at the next poll
    cache._fold_all()
    assert folds() == 2 and not cache._to_fold
    client.write(name, ticks(97, 2_800, 4_900, 8_000))  # more than half the first run: folded beside a read
    cache.refresh()
    with cache.caches.in_use.hold(held):
        cache._fold_all()
        assert folds() == 3 and not cache._to_fold
    # A read that does not end (a slow consumer's stream) holds a due fold back for `_FOLD_PATIENCE` at most.
    client.write(name, ticks(97, 800, 7_700, 8_000))
    cache.refresh()
    with cache.caches.in_use.hold(held):
        cache._fold_all()
        assert folds() == 3
        monkeypatch.setattr(asof, "_FOLD_PATIENCE", 0.0)
        cache._fold_all()
        assert folds() == 4 and not cache._to_fold


def test_a_read_holds_its_snapshots_from_planning_to_the_end_of_its_stream() -> None:
    """`holding` takes its hold before the planning one ends, so that there is no moment without one (snapshot
    expiry, and a fold waiting for no read, would take it); a stream dropped unread lets go too."""
    in_use, quiet, held = SnapshotsInUse(), [], [("table", 1)]
    batch = pa.record_batch({"v": [1]})
    with in_use.hold(held):
        in_use.when_quiet(lambda: quiet.append("now"))
        stream = in_use.holding(held, pa.RecordBatchReader.from_batches(batch.schema, [batch]))
    assert in_use.busy() and not quiet
    assert stream.read_all().num_rows == 1 and not in_use.busy() and quiet == ["now"]
    unread = in_use.holding(held, pa.RecordBatchReader.from_batches(batch.schema, [batch]))
    assert in_use.snapshots("table") == {1}
    del unread
    gc.collect()
    assert not in_use.busy()


def test_a_training_set_holds_its_snapshots_from_planning_to_its_stream_without_a_gap(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same through a served training set (review 20: its planning hold ended before its stream's began), watched
    through the server's real `SnapshotsInUse` (its `_take` wrapped, not replaced): no moment without a held snapshot
    before the stream's own take."""
    server = start_server(sqlite_catalog(tmp_path))
    in_use = server.parts.training.cache.caches.in_use
    name, at = f"live.held_{uuid.uuid4().hex[:8]}", EPOCH + dt.timedelta(hours=1)
    events: list[str] = []
    take = in_use._take

    def watched(held: Any) -> Any:
        release = take(held)
        events.append("take")

        def released() -> None:
            release()
            if not in_use.busy():
                events.append("idle")

        return released

    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            rows = {"k": pa.array([1, 2], pa.int64()), "event_timestamp": [EPOCH, EPOCH], "v": [0.1, 0.2]}
            client.write(name, pa.table(rows), entity_keys=["k"], event_time="event_timestamp")
            info = client.training_set_info({"k": [1, 2], "event_timestamp": [at, at]}, [f"{name}:v"])
            monkeypatch.setattr(in_use, "_take", watched)
            assert client.read_endpoint(info.endpoints[0]).read_all().num_rows == 2
    finally:
        server.shutdown()
    last_take = len(events) - 1 - events[::-1].index("take")
    assert "idle" not in events[:last_take], events


# Commits of rows (key, second, created second) over few keys and times, so that rows of different commits tie on
# all three (rows of one commit never do: which of those wins is the file layout's business), and merge-on-read
# deletes of rows by `v` between them.
tie_commit = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 3), st.none() | st.integers(0, 1)), min_size=1, max_size=8
).map(lambda rows: list(dict.fromkeys(rows)))
tie_operation = st.one_of(
    st.tuples(st.just("append"), tie_commit),
    st.tuples(st.just("delete"), st.lists(st.integers(0, 40), min_size=1, max_size=3)),
)
TIE_PROBES = pa.table(
    {
        "k": pa.array([k for k in range(3) for _ in range(6)], pa.int64()),
        "event_timestamp": pa.array(
            [EPOCH + dt.timedelta(seconds=s) for _ in range(3) for s in range(-1, 5)], pa.timestamp("us", "UTC")
        ),
    }
)
_PADDING = 2000  # rows of other keys in the first commit: past the hybrid server's cap, never matched


@pytest.fixture(scope="module")
def tie_servers(catalog_properties: dict[str, str]) -> Iterator[tuple[list[str], str]]:
    """Servers that join a table through its sorted index (brought forward commit by commit), by DuckDB with the
    other table of the request through its index (a cap below the table's index: the per-table fallback), and by
    DuckDB alone; and that other table, `anchor` (one row, key 0, whose `a` every answer carries)."""
    anchor = f"tests.tie_anchor_{uuid.uuid4().hex[:8]}"
    servers = [
        start_server(catalog_properties, online_refresh_seconds=3600),
        start_server(catalog_properties, online_refresh_seconds=3600, historical_cache_bytes=64 << 10),
        start_server(catalog_properties, historical_cache_bytes=0),
    ]
    locations = [f"grpc://127.0.0.1:{s.port}" for s in servers]
    with FeatureClient(locations[0]) as client:
        client.write(
            anchor,
            feature_rows_table([(0, 0, 0)], 0).rename_columns(["k", "ts", "created", "a"]),
            entity_keys=["k"],
            event_time="ts",
        )
    yield locations, anchor
    for server in servers:
        server.shutdown()


def tie_reference(commits: list[list[tuple[int, int, int | None, int]]], gone: set[int]) -> list[int | None]:
    """`v` of the row each probe gets, by a plain loop: the latest time at or before the probe's, of those the
    latest created (unknown the oldest), of those the row of the latest commit."""
    out = []
    for key, at in zip(
        TIE_PROBES.column("k").to_pylist(), TIE_PROBES.column("event_timestamp").to_pylist(), strict=True
    ):
        second = (at - EPOCH).total_seconds()
        best: tuple[tuple[int, int, int], int] | None = None
        for number, rows in enumerate(commits):
            for k, s, created, v in rows:
                if k == key and s <= second and v not in gone:
                    rank = (s, -1 if created is None else created, number)
                    if best is None or rank > best[0]:
                        best = (rank, v)
        out.append(None if best is None else best[1])
    return out


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=tie_commit, operations=st.lists(tie_operation, max_size=4), created=st.booleans())
@example(  # the same row three times, then the newest deleted: the one before wins
    first=[(1, 2, 0)], operations=[("append", [(1, 2, 0)]), ("append", [(1, 2, 0)]), ("delete", [2])], created=True
)
def test_full_ties_go_to_the_later_commit_through_duckdb_as_through_the_index(
    first: list[tuple[int, int, int | None]],
    operations: list[tuple[Any, ...]],
    created: bool,
    tie_servers: tuple[list[str], str],
) -> None:
    """Rows tied on keys, event time and created time (or in a table without created times, on keys and event
    time) across commits, some deleted by merge-on-read deletes: after every commit the sorted index, the per-table
    DuckDB fallback and the all-DuckDB join pick the same row of each tie, the later commit's, as the plain loop."""
    locations, anchor = tie_servers
    name = f"tests.ties_{uuid.uuid4().hex[:12]}"
    commits: list[list[tuple[int, int, int | None, int]]] = []
    gone: set[int] = set()
    written = 0

    def rows_of(rows: list[tuple[int, int, int | None]]) -> pa.Table:
        nonlocal written
        if not created:  # without created times, rows that differ only in theirs tie too
            rows = list(dict.fromkeys((k, s, None) for k, s, _ in rows))
        commits.append([(k, s, c, written + i) for i, (k, s, c) in enumerate(rows)])
        table = feature_rows_table(rows, written)
        written += len(rows)
        return table if created else table.drop_columns(["created"])

    def answers() -> None:
        want = tie_reference(commits, gone)
        for location in locations:
            with FeatureClient(location) as client:
                got = client.get_historical_features(TIE_PROBES, [f"{name}:v", f"{anchor}:a"])
            assert got.column("v").to_pylist() == want, location
            anchored = [k == 0 and at >= EPOCH for k, at in zip(*TIE_PROBES.to_pydict().values(), strict=True)]
            assert got.column("a").to_pylist() == [0 if hit else None for hit in anchored]

    with FeatureClient(locations[0]) as client:
        padding = feature_rows_table([(1000 + i, 0, 0) for i in range(_PADDING)], 10_000)
        table = pa.concat_tables([rows_of(first), padding if created else padding.drop_columns(["created"])])
        client.write(name, table, entity_keys=["k"], event_time="ts", created_time="created" if created else None)
        answers()
        for op in operations:
            if op[0] == "append":
                client.write(name, rows_of(op[1]))
            else:
                doomed = sorted({v % written for v in op[1]} - gone)
                if not doomed:
                    continue
                client.delete(name, filter=" OR ".join(f"v = {v}" for v in doomed), mode="merge-on-read")
                gone.update(doomed)
            answers()
    with FeatureClient(locations[1]) as client:
        assert cache_stats(client)["too_large"] >= 1, "the hybrid server joined the table by DuckDB"


def test_bringing_an_index_forward_reserves_its_work_within_the_cap(
    two_tables: tuple[FeatureClient, FeatureCatalog, FeatureSpec, dict[str, int], tuple[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bringing an index forward reserves what it allocates (the appended rows read, the columns' growth, a copy
    where they cannot grow in place, the sort of their run) before allocating it: measured while it extends the
    index (numpy's allocations traced, Arrow's counted), the cache's reservation covers them, and what it holds and
    reserves together never passes the cap; the index brought forward answers as one built from scratch. With a
    cap that leaves no room for that work, the table goes to DuckDB (None), nothing reserved stays behind, and the
    index is not read whole either."""
    client, catalog, spec, size, (a, _) = two_tables
    table = catalog.read(a)
    start = table.current_snapshot()
    assert start is not None
    roomy = AsofCache(Engine(), ReadCaches(), 3 * size[a], catalog=catalog)
    tight = AsofCache(Engine(), ReadCaches(), size[a] * 11 // 10, catalog=catalog)
    for cache in (roomy, tight):
        assert cache.get(table, start.snapshot_id, spec) is not None
    client.write(a, ticks(97, 800, 4_000, 8_000))
    table = catalog.read(a)
    current = table.current_snapshot()
    assert current is not None
    seen: list[tuple[int, int, int]] = []
    extend = AsofIndex.extend

    def watched(index: AsofIndex, *args: Any, **kwargs: Any) -> AsofIndex:
        account = roomy._account
        arrow = pa.total_allocated_bytes()
        tracemalloc.start()
        try:
            extended = extend(index, *args, **kwargs)
            allocated = tracemalloc.get_traced_memory()[1] + max(0, pa.total_allocated_bytes() - arrow)
        finally:
            tracemalloc.stop()
        seen.append((account.held, account.reserved, allocated))
        return extended

    monkeypatch.setattr(AsofIndex, "extend", watched)
    forward = roomy.get(table, current.snapshot_id, spec)
    assert forward is not None and roomy.incremental_builds == 1
    [(held, reserved, allocated)] = seen
    # Both measures count every thread's allocations (the in-process server's own threads run meanwhile): a few
    # kilobytes of theirs are not the extension's.
    assert allocated <= reserved + (16 << 10) and held + reserved <= 3 * size[a], (held, reserved, allocated)
    assert roomy._account.reserved == 0 and roomy._account.held <= 3 * size[a]
    fresh = AsofCache(Engine(), ReadCaches(), 1 << 30).get(table, current.snapshot_id, spec)
    assert fresh is not None and probe_answers(forward) == probe_answers(fresh)
    assert tight.get(table, current.snapshot_id, spec) is None
    assert tight.builds == 1 and tight.incremental_builds == 0 and tight._account.reserved == 0
    assert tight._account.held <= size[a] * 11 // 10


def test_columns_named_as_duckdbs_virtual_columns_are_features_like_any_other(
    catalog_properties: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A table whose feature columns are named `filename` and `File_Row_Number` (DuckDB's virtual columns, in any
    case, which its scans then return instead) is joined alike through the sorted index and through DuckDB: the
    columns' own values come back, and DuckDB's join does not fail on them. Only full ties differ: the index gives
    them to the later commit, DuckDB (which cannot see a row's file and row number then) to either, and says so."""
    name = f"tests.virtual_{uuid.uuid4().hex[:8]}"

    def rows(spec: list[tuple[int, int, int | None]], first: int) -> pa.Table:
        table = feature_rows_table(spec, first)
        values = [f"row-{v}" for v in table.column("v").to_pylist()]
        return table.append_column("filename", pa.array(values)).append_column("File_Row_Number", pa.array(values))

    indexed = start_server(catalog_properties, online_refresh_seconds=3600)
    duck = start_server(catalog_properties, historical_cache_bytes=0)
    features = [f"{name}:v", f"{name}:filename", f"{name}:File_Row_Number"]
    try:
        with FeatureClient(f"grpc://127.0.0.1:{indexed.port}") as client:
            client.write(
                name,
                rows([(1, 5, 7), (2, 3, 3), (3, 4, 4), (2, 6, 6)], 0),
                entity_keys=["k"],
                event_time="ts",
                created_time="created",
            )
            client.write(name, rows([(1, 5, 7), (3, 8, 8)], 10))  # a full tie on key 1; key 3 after the probes
            got = {}
            for location in (f"grpc://127.0.0.1:{indexed.port}", f"grpc://127.0.0.1:{duck.port}"):
                with FeatureClient(location) as other, caplog.at_level("WARNING"):
                    got[location] = other.get_historical_features(entities([1, 2, 3, 4], 7), features).to_pydict()
            assert cache_stats(client)["builds"] == 1 and cache_stats(client)["too_large"] == 0
    finally:
        indexed.shutdown()
        duck.shutdown()
    by_index, by_duckdb = got.values()
    assert by_index["v"] == [10, 3, 2, None], "the later commit wins the full tie in the index"
    assert by_duckdb["v"][1:] == [3, 2, None] and by_duckdb["v"][0] in (0, 10)
    for answer in (by_index, by_duckdb):
        named = [None if v is None else f"row-{v}" for v in answer["v"]]
        assert answer["filename"] == answer["File_Row_Number"] == named, "the table's own columns"
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and name in r.getMessage()]
    assert warned and "File_Row_Number, filename" in warned[0]
