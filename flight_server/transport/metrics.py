"""Prometheus metrics of one server, served over HTTP at `--metrics-port` (`/metrics`).

Calls are counted as they end (`ServerMetrics.completed`, from the call log's middleware), their rows and bytes
batch by batch (`Flow`). Everything else is read at scrape time from what the server keeps anyway
(`PartsCollector`): cache sizes and hit counts, the online indexes, and the commit retries the lower layers count
(`base/metrics.py`), in this process and in its write process (`offload.py`: its caches, memory and CPU time come
with its own figures, asked once a scrape). So the hot path pays for a counter and a histogram per call and a few
additions per batch, nothing per row. Each server has its own registry: several servers in one process never clash.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from threading import Thread
from typing import Any
from wsgiref.simple_server import WSGIServer

import pyarrow as pa
import pyarrow.flight as flight
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flight_server.base.metrics import COUNTERS
from flight_server.changes.upkeep import Watched
from flight_server.online.index import OnlineIndex
from flight_server.transport.components import Components

FLUSH_SECONDS = 1.0

# From an online lookup (a fraction of a millisecond) to a training set or a put (minutes).
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Flow:
    """The rows and bytes one call sends or receives. Kept in plain counts (one thread serves a call) and added to
    the server's counters when the call ends, and at most once every `FLUSH_SECONDS` while it runs: a lookup
    over an online session takes no lock, and a session open for hours still shows in the totals."""

    def __init__(self, rows: Any, nbytes: Any):  # prometheus_client's labelled children are untyped
        self._rows, self._bytes = rows, nbytes
        self.rows = self.bytes = 0  # not yet added to the counters
        self.total_rows = self.total_bytes = 0  # since the call started (the `calls` action)
        self._flushed = time.monotonic()

    def add(self, batch: pa.RecordBatch) -> None:
        """Count a batch: its rows, and its size as an Arrow IPC message (what travels; a few microseconds,
        where `nbytes` takes about 50)."""
        size = pa.ipc.get_record_batch_size(batch)
        self.rows += batch.num_rows
        self.bytes += size
        self.total_rows += batch.num_rows
        self.total_bytes += size
        if time.monotonic() - self._flushed >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        rows, nbytes = self.rows, self.bytes
        self.rows = self.bytes = 0
        self._flushed = time.monotonic()
        if rows:
            self._rows.inc(rows)
        if nbytes:
            self._bytes.inc(nbytes)


class ServerMetrics:
    """The metrics of one server: its registry, the per-call counters, and the HTTP endpoint that serves them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "flight_requests",
            "Calls ended, by RPC method, request kind (scan, training_set, online, write, or the action's name) "
            "and status code.",
            ["method", "kind", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "flight_request_duration_seconds",
            "Time from a call's start to its end (a stream's included), by RPC method and request kind.",
            ["method", "kind"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.conflicts = Counter(
            "flight_commit_conflicts",
            "Changes (puts, deletes, maintenance) refused with CONFLICT: concurrent commits kept winning until the "
            "commit timeout, or changed the table so that the change no longer fits it.",
            registry=self.registry,
        )

        def flow(name: str, doc: str) -> Counter:
            return Counter(name, f"{doc}, by request kind.", ["kind"], registry=self.registry)

        self.rows_sent = flow("flight_rows_sent", "Rows sent to clients")
        self.bytes_sent = flow("flight_bytes_sent", "Bytes sent to clients (as uncompressed Arrow IPC messages)")
        self.rows_received = flow("flight_rows_received", "Rows received from clients")
        self.bytes_received = flow(
            "flight_bytes_received", "Bytes received from clients (as uncompressed Arrow IPC messages)"
        )
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds, open files
        # Labelled children, looked up once (`labels` takes a lock): by method, kind and code; by direction and kind.
        self._calls: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._flows: dict[tuple[bool, str], tuple[Any, Any]] = {}
        self._http: tuple[WSGIServer, Thread] | None = None

    def completed(self, method: str, kind: str, code: str, seconds: float) -> None:
        """Count one ended call."""
        key = (method, kind, code)
        children = self._calls.get(key)
        if children is None:
            children = self._calls[key] = (self.requests.labels(*key), self.duration.labels(method, kind))
        children[0].inc()
        children[1].observe(seconds)
        if code == "CONFLICT":
            self.conflicts.inc()

    def sent(self, kind: str) -> Flow:
        return self._flow(True, kind)

    def received(self, kind: str) -> Flow:
        return self._flow(False, kind)

    def _flow(self, sent: bool, kind: str) -> Flow:
        children = self._flows.get((sent, kind))
        if children is None:
            rows, nbytes = (self.rows_sent, self.bytes_sent) if sent else (self.rows_received, self.bytes_received)
            children = self._flows[(sent, kind)] = (rows.labels(kind), nbytes.labels(kind))
        return Flow(*children)

    def watch(self, parts: Components) -> None:
        """Read `parts` at each scrape from now on."""
        self.registry.register(PartsCollector(parts))

    def serve(self, host: str, port: int) -> None:
        """Serve `/metrics` on `host:port`."""
        try:
            self._http = start_http_server(port, host, self.registry)
        except OSError as exc:
            raise ValueError(f"--metrics-port {port}: cannot listen on {host}:{port} ({exc})") from None

    def close(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join()


class PartsCollector(Collector):
    """What a server's parts keep anyway, read at scrape time: caches, online indexes, writes in progress, commit
    retries."""

    def __init__(self, parts: Components):
        self.parts = parts

    def collect(self) -> Iterable[Metric]:
        caches, training, store = self.parts.caches, self.parts.training.cache, self.parts.store
        indexes, stats, files = store.indexes(), training.stats(), caches.files.stats()
        online_bytes = {name: index.nbytes() for name, index in indexes.items()}
        child = self.parts.write_process_stats()  # the one call to the write process; None: none answered
        families = _CacheFamilies()
        serving = {  # the serving process's own: its write process serves no reads
            "scan": {"entries": files["files"], **{k: files[k] for k in ("bytes", "max_bytes", "hits", "misses")}},
            "training_set": {
                "entries": stats["snapshots"],
                "bytes": stats["bytes"],
                "max_bytes": training.max_bytes,
                "hits": training.hits,
                "misses": training.misses,
            },
            "online_index": {
                "entries": len(indexes),
                "bytes": sum(online_bytes.values()),
                "max_bytes": store.max_bytes,
            },
        }
        families.add("serving", {**self.parts.cache_stats(), **serving})
        if child is not None:
            families.add("write", child.get("caches", {}))
        yield from families.all()
        yield from _memory(self.parts.memory.stats())
        yield from _online(indexes, online_bytes)
        yield GaugeMetricFamily(
            "flight_writes_in_progress", "Puts being written or committed.", value=self.parts.writes_in_progress(child)
        )
        for counter in COUNTERS:
            yield _counted(self.parts, counter)
        yield from _maintenance(self.parts.upkeep.tables())
        shared = self.parts.upkeep.figures()
        if shared is not None:  # with peers only
            yield CounterMetricFamily(
                "flight_maintenance_skipped_not_owned_rounds",
                "Background rounds not run on a table another replica owns and maintains (--shared-maintenance).",
                value=shared["skipped_not_owned"],
            )
            yield CounterMetricFamily(
                "flight_maintenance_taken_over_rounds",
                "Background rounds run on a table another replica owns, which it had left due (its owner away).",
                value=shared["taken_over"],
            )
        if self.parts.writes is not None:
            yield from _write_process(child)


class _CacheFamilies:
    """The `flight_cache_*` families, each sample labelled with its cache and the process that holds it."""

    def __init__(self) -> None:
        labels = ["cache", "process"]
        self.entries = GaugeMetricFamily("flight_cache_entries", "Entries held, by cache and process.", labels=labels)
        self.bytes = GaugeMetricFamily("flight_cache_bytes", "Memory held, by cache and process.", labels=labels)
        self.max_bytes = GaugeMetricFamily(
            "flight_cache_max_bytes", "Memory a cache may hold, by cache and process.", labels=labels
        )
        self.weight = GaugeMetricFamily(
            "flight_cache_weight",
            "What a cache not bounded in bytes holds, in the unit it is bounded in, by cache and process.",
            labels=[*labels, "unit"],
        )
        self.max_weight = GaugeMetricFamily(
            "flight_cache_max_weight",
            "What a cache not bounded in bytes may hold, in that unit, by cache and process.",
            labels=[*labels, "unit"],
        )
        self.hits = CounterMetricFamily(
            "flight_cache_hits", "Lookups that found their entry, by cache and process.", labels=labels
        )
        self.misses = CounterMetricFamily(
            "flight_cache_misses", "Lookups that did not find their entry, by cache and process.", labels=labels
        )

    def add(self, process: str, caches: dict[str, dict[str, Any]]) -> None:
        """Each cache's figures (`Components.cache_stats`'s shape), those it has."""
        for name, figures in caches.items():
            labels = [name, process]
            self.entries.add_metric(labels, figures["entries"])
            if "bytes" in figures:
                self.bytes.add_metric(labels, figures["bytes"])
                self.max_bytes.add_metric(labels, figures["max_bytes"])
            if "weight" in figures:
                self.weight.add_metric([*labels, figures["unit"]], figures["weight"])
                self.max_weight.add_metric([*labels, figures["unit"]], figures["max_weight"])
            if "hits" in figures:
                self.hits.add_metric(labels, figures["hits"])
                self.misses.add_metric(labels, figures["misses"])

    def all(self) -> Iterator[Metric]:
        yield from (self.entries, self.bytes, self.max_bytes, self.weight, self.max_weight, self.hits, self.misses)


_PROCESS = ProcessCollector(registry=None)  # read at each call, registered nowhere


def process_figures() -> dict[str, float]:
    """This process's figures as `ProcessCollector` reads them for `/metrics` (memory, CPU seconds, start time, open
    files; from /proc, so none elsewhere than Linux): in `health`, where a write process's reach its serving process's
    scrape (`_write_process`)."""
    return {sample.name: sample.value for metric in _PROCESS.collect() for sample in metric.samples}


def _write_process(child: dict[str, Any] | None) -> Iterator[Metric]:
    """Whether the write process answered this scrape, and its `process_*` figures as `flight_write_process_*`."""
    yield GaugeMetricFamily(
        "flight_write_process_up",
        "1 when the write process answered this scrape (0: not started yet, stopped, or busy past 2 s).",
        value=1 if child is not None else 0,
    )
    for name, figure in (child or {}).get("process", {}).items():
        family = "flight_write_" + name.removesuffix("_total")
        doc = f"The write process's {name} (as the serving process's own, read by the write process)."
        yield (
            CounterMetricFamily(family, doc, value=figure)
            if name.endswith("_total")
            else GaugeMetricFamily(family, doc, value=figure)
        )


def _counted(parts: Components, counter: Counter) -> Metric:
    """A counter of `base/metrics.py` in this process, and in its write process (where puts, deletes and compactions
    commit, through an engine of its own)."""
    family = next(iter(counter.describe()))
    counted = sum(s.value for metric in counter.collect() for s in metric.samples if s.name.endswith("_total"))
    if parts.writes is not None:
        counted += parts.writes.counted(family.name)
    return CounterMetricFamily(family.name, family.documentation, value=counted)


def _memory(stats: dict[str, Any]) -> Iterator[Metric]:
    """The memory budget the caches share: its size, what each cache holds and reserves, what was evicted."""
    yield GaugeMetricFamily(
        "flight_memory_budget_bytes",
        "Memory the caches may hold together (--memory-budget-mb).",
        value=stats["max_bytes"],
    )
    used = GaugeMetricFamily(
        "flight_memory_budget_used_bytes",
        "Memory drawn from the budget, by cache and kind: held (entries), reserved (rows scans collect for the cache).",
        labels=["cache", "kind"],
    )
    evictions = CounterMetricFamily(
        "flight_cache_evictions",
        "Entries evicted, by cache and why: its own cap, or the shared memory budget (another entry needed room).",
        labels=["cache", "why"],
    )
    evicted = CounterMetricFamily("flight_cache_evicted_bytes", "Bytes evicted, by cache.", labels=["cache"])
    for name, cache in stats["caches"].items():
        used.add_metric([name, "held"], cache["bytes"])
        used.add_metric([name, "reserved"], cache["reserved"])
        for why, count in cache["evictions"].items():
            evictions.add_metric([name, why], count)
        evicted.add_metric([name], cache["evicted_bytes"])
    yield from (used, evictions, evicted)


def _online(indexes: dict[str, OnlineIndex], nbytes: dict[str, int]) -> Iterator[Metric]:
    """Per online index: how stale it may be, its size, its refreshes."""
    now = time.monotonic()
    lag = GaugeMetricFamily(
        "flight_online_index_lag_seconds",
        "Seconds since the index was last known to match its table's current snapshot (its last successful "
        "refresh check): at most about --online-refresh-seconds while refreshes succeed.",
        labels=["table"],
    )
    entities = GaugeMetricFamily("flight_online_index_entities", "Entities in the index.", labels=["table"])
    size = GaugeMetricFamily("flight_online_index_bytes", "Memory the index takes.", labels=["table"])
    failing = GaugeMetricFamily(
        "flight_online_index_refresh_failing",
        "1 while the index's refreshes fail (it serves its last snapshot).",
        labels=["table"],
    )
    refreshes = CounterMetricFamily(
        "flight_online_index_refreshes",
        "Refreshes that changed the index: from appended files alone, or rebuilt from the whole table.",
        labels=["table", "how"],
    )
    for name, index in indexes.items():
        lag.add_metric([name], max(0.0, now - index.checked_at))
        entities.add_metric([name], len(index.state.positions))
        size.add_metric([name], nbytes[name])
        failing.add_metric([name], 1 if index.error else 0)
        refreshes.add_metric([name, "append"], index.appends)
        refreshes.add_metric([name, "rebuild"], index.rebuilds)
    yield from (lag, entities, size, failing, refreshes)


# Per table, what its rounds of maintenance on this server did so far (`Totals`' fields), and its size as the last
# round left it (`TableFacts`' fields): the family's name, and what it counts.
_MAINTENANCE_TOTALS = {
    "rounds": ("flight_maintenance_rounds", "Rounds of maintenance run on the table by this server."),
    "errors": ("flight_maintenance_failed_rounds", "Rounds with a step that failed (the log says why)."),
    "gave_way": ("flight_maintenance_gave_way", "Steps that gave way to a concurrent commit (run again next round)."),
    "snapshots_expired": ("flight_maintenance_snapshots_expired", "Snapshots expired."),
    "data_files_compacted": ("flight_maintenance_data_files_compacted", "Small data files compacted into larger ones."),
    "files_deleted": (
        "flight_maintenance_files_deleted",
        "Files deleted: those only expired snapshots used (data, delete, manifest, metadata files), and orphans.",
    ),
    "bytes_freed": ("flight_maintenance_freed_bytes", "Bytes of the files deleted."),
}
_TABLE_FACTS = {
    "snapshots": ("flight_table_snapshots", "Snapshots the table's metadata lists"),
    "data_files": ("flight_table_data_files", "Data files of the table's current snapshot"),
    "delete_files": ("flight_table_delete_files", "Delete files of the table's current snapshot"),
    "records": ("flight_table_records", "Rows of the table's current snapshot, deleted ones included"),
    "bytes": ("flight_table_files_bytes", "Bytes of the current snapshot's data and delete files"),
}


def _maintenance(tables: dict[str, Watched]) -> Iterator[Metric]:
    """Per table this server maintains: what its rounds did, when the last ran and last ran every step, and the
    table's size as that round left it (read at the round, not at the scrape: a scrape asks no catalog)."""
    totals = {
        field: CounterMetricFamily(name, f"{doc} By table.", labels=["table"])
        for field, (name, doc) in _MAINTENANCE_TOTALS.items()
    }
    ran = GaugeMetricFamily(
        "flight_maintenance_last_round_timestamp_seconds",
        "When the table's last round of maintenance on this server ended (Unix time).",
        labels=["table"],
    )
    succeeded = GaugeMetricFamily(
        "flight_maintenance_last_success_timestamp_seconds",
        "When the table's last round whose every step ran (none failed or gave way) ended (Unix time).",
        labels=["table"],
    )
    facts = {
        field: GaugeMetricFamily(name, f"{doc}, as this server's last maintenance round found.", labels=["table"])
        for field, (name, doc) in _TABLE_FACTS.items()
    }
    for name, watched in tables.items():
        if watched.ran_at is None:
            continue  # changed here, no round yet
        for field, counter in totals.items():
            counter.add_metric([name], getattr(watched.totals, field))
        ran.add_metric([name], watched.ran_at)
        if watched.succeeded_at is not None:
            succeeded.add_metric([name], watched.succeeded_at)
        if watched.facts is not None:
            for field, family in facts.items():
                family.add_metric([name], getattr(watched.facts, field))
    yield from totals.values()
    yield from (ran, succeeded)
    yield from facts.values()


def sending(flow: Flow, reader: pa.RecordBatchReader | pa.Table) -> pa.RecordBatchReader | pa.Table:
    """A `do_get` result that counts what it sends: a table at once, a reader batch by batch."""
    if isinstance(reader, pa.Table):
        for batch in reader.to_batches():
            flow.add(batch)
        return reader

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in reader:
            flow.add(batch)
            yield batch

    return pa.RecordBatchReader.from_batches(reader.schema, batches())


class CountedReader:
    """A client's stream (`do_put`, `do_exchange`) that counts the rows and bytes it receives."""

    def __init__(self, reader: Any, flow: Flow):
        self._reader, self._flow = reader, flow

    @property
    def schema(self) -> pa.Schema:
        return self._reader.schema

    def read_chunk(self) -> flight.FlightStreamChunk:
        chunk = self._reader.read_chunk()
        if chunk.data is not None:
            self._flow.add(chunk.data)
        return chunk


class CountedWriter:
    """The writer back to a client (`do_exchange` batches, `do_put` metadata) that counts the batches it sends."""

    def __init__(self, writer: Any, flow: Flow):
        self._writer, self._flow = writer, flow

    def begin(self, schema: pa.Schema, options: pa.ipc.IpcWriteOptions | None = None) -> None:
        self._writer.begin(schema, options)

    def write_batch(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        self._flow.add(batch)

    def write(self, buffer: pa.Buffer) -> None:
        self._writer.write(buffer)
