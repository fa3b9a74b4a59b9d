"""The files a snapshot uses, with what each manifest list and each manifest names kept between calls.

Snapshot expiry works out the files that only the expired snapshots used, so each round reads the manifest list of
every snapshot the table keeps, and orphan removal every snapshot's: under the default rules (24 hours, a table
written once a minute) 1,440 manifest lists a round, most of its time, and all of it again the next round. Manifest
lists and manifests are never rewritten, so what each one names is kept (least recently used out first) and a round
reads only the files committed since the one before. A manifest list is kept as its manifests' paths, weighed by
their characters: without manifest merging (tables other engines write) the lists of n snapshots name n²/2
manifests, and past the bound such a table's rounds read its lists again, as they all did before.
"""

from __future__ import annotations

from typing import Any

from pyiceberg.io import FileIO
from pyiceberg.manifest import ManifestFile
from pyiceberg.table.snapshots import Snapshot

from flight_server.base.lru import WeightedLru
from flight_server.iceberg.internals import manifest_entries, snapshot_manifests

KEPT_LISTED_CHARS = 32 << 20  # characters of the manifest paths the kept manifest lists name (~2x in memory)
KEPT_PATHS = 250_000  # data and delete file paths named by the kept manifests, about 150 bytes each

_listed: WeightedLru[str, tuple[str, ...]] = WeightedLru(KEPT_LISTED_CHARS, lambda kept: sum(map(len, kept)) + 1)
_files: WeightedLru[str, tuple[str, ...]] = WeightedLru(KEPT_PATHS, lambda kept: len(kept) + 1)


def cache_stats() -> dict[str, dict[str, Any]]:
    """What is kept of the manifest lists (weighed in characters) and the manifests (in file paths), for metrics and
    `health`."""
    return {"manifest_lists": _listed.stats("characters"), "manifests": _files.stats("paths")}


def snapshot_files(io: FileIO, snapshot: Snapshot) -> set[str]:
    """The manifest list, manifests, data and delete files (live in its manifests) that a snapshot uses."""
    manifests: list[ManifestFile] | None = None
    listed = _listed.get(snapshot.manifest_list)
    if listed is None:
        manifests = snapshot_manifests(io, snapshot)
        listed = tuple(manifest.manifest_path for manifest in manifests)
        _listed.put(snapshot.manifest_list, listed)
    paths = {snapshot.manifest_list, *listed}
    unread = []
    for path in listed:
        files = _files.get(path)
        if files is None:
            unread.append(path)
        else:
            paths.update(files)
    if unread:  # read now; the list again if it was kept but these manifests' files were not
        by_path = {manifest.manifest_path: manifest for manifest in manifests or snapshot_manifests(io, snapshot)}
        for path in unread:
            entries = manifest_entries(io, by_path[path], discard_deleted=True)
            files = tuple(entry.data_file.file_path for entry in entries)
            _files.put(path, files)
            paths.update(files)
    return paths
