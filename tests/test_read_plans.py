"""`ReadPlan.batches` (flight_client/plans.py), which DataLoader workers and Ray tasks read their parts with:
parts read one after the other over one connection give every part's batches in order, and a reader that
stops early leaves nothing behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from flight_client import FeatureClient
from flight_client.plans import EntityRows, ReadPlan, plan_training_set
from flight_server.transport.service import FeatureFlightServer
from tests.conftest import sqlite_catalog, start_server, wait_until
from tests.feature_sets import TRIPS, write_training_set


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FeatureFlightServer]:
    server = start_server(sqlite_catalog(Path(tmp_path_factory.mktemp("plans"))), batch_rows=300)  # several a part
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def written(server: FeatureFlightServer) -> tuple[str, list[str]]:
    with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
        return write_training_set(client)


@pytest.fixture(scope="module")
def plans(server: FeatureFlightServer, written: tuple[str, list[str]]) -> tuple[ReadPlan, ReadPlan]:
    """A training set over an entity table in 5 endpoints, and over the same rows held locally in 3 ranges."""
    location, (trips, features) = f"grpc://127.0.0.1:{server.port}", written
    with FeatureClient(location) as client:
        rows = client.read_table(trips).replace_schema_metadata(None)
    return (
        plan_training_set(location, trips, features, partitions=5),
        plan_training_set(location, rows, features, partitions=3),
    )


def read(plan: ReadPlan) -> list[pa.RecordBatch]:
    return list(plan.batches(plan.endpoints))


def test_parts_read_in_turn_give_each_parts_batches_in_order(plans: tuple[ReadPlan, ReadPlan]) -> None:
    on_server, local = plans
    mixed = ReadPlan(on_server.location, on_server.schema, on_server.endpoints + local.endpoints[1:2])
    mixed = ReadPlan(**{**mixed.__dict__, "exchange": local.exchange})
    for plan in (on_server, local, mixed):
        one_by_one = [b for part in plan.endpoints for b in plan.batches([part])]
        got = read(plan)
        assert len(got) == len(one_by_one)
        assert all(a.equals(b) for a, b in zip(got, one_by_one, strict=True))
    assert sum(b.num_rows for b in read(on_server)) == TRIPS
    assert len(read(on_server)) > len(on_server.endpoints)  # several batches a part
    assert sum(b.num_rows for b in read(local)) == TRIPS
    assert isinstance(local.endpoints[0], EntityRows)


@pytest.mark.timeout(60)
def test_a_reader_that_stops_early_ends_the_endpoints_it_opened(
    server: FeatureFlightServer, written: tuple[str, list[str]], plans: tuple[ReadPlan, ReadPlan]
) -> None:
    on_server, _ = plans
    entities = str(server.parts.catalog.load(written[0]).metadata.table_uuid)
    in_use = server.parts.caches.in_use  # the snapshots the server's running reads hold
    batches = on_server.batches(on_server.endpoints)
    next(batches)
    batches.close()  # the endpoint being read is open: the connection goes, and its stream with it
    wait_until(lambda: not in_use.snapshots(entities), what="the server to end the streams")
    assert read(on_server)[0].equals(next(on_server.batches(on_server.endpoints)))
