"""Self-check for ``tests/services.py``: start each service and use it for real.

Run with ``.venv/bin/python tests/check_services.py``; exits non-zero if any
check fails.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import duckdb
import pyarrow as pa
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.table import Table

# Run as a script, so this file's directory (tests/) is on sys.path.
from services import postgres_server, seaweedfs_server

SCHEMA = pa.schema([pa.field("id", pa.int64()), pa.field("name", pa.string())])
ROWS = pa.table({"id": [1, 2, 3], "name": ["a", "b", "c"]}, schema=SCHEMA)

results: list[tuple[str, bool, str]] = []


def check(name: str, fn: Callable[[], Any]) -> Any:
    """Run one check, record and print its outcome, and return its value (None on failure)."""
    t0 = time.perf_counter()
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - report every failure
        detail = f"{type(exc).__name__}: {exc}"
        results.append((name, False, detail))
        print(f"FAIL {name} ({time.perf_counter() - t0:.2f}s): {detail}")
        traceback.print_exc()
        return None
    detail = f"{time.perf_counter() - t0:.2f}s"
    results.append((name, True, detail))
    print(f"ok   {name} ({detail})")
    return value


def roundtrip(catalog: Catalog, ident: str) -> Table:
    """Create namespace + table, append ROWS, read back and compare."""
    namespace = ident.rsplit(".", 1)[0]
    catalog.create_namespace_if_not_exists(namespace)
    table = catalog.create_table(ident, schema=SCHEMA)
    table.append(ROWS)
    got = catalog.load_table(ident).scan().to_arrow().sort_by("id")
    if not got.equals(ROWS):
        raise AssertionError(f"read back differs:\n{got}")
    return catalog.load_table(ident)


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
        path = (
            pkg / "extensions" / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
        )
        con.execute(f"LOAD '{path}'")
    return con


def duckdb_scan(props: dict[str, str], table: Table) -> int:
    """Read ``table`` through DuckDB ``iceberg_scan`` on S3 and compare with ROWS."""
    con = duckdb_connection()
    endpoint = urlparse(props["s3.endpoint"]).netloc
    con.execute(
        "CREATE SECRET (TYPE s3, KEY_ID ?, SECRET ?, REGION ?, ENDPOINT ?, "
        "URL_STYLE 'path', USE_SSL false)",
        [
            props["s3.access-key-id"],
            props["s3.secret-access-key"],
            props["s3.region"],
            endpoint,
        ],
    )
    got = con.execute(
        "SELECT * FROM iceberg_scan(?) ORDER BY id", [table.metadata_location]
    ).to_arrow_table()
    if got.to_pylist() != ROWS.to_pylist():
        raise AssertionError(f"duckdb read differs:\n{got}")
    return got.num_rows


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
    """REST catalog of SeaweedFS, data on its S3; then read it via DuckDB."""
    t0 = time.perf_counter()
    with seaweedfs_server() as props:
        print(f"     seaweedfs up in {time.perf_counter() - t0:.2f}s: {props}")
        catalog = check(
            "seaweedfs: load rest catalog", lambda: load_catalog("t", **props)
        )
        if catalog is None:
            return
        table = check(
            "seaweedfs: namespace/table/append/scan", lambda: roundtrip(catalog, "ns.t")
        )
        if table is not None:
            print(f"     metadata: {table.metadata_location}")
            check(
                "seaweedfs: duckdb iceberg_scan on s3",
                lambda: duckdb_scan(props, table),
            )
        t1 = time.perf_counter()
    print(f"     seaweedfs stopped in {time.perf_counter() - t1:.2f}s")


def main() -> int:
    """Run all checks; return a process exit code."""
    check("postgres: start/stop", check_postgres)
    check("seaweedfs: start/stop", check_seaweedfs)
    failed = [r for r in results if not r[1]]
    print(f"\n{len(results) - len(failed)}/{len(results)} checks passed")
    for name, _, detail in failed:
        print(f"  FAILED {name}: {detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
