"""`flight_client.torch.FlightDataset` under a real `DataLoader` with two worker processes, against a
real server process: every row of a scan or a training set exactly once, across workers and ranks."""

from __future__ import annotations

import json
import math
import multiprocessing
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader

from flight_client import FeatureClient
from flight_client.torch import FlightDataset
from tests.conftest import serve_replicas, sqlite_catalog
from tests.feature_sets import SCAN_ROWS, TRIPS, write_scan_table, write_training_set
from tests.services import free_ports
from tests.torch_ranks import read_share

NUMERIC = ["id", "ts", "value", "small", "ratio", "flag", "day"]
TRAINING = ["trip_id", "driver_id", "event_timestamp", "label", "rate"]


@pytest.fixture(scope="module", autouse=True)
def forkserver_preload() -> None:
    """Workers fork from a server process that has imported torch already: they start in a fraction of the time."""
    multiprocessing.set_forkserver_preload(["torch", "flight_client.torch"])


@pytest.fixture(scope="module")
def location(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `flight-server serve` process on a SQLite catalog."""
    tmp: Path = tmp_path_factory.mktemp("torch")
    with serve_replicas(tmp, sqlite_catalog(tmp), count=1) as locations:
        yield locations[0]


@pytest.fixture(scope="module")
def scan_table(location: str) -> str:
    with FeatureClient(location) as client:
        return write_scan_table(client)


@pytest.fixture(scope="module")
def training_set(location: str) -> tuple[str, list[str]]:
    with FeatureClient(location) as client:
        return write_training_set(client)


def rows(batches: list[dict[str, torch.Tensor]], columns: list[str]) -> list[tuple[Any, ...]]:
    """Tensor batches as sorted row tuples (NaN as None, so that rows compare equal)."""
    out: list[tuple[Any, ...]] = []
    for batch in batches:
        values = [batch[c].tolist() for c in columns]
        for row in zip(*values, strict=True):
            out.append(tuple(None if isinstance(v, float) and math.isnan(v) else v for v in row))
    return sorted(out, key=lambda r: r[0])


def arrow_rows(table: pa.Table, columns: list[str]) -> list[tuple[Any, ...]]:
    """The same rows from an Arrow table, with time columns as their integer values."""
    table = table.select(columns)
    cast = {
        f.name: pa.int64() if pa.types.is_timestamp(f.type) else pa.int32() if pa.types.is_date32(f.type) else f.type
        for f in table.schema
    }
    table = table.cast(pa.schema([pa.field(n, t) for n, t in cast.items()]))
    return sorted(zip(*(table.column(c).to_pylist() for c in columns), strict=True), key=lambda r: r[0])


def load(dataset: FlightDataset) -> list[dict[str, torch.Tensor]]:
    """One epoch through two worker processes, started as the dataset needs (not forked)."""
    return list(DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="forkserver"))


def test_dataloader_workers_read_every_row_of_a_scan_once(location: str, scan_table: str) -> None:
    dataset = FlightDataset.table(location, scan_table, columns=NUMERIC, partitions=6, batch_size=500)
    assert len(dataset.plan.endpoints) == 6
    first, second = dataset.endpoints(0, 2), dataset.endpoints(1, 2)
    assert first and second and not set(first) & set(second)
    batches = load(dataset)
    assert all(len(b["id"]) <= 500 for b in batches) and sum(len(b["id"]) == 500 for b in batches) >= len(batches) - 2
    with FeatureClient(location) as client:
        plain = client.read_table(scan_table)
    assert [r[0] for r in rows(batches, NUMERIC)] == list(range(SCAN_ROWS))
    assert rows(batches, NUMERIC) == arrow_rows(plain, NUMERIC)


def test_dataloader_workers_read_every_row_of_a_training_set_once(
    location: str, training_set: tuple[str, list[str]]
) -> None:
    trips, features = training_set
    dataset = FlightDataset.training_set(location, trips, features, columns=TRAINING, partitions=4)
    assert len(dataset.plan.endpoints) == 4
    batches = load(dataset)
    with FeatureClient(location) as client:
        plain = client.get_historical_features(trips, features)
    got = rows(batches, TRAINING)
    assert len(got) == TRIPS and got == arrow_rows(plain, TRAINING)
    assert any(r[-1] is None for r in got), "unknown drivers' rates are NaN"


def test_two_ranks_together_read_every_row_once_in_any_epoch(
    location: str, training_set: tuple[str, list[str]]
) -> None:
    trips, features = training_set
    with pytest.raises(ValueError, match="pin the snapshots with snapshot_ids"):  # each rank would plan alone
        FlightDataset.training_set(location, trips, features, columns=TRAINING, rank=0, world_size=2)
    with FeatureClient(location) as client:
        used = json.loads(client.training_set_info(trips, features).app_metadata)
    pins = {**used["features"], used["entities"]["table"]: used["entities"]["snapshot_id"]}
    ranks = [
        FlightDataset.training_set(
            location,
            trips,
            features,
            columns=TRAINING,
            rank=r,
            world_size=2,
            shuffle_endpoints=True,
            seed=3,
            snapshot_ids=pins,
        )
        for r in range(2)
    ]
    assert len(ranks[0].plan.endpoints) == 16  # 8 per rank by default
    orders = []
    for epoch in (0, 1):
        batches = []
        for dataset in ranks:
            dataset.set_epoch(epoch)
            batches += list(dataset)  # no DataLoader workers: the rank reads its whole share
        assert [r[0] for r in rows(batches, TRAINING)] == list(range(TRIPS))
        orders.append(ranks[0].endpoints(0, 2))
    assert orders[0] != orders[1], "each epoch deals the endpoints anew"


def test_persistent_workers_follow_set_epoch(location: str, scan_table: str) -> None:
    dataset = FlightDataset.table(location, scan_table, columns=["id"], partitions=6, shuffle_endpoints=True)
    loader = DataLoader(
        dataset, batch_size=None, num_workers=2, multiprocessing_context="forkserver", persistent_workers=True
    )
    firsts = []
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        batches = list(loader)
        assert sorted(i for b in batches for i in b["id"].tolist()) == list(range(SCAN_ROWS))
        firsts.append([b["id"][0].item() for b in batches])
    assert firsts[0] != firsts[1], "the workers started in epoch 0 read in epoch 1's order"


def test_ranks_of_a_process_group_share_one_plan(
    location: str, training_set: tuple[str, list[str]], tmp_path: Path
) -> None:
    trips, features = training_set
    init_method = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    args = (init_method, location, trips, features, tmp_path)
    torch.multiprocessing.start_processes(read_share, args, nprocs=2, start_method="forkserver")
    seen = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [(s["rank"], s["world_size"]) for s in seen] == [(0, 2), (1, 2)]
    assert seen[0]["tickets"] == seen[1]["tickets"] and len(seen[0]["tickets"]) == 16
    assert sorted(seen[0]["ids"] + seen[1]["ids"]) == list(range(TRIPS))


def test_tensor_types(location: str, scan_table: str) -> None:
    dataset = FlightDataset.table(location, scan_table, columns=NUMERIC, partitions=1)
    batch = next(iter(dataset))
    dtypes = {name: tensor.dtype for name, tensor in batch.items()}
    assert dtypes == {
        "id": torch.int64,
        "ts": torch.int64,  # microseconds since the epoch, as the column's unit
        "value": torch.float64,
        "small": torch.int32,
        "ratio": torch.float32,
        "flag": torch.bool,
        "day": torch.int32,  # days since the epoch
    }
    assert (batch["ts"] == batch["id"] * 1_000_000).all() and (batch["day"] == batch["id"] % 30).all()

    with pytest.raises(TypeError, match=r"\['name \(string\)'\].*columns=\[\.\.\.\]"):
        FlightDataset.table(location, scan_table)
    with pytest.raises(ValueError, match="'maybe' .* holds nulls"):
        next(iter(FlightDataset.table(location, scan_table, columns=["id", "maybe"])))
    arrow = next(iter(FlightDataset.table(location, scan_table, format="arrow", batch_size=10)))
    assert isinstance(arrow, pa.RecordBatch) and arrow.num_rows == 10 and "name" in arrow.schema.names


def test_forked_workers_are_refused_not_hung(location: str, scan_table: str) -> None:
    dataset = FlightDataset.table(location, scan_table, columns=["id"], partitions=2)
    with pytest.raises(RuntimeError, match="multiprocessing_context='forkserver'"):
        list(DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="fork"))


def test_the_client_imports_neither_torch_nor_ray() -> None:
    code = "import sys, flight_client; assert not {'torch', 'ray'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_local_entity_rows_are_refused(location: str, training_set: tuple[str, list[str]]) -> None:
    _, features = training_set
    entities = pa.table({"driver_id": [1], "event_timestamp": pa.array([0], pa.timestamp("us", "UTC"))})
    with pytest.raises(TypeError, match="write them to a table first"):
        FlightDataset.training_set(location, entities, features)
