"""`flight-bench scan`: how fast a whole table reaches a client, next to the raw Flight ceiling.

The ceiling is the same Arrow table served from memory by a minimal Flight server in the same
run, in the very batches our scan sent (the same bytes in the same messages): the ratio says what share of
the transport's capacity our scan uses.
The scan is read over one stream, and over several endpoints fetched in parallel. Repeated reads
stream from the server's scan cache (warm); when the benchmark started the server, a replica on
the same catalog with the cache off measures the cold read, which decodes the Parquet every time.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from benchmarks import ceiling, report
from benchmarks.baselines import LocalReaders
from benchmarks.datagen import CREATED_TIME, ENTITY_KEY, EVENT_TIME, feature_table
from benchmarks.harness import Case, Settings, Target, local_server, measure, table_name
from flight_client import FeatureClient
from flight_server.base.config import ServerConfig

SERVER_BATCH_ROWS = ServerConfig.batch_rows
CEILING = "raw_flight_ceiling"
PARALLEL_ENDPOINTS = (2, 4)
CODECS = ("lz4", "zstd")  # `compression` a client may ask for: loopback pays their CPU, real networks gain
LABELS = {
    CEILING: "raw Flight do_get of the table in memory (ceiling)",
    "flight_arrow": "Flight scan -> Arrow (scan cache warm)",
    "flight_arrow_cold": "Flight scan -> Arrow, no scan cache (cold: decodes every time)",
    "flight_pandas": "Flight scan -> pandas",
    **{f"flight_arrow_{codec}": f"Flight scan -> Arrow, {codec} on the wire" for codec in CODECS},
    "duckdb_local": "DuckDB iceberg_scan, in process (no Flight)",
    "duckdb_cold_local": "DuckDB iceberg_scan, in process, its file cache off (cold)",
    "pyiceberg_local": "pyiceberg scan().to_arrow(), in process (no Flight)",
}
COLD_PEERS = ("duckdb_cold_local", "pyiceberg_local")  # in-process reads that fetch and decode every time


def run(target: Target, settings: Settings) -> dict[str, Any]:
    data = feature_table(settings.rows, settings.entities, settings.seed, settings.features)
    name = table_name("scan")
    with FeatureClient(target.location) as client:
        report.progress(f"scan: writing {settings.rows:,} rows to {name}")
        start = time.perf_counter()
        client.write(name, data, entity_keys=[ENTITY_KEY], event_time=EVENT_TIME, created_time=CREATED_TIME)
        write_seconds = time.perf_counter() - start
        received = client.scan(name).read_all()
        if received.num_rows != data.num_rows:
            raise RuntimeError(f"the scan returned {received.num_rows} rows; {data.num_rows} were written")
        labels = dict(LABELS)
        for n in PARALLEL_ENDPOINTS:
            rows = client.read_table(name, partitions=n).num_rows
            if rows != data.num_rows:
                raise RuntimeError(f"the scan over {n} endpoints returned {rows} rows; {data.num_rows} were written")
            endpoints = len(client.flight_info(name, partitions=n).endpoints)  # fewer when the table has fewer files
            labels[f"flight_arrow_{n}"] = f"Flight scan -> Arrow over {endpoints} parallel endpoints"
        properties = target.catalog_properties()
        local = LocalReaders(properties) if properties else None
        cold_local = LocalReaders(properties, duckdb_file_cache=False) if properties else None
        with contextlib.ExitStack() as stack:
            compressed = {c: stack.enter_context(FeatureClient(target.location, compression=c)) for c in CODECS}
            location = stack.enter_context(ceiling.ceiling_server(received))
            raw = stack.enter_context(flight.FlightClient(location))
            cold = None
            if target.warehouse is not None:
                report.progress("scan: starting a replica without a scan cache for the cold reads")
                uncached = local_server(target.catalog_config, target.warehouse, args=["--scan-cache-mb", "0"])
                cold = stack.enter_context(FeatureClient(stack.enter_context(uncached).location))
            cases = {
                CEILING: Case(lambda: ceiling.read(raw)),
                "flight_arrow": Case(lambda: client.scan(name).read_all()),
                **{
                    f"flight_arrow_{n}": Case(functools.partial(client.read_table, name, partitions=n))
                    for n in PARALLEL_ENDPOINTS
                },
                "flight_pandas": Case(lambda: client.scan(name).read_pandas()),
                **{f"flight_arrow_{c}": Case(functools.partial(_read_all, compressed[c], name)) for c in CODECS},
            }
            if cold is not None:
                cases["flight_arrow_cold"] = Case(functools.partial(_read_all, cold, name))
            if local is not None:
                cases["duckdb_local"] = Case(lambda: local.duckdb(name))
                cases["pyiceberg_local"] = Case(lambda: local.pyiceberg(name))
            if cold_local is not None:
                cases["duckdb_cold_local"] = Case(lambda: cold_local.duckdb(name))
            report.progress(f"scan: timing {len(cases)} read paths, interleaved")
            timings = measure(cases, settings.repeat, settings.warmup, "scan")
    ceiling_s = timings[CEILING].median
    results = {}
    for key, timing in timings.items():
        results[key] = {
            "label": labels[key],
            **timing.as_dict(),
            "rows_per_s": received.num_rows / timing.median,
            "mb_per_s": received.nbytes / report.MB / timing.median,
            "ratio_to_ceiling": ceiling_s / timing.median,
        }
    peers = [timings[k].median for k in COLD_PEERS if k in timings]
    cold_timing = timings.get("flight_arrow_cold")
    return {
        # the goals' ratios: warm against the ceiling, cold against the faster in-process cold read
        "warm_vs_ceiling": results["flight_arrow"]["ratio_to_ceiling"],
        "cold_vs_local": min(peers) / cold_timing.median if peers and cold_timing is not None else None,
        "table": name,
        "rows": received.num_rows,
        "columns": received.num_columns,
        "arrow_mb": received.nbytes / report.MB,
        "server_batch_rows": SERVER_BATCH_ROWS,
        "batches": len(received.to_batches()),
        "write_s": write_seconds,
        "wire_mb": {codec or "none": _ipc_bytes(received, codec) / report.MB for codec in (None, *CODECS)},
        "results": results,
    }


def _read_all(client: FeatureClient, name: str) -> Any:
    return client.scan(name).read_all()


def _ipc_bytes(table: pa.Table, codec: str | None) -> int:
    """The size of the scan's IPC stream in the server's batches, compressed with `codec`: what the wire carries."""
    sink = pa.MockOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=codec)) as writer:
        for batch in table.to_batches(SERVER_BATCH_ROWS):
            writer.write_batch(batch)
    return int(sink.size())


def render(result: dict[str, Any]) -> str:
    header = (
        f"scan: {result['rows']:,} rows x {result['columns']} columns = {result['arrow_mb']:.1f} MB of Arrow; "
        f"streamed in {result.get('batches', '?')} batches (at most {result['server_batch_rows']:,} rows: the server's "
        "default), the ceiling's the same"
    )
    rows = [
        [r["label"], *report.timing_cells(r), report.ratio(r["ratio_to_ceiling"])] for r in result["results"].values()
    ]
    wire = ", ".join(f"{codec} {mb:.1f} MB" for codec, mb in result.get("wire_mb", {}).items())
    lines = [header, report.table(["read path", *report.TIMING_HEADERS, "vs ceiling"], rows)]
    if result.get("warm_vs_ceiling") is not None:
        lines.append(f"warm scan vs ceiling: {report.ratio(result['warm_vs_ceiling'])} (goal 0.8x)")
    if result.get("cold_vs_local") is not None:
        cold = report.ratio(result["cold_vs_local"])
        lines.append(f"cold scan vs the faster in-process cold read: {cold} (goal 1.3x)")
    return "\n".join([*lines, f"bytes on the wire: {wire}"] if wire else lines)
