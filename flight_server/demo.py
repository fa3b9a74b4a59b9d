"""A small demo feature set, so a fresh server has something to query.

Written through the server's own Flight `do_put`, the same path every feature pipeline uses.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import TypedDict

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

DEMO_START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


class Definition(TypedDict, total=False):
    """How a demo table is created: keyword arguments of `FeatureClient.write`."""

    entity_keys: list[str]
    created_time: str
    ttl: dt.timedelta


def driver_stats(drivers: int = 1000, hours: int = 48, seed: int = 7, now: dt.datetime | None = None) -> pa.Table:
    """Hourly statistics per driver (like Feast's tutorial): int key, floats, an int, some nulls.

    `hours` hours from `DEMO_START` (for training sets), and with `now` one more row per driver at
    the start of the current hour, so online lookups find fresh features within the one-day TTL.
    """
    rng = np.random.default_rng(seed)
    driver_id = np.repeat(np.arange(1001, 1001 + drivers, dtype=np.int64), hours)
    offsets = np.tile(np.arange(hours, dtype=np.int64), drivers) * 3_600_000_000
    start = int(DEMO_START.timestamp() * 1_000_000)
    event_ts = start + offsets
    if now is not None:
        hour = int(now.timestamp()) // 3600 * 3_600_000_000
        driver_id = np.concatenate([driver_id, np.arange(1001, 1001 + drivers, dtype=np.int64)])
        event_ts = np.concatenate([event_ts, np.full(drivers, hour, dtype=np.int64)])
    conv_rate = rng.random(len(driver_id))
    return pa.table(
        {
            "driver_id": driver_id,
            "event_timestamp": pa.array(event_ts, pa.timestamp("us", tz="UTC")),
            "created": pa.array(event_ts + 60_000_000, pa.timestamp("us", tz="UTC")),
            "conv_rate": pa.array(conv_rate, mask=conv_rate < 0.02),
            "acc_rate": rng.random(len(driver_id)),
            "avg_daily_trips": rng.integers(0, 1000, len(driver_id)).astype(np.int32),
        }
    )


def customer_profile(customers: int = 500, days: int = 7, seed: int = 11) -> pa.Table:
    """Daily profile per customer: a string key, a string category, a float."""
    rng = np.random.default_rng(seed)
    ids = [f"C{i:05d}" for i in range(customers) for _ in range(days)]
    day = np.tile(np.arange(days, dtype=np.int64), customers) * 86_400_000_000
    start = int(DEMO_START.timestamp() * 1_000_000)
    return pa.table(
        {
            "customer_id": ids,
            "event_timestamp": pa.array(start + day, pa.timestamp("us", tz="UTC")),
            "segment": pa.array(rng.choice(["new", "regular", "vip"], len(ids))),
            "lifetime_value": rng.gamma(2.0, 150.0, len(ids)),
        }
    )


def trips(rows: int = 5000, seed: int = 13) -> pa.Table:
    """Labelled entity rows for training sets: which driver took which customer when, and the outcome."""
    rng = np.random.default_rng(seed)
    start = int(DEMO_START.timestamp() * 1_000_000)
    offsets = rng.integers(0, 3 * 86_400, rows) * 1_000_000
    return pa.table(
        {
            "driver_id": rng.integers(1001, 2001, rows),
            "customer_id": [f"C{i:05d}" for i in rng.integers(0, 500, rows)],
            "event_timestamp": pa.array(start + offsets, pa.timestamp("us", tz="UTC")),
            "label": rng.integers(0, 2, rows),
        }
    )


def load_demo(location: str, token: str | None = None) -> None:
    """Write the demo tables into namespace `demo` unless they are already there."""
    from flight_client import FeatureClient

    tables: dict[str, tuple[Callable[[], pa.Table], Definition]] = {
        "demo.driver_stats": (
            lambda: driver_stats(now=dt.datetime.now(dt.timezone.utc)),
            {"entity_keys": ["driver_id"], "created_time": "created", "ttl": dt.timedelta(days=1)},
        ),
        "demo.customer_profile": (customer_profile, {"entity_keys": ["customer_id"]}),
        "demo.trips": (trips, {"entity_keys": ["driver_id"]}),
    }
    with FeatureClient(location, token=token) as client:
        existing = {t["table"] for t in client.tables()}
        for name, (make, definition) in tables.items():
            if name not in existing:
                result = client.write(
                    name,
                    make(),
                    event_time="event_timestamp",
                    write_id="demo-" + name.split(".")[1].replace("_", "-"),
                    **definition,
                )
                log.info("demo: wrote %d rows to %s (snapshot %s)", result.rows, name, result.snapshot_id)
