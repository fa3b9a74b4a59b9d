"""`flight_client.torch.FlightDataset` under a real `DataLoader` with two worker processes, against a
real server process: every row of a scan or a training set exactly once, across workers and ranks."""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import multiprocessing
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from flight_client import FeatureClient, InvalidRequestError
from flight_client import torch as flight_torch
from flight_client.plans import row_ranges
from flight_client.torch import FlightDataset, shared_tensors, to_tensors
from tests.conftest import serve_replicas, sqlite_catalog
from tests.feature_sets import SCAN_ROWS, T0, TRIPS, write_scan_table, write_training_set
from tests.services import free_ports
from tests.torch_ranks import hold, let_go, read_share, read_with_workers, received

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


def two_ranks(
    location: str, rows: Any, features: list[str], pins: dict[str, int], **options: Any
) -> list[FlightDataset]:
    """Ranks 0 and 1 of two, each planning for itself (the snapshots pinned), endpoints shuffled per epoch."""
    return [
        FlightDataset.training_set(
            location, rows, features, rank=r, world_size=2, snapshot_ids=pins, shuffle_endpoints=True, **options
        )
        for r in range(2)
    ]


def test_two_ranks_together_read_every_row_once_in_any_epoch(
    location: str, training_set: tuple[str, list[str]]
) -> None:
    trips, features = training_set
    with pytest.raises(ValueError, match="pin the snapshots with snapshot_ids"):  # each rank would plan alone
        FlightDataset.training_set(location, trips, features, columns=TRAINING, rank=0, world_size=2)
    with FeatureClient(location) as client:
        used = json.loads(client.training_set_info(trips, features).app_metadata)
    pins = {**used["features"], used["entities"]["table"]: used["entities"]["snapshot_id"]}
    ranks = two_ranks(location, trips, features, pins, columns=TRAINING, seed=3)
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


@pytest.mark.parametrize("source", ["local entity rows", "table scan"])
def test_process_group_ranks_with_dataloader_workers_read_every_row_once(
    location: str,
    scan_table: str,
    training_set: tuple[str, list[str]],
    local_rows: pa.Table,
    source: str,
    tmp_path: Path,
) -> None:
    """Two spawned ranks of a gloo group (rank 0's plan shared), each through a DataLoader with two workers: the
    four workers are dealt disjoint parts, and every row comes once."""
    if source == "table scan":
        what: dict[str, Any] = {"table": scan_table, "id": "id"}
        expected = list(range(SCAN_ROWS))
    else:
        what = {"rows": local_rows.to_pandas(), "features": training_set[1], "id": "trip_id"}
        expected = list(range(TRIPS))
    args = (f"file://{tmp_path / 'group'}", location, what, tmp_path)
    torch.multiprocessing.start_processes(read_with_workers, args, nprocs=2, start_method="spawn")
    seen = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [(s["rank"], s["world_size"]) for s in seen] == [(0, 2), (1, 2)]
    parts = [part for s in seen for worker in s["parts"] for part in worker]
    assert all(worker for s in seen for worker in s["parts"]) and len(parts) == len(set(parts)) == 16
    assert sorted(seen[0]["ids"] + seen[1]["ids"]) == expected


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


@pytest.fixture(scope="module")
def local_rows(location: str, training_set: tuple[str, list[str]]) -> pa.Table:
    """The training set's entity rows, read back to this process and shuffled (ranges then mix keys)."""
    trips, _ = training_set
    with FeatureClient(location) as client:
        table = client.read_table(trips).replace_schema_metadata(None)
    return table.take(np.random.default_rng(5).permutation(table.num_rows))


@pytest.mark.parametrize("kind", ["pandas", "polars", "arrow", "dict"])
def test_dataloader_workers_send_every_local_entity_row_once(
    location: str, training_set: tuple[str, list[str]], local_rows: pa.Table, kind: str
) -> None:
    _, features = training_set
    given: Any = {
        "pandas": lambda: local_rows.to_pandas().set_index("trip_id"),  # a named index is a column again
        "polars": lambda: pl.from_arrow(local_rows),
        "arrow": lambda: local_rows,
        "dict": lambda: local_rows.to_pydict(),
    }[kind]()
    dataset = FlightDataset.training_set(location, given, features, columns=TRAINING, partitions=5, batch_size=300)
    assert [len(e.rows) for e in dataset.plan.endpoints] == [TRIPS // 5] * 5  # type: ignore[union-attr]
    batches = load(dataset)
    with FeatureClient(location) as client:
        plain = client.get_historical_features(entity_df=local_rows, features=features).to_arrow()
    got = rows(batches, TRAINING)
    assert [r[0] for r in got] == list(range(TRIPS)), "each entity row once"
    assert got == arrow_rows(plain, TRAINING)


def test_local_rows_are_dealt_the_same_to_every_rank_and_worker(
    location: str, training_set: tuple[str, list[str]], local_rows: pa.Table
) -> None:
    """Two ranks planning for themselves, two DataLoader workers each: every row once, the same split each run."""
    _, features = training_set
    frame = local_rows.to_pandas()
    with pytest.raises(ValueError, match="pin the snapshots with snapshot_ids"):
        FlightDataset.training_set(location, frame, features, rank=0, world_size=2)
    with FeatureClient(location) as client:
        used = client.get_historical_features(local_rows.slice(0, 1), features).schema.metadata[b"flight.snapshots"]
    pins = json.loads(used)["features"]

    first, again = (two_ranks(location, frame, features, pins, columns=["trip_id"], seed=1) for _ in range(2))
    assert len(first[0].plan.endpoints) == 16  # 8 per rank by default
    for dataset in first + again:
        dataset.set_epoch(1)
    shares = [[[e.start for e in d.endpoints(w, 2)] for w in range(2)] for d in first]  # type: ignore[union-attr]
    assert shares == [[[e.start for e in d.endpoints(w, 2)] for w in range(2)] for d in again]  # type: ignore[union-attr]
    ids = [i for dataset in first for batch in load(dataset) for i in batch["trip_id"].tolist()]
    assert sorted(ids) == list(range(TRIPS))


def test_local_rows_read_the_snapshots_planned(location: str, local_rows: pa.Table) -> None:
    """A write after planning changes nothing: every range pins the snapshots the plan resolved."""
    with FeatureClient(location) as client:
        trips, features = write_training_set(client)
        dataset = FlightDataset.training_set(location, local_rows, features, columns=["trip_id", "rate"], partitions=3)
        before = rows(load(dataset), ["trip_id", "rate"])
        drivers = features[0].partition(":")[0]
        later = pa.table(
            {
                "driver_id": pa.array(range(200), pa.int64()),
                "event_timestamp": pa.array([T0 + dt.timedelta(hours=1)] * 200, pa.timestamp("us", "UTC")),
                "rate": pa.array([1000.0] * 200),
            }
        )
        client.write(drivers, later)
        after = rows(load(dataset), ["trip_id", "rate"])
        fresh = client.get_historical_features(local_rows, features).column("rate").to_pylist()
    assert after == before
    assert 1000.0 in fresh, "the write did change what a new plan reads"


def test_local_entity_rows_bad_input(location: str, training_set: tuple[str, list[str]]) -> None:
    trips, features = training_set
    entities = {"driver_id": [1.0, None], "event_timestamp": pa.array([0, 0], pa.timestamp("us", "UTC"))}
    with pytest.raises(InvalidRequestError, match="'driver_id' has nulls"):
        FlightDataset.training_set(location, entities, features)
    good = {"driver_id": [1], "event_timestamp": pa.array([0], pa.timestamp("us", "UTC"))}
    with pytest.raises(ValueError, match="filter local entity rows first"):
        FlightDataset.training_set(location, good, features, entity_filter="driver_id > 0")
    with pytest.raises(ValueError, match="partitions must be at least 1"):
        FlightDataset.training_set(location, good, features, partitions=-1)
    with pytest.raises(InvalidRequestError, match="no timestamp column 'ts'"):
        FlightDataset.training_set(location, good, features, entity_time="ts")


@given(rows=st.integers(0, 10_000), parts=st.integers(1, 64))
def test_row_ranges_cover_every_row_once(rows: int, parts: int) -> None:
    ranges = row_ranges(rows, parts)
    assert [i for start, stop in ranges for i in range(start, stop)] == list(range(rows))
    sizes = [stop - start for start, stop in ranges]
    assert len(ranges) == min(rows, parts) and (not sizes or max(sizes) - min(sizes) <= 1)


NUMERIC_TYPES = [pa.int8(), pa.int32(), pa.int64(), pa.uint16(), pa.float32(), pa.float64(), pa.bool_()]
TIME_TYPES = [pa.timestamp("us", "UTC"), pa.timestamp("ns"), pa.date32(), pa.time64("us"), pa.duration("ms")]


@given(
    kind=st.sampled_from(NUMERIC_TYPES + TIME_TYPES),
    values=st.lists(st.one_of(st.none(), st.integers(0, 100)), max_size=40),
    start=st.integers(0, 40),
)
def test_tensors_equal_pyarrows_own_conversion(kind: pa.DataType, values: list[int | None], start: int) -> None:
    """`to_tensors` reads the buffers itself (pyarrow's to_numpy imports pandas): same values as to_numpy,
    for any type, offset (a sliced batch) and nulls (NaN in floats); `shared_tensors` (DataLoader workers) the
    same, every column a view of one shared block (after a one-byte column: aligned all the same)."""
    floating = pa.types.is_floating(kind)
    if not floating:
        values = [0 if v is None else v for v in values]
    source = [v if v is None or not pa.types.is_boolean(kind) else v % 2 == 1 for v in values]
    integers = pa.int32() if kind == pa.date32() else pa.int64()
    column = pa.array(source, integers).view(kind) if kind in TIME_TYPES else pa.array(source, kind)
    batch = pa.record_batch({"b": pa.array([7] * len(values), pa.int8()), "c": column}).slice(min(start, len(values)))
    got = to_tensors(batch)["c"].numpy()
    shared = shared_tensors(batch)
    assert shared["c"].is_shared() and shared["c"].untyped_storage() is shared["b"].untyped_storage()
    assert np.array_equal(shared["c"].numpy(), got, equal_nan=floating) and (shared["b"] == 7).all()
    reference = batch.column("c")
    if kind in TIME_TYPES:
        reference = reference.view(integers)
    expected = reference.to_numpy(zero_copy_only=False)
    assert got.dtype == expected.dtype and np.array_equal(got, expected, equal_nan=floating)


def test_a_shared_batch_goes_to_another_process_as_one_block() -> None:
    """A worker's batch is pickled as its one shared block (one file descriptor, not one per column) and arrives
    as a plain dict of the same tensors, views of one block; a batch whose tensor was replaced goes as torch
    sends it. Through the pickler DataLoader queues use, to a process of its own."""
    batch = pa.record_batch(
        {
            "b": pa.array([True, False, True]),
            "x": pa.array([1.5, None, 3.0]),
            "n": pa.array([7, 8, 9], pa.int16()),
            "t": pa.array([1, 2, 3], pa.timestamp("us", "UTC")),
        }
    ).slice(1)
    tensors = shared_tensors(batch)
    expected = {k: t.tolist() for k, t in to_tensors(batch).items()}
    types = {k: str(t.dtype) for k, t in tensors.items()}
    # The pool sends arguments through the same pickler, the receiver fetching the block's file descriptor back.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert str(pool.submit(received, tensors).result()) == str(("dict", 1, expected, types))  # NaN: as text
        assert type(copy.copy(tensors)) is type(tensors)  # what DataLoader's default_convert does to it
        tensors["x"] = torch.tensor([0.5, 0.25], dtype=torch.float64)  # no longer a view of the block
        assert pool.submit(received, tensors).result() == ("dict", 2, {**expected, "x": [0.5, 0.25]}, types)
        again = shared_tensors(batch)
        again["pairs"] = again["n"].view(-1, 2)  # a view of the block, but not 1-D: sent as torch sends it
        kind, storages, values, _ = pool.submit(received, again).result()
        assert (kind, storages, values["pairs"]) == ("dict", 1, [[8, 9]])


def test_a_block_is_reused_once_its_receiver_lets_go_of_every_view() -> None:
    """A new shared block costs a page fault per page: a worker reuses the block of a batch the main process
    has dropped, never one of which it still holds a view (a slice of one tensor is enough), nor one it has
    not received yet."""
    batch = pa.record_batch({"x": pa.array([1.5, 2.5, 3.5]), "n": pa.array([1, 2, 3], pa.int16())})

    def block(tensors: dict[str, torch.Tensor]) -> int:
        return tensors["x"].untyped_storage().data_ptr()

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        first = shared_tensors(batch)
        assert pool.submit(received, first).result()[1] == 1
        pool.submit(let_go).result()  # the pool's process drops a call's arguments after sending its result
        unsent = shared_tensors(batch)  # the first is free again (the receiver dropped it), this one taken
        assert block(unsent) == block(first)
        held = shared_tensors(batch)
        assert block(held) != block(first)
        assert pool.submit(hold, held).result() == [2.5, 3.5]  # the receiver keeps a slice of "x"
        other = shared_tensors(batch)
        assert block(other) not in (block(first), block(held)), "busy blocks are not reused"
        other["x"][0] = 9.0
        assert pool.submit(hold, held).result() == [2.5, 3.5], "a held block keeps its values"
        pool.submit(let_go).result()
        again = shared_tensors(batch)
        assert block(again) == block(held) and again["x"].tolist() == [1.5, 2.5, 3.5]
    # A copy unpickled in the sending process itself, dropped, leaves the block busy: the sender's views live on.
    copied = ForkingPickler.loads(ForkingPickler.dumps(again))
    assert block(copied) == block(again)
    del copied
    assert block(shared_tensors(batch)) != block(again)


def mappings() -> dict[int, tuple[int, int]]:
    """This process's mapped files: inode to the address range of a mapping of it."""
    found = {}
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, _, _, _, inode, *_ = line.split()
        start, end = (int(x, 16) for x in span.split("-"))
        found[int(inode)] = (start, end)
    return found


def block_file(tensor: torch.Tensor) -> int:
    """The inode of the shared-memory file whose mapping in this process holds `tensor`'s data."""
    at = tensor.untyped_storage().data_ptr()
    return next(inode for inode, (start, end) in mappings().items() if start <= at < end)


def test_workers_started_per_epoch_write_into_the_blocks_of_the_epoch_before(location: str, scan_table: str) -> None:
    """Workers started for an epoch (the DataLoader's default) are handed the shared blocks the main process
    received before, of any dataset: a new block's pages cost 3 times the time to write. Every row once all the
    same, and a batch the main process still holds keeps its values while the next epoch's workers write (they
    take other blocks)."""

    def epoch(held: list[dict[str, torch.Tensor]] | None = None) -> tuple[list[int], set[int]]:
        dataset = FlightDataset.table(location, scan_table, columns=NUMERIC, partitions=4, batch_size=500)
        ids, files = [], set()
        for batch in load_lazily(dataset):
            ids += batch["id"].tolist()
            files.add(block_file(batch["id"]))
            if held is not None:
                held.append(batch)
        return sorted(ids), files

    first, _ = epoch()
    assert first == list(range(SCAN_ROWS))
    mapped = set(mappings())  # the blocks received so far among them, kept mapped
    again, used = epoch()
    assert again == first and used <= mapped, "the second epoch's workers wrote into blocks received before only"
    held: list[dict[str, torch.Tensor]] = []
    _, busy = epoch(held)  # every batch held: the next workers must take other blocks
    kept = [{k: t.numpy().tobytes() for k, t in b.items()} for b in held]
    ids, files = epoch()
    assert ids == first and not files & busy
    assert [{k: t.numpy().tobytes() for k, t in b.items()} for b in held] == kept, "held batches keep their values"


def test_a_worker_killed_holding_the_blocks_lock_leaves_the_next_workers_a_pool_of_their_own(
    location: str, scan_table: str
) -> None:
    """Workers take a block under a lock all of them share: if one is killed holding it (a DataLoader terminates
    workers that do not stop in time), the next workers get a new pool and lock, and no block of the old one."""
    dataset = FlightDataset.table(location, scan_table, columns=["id"], partitions=4, batch_size=500)
    assert sorted(i for b in load(dataset) for i in b["id"].tolist()) == list(range(SCAN_ROWS))
    stuck = flight_torch._POOL
    assert stuck is not None and stuck.blocks()
    stuck.lock.acquire()  # as a worker killed while it held the lock
    try:
        mapped = set(mappings())
        dataset.set_epoch(1)
        batches = load(dataset)
        assert sorted(i for b in batches for i in b["id"].tolist()) == list(range(SCAN_ROWS))
        assert flight_torch._POOL is not stuck and not {block_file(b["id"]) for b in batches} & mapped
    finally:
        stuck.lock.release()


def load_lazily(dataset: FlightDataset) -> Iterator[dict[str, torch.Tensor]]:
    """`load`, each batch handed on as it comes (the caller decides which it keeps)."""
    yield from DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="forkserver")


def test_tensors_import_no_pandas() -> None:
    """pandas costs each new DataLoader worker a second or more to import: the worker path must not."""
    code = (
        "import sys, numpy as np, pyarrow as pa; from flight_client.torch import to_tensors\n"
        "data = [pa.py_buffer(np.packbits([1, 0], bitorder='little')), pa.py_buffer(np.array([1.0, 2.0]))]\n"
        "batch = pa.RecordBatch.from_arrays([pa.Array.from_buffers(pa.float64(), 2, data)], ['x'])\n"
        "assert 'pandas' not in sys.modules\n"
        "assert to_tensors(batch)['x'][1].isnan() and 'pandas' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.timeout(120)
def test_a_range_left_early_cancels_its_exchange(location: str, training_set: tuple[str, list[str]]) -> None:
    """A worker that stops reading a range (an epoch cut short) ends the call instead of hanging on it."""
    _, features = training_set
    with FeatureClient(location) as client:
        entities = client.read_table(training_set[0])
        many = pa.concat_tables([entities] * 60)  # more than the connection's windows hold, both ways
        stream = client.iter_historical_features(many, features)
        assert next(stream).num_rows
        stream.close()
        again = client.get_historical_features(entities, features)
    assert again.num_rows == TRIPS
