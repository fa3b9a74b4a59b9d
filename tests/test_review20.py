"""Review 20: xfail tests for bugs found in the session's changes (46c8284..main)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from flight_client import FeatureClient
from flight_server.transport.service import FeatureFlightServer
from tests.conftest import sqlite_catalog, start_server

UTC = dt.timezone.utc
BASE = dt.datetime(2026, 1, 1, tzinfo=UTC)
ROWS = pa.table(
    {
        "driver_id": pa.array([1, 2], pa.int64()),
        "event_timestamp": pa.array([BASE, BASE], pa.timestamp("us", "UTC")),
        "rate": [0.1, 0.2],
    }
)
ENTITIES = pa.table(
    {
        "driver_id": pa.array([1, 2, 1, 2], pa.int64()),
        "event_timestamp": pa.array([BASE + dt.timedelta(hours=1)] * 4, pa.timestamp("us", "UTC")),
    }
)


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FeatureFlightServer]:
    root: Path = tmp_path_factory.mktemp("review20")
    server = start_server(sqlite_catalog(root))
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def location(serving: FeatureFlightServer) -> str:
    return f"grpc://127.0.0.1:{serving.port}"


@pytest.fixture(scope="module")
def features(location: str) -> str:
    name = f"review20.f_{uuid.uuid4().hex[:10]}"
    with FeatureClient(location) as client:
        client.write(name, ROWS, entity_keys=["driver_id"], event_time="event_timestamp")
    return name


@pytest.mark.xfail(
    strict=True,
    reason="client._exchanging catches STREAM_ERRORS (now with OSError) around _Sender.finish(), which re-raises "
    "the caller's own entity-stream error: a caller's FileNotFoundError becomes a FeatureServerError",
)
def test_an_oserror_of_the_callers_entity_stream_is_raised_as_it_is(location: str, features: str) -> None:
    """Entity rows read from the caller's files: when reading them fails with an OSError (a file gone), the caller
    gets that error, as it gets any other error of its stream (tests/test_client_inputs.py), not a server error."""

    def batches() -> Iterator[pa.RecordBatch]:
        yield ENTITIES.to_batches(max_chunksize=2)[0]
        raise FileNotFoundError("entities-part-2.parquet")

    broken = pa.RecordBatchReader.from_batches(ENTITIES.schema, batches())
    with FeatureClient(location) as client, pytest.raises(FileNotFoundError, match="entities-part-2"):
        client.get_historical_features(broken, [f"{features}:rate"])


@pytest.mark.xfail(
    strict=True,
    reason="training/sets.py TrainingSets.open ends its planning `hold` before `in_use.holding` takes the stream's: "
    "in between the server holds none of the training set's snapshots (expiry may delete their files, and "
    "`when_quiet` work starts), unlike Scans.open, which takes `holding` inside its `hold`",
)
def test_a_training_set_holds_its_snapshots_from_planning_to_its_stream_without_a_gap(
    serving: FeatureFlightServer, location: str, features: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SnapshotsInUse.holding says a read's snapshots are never let go between planning and streaming. Watched
    through the real SnapshotsInUse (its `_take` wrapped, not replaced): no moment without a held snapshot before
    the stream's own take."""
    in_use = serving.parts.training.cache.caches.in_use
    events: list[str] = []
    take = in_use._take

    def watched(held: Iterable[tuple[str, int | None]]) -> Callable[[], None]:
        release = take(held)
        events.append("take")

        def released() -> None:
            release()
            if not in_use.busy():
                events.append("idle")

        return released

    with FeatureClient(location) as client:
        at = (BASE + dt.timedelta(hours=1)).isoformat()
        entities: dict[str, list[Any]] = {"driver_id": [1, 2], "event_timestamp": [at, at]}
        info = client.training_set_info(entities, [f"{features}:rate"])
        monkeypatch.setattr(in_use, "_take", watched)
        assert client.read_endpoint(info.endpoints[0]).read_all().num_rows == 2
    last_take = len(events) - 1 - events[::-1].index("take")
    assert "idle" not in events[:last_take], events


@pytest.mark.xfail(
    strict=True,
    reason="client._Sender.finish raises the entity stream's own error only when it is not one of SERVER_ERRORS "
    "(Flight or Arrow errors): a caller's stream failing with an Arrow error (a CSV row that does not parse) "
    "ends the exchange early and the call returns the answer for the rows sent so far, without an error",
)
def test_entity_rows_that_fail_with_an_arrow_error_midway_fail_the_call(location: str, features: str) -> None:
    """A caller's Arrow stream of entity rows (a CSV reader) that fails partway: the call raises that error, as it
    does for any other error of the stream, rather than answer for part of the rows."""
    good = ENTITIES.to_batches(max_chunksize=2)[0]

    def batches() -> Iterator[pa.RecordBatch]:
        yield good
        raise pa.ArrowInvalid("CSV parse error: expected 2 columns, got 3")

    broken = pa.RecordBatchReader.from_batches(ENTITIES.schema, batches())
    with FeatureClient(location) as client, pytest.raises(pa.ArrowInvalid, match="CSV parse error"):
        answer = client.get_historical_features(broken, [f"{features}:rate"])
        print("answered", answer.num_rows, "rows for", good.num_rows, "sent")
