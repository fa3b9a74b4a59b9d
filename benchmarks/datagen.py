"""Deterministic synthetic feature tables, shared by every benchmark so their figures are comparable.

Everything is vectorised numpy/Arrow: generating millions of rows must not dominate a benchmark run.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa

ENTITY_KEY = "entity_id"
EVENT_TIME = "event_ts"
CREATED_TIME = "created_ts"
START = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
SPAN_DAYS = 90
FEATURE_KINDS = ("float64", "int64", "float32", "category", "timestamp")
CATEGORIES = tuple(f"cat_{i:02d}" for i in range(16))
TIMESTAMP = pa.timestamp("us", tz="UTC")
_US_PER_DAY = 86_400_000_000
_TIE_FRACTION = 0.05  # rows that repeat the previous row's (key, event time): point-in-time reads must break ties
_NULL_FRACTION = 0.05
_ZIPF_EXPONENT = 1.0
_FIRST_ENTITY = 1_000_000


def feature_names(feature_columns: int) -> list[str]:
    """Feature column names, each saying its type, cycling through `FEATURE_KINDS`."""
    return [f"f{i:02d}_{FEATURE_KINDS[i % len(FEATURE_KINDS)]}" for i in range(feature_columns)]


def entity_keys(rng: np.random.Generator, rows: int, entities: int) -> np.ndarray:
    """Keys with Zipf-like popularity (a few hot entities, a long tail), hot keys scattered over the id range."""
    weights = 1.0 / np.arange(1, entities + 1, dtype=np.float64) ** _ZIPF_EXPONENT
    ranks = rng.choice(entities, size=rows, p=weights / weights.sum())
    ids = rng.permutation(entities).astype(np.int64) + _FIRST_ENTITY
    return ids[ranks]


def _feature(rng: np.random.Generator, kind: str, rows: int) -> pa.Array:
    if kind == "float64":
        return pa.array(rng.normal(size=rows), mask=rng.random(rows) < _NULL_FRACTION)
    if kind == "int64":
        return pa.array(rng.integers(0, 1_000_000, size=rows, dtype=np.int64))
    if kind == "float32":
        return pa.array(rng.random(rows, dtype=np.float32))
    if kind == "category":
        return pa.array(CATEGORIES).take(pa.array(rng.integers(0, len(CATEGORIES), size=rows)))
    offsets = rng.integers(0, SPAN_DAYS * _US_PER_DAY, size=rows)
    return pa.array(int(START.timestamp() * 1e6) + offsets, type=pa.int64()).cast(TIMESTAMP)


def feature_table(rows: int, entities: int, seed: int, feature_columns: int) -> pa.Table:
    """`rows` feature rows: `entity_id` (int64), `event_ts` and `created_ts` (UTC µs) and typed features.

    Event times spread over `SPAN_DAYS` days from `START`; about 5% of rows tie with the row
    before them on both key and event time (with a later `created_ts`), as real feature logs do.
    The same arguments always give the same table.
    """
    if rows < 1 or entities < 1 or feature_columns < 0:
        raise ValueError("rows and entities must be positive and feature_columns non-negative")
    rng = np.random.default_rng(seed)
    keys = entity_keys(rng, rows, entities)
    event_us = int(START.timestamp() * 1e6) + rng.integers(0, SPAN_DAYS * _US_PER_DAY, size=rows)
    ties = np.flatnonzero(rng.random(rows) < _TIE_FRACTION)
    ties = ties[ties > 0]
    keys[ties] = keys[ties - 1]
    event_us[ties] = event_us[ties - 1]
    created_us = event_us + rng.integers(0, 3_600_000_000, size=rows)  # ingested up to an hour later
    columns: dict[str, pa.Array] = {
        ENTITY_KEY: pa.array(keys),
        EVENT_TIME: pa.array(event_us).cast(TIMESTAMP),
        CREATED_TIME: pa.array(created_us).cast(TIMESTAMP),
    }
    for index, name in enumerate(feature_names(feature_columns)):
        columns[name] = _feature(rng, FEATURE_KINDS[index % len(FEATURE_KINDS)], rows)
    return pa.table(columns)


# Point-in-time joins (`flight-bench historical`): feature tables that share one skewed key space,
# and entity rows (keys, a timestamp, a label) to join them to.

ENTITY_TIME = "event_timestamp"  # the entity timestamp column `get_historical_features` expects by default
LABEL = "label"
CHANNEL = "channel"  # the second key of a composite-key table
CHANNELS = 4
HISTORICAL_KINDS = ("float64", "category", "int64", "float32", "timestamp")  # a string among the first three
_UNKNOWN_FRACTION = 0.02  # entity rows whose key no feature table has
_EXACT_FRACTION = 0.05  # entity rows timed exactly at a feature row of theirs: `<=` must include it
_DUPLICATE_FRACTION = 0.01  # entity rows repeating the row before: both must come out


def zipf_keys(seed: int, rows: int, entities: int, rng: np.random.Generator) -> np.ndarray:
    """Keys with Zipf-like popularity like `entity_keys`, but the hot ids depend on `seed` alone.

    Every table generated with the same `seed` and `entities` then shares the same hot entities,
    as the feature groups of one entity do; the draws themselves come from `rng`.
    """
    cdf = np.cumsum(1.0 / np.arange(1, entities + 1, dtype=np.float64) ** _ZIPF_EXPONENT)
    ranks = np.minimum(np.searchsorted(cdf, rng.random(rows) * cdf[-1], side="right"), entities - 1)
    ids = np.random.default_rng(seed).permutation(entities).astype(np.int64) + _FIRST_ENTITY
    return ids[ranks]


def _unique_last(columns: list[np.ndarray], last: np.ndarray) -> None:
    """Bump `last` by 1 µs (in place) wherever rows repeat on `columns` + `last`, until none do.

    Only rows that share their `last` value with another row can repeat: one sort of `last` finds
    those few, and only they are compared on the other columns.
    """
    while True:
        ordered = np.sort(last)
        rows = np.flatnonzero(np.isin(last, ordered[1:][ordered[1:] == ordered[:-1]]))
        if not len(rows):
            return
        sub = [column[rows] for column in (*columns, last)]
        suborder = np.lexsort(tuple(reversed(sub)))
        same = np.ones(len(rows) - 1, dtype=bool)
        for column in sub:
            same &= column[suborder[1:]] == column[suborder[:-1]]
        repeated = rows[suborder[1:][same]]
        if not len(repeated):
            return
        last[repeated] += 1


def pit_feature_table(
    rows: int,
    entities: int,
    seed: int,
    feature_columns: int,
    *,
    prefix: str,
    table_seed: int,
    created: bool = True,
    composite: bool = False,
) -> pa.Table:
    """`rows` feature rows for point-in-time joins: keys of the shared key space (`zipf_keys` with `seed`),
    `event_ts` over `SPAN_DAYS` days, and `feature_columns` features named `{prefix}_f00_float64`, ...

    With `created`, about 5% of rows tie with another on (keys, event time) and `created_ts`
    decides between them (it is distinct within every tie, so the winner is well defined);
    without it no two rows share (keys, event time), so any correct join picks the same row.
    `composite` adds a `channel` key column (0-3). The same arguments always give the same table.
    """
    if rows < 1 or entities < 1 or feature_columns < 0:
        raise ValueError("rows and entities must be positive and feature_columns non-negative")
    rng = np.random.default_rng([seed, table_seed])
    keys = [zipf_keys(seed, rows, entities, rng)]
    if composite:
        keys.append(rng.integers(0, CHANNELS, size=rows, dtype=np.int64))
    event_us = int(START.timestamp() * 1e6) + rng.integers(0, SPAN_DAYS * _US_PER_DAY, size=rows)
    columns: dict[str, pa.Array] = {}
    if created:
        tie = rng.random(rows) < _TIE_FRACTION
        tie[0] = False
        ties = np.flatnonzero(tie & ~np.roll(tie, 1))  # never a tie with a row that is itself a copy
        for key in keys:
            key[ties] = key[ties - 1]
        event_us[ties] = event_us[ties - 1]
        created_us = event_us + rng.integers(0, 3_600_000_000, size=rows)  # ingested up to an hour later
        created_us[ties] = created_us[ties - 1] + rng.integers(1, 3_600_000_000, size=len(ties))
        _unique_last([*keys, event_us], created_us)
    else:
        _unique_last(keys, event_us)
    columns[ENTITY_KEY] = pa.array(keys[0])
    if composite:
        columns[CHANNEL] = pa.array(keys[1])
    columns[EVENT_TIME] = pa.array(event_us).cast(TIMESTAMP)
    if created:
        columns[CREATED_TIME] = pa.array(created_us).cast(TIMESTAMP)
    for index in range(feature_columns):
        kind = HISTORICAL_KINDS[index % len(HISTORICAL_KINDS)]
        columns[f"{prefix}_f{index:02d}_{kind}"] = _feature(rng, kind, rows)
    return pa.table(columns)


def entity_rows(rows: int, entities: int, seed: int, exact: pa.Table | None = None) -> pa.Table:
    """Entity rows to join: `entity_id` (mostly from the shared key space, 2% unknown), `channel`,
    `event_timestamp` over the same days as the features, and a float `label`.

    About 5% of rows take the key and event time of a row of `exact` (the inclusive edge), and
    1% repeat the row before them. The same arguments always give the same rows.
    """
    if rows < 1 or entities < 1:
        raise ValueError("rows and entities must be positive")
    rng = np.random.default_rng([seed, 0])
    keys = zipf_keys(seed, rows, entities, rng)
    unknown = rng.random(rows) < _UNKNOWN_FRACTION
    keys[unknown] = _FIRST_ENTITY + entities + rng.integers(0, entities, size=int(unknown.sum()))
    channels = rng.integers(0, CHANNELS, size=rows, dtype=np.int64)
    ts_us = int(START.timestamp() * 1e6) + rng.integers(0, SPAN_DAYS * _US_PER_DAY, size=rows)
    if exact is not None and exact.num_rows:
        chosen = np.flatnonzero(rng.random(rows) < _EXACT_FRACTION)
        source = rng.integers(0, exact.num_rows, size=len(chosen))
        keys[chosen] = exact[ENTITY_KEY].to_numpy()[source]
        ts_us[chosen] = exact[EVENT_TIME].cast(pa.int64()).to_numpy()[source]
    labels = rng.random(rows)
    duplicates = np.flatnonzero(rng.random(rows) < _DUPLICATE_FRACTION)
    duplicates = duplicates[duplicates > 0]
    for column in (keys, channels, ts_us, labels):
        column[duplicates] = column[duplicates - 1]
    return pa.table(
        {
            ENTITY_KEY: pa.array(keys),
            CHANNEL: pa.array(channels),
            ENTITY_TIME: pa.array(ts_us).cast(TIMESTAMP),
            LABEL: pa.array(labels),
        }
    )
