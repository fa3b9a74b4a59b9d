"""The sorted point-in-time index against a brute-force reference, on the edges the server tests seldom reach:
keys far apart (binary search instead of a value-indexed table), event times centuries apart (ranks instead
of offsets), composite keys mixing integers and strings, null keys and times, TTLs."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pyarrow as pa
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flight_server.base.schemas import micros
from flight_server.iceberg.catalog import FeatureSpec
from flight_server.training.asof import AsofIndex

YEAR = 365 * 86_400  # times are in seconds here
# Keys: a few small ones next to huge ones, so that some tables are dense and some are not.
keys = st.sampled_from([0, 1, 2, 7, -3, 1000, 1001, 1 << 40, -(1 << 50), (1 << 62) + 5])
texts = st.sampled_from(["a", "b", "ç"])
# Times: close together, or centuries apart (the packed (key, time) stamp then needs time ranks).
times = st.one_of(st.integers(0, 20), st.sampled_from([-30 * YEAR, 200 * YEAR, 7_000 * YEAR]))
feature_rows = st.lists(
    st.tuples(st.none() | keys, texts, st.none() | times, st.none() | st.integers(0, 5)),
    max_size=40,
    unique_by=lambda r: (r[0], r[1], r[2], r[3]),
)
entity_rows = st.lists(st.tuples(st.none() | keys, st.none() | texts, st.none() | times), min_size=1, max_size=30)


def reference(rows: list[tuple[Any, ...]], entity: tuple[Any, ...], composite: bool, ttl: int | None) -> int | None:
    """The row an entity gets: keys equal, latest time at or before its own (within the TTL), latest created; of
    rows equal in all that, the later (an index that saw them in separate appends tells them apart so)."""
    key, text, at = entity
    if key is None or at is None or (composite and text is None):
        return None
    best = None
    for i, (k, t, ts, created) in enumerate(rows):
        if k != key or (composite and t != text) or ts is None or ts > at or (ttl is not None and ts < at - ttl):
            continue
        rank = (ts, -1 if created is None else created)
        if best is None or rank >= best[0]:
            best = (rank, i)
    return None if best is None else best[1]


def table(rows: list[tuple[Any, ...]]) -> pa.Table:
    return pa.table(
        {
            "k": pa.array([r[0] for r in rows], pa.int64()),
            "t": pa.array([r[1] for r in rows], pa.string()),
            "ts": pa.array([r[2] for r in rows], pa.int64()).cast(pa.timestamp("s", tz="UTC")),
            "created": pa.array([r[3] for r in rows], pa.int64()).cast(pa.timestamp("s", tz="UTC")),
            "row": pa.array(range(len(rows)), pa.int64()),
            # One column per way the index stores values: fixed-width with nulls, repeated strings,
            # distinct strings, booleans, decimals.
            "score": pa.array([None if r[3] is None else r[3] / 2 for r in rows], pa.float32()),
            "grade": pa.array([None if r[3] == 1 else "low" if (r[3] or 0) < 3 else "high" for r in rows]),
            "name": pa.array([f"row {i}" for i in range(len(rows))], pa.large_string()),
            "flag": pa.array([None if r[3] is None else r[3] % 2 == 0 for r in rows], pa.bool_()),
            "amount": pa.array([None if r[3] is None else Decimal(r[3]) / 4 for r in rows], pa.decimal128(9, 2)),
            "day": pa.array([None if r[2] is None else r[2] // 86_400 for r in rows], pa.int32()).cast(pa.date32()),
        }
    )


@settings(max_examples=300, deadline=None)
@given(
    rows=feature_rows,
    entities=entity_rows,
    composite=st.booleans(),
    ttl=st.none() | st.integers(1, 10),  # a TTL is at least 1 s
    crowded=st.booleans(),
)
@example(rows=[(1, "a", 5, None), (1, "a", 5, 0)], entities=[(1, "a", 5)], composite=False, ttl=None, crowded=False)
@example(rows=[(1, "a", 5, 1)], entities=[(1, "a", 7), (1, "a", 8)], composite=False, ttl=2, crowded=True)
def test_index_matches_reference(
    rows: list[tuple[Any, ...]], entities: list[tuple[Any, ...]], composite: bool, ttl: int | None, crowded: bool
) -> None:
    """The examples: an unknown created time loses its tie; the TTL bound is inclusive. `crowded` adds
    keys 1000-1024 centuries apart, enough (keys x time span) that times are stored as ranks."""
    if crowded:
        rows = rows + [(1000 + i, "a", (7_000 if i % 2 else -30) * YEAR, None) for i in range(25)]
    # Duplicated (keys, time, created) rows would make the winner arbitrary; the contract does not say.
    seen = [(r[0], r[1] if composite else None, r[2], r[3]) for r in rows]
    rows = [r for i, r in enumerate(rows) if seen.index(seen[i]) == i]
    spec = FeatureSpec(
        entity_keys=("k", "t") if composite else ("k",),
        event_time="ts",
        created_time="created",
        ttl_seconds=ttl,
    )
    index = AsofIndex.build("t", 1, spec, table(rows))
    probe = pa.table(
        {
            "k": pa.array([e[0] for e in entities], pa.int64()),
            "t": pa.array([e[1] for e in entities], pa.large_string()),  # another string type than the table's
            "ts": pa.array([e[2] for e in entities], pa.int64()).cast(pa.timestamp("s")),  # naive: UTC
        }
    )
    entity_us, valid = micros(probe.column("ts"))
    source = table(rows)
    for apply_ttl, limit in ((True, ttl), (False, None)):
        at, known = index.match([probe.column(k) for k in spec.entity_keys], entity_us, valid, ttl=apply_ttl)
        chosen = [reference(rows, e, composite, limit) for e in entities]
        for column in source.column_names:  # every kind of column comes back as the chosen row's value
            want = [None if i is None else source.column(column)[i].as_py() for i in chosen]
            assert index.take(column, at, known).to_pylist() == want, column


def test_time_ranks_and_sorted_keys_are_used_when_needed() -> None:
    """The hypothesis test above covers every encoding only if its data can reach them: check that it can."""
    spread = [(k, "a", ts, None) for k in (1 << 40, *range(25)) for ts in (0, 7_000 * YEAR, -30 * YEAR)]
    index = AsofIndex.build("t", 1, FeatureSpec(("k",), "ts"), table(spread))
    assert index.runs[0].axis.distinct is not None  # centuries x keys: ranks, not offsets
    assert index.runs[0].keys.columns[0].table is None  # keys far apart: binary search, not a table
    stored = {name: type(values).__name__ for name, values in index.columns.items()}
    assert stored["score"] == stored["day"] == "FixedValues" and stored["grade"] == "DictionaryValues"
    assert stored["name"] == stored["flag"] == stored["amount"] == "ArrowValues"
    close = AsofIndex.build("t", 1, FeatureSpec(("k",), "ts"), table([(k, "a", k, None) for k in range(5)]))
    (run,) = close.runs
    assert run.axis.distinct is None and run.keys.columns[0].table is not None
    stamps = run.stamps[: len(run)]  # without the padding
    assert bool((stamps[1:] > stamps[:-1]).all())
