"""Rows removed by position delete files: which positions of which data file, cached per delete file."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyiceberg.io import FileIO
from pyiceberg.manifest import FileFormat
from pyiceberg.table import FileScanTask

from flight_server.iceberg.positions import referenced_data_file
from flight_server.reads.caches import PositionCache
from flight_server.reads.plan import ScanPlan, plan_tasks, schema_changed


def deleted_positions(io: FileIO, tasks: list[FileScanTask], cache: PositionCache) -> dict[str, np.ndarray]:
    """Each data file's deleted row positions (sorted, unique), from the position delete files planned for
    it: cached, or read in parallel (for object storage: they are small and many)."""
    wanted = {(d.file_path, task.file.file_path): d for task in tasks for d in task.delete_files}
    found = {key: cache.get(key) for key in wanted}
    missing = {key[0]: wanted[key] for key, positions in found.items() if positions is None}

    def read(path: str) -> pa.Table:
        # A delete file of one data file (path bounds say which) needs no file_path column.
        columns = ["pos"] if referenced_data_file(missing[path]) is not None else ["file_path", "pos"]
        with io.new_input(path).open() as stream:
            return pq.ParquetFile(stream).read(columns=columns)

    if missing:
        with ThreadPoolExecutor(max_workers=min(8, len(missing))) as pool:
            tables = dict(zip(missing, pool.map(read, missing), strict=True))
        for (delete_path, data_path), delete_file in wanted.items():
            if found[delete_path, data_path] is None:
                table = tables[delete_path]
                if referenced_data_file(delete_file) != data_path:  # a delete file of several data files
                    table = table.filter(pc.equal(table["file_path"].cast(pa.string()), data_path))
                found[delete_path, data_path] = positions = table["pos"].to_numpy()
                cache.put((delete_path, data_path), positions)
    known = {key: positions for key, positions in found.items() if positions is not None}
    assert len(known) == len(found), "every delete file was cached or has been read"
    deleted = {}
    for task in tasks:
        parts = [known[d.file_path, task.file.file_path] for d in task.delete_files]
        if parts:
            deleted[task.file.file_path] = _sorted_unique(parts)
    return deleted


def _sorted_unique(parts: list[np.ndarray]) -> np.ndarray:
    """The positions of several delete files as one sorted array without repeats (a sort: `np.unique` hashes,
    30x slower here)."""
    if len(parts) == 1 and np.all(parts[0][1:] > parts[0][:-1]):  # already so (ours are)
        return parts[0]
    positions = np.sort(np.concatenate(parts))
    return positions[np.concatenate(([True], positions[1:] != positions[:-1]))]


def without_deleted(
    batches: Iterator[ds.TaggedRecordBatch],
    deleted: dict[str, np.ndarray],
    first: dict[str, int] | None = None,
    column: str = "",
) -> Iterator[tuple[str, pa.RecordBatch]]:
    """The batches of a scan without their deleted rows, each with its file's path: a fragment's batches
    arrive in order, so a running count gives each row's position in its file. With `first` (a number per
    file), each row gets the file's number plus its position, as one more int64 `column`."""
    offsets: dict[str, int] = {}
    for tagged in batches:
        batch, path = tagged.record_batch, tagged.fragment.path
        start = offsets.get(path, 0)
        offsets[path] = start + batch.num_rows
        if first is not None:
            place = np.arange(first[path] + start, first[path] + start + batch.num_rows, dtype=np.int64)
            batch = batch.append_column(column, pa.array(place))
        positions = deleted.get(path)
        if positions is not None:
            low, high = np.searchsorted(positions, [start, start + batch.num_rows])
            if low < high:
                keep = np.ones(batch.num_rows, dtype=bool)
                keep[positions[low:high] - start] = False
                batch = batch.filter(pa.array(keep))
        yield path, batch


DELETED_RELATION = "__deleted_positions"


def position_deleted_files(plan: ScanPlan) -> tuple[list[FileScanTask] | None, str]:
    """The planned files of a filtered or limited scan for the `read_parquet` path, or None and why not.

    DuckDB reads the files pyiceberg planned (pruned by partition and statistics) instead of planning
    them itself and reading the position delete files on every scan, as `iceberg_scan` does (0.5x of
    a copy-on-write table's speed with 100 delete files): the filter is the same SQL, so the rows are too.
    Only when the table has position delete files (without, `iceberg_scan` is as fast), no equality
    delete files, one schema in its history (files are read by column name) and no column DuckDB's
    `file_row_number` would shadow.
    """
    if schema_changed(plan.table):
        return None, "a filter or a limit, on a table whose schema changed"
    if "file_row_number" in plan.read.column_names:
        return None, "a filter or a limit, on a table with a column DuckDB's file_row_number would shadow"
    tasks = plan_tasks(plan.table, plan.snapshot_id, plan.expression, plan.caches.plans)
    if tasks is None:
        return None, "equality delete files"
    deletes = {d.file_path: d for task in tasks for d in task.delete_files}
    assert plan.snapshot_id is not None, "read_path reads an empty table without planning"
    snapshot = plan.table.snapshot_by_id(plan.snapshot_id)
    assert snapshot is not None, "resolved against this table"
    delete_files = snapshot.summary.get("total-delete-files") if snapshot.summary else None
    in_table = int(delete_files) if delete_files is not None else len(deletes)
    if not in_table:
        return None, "a filter or a limit, no delete files"
    if any(d.file_format != FileFormat.PARQUET for d in deletes.values()):
        return None, "deletion vectors"
    return tasks, f"a filter or a limit, {len(deletes)} position delete file(s) applied"


def deleted_relation(deleted: dict[str, np.ndarray]) -> pa.Table:
    """The deleted positions as rows: `file`, the index of the data file in `deleted`, and `pos`."""
    counts = [len(positions) for positions in deleted.values()]
    files = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    positions = np.concatenate(list(deleted.values())) if deleted else np.empty(0, np.int64)
    return pa.table({"file": files, "pos": pa.array(positions, pa.int64())})
