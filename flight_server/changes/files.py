"""The Parquet file writer shared by writes, deletes and compactions: sorted rows, rolled into files of
the table's `write.target-file-size-bytes`.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import uuid
from typing import NamedTuple

import pyarrow as pa
from pyiceberg.io import FileIO, InputFile, OutputFile, OutputStream
from pyiceberg.io.fileformat import FileFormatFactory, FileFormatWriter
from pyiceberg.io.pyarrow import pyarrow_to_schema
from pyiceberg.manifest import DataFile, DataFileContent, FileFormat
from pyiceberg.partitioning import PartitionKey
from pyiceberg.schema import sanitize_column_names
from pyiceberg.table import TableProperties
from pyiceberg.table.locations import load_location_provider
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.typedef import Record
from pyiceberg.utils.properties import property_as_int

from flight_server.changes.commits import delete_files
from flight_server.iceberg.catalog import FeatureSpec
from flight_server.iceberg.internals import dataframe_to_data_files, partitions, to_file_schema

log = logging.getLogger(__name__)


def sort_rows(chunk: pa.Table, spec: FeatureSpec | None) -> pa.Table:
    """A chunk's rows sorted by keys and event time, so that key lookups skip row groups."""
    if spec is None:
        return chunk
    return chunk.sort_by([(c, "ascending") for c in (*spec.entity_keys, spec.event_time)])


def write_data_files(
    metadata: TableMetadata,
    chunk: pa.Table,
    io: FileIO,
    spec: FeatureSpec | None,
    write_uuid: uuid.UUID,
    counter: itertools.count[int],
) -> list[DataFile]:
    """Parquet data files of one chunk, split by partition, rows sorted (`sort_rows`) within each file.

    pyiceberg writes a chunk's files in parallel and names none of them when one fails (a full disk): the
    files it created are deleted then, so that a failed chunk leaves nothing behind."""
    created = _CreatedFiles(io)
    try:
        return list(dataframe_to_data_files(metadata, sort_rows(chunk, spec), created, write_uuid, counter))
    except BaseException:
        created.abandon()
        raise


class _CreatedFiles(FileIO):
    """A FileIO that remembers each file it creates, so that an abandoned write can delete them all."""

    def __init__(self, io: FileIO):
        super().__init__(io.properties)
        self.io = io
        self._created: list[str] = []
        self._abandoned = False
        self._lock = threading.Lock()

    def new_input(self, location: str) -> InputFile:
        return self.io.new_input(location)

    def new_output(self, location: str) -> OutputFile:
        return _TrackedOutput(self, self.io.new_output(location))

    def created(self, output: OutputFile, overwrite: bool) -> OutputStream:
        """Create the file and remember it, or refuse once the write is abandoned. One lock around both, so
        that no file comes into being after `abandon` has taken the list to delete."""
        with self._lock:
            if self._abandoned:  # a parallel file of a failed chunk that had not started yet
                raise OSError(f"the write of {output.location} was abandoned")
            stream = output.create(overwrite)
            self._created.append(output.location)
        return stream

    def delete(self, location: str | InputFile | OutputFile) -> None:
        self.io.delete(location)

    def abandon(self) -> None:
        """Refuse new files and delete those created (one still being written vanishes with it on a local disk)."""
        with self._lock:
            self._abandoned = True
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
    writer: FileFormatWriter
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
        if self.metadata.spec().is_unpartitioned():
            parts: list[tuple[PartitionKey | None, pa.Table]] = [(None, chunk)]
        else:
            parts = list(partitions(self.metadata.spec(), self.metadata.schema(), chunk))
        for partition, rows in parts:
            key = partition.to_path() if partition is not None else ""
            while rows.num_rows:
                file, written = self._open.get(key) or (self._start(partition), 0)
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
            try:
                file.writer.close()
            except Exception:  # it is deleted next either way
                log.debug("could not close %s", file.path, exc_info=True)
        delete_files(self.io, [*(f.file_path for f in self.files), *(f.path for f, _ in self._open.values())])
        self._open.clear()

    def _start(self, partition: PartitionKey | None) -> _OpenFile:
        name = f"00000-{next(self._counter)}-{self._uuid}.{self._format.file_extension()}"
        path = self._locations.new_data_location(data_file_name=name, partition_key=partition)
        output = self.io.new_output(path)
        return _OpenFile(
            path, output, self._format.create_writer(output, self._file_schema, self.metadata.properties), partition
        )

    def _finish(self, key: str) -> None:
        file, _ = self._open.pop(key)
        statistics = file.writer.close()
        self.files.append(
            DataFile.from_args(
                content=DataFileContent.DATA,
                file_path=file.path,
                file_format=FileFormat.PARQUET,
                partition=file.partition.partition if file.partition is not None else Record(),
                file_size_in_bytes=len(file.output),
                sort_order_id=None,
                spec_id=self.metadata.default_spec_id,
                equality_ids=None,
                key_metadata=None,
                **statistics.to_serialized_dict(),
            )
        )


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
