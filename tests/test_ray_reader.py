"""`flight_client.ray` on a local Ray cluster against two real server replicas: a table and a training
set read as `ray.data.Dataset`s, one read task per endpoint, equal the client's plain reads. The Ray
driver runs in a child process (tests/ray_driver.py says why)."""

from __future__ import annotations

import multiprocessing
import pickle
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import polars as pl
import pytest

from flight_client import FeatureClient
from flight_client.plans import plan_table, plan_training_set
from flight_client.ray import FlightDatasource
from tests import ray_driver
from tests.conftest import serve_replicas, sqlite_catalog
from tests.feature_sets import SCAN_ROWS, TRIPS, write_scan_table, write_training_set


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Two `flight-server serve` processes on one SQLite catalog, each naming both in its endpoints."""
    tmp: Path = tmp_path_factory.mktemp("ray")

    def settings(location: str, locations: list[str]) -> dict[str, str]:
        peers = " ".join(other for other in locations if other != location)
        return {"FLIGHT_SERVER_ADVERTISE": location, "FLIGHT_SERVER_PEERS": peers}

    with serve_replicas(tmp, sqlite_catalog(tmp), settings) as locations:
        yield locations


@pytest.fixture(scope="module")
def driver() -> Iterator[ProcessPoolExecutor]:
    """One child process that holds a local Ray cluster of two CPUs for the module."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, initializer=ray_driver.start_ray) as pool:
        yield pool


def test_table_is_read_by_one_task_per_endpoint(driver: ProcessPoolExecutor, replicas: list[str]) -> None:
    with FeatureClient(replicas[0]) as client:
        table = write_scan_table(client)
        plain = client.read_table(table).replace_schema_metadata(None)
    plan = plan_table(replicas[0], table, partitions=4)
    assert {e.locations[0] for e in plan.endpoints} == set(replicas), "the tasks spread over both replicas"
    source = FlightDatasource(plan)
    assert len(source.get_read_tasks(200)) == 4 and len(source.get_read_tasks(3)) == 3
    got, stats = driver.submit(ray_driver.read_plan, plan).result()
    assert "4 tasks executed" in stats
    assert got.num_rows == SCAN_ROWS and got.sort_by("id").equals(plain.sort_by("id"))

    columns = driver.submit(
        ray_driver.read_whole_table, replicas[1], table, columns=["id", "name"], partitions=2
    ).result()
    assert columns.sort_by("id").equals(plain.select(["id", "name"]).sort_by("id"))


def test_training_set_equals_the_plain_read(driver: ProcessPoolExecutor, replicas: list[str]) -> None:
    with FeatureClient(replicas[0]) as client:
        trips, features = write_training_set(client)
        plain = client.get_historical_features(trips, features).replace_schema_metadata(None)
    got = driver.submit(ray_driver.read_whole_training_set, replicas[0], trips, features, partitions=4).result()
    assert got.num_rows == TRIPS and got.sort_by("trip_id").equals(plain.sort_by("trip_id"))
    # A task per CPU of the cluster (2: each reading 2 endpoints at once), or as many as asked for.
    for blocks, tasks in ((None, 2), (4, 4), (1, 1)):
        options = {"partitions": 4} | ({"override_num_blocks": blocks} if blocks else {})
        got, stats = driver.submit(ray_driver.read_training_set_tasks, replicas[0], trips, features, **options).result()
        assert f"{tasks} tasks executed" in stats
        assert got.num_rows == TRIPS and got.sort_by("trip_id").equals(plain.sort_by("trip_id"))


def test_read_tasks_are_at_most_the_clusters_cpus(driver: ProcessPoolExecutor) -> None:
    """A task per endpoint up to the cluster's CPUs; a cluster showing none (a head node of no CPUs, its workers
    not started) still gets a task per endpoint, never none."""
    assert driver.submit(ray_driver.task_counts, [1, 2, 8]).result() == [1, 2, 2]
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, initializer=ray_driver.start_ray, initargs=(0,)) as no_cpus:
        assert no_cpus.submit(ray_driver.task_counts, [1, 8]).result() == [1, 8]


def test_read_tasks_before_ray_is_started() -> None:
    """A program that has not started Ray gets a task per endpoint and Ray still unstarted: Ray Data's read starts
    it (under its own lock and settings), where counting the cluster's CPUs first failed with "Ray has not been
    started yet"."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as fresh:
        assert fresh.submit(ray_driver.tasks_before_ray_started, 64).result() == (64, False)


def test_training_set_from_local_rows(driver: ProcessPoolExecutor, replicas: list[str]) -> None:
    """Local entity rows: a read task per row range, each carrying only its own rows, equal the plain read."""
    with FeatureClient(replicas[0]) as client:
        trips, features = write_training_set(client)
        entities = client.read_table(trips).replace_schema_metadata(None)
        frame = entities.to_pandas()
        plain = client.get_historical_features(entity_df=frame, features=features).to_arrow()
    plan = plan_training_set(replicas[0], frame, features, partitions=4)
    tasks = FlightDatasource(plan).get_read_tasks(3)
    assert [t.metadata.num_rows for t in tasks] == [TRIPS // 2, TRIPS // 4, TRIPS // 4]  # task 0: ranges 0 and 3
    whole = len(pickle.dumps(entities))
    assert all(len(pickle.dumps(t.read_fn)) < whole * 0.6 for t in tasks), "a task carries its rows, not all rows"
    got, stats = driver.submit(ray_driver.read_plan, plan).result()
    assert "4 tasks executed" in stats
    assert got.num_rows == TRIPS and got.sort_by("trip_id").equals(
        plain.replace_schema_metadata(None).sort_by("trip_id")
    )

    polars = pl.from_arrow(entities)
    got = driver.submit(ray_driver.read_whole_training_set, replicas[1], polars, features, columns=["trip_id"]).result()
    assert sorted(got.column("trip_id").to_pylist()) == list(range(TRIPS))
