"""Metadata files written with each snapshot's JSON kept (`iceberg/metadata_files.py`): the same document pyiceberg
writes, read back as the same metadata, and a bounded cache."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.table import Table
from pyiceberg.table.metadata import TableMetadata, TableMetadataUtil
from pyiceberg.table.snapshots import Snapshot
from pyiceberg.types import StringType

from flight_client import FeatureClient
from flight_server.iceberg.metadata_files import _SnapshotJson, metadata_json
from tests.conftest import sqlite_catalog, start_server

NAMES = itertools.count()


def _append(table: Table, step: int) -> None:
    table.append(pa.table({"k": pa.array([step], pa.int64()), "v": pa.array([f'v"{step}\\é'])}))


def _set_property(table: Table, step: int) -> None:
    with table.transaction() as transaction:
        transaction.set_properties({f"p{step}": 'quote " backslash \\ unicode é \u2028 {"snapshots":[]}'})


def _add_column(table: Table, step: int) -> None:
    with table.update_schema() as update:
        update.add_column(f"c{step}", StringType())


def _tag(table: Table, step: int) -> None:
    snapshot = table.current_snapshot()
    if snapshot is not None:
        table.manage_snapshots().create_tag(snapshot.snapshot_id, f"t{step}").commit()


def _expire(table: Table, step: int) -> None:
    snapshots = table.metadata.snapshots
    protected = {ref.snapshot_id for ref in table.metadata.refs.values()}
    old = [s.snapshot_id for s in snapshots[: len(snapshots) // 2] if s.snapshot_id not in protected]
    if old:
        table.maintenance.expire_snapshots().by_ids(old).commit()


STEPS = {"append": _append, "property": _set_property, "column": _add_column, "tag": _tag, "expire": _expire}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    catalog = load_catalog("meta", **sqlite_catalog(tmp_path_factory.mktemp("meta")))
    catalog.create_namespace("ns")
    return catalog


def _same_document(metadata: TableMetadata) -> None:
    ours = metadata_json(metadata)
    assert json.loads(ours) == json.loads(metadata.model_dump_json())
    assert TableMetadataUtil.parse_raw(ours) == metadata


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.sampled_from(sorted(STEPS)), min_size=1, max_size=8))
def test_metadata_json_is_the_document_pyiceberg_writes(catalog: Catalog, steps: list[str]) -> None:
    schema = pa.schema([("k", pa.int64()), ("v", pa.string())])
    table = catalog.create_table(f"ns.t{next(NAMES)}", schema=schema)
    _same_document(table.metadata)
    for step, name in enumerate(steps):
        STEPS[name](table, step)
        _same_document(table.metadata)


def _snapshot(snapshot_id: int) -> Snapshot:
    return Snapshot(snapshot_id=snapshot_id, manifest_list=f"file:///m/{snapshot_id}.avro", timestamp_ms=snapshot_id)


def test_snapshot_json_is_kept_by_object_and_bounded() -> None:
    one = _snapshot(10)
    size = len(one.model_dump_json())
    kept = _SnapshotJson(limit=3 * size)
    assert kept(one) == one.model_dump_json()
    assert kept(one) is kept(one)  # the same text, not serialized again
    orphaned = one.model_copy(update={"parent_snapshot_id": None, "manifest_list": "file:///other.avro"})
    assert kept(orphaned) == orphaned.model_dump_json()  # the same snapshot id, another object: its own JSON
    alive = [one, orphaned]
    for snapshot_id in range(11, 19):
        alive.append(_snapshot(snapshot_id))
        kept(alive[-1])
        assert kept.kept.total <= kept.kept.limit
        assert kept.kept.total == sum(len(text) for _, (_, text) in kept.kept.newest_first())
    assert [ref() for _, (ref, _) in kept.kept.newest_first()] == alive[:-4:-1]  # least recently used out first
    kept(alive[-3])
    alive.append(_snapshot(19))
    kept(alive[-1])
    assert [ref() for _, (ref, _) in kept.kept.newest_first()] == [alive[-1], alive[-4], alive[-2]]


def test_puts_write_metadata_pyiceberg_reads_back(tmp_path: Path) -> None:
    properties = sqlite_catalog(tmp_path)
    server = start_server(properties)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            rows = pa.table({"k": pa.array([1], pa.int64()), "t": pa.array([0], pa.timestamp("us", "UTC"))})
            client.write("ns.puts", rows, entity_keys=["k"], event_time="t")
            for key in range(2, 6):
                client.write("ns.puts", rows.set_column(0, "k", pa.array([key], pa.int64())))
            table = load_catalog("default", **properties).load_table("ns.puts")
            assert len(table.metadata.snapshots) == 5
            assert sorted(table.scan().to_arrow().column("k").to_pylist()) == [1, 2, 3, 4, 5]
            _same_document(table.metadata)
    finally:
        server.shutdown()
