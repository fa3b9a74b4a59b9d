"""The Ray driver of tests/test_ray_reader.py, run in a child process of its own.

Ray ends its driver process on the spot (exit code 1, nothing printed) when anything touches Ray after
`ray.shutdown()`, for instance a Ray object in a reference cycle that the garbage collector frees later
on whatever thread it happens to run. A driver inside pytest would take the rest of the test run with it,
so the cluster lives in this process, and only tables and statistics travel back.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import ray

from flight_client.plans import ReadPlan
from flight_client.ray import FlightDatasource, read_table, read_tasks, read_training_set


def start_ray(cpus: int = 2) -> None:
    """The driver process's cluster, of 2 CPUs whatever the machine: started when the process starts (the pool's
    initializer), before anything that would start Ray with all the machine's CPUs (`read_datasource` does)."""
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)


def task_counts(endpoints: list[int]) -> list[int]:
    """How many read tasks this cluster gets for each of `endpoints` endpoints."""
    return [read_tasks(n) for n in endpoints]


def tasks_before_ray_started(endpoints: int) -> tuple[int, bool]:
    """`read_tasks(endpoints)` in a process that never started Ray, and whether Ray runs afterwards."""
    tasks = read_tasks(endpoints)
    return tasks, ray.is_initialized()


def _collect(dataset: ray.data.Dataset) -> pa.Table:
    return pa.concat_tables(ray.get(dataset.to_arrow_refs())).replace_schema_metadata(None)


def read_plan(plan: ReadPlan) -> tuple[pa.Table, str]:
    """The plan read through `FlightDatasource`, and Ray's statistics of that read."""
    dataset = ray.data.read_datasource(FlightDatasource(plan))
    return _collect(dataset), dataset.stats()


def read_whole_table(location: str, table: str, **options: Any) -> pa.Table:
    return _collect(read_table(location, table, **options))


def read_whole_training_set(location: str, entities: Any, features: list[str], **options: Any) -> pa.Table:
    return _collect(read_training_set(location, entities, features, **options))


def read_training_set_tasks(location: str, entities: Any, features: list[str], **options: Any) -> tuple[pa.Table, str]:
    """`read_training_set`, and Ray's statistics of the read."""
    dataset = read_training_set(location, entities, features, **options)
    return _collect(dataset), dataset.stats()


def read_plan_or_error(plan: ReadPlan) -> tuple[pa.Table | None, tuple[bool, str | None, str] | None]:
    """The plan's rows read through `FlightDatasource`, or, when the read fails, whether its error is the client's
    `NotFoundError` (Ray raises it as a subclass of it and of `RayTaskError`), its code and its message."""
    from flight_client import NotFoundError

    try:
        return _collect(ray.data.read_datasource(FlightDatasource(plan))), None
    except Exception as exc:
        return None, (isinstance(exc, NotFoundError), getattr(exc, "code", None), str(exc))
