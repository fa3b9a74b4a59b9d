"""A training job's epochs while its tables and servers churn (review 33): PyTorch DataLoader workers
(`FlightDataset`, 2 persistent workers) read a planned scan epoch after epoch against real replica processes while
puts land (group commits), rows are deleted (merge-on-read and copy-on-write), the table is overwritten, and
maintenance compacts and expires snapshots; while a replica is stopped (SIGTERM) or killed (SIGKILL); while the
PostgreSQL catalog refuses connections; and Ray Data's reads under the same churn. Every epoch must give exactly
the rows of the pinned snapshot as pyiceberg reads them, none twice; what cannot be read must fail with a clear
error of the right kind (docs/integrations.md, "Long training jobs"). Also here: which replica's expiry keeps a
snapshot a read streams, a training set's entity snapshot kept for the next epoch, and a delete planned on a
snapshot another replica expired."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import sqlalchemy
import torch
from pyiceberg.catalog import load_catalog
from torch.utils.data import DataLoader

from flight_client import ConflictError, FeatureClient, NotFoundError, UnavailableError
from flight_client.plans import Endpoint, ReadPlan, plan_table
from flight_client.torch import FlightDataset
from flight_server.changes import group, writes
from flight_server.iceberg.catalog import FeatureCatalog
from flight_server.reads import inuse
from tests import ray_driver
from tests.conftest import replica_processes, sqlite_catalog, two_replicas, wait_until
from tests.feature_sets import TRIPS, write_training_set
from tests.services import postgres_server
from tests.test_outages import admin, refuse_connections, sql_catalog

TIME = pa.timestamp("us", "UTC")
PLAIN = pa.schema([("id", pa.int64()), ("value", pa.float64())])  # as the loader's batches come
# gRPC's flow-control window left at its 64 KiB, not grown to what a fast reader takes (its BDP probe): a call's
# server then streams no further ahead of its reader than that, whatever the timing, and a test can stop a server
# or expire a snapshot while a call is surely open.
SMALL_WINDOW = {"generic_options": [("grpc.http2.bdp_probe", 0)]}
SHORT_EXPIRY = {  # every snapshot but the newest expires at the next round; small files compact at once
    "history.expire.max-snapshot-age-ms": "1",
    "history.expire.min-snapshots-to-keep": "1",
    "flight.maintenance.max-snapshots-min-age-ms": "1",
    "flight.maintenance.compact-min-files": "2",
}


@pytest.fixture(scope="module", autouse=True)
def forkserver_preload() -> None:
    multiprocessing.set_forkserver_preload(["torch", "flight_client.torch"])


def rows(start: int, stop: int, value: float = 0.0) -> pa.Table:
    ids = np.arange(start, stop)
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "ts": pa.array((ids * 1_000_000).astype("datetime64[us]")).cast(TIME),
            "value": pa.array(ids / 4 + value, pa.float64()),
        }
    )


def replicas_of(**settings: str) -> Any:
    """A replica's settings: each advertises itself and names the other as its peer, so the endpoints of a split
    read name both, in turn."""

    def of(location: str, locations: list[str]) -> dict[str, str]:
        peers = " ".join(other for other in locations if other != location)
        return {"FLIGHT_SERVER_ADVERTISE": location, "FLIGHT_SERVER_PEERS": peers, **settings}

    return of


def set_properties(properties: dict[str, str], table: str, values: dict[str, str]) -> None:
    with FeatureCatalog("default", properties).load(table).transaction() as transaction:
        transaction.set_properties(values)


def reference(properties: dict[str, str], table: str, snapshot_id: int) -> pa.Table:
    """The snapshot's rows (id, value) as pyiceberg reads them (its delete files applied), by id."""
    read = load_catalog("default", **properties).load_table(table).scan(snapshot_id=snapshot_id).to_arrow()
    return read.select(["id", "value"]).cast(PLAIN).sort_by("id")


def arrow(batch: dict[str, torch.Tensor]) -> pa.Table:
    """A batch's tensors as a table of their own (a copy: the views' shared block goes back to its worker)."""
    return pa.table({name: np.array(batch[name].numpy()) for name in ("id", "value")})


def read_once(got: pa.Table, expected: pa.Table, whole: bool = True) -> None:
    """`got` holds no row twice, and its rows are exactly `expected`'s (`whole`), or some of them."""
    assert pc.count_distinct(got["id"]).as_py() == got.num_rows, "a row came twice"
    if whole:
        assert got.sort_by("id").equals(expected)
    else:
        at = pc.index_in(got["id"], expected["id"])
        assert got.num_rows and at.null_count == 0
        assert expected["value"].take(at).equals(got["value"])


def loader(dataset: FlightDataset) -> DataLoader[Any]:
    return DataLoader(
        dataset, batch_size=None, num_workers=2, multiprocessing_context="forkserver", persistent_workers=True
    )


def epoch(
    batches: Iterator[dict[str, torch.Tensor]],
    after_first: Any = None,
    into: list[pa.Table] | None = None,
    batches_first: int = 1,
) -> pa.Table:
    """One epoch's rows in the order the loader gave them; `after_first()` runs once the first `batches_first`
    batches are in, before the rest is read (the DataLoader gives its workers' batches in turn: the second comes
    from the second worker, whose calls are then open). `into` gets each batch as it comes (for an epoch that
    fails)."""
    got: list[pa.Table] = [] if into is None else into
    for batch in batches:
        got.append(arrow(batch))
        if len(got) == batches_first and after_first is not None:
            after_first()
    return pa.concat_tables(got)


def log_tails(folder: Path, lines: int = 40) -> str:
    """The last lines of the replicas' logs in `folder` (`replica_processes` writes them there): why a call failed."""
    return "\n".join(
        f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        for log in sorted(folder.glob("replica-*.log"))
    )


def snapshots(client: FeatureClient, table: str) -> set[int]:
    return {s["snapshot_id"] for s in client.describe(table)["snapshots"]}


class Churn:
    """Changes to a table through both replicas, a cycle after another until stopped: two puts at once (one group
    commit, or two), a maintenance round at each replica (which compacts and expires; automatic rounds run beside
    them), a merge-on-read delete, a copy-on-write delete and an overwrite. `cycles` counts the cycles done."""

    def __init__(self, locations: list[str], table: str):
        self.locations, self.table = locations, table
        self.cycles = 0
        self.expired = 0
        self.step = ""  # what it was doing last (where its error came from)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="churn")

    def __enter__(self) -> Churn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)

    def wait_for_cycle(self) -> None:
        """Until one more whole cycle is done (or the churn failed: the test says why)."""
        done = self.cycles
        wait_until(lambda: self.cycles > done or self.error is not None, timeout=120, what="a cycle of churn")
        assert self.error is None, f"{self.error!r} at {self.step}"

    def _run(self) -> None:
        clients = [FeatureClient(location) for location in self.locations]
        try:
            base = 100_000
            while not self._stop.is_set():
                writer = clients[self.cycles % 2]  # two puts at once through one replica: a group commit, or two
                self.step = f"cycle {self.cycles}: puts through replica {self.cycles % 2}"
                with ThreadPoolExecutor(2) as pool:
                    for put in [
                        pool.submit(writer.write, self.table, rows(base + i * 50, base + i * 50 + 50)) for i in (0, 1)
                    ]:
                        put.result()
                for i, client in enumerate(clients):  # the puts' files beside the last overwrite's: some to compact
                    self.step = f"cycle {self.cycles}: maintenance at replica {i}"
                    done = client.run_maintenance(self.table)
                    assert done["error"] is None, done
                    self.expired += done["snapshots_expired"]
                self.step = f"cycle {self.cycles}: deletes and an overwrite"
                with contextlib.suppress(ConflictError):  # lost a race with a compaction: a pipeline retries
                    clients[0].delete(self.table, keys={"id": [base]}, mode="merge-on-read")
                with contextlib.suppress(ConflictError):
                    clients[1].delete(self.table, filter=f"id = {base + 1}", mode="copy-on-write")
                with contextlib.suppress(ConflictError):
                    writer.write(self.table, rows(base, base + 20, 1.0), mode="overwrite")
                base += 1_000
                self.cycles += 1
        except BaseException as exc:
            self.error = exc
        finally:
            for client in clients:
                client.close()


def test_epochs_under_churn_read_their_pinned_snapshot_identically(tmp_path: Path) -> None:
    """Three epochs of a pinned scan over two replicas, a whole cycle of churn (puts, deletes of both kinds, an
    overwrite, compaction and expiry by hand and automatic) while each epoch's streams are open: each epoch gives
    exactly the pinned snapshot's rows as pyiceberg reads them (its merge-on-read delete applied), none twice.
    Expiry did expire the table's other snapshots meanwhile; the pin kept this one."""
    properties = sqlite_catalog(tmp_path)
    automatic = replicas_of(
        FLIGHT_SERVER_AUTO_MAINTENANCE="true",
        FLIGHT_SERVER_MAINTENANCE_INTERVAL_SECONDS="0.3",
        FLIGHT_SERVER_BATCH_ROWS="500",
    )
    table = f"churn.t_{uuid.uuid4().hex[:8]}"
    with replica_processes(tmp_path, properties, automatic) as replicas:
        locations = [location for location, _ in replicas]
        with FeatureClient(locations[0]) as client:
            for start in range(0, 8_000, 2_000):
                client.write(table, rows(start, start + 2_000), entity_keys=["id"], event_time="ts")
            set_properties(properties, table, SHORT_EXPIRY)
            client.delete(table, keys={"id": list(range(0, 40, 3))}, mode="merge-on-read")
            pinned = client.describe(table)["current_snapshot_id"]
            client.pin(table, pinned, name="job")
            expected = reference(properties, table, pinned)
            assert expected.num_rows == 8_000 - 14

            dataset = FlightDataset.table(
                locations[0], table, columns=["id", "value"], snapshot_id=pinned, partitions=4, batch_size=700
            )
            assert {e.locations[0] for e in dataset.plan.endpoints if isinstance(e, Endpoint)} == set(locations)
            batches = loader(dataset)
            with Churn(locations, table) as churn:
                for _ in range(3):
                    read_once(epoch(iter(batches), after_first=churn.wait_for_cycle), expected)
            assert churn.error is None, f"{churn.error!r} at {churn.step}\n{log_tails(tmp_path)}"
            described = client.describe(table)  # compactions and expiries, automatic or not, happened
            assert described["last_compaction"] is not None and described["last_expiry"] is not None, described
            assert churn.expired > 0
            assert pinned in snapshots(client, table)


def test_a_read_keeps_its_snapshot_at_its_own_replica_only_and_an_expired_one_fails_not_found(tmp_path: Path) -> None:
    """A snapshot is kept from expiry while a read streams from it, at the replica that streams it (here not the
    one that planned it), and only there: the other replica's round expires it. A ticket of an expired snapshot
    then fails the DataLoader's epoch with `NotFoundError`, code NOT_FOUND (rebuilt by PyTorch in the main process
    from its message alone, it said INTERNAL), its message saying that the snapshot was expired and to pin it."""
    properties = sqlite_catalog(tmp_path)
    manual = replicas_of(FLIGHT_SERVER_AUTO_MAINTENANCE="false", FLIGHT_SERVER_BATCH_ROWS="500")
    table = f"churn.t_{uuid.uuid4().hex[:8]}"
    with replica_processes(tmp_path, properties, manual) as replicas:
        (planner, _), (streamer, _) = replicas
        with FeatureClient(planner) as a, FeatureClient(streamer) as b:
            for start in range(0, 200_000, 100_000):  # parts of 2.4 MB, far more than a call's window
                a.write(table, rows(start, start + 100_000), entity_keys=["id"], event_time="ts", partition_by=[])
            set_properties(properties, table, SHORT_EXPIRY)
            planned = a.describe(table)["current_snapshot_id"]
            expected = reference(properties, table, planned)
            dataset = FlightDataset.table(planner, table, partitions=2)
            assert len(dataset.plan.endpoints) == 2
            # One part read at the other replica, as a worker does (its first batch in, its call open).
            part = dataset.plan.endpoints[0]
            assert isinstance(part, Endpoint)
            at_b = ReadPlan(
                streamer,
                dataset.plan.schema,
                (Endpoint(part.ticket, (streamer,)),),
                None,
                ("id", "value"),
                SMALL_WINDOW,
            )
            reading = at_b.batches(at_b.endpoints)
            got = [pa.Table.from_batches([next(reading)])]
            a.write(table, rows(10_000, 10_001))  # the planned snapshot is no longer the newest

            kept = b.run_maintenance(table)  # where it streams: kept
            assert kept["kept_in_use"] == 1 and planned in snapshots(a, table), kept
            expired = a.run_maintenance(table)  # where it was planned, nothing reads it now: expired
            assert expired["snapshots_expired"] >= 1 and planned not in snapshots(a, table), expired

            got.extend(pa.Table.from_batches([batch]) for batch in reading)  # the call goes on (files open on disk)
            read_once(pa.concat_tables(got), expected, whole=False)

            with pytest.raises(NotFoundError) as raised:
                epoch(iter(loader(dataset)))
            assert raised.value.code == "NOT_FOUND"
            assert f"has no snapshot {planned}" in str(raised.value) and "expired" in str(raised.value)
            assert "FeatureClient.pin" in str(raised.value)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_replica_stopped_mid_epoch(tmp_path: Path, stop: signal.Signals) -> None:
    """One of two replicas stops in the middle of an epoch, the workers' calls open at both. SIGTERM: the replica
    finishes the calls it runs and refuses new ones, which the workers open at the other: the epoch completes,
    identical. SIGKILL: a part that had handed out rows fails with `UnavailableError` (code UNAVAILABLE), and is
    not read again into the same epoch: no row comes twice. Either way, the next epochs (with and without
    retry_seconds) read everything at the replica left, identical."""
    properties = sqlite_catalog(tmp_path)
    manual = replicas_of(FLIGHT_SERVER_AUTO_MAINTENANCE="false", FLIGHT_SERVER_BATCH_ROWS="1000")
    table = f"churn.t_{uuid.uuid4().hex[:8]}"
    with replica_processes(tmp_path, properties, manual) as replicas:
        (a, _), (b, doomed) = replicas
        with FeatureClient(a) as client:
            for start in range(0, 400_000, 100_000):  # a file and an endpoint each, of 2.4 MB: far more than a window
                client.write(table, rows(start, start + 100_000), entity_keys=["id"], event_time="ts", partition_by=[])
            pinned = client.describe(table)["current_snapshot_id"]
        expected = reference(properties, table, pinned)
        datasets = [
            FlightDataset.table(a, table, snapshot_id=pinned, partitions=4, client_options=options)
            for options in (SMALL_WINDOW, {**SMALL_WINDOW, "retry_seconds": 30})
        ]
        # Endpoints alternate between the replicas: worker 1 reads its two, both first at b, at once.
        assert [e.locations[0] for e in datasets[0].plan.endpoints if isinstance(e, Endpoint)] == [a, b, a, b]

        def kill() -> None:
            os.killpg(doomed.pid, stop)

        got: list[pa.Table] = []
        try:
            epoch(iter(loader(datasets[0])), after_first=kill, into=got, batches_first=2)
        except UnavailableError as error:
            assert error.code == "UNAVAILABLE", error  # rebuilt from its message in the main process
            failed = True
        else:
            failed = False
        doomed.wait(60)
        assert failed == (stop == signal.SIGKILL)
        read_once(pa.concat_tables(got), expected, whole=not failed)
        for dataset in datasets:
            read_once(epoch(iter(loader(dataset))), expected)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    with postgres_server() as url:
        yield url


def test_the_catalog_away_mid_epoch(postgres: str, tmp_path: Path) -> None:
    """The PostgreSQL catalog refuses connections from the middle of an epoch through the next one: with
    retry_seconds both complete, identical (tickets pin their snapshots, read as the replicas last loaded the
    table; a replica that never did answers UNAVAILABLE and the worker goes to the other), and so does the one after
    the catalog is back."""
    name = f"churn_{uuid.uuid4().hex[:12]}"
    with admin(postgres).connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    database = postgres.rsplit("/", 1)[0] + "/" + name
    properties = sql_catalog(database, (tmp_path / "wh").as_uri())
    manual = replicas_of(FLIGHT_SERVER_AUTO_MAINTENANCE="false", FLIGHT_SERVER_BATCH_ROWS="500")
    table = "churn.drivers"
    with replica_processes(tmp_path, properties, manual) as replicas:
        a = replicas[0][0]
        with FeatureClient(a) as client:
            for start in range(0, 8_000, 2_000):
                client.write(table, rows(start, start + 2_000), entity_keys=["id"], event_time="ts")
            client.delete(table, keys={"id": [5, 6, 7]}, mode="merge-on-read")
            pinned = client.describe(table)["current_snapshot_id"]
        expected = reference(properties, table, pinned)
        dataset = FlightDataset.table(
            a, table, columns=["id", "value"], snapshot_id=pinned, partitions=4, client_options={"retry_seconds": 60}
        )
        batches = loader(dataset)
        try:
            first = epoch(iter(batches), after_first=lambda: refuse_connections(database))
            with FeatureClient(a) as client, pytest.raises(UnavailableError):
                client.describe(table)  # the catalog is away indeed
            during = epoch(iter(batches))
        finally:
            refuse_connections(database, refuse=False)
        after = epoch(iter(batches))
        for got in (first, during, after):
            read_once(got, expected)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_memory_of_workers_and_server_stays_flat_over_epochs(tmp_path: Path) -> None:
    """Twelve epochs of a 300,000-row scan (4.8 MB of ids and values) through two persistent workers: once the
    first epoch has filled the caches (the server's plan and file caches, the workers' shared blocks), neither the
    workers nor the server grow by more than a few MB over ten more (a leak of each epoch's rows would be 48 MB).
    Measured: the workers grew by 4-6 MB over the next 8 epochs and then stayed there over 14 more (allocator and
    gRPC arenas), the server by nothing."""
    properties = sqlite_catalog(tmp_path)
    with replica_processes(tmp_path, properties, lambda location, locations: {}, count=1) as [(location, server)]:
        table = "churn.memory"
        with FeatureClient(location) as client:
            for start in range(0, 300_000, 100_000):
                client.write(table, rows(start, start + 100_000), entity_keys=["id"], event_time="ts")
        dataset = FlightDataset.table(location, table, columns=["id", "value"], partitions=4, batch_size=10_000)
        batches = loader(dataset)
        sizes: list[list[int]] = []
        for _ in range(12):
            assert epoch(iter(batches)).num_rows == 300_000
            workers = [w.pid for w in getattr(batches._iterator, "_workers")]  # noqa: B009 (PyTorch's own)
            sizes.append([rss_kib(server.pid), *(rss_kib(pid) for pid in workers)])
        warm, last = sizes[1], sizes[-1]
        growth = [(b - a) // 1024 for a, b in zip(warm, last, strict=True)]
        assert all(mb < 16 for mb in growth), f"MB grown per process (server, workers) from epoch 2 to 12: {growth}"


@pytest.mark.parametrize("mode", ["copy-on-write", "merge-on-read"])
def test_a_delete_planned_on_a_snapshot_another_replica_expired_plans_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A delete through one replica loads the table; before it reads the snapshot's manifests, a put lands and the
    other replica's expiry (short, as a churn test sets it) expires that snapshot and deletes its files. The delete
    plans again on the new snapshot, as after any lost race, and deletes its rows; it failed INTERNAL
    before (DuckDB's `IOException` reading the expired metadata, or pyiceberg's `FileNotFoundError` its
    manifests). Automatic compaction met the same race in the churn above, and failed its round."""
    properties = sqlite_catalog(tmp_path)
    table = "churn.raced"
    with two_replicas(properties) as (a, first, other):
        other.write(table, rows(0, 100), entity_keys=["id"], event_time="ts", partition_by=[])  # a never read it
        set_properties(properties, table, SHORT_EXPIRY)
        load = a.parts.catalog.load
        loads: list[str] = []
        raced: list[dict[str, Any]] = []

        def load_then_race(name: str) -> Any:
            loaded = load(name)
            loads.append(name)
            if len(loads) == 2:  # the table a delete plans on: the other replica expires it
                other.write(table, rows(100, 200))
                raced.append(other.expire_snapshots(table))
            return loaded

        monkeypatch.setattr(a.parts.catalog, "load", load_then_race)
        done = first.delete(table, keys={"id": [1, 150]}, mode=mode)
        assert raced and raced[0]["expired"], raced
        assert done["rows_deleted"] == 2, done
        ids = first.read_table(table).column("id").to_pylist()
        assert sorted(ids) == [i for i in range(200) if i not in (1, 150)]


@pytest.mark.parametrize("store", ["local", "s3"])
@pytest.mark.parametrize("grouped", [True, False], ids=["group-commit", "overwrite"])
def test_a_put_whose_base_snapshot_another_replica_expired_commits_on_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, grouped: bool, store: str
) -> None:
    """A put through one replica is about to commit on the snapshot it loaded; meanwhile another put lands through
    the other replica, whose expiry (short) removes that snapshot and deletes its manifest list. The put commits on
    the new snapshot, as after any lost race, its rows once; it failed INTERNAL (FileNotFoundError reading the
    manifest list) before, which the churn above met now and then. An overwrite (the writer's own commit loop)
    answers CONFLICT then, as after any race lost to an append. On S3 (`s3`) pyarrow says so as a plain OSError when
    the object went between opening it and reading it, as SeaweedFS did to a compaction: the same."""
    properties = sqlite_catalog(tmp_path)
    table = "churn.put_raced"
    with two_replicas(properties) as (_, first, other):
        first.write(table, rows(0, 100), entity_keys=["id"], event_time="ts", partition_by=[])
        set_properties(properties, table, SHORT_EXPIRY)
        raced: list[dict[str, Any]] = []
        module, name = (group, "commit_append") if grouped else (writes, "_commit_files")
        real = getattr(module, name)
        racing = threading.Event()  # the other replica's own commit (same module, same process) goes through

        def race_then_commit(*args: Any) -> Any:
            if not racing.is_set():  # the other replica commits and expires the snapshot this one is based on
                racing.set()
                other.write(table, rows(100, 200))
                raced.append(other.expire_snapshots(table))
            try:
                return real(*args)
            except FileNotFoundError as exc:
                if store == "local":
                    raise
                raise OSError("AWS Error RESOURCE_NOT_FOUND during GetObject operation: ") from exc

        monkeypatch.setattr(module, name, race_then_commit)
        if grouped:
            done = first.write(table, rows(200, 300), write_id="raced")
            assert done.rows == 100 and not done.duplicate
            assert sorted(first.read_table(table).column("id").to_pylist()) == list(range(300))
        else:  # an overwrite that lost its race to an append answers CONFLICT, as after any lost race
            with pytest.raises(ConflictError, match="added rows"):
                first.write(table, rows(0, 50), mode="overwrite")
            assert sorted(first.read_table(table).column("id").to_pylist()) == list(range(200))
        assert raced and raced[0]["expired"], raced


def test_a_training_sets_next_epoch_reads_the_snapshots_it_planned(tmp_path: Path) -> None:
    """A training set over an entity table on the server, read again the next epoch after both tables got a put
    and a maintenance round with a short expiry. The feature table's snapshot stays (its index is cached for the
    job's next epoch), and so must the entity table's: the next epoch gives the same rows."""
    properties = sqlite_catalog(tmp_path)
    manual = {"FLIGHT_SERVER_AUTO_MAINTENANCE": "false"}
    with (
        replica_processes(tmp_path, properties, lambda location, locations: manual, count=1) as [(location, _)],
        FeatureClient(location) as client,
    ):
        if True:
            trips, features = write_training_set(client)
            drivers = features[0].split(":")[0]
            for name in (trips, drivers):
                set_properties(properties, name, SHORT_EXPIRY)
            dataset = FlightDataset.training_set(
                location, trips, features, columns=["trip_id", "rate"], partitions=4, format="arrow"
            )
            batches = loader(dataset)
            first = pa.Table.from_batches(list(iter(batches))).sort_by("trip_id")
            assert first.num_rows == TRIPS
            client.write(trips, client.read_table(trips).slice(0, 1).set_column(0, "trip_id", pa.array([10**6])))
            client.write(drivers, client.read_table(drivers).slice(0, 1))
            rounds = {name: client.run_maintenance(name) for name in (trips, drivers)}
            assert all(done["snapshots_expired"] for done in rounds.values()), rounds
            second = pa.Table.from_batches(list(iter(batches))).sort_by("trip_id")
            assert second.equals(first)


def test_ray_reads_a_pinned_snapshot_under_churn_and_fails_not_found_once_it_expired(tmp_path: Path) -> None:
    """`flight_client.ray` on a local Ray cluster: two reads of a pinned scan, each while a cycle of churn runs,
    equal pyiceberg's read of the snapshot; once unpinned and expired, the read fails with the client's
    `NotFoundError` (code NOT_FOUND) saying so."""
    properties = sqlite_catalog(tmp_path)
    manual = replicas_of(FLIGHT_SERVER_AUTO_MAINTENANCE="false", FLIGHT_SERVER_BATCH_ROWS="500")
    table = f"churn.t_{uuid.uuid4().hex[:8]}"
    spawn = multiprocessing.get_context("spawn")
    with (
        ProcessPoolExecutor(1, mp_context=spawn, initializer=ray_driver.start_ray) as driver,
        replica_processes(tmp_path, properties, manual) as replicas,
    ):
        locations = [location for location, _ in replicas]
        with FeatureClient(locations[0]) as client:
            for start in range(0, 8_000, 2_000):
                client.write(table, rows(start, start + 2_000), entity_keys=["id"], event_time="ts")
            set_properties(properties, table, SHORT_EXPIRY)
            client.delete(table, keys={"id": [3, 4]}, mode="merge-on-read")
            pinned = client.describe(table)["current_snapshot_id"]
            client.pin(table, pinned, name="job")
            expected = reference(properties, table, pinned)
            plan = plan_table(locations[0], table, columns=["id", "value"], snapshot_id=pinned, partitions=4)
            with Churn(locations, table) as churn:
                for _ in range(2):
                    reading = driver.submit(ray_driver.read_plan_or_error, plan)
                    churn.wait_for_cycle()
                    got, error = reading.result()
                    assert error is None and got is not None, error
                    read_once(got.cast(PLAIN), expected)
            assert churn.error is None, f"{churn.error!r} at {churn.step}\n{log_tails(tmp_path)}"
            client.unpin(table, "job")
            for location in locations:
                with FeatureClient(location) as replica:
                    replica.run_maintenance(table)
            assert pinned not in snapshots(client, table)
            got, error = driver.submit(ray_driver.read_plan_or_error, plan).result()
            assert got is None and error is not None
            not_found, code, message = error
            assert not_found and code == "NOT_FOUND" and f"has no snapshot {pinned}: it was expired" in message, error


def test_remembered_snapshots_are_kept_ten_minutes_the_four_most_recent_per_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`SnapshotsInUse.remember`: expiry keeps (`kept`) the 4 snapshots of a table asked for most recently, for 10
    minutes after each was last asked for, beside those running reads hold; older ones are forgotten."""
    clock = [1000.0]
    monkeypatch.setattr(inuse.time, "monotonic", lambda: clock[0])
    in_use = inuse.SnapshotsInUse()
    for snapshot in range(1, 7):
        in_use.remember([("t", snapshot)])
        clock[0] += 1
    in_use.remember([("u", 9), ("t", None)])
    assert in_use.kept("t") == {3, 4, 5, 6} and in_use.kept("u") == {9}
    in_use.remember([("t", 1)])  # asked again: the most recent now
    assert in_use.kept("t") == {1, 4, 5, 6}
    clock[0] = 1005 + inuse.RECENT_SECONDS + 0.5  # 10 minutes after snapshot 6 was asked for, not after 1 or 9
    with in_use.hold([("t", 2)]):
        assert in_use.kept("t") == {1, 2}
    assert in_use.kept("t") == {1} and len(in_use._asked) == 2
