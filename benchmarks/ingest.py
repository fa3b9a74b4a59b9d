"""`flight-bench ingest`: how fast `FeatureClient.write` lands rows in Iceberg, next to a plain Parquet write and
pyiceberg's own `append` in process.

Every run appends the whole generated table to a fresh table that already exists (created
untimed with one row), so runs are comparable and the figure is steady-state append speed.
With several writers, each sends an equal slice at the same time, to the same table: the
figure then includes the server retrying the commits that lost the race. The pyiceberg baseline
does the same in this process (a `Table.append` per writer, each on a thread of its own, retried
on a lost race) into a fresh table with the server table's schema, partition spec and properties
(so its Parquet settings too); it needs the server's catalog, so `--location` skips it.
"""

from __future__ import annotations

import contextlib
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.exceptions import CommitFailedException

from benchmarks import report
from benchmarks.baselines import CATALOG_NAME, PARQUET_WRITE, parquet_write
from benchmarks.datagen import CREATED_TIME, ENTITY_KEY, EVENT_TIME, feature_table
from benchmarks.harness import Case, Settings, Target, measure, table_name, writing
from flight_client import FeatureClient

NARROW_FEATURES = 1  # with the key and the two time columns: 4 columns
BATCH_ROWS = (16_384, 131_072)
WRITERS = (1, 4)
FEATURE_SPEC: dict[str, Any] = {"entity_keys": [ENTITY_KEY], "event_time": EVENT_TIME, "created_time": CREATED_TIME}


class Appends:
    """Appends `data` in batches of `batch_rows` from `writers` clients at once, to a fresh table each run."""

    def __init__(self, location: str, data: pa.Table, batch_rows: int, writers: int):
        self.clients = [FeatureClient(location) for _ in range(writers)]
        self.pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="bench-writer")
        size = -(-data.num_rows // writers)
        self.parts = [data.slice(i * size, size) for i in range(writers)]
        self.data, self.batch_rows = data, batch_rows
        self.table = ""

    def setup(self) -> None:
        self.table = table_name("ingest")
        self.clients[0].write(self.table, self.data.slice(0, 1), **FEATURE_SPEC)
        writing(self.clients[0])

    def run(self) -> None:
        futures = [
            self.pool.submit(
                client.write,
                self.table,
                pa.RecordBatchReader.from_batches(part.schema, part.to_batches(self.batch_rows)),
            )
            for client, part in zip(self.clients, self.parts, strict=True)
        ]
        for future in futures:
            future.result()

    def check(self) -> None:
        """The last run's table holds every row exactly once: a fast write that loses rows is no result."""
        rows = self.clients[0].describe(self.table)["rows"]
        if rows != self.data.num_rows + 1:
            raise RuntimeError(f"{self.table} holds {rows} rows after appending {self.data.num_rows} to 1")

    def close(self) -> None:
        self.pool.shutdown()
        for client in self.clients:
            client.close()


class PyicebergAppends:
    """pyiceberg's `append` of `data` from `writers` threads at once (equal slices), into a fresh table like
    `like` (the server's table: schema, partition spec, properties) each run."""

    def __init__(self, catalog: Catalog, like: str, data: pa.Table, writers: int):
        self.catalog = catalog
        self.like = catalog.load_table(like)
        schema = self.like.schema().as_arrow()
        size = -(-data.num_rows // writers)
        self.parts = [data.slice(i * size, size).cast(schema) for i in range(writers)]
        self.first = data.slice(0, 1).cast(schema)
        self.rows = data.num_rows
        self.pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="bench-pyiceberg")
        self.table = ""

    def setup(self) -> None:
        self.table = table_name("ingest_pyiceberg")
        self.catalog.create_table(
            self.table, schema=self.like.schema(), partition_spec=self.like.spec(), properties=self.like.properties
        ).append(self.first)

    def run(self) -> None:
        for future in [self.pool.submit(self._append, part) for part in self.parts]:
            future.result()

    def _append(self, part: pa.Table) -> None:
        while True:
            try:
                self.catalog.load_table(self.table).append(part)
                return
            except CommitFailedException:  # another writer won the race and pyiceberg's own retries ran out
                continue

    def check(self) -> None:
        snapshot = self.catalog.load_table(self.table).current_snapshot()
        rows = int(snapshot.summary["total-records"] or 0) if snapshot and snapshot.summary else 0
        if rows != self.rows + 1:
            raise RuntimeError(f"{self.table} holds {rows} rows after pyiceberg appended {self.rows} to 1")

    def close(self) -> None:
        self.pool.shutdown()


def _key(variant: dict[str, Any]) -> str:
    return "/".join(str(v) for v in variant.values())


def run(target: Target, settings: Settings) -> dict[str, Any]:
    shapes = {
        "narrow": feature_table(settings.rows, settings.entities, settings.seed, NARROW_FEATURES),
        "wide": feature_table(settings.rows, settings.entities, settings.seed, settings.features),
    }
    variants: list[dict[str, Any]] = []
    cases: dict[str, Case] = {}
    appends: list[Appends | PyicebergAppends] = []
    properties = target.catalog_properties()
    catalog = load_catalog(CATALOG_NAME, **properties) if properties is not None else None
    with tempfile.TemporaryDirectory(prefix="flight-bench-parquet-") as tmp, contextlib.ExitStack() as cleanup:
        for shape, data in shapes.items():
            for batch_rows in BATCH_ROWS:
                for writers in WRITERS:
                    put = Appends(target.location, data, batch_rows, writers)
                    cleanup.callback(put.close)
                    appends.append(put)
                    variants.append({"shape": shape, "method": "flight", "batch_rows": batch_rows, "writers": writers})
                    cases[_key(variants[-1])] = Case(put.run, put.setup)
                    like = put  # a server table of this shape, for the pyiceberg baseline's schema, spec, properties
            path = Path(tmp) / f"{shape}.parquet"
            variants.append({"shape": shape, "method": "parquet", "batch_rows": None, "writers": None})
            cases[_key(variants[-1])] = Case(partial(parquet_write, data, path))
            if catalog is not None:
                like.setup()
                for writers in WRITERS:
                    in_process = PyicebergAppends(catalog, like.table, data, writers)
                    cleanup.callback(in_process.close)
                    appends.append(in_process)
                    variants.append({"shape": shape, "method": "pyiceberg", "batch_rows": None, "writers": writers})
                    cases[_key(variants[-1])] = Case(in_process.run, in_process.setup)
        report.progress(f"ingest: timing {len(cases)} kinds of write of {settings.rows:,} rows, interleaved")
        timings = measure(cases, settings.repeat, settings.warmup, "ingest")
        for append in appends:
            append.check()
    results: list[dict[str, Any]] = []
    pyiceberg: list[dict[str, Any]] = []
    for variant in variants:
        data, timing = shapes[variant["shape"]], timings[_key(variant)]
        baseline = timings[_key({**variant, "method": "parquet", "batch_rows": None, "writers": None})]
        entry = {
            **variant,
            "columns": data.num_columns,
            **timing.as_dict(),
            "rows_per_s": data.num_rows / timing.median,
            "mb_per_s": data.nbytes / report.MB / timing.median,
            "ratio_to_parquet": baseline.median / timing.median,
        }
        same = _key({**variant, "method": "pyiceberg", "batch_rows": None})
        if variant["method"] == "flight" and same in timings:
            entry["ratio_to_pyiceberg"] = timings[same].median / timing.median
        (pyiceberg if variant["method"] == "pyiceberg" else results).append(entry)
    return {
        "rows": settings.rows,
        "arrow_mb": {shape: data.nbytes / report.MB for shape, data in shapes.items()},
        "baseline": PARQUET_WRITE,
        "results": results,
        "pyiceberg": pyiceberg,  # apart from `results`, whose entries are the charts' bars
    }


def render(result: dict[str, Any]) -> str:
    sizes = ", ".join(f"{shape} {mb:.1f} MB" for shape, mb in result["arrow_mb"].items())
    header = (
        f"ingest: {result['rows']:,} rows per write ({sizes} of Arrow), appended to an existing table "
        f"with the default partitioning; baseline: {result['baseline']}"
    )
    rows = []
    for r in [*result["results"], *result.get("pyiceberg", [])]:
        writers = f"{r['writers']} writer{'s' if (r['writers'] or 1) > 1 else ''}"
        how = {
            "parquet": "local Parquet file (baseline)",
            "pyiceberg": f"pyiceberg append in process, {writers}",
        }.get(r["method"], f"{(r['batch_rows'] or 0) // 1024}K-row batches, {writers}")
        vs_pyiceberg = report.ratio(r["ratio_to_pyiceberg"]) if "ratio_to_pyiceberg" in r else "-"
        rows.append(
            [
                f"{r['shape']} ({r['columns']} cols), {how}",
                *report.timing_cells(r),
                report.ratio(r["ratio_to_parquet"]),
                vs_pyiceberg,
            ]
        )
    headers = ["write", *report.TIMING_HEADERS, "vs Parquet", "vs pyiceberg"]
    return "\n".join([header, report.table(headers, rows)])
