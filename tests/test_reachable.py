"""`snapshot_files` with what manifest lists and manifests name kept between calls: the same files pyiceberg's own
readers find, and a second round that reads no manifest list or manifest again."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from pyiceberg.catalog import load_catalog
from pyiceberg.expressions import EqualTo
from pyiceberg.io import FileIO
from pyiceberg.table.snapshots import Snapshot

from flight_server.changes import reachable
from flight_server.changes.reachable import snapshot_files
from tests.conftest import sqlite_catalog


def _reference(io: FileIO, snapshot: Snapshot) -> set[str]:
    paths = {snapshot.manifest_list}
    for manifest in snapshot.manifests(io):
        paths.add(manifest.manifest_path)
        paths.update(entry.data_file.file_path for entry in manifest.fetch_manifest_entry(io, discard_deleted=True))
    return paths


def test_snapshot_files_are_what_pyiceberg_reads_and_are_read_once(tmp_path: Path) -> None:
    catalog = load_catalog("reach", **sqlite_catalog(tmp_path))
    catalog.create_namespace("ns")
    table = catalog.create_table("ns.t", schema=pa.schema([("k", pa.int64())]))
    for key in range(6):
        table.append(pa.table({"k": pa.array([key, key + 100], pa.int64())}))
    table.delete(EqualTo("k", 3))  # a copy-on-write delete: manifests with deleted entries
    table.append(pa.table({"k": pa.array([7], pa.int64())}))
    snapshots = table.metadata.snapshots
    assert [snapshot_files(table.io, s) for s in snapshots] == [_reference(table.io, s) for s in snapshots]
    misses = (reachable._listed.misses, reachable._files.misses)
    assert [snapshot_files(table.io, s) for s in snapshots] == [_reference(table.io, s) for s in snapshots]
    assert (reachable._listed.misses, reachable._files.misses) == misses  # nothing read again
    reachable._files.clear()  # the lists kept, their manifests' files not: the lists are read again for them
    newest_first = snapshots[::-1]  # whose lists name every manifest at once
    assert [snapshot_files(table.io, s) for s in newest_first] == [_reference(table.io, s) for s in newest_first]
