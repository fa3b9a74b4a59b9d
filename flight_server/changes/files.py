"""The Parquet file writer shared by writes, deletes and compactions: sorted rows, rolled into files of
the table's `write.target-file-size-bytes`, written as its `write.parquet.*` properties say (`parquet_options`).
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import json
import logging
import math
import sys
import threading
import uuid
from concurrent.futures import wait
from dataclasses import dataclass
from dataclasses import field as default
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow.parquet import ParquetLogicalType
from pyiceberg.conversions import to_bytes
from pyiceberg.io import FileIO, InputFile, OutputFile, OutputStream
from pyiceberg.io.fileformat import DataFileStatistics, FileFormatFactory, FileFormatModel, FileFormatWriter
from pyiceberg.io.pyarrow import (
    MetricModeTypes,
    StatisticsCollector,
    StatsAggregator,
    compute_statistics_plan,
    data_file_statistics_from_parquet_metadata,
    parquet_path_to_id_mapping,
    pyarrow_to_schema,
)
from pyiceberg.manifest import DATA_FILE_TYPE, DEFAULT_READ_VERSION, DataFile, DataFileContent, FileFormat
from pyiceberg.partitioning import PartitionFieldValue, PartitionKey, PartitionSpec
from pyiceberg.schema import Schema, sanitize_column_names
from pyiceberg.table import TableProperties
from pyiceberg.table.locations import LocationProvider, load_location_provider
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.transforms import BucketTransform, DayTransform, MonthTransform, Transform, YearTransform
from pyiceberg.typedef import Properties, Record
from pyiceberg.types import (
    BinaryType,
    BooleanType,
    DateType,
    DecimalType,
    DoubleType,
    FloatType,
    IntegerType,
    LongType,
    PrimitiveType,
    StringType,
    TimestampType,
    TimestamptzType,
)
from pyiceberg.utils.concurrent import ExecutorFactory
from pyiceberg.utils.properties import property_as_int
from pyiceberg.utils.truncate import truncate_upper_bound_binary_string, truncate_upper_bound_text_string

from flight_server.base.buffers import aligned
from flight_server.base.lru import WeightedLru
from flight_server.changes.commits import delete_files
from flight_server.changes.dictionaries import dictionary_columns
from flight_server.iceberg.catalog import FeatureSpec
from flight_server.iceberg.internals import partitions, to_file_schema
from flight_server.iceberg.lineage import data_file_name
from flight_server.wire.errors import RequestError

log = logging.getLogger(__name__)


def sort_rows(chunk: pa.Table, spec: FeatureSpec | None) -> pa.Table:
    """A chunk's rows sorted by keys and event time, so that key lookups skip row groups."""
    order = _sort_indices(chunk, spec)
    return chunk if order is None else chunk.take(order)


def _sort_indices(chunk: pa.Table, spec: FeatureSpec | None) -> pa.Array | None:
    """The stable order of `sort_rows` (None: the chunk's own): one sort of the key and time columns packed into one
    integer (`_packed`) when they fit, else Arrow's sort of the columns made contiguous first (Arrow sorts a table of
    many chunks, a put's batches, by merging them, 2-3 times slower than sorting one)."""
    if spec is None or chunk.num_rows < 2:
        return None
    columns = [*spec.entity_keys, spec.event_time]
    packed = _packed(chunk.num_rows, [chunk.column(c) for c in columns])
    if packed is not None:
        return pa.array(_stable_order(packed.values))
    return pc.sort_indices(chunk.select(columns).combine_chunks(), sort_keys=[(c, "ascending") for c in columns])


class _Packed(NamedTuple):
    """Columns packed into one unsigned integer per row (`_packed`): ordering these orders the rows by the columns."""

    values: np.ndarray  # uint64
    bits: int  # how many low bits the columns take


def _packed(rows: int, columns: list[pa.ChunkedArray], below: _Packed | None = None) -> _Packed | None:
    """Each of `rows` rows' values of `columns` (integers, dates or timestamps without nulls), less each column's least
    value, side by side in one uint64, the first column highest, above `below`'s bits: comparing two rows' integers
    compares the rows by the columns in order, as Arrow's sort does. None when a column is of another kind or has
    nulls, or when they need more than 64 bits (the ranges of the values in this chunk count, not their types')."""
    packed, shift = below or _Packed(np.zeros(rows, dtype=np.uint64), 0)
    for column in reversed(columns if rows else []):
        integers = _integers(column)
        if integers is None:
            return None
        least = int(integers.min())
        bits = (int(integers.max()) - least).bit_length()
        if shift + bits > 64:
            return None
        if bits:  # the values less the least fit in `bits`, so the wrap of unsigned arithmetic leaves them exact
            packed = packed | (integers.astype(np.uint64) - np.uint64(least % (1 << 64))) << np.uint64(shift)
        shift += bits
    return _Packed(packed, shift)


def _integers(column: pa.ChunkedArray) -> np.ndarray | None:
    """The column's values as the integers Arrow orders them by (dates as days, timestamps in their unit), or None."""
    kind = column.type
    if column.null_count or not (pa.types.is_integer(kind) or pa.types.is_timestamp(kind) or pa.types.is_date(kind)):
        return None
    if not pa.types.is_integer(kind):
        column = column.cast(pa.int32() if pa.types.is_date32(kind) else pa.int64())
    return column.combine_chunks().to_numpy()


def _stable_order(packed: np.ndarray) -> np.ndarray:
    """The positions of `packed` in ascending order, equal values in the order they come (as Arrow's stable sort)."""
    return np.argsort(packed, kind="stable")


# Below this many Arrow bytes a chunk's rows are sorted, partitioned and written on the calling thread: for the few
# rows of a group commit's shared files, the thread pool's hand-offs (a task queued, a thread woken, a future
# answered, all under the GIL the server's threads share) cost more than the work itself.
SERIAL_BYTES = 1 << 20


def write_data_files(
    metadata: TableMetadata,
    chunk: pa.Table,
    io: FileIO,
    spec: FeatureSpec | None,
    write_uuid: uuid.UUID,
    counter: itertools.count[int],
    values: pa.Table | None = None,
) -> list[DataFile]:
    """Parquet data files of one chunk, split by partition, rows sorted (`sort_rows`) within each file, written in
    parallel (on the calling thread below `SERIAL_BYTES`); the files pyiceberg's append writes of the sorted chunk,
    named and ordered the same way, but a partition past the target size cut into consecutive runs of rows
    (`consecutive_runs`), with every `write.parquet.*` property honoured (`parquet_options`).

    The rows are copied once: one `take` puts them in partition order, sorted within each partition, and each
    file is a slice of it. Any file this wrote is deleted if one fails (a full disk), so that a failed chunk
    leaves nothing behind: the files not started are not written, and those being written are finished first
    (an object store creates the object when its upload closes, after a delete that came too early). `values`: the
    chunk's `partition_values`, when the caller has them."""
    if not chunk.num_rows:
        return []
    created = _CreatedFiles(io)
    try:
        target = target_file_size(metadata)
        # A chunk well under the target size is one file per partition, which is what pyiceberg's bin packing makes of
        # each partition's rows then, at a tenth of a small file's CPU.
        small = chunk.nbytes * 2 <= target
        tasks = [
            _FileTask(next(counter), partition, batches)
            for partition, rows in partitioned_rows(metadata, chunk, spec, values)
            for batches in ([rows.to_batches()] if small else consecutive_runs(rows, target))
        ]
        write = functools.partial(_write_file, _FileContext.of(metadata, chunk.schema), created, write_uuid)
        if chunk.nbytes < SERIAL_BYTES:
            return [write(task) for task in tasks]
        writing = [ExecutorFactory.get_or_create().submit(write, task) for task in tasks]
        try:
            return [file.result() for file in writing]
        finally:
            for file in writing:
                file.cancel()
            wait(writing)
    except BaseException:
        created.abandon()
        raise


def consecutive_runs(rows: pa.Table, target: int) -> list[list[pa.RecordBatch]]:
    """The rows in runs of at most about `target` Arrow bytes, in order, one a file: each file's rows follow the
    previous file's, so a commit's files in the order they were written (`lineage.written_order`) hold its rows
    in order. (pyiceberg's `bin_pack_arrow_table` packs first-fit: a later, smaller batch went into an earlier file,
    and a full tie's later row lost to the earlier one.) Batches of about `target` bytes, as pyiceberg cuts them."""
    per_row = rows.nbytes / max(rows.num_rows, 1)
    runs: list[list[pa.RecordBatch]] = []
    size = 0
    for batch in rows.to_batches(max_chunksize=max(1, int(target / per_row)) if per_row else None):
        if not runs or size + batch.nbytes > target:
            runs.append([])
            size = 0
        runs[-1].append(batch)
        size += batch.nbytes
    return runs


COPY_BYTES = 8 << 20  # read and written at a time when a data file is copied


def moved_files(files: list[DataFile], source: FileIO, metadata: TableMetadata, io: FileIO) -> list[DataFile]:
    """Copies of data files written for a table at another location, at the paths the table of `metadata` gives
    data files of their names and partitions (its location provider), their entries' statistics kept: a put that
    lost the race to create a table appends them to the winner, which may have taken another location. The
    copies are read and written through the FileIOs (`source`'s, the table's `io`), in parallel, a few MB at a
    time; any copy made is deleted if one fails."""
    spec, schema = metadata.spec(), metadata.schema()
    locations = load_location_provider(metadata.location, metadata.properties)
    created = _CreatedFiles(io)

    def copy(file: DataFile) -> DataFile:
        name = file.file_path.rsplit("/", 1)[-1]
        if spec.is_unpartitioned():
            path = locations.new_data_location(data_file_name=name)
        else:
            known = _KnownPath([], spec, schema, spec.partition_to_path(file.partition, schema))
            path = locations.new_data_location(data_file_name=name, partition_key=known)
        copied = 0
        with source.new_input(file.file_path).open() as reader, created.new_output(path).create() as writer:
            while block := reader.read(COPY_BYTES):
                writer.write(block)
                copied += len(block)
        if copied != file.file_size_in_bytes:
            raise OSError(f"copied {copied} bytes of {file.file_path}, which has {file.file_size_in_bytes}")
        return _at_path(file, path)

    copying = [ExecutorFactory.get_or_create().submit(copy, file) for file in files]
    try:
        return [file.result() for file in copying]
    except BaseException:
        for file in copying:
            file.cancel()
        wait(copying)
        created.abandon()
        raise


def _at_path(file: DataFile, path: str) -> DataFile:
    """The entry of a copy of the data file at `path`: the same partition and statistics."""
    fields = DATA_FILE_TYPE[DEFAULT_READ_VERSION].fields  # what `DataFile.from_args` binds (`_data_file` made it)
    values = {field.name: file[index] for index, field in enumerate(fields)}
    return DataFile.from_args(**{**values, "file_path": path})


def partitioned_rows(
    metadata: TableMetadata, chunk: pa.Table, spec: FeatureSpec | None, values: pa.Table | None = None
) -> list[tuple[PartitionKey | None, pa.Table]]:
    """A chunk's rows by partition, sorted (`sort_rows`) within each, the partitions in the order in which they
    first appear among the sorted rows (as pyiceberg's `append` orders them).

    The partition values come from Arrow compute, numpy or pyiceberg-core's transforms of whole columns, while the
    rows are sorted by keys and time on another core (`_sort_indices`); one stable sort of those values in that
    order (`_grouped`) groups each partition's rows in sorted order, and one `take` of the chunk by the combined
    order makes every partition a zero-copy slice. A chunk under `SERIAL_BYTES` is sorted on the calling thread.
    `values`: the chunk's `partition_values`, when the caller has them."""
    partition_spec, schema = metadata.spec(), metadata.schema()
    if partition_spec.is_unpartitioned():
        order = _sort_indices(chunk, spec)
        return [(None, chunk if order is None else _take(chunk, order))]
    serial = chunk.nbytes < SERIAL_BYTES
    sorting = None if serial else ExecutorFactory.get_or_create().submit(_sort_indices, chunk, spec)
    if values is None:
        values = _partition_values(partition_spec, schema, chunk)
    order = _sort_indices(chunk, spec) if sorting is None else sorting.result()
    if values is None:  # a transform Arrow cannot compute here: pyiceberg's own way
        fallback: list[tuple[PartitionKey | None, pa.Table]] = [
            *partitions(partition_spec, schema, sort_rows(chunk, spec))
        ]
        return fallback
    if order is None:
        order = pa.array(np.arange(chunk.num_rows))
    values = values.take(order)
    by_value, starts = _grouped(values)
    ends = [*starts[1:], values.num_rows]
    positions = by_value.take(pa.array(starts))  # of each partition's first row among the sorted rows
    rows = _take(chunk, order.take(by_value))
    names = values.take(positions).to_pylist()
    return [
        (_partition_key(partition_spec, schema, key), rows.slice(start, end - start))
        for _, start, end, key in sorted(zip(positions.to_pylist(), starts, ends, names, strict=True))
    ]


def _grouped(values: pa.Table) -> tuple[pa.Array, list[int]]:
    """The stable order of the rows of `values` by all its columns, and where each run of equal rows starts in it.
    Values that pack into one integer a row (`_packed`; into 16 bits, numpy sorts them by radix) are sorted as
    those, 5-10 times faster than Arrow's sort of the columns."""
    ids = _packed(values.num_rows, values.columns)
    if ids is None:
        by_value = pc.sort_indices(values, sort_keys=[(name, "ascending") for name in values.column_names])
        return by_value, _run_starts(values.take(by_value))
    order = _stable_order(ids.values.astype(np.uint16) if ids.bits <= 16 else ids.values)
    grouped = ids.values[order]
    return pa.array(order), [0, *(np.flatnonzero(grouped[1:] != grouped[:-1]) + 1).tolist()]


def _partition_key(partition_spec: PartitionSpec, schema: Schema, values: dict[str, Any]) -> PartitionKey:
    """The partition of one row of `_partition_values`."""
    return PartitionKey(
        field_values=[
            PartitionFieldValue(field=field, value=value)
            for field, value in zip(partition_spec.fields, values.values(), strict=True)
        ],
        partition_spec=partition_spec,
        schema=schema,
    )


def partition_values(metadata: TableMetadata, rows: pa.Table) -> pa.Table | None:
    """Each partition field's value for every row of `rows` (of a partitioned table), or None when Arrow cannot work
    them out here (`_partition_values`): what `partition_counts` and `write_data_files` of the same rows share."""
    return _partition_values(metadata.spec(), metadata.schema(), rows)


def partition_counts(
    metadata: TableMetadata, rows: pa.Table, lengths: list[int], values: pa.Table | None = None
) -> list[int] | None:
    """How many partitions of the table each run of `rows` falls in, the runs one after the other with `lengths`
    rows; None when Arrow cannot work out the partition values here (`_partition_values`). `values`: the rows'
    `partition_values`, when the caller has them."""
    if values is None:
        values = partition_values(metadata, rows)
    if values is None:
        return None
    run = pa.array(np.repeat(np.arange(len(lengths), dtype=np.int32), lengths))
    distinct = values.append_column("_run", run).group_by([*values.column_names, "_run"]).aggregate([])
    return np.bincount(distinct.column("_run").to_numpy(), minlength=len(lengths)).tolist()


def _take(chunk: pa.Table, indices: pa.Array) -> pa.Table:
    """`chunk.take(indices)`, a column per thread (above `SERIAL_BYTES`): Arrow takes the columns of a table one after
    the other."""
    if chunk.num_columns < 2 or chunk.nbytes < SERIAL_BYTES:
        return chunk.take(indices)
    columns = ExecutorFactory.get_or_create().map(lambda column: column.take(indices), chunk.columns)
    return pa.Table.from_arrays(list(columns), schema=chunk.schema)


def _partition_values(spec: PartitionSpec, schema: Schema, chunk: pa.Table) -> pa.Table | None:
    """Each partition field's value for every row (`_calendar`, `_integer_buckets`, else pyiceberg-core's
    transforms, a column at a time), or None when a field's source is nested or its transform has no Arrow form, or
    a value could be NaN (which equals nothing, so runs of it would not group). pyiceberg-core reads the source
    column `aligned`: the buffers Flight received may not be aligned as it requires (it panics)."""
    columns: dict[str, pa.ChunkedArray] = {}
    for index, field in enumerate(spec.fields):
        name = schema.find_column_name(field.source_id)
        if name is None or chunk.schema.get_field_index(name) < 0:
            return None
        source = chunk.column(name)
        column = _calendar(field.transform, source)
        if column is None:
            column = _integer_buckets(field.transform, source)
        if column is None:
            try:
                transform = field.transform.pyarrow_transform(schema.find_field(field.source_id).field_type)
            except NotImplementedError:
                return None
            column = transform(aligned(source))
        if pa.types.is_floating(column.type):
            return None
        columns[f"_partition_{index}"] = column
    return pa.table(columns)


def _calendar(transform: Transform[Any, Any], source: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """Iceberg's year, month and day of dates and timestamps (counted from 1970, as int32) by Arrow compute, which
    is several times faster than pyiceberg-core's transforms of the same values; None for other transforms."""
    if not isinstance(transform, (YearTransform, MonthTransform, DayTransform)):
        return None
    if isinstance(transform, (YearTransform, MonthTransform)) and pa.types.is_timestamp(source.type):
        looked_up = _by_day(transform, source)
        if looked_up is not None:
            return looked_up
    if pa.types.is_timestamp(source.type):
        source = source.cast(pa.timestamp(source.type.unit))  # the UTC calendar, whatever the zone
    elif not pa.types.is_date(source.type):
        return None
    if isinstance(transform, DayTransform):
        return source.cast(pa.date32()).cast(pa.int32())
    years = pc.subtract(pc.year(source), 1970)
    if isinstance(transform, YearTransform):
        return years.cast(pa.int32())
    return pc.add(pc.multiply(years, 12), pc.subtract(pc.month(source), 1)).cast(pa.int32())


def _integer_buckets(transform: Transform[Any, Any], source: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """Iceberg's bucket of integers (ints and longs hash alike: Murmur3 x86 32-bit of the value as a little-endian
    long, seed 0), by numpy over whole columns, in place: 3 times faster than pyiceberg-core's transform, which was
    most of a put's partition values. None for other transforms or sources, with nulls, or on a big-endian machine."""
    if not isinstance(transform, BucketTransform) or source.null_count or sys.byteorder != "little":
        return None
    if not pa.types.is_integer(source.type) or pa.types.is_uint64(source.type):  # no Iceberg type is a uint64
        return None
    halves = source.combine_chunks().to_numpy().astype(np.int64).view(np.uint32).reshape(-1, 2)  # low, high
    hashes = np.zeros(len(halves), dtype=np.uint32)
    spare = np.empty_like(hashes)

    def rotate_left(values: np.ndarray, bits: int) -> None:
        np.right_shift(values, np.uint32(32 - bits), out=spare)
        values <<= np.uint32(bits)
        values |= spare

    for half in (0, 1):
        block = halves[:, half] * np.uint32(0xCC9E2D51)
        rotate_left(block, 15)
        block *= np.uint32(0x1B873593)
        hashes ^= block
        rotate_left(hashes, 13)
        hashes *= np.uint32(5)
        hashes += np.uint32(0xE6546B64)
    hashes ^= np.uint32(8)  # the length in bytes
    for shift, factor in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        np.right_shift(hashes, np.uint32(shift), out=spare)
        hashes ^= spare
        hashes *= np.uint32(factor)
    np.right_shift(hashes, np.uint32(16), out=spare)
    hashes ^= spare
    hashes &= np.uint32(0x7FFFFFFF)
    hashes %= np.uint32(transform.num_buckets)
    return pa.chunked_array([pa.array(hashes.view(np.int32))])


# Calendar days a put's timestamps may span for `_by_day` (about 180 years): a table of that many days is built in
# well under a millisecond.
CALENDAR_DAYS = 1 << 16
_UNITS_PER_DAY = {"s": 86_400, "ms": 86_400_000, "us": 86_400_000_000, "ns": 86_400_000_000_000}


def _by_day(transform: Transform[Any, Any], source: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """`_calendar`'s year or month of timestamps, by day: each day the values span is worked out once by Arrow and
    looked up for every value, 4-5 times faster than Arrow's year and month of every value (a put spans few days).
    None when a value is null or they span more than `CALENDAR_DAYS`."""
    if not len(source) or source.null_count:
        return None
    days = np.floor_divide(source.cast(pa.int64()).combine_chunks().to_numpy(), _UNITS_PER_DAY[source.type.unit])
    first, last = int(days.min()), int(days.max())
    if last - first >= CALENDAR_DAYS:
        return None
    span = pa.chunked_array([pa.array(np.arange(first, last + 1, dtype=np.int32)).cast(pa.date32())])
    calendar = _calendar(transform, span)
    assert calendar is not None  # a year or month of dates
    return pa.chunked_array([pa.array(calendar.to_numpy()[days - first])])


def _run_starts(grouped: pa.Table) -> list[int]:
    """Where each run of equal rows of `grouped` starts (nulls equal to nulls)."""
    changed = np.zeros(grouped.num_rows - 1, dtype=bool)
    for column in grouped.columns:
        after, before = column.slice(1), column.slice(0, len(column) - 1)
        differs = pc.fill_null(pc.not_equal(after, before), False)
        nulls_differ = pc.not_equal(pc.is_null(after), pc.is_null(before))
        changed |= pc.or_(differs, nulls_differ).to_numpy()
    return [0, *(np.flatnonzero(changed) + 1).tolist()]


class _FileTask(NamedTuple):
    """A data file to write: its number in the write, partition and rows."""

    number: int
    partition: PartitionKey | None
    batches: list[pa.RecordBatch]


def layout_key(metadata: TableMetadata) -> tuple[Any, ...]:
    """What of a table's metadata data files are written for (location, schema, partitioning, properties): the
    same across the versions that only add snapshots, as every append makes."""
    return (
        str(metadata.table_uuid),
        metadata.location,
        metadata.format_version,
        metadata.current_schema_id,
        metadata.default_spec_id,
        tuple(sorted(metadata.properties.items())),
    )


@dataclass(frozen=True)
class _FileContext:
    """What every data file of a chunk shares: the table's metadata, the chunk's schema in Iceberg terms, where
    files go, and how a batch becomes a file's (`file_batch`). Kept for the next chunks of the same schema to the
    same table layout (`_CONTEXTS`): working it out took a millisecond per chunk, which a group commit of one-row
    puts pays per snapshot."""

    metadata: TableMetadata
    arrow: pa.Schema
    file_schema: Schema
    batch_schema: Schema
    locations: LocationProvider
    layout: StatisticsLayout
    options: ParquetOptions  # the table's `write.parquet.*` properties, read once
    renamed: list[pa.Schema]  # the file schema of a flat batch whose columns are stored as they are, once known
    paths: dict[tuple[Any, ...], str]  # partition paths by partition values (`data_location`)

    @staticmethod
    def of(metadata: TableMetadata, arrow: pa.Schema) -> _FileContext:
        key = (layout_key(metadata), arrow)
        found = _CONTEXTS.get(key, lambda kept: kept.arrow.equals(arrow, check_metadata=True))  # ids are metadata
        if found is not None:
            return found
        batch_schema = pyarrow_to_schema(
            arrow, name_mapping=metadata.schema().name_mapping, format_version=metadata.format_version
        )
        locations = load_location_provider(metadata.location, metadata.properties)
        file_schema = sanitize_column_names(metadata.schema())
        layout = StatisticsLayout.of(file_schema, metadata.properties)
        options = parquet_options(metadata.properties)
        context = _FileContext(metadata, arrow, file_schema, batch_schema, locations, layout, options, [], {})
        _CONTEXTS.put(key, context)
        return context

    def data_location(self, name: str, partition: PartitionKey | None) -> str:
        """Where a data file of the partition goes, as the table's location provider says; each partition's path
        worked out once (pyiceberg builds the partition type anew for every file's path: 0.3 ms a file)."""
        if partition is None:
            return self.locations.new_data_location(data_file_name=name)
        values = tuple(value.value for value in partition.field_values)
        if not all(type(value) in _EXACT_KEYS for value in values):  # equal floats or decimals may print apart
            return self.locations.new_data_location(data_file_name=name, partition_key=partition)
        path = self.paths.get(values)
        if path is None:
            if len(self.paths) >= KEPT_PATHS:
                self.paths.clear()
            path = self.paths[values] = partition.to_path()
        known = _KnownPath(partition.field_values, partition.partition_spec, partition.schema, path)
        return self.locations.new_data_location(data_file_name=name, partition_key=known)

    def file_batch(self, batch: pa.RecordBatch, model: FileFormatModel) -> pa.RecordBatch:
        """The batch as a data file stores it (`to_file_schema`): when that only renames a flat batch's columns
        and gives them field ids, the columns themselves under the file schema found for the first batch
        (pyiceberg's projection walks the schema for every batch, a fifth of a one-row file's CPU)."""
        if self.renamed:
            return pa.RecordBatch.from_arrays(batch.columns, schema=self.renamed[0])
        projected = to_file_schema(self.file_schema, self.batch_schema, batch, model)
        if _stored_as_is(batch, projected, self.batch_schema):
            self.renamed.append(projected.schema)
        return projected


KEPT_CONTEXTS = 512  # table layouts whose file contexts are kept, the least recently used going first
KEPT_PATHS = 4096  # partition paths a file context keeps
_EXACT_KEYS = {int, str, bytes, bool, dt.date, dt.datetime, type(None)}  # equal only if they print alike


@dataclass(frozen=True)
class _KnownPath(PartitionKey):
    """A partition key whose path is known (`_FileContext.data_location`)."""

    path: str = ""

    def to_path(self) -> str:
        return self.path


_CONTEXTS: WeightedLru[tuple[Any, ...], _FileContext] = WeightedLru(KEPT_CONTEXTS, lambda _: 1)


def _stored_as_is(batch: pa.RecordBatch, projected: pa.RecordBatch, batch_schema: Schema) -> bool:
    """Whether `projected` holds `batch`'s columns unchanged, in order (the same field ids and types; no nested
    column, whose field ids are in its type)."""
    fields = batch_schema.fields
    if projected.num_columns != batch.num_columns or len(fields) != batch.num_columns:
        return False
    for index, field in enumerate(projected.schema):
        source = batch.schema.field(index)
        metadata = field.metadata or {}
        if pa.types.is_nested(field.type) or field.type != source.type:
            return False
        if metadata.get(b"PARQUET:field_id") != str(fields[index].field_id).encode():
            return False
    return True


def _write_file(context: _FileContext, io: FileIO, write_uuid: uuid.UUID, task: _FileTask) -> DataFile:
    """One data file, as pyiceberg's `write_file` writes it (name, field ids, statistics)."""
    model = FileFormatFactory.get(FileFormat.PARQUET)
    name = data_file_name(task.number, write_uuid, model.file_extension())
    path = context.data_location(name, task.partition)
    output = io.new_output(path)
    writer = ParquetWriter(output, context.options, context.layout)
    try:
        writer.write(pa.Table.from_batches([context.file_batch(b, model) for b in task.batches]))
        statistics = writer.close()
    except BaseException:
        writer.abort()
        raise
    return _data_file(context.metadata, path, output, task.partition, statistics)


def _data_file(
    metadata: TableMetadata,
    path: str,
    output: OutputFile,
    partition: PartitionKey | None,
    statistics: DataFileStatistics,
) -> DataFile:
    return DataFile.from_args(
        content=DataFileContent.DATA,
        file_path=path,
        file_format=FileFormat.PARQUET,
        partition=partition.partition if partition is not None else Record(),
        file_size_in_bytes=len(output),
        sort_order_id=None,
        spec_id=metadata.default_spec_id,
        equality_ids=None,
        key_metadata=None,
        **statistics.to_serialized_dict(),
    )


class _CreatedFiles(FileIO):
    """A FileIO that remembers each file it creates (from several threads), so that an abandoned write can delete
    them all."""

    def __init__(self, io: FileIO):
        super().__init__(io.properties)
        self.io = io
        self._created: list[str] = []
        self._lock = threading.Lock()

    def new_input(self, location: str) -> InputFile:
        return self.io.new_input(location)

    def new_output(self, location: str) -> OutputFile:
        return _TrackedOutput(self, self.io.new_output(location))

    def created(self, output: OutputFile, overwrite: bool) -> OutputStream:
        """Create the file and remember it."""
        stream = output.create(overwrite)
        with self._lock:
            self._created.append(output.location)
        return stream

    def delete(self, location: str | InputFile | OutputFile) -> None:
        self.io.delete(location)

    def abandon(self) -> None:
        """Delete the files created (all finished: `write_data_files` waits for them)."""
        with self._lock:
            created, self._created = self._created, []
        delete_files(self.io, created)


class _TrackedOutput(OutputFile):
    """An output file whose creation `_CreatedFiles` records (pyiceberg names a file's location well before it
    creates it, from another thread)."""

    def __init__(self, files: _CreatedFiles, output: OutputFile):
        super().__init__(output.location)
        self.files, self.output = files, output

    def __len__(self) -> int:
        return len(self.output)

    def exists(self) -> bool:
        return self.output.exists()

    def to_input_file(self) -> InputFile:
        return self.output.to_input_file()

    def create(self, overwrite: bool = False) -> OutputStream:
        return self.files.created(self.output, overwrite)


# What the server writes unless a table says otherwise, set on the tables it creates (`flight-bench parquet`,
# docs/benchmarks.md): LZ4 (LZ4_RAW) decodes about twice as fast as pyiceberg's default zstd; dictionaries of at
# most 256 KB a column chunk leave high-cardinality columns (random floats, ids) plain-encoded after a few pages
# instead of hashing 2 MB of values first, which made files larger and both writes and decodes slower. (A column
# whose sampled values are all distinct gets no dictionary at all: `dictionary_columns`.)
PARQUET_DEFAULTS: dict[str, str] = {
    TableProperties.PARQUET_COMPRESSION: "lz4",
    TableProperties.PARQUET_DICT_SIZE_BYTES: str(256 << 10),
}
_CODECS = {"zstd", "snappy", "lz4", "gzip", "brotli", "uncompressed", "none"}


@dataclass(frozen=True)
class ParquetOptions:
    """How a data file is written, from the table's `write.parquet.*` properties (Iceberg's names and defaults).

    `write.parquet.row-group-size-bytes`, when set, caps the rows of a row group by the Arrow size of the rows
    written (as `write.target-file-size-bytes` sizes files); `write.parquet.row-group-limit` caps them by count.
    `write.parquet.page-row-limit` caps the rows of a page."""

    writer: dict[str, Any]  # pyarrow.parquet.ParquetWriter's options
    row_group_rows: int
    row_group_bytes: int | None

    def rows_per_group(self, table: pa.Table) -> int:
        """The rows of each row group of `table`."""
        if self.row_group_bytes is None or not table.num_rows:
            return self.row_group_rows
        per_row = max(table.nbytes / table.num_rows, 1e-6)
        return max(1, min(self.row_group_rows, int(self.row_group_bytes / per_row)))


def writable_partitioning(metadata: TableMetadata) -> None:
    """Refuse a table whose partition spec has two fields of one column (`bucket(8, id)` and `identity(id)`, as Java's
    Iceberg allows and pyiceberg's `update_spec` adds): pyiceberg's partition keys, with which the files are filed,
    cannot hold them ('Cannot have redundant partitions'); nor a format-1 table's field replaced by another of its
    column, which format 1 keeps as a `void` field. Asked before anything is written."""
    for source, fields in metadata.spec().source_id_to_fields_map.items():
        if len(fields) > 1:
            column = metadata.schema().find_column_name(source)
            raise RequestError(
                f"cannot write to the table: its partition spec has {len(fields)} fields of column {column!r} "
                f"({', '.join(f'{f.name}: {f.transform}' for f in fields)}), which this server (with pyiceberg) "
                "cannot file rows under; nothing was written"
            )


def parquet_options(properties: Properties) -> ParquetOptions:
    """The Parquet writer's options for a table's properties; ValueError names a property it cannot use."""

    def number(name: str, default: int | None, least: int = 1) -> int | None:
        text = properties.get(name)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"table property {name}={text!r} is not a whole number") from None
        if value < least:
            raise ValueError(f"table property {name}={text!r} must be at least {least}")
        return value

    codec = properties.get(TableProperties.PARQUET_COMPRESSION, TableProperties.PARQUET_COMPRESSION_DEFAULT).lower()
    if codec not in _CODECS:
        raise ValueError(
            f"table property {TableProperties.PARQUET_COMPRESSION}={codec!r} is not one of {', '.join(sorted(_CODECS))}"
        )
    codec = "none" if codec == "uncompressed" else codec
    level = number(TableProperties.PARQUET_COMPRESSION_LEVEL, None, least=-(2**31))
    if level is not None and codec not in ("zstd", "gzip", "brotli"):
        raise ValueError(f"table property {TableProperties.PARQUET_COMPRESSION_LEVEL} does not apply to {codec}")
    writer = {
        "compression": codec,
        "compression_level": level,
        "data_page_size": number(
            TableProperties.PARQUET_PAGE_SIZE_BYTES, TableProperties.PARQUET_PAGE_SIZE_BYTES_DEFAULT
        ),
        "dictionary_pagesize_limit": number(
            TableProperties.PARQUET_DICT_SIZE_BYTES, TableProperties.PARQUET_DICT_SIZE_BYTES_DEFAULT
        ),
        "max_rows_per_page": number(
            TableProperties.PARQUET_PAGE_ROW_LIMIT, TableProperties.PARQUET_PAGE_ROW_LIMIT_DEFAULT
        ),
    }
    rows = number(TableProperties.PARQUET_ROW_GROUP_LIMIT, TableProperties.PARQUET_ROW_GROUP_LIMIT_DEFAULT)
    assert rows is not None
    return ParquetOptions(writer, rows, number(TableProperties.PARQUET_ROW_GROUP_SIZE_BYTES, None))


@dataclass(frozen=True)
class StatisticsLayout:
    """What pyiceberg needs to turn a Parquet footer into a manifest's statistics: the same for every file of a
    schema and properties, and worth working out once (each call rebuilds the schema's struct, 9 ms a file of
    a narrow table, under the GIL). `checked`: the (field id, Parquet physical type) pairs pyiceberg accepted, each
    with whether the column's raw statistics are its values (`_raw_values`); the files of a layout store a field
    alike, so each pair is looked at once."""

    plan: dict[int, StatisticsCollector]
    columns: dict[str, int]
    checked: dict[tuple[int, str], bool] = default(default_factory=dict)

    @staticmethod
    def of(file_schema: Schema, properties: Properties) -> StatisticsLayout:
        return StatisticsLayout(
            compute_statistics_plan(file_schema, properties), parquet_path_to_id_mapping(file_schema)
        )


@dataclass(frozen=True)
class _Bounded(DataFileStatistics):
    """Statistics whose bounds are serialized already (`file_statistics`): no aggregates left to serialize."""

    lower_bounds: dict[int, bytes] = default(default_factory=dict)
    upper_bounds: dict[int, bytes] = default(default_factory=dict)

    def to_serialized_dict(self) -> dict[str, Any]:
        return {**super().to_serialized_dict(), "lower_bounds": self.lower_bounds, "upper_bounds": self.upper_bounds}


def file_statistics(footer: pq.FileMetaData, layout: StatisticsLayout) -> DataFileStatistics:
    """A data file's statistics for its manifest entry, as pyiceberg's `data_file_statistics_from_parquet_metadata`
    gives them. A file of one row group (every small file) is read here with what the layout worked out once:
    pyiceberg's own reading builds objects per column (a metrics mode, an aggregator that checks the column's
    physical type through a schema visitor, a truncate transform per bound), a fifth of a grouped one-row put's
    CPU. Anything else (several row groups, decimals, a column without statistics, a type pyiceberg refuses) is
    pyiceberg's."""
    quick = _one_row_group(footer, layout)
    if quick is not None:
        return quick
    return data_file_statistics_from_parquet_metadata(
        parquet_metadata=footer, stats_columns=layout.plan, parquet_column_mapping=layout.columns
    )


def _one_row_group(footer: pq.FileMetaData, layout: StatisticsLayout) -> _Bounded | None:
    """`file_statistics` of a file of one row group, or None to leave it to pyiceberg."""
    if footer.num_row_groups != 1:
        return None
    group = footer.row_group(0)
    first = group.column(0)
    dictionary = first.has_dictionary_page and first.dictionary_page_offset < first.data_page_offset
    split = first.dictionary_page_offset if dictionary else first.data_page_offset
    sizes: dict[int, int] = {}
    values: dict[int, int] = {}
    nulls: dict[int, int] = {}
    lower: dict[int, bytes] = {}
    upper: dict[int, bytes] = {}
    try:
        for position in range(footer.num_columns):
            column = group.column(position)
            field_id = layout.columns[column.path_in_schema]
            collector = layout.plan[field_id]
            kind, length, kind_of = collector.mode.type, collector.mode.length, collector.iceberg_type
            sizes[field_id] = column.total_compressed_size  # one row group: one chunk a column
            if kind == MetricModeTypes.NONE:
                continue
            values[field_id] = column.num_values
            if not column.is_stats_set:
                return None
            statistics = column.statistics
            if statistics.has_null_count:
                nulls[field_id] = statistics.null_count
            if kind == MetricModeTypes.COUNTS:
                continue
            if isinstance(kind_of, DecimalType):
                return None
            raw = layout.checked.get((field_id, physical := statistics.physical_type))
            if raw is None:
                StatsAggregator(kind_of, physical, length)  # refuses a physical type pyiceberg refuses
                raw = layout.checked[(field_id, physical)] = _raw_values(kind_of, statistics.logical_type, length)
            low, high = (statistics.min_raw, statistics.max_raw) if raw else (statistics.min, statistics.max)
            if low is not None:
                lower[field_id] = to_bytes(kind_of, low if length is None else low[:length])
            if high is None:
                continue
            bound: str | bytes | None
            if isinstance(kind_of, StringType):
                if not isinstance(high, str):
                    return None
                bound = truncate_upper_bound_text_string(high, length)
            elif isinstance(kind_of, BinaryType):
                if not isinstance(high, bytes):
                    return None
                bound = truncate_upper_bound_binary_string(high, length)
            elif length is not None:
                return None
            else:
                bound = high
            if bound is not None:
                upper[field_id] = to_bytes(kind_of, bound)
    except (ValueError, TypeError, pa.ArrowException):  # pyiceberg's reading says what is wrong
        return None
    return _Bounded(footer.num_rows, sizes, values, nulls, {}, {}, [split], lower, upper)


# Iceberg types whose Parquet statistics, read raw (the stored integers and floats), are what pyiceberg's `to_bytes`
# takes, when the column's logical type (or none) is the one given: pyarrow's conversion of each raw value to a
# date or datetime, which `to_bytes` turns back into the same integer, was half of the statistics' CPU.
_RAW_LOGICAL: dict[type[PrimitiveType], str] = {
    BooleanType: "NONE",
    IntegerType: "NONE",
    LongType: "NONE",
    FloatType: "NONE",
    DoubleType: "NONE",
    DateType: "DATE",
    TimestampType: "TIMESTAMP",
    TimestamptzType: "TIMESTAMP",
}


def _raw_values(kind: PrimitiveType, logical: ParquetLogicalType, length: int | None) -> bool:
    """Whether a column's raw statistics (`min_raw`) are the values `to_bytes` takes for its Iceberg type, as the
    converted ones (`min`) are: numbers stored as themselves, dates as days and timestamps as microseconds."""
    wanted = _RAW_LOGICAL.get(type(kind))
    if wanted is None or length is not None or logical.type != wanted:
        return False
    return wanted != "TIMESTAMP" or json.loads(logical.to_json()).get("timeUnit") == "microseconds"


class ParquetWriter(FileFormatWriter):
    """One Parquet data file, written as pyiceberg writes it (field ids, statistics for the manifest), with every
    `write.parquet.*` property honoured (`parquet_options`)."""

    def __init__(self, output: OutputFile, options: ParquetOptions, layout: StatisticsLayout):
        self._output, self._layout, self._options = output, layout, options
        self._writer: pq.ParquetWriter | None = None
        self._stream: OutputStream | None = None

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            stream = self._output.create(overwrite=True)
            try:
                self._writer = pq.ParquetWriter(
                    stream,
                    schema=table.schema,
                    store_decimal_as_integer=True,
                    use_dictionary=dictionary_columns(table, self._options.writer["dictionary_pagesize_limit"]),
                    **self._options.writer,
                )
            except BaseException:
                stream.close()
                raise
            self._stream = stream
        try:
            self._writer.write_table(table, row_group_size=self._options.rows_per_group(table))
        except BaseException:
            self.abort()
            raise

    def close(self) -> DataFileStatistics:
        if self._result is not None:
            return self._result
        if self._writer is None or self._stream is None:
            raise ValueError("a data file with no rows")
        with self._stream:
            self._writer.close()
        self._result = file_statistics(self._writer.writer.metadata, self._layout)
        return self._result

    def abort(self) -> None:
        """Close a file that will be deleted, its rows unfinished (a failed write): no statistics, no errors, and
        no open handle or upload left behind."""
        writer, stream, self._writer, self._stream = self._writer, self._stream, None, None
        for close in (writer.close if writer else None, stream.close if stream else None):
            if close is not None:
                try:
                    close()
                except Exception:  # the file is deleted next either way
                    log.debug("could not close a data file being abandoned", exc_info=True)


def target_file_size(metadata: TableMetadata) -> int:
    """The table's `write.target-file-size-bytes`: Iceberg's default (512 MiB) without it."""
    size = property_as_int(
        metadata.properties,
        TableProperties.WRITE_TARGET_FILE_SIZE_BYTES,
        TableProperties.WRITE_TARGET_FILE_SIZE_BYTES_DEFAULT,
    )
    return max(1, size or TableProperties.WRITE_TARGET_FILE_SIZE_BYTES_DEFAULT)


def parquet_bytes_per_row(files: list[DataFile]) -> float:
    """What a row of these data files takes in Parquet: the first estimate of the files a rewrite of them writes."""
    rows = sum(f.record_count for f in files)
    return sum(f.file_size_in_bytes for f in files) / rows if rows else 1.0


class _OpenFile(NamedTuple):
    """A data file being written: where, its writer, and its partition."""

    path: str
    output: OutputFile
    writer: ParquetWriter
    partition: PartitionKey | None


class RollingFiles:
    """A stream's rows in data files of about the table's target size (`target_file_size`), per partition.

    A rewrite (compaction, a copy-on-write delete) holds only a chunk of its rows at a time, yet should
    leave few well-sized files, as Iceberg's own rewrites do: each partition's file stays open over the
    chunks and rolls to a new one when its estimated Parquet size reaches the target. The estimate is the
    Parquet bytes per row of the files written so far (at first `bytes_per_row`, of the files rewritten);
    files are written as pyiceberg writes them (field ids, statistics, names, locations).
    """

    def __init__(self, metadata: TableMetadata, io: FileIO, bytes_per_row: float):
        self.metadata = metadata
        self.io = io
        self.target = target_file_size(metadata)
        self.files: list[DataFile] = []
        self._first_estimate = max(bytes_per_row, 1e-6)  # it divides
        self._open: dict[str, tuple[_OpenFile, int]] = {}  # by partition path: the file and its rows
        self._uuid, self._counter = uuid.uuid4(), itertools.count()
        self._format = FileFormatFactory.get(FileFormat.PARQUET)
        self._file_schema = sanitize_column_names(metadata.schema())
        self._locations = load_location_provider(metadata.location, metadata.properties)
        self._layout = StatisticsLayout.of(self._file_schema, metadata.properties)
        self._options = parquet_options(metadata.properties)
        writable_partitioning(metadata)

    def _bytes_per_row(self) -> float:
        rows = sum(f.record_count for f in self.files)
        return sum(f.file_size_in_bytes for f in self.files) / rows if rows else self._first_estimate

    def write(self, chunk: pa.Table) -> None:
        """Add a chunk's rows to their partitions' files, rolling over at the target size."""
        if not chunk.num_rows:
            return
        chunk_schema = pyarrow_to_schema(
            chunk.schema, name_mapping=self.metadata.schema().name_mapping, format_version=self.metadata.format_version
        )
        for partition, rows in partitioned_rows(self.metadata, chunk, None):
            key = partition.to_path() if partition is not None else ""
            while rows.num_rows:
                if key not in self._open:  # open before its first write, so that `abort` finds it if that fails
                    self._open[key] = (self._start(partition), 0)
                file, written = self._open[key]
                per_row = self._bytes_per_row()
                fits = math.ceil((self.target - written * per_row) / per_row)
                if fits <= 0:  # full by a later estimate
                    self._finish(key)
                    continue
                taken = rows.slice(0, fits)
                rows = rows.slice(fits)
                batches = [to_file_schema(self._file_schema, chunk_schema, b, self._format) for b in taken.to_batches()]
                file.writer.write(pa.Table.from_batches(batches))
                self._open[key] = (file, written + taken.num_rows)
                if (written + taken.num_rows) * per_row >= self.target:
                    self._finish(key)

    def close(self) -> list[DataFile]:
        """Finish the open files; all the data files written."""
        for key in list(self._open):
            self._finish(key)
        return self.files

    def abort(self) -> None:
        """Delete every file written or being written (best effort: nothing references them)."""
        for file, _ in self._open.values():
            file.writer.abort()
        delete_files(self.io, [*(f.file_path for f in self.files), *(f.path for f, _ in self._open.values())])
        self._open.clear()

    def _start(self, partition: PartitionKey | None) -> _OpenFile:
        name = data_file_name(next(self._counter), self._uuid, self._format.file_extension())
        path = self._locations.new_data_location(data_file_name=name, partition_key=partition)
        output = self.io.new_output(path)
        writer = ParquetWriter(output, self._options, self._layout)
        return _OpenFile(path, output, writer, partition)

    def _finish(self, key: str) -> None:
        file, _ = self._open[key]
        statistics = file.writer.close()  # still open if this fails (its last rows: a full disk), for `abort`
        del self._open[key]
        self.files.append(_data_file(self.metadata, file.path, file.output, file.partition, statistics))


def write_reader(
    metadata: TableMetadata,
    reader: pa.RecordBatchReader,
    io: FileIO,
    spec: FeatureSpec | None,
    chunk_bytes: int,
    bytes_per_row: float,
) -> list[DataFile]:
    """A stream rewritten into data files of the table's target size (`RollingFiles`), taken in chunks of about
    `chunk_bytes` (each sorted as a put sorts its chunks): memory stays bounded. `bytes_per_row` estimates
    the files' Parquet size until the first is written (`parquet_bytes_per_row` of the files rewritten).
    Files already written are deleted if it fails."""
    files = RollingFiles(metadata, io, bytes_per_row)
    pending: list[pa.RecordBatch] = []
    try:
        for batch in reader:
            pending.append(batch)
            if sum(b.nbytes for b in pending) >= chunk_bytes:
                files.write(sort_rows(pa.Table.from_batches(pending, schema=reader.schema), spec))
                pending.clear()
        files.write(sort_rows(pa.Table.from_batches(pending, schema=reader.schema), spec))
        return files.close()
    except BaseException:
        files.abort()
        raise
