"""`flight-bench parquet`: decode speed against file size for the Parquet settings the server can write.

The scan benchmark's table is written with each setting twice: by pyarrow to one local file, whose decode
(`pyarrow.parquet.read_table`, all cores) is timed in this process, and by the server, to a table whose
`write.parquet.*` properties say the setting, read whole by a replica with no scan cache (the cold scan,
decoding every time). Settings that are no Iceberg property (dictionary, statistics) are measured in process
only. Ratios are against pyiceberg's defaults (zstd, 1 MB pages, 2 MB dictionaries, 1,048,576-row row groups),
which the server wrote before it chose its own.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from pyiceberg.catalog import load_catalog

from benchmarks import report
from benchmarks.baselines import CATALOG_NAME
from benchmarks.datagen import CREATED_TIME, ENTITY_KEY, EVENT_TIME, feature_table
from benchmarks.harness import Case, Settings, Target, local_server, measure, table_name
from benchmarks.processes import family_cpu_seconds
from flight_client import FeatureClient
from flight_server.changes.dictionaries import dictionary_columns
from flight_server.changes.files import PARQUET_DEFAULTS, parquet_options, sort_rows
from flight_server.iceberg.catalog import FeatureSpec

BASELINE = "zstd"
CODEC = "write.parquet.compression-codec"
LEVEL = "write.parquet.compression-level"
ROW_GROUP_ROWS = "write.parquet.row-group-limit"
PAGE_BYTES = "write.parquet.page-size-bytes"
DICTIONARY_BYTES = "write.parquet.dict-size-bytes"  # a column chunk past it falls back to plain encoding


class Setting(NamedTuple):
    """A way to write the files: table properties, and pyarrow options that no Iceberg property sets."""

    label: str
    properties: dict[str, str]
    extra: dict[str, Any] | None = None  # in process only

    @property
    def in_table(self) -> bool:
        return self.extra is None


SETTINGS = {
    BASELINE: Setting("zstd (pyiceberg's defaults: today's files)", {CODEC: "zstd"}),
    "zstd_3": Setting("zstd level 3", {CODEC: "zstd", LEVEL: "3"}),
    "snappy": Setting("snappy", {CODEC: "snappy"}),
    "lz4": Setting("lz4", {CODEC: "lz4"}),
    "uncompressed": Setting("uncompressed", {CODEC: "uncompressed"}),
    "zstd_groups_128k": Setting("zstd, 131,072-row row groups", {CODEC: "zstd", ROW_GROUP_ROWS: "131072"}),
    "zstd_pages_64k": Setting("zstd, 64 KB pages", {CODEC: "zstd", PAGE_BYTES: "65536"}),
    "zstd_pages_8m": Setting("zstd, 8 MB pages", {CODEC: "zstd", PAGE_BYTES: "8388608"}),
    "zstd_dictionary_256k": Setting("zstd, 256 KB dictionaries", {CODEC: "zstd", DICTIONARY_BYTES: "262144"}),
    "zstd_dictionary_64k": Setting("zstd, 64 KB dictionaries", {CODEC: "zstd", DICTIONARY_BYTES: "65536"}),
    "lz4_dictionary_256k": Setting("lz4, 256 KB dictionaries", {CODEC: "lz4", DICTIONARY_BYTES: "262144"}),
    "lz4_dictionary_64k": Setting("lz4, 64 KB dictionaries", {CODEC: "lz4", DICTIONARY_BYTES: "65536"}),
    "zstd_no_dictionary": Setting("zstd, no dictionary (in process only)", {CODEC: "zstd"}, {"use_dictionary": False}),
    "zstd_no_statistics": Setting(
        "zstd, no statistics (in process only)", {CODEC: "zstd"}, {"write_statistics": False}
    ),
    "server_default": Setting("the server's defaults for new tables", dict(PARQUET_DEFAULTS)),
    "server_default_dictionaries": Setting(
        "the server's defaults, a dictionary on every column (in process only)",
        dict(PARQUET_DEFAULTS),
        {"use_dictionary": True},
    ),
}
FEATURE_SPEC: dict[str, Any] = {"entity_keys": [ENTITY_KEY], "event_time": EVENT_TIME, "created_time": CREATED_TIME}


def write_local(data: pa.Table, path: Path, setting: Setting) -> int:
    """One file of the rows as the server sorts and encodes them (no dictionary for a column of distinct values:
    `dictionary_columns`), written with the setting; its size."""
    options = parquet_options(setting.properties)
    pq.write_table(
        data,
        path,
        row_group_size=options.rows_per_group(data),
        store_decimal_as_integer=True,
        **{
            "use_dictionary": dictionary_columns(data, options.writer["dictionary_pagesize_limit"]),
            **options.writer,
            **(setting.extra or {}),
        },
    )
    return path.stat().st_size


def write_table(client: FeatureClient, catalog_properties: dict[str, str], data: pa.Table, setting: Setting) -> str:
    """A server table of the rows whose files the server wrote with the setting (its table properties; the server's
    defaults for new tables removed where the setting says nothing)."""
    name = table_name("parquet")
    client.write(name, data.slice(0, 1), **FEATURE_SPEC)
    with load_catalog(CATALOG_NAME, **catalog_properties).load_table(name).transaction() as transaction:
        if unset := [key for key in PARQUET_DEFAULTS if key not in setting.properties]:
            transaction.remove_properties(*unset)
        transaction.set_properties(setting.properties)
    client.write(name, data, mode="overwrite")
    return name


class ColdScans:
    """Whole-table reads through a replica with no scan cache, and the CPU its processes used for them (the serving
    process's; a write process's too, though a replica that only reads starts none)."""

    def __init__(self, client: FeatureClient, pid: int | None):
        self.client, self.pid = client, pid
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}

    def case(self, key: str, name: str) -> Case:
        def run() -> None:
            cpu = family_cpu_seconds(self.pid) if self.pid is not None else 0.0
            start = time.perf_counter()
            self.client.scan(name).read_all()
            self.wall[key] = self.wall.get(key, 0.0) + time.perf_counter() - start
            if self.pid is not None:
                self.cpu[key] = self.cpu.get(key, 0.0) + family_cpu_seconds(self.pid) - cpu

        return Case(run)

    def cores(self, key: str) -> float | None:
        return self.cpu[key] / self.wall[key] if key in self.cpu and self.wall.get(key) else None


def run(target: Target, settings: Settings) -> dict[str, Any]:
    data = feature_table(settings.rows, settings.entities, settings.seed, settings.features)
    sorted_rows = sort_rows(data, FeatureSpec(tuple(FEATURE_SPEC["entity_keys"]), EVENT_TIME, CREATED_TIME))
    properties = target.catalog_properties()
    sizes: dict[str, int] = {}
    tables: dict[str, str] = {}
    cases: dict[str, Case] = {}
    with tempfile.TemporaryDirectory(prefix="flight-bench-parquet-") as tmp, contextlib.ExitStack() as stack:
        for key, setting in SETTINGS.items():
            path = Path(tmp) / f"{key}.parquet"
            sizes[key] = write_local(sorted_rows, path, setting)
            cases[f"decode/{key}"] = Case(functools.partial(pq.read_table, path))
        cold: ColdScans | None = None
        if properties is not None and target.warehouse is not None:
            client = stack.enter_context(FeatureClient(target.location))
            for key, setting in SETTINGS.items():
                if setting.in_table:
                    report.progress(f"parquet: the server writes {settings.rows:,} rows with {setting.label}")
                    tables[key] = write_table(client, properties, data, setting)
            report.progress("parquet: starting a replica without a scan cache for the cold scans")
            replica = stack.enter_context(
                local_server(target.catalog_config, target.warehouse, args=["--scan-cache-mb", "0"])
            )
            cold = ColdScans(stack.enter_context(FeatureClient(replica.location)), replica.pid)
            for key, name in tables.items():
                cases[f"cold/{key}"] = cold.case(key, name)
        report.progress(f"parquet: timing {len(cases)} reads, interleaved")
        timings = measure(cases, settings.repeat, settings.warmup, "parquet")
    results = []
    for key, setting in SETTINGS.items():
        decode, base = timings[f"decode/{key}"], timings[f"decode/{BASELINE}"]
        entry: dict[str, Any] = {
            "setting": key,
            "label": setting.label,
            "properties": setting.properties,
            "file_mb": sizes[key] / report.MB,
            "size_ratio": sizes[key] / sizes[BASELINE],
            "decode": {**decode.as_dict(), "rows_per_s": data.num_rows / decode.median},
            "decode_ratio": base.median / decode.median,
        }
        if f"cold/{key}" in timings:
            scan, base_scan = timings[f"cold/{key}"], timings[f"cold/{BASELINE}"]
            entry["cold_scan"] = {**scan.as_dict(), "rows_per_s": data.num_rows / scan.median}
            entry["cold_ratio"] = base_scan.median / scan.median
            entry["server_cpu_cores"] = cold.cores(key) if cold is not None else None
        results.append(entry)
    return {
        "rows": data.num_rows,
        "columns": data.num_columns,
        "arrow_mb": data.nbytes / report.MB,
        "baseline": BASELINE,
        "results": results,
    }


def render(result: dict[str, Any]) -> str:
    header = (
        f"parquet: {result['rows']:,} rows x {result['columns']} columns = {result['arrow_mb']:.1f} MB of Arrow "
        "(the scan table); decode: pyarrow.parquet.read_table of one local file; cold scan: a server table "
        "written with the setting, read whole by a replica without scan cache; ratios against zstd (today's)"
    )
    rows = []
    for r in result["results"]:
        scan = r.get("cold_scan")
        cores = r.get("server_cpu_cores")
        rows.append(
            [
                r["label"],
                report.megabytes(r["file_mb"]),
                report.ratio(r["size_ratio"]),
                report.seconds(r["decode"]["median_s"]),
                report.rate(r["decode"]["rows_per_s"]),
                report.ratio(r["decode_ratio"]),
                report.seconds(scan["median_s"]) if scan else "-",
                report.rate(scan["rows_per_s"]) if scan else "-",
                report.ratio(r["cold_ratio"]) if scan else "-",
                f"{cores:.2f}" if cores is not None else "-",
            ]
        )
    headers = [
        "setting",
        "file MB",
        "size vs zstd",
        "decode s",
        "decode rows/s",
        "decode vs zstd",
        "cold scan s",
        "cold rows/s",
        "cold vs zstd",
        "server cores",
    ]
    return "\n".join([header, report.table(headers, rows)])
