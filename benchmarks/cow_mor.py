"""`flight-bench cow-vs-mor`: what merge-on-read deletes cost readers, next to copy-on-write and compaction.

One generated feature table, written several times (unpartitioned, so it is one data file and each
merge-on-read delete adds exactly one delete file): copy-on-write with 1 %, 10 % and 30 % of its rows
deleted (entity deletes: all rows of randomly chosen keys), merge-on-read with the same rows deleted
in 1, 10 or 100 deletes (that many delete files), and the 10 % merge-on-read table after `compact`.
For each, in the same run, interleaved: a full scan over Flight, a filtered scan, a training set
(`do_exchange`), the online index build (the server's code, in process) and pyiceberg's own
`scan().to_arrow()` in process as a baseline. Every variant of a share must return the same rows,
or the run fails.

The compacted table is then timed against its copy-on-write twin once more, in pairs: one read at
a time, the two tables back to back in ABBA order, `PAIRED_FACTOR` times as many rounds, and the
median of the per-round ratios reported (`paired_ratios`). A shared machine's load drifts over the
seconds a round of 13 layouts takes; within a pair it hits both alike. With a local server, the run also checks that the
compacted table's data files have the Parquet layout of the copy-on-write table's.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks import report
from benchmarks.baselines import CATALOG_NAME
from benchmarks.datagen import ENTITY_KEY, EVENT_TIME, entity_rows, feature_names, feature_table
from benchmarks.harness import Case, Settings, Target, measure, table_name
from benchmarks.report import steps
from flight_client import FeatureClient
from flight_server.iceberg.catalog import FeatureCatalog
from flight_server.online.store import OnlineStore
from flight_server.reads.caches import ReadCaches
from flight_server.reads.duck import Engine, local_path

SHARES = (0.01, 0.10, 0.30)  # of the rows, deleted
DELETE_FILES = (1, 10, 100)
QUICK_DELETE_FILES = (1, 3)
COMPACTED_SHARE = 0.10
ENTITY_ROWS_SHARE = 20  # training-set entity rows: --rows / this
FILTER_KEYS = 0.10  # the filtered scan reads the keys below this quantile
MEASURES = {
    "scan": "Flight scan -> Arrow",
    "filtered": "Flight filtered scan (a tenth of the keys) -> Arrow",
    "training": "Flight training set (do_exchange) -> Arrow",
    "online_build": "online index build (server code, in process)",
    "pyiceberg": "pyiceberg scan().to_arrow(), in process",
}
ROWS_MEASURES = ("scan", "filtered", "pyiceberg")  # reported as rows/s; the others as seconds
PAIRED_FACTOR = 2  # rounds of compacted against copy-on-write (4 reads each): this many times --repeat


@dataclass(frozen=True)
class Variant:
    """One physical layout of the table with `share` of its rows deleted."""

    key: str
    mode: str  # copy-on-write, merge-on-read or compacted
    share: float
    deletes: int  # delete actions (merge-on-read: delete files)

    @property
    def label(self) -> str:
        if self.mode == "copy-on-write":
            return f"copy-on-write, {self.share:.0%} deleted"
        if self.mode == "compacted":
            return f"merge-on-read {self.share:.0%} deleted, then compacted"
        return f"merge-on-read, {self.share:.0%} deleted in {self.deletes} delete file{'s' * (self.deletes > 1)}"


def variants(delete_files: tuple[int, ...]) -> list[Variant]:
    out = []
    for share in SHARES:
        out.append(Variant(f"cow_{share:.0%}", "copy-on-write", share, 1))
        out += [Variant(f"mor_{share:.0%}_{n}", "merge-on-read", share, n) for n in delete_files]
    out.append(Variant(f"compacted_{COMPACTED_SHARE:.0%}", "compacted", COMPACTED_SHARE, 1))
    return out


def doomed_keys(data: pa.Table, share: float, seed: int) -> list[int]:
    """Random keys whose rows add up to about `share` of the table (hot keys that would overshoot are skipped)."""
    counts = data[ENTITY_KEY].value_counts()
    keys, sizes = counts.field("values").to_numpy(), counts.field("counts").to_numpy()
    order = np.random.default_rng(seed).permutation(len(keys))
    target, total, chosen = share * data.num_rows, 0, []
    for i in order:
        if total + sizes[i] <= target * 1.01:
            chosen.append(int(keys[i]))
            total += int(sizes[i])
        if total >= target * 0.99:
            break
    return chosen


class InProcess:
    """What runs in this process on the server's catalog: pyiceberg's reader and the online index build."""

    def __init__(self, properties: dict[str, str]):
        self.catalog = FeatureCatalog(CATALOG_NAME, properties)
        self.store = OnlineStore(self.catalog, Engine(), ReadCaches(), refresh_seconds=3600)

    def pyiceberg(self, table: str) -> pa.Table:
        return self.catalog.load(table).scan().to_arrow()

    def online_build(self, table: str) -> int:
        return len(self.store.build(self.catalog.load(table)).state.positions)

    def layout(self, table: str) -> list[dict[str, Any]]:
        """The Parquet layout of the table's data files (local ones): what decides how fast they read."""
        loaded = self.catalog.load(table)
        out = []
        for task in sorted(loaded.scan().plan_files(), key=lambda t: str(t.file.partition)):
            meta = pq.ParquetFile(local_path(task.file.file_path)).metadata
            groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
            columns = [groups[0].column(i) for i in range(meta.num_columns)] if groups else []
            out.append(
                {
                    "rows": meta.num_rows,
                    "row_groups": [g.num_rows for g in groups],
                    "bytes": [g.total_byte_size for g in groups],
                    "schema": str(meta.schema.to_arrow_schema()),
                    "columns": [(c.path_in_schema, c.compression, c.encodings, c.has_dictionary_page) for c in columns],
                    "statistics": [c.is_stats_set for c in columns],
                    "sorting": str(groups[0].sorting_columns) if groups else None,
                    "delete_files": len(task.delete_files),
                }
            )
        return out

    def close(self) -> None:
        self.store.close()


def build(client: FeatureClient, data: pa.Table, variant: Variant, keys: list[int]) -> dict[str, Any]:
    """Write the table and delete `keys` as the variant says; returns its name and the time the deletes took."""
    name = table_name(f"cowmor_{variant.key.replace('%', 'pct')}")
    client.write(name, data, entity_keys=[ENTITY_KEY], event_time=EVENT_TIME, partition_by=[])
    mode = "merge-on-read" if variant.mode != "copy-on-write" else "copy-on-write"
    seconds, deleted = [], 0
    for part in range(min(variant.deletes, len(keys))):  # fewer when fewer keys are deleted (tiny data)
        start = time.perf_counter()
        result = client.delete(name, keys={ENTITY_KEY: keys[part :: variant.deletes]}, mode=mode)
        seconds.append(time.perf_counter() - start)
        deleted += result["rows_deleted"]
    built = {"table": name, "rows_deleted": deleted, "delete_s": seconds}
    if variant.mode == "compacted":
        start = time.perf_counter()
        built["compaction"] = client.compact(name)
        built["compact_s"] = time.perf_counter() - start
    info = client.describe(name)["snapshots"][-1]["summary"]
    built["delete_files"] = int(info.get("total-delete-files", 0))
    return built


def run(target: Target, settings: Settings, delete_files: tuple[int, ...] = DELETE_FILES) -> dict[str, Any]:
    data = feature_table(settings.rows, settings.entities, settings.seed, settings.features)
    entities = entity_rows(max(1, settings.rows // ENTITY_ROWS_SHARE), settings.entities, settings.seed)
    features = feature_names(settings.features)
    threshold = int(np.quantile(data[ENTITY_KEY].to_numpy(), FILTER_KEYS))
    properties = target.catalog_properties()
    local = InProcess(properties) if properties is not None else None
    layouts = variants(delete_files)
    keys = {share: doomed_keys(data, share, settings.seed) for share in SHARES}
    built: dict[str, dict[str, Any]] = {}
    last: dict[str, Any] = {}

    def keep(key: str, produce: Any) -> Case:
        """A case that keeps its last result, for the checks."""

        def run_case() -> None:
            last[key] = produce()

        return Case(run_case)

    try:
        with FeatureClient(target.location) as client:
            for variant in layouts:
                report.progress(f"cow-vs-mor: writing {settings.rows:,} rows, then deleting: {variant.label}")
                built[variant.key] = build(client, data, variant, keys[variant.share])
            cases: dict[str, Case] = {}
            for variant in layouts:
                name = built[variant.key]["table"]
                refs = [f"{name}:{f}" for f in features]
                reads = {
                    "scan": lambda n=name: client.scan(n).read_all(),
                    "filtered": lambda n=name: client.scan(n, filter=f"{ENTITY_KEY} < {threshold}").read_all(),
                    "training": lambda r=refs: client.get_historical_features(entities, r),
                }
                if local is not None:
                    reads["online_build"] = lambda n=name: local.online_build(n)
                    reads["pyiceberg"] = lambda n=name: local.pyiceberg(n)
                for measure_key, read in reads.items():
                    cases[f"{variant.key}:{measure_key}"] = keep(f"{variant.key}:{measure_key}", read)
            report.progress(f"cow-vs-mor: timing {len(cases)} reads of {len(layouts)} layouts, interleaved")
            timings = measure(cases, settings.repeat, settings.warmup, "cow-vs-mor")
            compacted, cow = f"compacted_{COMPACTED_SHARE:.0%}", f"cow_{COMPACTED_SHARE:.0%}"
            paired = paired_ratios(
                {m: (cases[f"{cow}:{m}"], cases[f"{compacted}:{m}"]) for m in MEASURES if f"{cow}:{m}" in cases},
                settings.repeat * PAIRED_FACTOR,
            )
            layout = {k: local.layout(built[k]["table"]) for k in (cow, compacted)} if local is not None else None
    finally:
        if local is not None:
            local.close()
    checks = check(layouts, built, last, data.num_rows)
    if layout is not None:
        if layout[cow] != layout[compacted]:
            raise RuntimeError(f"the compacted table's files are laid out unlike copy-on-write's: {layout}")
        checks["same_layout"] = {"compared": [cow, compacted], "files": layout[cow]}
    results = {}
    for variant in layouts:
        cow = f"cow_{variant.share:.0%}"
        measures = {}
        for measure_key in MEASURES:
            timing = timings.get(f"{variant.key}:{measure_key}")
            if timing is None:
                continue
            entry: dict[str, Any] = {**timing.as_dict()}
            rows = _rows(last.get(f"{variant.key}:{measure_key}"))
            if measure_key in ROWS_MEASURES:
                entry["rows"] = rows
                entry["rows_per_s"] = rows / timing.median
            entry["ratio_to_cow"] = timings[f"{cow}:{measure_key}"].median / timing.median
            if variant.mode == "compacted" and measure_key in paired:
                entry["paired"] = paired[measure_key]
            measures[measure_key] = entry
        results[variant.key] = {
            "label": variant.label,
            "mode": variant.mode,
            "share": variant.share,
            "deletes": variant.deletes,
            "read_path": last[f"{variant.key}:scan"].schema.metadata[b"flight.read_path"].decode(),
            "filtered_read_path": last[f"{variant.key}:filtered"].schema.metadata[b"flight.read_path"].decode(),
            **built[variant.key],
            "measures": measures,
        }
    return {
        "rows": settings.rows,
        "entities": settings.entities,
        "entity_rows": entities.num_rows,
        "features": len(features),
        "delete_files": list(delete_files),
        "filter": f"{ENTITY_KEY} < {threshold}",
        "checks": checks,
        "results": results,
    }


def paired_ratios(pairs: dict[str, tuple[Case, Case]], rounds: int) -> dict[str, dict[str, Any]]:
    """For each measure, the first case's time over the second's: the median over `rounds` rounds, and its
    quartiles (above 1: the second is faster).

    One measure at a time, after an untimed read of each, each round runs first-second-second-first
    back to back and takes the geometric mean of its two ratios, so that each case is as often the
    first read after the other as after itself. Orders that are not so balanced measured two
    identical files 5-14 % apart here: the first read after another kind of read runs slower.
    """
    ratios: dict[str, list[float]] = {key: [] for key in pairs}
    label = f"cow-vs-mor: {rounds} ABBA rounds of {len(pairs)} reads, compacted against copy-on-write"
    for key, round_ in steps([(k, r) for k in pairs for r in range(rounds)], label):
        cases = pairs[key]
        if round_ == 0:
            for case in cases:
                case.run()
        seconds: list[list[float]] = [[], []]
        for index in (0, 1, 1, 0):
            start = time.perf_counter()
            cases[index].run()
            seconds[index].append(time.perf_counter() - start)
        ratios[key].append(math.sqrt((seconds[0][0] / seconds[1][0]) * (seconds[0][1] / seconds[1][1])))
    out = {}
    for key, values in ratios.items():
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        out[key] = {"ratio": statistics.median(values), "q1": quartiles[0], "q3": quartiles[2], "rounds": len(values)}
    return out


def _rows(value: Any) -> int:
    return value.num_rows if isinstance(value, pa.Table) else int(value or 0)


def check(layouts: list[Variant], built: dict[str, dict[str, Any]], last: dict[str, Any], rows: int) -> dict[str, Any]:
    """Every layout of a share returns the rows its copy-on-write twin does (scans, training sets, index)."""
    for variant in layouts:
        cow = f"cow_{variant.share:.0%}"
        expected = rows - built[cow]["rows_deleted"]
        if built[variant.key]["rows_deleted"] != built[cow]["rows_deleted"]:
            raise RuntimeError(
                f"{variant.label}: {built[variant.key]['rows_deleted']} rows deleted, not as many as COW"
            )
        for measure_key in ("scan", "pyiceberg"):  # pyiceberg's types differ a little: rows counted only
            got = last.get(f"{variant.key}:{measure_key}")
            if got is not None and got.num_rows != expected:
                raise RuntimeError(
                    f"{variant.label}: {MEASURES[measure_key]} returned {got.num_rows:,} rows, not {expected:,}"
                )
        for measure_key in ("scan", "filtered", "training", "online_build"):
            got, want = last.get(f"{variant.key}:{measure_key}"), last.get(f"{cow}:{measure_key}")
            if isinstance(got, pa.Table):  # a training set keeps the entity rows' order; a scan has none
                got, want = _comparable(got, measure_key), _comparable(want, measure_key)
                same = got.equals(want)
            else:
                same = got == want
            if not same:
                raise RuntimeError(f"{variant.label}: {MEASURES[measure_key]} differs from copy-on-write's")
    return {
        "rows_left": {f"{share:.0%}": rows - built[f"cow_{share:.0%}"]["rows_deleted"] for share in SHARES},
        "compared": sorted({k.split(":")[1] for k in last}),
    }


def _comparable(table: pa.Table, measure_key: str) -> pa.Table:
    """The rows without schema metadata (it names the snapshots), scans sorted (their order is not defined)."""
    table = table.replace_schema_metadata(None)
    return table if measure_key == "training" else table.sort_by([(c, "ascending") for c in table.column_names])


def render(result: dict[str, Any]) -> str:
    header = (
        f"cow-vs-mor: {result['rows']:,} rows x {result['features']} features over {result['entities']:,} keys, "
        f"one unpartitioned data file; filtered scan: {result['filter']}; training set: {result['entity_rows']:,} "
        "entity rows; cells: median (vs copy-on-write of the same share, higher is faster)"
    )
    rows = []
    for entry in result["results"].values():
        cells = [entry["label"], f"{entry['read_path']} / {entry['filtered_read_path']}", str(entry["delete_files"])]
        for key in MEASURES:
            m = entry["measures"].get(key)
            if m is None:
                cells.append("-")
                continue
            value = f"{report.rate(m['rows_per_s'])}/s" if key in ROWS_MEASURES else f"{m['median_s']:.3f}s"
            cell = f"{value} ({report.ratio(m['ratio_to_cow'])})"
            if "paired" in m:
                cell += f" paired {report.ratio(m['paired']['ratio'])}"
            cells.append(cell)
        rows.append(cells)
    headers = ["layout", "scan / filtered path", "delete files", *(k.replace("_", " ") for k in MEASURES)]
    setup = []
    for entry in result["results"].values():
        if entry["mode"] == "copy-on-write" or entry["deletes"] == max(result["delete_files"]):
            line = f"  {entry['label']}: {len(entry['delete_s'])} delete(s), median {np.median(entry['delete_s']):.3f}s"
            if "compact_s" in entry:
                line += f", then compaction {entry['compact_s']:.2f}s"
            setup.append(line)
    legend = [f"  {k.replace('_', ' ')}: {v}" for k, v in MEASURES.items()]
    legend.append(
        f"  paired: compacted against copy-on-write, back to back in ABBA order, median of {PAIRED_FACTOR}x as "
        "many rounds"
    )
    return "\n".join([header, report.table(headers, rows), *legend, "setup (untimed):", *setup])
