"""`flight-bench history`: how the server behaves as a table's history grows, one small put at a time.

Feature pipelines often append a few rows at a time; every put of one writer is one Iceberg snapshot,
with its own metadata file, manifest list and manifest. This measures what that history costs: put
latency from the first puts to the last (the goal: the last tenth at most 1.5x the first), reads of
the resulting table against the same rows written in one put (the goal: at most 2x), each on a freshly
started server so no cache of the running one hides the cost, the metadata left on disk, and 16
concurrent writers of one-row puts, which group commit lets share snapshots (the goal: 10x the puts/s
of the same 16 writers with one snapshot per put, against a server started on the same catalog with
`--no-group-commit`, in rounds that take turns; one writer's puts/s is shown for context, and the same writers'
puts to a minimal Flight server that only receives them, the ceiling of a one-row put here). The baseline is
pyiceberg's own `append` of one-row tables in a loop, in process, with and without its manifest merging
(`commit.manifest-merge.enabled`, which makes `Table.append` a merge append in pyiceberg 0.12).
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pyiceberg.catalog import load_catalog
from pyiceberg.table import Table, TableProperties

from benchmarks import ceiling, report
from benchmarks.baselines import CATALOG_NAME
from benchmarks.datagen import CREATED_TIME, ENTITY_KEY, EVENT_TIME, TIMESTAMP, feature_names, feature_table
from benchmarks.harness import Settings, Target, local_servers, table_name, writing
from benchmarks.processes import family_cpu_seconds, own_cpu_seconds
from flight_client import FeatureClient
from flight_server.reads.duck import local_path

PUTS = 2_000
QUICK_PUTS = 40
# --quick: pyiceberg's merging baseline merges from this many manifests on (its default, 100, would take more
# one-row appends than the quick run makes), so that merging still shows.
QUICK_MERGE_MIN_COUNT = 10
EDGE_SHARE = 0.1  # the first and the last tenth of the puts are compared
BUCKETS = 20  # points of the latency curve
LOOKUP_ENTITIES = 10
FIRST_CALLS = 3  # freshly started servers per read and table; their first calls' median is the figure
QUICK_FIRST_CALLS = 1  # --quick: each of the 6 costs a server start
WRITERS = (1, 16)  # one writer for context, then the concurrent writers
PUTS_PER_WRITER = 10  # of each of the 16 concurrent writers; the single writer makes as many puts as all of them
WRITER_ROUNDS = 3  # of the concurrent writers with group commit and without, taking turns
QUICK_WRITER_ROUNDS = 1
QUICK_PUTS_PER_WRITER = 2
HISTORY_GOAL = 1.5  # last tenth's p50 / first tenth's
READ_GOAL = 2.0  # read of the many-snapshot table / read of the one-put table
GROUP_COMMIT_GOAL = 10.0  # 16 writers' puts/s with group commit / the same writers' with one snapshot per put
# --maintenance: the history table's policy, hours of puts compressed into seconds (snapshots expire after 2 s,
# about 50 puts here; the puts spread over some 30 partitions, so each compacts once it has 2 small files), with
# a round every MAINTENANCE_SECONDS, as the server's own loop would run them.
MAINTENANCE_POLICY = {
    "history.expire.max-snapshot-age-ms": "2000",
    "history.expire.min-snapshots-to-keep": "10",
    "flight.maintenance.compact-min-files": "2",
}
MAINTENANCE_SECONDS = 1.0
FEATURE_SPEC: dict[str, Any] = {"entity_keys": [ENTITY_KEY], "event_time": EVENT_TIME, "created_time": CREATED_TIME}
READS = {
    "scan": "whole-table scan",
    "online": f"online lookup of {LOOKUP_ENTITIES} entities",
    "training": f"training set of {LOOKUP_ENTITIES} entity rows",
}
APPENDS = {
    "server": "Flight put of 1 row",
    "pyiceberg_fast": "pyiceberg append, in process (fast append)",
    "pyiceberg_merge": "pyiceberg append, in process, manifest merging on",
}


def profile(seconds: list[float]) -> dict[str, Any]:
    """p50 of the first and the last tenth, their ratio, and the p50 of each of `BUCKETS` runs of puts."""
    edge = max(1, int(len(seconds) * EDGE_SHARE))
    first, last = statistics.median(seconds[:edge]) * 1000, statistics.median(seconds[-edge:]) * 1000
    size = max(1, len(seconds) // BUCKETS)
    curve = [
        {"puts_before": start, "p50_ms": statistics.median(seconds[start : start + size]) * 1000}
        for start in range(0, len(seconds) - size + 1, size)
    ]
    return {
        "puts": len(seconds),
        "first_p50_ms": first,
        "last_p50_ms": last,
        "last_to_first": last / first,
        "total_s": sum(seconds),
        "curve": curve,
    }


def timed_each(items: list[Any], call: Callable[[Any], object], label: str) -> list[float]:
    seconds = []
    for item in report.steps(items, label):
        start = time.perf_counter()
        call(item)
        seconds.append(time.perf_counter() - start)
    return seconds


def rows_of(data: pa.Table) -> list[pa.Table]:
    return [data.slice(i, 1) for i in range(data.num_rows)]


def concurrent_puts(
    location: str,
    pid: int | None,
    data: pa.Table,
    writers: int,
    puts_per_writer: int,
    group_commit: bool | None = True,
) -> dict[str, Any]:
    """`writers` threads, each with its own client, making `puts_per_writer` one-row puts to one fresh table
    through a server whose group commit is on or off, as `group_commit` says (None: the ceiling server, which
    commits nothing); with the server's CPU time per put when it is a local process (`pid`: its serving process
    and its write process, which commits the puts), and this process's (the clients': is the server the limit?).
    Each client connects before the start line: opening a connection is no put, and the same cost on both sides
    weighed more on the shorter run, the one with group commit."""
    name = table_name(f"history_writers{writers}{'_alone' if group_commit is False else ''}")
    clients = [FeatureClient(location) for _ in range(writers)]
    try:
        if group_commit is not None:  # a feature server: the table exists, and its write process listens
            clients[0].write(name, data.slice(0, 1), **FEATURE_SPEC)
            writing(clients[0])
        start_line = threading.Barrier(writers + 1)

        def write(index: int) -> list[int]:
            rows = [data.slice((index * puts_per_writer + i) % data.num_rows, 1) for i in range(puts_per_writer)]
            clients[index].health()  # connected before the start: the timed part is the puts
            start_line.wait()
            return [clients[index].write(name, row).snapshot_id for row in rows]

        with ThreadPoolExecutor(max_workers=writers, thread_name_prefix="bench-history") as pool:
            futures = [pool.submit(write, i) for i in range(writers)]
            cpu_before = family_cpu_seconds(pid) if pid is not None else 0.0
            client_before = own_cpu_seconds()
            start_line.wait()
            start = time.perf_counter()
            snapshots = [s for future in futures for s in future.result()]
            elapsed = time.perf_counter() - start
            client_cpu = own_cpu_seconds() - client_before
            cpu = family_cpu_seconds(pid) - cpu_before if pid is not None else None
    finally:
        for client in clients:
            client.close()
    puts = writers * puts_per_writer
    return {
        "writers": writers,
        "group_commit": group_commit,
        "puts": puts,
        "seconds": elapsed,
        "puts_per_s": puts / elapsed,
        "snapshots_per_put": None if group_commit is None else len(set(snapshots)) / puts,
        "server_cpu_ms_per_put": None if cpu is None else cpu * 1000 / puts,
        "client_cpu_ms_per_put": client_cpu * 1000 / puts,
    }


def _medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds of one kind of concurrent writers as one entry: the median of each figure, and the rounds."""
    keys = ("seconds", "puts_per_s", "snapshots_per_put", "client_cpu_ms_per_put", "server_cpu_ms_per_put")
    figures = {key: [r[key] for r in rounds] for key in keys}  # None: not measured (the ceiling's server CPU)
    medians = {key: None if None in found else statistics.median(found) for key, found in figures.items()}
    return {**rounds[0], **medians, "rounds": rounds}


@contextlib.contextmanager
def fresh_servers(target: Target, count: int) -> Iterator[list[str]]:
    """`count` newly started servers on the target's catalog (so nothing is cached; started at once, and idle
    until their first call), or the target itself `count` times when it is a server given by `--location`; yields
    their locations."""
    if target.warehouse is None:
        yield [target.location] * count
        return
    with local_servers([(None, ())] * count, target.catalog_config, target.warehouse) as started:
        yield [server.location for server in started]


def writer_runs(target: Target, data: pa.Table, puts_per_writer: int, writer_rounds: int) -> list[dict[str, Any]]:
    """One writer, then `writer_rounds` rounds of the concurrent writers with group commit and the same writers with
    one snapshot per put, on servers started on the target's catalog with `--no-auto-maintenance` (the second also
    with `--no-group-commit`; a server given by `--location` is measured as it is, without the second), taking
    turns, and in each round the same writers' puts to the ceiling server (`ceiling.MemoryFlightServer.do_put`: the
    rows received and answered, nothing committed; last); each run the same number of puts, the concurrent writers'
    figures the medians of their rounds, with the ratio to the one writer's and, for the grouped writers, to the
    same writers' without group commit (the goal) and to the ceiling. A round with group commit takes a second or
    two, one without ten times that: a single pair measured them at different moments of a busy machine's load (the
    same code gave 8.2x and 10.4x in two runs)."""
    many = WRITERS[-1]
    puts = puts_per_writer * many
    rounds: dict[bool | None, list[dict[str, Any]]] = {True: [], False: [], None: []}
    with contextlib.ExitStack() as stack:
        floor = stack.enter_context(ceiling.ceiling_server(data.slice(0, 1)))
        alone = None
        grouped: Target = target
        if target.warehouse is not None:
            # Both servers without automatic maintenance: its rounds (every minute) compact the small files of the
            # earlier rounds' tables, and took the cores from whichever round was running then, on either side.
            quiet = ["--no-auto-maintenance"]
            servers = local_servers(
                [(None, quiet), (None, ["--no-group-commit", *quiet])], target.catalog_config, target.warehouse
            )
            grouped, alone = stack.enter_context(servers)
        runs = [concurrent_puts(grouped.location, grouped.pid, data, WRITERS[0], puts // WRITERS[0])]
        for _ in range(writer_rounds):
            rounds[True].append(concurrent_puts(grouped.location, grouped.pid, data, many, puts_per_writer))
            if alone is not None:
                rounds[False].append(
                    concurrent_puts(alone.location, alone.pid, data, many, puts_per_writer, group_commit=False)
                )
            rounds[None].append(concurrent_puts(floor, None, data, many, puts_per_writer, group_commit=None))
    medians = {kind: _medians(found) for kind, found in rounds.items() if found}
    runs += list(medians.values())
    for entry in runs:
        entry["vs_one_writer"] = entry["puts_per_s"] / runs[0]["puts_per_s"]
    if False in medians:
        medians[True]["vs_no_group_commit"] = medians[True]["puts_per_s"] / medians[False]["puts_per_s"]
    medians[True]["vs_ceiling"] = medians[True]["puts_per_s"] / medians[None]["puts_per_s"]
    return runs


def measure_reads(
    target: Target, tables: dict[str, str], refs: dict[str, list[str]], keys: list[int], repeat: int, first_calls: int
) -> dict[str, Any]:
    """Each read of each table, first on a freshly started server (cold), then `repeat` more times there (warm),
    on `first_calls` fresh servers in turn; the medians, with the ratio of the many-snapshot table to the one-put
    table. One first call is a single sample on a busy machine: its ratio moved by 2x between runs."""
    at = pa.array([int(time.time() * 1e6)] * len(keys), type=pa.int64()).cast(TIMESTAMP)
    entities = pa.table({ENTITY_KEY: pa.array(keys, pa.int64()), "event_timestamp": at})
    calls: dict[str, Callable[[FeatureClient, list[str], str], object]] = {
        "scan": lambda client, _, name: client.scan(name).read_all(),
        "online": lambda client, features, _: client.get_online_features({ENTITY_KEY: keys}, features),
        "training": lambda client, features, _: client.get_historical_features(entities, features),
    }
    results: dict[str, Any] = {}
    for read, call in calls.items():
        entry: dict[str, Any] = {"label": READS[read]}
        firsts: dict[str, list[float]] = {kind: [] for kind in tables}
        warms: dict[str, list[float]] = {kind: [] for kind in tables}
        fresh = target.warehouse is not None  # else `fresh_servers` gives the running server given by --location
        for round_ in range(first_calls):
            # The tables take turns, so that bursts of load hit both alike, each on a server of its own.
            with fresh_servers(target, len(tables)) as locations:
                for (kind, name), location in zip(tables.items(), locations, strict=True):
                    report.progress(f"history: {READS[read]} of the {kind} table ({round_ + 1}/{first_calls})")
                    with FeatureClient(location) as client:
                        repeats = [partial(call, client, refs[kind], name)] * (repeat + 1)
                        first, *warm = timed_each(repeats, lambda bound: bound(), f"history: {read}")
                    firsts[kind].append(first)
                    warms[kind] += warm
        for kind in tables:
            entry[kind] = {
                "first_s": statistics.median(firsts[kind]),
                "first_all_s": firsts[kind],
                "warm_median_s": statistics.median(warms[kind]),
                "fresh_server": fresh,
            }
        entry["first_ratio"] = entry["history"]["first_s"] / entry["one_put"]["first_s"]
        entry["warm_ratio"] = entry["history"]["warm_median_s"] / entry["one_put"]["warm_median_s"]
        results[read] = entry
    return results


def on_disk(table: Table) -> dict[str, Any]:
    """The table's snapshots, its metadata files (when on a local disk) and the manifests its current snapshot
    reads: what every commit and every cold read has to go through."""
    current = table.current_snapshot()
    found: dict[str, Any] = {
        "snapshots": len(table.metadata.snapshots),
        "current_manifests": len(current.manifests(table.io)) if current else 0,
    }
    folder = Path(local_path(table.location())) / "metadata"
    if folder.is_dir():
        files = list(folder.iterdir())
        json_files = [f for f in files if f.name.endswith(".metadata.json")]
        found |= {
            "metadata_json_files": len(json_files),
            "metadata_json_bytes": sum(f.stat().st_size for f in json_files),
            "newest_metadata_json_bytes": Path(local_path(table.metadata_location)).stat().st_size,
            "metadata_dir_files": len(files),
            "metadata_dir_bytes": sum(f.stat().st_size for f in files),
        }
    return found


def pyiceberg_appends(
    properties: dict[str, str], like: Table, rows: list[pa.Table], merge: bool, merge_min_count: int | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One-row appends by pyiceberg in a loop to a fresh table with the server table's schema and partitioning;
    their latency profile and the table's metadata at the end. `merge_min_count`: the table's
    `commit.manifest.min-count-to-merge` (None: pyiceberg's default)."""
    catalog = load_catalog(CATALOG_NAME, **properties)
    name = table_name(f"history_pyiceberg_{'merge' if merge else 'fast'}")
    table = catalog.create_table(
        name,
        schema=like.schema(),
        partition_spec=like.spec(),
        properties={
            TableProperties.MANIFEST_MERGE_ENABLED: str(merge).lower(),
            **({} if merge_min_count is None else {TableProperties.MANIFEST_MIN_MERGE_COUNT: str(merge_min_count)}),
        },
    )
    schema = like.schema().as_arrow()
    label = f"history: pyiceberg appends, merge {'on' if merge else 'off'}"
    seconds = timed_each([row.cast(schema) for row in rows], table.append, label)
    table.refresh()
    return profile(seconds), on_disk(table)


@contextlib.contextmanager
def maintained(target: Target, name: str, on: bool) -> Iterator[list[dict[str, Any]]]:
    """With `on`, the table gets `MAINTENANCE_POLICY` and a `run_maintenance` round every `MAINTENANCE_SECONDS`
    (from another client, alongside the block's puts) and one more after the block; yields the rounds' replies.
    Without, the server's own maintenance is turned off for the table, so that the history grows unmaintained."""
    rounds: list[dict[str, Any]] = []
    properties = target.catalog_properties()
    if properties is not None:
        with load_catalog(CATALOG_NAME, **properties).load_table(name).transaction() as transaction:
            transaction.set_properties(MAINTENANCE_POLICY if on else {"flight.maintenance.enabled": "false"})
    if not on:
        yield rounds
        return
    stop = threading.Event()
    with FeatureClient(target.location) as client:

        def loop() -> None:
            while not stop.wait(MAINTENANCE_SECONDS):
                rounds.append(client.run_maintenance(name))

        thread = threading.Thread(target=loop, name="bench-maintenance")
        thread.start()
        try:
            yield rounds
        finally:
            stop.set()
            thread.join()
        rounds.append(client.run_maintenance(name))


def maintenance_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("data_files_compacted", "snapshots_expired", "files_deleted", "bytes_freed")
    return {
        "rounds": len(rounds),
        **{key: sum(r[key] for r in rounds) for key in keys},
        "gave_way": sum(len(r["gave_way"]) for r in rounds),
        "errors": sum(r["error"] is not None for r in rounds),
        "policy": MAINTENANCE_POLICY,
        "every_s": MAINTENANCE_SECONDS,
    }


def run(
    target: Target,
    settings: Settings,
    puts_per_writer: int = PUTS_PER_WRITER,
    maintenance: bool = False,
    baseline_appends: int | None = None,
    quick: bool = False,
) -> dict[str, Any]:
    """`quick`: one fresh server per read and table, one round of the concurrent writers, and pyiceberg merging
    from `QUICK_MERGE_MIN_COUNT` manifests on: proves the benchmark works, measures nothing."""
    first_calls, writer_rounds = (QUICK_FIRST_CALLS, QUICK_WRITER_ROUNDS) if quick else (FIRST_CALLS, WRITER_ROUNDS)
    merge_min_count = QUICK_MERGE_MIN_COUNT if quick else None
    data = feature_table(settings.rows + 1, settings.entities, settings.seed, settings.features)
    rows = rows_of(data.slice(1))
    features = feature_names(settings.features)
    tables = {"history": table_name("history_puts"), "one_put": table_name("history_one_put")}
    refs = {kind: [f"{name}:{f}" for f in features] for kind, name in tables.items()}
    appends: dict[str, Any] = {}
    with FeatureClient(target.location) as client:
        client.write(tables["history"], data.slice(0, 1), **FEATURE_SPEC)  # creating the table is not timed
        writing(client)
        with maintained(target, tables["history"], maintenance) as rounds:
            seconds = timed_each(rows, lambda row: client.write(tables["history"], row), "history: 1-row puts")
        appends["server"] = profile(seconds)
        client.write(tables["one_put"], data, **FEATURE_SPEC)
        for name in tables.values():
            if client.describe(name)["rows"] != data.num_rows:
                raise RuntimeError(f"{name} does not hold the {data.num_rows} rows written to it")
    keys = [int(k) for k in np.random.default_rng(settings.seed).choice(data[ENTITY_KEY].to_numpy(), LOOKUP_ENTITIES)]
    reads = measure_reads(target, tables, refs, keys, settings.repeat, first_calls)
    report.progress(f"history: 1 writer, {WRITERS[-1]} concurrent writers with and without group commit")
    writers = writer_runs(target, data, puts_per_writer, writer_rounds)
    metadata: dict[str, Any] = {}
    properties = target.catalog_properties()
    if properties is not None:
        catalog = load_catalog(CATALOG_NAME, **properties)
        loaded = {kind: catalog.load_table(name) for kind, name in tables.items()}
        metadata = {kind: on_disk(table) for kind, table in loaded.items()}
        baseline = rows[:baseline_appends]
        for merge in (False, True):
            key = f"pyiceberg_{'merge' if merge else 'fast'}"
            appends[key], metadata[key] = pyiceberg_appends(
                properties, loaded["history"], baseline, merge, merge_min_count
            )
    for key, entry in appends.items():
        entry["label"] = APPENDS[key]
    if merge_min_count is not None and "pyiceberg_merge" in appends:
        appends["pyiceberg_merge"]["label"] += f" (from {merge_min_count} manifests)"
    return {
        "puts": len(rows),
        "features": settings.features,
        "first_calls": first_calls,
        "writer_rounds": writer_rounds,
        "merge_min_count": merge_min_count,
        "goals": {"last_to_first": HISTORY_GOAL, "read_ratio": READ_GOAL, "group_commit_speedup": GROUP_COMMIT_GOAL},
        "appends": appends,
        "reads": reads,
        "metadata": metadata,
        "writers": writers,
        "maintenance": maintenance_summary(rounds) if maintenance else None,
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _kib(value: int | None) -> str:
    return "-" if value is None else f"{value / 1024:,.0f}"


def render(result: dict[str, Any]) -> str:
    goals = result["goals"]
    puts = report.table(
        ["one-row append", "appends", "p50 first 10% ms", "p50 last 10% ms", "last/first", "total s"],
        [
            [
                a["label"],
                f"{a['puts']:,}",
                f"{a['first_p50_ms']:.1f}",
                f"{a['last_p50_ms']:.1f}",
                report.ratio(a["last_to_first"]),
                f"{a['total_s']:.1f}",
            ]
            for a in result["appends"].values()
        ],
    )
    if (kept := result.get("maintenance")) is not None:
        puts += (
            f"\nwith maintenance: a round every {kept['every_s']:g} s during the puts and one after them "
            f"({kept['rounds']} rounds; table properties {kept['policy']}): {kept['data_files_compacted']:,} "
            f"small files compacted, {kept['snapshots_expired']:,} snapshots expired, {kept['files_deleted']:,} "
            f"files deleted ({kept['bytes_freed'] / 2**20:.1f} MiB); {kept['gave_way']} steps gave way, "
            f"{kept['errors']} rounds with errors"
        )
    fresh = all(e[k]["fresh_server"] for e in result["reads"].values() for k in ("history", "one_put"))
    # JSON files of earlier runs have neither: every run, --quick too, had the full counts then
    first_calls, writer_rounds = result.get("first_calls", FIRST_CALLS), result.get("writer_rounds", WRITER_ROUNDS)
    reads = report.table(
        ["read", "first ms, history", "first ms, one put", "ratio", "warm ms, history", "warm ms, one put", "ratio"],
        [
            [
                e["label"],
                _ms(e["history"]["first_s"]),
                _ms(e["one_put"]["first_s"]),
                report.ratio(e["first_ratio"]),
                _ms(e["history"]["warm_median_s"]),
                _ms(e["one_put"]["warm_median_s"]),
                report.ratio(e["warm_ratio"]),
            ]
            for e in result["reads"].values()
        ],
    )
    parts = [
        f"history: {result['puts']:,} one-row puts back to back to one table ({result['features']} features), "
        f"through one client; goal: last/first <= {goals['last_to_first']}x",
        puts,
        "",
        f"reads of that table (history) and of the same rows written in one put; 'first': the first call "
        f"{f'on a freshly started server, median of {first_calls}' if fresh else 'on the running server'}, "
        f"'warm': median of the next calls there; goal: ratio <= {goals['read_ratio']}x",
        reads,
    ]
    if result["metadata"]:
        parts += [
            "",
            "metadata at the end",
            report.table(
                ["table", "snapshots", "manifests now", "metadata.json files", "KiB", "newest KiB", "all metadata KiB"],
                [
                    [
                        kind,
                        f"{m['snapshots']:,}",
                        f"{m['current_manifests']:,}",
                        f"{m.get('metadata_json_files', '-')}",
                        _kib(m.get("metadata_json_bytes")),
                        _kib(m.get("newest_metadata_json_bytes")),
                        _kib(m.get("metadata_dir_bytes")),
                    ]
                    for kind, m in result["metadata"].items()
                ],
            ),
        ]
    parts += [
        "",
        f"one-row puts from writers, each its own client, to a fresh table; group commit on, or off (a server "
        f"started with --no-group-commit on the same catalog: one snapshot per put; both without automatic "
        f"maintenance); {WRITERS[-1]} writers: median "
        f"of {writer_rounds} rounds, on and off taking turns; goal: >= {goals['group_commit_speedup']}x the same "
        f"writers' puts/s with group commit off; the ceiling: the same writers' puts to a minimal Flight server "
        f"that receives the rows and answers, committing nothing",
        report.table(
            [
                "writers",
                "group commit",
                "puts",
                "puts/s",
                "snapshots per put",
                "server CPU ms per put (serving + write process)",
                "clients' CPU ms per put",
                "vs 1 writer",
                "vs group commit off",
                "vs ceiling",
            ],
            [
                [
                    str(w["writers"]),
                    {True: "on", False: "off", None: "ceiling"}[w["group_commit"]],
                    f"{w['puts']:,}",
                    f"{w['puts_per_s']:.1f}",
                    "-" if w["snapshots_per_put"] is None else f"{w['snapshots_per_put']:.2f}",
                    "-" if w["server_cpu_ms_per_put"] is None else f"{w['server_cpu_ms_per_put']:.1f}",
                    f"{w['client_cpu_ms_per_put']:.2f}",
                    report.ratio(w["vs_one_writer"]),
                    report.ratio(w["vs_no_group_commit"]) if "vs_no_group_commit" in w else "-",
                    report.ratio(w["vs_ceiling"]) if "vs_ceiling" in w else "-",
                ]
                for w in result["writers"]
            ],
        ),
    ]
    return "\n".join(parts)
