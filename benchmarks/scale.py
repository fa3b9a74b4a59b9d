"""`flight-bench scale`: whole-table reads by concurrent clients against 1, 2 and 4 server processes.

Each run starts fresh replicas on the benchmark server's warehouse, each told of the others
(`--advertise`, `--peer`), so `get_flight_info` spreads a read's endpoints over all of them and the
client fetches each from the replica it names. The CPU time of every process says what limits the
throughput: when servers and client together use every core, more processes cannot help. A server's figure is
its serving process's: these replicas only read, so none of them starts a write process.
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks import report
from benchmarks.datagen import CREATED_TIME, ENTITY_KEY, EVENT_TIME, feature_table
from benchmarks.harness import Case, Settings, Target, free_port, local_servers, measure, table_name
from benchmarks.processes import cpu_seconds, own_cpu_seconds
from flight_client import FeatureClient

REPLICAS = (1, 2, 4)
CLIENTS = 4
PARTITIONS = 4


def run(target: Target, settings: Settings, replicas: tuple[int, ...] = REPLICAS) -> dict[str, Any]:
    if target.warehouse is None or target.pid is None:
        raise RuntimeError("scale starts replicas on the benchmark's own warehouse: it cannot use --location")
    data = feature_table(settings.rows, settings.entities, settings.seed, settings.features)
    name = table_name("scale")
    with FeatureClient(target.location) as client:
        report.progress(f"scale: writing {settings.rows:,} rows to {name}")
        client.write(name, data, entity_keys=[ENTITY_KEY], event_time=EVENT_TIME, created_time=CREATED_TIME)
        endpoints = len(client.flight_info(name, partitions=PARTITIONS).endpoints)
    cores = len(os.sched_getaffinity(0))
    results = {}
    for count in replicas:
        ports = [free_port() for _ in range(count)]
        locations = [f"grpc://127.0.0.1:{port}" for port in ports]
        with contextlib.ExitStack() as stack:
            report.progress(f"scale: starting {count} server process(es)")
            started: list[tuple[int | None, list[str]]] = []
            for port, location in zip(ports, locations, strict=True):
                peers = [arg for other in locations if other != location for arg in ("--peer", other)]
                started.append((port, ["--advertise", location, *peers] if count > 1 else []))
            servers = stack.enter_context(local_servers(started, target.catalog_config, target.warehouse))
            client = stack.enter_context(FeatureClient(locations[0]))
            pool = stack.enter_context(ThreadPoolExecutor(CLIENTS))

            def reads(client: FeatureClient = client, pool: ThreadPoolExecutor = pool) -> None:
                tables = pool.map(lambda _: client.read_table(name, partitions=PARTITIONS), range(CLIENTS))
                if any(t.num_rows != data.num_rows for t in tables):
                    raise RuntimeError("a parallel read returned the wrong number of rows")

            cpu_before = [cpu_seconds(s.pid) for s in servers if s.pid is not None] + [own_cpu_seconds()]
            start = time.perf_counter()
            timing = measure({"reads": Case(reads)}, settings.repeat, settings.warmup, f"scale {count}")["reads"]
            wall = time.perf_counter() - start
            cpu_after = [cpu_seconds(s.pid) for s in servers if s.pid is not None] + [own_cpu_seconds()]
        used = [after - before for before, after in zip(cpu_before, cpu_after, strict=True)]
        rows = CLIENTS * data.num_rows
        results[str(count)] = {
            "replicas": count,
            **timing.as_dict(),
            "rows_per_s": rows / timing.median,
            "mb_per_s": CLIENTS * data.nbytes / report.MB / timing.median,
            "server_cpu_cores": sum(used[:-1]) / wall,
            "client_cpu_cores": used[-1] / wall,
        }
    base = results[str(replicas[0])]["rows_per_s"]
    for entry in results.values():
        entry["speedup"] = entry["rows_per_s"] / base
    return {
        "table": name,
        "rows": data.num_rows,
        "arrow_mb": data.nbytes / report.MB,
        "clients": CLIENTS,
        "endpoints": endpoints,
        "cores": cores,
        "results": results,
    }


def render(result: dict[str, Any]) -> str:
    header = (
        f"scale: {result['clients']} concurrent clients, each reading {result['rows']:,} rows "
        f"({result['arrow_mb']:.1f} MB of Arrow) over {result['endpoints']} endpoints spread over the servers; "
        f"{result['cores']} cores"
    )
    rows = [
        [
            f"{r['replicas']} server process(es)",
            *report.timing_cells(r),
            report.ratio(r["speedup"]),
            f"{r['server_cpu_cores']:.2f}",
            f"{r['client_cpu_cores']:.2f}",
        ]
        for r in result["results"].values()
    ]
    headers = ["servers", *report.TIMING_HEADERS, "vs first", "server CPU (cores)", "client CPU (cores)"]
    return "\n".join([header, report.table(headers, rows)])
