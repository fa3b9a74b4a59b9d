"""Self-check for ``tests/services.py``: start each service and use it for real.

Run with ``.venv/bin/python tests/check_services.py``; prints one line per
check plus start/stop timings, and exits non-zero if any check failed.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import duckdb
import pyarrow as pa
from pyarrow import fs
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.table import Table

# Run as a script, so this file's directory (tests/) is on sys.path.
from services import postgres_server, seaweedfs_server

T = TypeVar("T")

SCHEMA = pa.schema([pa.field("id", pa.int64()), pa.field("name", pa.string())])
ROWS = pa.table({"id": [1, 2, 3], "name": ["a", "b", "c"]}, schema=SCHEMA)

results: list[tuple[str, bool, str]] = []


def check(name: str, fn: Callable[[], T]) -> T | None:
    """Run one check, record and print its outcome; return its value (None on failure)."""
    t0 = time.perf_counter()
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - report every failure, keep going
        detail = f"{type(exc).__name__}: {exc}"
        results.append((name, False, detail))
        print(f"FAIL {name} ({time.perf_counter() - t0:.2f}s): {detail}")
        traceback.print_exc()
        return None
    results.append((name, True, ""))
    print(f"ok   {name} ({time.perf_counter() - t0:.2f}s)")
    return value


def roundtrip(catalog: Catalog, ident: str) -> Table:
    """Create namespace + table, append ROWS, read back and compare."""
    namespace = ident.rsplit(".", 1)[0]
    catalog.create_namespace_if_not_exists(namespace)
    table = catalog.create_table(ident, schema=SCHEMA)
    table.append(ROWS)
    table = catalog.load_table(ident)
    got = table.scan().to_arrow().sort_by("id")
    if not got.equals(ROWS):
        raise AssertionError(f"read back differs:\n{got}")
    return table


def duckdb_connection() -> duckdb.DuckDBPyConnection:
    """Open DuckDB with avro, httpfs and iceberg loaded from the PyPI extension wheels."""
    con = duckdb.connect(
        config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
        }
    )
    for name in ("avro", "httpfs", "iceberg"):
        spec = importlib.util.find_spec(f"duckdb_extension_{name}")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"duckdb_extension_{name} is not installed")
        pkg = Path(next(iter(spec.submodule_search_locations)))
        path = pkg / "extensions" / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
        con.execute(f"LOAD '{path}'")
    return con


def duckdb_s3_connection(props: dict[str, str]) -> duckdb.DuckDBPyConnection:
    """DuckDB connection with an S3 secret for the SeaweedFS S3 endpoint."""
    con = duckdb_connection()
    con.execute(
        "CREATE SECRET s3 (TYPE s3, KEY_ID ?, SECRET ?, REGION ?, ENDPOINT ?, URL_STYLE 'path', USE_SSL false)",
        [
            props["s3.access-key-id"],
            props["s3.secret-access-key"],
            props["s3.region"],
            urlparse(props["s3.endpoint"]).netloc,  # host:port, no scheme
        ],
    )
    return con


def expect_rows(got: list[tuple[Any, ...]]) -> int:
    """Compare DuckDB result rows with ROWS."""
    want = [tuple(r.values()) for r in ROWS.to_pylist()]
    if got != want:
        raise AssertionError(f"duckdb read {got}, expected {want}")
    return len(got)


def duckdb_scan(props: dict[str, str], table: Table) -> int:
    """Read ``table`` with ``iceberg_scan(<metadata.json on S3>)``."""
    con = duckdb_s3_connection(props)
    sql = "SELECT * FROM iceberg_scan(?) ORDER BY id"
    return expect_rows(con.execute(sql, [table.metadata_location]).fetchall())


def duckdb_attach(props: dict[str, str], ident: str) -> int:
    """Read ``ident`` by attaching the REST catalog in DuckDB (OAuth2 client creds)."""
    con = duckdb_s3_connection(props)
    client_id, client_secret = props["credential"].split(":", 1)
    con.execute(
        "CREATE SECRET rest (TYPE iceberg, CLIENT_ID ?, CLIENT_SECRET ?, OAUTH2_SERVER_URI ?)",
        [client_id, client_secret, f"{props['uri']}/v1/oauth/tokens"],
    )
    bucket = urlparse(props["warehouse"]).netloc
    con.execute(f"ATTACH '{bucket}' AS lake (TYPE iceberg, ENDPOINT '{props['uri']}', SECRET rest)")
    return expect_rows(con.execute(f"SELECT * FROM lake.{ident} ORDER BY id").fetchall())


def s3_object_roundtrip(props: dict[str, str]) -> int:
    """Write and read an object in the plain ``warehouse`` S3 bucket via pyarrow."""
    s3 = fs.S3FileSystem(
        access_key=props["s3.access-key-id"],
        secret_key=props["s3.secret-access-key"],
        region=props["s3.region"],
        endpoint_override=props["s3.endpoint"],
        force_virtual_addressing=False,
    )
    payload = b"hello seaweedfs"
    with s3.open_output_stream("warehouse/check/hello.txt") as out:
        out.write(payload)
    with s3.open_input_stream("warehouse/check/hello.txt") as inp:
        if inp.read() != payload:
            raise AssertionError("object content differs")
    return len(payload)


def check_postgres() -> None:
    """SQL catalog on a real PostgreSQL, data on the local filesystem."""
    t0 = time.perf_counter()
    with postgres_server() as url, tempfile.TemporaryDirectory() as wh:
        print(f"     postgres up in {time.perf_counter() - t0:.2f}s at {url}")
        catalog = check(
            "postgres: load sql catalog",
            lambda: load_catalog("t", type="sql", uri=url, warehouse=f"file://{wh}"),
        )
        if catalog is not None:
            check(
                "postgres: namespace/table/append/scan",
                lambda: roundtrip(catalog, "ns.t"),
            )
        t1 = time.perf_counter()
    print(f"     postgres stopped in {time.perf_counter() - t1:.2f}s")


def check_seaweedfs() -> None:
    """REST catalog of SeaweedFS with data on its S3; then read it via DuckDB."""
    t0 = time.perf_counter()
    with seaweedfs_server() as props:
        print(f"     seaweedfs up in {time.perf_counter() - t0:.2f}s: {props}")
        check("seaweedfs: s3 object in bucket 'warehouse'", lambda: s3_object_roundtrip(props))
        catalog = check("seaweedfs: load rest catalog", lambda: load_catalog("t", **props))
        table = None
        if catalog is not None:
            table = check(
                "seaweedfs: namespace/table/append/scan",
                lambda: roundtrip(catalog, "ns.t"),
            )
        if table is not None:
            print(f"     metadata: {table.metadata_location}")
            check(
                "seaweedfs: duckdb iceberg_scan on s3",
                lambda: duckdb_scan(props, table),
            )
            check(
                "seaweedfs: duckdb ATTACH rest catalog",
                lambda: duckdb_attach(props, "ns.t"),
            )
        t1 = time.perf_counter()
    print(f"     seaweedfs stopped in {time.perf_counter() - t1:.2f}s")


def main() -> int:
    """Run all checks; return a process exit code."""
    check("postgres: start, use, stop", check_postgres)
    check("seaweedfs: start, use, stop", check_seaweedfs)
    failed = [r for r in results if not r[1]]
    print(f"\n{len(results) - len(failed)}/{len(results)} checks passed")
    for name, _, detail in failed:
        print(f"  FAILED {name}: {detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
