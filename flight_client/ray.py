"""Ray Data: a table or a training set as a `ray.data.Dataset`, read by a Ray task per endpoint, or per CPU of the
cluster when it has fewer (each task then reading its endpoints two at a time), so that the cluster's workers fetch
their shares in parallel, each from the replica its endpoint names.

    ds = read_training_set("grpc://server:8815", "ml.trips", ["demo.driver_stats:conv_rate"], partitions=16)
    ds.to_pandas()  # or hand it to a Ray Train trainer: datasets={"train": ds}

Needs the `ray` extra (`pip install 'iceberg-feature-flight[ray]'`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from flight_client.plans import DEFAULT_PARTITIONS, EntityRows, Part, ReadPlan, plan_table, plan_training_set


class FlightDatasource(Datasource):
    """The endpoints of a planned read (`flight_client.plans`) as Ray read tasks: one per endpoint, or
    the endpoints dealt round-robin to `parallelism` tasks when Ray asks for fewer. Each task opens
    its own connection and yields a block per record batch the server sends."""

    def __init__(self, plan: ReadPlan):
        super().__init__()
        self.plan = plan

    def get_name(self) -> str:
        return "Flight"

    def estimate_inmemory_data_size(self) -> int | None:
        return None  # the server knows row counts at best, not bytes

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        endpoints = self.plan.endpoints
        count = max(1, min(parallelism, len(endpoints))) if endpoints else 0
        # Each task carries its parts only: a plan without them (local entity rows are in the parts).
        bare = dataclasses.replace(self.plan, endpoints=())
        return [
            ReadTask(
                functools.partial(_read, bare, endpoints[i::count]),
                BlockMetadata(
                    num_rows=self._rows(endpoints[i::count], count), size_bytes=None, input_files=None, exec_stats=None
                ),
                schema=self.plan.schema,
                per_task_row_limit=per_task_row_limit,
            )
            for i in range(count)
        ]

    def _rows(self, parts: Sequence[Part], tasks: int) -> int | None:
        """A task's row count: one per local entity row; for server endpoints unknown (the server's total
        is for the whole read, and an upper bound for filtered or deleted rows), unless one task reads all."""
        if all(isinstance(p, EntityRows) for p in parts):
            return sum(p.rows.num_rows for p in parts if isinstance(p, EntityRows))
        return self.plan.total_records if tasks == 1 else None


def _read(plan: ReadPlan, endpoints: Sequence[Part]) -> Iterator[pa.Table]:
    for batch in plan.batches(endpoints):
        if batch.num_rows:
            yield pa.Table.from_batches([batch])


def _read_datasource(plan: ReadPlan, read_args: dict[str, Any]) -> ray.data.Dataset:
    # As many blocks as tasks: Ray would otherwise ask for 200 and cut every task's output to match.
    if "override_num_blocks" not in read_args:
        read_args["override_num_blocks"] = read_tasks(len(plan.endpoints))
    return ray.data.read_datasource(FlightDatasource(plan), **read_args)


def read_tasks(endpoints: int) -> int:
    """How many tasks read `endpoints` endpoints: a task per endpoint, but no more than the cluster has CPUs now
    (tasks beyond them only wait their turn, and each costs Ray a task), each then reading its endpoints
    `READS_AT_ONCE` at a time. A cluster that shows no CPUs (a head node of none, its workers not started yet)
    gets a task per endpoint, and so does a program that has not started Ray yet: Ray Data's read starts it (as
    `ray.init()` would, under its own lock and `RAY_ENABLE_AUTO_CONNECT`), and its size is not known before."""
    if not ray.is_initialized():
        return max(1, endpoints)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    return max(1, min(endpoints, cpus) if cpus else endpoints)


def read_table(
    location: str,
    table: str,
    *,
    columns: Sequence[str] | None = None,
    snapshot_id: int | None = None,
    as_of: dt.datetime | str | int | None = None,
    partitions: int = DEFAULT_PARTITIONS,
    client_options: dict[str, Any] | None = None,
    **read_args: Any,
) -> ray.data.Dataset:
    """A whole-table scan split by data file into up to `partitions` endpoints (never more than the
    snapshot has files), pinned to one snapshot, read by a task each up to the cluster's CPUs (`read_tasks`).
    `read_args` go to `ray.data.read_datasource` (`concurrency`, `num_cpus`, `ray_remote_args`,
    `override_num_blocks`, ...)."""
    plan = plan_table(
        location,
        table,
        columns=columns,
        snapshot_id=snapshot_id,
        as_of=as_of,
        partitions=partitions,
        client_options=client_options,
    )
    return _read_datasource(plan, read_args)


def read_training_set(
    location: str,
    entity_rows: Any,
    features: str | Sequence[str],
    *,
    columns: Sequence[str] | None = None,
    partitions: int = DEFAULT_PARTITIONS,
    entity_filter: str | None = None,
    snapshot_ids: dict[str, int] | None = None,
    as_of: dt.datetime | str | int | None = None,
    entity_time: str = "event_timestamp",
    full_feature_names: bool = False,
    client_options: dict[str, Any] | None = None,
    **read_args: Any,
) -> ray.data.Dataset:
    """A training set in `partitions` parts, every snapshot pinned, read by a task each up to the cluster's CPUs
    (`read_tasks`). Entity rows in a server table (`entity_rows`: its name) are split by key on the server; local
    rows (a DataFrame, Arrow data, a dict of lists: what `get_historical_features` takes) are cut into contiguous
    row ranges, each task sending its own with `do_exchange` (and carrying only those rows). `read_args` go to
    `ray.data.read_datasource` (`override_num_blocks`: that many tasks, each reading its parts two at a time)."""
    plan = plan_training_set(
        location,
        entity_rows,
        features,
        columns=columns,
        partitions=partitions,
        entity_filter=entity_filter,
        snapshot_ids=snapshot_ids,
        as_of=as_of,
        entity_time=entity_time,
        full_feature_names=full_feature_names,
        client_options=client_options,
    )
    return _read_datasource(plan, read_args)


__all__ = ["FlightDatasource", "read_table", "read_training_set"]
