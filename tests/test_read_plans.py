"""`ReadPlan.batches` (flight_client/plans.py), which DataLoader workers and Ray tasks read their parts with:
parts read two at a time over one connection, their batches taken in turn, give every part's batches in order
(the order of a plain sequential model of the turns), survive a server whose idle watch cuts any call left
unread while their consumer is slow, and a reader that stops early leaves nothing behind."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flight_client import FeatureClient
from flight_client.plans import Endpoint, EntityRows, PartReader, ReadPlan, in_turn, plan_table, plan_training_set
from flight_server.transport.service import FeatureFlightServer
from tests.conftest import sqlite_catalog, start_server, wait_until
from tests.feature_sets import TRIPS, write_training_set

T = TypeVar("T")


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


def turns(parts: list[list[T]], at_once: int) -> list[T]:
    """The plain model: `at_once` parts open, one item from each in turn, an ended part replaced by the next."""
    out: list[T] = []
    waiting = [list(p) for p in parts]
    turn: list[list[T]] = []
    while waiting or turn:
        while waiting and len(turn) < at_once:
            turn.append(waiting.pop(0))
        part = turn.pop(0)
        if part:
            out.append(part.pop(0))
            turn.append(part)
    return out


def test_parts_read_in_turn_give_each_parts_batches_in_order(plans: tuple[ReadPlan, ReadPlan]) -> None:
    on_server, local = plans
    mixed = ReadPlan(on_server.location, on_server.schema, on_server.endpoints + local.endpoints[1:2])
    mixed = ReadPlan(**{**mixed.__dict__, "exchange": local.exchange})
    for plan in (on_server, local, mixed):
        each = [list(plan.batches([part])) for part in plan.endpoints]
        for at_once in (1, 2, 3):
            got = list(plan.batches(plan.endpoints, at_once))
            expected = turns(each, at_once)
            assert len(got) == len(expected)
            assert all(a.equals(b) for a, b in zip(got, expected, strict=True))
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


@given(st.lists(st.lists(st.integers(), max_size=6), max_size=6), st.integers(1, 4))
def test_in_turn_equals_the_sequential_model(parts: list[list[int]], at_once: int) -> None:
    readers: list[PartReader[int]] = [lambda opened, p=p: iter(p) for p in parts]
    assert list(in_turn(readers, at_once)) == turns(parts, at_once)


def test_a_failing_part_fails_the_read() -> None:
    def failing() -> Iterator[int]:
        yield 1
        raise RuntimeError("part 2 broke")

    with pytest.raises(RuntimeError, match="part 2 broke"):
        list(in_turn([lambda opened: iter(range(10)), lambda opened: failing(), lambda opened: iter(range(10))], 2))
    with pytest.raises(ValueError, match="at_once"):
        next(ReadPlan("grpc://127.0.0.1:1", pa.schema([]), ()).batches([], at_once=0))


class Stalling(flight.FlightServerBase):
    """A Flight server whose "stalls" part sends one batch and then computes its next until `release` is set, and
    whose "fails" part fails after its first batch: a server busy on a part for as long as a test needs, which
    the real server gives on no cue."""

    SCHEMA = pa.schema([("x", pa.int64())])

    def __init__(self) -> None:
        super().__init__("grpc://127.0.0.1:0")
        self.release = threading.Event()

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        kind = ticket.ticket.decode()

        def batches() -> Iterator[pa.RecordBatch]:
            for i in range(3):
                yield pa.record_batch([pa.array([i])], schema=self.SCHEMA)
                if kind == "stalls":
                    self.release.wait()
                elif kind == "fails":
                    raise flight.FlightServerError("part failed mid-read")

        return flight.GeneratorStream(self.SCHEMA, batches())


@pytest.fixture
def stalling() -> Iterator[Stalling]:
    server = Stalling()
    threading.Thread(target=server.serve, daemon=True).start()
    with flight.FlightClient(f"grpc://127.0.0.1:{server.port}") as probe:
        # Answering before the test starts: under load (two test processes) a first read here was once refused
        # ("connection refused"), which no later call of the test saw.
        wait_until(lambda: _answers(probe), what="the stalling server")
    yield server
    server.release.set()
    server.shutdown()


def _answers(client: flight.FlightClient) -> bool:
    try:
        list(client.list_flights())
    except flight.FlightUnavailableError:
        return False
    except pa.ArrowException:  # it answered (it lists nothing: not implemented)
        pass
    return True


def _within(seconds: float, call: Callable[[], object]) -> bool:
    """Whether `call` returned within `seconds` (a thread runs it; one that hangs is left to the fixture's end)."""
    done = threading.Thread(target=call, daemon=True)
    done.start()
    done.join(seconds)
    return not done.is_alive()


def test_leaving_early_cancels_a_part_the_server_is_still_computing(stalling: Stalling) -> None:
    """Closing the read while the server computes the other part's next batch cancels that call: it does not wait
    for the server (which, here, never sends it until the test ends)."""
    location = f"grpc://127.0.0.1:{stalling.port}"
    plan = ReadPlan(location, Stalling.SCHEMA, (Endpoint(b"quick", ()), Endpoint(b"stalls", ())))
    batches = plan.batches(plan.endpoints)
    assert [next(batches).column("x")[0].as_py() for _ in range(3)] == [0, 0, 1]
    assert _within(30, batches.close), "closing waited for the stalled part's server"


def test_a_part_failing_fails_the_read_while_another_part_is_still_computed(stalling: Stalling) -> None:
    location = f"grpc://127.0.0.1:{stalling.port}"
    plan = ReadPlan(location, Stalling.SCHEMA, (Endpoint(b"fails", ()), Endpoint(b"stalls", ())))
    failures: list[BaseException] = []

    def read() -> None:
        try:
            list(plan.batches(plan.endpoints))
        except Exception as exc:
            failures.append(exc)

    assert _within(30, read), "the failure waited for the stalled part's server"
    assert len(failures) == 1 and "part failed mid-read" in str(failures[0])


PART_ROWS = 400_000  # 10 MB a part in 8192-row batches: more than gRPC holds unread, so the server waits on a part
IDLE_SECONDS = 1.5


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FeatureFlightServer]:
    """A server that cuts calls whose client leaves them unread for 1.5 s."""
    tmp: Path = tmp_path_factory.mktemp("plans-idle")
    server = start_server(sqlite_catalog(tmp), idle_timeout_seconds=IDLE_SECONDS, batch_rows=8192)
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def large(idle_server: FeatureFlightServer) -> ReadPlan:
    """A table of 4 writes (a data file each), planned as an endpoint per file."""
    location = f"grpc://127.0.0.1:{idle_server.port}"
    with FeatureClient(location) as client:
        for i in range(4):
            ids = np.arange(i * PART_ROWS, (i + 1) * PART_ROWS)
            stamps = pa.array(np.zeros(PART_ROWS, "int64"), pa.timestamp("us", "UTC"))
            rows = pa.table({"id": ids, "ts": stamps, "value": ids.astype("float64")})
            client.write("plans.big", rows, entity_keys=["id"], event_time="ts")
    # gRPC's flow-control window as it starts (64 KiB), not grown to some 8 MB: the server then waits on a call as
    # soon as its reader stops taking batches, not once 8 MB wait unread (which a reader at a steady 5 MB/s, two
    # calls at a time, would also make it wait over 1.5 s for: docs/operations.md).
    small_window = {"generic_options": [("grpc.http2.bdp_probe", 0)]}
    plan = plan_table(location, "plans.big", partitions=4, client_options=small_window)
    assert len(plan.endpoints) == 4
    return plan


def test_a_slow_reader_of_parts_two_at_a_time_is_not_cut_and_gets_every_row_once(large: ReadPlan) -> None:
    """The consumer takes 0.02 s a batch: 1 s a part alone, 2 s two parts. Taken in turn, each call is read
    every other batch and never waits near the timeout (a part opened ahead and left unread until the one before
    it ended was cut, with the part being read: the reason reads were one at a time before)."""
    ids, parts = [], []
    for batch in large.batches(large.endpoints, at_once=2):
        ids.append(batch.column("id").to_numpy())
        parts.append(ids[-1][0] // PART_ROWS)
        time.sleep(0.02)  # a training step: the behaviour under test
    assert np.array_equal(np.sort(np.concatenate(ids)), np.arange(4 * PART_ROWS)), "every row once"
    assert parts[0] != parts[1] and parts[:2] == parts[2:4], "the first two parts are taken in turn"


def test_leaving_early_stops_every_reader(large: ReadPlan) -> None:
    def readers() -> int:
        return sum(t.name == "flight-part-reader" for t in threading.enumerate())

    batches = large.batches(large.endpoints, at_once=3)
    assert next(batches).num_rows
    assert readers() == 3
    batches.close()
    assert readers() == 0


def test_dataloader_workers_with_a_slow_training_loop_are_not_cut(large: ReadPlan) -> None:
    """The same through a real DataLoader: 2 worker processes, 2 endpoints each read two at a time, a main process
    taking 0.02 s a batch (1 s a worker's endpoint read alone, 2 s with the other worker's between)."""
    torch_data = pytest.importorskip("torch.utils.data")
    from flight_client.torch import FlightDataset

    multiprocessing.set_forkserver_preload(["torch", "flight_client.torch"])
    loader = torch_data.DataLoader(
        FlightDataset(large, format="arrow"), batch_size=None, num_workers=2, multiprocessing_context="forkserver"
    )
    ids = []
    for batch in loader:
        ids.append(batch.column("id").to_numpy())
        time.sleep(0.02)  # a training step: the behaviour under test
    assert np.array_equal(np.sort(np.concatenate(ids)), np.arange(4 * PART_ROWS)), "every row once"
