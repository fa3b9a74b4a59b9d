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


def test_kept_manifest_lists_are_weighed_by_their_paths(tmp_path: Path) -> None:
    """Each manifest list read holds its own copy of every manifest path, so the cache's bound counts characters, not
    paths (review 18 measured 177 bytes a path where 8 were assumed): on a fast-append table, whose n lists name
    n²/2 manifests, what is kept weighs what its strings hold."""
    properties = sqlite_catalog(tmp_path)
    catalog = load_catalog("default", **properties)
    catalog.create_namespace("ns")
    created = catalog.create_table("ns.t", schema=pa.schema([("k", pa.int64())]))
    for i in range(40):  # pyiceberg's append is a fast append: a new manifest each, the old ones listed again
        created.append(pa.table({"k": pa.array([i], pa.int64())}))
    table = catalog.load_table("ns.t")
    reachable._listed.clear()
    reachable._files.clear()
    for snapshot in table.metadata.snapshots:
        reachable.snapshot_files(table.io, snapshot)
    kept = [paths for _, paths in reachable._listed.newest_first()]
    assert sum(len(paths) for paths in kept) == 40 * 41 // 2
    assert reachable._listed.total == sum(len(path) for paths in kept for path in paths) + len(kept)
