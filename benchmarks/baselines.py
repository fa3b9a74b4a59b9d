"""Baselines: the same work done without Flight (reads in process, a plain Parquet write).

A throughput alone says little on a shared 2-core machine; its ratio to these, measured in the
same run on the same data, is what stays meaningful.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pyiceberg.catalog import load_catalog

from flight_server.reads.duck import Engine, local_path

CATALOG_NAME = "default"  # the catalog name the local server uses (SQL catalogs keep tables per name)
PARQUET_WRITE = "pyarrow.parquet.write_table, default options (snappy compression)"


class LocalReaders:
    """The same table read in this process, without Flight: by pyiceberg, and by the server's own engine.

    Both load the table through the catalog the server uses, as the server does for every scan. DuckDB keeps the
    object-storage data it read in memory (its external file cache): `duckdb_file_cache=False` makes every read
    fetch the files again, as a cold read does.
    """

    def __init__(self, properties: dict[str, str], duckdb_file_cache: bool = True):
        self._catalog = load_catalog(CATALOG_NAME, **properties)
        self._engine = Engine()
        if not duckdb_file_cache:
            self._engine.cursor().execute("SET GLOBAL enable_external_file_cache = false")

    def pyiceberg(self, table: str) -> pa.Table:
        return self._catalog.load_table(table).scan().to_arrow()

    def duckdb(self, table: str) -> pa.Table:
        """DuckDB `iceberg_scan`, as the server runs it (object-storage credentials included), minus the Flight
        stream."""
        loaded = self._catalog.load_table(table)
        self._engine.use_storage(loaded.io.properties)
        metadata = local_path(loaded.metadata_location)
        return self._engine.cursor().execute("SELECT * FROM iceberg_scan(?)", [metadata]).to_arrow_table()


def parquet_write(table: pa.Table, path: Path) -> None:
    """The floor of any Parquet-based write: one file, no catalog, no network."""
    pq.write_table(table, path)
