"""`flight-bench online`: latency of latest-feature lookups, and how fresh they are after a write.

For batches of 1, 10, 100 and 1000 entities: latency percentiles of `get_online_features` over
Flight on loopback, answered from the server's in-memory index: over the client's sessions
(streams kept open between lookups, the default), with one `do_get` call per lookup, and over
sessions while another process keeps writing to the table. In the same run: the floors (a minimal
server in its own process answering the same table on an open stream, and per `do_get` call) and
the path without the index (the same lookup as a DuckDB query over the Iceberg table, in process,
and the server's own `as_of` lookup, which takes that path). Freshness: the time from a put's
acknowledgement to the first lookup that sees it, for a put through the same server and through
another replica on the same catalog. The index's lookups, quiet and beside a writer, go on for at least
`INDEX_SECONDS`, so that a writer's p99 spans some 20-30 of its puts.

Those lookups are measured twice: with every process where the OS puts it (all of them sharing the machine's
cores), and placed as production places them (`Placement`: the measured server's serving process and the lookup
client on one core; the server's write process, the concurrent writer and the other replica on the others).
Beside each writer, not placed, the floor on an open stream is measured too: what a server that does nothing but
answer gets from the machine while the same writer puts (the other processes' share of the cores).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
from pyiceberg.catalog import load_catalog

from benchmarks import ceiling, report
from benchmarks.baselines import CATALOG_NAME
from benchmarks.datagen import CREATED_TIME, ENTITY_KEY, EVENT_TIME, feature_names, feature_table
from benchmarks.harness import Settings, Target, local_server, table_name, writing
from benchmarks.online_processes import WRITER_ROWS, client_loop, new_rows, write_loop
from benchmarks.processes import family
from flight_client import FeatureClient
from flight_server.base.filters import quote
from flight_server.reads.duck import Engine, local_path

BATCHES = (1, 10, 100, 1000)
PERCENTILES = (50, 95, 99, 99.9)
REQUESTS = 2000  # lookups per batch size (fewer for batches of 1000 and for the slow paths)
QUICK_REQUESTS = 20  # with --quick
SLOW_REQUESTS = 20  # for the paths without the index: each takes tens of milliseconds
FRESHNESS_PUTS = 20
WRITER_START_SECONDS = 120.0
CONCURRENT_CLIENTS = (1, 2, 4)  # client processes looking up at once
CONCURRENT_SECONDS = 5.0
# The index's lookups, quiet and beside a writer, go on at least this long: 2,000 lookups of one entity last about
# 0.7 s, a writer's puts come 4-7 times a second, and a p99 over three puts moved by several times between runs.
INDEX_SECONDS = 5.0
LABELS = {
    "index": "Flight, online index",
    "index_calls": "Flight, online index, one do_get per lookup",
    "index_writing": "Flight, online index, a writer on this server",
    "index_writing_elsewhere": "Flight, online index, a writer on another replica",
    "floor_stream": "raw Flight exchange of the same answer on an open stream (floor)",
    "floor_writing": "raw Flight exchange on an open stream (floor), a writer on this server",
    "floor_writing_elsewhere": "raw Flight exchange on an open stream (floor), a writer on another replica",
    "floor": "raw Flight do_get of the same answer (floor of a call)",
    "as_of": "Flight, as_of lookup (DuckDB, no index)",
    "duckdb": "DuckDB query over the Iceberg table, in process",
}
# What each path is compared with: lookups over the client's sessions (streams kept open) with the
# same exchange on an open stream, one call per lookup with the same do_get.
FLOORS = {"index_calls": "floor", "as_of": "floor", "duckdb": "floor"}
BESIDE = {"index_writing": "floor_writing", "index_writing_elsewhere": "floor_writing_elsewhere"}  # floor beside each


class Placement:
    """Processes pinned to cores (Linux), as production places them. On the benchmark's machine the concurrent
    writer and the other replica share the cores with the measured server, though in production they run on other
    machines: on 2 busy cores a lookup then waits for a core, whatever the server does. `split` gives the measured
    server's serving process and its lookup client (this process) the first core, and its write process (which
    runs beside the serving process on a server's other cores), the writer and the other replica the others."""

    def __init__(self, server_pid: int | None):
        self.server_pid = server_pid
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

    @property
    def possible(self) -> bool:
        return self.server_pid is not None and len(self.cpus) >= 2

    def split(self, others: list[int]) -> None:
        """The serving process and this one on the first core; the server's children and `others` (with theirs)
        on the rest. Again after a process started threads or children: each thread has its own mask."""
        assert self.server_pid is not None
        first, rest = {self.cpus[0]}, set(self.cpus[1:])
        _pin([self.server_pid, os.getpid()], first)
        _pin([p for p in family(self.server_pid) if p != self.server_pid], rest)
        _pin([p for pid in others for p in family(pid)], rest)

    def share(self, others: list[int]) -> None:
        """Every process on every core again."""
        if self.server_pid is not None:
            _pin([*family(self.server_pid), os.getpid(), *(p for pid in others for p in family(pid))], set(self.cpus))


def _pin(pids: list[int], cpus: set[int]) -> None:
    """Every thread of `pids` onto `cpus` (threads started later inherit their creator's mask)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task), cpus)


def percentiles(seconds: list[float]) -> dict[str, float]:
    values = np.asarray(seconds) * 1000
    result = {f"p{p:g}_ms": float(np.percentile(values, p)) for p in PERCENTILES}
    result["mean_ms"] = float(values.mean())
    result["requests"] = len(values)
    return result


def timed(call: Any, requests: int, label: str, at_least: float = 0.0) -> list[float]:
    """Latencies of `requests` calls, and of more until `at_least` seconds have passed."""
    seconds = []
    end = time.perf_counter() + at_least
    for _ in report.steps(range(requests), label):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    while time.perf_counter() < end:
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def keys_for(ids: np.ndarray, batch: int, rng: np.random.Generator) -> list[int]:
    return [int(k) for k in rng.choice(ids, size=batch)]


class Writer:
    """`write_loop` in its own process for the duration of a `with` block; `rate()` gives its puts/s
    from its first acknowledged put, once the server's write process listens (the lookups start only then), until
    now."""

    def __init__(self, location: str, table: str, ids: list[int], features: list[str]):
        self.location = location
        context = multiprocessing.get_context("spawn")
        self.stop, self.puts = context.Event(), context.Value("i", 0)
        self.process = context.Process(target=write_loop, args=(location, table, ids, features, self.stop, self.puts))

    def __enter__(self) -> Writer:
        self.process.start()
        deadline = time.monotonic() + WRITER_START_SECONDS
        while self.puts.value == 0 and self.process.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.puts.value == 0:
            raise RuntimeError("the concurrent writer made no put")
        with FeatureClient(self.location) as client:
            writing(client)
        self.started, self.first = time.perf_counter(), self.puts.value
        return self

    def rate(self) -> float:
        return (self.puts.value - self.first) / (time.perf_counter() - self.started)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.process.join(WRITER_START_SECONDS)


def concurrent_clients(
    location: str, refs: list[str], ids: list[int], counts: tuple[int, ...], seconds: float
) -> list[dict[str, Any]]:
    """Lookups/s and latency with each of `counts` processes looking up at once, in turn: what one server sustains.
    The processes start once, as many as the most (they import the client, ~0.5 s each), and the first `clients`
    of them take part in a round; the others wait, idle, for theirs."""
    context = multiprocessing.get_context("spawn")
    rounds, out = [(clients, context.Barrier(clients + 1)) for clients in counts], context.Queue()
    processes = [
        context.Process(target=client_loop, args=(location, refs, ids, seconds, index, rounds, out))
        for index in range(max(counts))
    ]
    for process in processes:
        process.start()
    results = []
    for clients, start in rounds:
        report.progress(f"online: {clients} client process(es) looking up 1 entity for {seconds} s")
        start.wait(timeout=WRITER_START_SECONDS)
        answers = [out.get(timeout=WRITER_START_SECONDS + seconds) for _ in range(clients)]
        if any(count != clients for count, _ in answers):
            raise RuntimeError(f"a client answered for another round than the one of {clients} clients")
        latencies = [x for _, lats in answers for x in lats]
        results.append({"clients": clients, "lookups_per_s": len(latencies) / seconds, **percentiles(latencies)})
    for process in processes:
        process.join(WRITER_START_SECONDS)
    return results


def freshness(
    writer: FeatureClient, reader: FeatureClient, table: str, entity: int, features: list[str], puts: int
) -> list[float]:
    """Seconds from each put's acknowledgement until `reader` returns the put's row."""
    lags = []
    for _ in range(puts):
        row = new_rows([entity], features)
        writer.write(table, row)
        acknowledged = time.perf_counter()
        stamp = row.column(EVENT_TIME)[0].as_py()
        while (
            reader.get_online_features({ENTITY_KEY: [entity]}, [f"{table}:{EVENT_TIME}"], apply_ttl=False)
            .column(EVENT_TIME)[0]
            .as_py()
            != stamp
        ):
            time.sleep(0.002)
        lags.append(time.perf_counter() - acknowledged)
    return lags


class DuckDBLookup:
    """The lookup without an index: the latest row per requested key, queried from the Iceberg table
    in process with the server's own engine (needs the catalog of a server this run started)."""

    def __init__(self, target: Target, table: str, columns: list[str]):
        properties = target.catalog_properties()
        self.available = properties is not None
        if properties is None:
            return
        loaded = load_catalog(CATALOG_NAME, **properties).load_table(table)
        self.engine = Engine()
        self.engine.use_storage(loaded.io.properties)
        self.metadata = local_path(loaded.metadata_location)
        self.sql = (
            f"SELECT {', '.join(quote(c) for c in columns)} FROM iceberg_scan(?) "
            f"WHERE {quote(ENTITY_KEY)} IN (SELECT unnest(?)) "
            f"QUALIFY row_number() OVER (PARTITION BY {quote(ENTITY_KEY)} "
            f"ORDER BY {quote(EVENT_TIME)} DESC, {quote(CREATED_TIME)} DESC NULLS LAST) = 1"
        )

    def __call__(self, keys: list[int]) -> pa.Table:
        return self.engine.cursor().execute(self.sql, [self.metadata, keys]).to_arrow_table()


def warm_timed(call: Any, requests: int, label: str, at_least: float = 0.0) -> list[float]:
    """`timed` after a tenth as many untimed calls (at most 100): connections and caches are warm."""
    timed(call, min(requests // 10 + 1, 100), f"{label} (warm-up)")
    return timed(call, requests, label, at_least)


def run(target: Target, settings: Settings, requests: int = REQUESTS) -> dict[str, Any]:
    data = feature_table(settings.rows, settings.entities, settings.seed, settings.features)
    features = feature_names(settings.features)
    name = table_name("online")
    ids = np.unique(data.column(ENTITY_KEY).to_numpy())
    rng = np.random.default_rng(settings.seed)
    refs = [f"{name}:{f}" for f in features]
    counts = {batch: max(requests // (10 if batch >= 1000 else 1), 5) for batch in BATCHES}
    index_seconds = INDEX_SECONDS if requests >= REQUESTS else 0.0
    latency: dict[str, dict[str, Any]] = {key: {} for key in LABELS}
    with (
        FeatureClient(target.location) as client,
        FeatureClient(target.location, online_sessions=False) as calls,
        contextlib.ExitStack() as floor_servers,  # the floors' servers, measured quiet and beside the writers
    ):
        report.progress(f"online: writing {settings.rows:,} rows ({len(ids):,} entities) to {name}")
        client.write(name, data, entity_keys=[ENTITY_KEY], event_time=EVENT_TIME, created_time=CREATED_TIME)
        start = time.perf_counter()
        client.get_online_features({ENTITY_KEY: [int(ids[0])]}, refs)
        first_lookup_s = time.perf_counter() - start
        index = client.describe(name)["online"]

        def lookup(batch: int, through: FeatureClient = client, **options: Any) -> Any:
            keys = [int(k) for k in rng.choice(ids, size=batch)]
            return lambda: through.get_online_features({ENTITY_KEY: keys}, refs, **options)

        without_index = DuckDBLookup(target, name, [ENTITY_KEY, EVENT_TIME, *features])
        latest_time = data.column(EVENT_TIME).to_pylist()[-1]
        floors: dict[int, ceiling.Stream] = {}  # by batch: the floor's stream, measured again beside the writers
        for batch, count in counts.items():
            call = lookup(batch)
            label = f"online: lookups of {batch}"
            latency["index"][str(batch)] = percentiles(warm_timed(call, count, label, index_seconds))
            one_call = lookup(batch, calls)
            label = f"online: lookups of {batch}, one call each"
            latency["index_calls"][str(batch)] = percentiles(warm_timed(one_call, count, label))
            keys = pa.record_batch({ENTITY_KEY: pa.array(range(batch), pa.int64())})
            location = floor_servers.enter_context(ceiling.ceiling_server(call(), max(batch, 1)))
            raw = floor_servers.enter_context(flight.FlightClient(location))
            floor = warm_timed(lambda r=raw: ceiling.read(r), count, f"online: raw Flight answers of {batch}")
            latency["floor"][str(batch)] = percentiles(floor)
            stream = floors[batch] = ceiling.Stream(raw, keys)
            floor_servers.callback(stream.close)
            label = f"online: raw Flight answers of {batch} on a stream"
            latency["floor_stream"][str(batch)] = percentiles(warm_timed(stream.ask, count, label))
            slow = max(3, min(SLOW_REQUESTS, requests // 4))
            as_of = timed(lookup(batch, as_of=latest_time), slow, f"online: as_of lookups of {batch}")
            latency["as_of"][str(batch)] = percentiles(as_of)
            if without_index.available:
                keys = [int(k) for k in rng.choice(ids, size=batch)]
                local = timed(lambda k=keys: without_index(k), slow, f"online: DuckDB queries for {batch}")
                latency["duckdb"][str(batch)] = percentiles(local)

        hot = [int(i) for i in ids[:1000]]
        writing = {"index_writing": target.location}
        fresh: dict[str, Any] = {}
        placement = Placement(target.pid)
        placed: dict[str, Any] = {}

        def beside_writers(into: dict[str, dict[str, Any]], others: list[int], split: bool) -> dict[str, float]:
            """The index's lookups while a writer puts through each of `writing`, and (not placed) the floor's
            beside the same writer; the writer's puts/s."""
            rates = {}
            for key, location in writing.items():
                with Writer(location, name, hot, features) as writer:
                    if split and writer.process.pid is not None:
                        placement.split([*others, writer.process.pid])
                    for batch, count in counts.items():
                        where = LABELS[key].split(", ")[-1] + (", placed" if split else "")
                        label = f"online: lookups of {batch}, {where}"
                        into[key][str(batch)] = percentiles(timed(lookup(batch), count, label, index_seconds))
                        if not split:
                            label = f"online: raw Flight answers of {batch} on a stream, {where}"
                            floor = timed(floors[batch].ask, count, label, index_seconds)
                            into[BESIDE[key]][str(batch)] = percentiles(floor)
                    rates[key] = writer.rate()
            return rates

        with contextlib.ExitStack() as stack:
            replica = None
            if target.warehouse is not None:
                replica = stack.enter_context(local_server(target.catalog_config, target.warehouse))
                writing["index_writing_elsewhere"] = replica.location
            others = [replica.pid] if replica is not None and replica.pid is not None else []
            puts_per_s = beside_writers(latency, others, split=False)
            if placement.possible:
                pinned: dict[str, dict[str, Any]] = {key: {} for key in ("index", *writing)}
                placement.split(others)
                try:
                    for batch, count in counts.items():
                        label = f"online: lookups of {batch}, placed"
                        quiet = warm_timed(lookup(batch), count, label, index_seconds)
                        pinned["index"][str(batch)] = percentiles(quiet)
                    placed = {"cpus": placement.cpus, "latency": pinned}
                    placed["writer_puts_per_s"] = beside_writers(pinned, others, split=True)
                finally:
                    placement.share(others)
            seconds = CONCURRENT_SECONDS if requests >= REQUESTS else 0.5
            every_id = [int(i) for i in ids]
            concurrency = concurrent_clients(target.location, refs, every_id, CONCURRENT_CLIENTS, seconds)
            puts_timed = max(3, min(FRESHNESS_PUTS, requests // 4))
            report.progress(f"online: freshness of {puts_timed} puts")
            fresh["same_server"] = percentiles(freshness(client, client, name, int(ids[1]), features, puts_timed))
            if replica is not None:
                with FeatureClient(replica.location) as other:
                    lags = freshness(other, client, name, int(ids[2]), features, puts_timed)
                fresh["other_replica"] = percentiles(lags)
    return {
        "table": name,
        "rows": settings.rows,
        "entities": len(ids),
        "features": len(features),
        "first_lookup_s": first_lookup_s,
        "index": index,
        "writer_puts_per_s": puts_per_s,
        "writer_rows_per_put": WRITER_ROWS,
        "latency": {k: v for k, v in latency.items() if v},
        "freshness": fresh,
        "concurrency": concurrency,
        "placement": placed,
    }


def render(result: dict[str, Any]) -> str:
    header = (
        f"online: {result['entities']:,} entities ({result['rows']:,} rows), {result['features']} features; "
        f"index built in {result['index']['build_seconds']:.2f} s ({result['index']['bytes'] / 2**20:.1f} MiB); "
        "concurrent writer: "
        + ", ".join(f"{LABELS[k].split(', ')[-1]} {v:.1f} puts/s" for k, v in result["writer_puts_per_s"].items())
        + f" of {result['writer_rows_per_put']} rows each"
    )
    rows = []
    for key, by_batch in result["latency"].items():
        for batch, p in by_batch.items():
            floor = result["latency"][FLOORS.get(key, "floor_stream")][batch]["p50_ms"]
            rows.append(
                [
                    f"{LABELS[key]}, batch {batch}",
                    *(f"{p[f'p{q:g}_ms']:.3f}" for q in PERCENTILES),
                    str(p["requests"]),
                    report.ratio(p["p50_ms"] / floor),
                ]
            )
    latency = report.table(["lookup", *(f"p{q:g} ms" for q in PERCENTILES), "requests", "p50 / its floor"], rows)
    lag_rows = [
        [f"put through the {where.replace('_', ' ')}", *(f"{p[f'p{q:g}_ms']:.1f}" for q in (50, 95, 99))]
        + [str(p["requests"])]
        for where, p in result["freshness"].items()
    ]
    lag = report.table(["freshness: put acknowledged -> visible", "p50 ms", "p95 ms", "p99 ms", "puts"], lag_rows)
    concurrency = report.table(
        ["concurrent clients, 1 entity each", "lookups/s", "p50 ms", "p99 ms"],
        [
            [f"{c['clients']} client process(es)", f"{c['lookups_per_s']:.0f}"]
            + [f"{c['p50_ms']:.3f}", f"{c['p99_ms']:.3f}"]
            for c in result["concurrency"]
        ],
    )
    return "\n".join([header, latency, "", *beside(result), *placed(result), lag, "", concurrency])


def beside(result: dict[str, Any]) -> list[str]:
    """The index's lookups beside each writer, not placed, against the floor's measured beside the same writer: what
    the machine leaves a server that does nothing but answer."""
    rows = []
    for key, floor_key in BESIDE.items():
        for batch, p in result["latency"].get(key, {}).items():
            floor = result["latency"][floor_key][batch]
            rows.append(
                [f"{LABELS[key]}, batch {batch}", f"{p['p95_ms']:.3f}", f"{p['p99_ms']:.3f}"]
                + [f"{floor['p95_ms']:.3f}", f"{floor['p99_ms']:.3f}", report.ratio(p["p99_ms"] / floor["p99_ms"])]
            )
    if not rows:
        return []
    columns = ["lookup beside a writer, not placed", "p95 ms", "p99 ms", "floor p95 ms", "floor p99 ms"]
    return [report.table([*columns, "p99 / floor p99"], rows), ""]


def placed(result: dict[str, Any]) -> list[str]:
    """The index's lookups again with the processes placed (`Placement`), each against its quiet figure."""
    placement = result.get("placement")
    if not placement:
        return []
    by_key = placement["latency"]
    rows = []
    for key, by_batch in by_key.items():
        for batch, p in by_batch.items():
            quiet = by_key["index"][batch]["p99_ms"]
            rows.append(
                [f"{LABELS[key]}, batch {batch}", *(f"{p[f'p{q:g}_ms']:.3f}" for q in PERCENTILES), str(p["requests"])]
                + [report.ratio(p["p99_ms"] / quiet)]
            )
    rates = ", ".join(f"{LABELS[k].split(', ')[-1]} {v:.1f}" for k, v in placement["writer_puts_per_s"].items())
    title = (
        f"placed: the serving process and this client on core {placement['cpus'][0]}; the write process, the writer "
        f"and the other replica on {placement['cpus'][1:]} (puts/s: {rates})"
    )
    columns = ["lookup, placed", *(f"p{q:g} ms" for q in PERCENTILES), "requests", "p99 / quiet p99"]
    return [title, report.table(columns, rows), ""]
