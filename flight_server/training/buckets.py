"""A share's data files: when a table is bucketed by the share's key into as many buckets as the share has
slots (the default partitioning is `bucket(8, first key)`), a slot is a bucket, so a replica reads only the
files of its own buckets, for its sorted index and for DuckDB's join alike."""

from __future__ import annotations

from pyiceberg.expressions import AlwaysTrue
from pyiceberg.table import FileScanTask, Table
from pyiceberg.transforms import BucketTransform

from flight_server.reads.caches import ReadCaches
from flight_server.reads.duck import local_path
from flight_server.reads.plan import plan_tasks, renamed
from flight_server.wire.reads import KeyShare


def _bucket_positions(table: Table, share: KeyShare) -> dict[int, int]:
    """Per partition spec id, the position in a file's partition of the bucket that is the share's slot; specs
    that do not bucket the key that way are absent (their files hold any slot)."""
    field_id = table.schema().find_field(share.key).field_id
    positions = {}
    for spec_id, spec in table.specs().items():
        for i, part in enumerate(spec.fields):
            transform = part.transform
            if (
                part.source_id == field_id
                and isinstance(transform, BucketTransform)
                and transform.num_buckets == share.slots
            ):
                positions[spec_id] = i
    return positions


def share_tasks(table: Table, share: KeyShare, tasks: list[FileScanTask]) -> list[FileScanTask]:
    """The tasks whose files can hold keys of the share: those of its buckets, and every file of another
    partitioning (its rows are filtered by key as they are read)."""
    positions = _bucket_positions(table, share)
    owned = set(share.owned)
    kept = []
    for task in tasks:
        at = positions.get(task.file.spec_id)
        bucket = task.file.partition[at] if at is not None else None
        if bucket is None or bucket in owned:  # no bucket here (or the bucket of null keys): read it
            kept.append(task)
    return kept


def share_files(table: Table, snapshot_id: int, share: KeyShare, caches: ReadCaches) -> list[str] | None:
    """The local paths of the data files DuckDB must read for the share, when plain `read_parquet` of them reads
    the snapshot's rows exactly: pyiceberg plans the snapshot (no equality deletes), none of the files has
    delete files and the table has had one schema (files are read by column name). Otherwise None:
    `iceberg_scan` reads it all."""
    shapes = {tuple((f.field_id, f.name, f.field_type) for f in s.fields) for s in table.schemas().values()}
    if not _bucket_positions(table, share) or len(shapes) > 1 or renamed(table):
        return None
    tasks = plan_tasks(table, snapshot_id, AlwaysTrue(), caches.plans)
    if tasks is None or any(task.delete_files for task in tasks):
        return None
    return [local_path(task.file.file_path) for task in share_tasks(table, share, tasks)]
