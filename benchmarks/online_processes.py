"""What `flight-bench online`'s child processes run (the concurrent writer, the concurrent clients), apart from
`benchmarks.online`: a spawned child imports the module of its function, and this one needs only the client and
the data generator (0.2 s), not DuckDB and pyiceberg (1.2 s, for each of up to 7 children at once)."""

from __future__ import annotations

import os
import time
from multiprocessing.synchronize import Event
from typing import Any

import numpy as np
import pyarrow as pa

from benchmarks.datagen import CREATED_TIME, ENTITY_KEY, EVENT_TIME, feature_table
from flight_client import FeatureClient

WRITER_ROWS = 1000  # rows per put of the concurrent writer


def write_loop(location: str, table: str, ids: list[int], features: list[str], stop: Event, puts: Any) -> None:
    """The concurrent writer (its own process): puts of `WRITER_ROWS` new rows until told to stop."""
    rng = np.random.default_rng(7)
    with FeatureClient(location) as client:
        while not stop.is_set():
            client.write(table, new_rows(rng.choice(ids, WRITER_ROWS).tolist(), features))
            puts.value += 1


def client_loop(
    location: str, refs: list[str], ids: list[int], seconds: float, index: int, rounds: list[tuple[int, Any]], out: Any
) -> None:
    """Client `index` of several concurrent clients (its own process): in each of the `rounds` (clients, barrier)
    with more than `index` clients, lookups of one random entity, back to back, for `seconds` after every client of
    the round is ready (the barrier); sends each round's (clients, latencies) back."""
    rng = np.random.default_rng(len(ids) + os.getpid())
    with FeatureClient(location) as client:
        client.get_online_features({ENTITY_KEY: [ids[0]]}, refs)
        for clients, start in rounds:
            if index >= clients:
                continue
            latencies = []
            start.wait()
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                keys = [ids[int(rng.integers(len(ids)))]]
                began = time.perf_counter()
                client.get_online_features({ENTITY_KEY: keys}, refs)
                latencies.append(time.perf_counter() - began)
            out.put((clients, latencies))


def new_rows(entities: list[int], features: list[str]) -> pa.Table:
    """Rows for `entities` stamped now (so they are the latest), with generated feature values."""
    now = pa.array([time.time_ns() // 1000] * len(entities), pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    values = feature_table(len(entities), 10, len(entities), len(features))
    columns = {ENTITY_KEY: pa.array(entities, pa.int64()), EVENT_TIME: now, CREATED_TIME: now}
    return pa.table({**columns, **{f: values.column(f) for f in features}})
