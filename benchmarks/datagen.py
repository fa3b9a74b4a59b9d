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
