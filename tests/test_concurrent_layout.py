"""A put whose table changes partitioning while its files are written: the retry must not commit them.

The files of a put are written for the table's partition spec as the put found it; the snapshot's manifest
records every added file under the spec current at commit. When another writer changed the spec and
committed in between, the put's first commit fails and is retried on the new state, where its files no
longer fit: the put fails with CONFLICT and commits nothing (before: committed under the wrong spec).

The stream is driven here, not by a client, so that the concurrent change lands at a known moment: after
the put staged its transaction and before its rows arrive. Catalog, tables and files are real.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pytest

from flight_server.base.locks import LockPool
from flight_server.changes.writes import Writer
from flight_server.iceberg.catalog import FeatureCatalog
from flight_server.wire.errors import ConflictError
from flight_server.wire.writes import WriteRequest
from tests.conftest import sqlite_catalog

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


class _Chunk(NamedTuple):
    data: pa.RecordBatch | None
    app_metadata: None


class _Stream:
    """A put's stream: its schema, then `before_rows` runs (the concurrent change), then its one batch."""

    def __init__(self, rows: pa.Table, before_rows: Callable[[], None]):
        self.schema = rows.schema
        self._batches: Iterator[pa.RecordBatch] = iter(rows.to_batches())
        self._before_rows: Callable[[], None] | None = before_rows

    def read_chunk(self) -> _Chunk:
        if self._before_rows is not None:
            self._before_rows, change = None, self._before_rows
            change()
        batch = next(self._batches)  # StopIteration ends the stream, as pyarrow's reader does
        return _Chunk(batch, None)


def _rows(ids: range) -> pa.Table:
    return pa.table(
        {
            "driver_id": pa.array(ids, pa.int64()),
            "event_timestamp": pa.array([T0] * len(ids), pa.timestamp("us", "UTC")),
            "rate": pa.array([1.0] * len(ids), pa.float64()),
        }
    )


@pytest.fixture
def catalog(tmp_path: Path) -> FeatureCatalog:
    return FeatureCatalog("default", sqlite_catalog(tmp_path))


def _writer(catalog: FeatureCatalog) -> Writer:
    return Writer(catalog, chunk_bytes=1 << 20, commit_timeout=10, locks=LockPool())


def _repartition_and_append(catalog: FeatureCatalog) -> None:
    """Another engine drops a partition field of "t", then appends a row (so the put's first commit fails)."""
    table = catalog.catalog.load_table(catalog.identifier("t"))
    with table.update_spec() as update:
        update.remove_field("event_timestamp_month")
    table = catalog.catalog.load_table(catalog.identifier("t"))
    table.append(_rows(range(100, 101)).cast(table.schema().as_arrow()))


def test_a_put_refuses_a_partitioning_changed_under_it(catalog: FeatureCatalog) -> None:
    writer = _writer(catalog)
    create = WriteRequest("t", entity_keys=["driver_id"], event_time="event_timestamp")
    writer.write(create, _Stream(_rows(range(10)), lambda: None), lambda: False)  # type: ignore[arg-type]
    # with a new column: a transaction of its own, not a group's snapshot (which checks its spec itself)
    request = WriteRequest("t", evolve=True)
    rows = _rows(range(20, 30)).append_column("extra", pa.array([1] * 10))
    with pytest.raises(ConflictError, match="partitioning"):
        writer.write(request, _Stream(rows, lambda: _repartition_and_append(catalog)), lambda: False)  # type: ignore[arg-type]
    _assert_holds_only(catalog, "t", [*range(10), 100])


def test_a_put_refuses_a_table_created_under_it_with_another_partitioning(catalog: FeatureCatalog) -> None:
    """Two puts create one table; the other, on another replica, asked for another partitioning."""
    request = WriteRequest("u", entity_keys=["driver_id"], event_time="event_timestamp")
    other = WriteRequest(
        "u", entity_keys=["driver_id"], event_time="event_timestamp", partition_by=["identity(driver_id)"]
    )

    def create_first() -> None:
        _writer(catalog).write(other, _Stream(_rows(range(5)), lambda: None), lambda: False)  # type: ignore[arg-type]

    with pytest.raises(ConflictError, match="partitioning"):
        _writer(catalog).write(request, _Stream(_rows(range(10, 20)), create_first), lambda: False)  # type: ignore[arg-type]
    _assert_holds_only(catalog, "u", list(range(5)))


def _assert_holds_only(catalog: FeatureCatalog, name: str, ids: list[int]) -> None:
    """The table holds exactly these rows, and no file it does not reference lies in its folder."""
    table = catalog.catalog.load_table(catalog.identifier(name))
    assert sorted(table.scan().to_arrow()["driver_id"].to_pylist()) == ids
    referenced = {task.file.file_path.removeprefix("file://") for task in table.scan().plan_files()}
    on_disk = {str(p) for p in Path(table.location().removeprefix("file://")).rglob("*.parquet")}
    assert referenced == on_disk
