"""The files a snapshot uses, with what each manifest list and each manifest names kept between calls.

Snapshot expiry works out the files that only the expired snapshots used, so each round reads the manifest list of
every snapshot the table keeps, and orphan removal every snapshot's: under the default rules (24 hours, a table
written once a minute) 1,440 manifest lists a round, most of its time, and all of it again the next round. Manifest
lists and manifests are never rewritten, so what each one names is kept (`KEPT_MANIFESTS`, `KEPT_PATHS` at most,
least recently used out first) and a round reads only the files committed since the one before.
"""

from __future__ import annotations

from pyiceberg.io import FileIO
from pyiceberg.manifest import ManifestFile
from pyiceberg.table.snapshots import Snapshot

from flight_server.base.lru import WeightedLru
from flight_server.iceberg.internals import manifest_entries, snapshot_manifests

KEPT_MANIFESTS = 100_000  # manifests named by the kept manifest lists, about 1 KiB each
KEPT_PATHS = 250_000  # data and delete file paths named by the kept manifests, about 150 bytes each

_manifests: WeightedLru[str, tuple[ManifestFile, ...]] = WeightedLru(KEPT_MANIFESTS, lambda kept: len(kept) + 1)
_files: WeightedLru[str, tuple[str, ...]] = WeightedLru(KEPT_PATHS, lambda kept: len(kept) + 1)


def snapshot_files(io: FileIO, snapshot: Snapshot) -> set[str]:
    """The manifest list, manifests, data and delete files (live in its manifests) that a snapshot uses."""
    manifests = _manifests.get(snapshot.manifest_list)
    if manifests is None:
        manifests = tuple(snapshot_manifests(io, snapshot))
        _manifests.put(snapshot.manifest_list, manifests)
    paths = {snapshot.manifest_list}
    for manifest in manifests:
        paths.add(manifest.manifest_path)
        files = _files.get(manifest.manifest_path)
        if files is None:
            files = tuple(entry.data_file.file_path for entry in manifest_entries(io, manifest, discard_deleted=True))
            _files.put(manifest.manifest_path, files)
        paths.update(files)
    return paths
