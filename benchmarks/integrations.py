"""`flight-bench integrations`: one epoch of a training set through PyTorch's DataLoader (2 worker
processes) and through Ray Data (a local cluster of 2 CPUs), next to the plain client into pandas.

The training set's entity rows are a table on the server, split by key into `PARTITIONS` endpoints
that every path reads: the plain client fetches them in parallel into one DataFrame (`read_flight`),
the DataLoader deals them to its workers, and Ray's read tasks (one per CPU of its cluster) share them,
each worker or task reading its endpoints two at a time. One more DataLoader path takes the same entity
rows locally (an Arrow table in the process), cut into `PARTITIONS` row ranges that its workers send
with `do_exchange`. Every column is numeric, so the DataLoader yields dicts of
tensors with all of them. Each path must return every entity row once (row count and the sum of the
labels), or the run fails. Two more rows time the frameworks alone, reading nothing from Flight (their
floors): a DataLoader epoch whose 2 workers, started for the epoch, yield nothing, and a Ray Data read of 2
one-row blocks. Each round also counts the CPU seconds it cost the server and the client side
(this process and every process it started but the server: DataLoader workers, Ray's processes), which
depend less on a busy machine's load than the wall time does. The forkserver that starts DataLoader workers
is started (and timed) once before the timed rounds, as a training program starts it once, preloading what the
workers import (with `python -m benchmarks.cli`, the main module too, which each worker would otherwise import
anew: 1 s of CPU a worker). Needs the `torch` and `ray` extras.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from benchmarks import report
from benchmarks.datagen import ENTITY_KEY, EVENT_TIME, LABEL, SPAN_DAYS, START, TIMESTAMP, entity_rows, zipf_keys
from benchmarks.harness import Case, Settings, Target, measure, table_name
from benchmarks.processes import family, processes
from flight_client import FeatureClient, read_flight

ENTITY_ROWS = 1_000_000
PARTITIONS = 8
WORKERS = 2
PANDAS = "pandas_read_flight"
LABELS = {
    PANDAS: "(a) read_flight: endpoints in parallel -> pandas",
    "torch_dataloader": f"DataLoader epoch, {WORKERS} workers started per epoch -> tensors",
    "torch_persistent": f"DataLoader epoch, {WORKERS} persistent workers -> tensors",
    "torch_in_process": "FlightDataset in process (num_workers=0) -> tensors",
    "torch_local_rows": f"DataLoader epoch, {WORKERS} workers started per epoch, local entity rows -> tensors",
    "ray_data": f"Ray Data read_training_set, {WORKERS} CPUs, a read task each -> Arrow batches",
    "torch_floor": f"floor: DataLoader epoch, {WORKERS} workers started per epoch, reading nothing",
    "ray_floor": f"floor: Ray Data read of {WORKERS} one-row blocks, {WORKERS} CPUs",
}
FLOORS = ("torch_floor", "ray_floor")  # the frameworks' own cost an epoch: no rows, no ratio


def _preload() -> list[str]:
    """The modules the forkserver imports once for every DataLoader worker: torch, the dataset's, and the main
    module when run as one (`python -m`): spawn and forkserver workers import the main module anew, and
    `benchmarks.cli` imports every benchmark (1 s of CPU a worker, every epoch). A package's `__main__` is left
    out, as workers leave it out: importing it would run the program in the forkserver."""
    main = getattr(sys.modules["__main__"], "__spec__", None)
    name = main.name if main is not None else "__main__"
    return ["torch", "flight_client.torch", *([] if name.split(".")[-1] == "__main__" else [name])]


def feature_table(rows: int, entities: int, seed: int, features: int) -> pa.Table:
    """`rows` rows of float features over the benchmark's key space and days (a tenth of them NaN)."""
    rng = np.random.default_rng([seed, 11])
    event_us = int(START.timestamp() * 1e6) + rng.integers(0, SPAN_DAYS * 86_400_000_000, size=rows)
    columns: dict[str, Any] = {
        ENTITY_KEY: pa.array(zipf_keys(seed, rows, entities, rng)),
        EVENT_TIME: pa.array(event_us).cast(TIMESTAMP),
    }
    for i in range(features):
        values = rng.normal(size=rows)
        values[rng.random(rows) < 0.1] = np.nan
        columns[f"f{i:02d}"] = pa.array(values)
    return pa.table(columns)


def summary(counts: Iterable[tuple[int, float]]) -> tuple[int, float]:
    """Rows and the sum of the labels over (rows, label sum) pairs."""
    rows, labels = 0, 0.0
    for n, total in counts:
        rows, labels = rows + n, labels + total
    return rows, labels


def tensor_counts(batches: Iterable[dict[str, Any]]) -> Iterator[tuple[int, float]]:
    for batch in batches:
        yield len(batch[LABEL]), float(batch[LABEL].sum())


def arrow_counts(batches: Iterable[Any]) -> Iterator[tuple[int, float]]:
    for batch in batches:
        yield batch.num_rows, float(pc.sum(batch[LABEL]).as_py() or 0)


def cpu_seconds(server: int | None) -> tuple[float, float]:
    """CPU seconds so far of the `server`'s processes (serving and write process) and of this process with its
    other descendants (the client side). A descendant that ended counts in its parent once reaped (a DataLoader
    worker in the forkserver)."""
    table = processes()
    served = family(server, table) if server is not None else []
    ours = [p for p in family(os.getpid(), table) if p not in served]
    return sum(table[p].cpu_s for p in served if p in table), sum(table[p].cpu_s for p in ours if p in table)


def run(target: Target, settings: Settings, entity_rows_count: int | None = None) -> dict[str, Any]:
    import ray
    import ray.data
    from torch.utils.data import ChainDataset, DataLoader

    from flight_client.ray import read_training_set
    from flight_client.torch import FlightDataset

    n_entities = entity_rows_count or min(settings.rows, ENTITY_ROWS)
    report.progress(f"integrations: writing {settings.rows:,} feature rows and {n_entities:,} entity rows")
    features_name, entities_name = table_name("int_features"), table_name("int_entities")
    entities = entity_rows(n_entities, settings.entities, settings.seed)
    expected = summary(arrow_counts([entities]))
    with FeatureClient(target.location) as client:
        client.write(
            features_name,
            feature_table(settings.rows, settings.entities, settings.seed, settings.features),
            entity_keys=[ENTITY_KEY],
            event_time=EVENT_TIME,
        )
        client.write(entities_name, entities, entity_keys=[ENTITY_KEY], event_time="event_timestamp")
    features = [f"{features_name}:f{i:02d}" for i in range(settings.features)]
    location = target.location
    got: dict[str, tuple[int, float]] = {}
    arrow_bytes: list[int] = []

    def pandas_case() -> None:
        frame = read_flight(location, entities_name, features=features, partitions=PARTITIONS)
        got[PANDAS] = (len(frame), float(frame[LABEL].sum()))

    def dataset(rows: Any = entities_name) -> FlightDataset:
        return FlightDataset.training_set(location, rows, features, partitions=PARTITIONS)

    def loader(rows: Any = entities_name) -> DataLoader[Any]:
        return DataLoader(dataset(rows), batch_size=None, num_workers=WORKERS, multiprocessing_context="forkserver")

    def loader_case(name: str, loader: Callable[[], Iterable[dict[str, Any]]]) -> Case:
        return Case(lambda: got.__setitem__(name, summary(tensor_counts(loader()))))

    def ray_case() -> None:
        ds = read_training_set(location, entities_name, features, partitions=PARTITIONS)
        batches = ds.iter_batches(batch_size=None, batch_format="pyarrow")
        got["ray_data"] = summary(arrow_counts(batches))

    def torch_floor() -> None:
        # An iterable dataset of no datasets: torch's own, so that its workers unpickle nothing of ours.
        nothing = ChainDataset([])
        loader = DataLoader(nothing, batch_size=None, num_workers=WORKERS, multiprocessing_context="forkserver")
        if any(True for _ in loader):
            raise RuntimeError("the floor's DataLoader yielded a batch")

    def ray_floor() -> None:
        blocks = ray.data.range(WORKERS, override_num_blocks=WORKERS).iter_batches(batch_size=None)
        if sum(len(b["id"]) for b in blocks) != WORKERS:
            raise RuntimeError("the floor's Ray read lost a row")

    # Workers fork from a server process that imported torch once, instead of importing it each.
    multiprocessing.set_forkserver_preload(_preload())
    started = time.perf_counter()
    first = multiprocessing.get_context("forkserver").Process(target=int)  # starts the forkserver, waits for it
    first.start()
    first.join()
    forkserver_s = time.perf_counter() - started
    persistent = DataLoader(
        dataset(), batch_size=None, num_workers=WORKERS, multiprocessing_context="forkserver", persistent_workers=True
    )
    cases = {
        PANDAS: Case(pandas_case),
        "torch_dataloader": loader_case("torch_dataloader", loader),
        "torch_persistent": loader_case("torch_persistent", lambda: persistent),
        "torch_in_process": loader_case("torch_in_process", dataset),
        "torch_local_rows": loader_case("torch_local_rows", lambda: loader(entities)),
        "ray_data": Case(ray_case),
        "torch_floor": Case(torch_floor),
        "ray_floor": Case(ray_floor),
    }
    with FeatureClient(location) as client:
        arrow_bytes.append(client.get_historical_features(entities_name, features, partitions=PARTITIONS).nbytes)
    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}

    def counted(name: str, case: Case) -> Case:
        def run() -> None:
            server, client = cpu_seconds(target.pid)
            case.run()
            after = cpu_seconds(target.pid)
            cpu[name].append((after[0] - server, after[1] - client))

        return Case(run, case.setup)

    try:
        report.progress(f"integrations: timing {len(cases)} ways to read {n_entities:,} training rows, interleaved")
        load = [os.getloadavg()[0]]
        timings = measure(
            {n: counted(n, c) for n, c in cases.items()}, settings.repeat, settings.warmup, "integrations"
        )
        load.append(os.getloadavg()[0])
    finally:
        # Ray ends the process if a Ray object is freed after shutdown: free the unreachable ones first.
        gc.collect()
        ray.shutdown()
    for name, counts in got.items():
        if counts[0] != expected[0] or not np.isclose(counts[1], expected[1]):
            raise RuntimeError(f"{name}: {counts[0]:,} rows, label sum {counts[1]:.3f}; expected {expected}")
    baseline = timings[PANDAS].median
    results = {
        name: {
            "label": LABELS[name],
            **timing.as_dict(),
            "rows_per_s": None if name in FLOORS else n_entities / timing.median,
            "mb_per_s": None if name in FLOORS else arrow_bytes[0] / report.MB / timing.median,
            "ratio_to_pandas": None if name in FLOORS else baseline / timing.median,
            # medians of the timed rounds (None: the server is not a local process)
            "server_cpu_s": statistics.median(c[0] for c in cpu[name][settings.warmup :]) if target.pid else None,
            "client_cpu_s": statistics.median(c[1] for c in cpu[name][settings.warmup :]),
        }
        for name, timing in timings.items()
    }
    return {
        "entity_rows": n_entities,
        "feature_rows": settings.rows,
        "features": len(features),
        "partitions": PARTITIONS,
        "result_arrow_mb": arrow_bytes[0] / report.MB,
        "forkserver_start_s": forkserver_s,
        "load_average_1m": {"start": load[0], "end": load[1]},
        "results": results,
    }


def render(result: dict[str, Any]) -> str:
    header = (
        f"integrations: a training set of {result['entity_rows']:,} entity rows x {result['features']} features "
        f"({result['feature_rows']:,} feature rows; {result['result_arrow_mb']:.1f} MB of Arrow) in "
        f"{result['partitions']} endpoints; rows/s = training rows / s"
    )
    rows = [
        [
            r["label"],
            *(report.timing_cells(r) if r["rows_per_s"] is not None else _floor_cells(r)),
            "-" if r["ratio_to_pandas"] is None else report.ratio(r["ratio_to_pandas"]),
            _cpu(r["server_cpu_s"]),
            _cpu(r["client_cpu_s"]),
        ]
        for r in result["results"].values()
    ]
    footer = (
        f"DataLoader workers fork from a forkserver (preloading torch) started once before the rounds: "
        f"{result['forkserver_start_s']:.2f} s\n"
        "checks: every path returned every entity row once (row count and label sum)\n"
        "floors: the frameworks alone, reading nothing, their workers or read tasks started as in the paths above\n"
        "CPU s: medians per round; server: its serving and write processes; client: this process and all it started "
        "but the server (workers, Ray)\n"
        f"load average (1 min): {result['load_average_1m']['start']:.1f} at the start, "
        f"{result['load_average_1m']['end']:.1f} at the end"
    )
    return "\n".join(
        [header, report.table(["path", *report.TIMING_HEADERS, "vs (a)", "server CPU s", "client CPU s"], rows), footer]
    )


def _floor_cells(result: dict[str, Any]) -> list[str]:
    """A floor's cells under `report.TIMING_HEADERS`: its times, and no rate (it reads nothing)."""
    return [report.seconds(result[key]) for key in ("median_s", "min_s", "max_s")] + ["-", "-"]


def _cpu(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"
