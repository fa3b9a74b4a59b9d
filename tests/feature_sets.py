"""Tables for the PyTorch and Ray integration tests: a scan table of many data files and a training set
(an entity table on the server joined to a feature table), both with a unique id per row."""

from __future__ import annotations

import datetime as dt
import uuid

import numpy as np
import pyarrow as pa

from flight_client import FeatureClient

T0 = dt.datetime(2025, 6, 1, tzinfo=dt.timezone.utc)
TIME = pa.timestamp("us", "UTC")
SCAN_ROWS = 6000  # two writes, each spread over eight key buckets: 16 data files
TRIPS, DRIVERS, KNOWN_DRIVERS = 5000, 350, 300


def write_scan_table(client: FeatureClient) -> str:
    """A table with one row per `id` in range(SCAN_ROWS) and a column of each type tensors take."""
    table = f"it.scan_{uuid.uuid4().hex[:10]}"
    half = SCAN_ROWS // 2
    for start in (0, half):
        ids = np.arange(start, start + half)
        client.write(
            table,
            pa.table(
                {
                    "id": pa.array(ids, pa.int64()),
                    "ts": pa.array((ids * 1_000_000).astype("datetime64[us]")).cast(TIME),
                    "value": pa.array(ids / 4, pa.float64()),
                    "small": pa.array(ids % 1000, pa.int32()),
                    "ratio": pa.array(ids / 8, pa.float32()),
                    "flag": pa.array(ids % 2 == 0),
                    "day": pa.array((ids % 30).astype("datetime64[D]")),
                    "maybe": pa.array([int(i) if i % 7 else None for i in ids], pa.int64()),
                    "name": pa.array([f"n{i}" for i in ids]),
                }
            ),
            entity_keys=["id"],
            event_time="ts",
        )
    return table


def write_training_set(client: FeatureClient) -> tuple[str, list[str]]:
    """An entity table of TRIPS trips (unique `trip_id`) and the features joined to it; drivers beyond
    KNOWN_DRIVERS have no feature rows, so their `rate` is null."""
    suffix = uuid.uuid4().hex[:10]
    drivers, trips = f"it.drivers_{suffix}", f"it.trips_{suffix}"
    known = np.arange(KNOWN_DRIVERS)
    for hour, scale in ((0, 1.0), (5, 2.0)):
        client.write(
            drivers,
            pa.table(
                {
                    "driver_id": pa.array(known, pa.int64()),
                    "event_timestamp": pa.array([T0 + dt.timedelta(hours=hour)] * len(known), TIME),
                    "rate": pa.array(known * scale / 100, pa.float64()),
                }
            ),
            entity_keys=["driver_id"],
            event_time="event_timestamp",
        )
    rng = np.random.default_rng(7)
    hours = rng.integers(1, 10, TRIPS)
    client.write(
        trips,
        pa.table(
            {
                "trip_id": pa.array(np.arange(TRIPS), pa.int64()),
                "driver_id": pa.array(rng.integers(0, DRIVERS, TRIPS), pa.int64()),
                "event_timestamp": pa.array([T0 + dt.timedelta(hours=int(h)) for h in hours], TIME),
                "label": pa.array(rng.integers(0, 2, TRIPS), pa.int64()),
            }
        ),
        entity_keys=["driver_id"],
        event_time="event_timestamp",
    )
    return trips, [f"{drivers}:rate"]
