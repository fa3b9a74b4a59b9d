"""The files each snapshot added (`lineage._own_entries`), kept in memory: what a put of this process, or of its
write process, committed is known without reading the manifests back, and is exactly what reading them gives."""

from __future__ import annotations

import datetime as dt
import pickle
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow as pa
import pytest
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.manifest import DataFile, DataFileContent, FileFormat, ManifestFile
from pyiceberg.table import Table
from pyiceberg.typedef import Record

from flight_client import FeatureClient
from flight_server.base.lru import WeightedLru
from flight_server.iceberg import lineage
from flight_server.transport import offload
from tests.conftest import sqlite_catalog, start_server, start_writing_server


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Catalog]]:
    properties = sqlite_catalog(tmp_path_factory.mktemp("own-entries"))
    server = start_server(properties)  # in this process: its commits fill this process's memory
    yield f"grpc://127.0.0.1:{server.port}", load_catalog("default", **properties)
    server.shutdown()


@pytest.fixture(scope="module")
def relayed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Catalog]]:
    properties = sqlite_catalog(tmp_path_factory.mktemp("own-entries-relayed"))
    server = start_writing_server(properties)  # puts commit in its write process: this process only serves
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


def _merging_puts(location: str, catalog: Catalog) -> tuple[Table, list[int]]:
    """Five puts to a new table that merges manifests after every second one: the table, their snapshots."""
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
    return table, snapshots


def _known_as_manifests_say(table: Table, snapshots: list[int], reads: list[ManifestFile]) -> None:
    """Following the snapshots reads no manifest (none in `reads`), and each one's files, as kept, are what its
    manifests say (read afresh)."""
    appended = lineage.appended_since(table, snapshots[0], snapshots[-1]).files
    assert appended is not None and reads == []
    assert sum(f.record_count for f in appended) == 7 + 8 + 9 + 10
    for snapshot_id in snapshots:
        snapshot = table.snapshot_by_id(snapshot_id)
        assert snapshot is not None
        kept = lineage._own.get((str(table.metadata.table_uuid), snapshot_id))
        added, removed = lineage._read_own_entries(table, snapshot)
        assert kept is not None and _described(kept) == _described(added) and len(kept) > 0 and removed == []


def test_a_put_s_files_are_known_without_reading_manifests(
    served: tuple[str, Catalog], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Puts to a table that merges manifests: each snapshot's own files, as remembered by the process that committed
    them, are what its manifests say, and following a put reads no manifest."""
    table, snapshots = _merging_puts(*served)
    _known_as_manifests_say(table, snapshots, _counted(monkeypatch))


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
    before, lineage._own = lineage._own, WeightedLru(lineage.OWN_WEIGHT_KEPT, lineage.files_weight)
    try:
        wide = DataFile.from_args(file_path="x", value_counts={i: 1 for i in range(1_000)})
        assert lineage.files_weight([wide]) == 1_000 + lineage.FILE_WEIGHT
        assert lineage.files_weight([DataFile.from_args(file_path="y")] * 4) == 4 * lineage.FILE_WEIGHT
        quarter = [wide] * (lineage.OWN_WEIGHT_KEPT // 4 // lineage.files_weight([wide]))
        for i in range(6):
            lineage.keep_appended(("bounded", i), quarter)
            if i == 2:
                assert lineage._own.get(("bounded", 0)) is not None  # used: now the most recent
        kept = [key for key, _ in lineage._own.newest_first()]
        assert lineage._own.total <= lineage.OWN_WEIGHT_KEPT
        assert kept == [("bounded", 5), ("bounded", 4), ("bounded", 3), ("bounded", 0)]
    finally:
        lineage._own = before

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


def test_the_write_process_hands_a_put_s_files_to_the_serving_process(
    relayed: tuple[str, Catalog], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Puts committed by the write process, to a table that merges manifests: this (the serving) process never
    reads a manifest, yet knows each snapshot's own files, exactly as its manifests say."""
    reads = _counted(monkeypatch)  # from before the puts: the commits ran in the write process
    table, snapshots = _merging_puts(*relayed)
    _known_as_manifests_say(table, snapshots, reads)


def test_puts_without_files_handed_over_are_answered_as_ever(relayed: tuple[str, Catalog]) -> None:
    """A retried write_id (answered with the first put's snapshot) and an overwrite (its snapshot removed files: not
    kept, so no second reply from the write process) are answered as without the handover, the table too."""
    location, catalog = relayed
    name = f"lineage.unrelayed_{uuid.uuid4().hex[:8]}"
    with FeatureClient(location) as client:
        client.write(name, _rows(0, 10), entity_keys=["id"], event_time="ts")
        first = client.write(name, _rows(100, 4), write_id="once")
        again = client.write(name, _rows(100, 4), write_id="once")
        overwrite = client.write(name, _rows(0, 3), mode="overwrite")
        rows = client.read_table(name).num_rows
    assert again.duplicate and again.snapshot_id == first.snapshot_id and rows == 3
    uuid_ = str(catalog.load_table(name).metadata.table_uuid)
    assert (uuid_, first.snapshot_id) in lineage._own and (uuid_, overwrite.snapshot_id) not in lineage._own


def test_an_append_s_files_go_with_every_answer(served: tuple[str, Catalog]) -> None:
    """The files of an append this process committed go with every answer that names its snapshot (a group commit's
    puts share it, and whichever answer arrives first brings them); a serving process keeps them only from a write
    process of its own pyiceberg version."""
    location, catalog = served
    name = f"lineage.once_{uuid.uuid4().hex[:8]}"
    with FeatureClient(location) as client:
        snapshot_id = client.write(name, _rows(0, 10), entity_keys=["id"], event_time="ts").snapshot_id
    key = (str(catalog.load_table(name).metadata.table_uuid), snapshot_id)
    message = offload.appended_message(snapshot_id)
    assert message is not None and offload.appended_message(snapshot_id) is message  # made once for a group's puts
    header, payload = message[len(offload.APPENDED_TAG) :].split(b"\n", 1)
    files = pickle.loads(payload)
    assert header.decode() == f"{key[0]} {key[1]}" and _described(files) == _described(lineage._own.get(key) or [])

    elsewhere = f"relayed_{uuid.uuid4().hex[:8]}"  # as a serving process, which has no record of it
    relayed = f"{elsewhere} {snapshot_id}\n".encode() + payload
    offload.keep_relayed(b"appended 1 pyiceberg 0.0.1\n" + relayed)
    assert lineage._own.get((elsewhere, snapshot_id)) is None
    offload.keep_relayed(offload.APPENDED_TAG + relayed)
    kept = lineage._own.get((elsewhere, snapshot_id))
    assert kept is not None and _described(kept) == _described(files)
    offload.keep_relayed(offload.APPENDED_TAG + f"{elsewhere} {snapshot_id}\n".encode() + b"not unpickled")
    assert lineage._own.get((elsewhere, snapshot_id)) is kept  # a group's later answers are not unpickled again


def test_finding_a_puts_own_append_looks_at_the_newest_first_and_stops() -> None:
    """The write process looks up the files of every put's snapshot (`appended_message` -> `committed_appends`),
    which was just kept: the lookup stops at it instead of copying the whole cache first (`newest_first`: 1.3 ms a
    put answer with the cache full of one-row puts, review 18)."""
    one = DataFile.from_args(
        content=DataFileContent.DATA,
        file_path="s3://bucket/t/data/f.parquet",
        file_format=FileFormat.PARQUET,
        partition=Record(),
        record_count=1,
        file_size_in_bytes=1000,
        column_sizes={1: 10, 2: 10, 3: 10},
        value_counts={1: 1, 2: 1, 3: 1},
    )
    before, lineage._own = lineage._own, WeightedLru(lineage.OWN_WEIGHT_KEPT, lineage.files_weight)
    try:
        count = lineage.OWN_WEIGHT_KEPT // lineage.files_weight([one])
        for snapshot_id in range(count):
            lineage.keep_appended(("uuid", snapshot_id), [one])
        assert len(lineage._own) == count
        looked_at: list[tuple[str, int]] = []
        newest = lineage._own.newest
        lineage._own.newest = lambda match: newest(lambda key: looked_at.append(key) or match(key))  # type: ignore[method-assign]
        assert lineage.committed_appends(count - 1) == (("uuid", count - 1), [one])
        assert looked_at == [("uuid", count - 1)]
        assert lineage.committed_appends(-1) is None
    finally:
        lineage._own = before
