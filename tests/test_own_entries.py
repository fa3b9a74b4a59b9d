"""The files each snapshot added (`lineage._own_entries`), kept in memory: what a put of this process committed is
known without reading the manifests back, and is exactly what reading them gives."""

from __future__ import annotations

import datetime as dt
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow as pa
import pytest
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.manifest import DataFile, ManifestFile

from flight_client import FeatureClient
from flight_server.iceberg import lineage
from tests.conftest import sqlite_catalog, start_server


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Catalog]]:
    properties = sqlite_catalog(tmp_path_factory.mktemp("own-entries"))
    server = start_server(properties)  # in this process: its commits fill this process's memory
    yield f"grpc://127.0.0.1:{server.port}", load_catalog("default", **properties)
    server.shutdown()


def _rows(first: int, count: int) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(range(first, first + count), pa.int64()),
            "ts": pa.array(
                [dt.datetime(2026, 1 + i % 3, 1, tzinfo=dt.UTC) for i in range(count)], pa.timestamp("us", "UTC")
            ),
            "value": pa.array([float(i) for i in range(count)]),
        }
    )


def _described(files: list[DataFile]) -> list[tuple[Any, ...]]:
    """Every field of each file, as manifests store them, and the partition spec a manifest's reader sets."""
    return sorted((tuple(_field(f, n) for n in _FIELDS) for f in files), key=str)


_FIELDS = sorted(n for n, v in vars(DataFile).items() if isinstance(v, property))


def _field(data_file: DataFile, name: str) -> Any:
    value = getattr(data_file, name)
    if isinstance(value, Mapping):  # a manifest's reader gives its maps lazily
        return dict(value)
    return tuple(value) if name == "partition" else value


def _counted(monkeypatch: pytest.MonkeyPatch) -> list[ManifestFile]:
    """The manifests read from now on (each call that reads one's entries)."""
    reads: list[ManifestFile] = []
    fetch = ManifestFile.fetch_manifest_entry

    def counted(self: ManifestFile, *args: Any, **kwargs: Any) -> Any:
        reads.append(self)
        return fetch(self, *args, **kwargs)

    monkeypatch.setattr(ManifestFile, "fetch_manifest_entry", counted)
    return reads


def test_a_put_s_files_are_known_without_reading_manifests(
    served: tuple[str, Catalog], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Puts to a table that merges manifests after every second one: each snapshot's own files, as remembered, are
    what its manifests say (read afresh), and following a put reads no manifest."""
    location, catalog = served
    name = f"lineage.merged_{uuid.uuid4().hex[:8]}"
    with FeatureClient(location) as client:
        client.write(name, _rows(0, 10), entity_keys=["id"], event_time="ts")
        with catalog.load_table(name).transaction() as transaction:
            transaction.set_properties(
                {"commit.manifest-merge.enabled": "true", "commit.manifest.min-count-to-merge": "2"}
            )
        snapshots = [client.write(name, _rows(100 * i, 5 + i)).snapshot_id for i in range(1, 6)]
    table = catalog.load_table(name)
    assert any(len(table.snapshot_by_id(s).manifests(table.io)) == 1 for s in snapshots)  # type: ignore[union-attr]
    reads = _counted(monkeypatch)
    appended = lineage.appended_since(table, snapshots[0], snapshots[-1]).files
    assert appended is not None and reads == []
    assert sum(f.record_count for f in appended) == 7 + 8 + 9 + 10

    for snapshot_id in snapshots:
        snapshot = table.snapshot_by_id(snapshot_id)
        assert snapshot is not None
        remembered = lineage._own_entries(table, snapshot)
        read = lineage._read_own_entries(table, snapshot)
        assert _described(remembered[0]) == _described(read[0]) and len(remembered[0]) > 0
        assert remembered[1] == read[1] == []


def test_snapshots_this_process_did_not_commit_are_read(
    served: tuple[str, Catalog], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append by another writer (pyiceberg here) is read from its manifests, then kept."""
    location, catalog = served
    name = f"lineage.other_{uuid.uuid4().hex[:8]}"
    with FeatureClient(location) as client:
        first = client.write(name, _rows(0, 10), entity_keys=["id"], event_time="ts").snapshot_id
    table = catalog.load_table(name)
    table.append(_rows(50, 4).cast(table.schema().as_arrow()))
    table = catalog.load_table(name)
    latest = table.current_snapshot()
    assert latest is not None
    reads = _counted(monkeypatch)
    appended = lineage.appended_since(table, first, latest.snapshot_id).files
    assert appended is not None and sum(f.record_count for f in appended) == 4 and len(reads) == 1
    again = lineage.appended_since(table, first, latest.snapshot_id).files
    assert again is not None and _described(again) == _described(appended) and len(reads) == 1


def test_kept_files_are_bounded_and_removals_not_kept(served: tuple[str, Catalog]) -> None:
    """At most `OWN_WEIGHT_KEPT` (files weighed by their statistics), the least recently used go first; a snapshot
    that removed files (an overwrite here) is read each time, not kept."""
    before = OrderedDict(lineage._own)
    try:
        wide = DataFile.from_args(file_path="x", value_counts={i: 1 for i in range(1_000)})
        assert lineage._weight([wide]) == 1_000 + lineage.FILE_WEIGHT
        assert lineage._weight([DataFile.from_args(file_path="y")] * 4) == 4 * lineage.FILE_WEIGHT
        quarter = [wide] * (lineage.OWN_WEIGHT_KEPT // 4 // lineage._weight([wide]))
        for i in range(6):
            lineage._keep(("bounded", i), quarter)
            if i == 2:
                assert lineage._kept(("bounded", 0)) is not None  # used: now the most recent
        kept = [key for key in lineage._own if key[0] == "bounded"]
        assert sum(weight for _, weight in lineage._own.values()) <= lineage.OWN_WEIGHT_KEPT
        assert kept == [("bounded", 0), ("bounded", 3), ("bounded", 4), ("bounded", 5)]
    finally:
        lineage._own.clear()
        lineage._own.update(before)

    location, catalog = served
    name = f"lineage.overwrite_{uuid.uuid4().hex[:8]}"
    with FeatureClient(location) as client:
        client.write(name, _rows(0, 10), entity_keys=["id"], event_time="ts")
        overwrite = client.write(name, _rows(0, 3), mode="overwrite").snapshot_id
    table = catalog.load_table(name)
    snapshot = table.snapshot_by_id(overwrite)
    assert snapshot is not None
    added, removed = lineage._own_entries(table, snapshot)
    assert removed and (str(table.metadata.table_uuid), overwrite) not in lineage._own
