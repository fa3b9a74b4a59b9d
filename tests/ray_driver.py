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
from flight_client.ray import FlightDatasource, read_table, read_training_set


def _collect(dataset: ray.data.Dataset) -> pa.Table:
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
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
    """`read_training_set` on a cluster of 2 CPUs started first (its default number of tasks follows the CPUs),
    and Ray's statistics of the read."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    dataset = read_training_set(location, entities, features, **options)
    return _collect(dataset), dataset.stats()
