"""Writing a table's metadata file with each snapshot's JSON worked out once, not on every commit.

Every commit writes a new metadata file that lists every snapshot the table keeps, and pyiceberg serializes each
of them again each time (a Python serializer per snapshot summary): 6-8 ms a commit for a table of 1,500
snapshots, a day of one put a minute, most of what a put's latency grew by over that history. A snapshot's model
never changes, so each one's JSON is kept (`SNAPSHOT_JSON_BYTES` at most) and the file is put together from the
rest of the metadata, serialized by pyiceberg as before, and the kept pieces (about 1 ms for the same table).
The file holds the same JSON document (its keys in another order).
"""

from __future__ import annotations

import functools
import weakref

from pydantic import TypeAdapter
from pyiceberg.io import FileIO
from pyiceberg.serializers import Compressor, ToOutputFile
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.snapshots import Snapshot, SnapshotLogEntry
from pyiceberg.utils.config import Config

from flight_server.base.lru import WeightedLru

SNAPSHOT_JSON_BYTES = 16 << 20  # about 25,000 snapshots' JSON; least recently used first out beyond it

_LOG = TypeAdapter(list[SnapshotLogEntry])


class _SnapshotJson:
    """Each snapshot object's JSON, least recently used out beyond `limit` characters.

    Kept by object, not by snapshot id: pyiceberg's expiry gives the snapshots it keeps new objects without the
    parent ids it expired. Metadata models are frozen, and the server's commits share the snapshot objects of the
    metadata they start from (`internals.sharing_entries`), so an object seen before has the JSON kept for it."""

    def __init__(self, limit: int):
        self.kept: WeightedLru[int, tuple[weakref.ref[Snapshot], str]] = WeightedLru(limit, lambda kept: len(kept[1]))

    def __call__(self, snapshot: Snapshot) -> str:
        kept = self.kept.get(id(snapshot), lambda kept: kept[0]() is snapshot)  # not an object collected since,
        if kept is not None:  # whose id was reused
            return kept[1]
        text = snapshot.model_dump_json()
        self.kept.put(id(snapshot), (weakref.ref(snapshot), text))
        return text


snapshot_json = _SnapshotJson(SNAPSHOT_JSON_BYTES)


def metadata_json(metadata: TableMetadata) -> bytes:
    """The metadata file's JSON, as pyiceberg's `ToOutputFile.table_metadata` writes it (format version 2, without
    pyiceberg's `legacy-current-snapshot-id`, which writes nulls)."""
    head = metadata.model_dump_json(exclude={"snapshots", "snapshot_log"})
    snapshots = ",".join([snapshot_json(snapshot) for snapshot in metadata.snapshots])
    log = _LOG.dump_json(metadata.snapshot_log, by_alias=True).decode()
    return f'{head[:-1]},"snapshots":[{snapshots}],"snapshot-log":{log}}}'.encode()


@functools.cache
def _legacy_current_snapshot_id() -> bool:
    """pyiceberg's setting, read once: reading its configuration costs 0.2 ms, a fifth of writing the file."""
    return bool(Config().get_bool("legacy-current-snapshot-id"))


def write_metadata(metadata: TableMetadata, io: FileIO, location: str) -> None:
    """Write the metadata file at `location` (which must not exist), compressed as its name says.

    Format versions other than 2 go through pyiceberg's writer (version 1 writes snapshots without their sequence
    numbers; pyiceberg cannot write version 3), and so does pyiceberg's `legacy-current-snapshot-id` setting."""
    output = io.new_output(location)
    if metadata.format_version != 2 or _legacy_current_snapshot_id():
        ToOutputFile.table_metadata(metadata, output)
        return
    data = Compressor.get_compressor(location).bytes_compressor()(metadata_json(metadata))
    with output.create(overwrite=False) as stream:
        stream.write(data)
