"""`flight-bench historical`: point-in-time training sets into pandas, next to DuckDB and pandas in process.

Three feature tables share one skewed key space: one with ties on (key, event time) broken by a
created time, one with a 7-day TTL, one keyed by (entity_id, channel). Entity rows are joined to
all three, into pandas, by the server (entities streamed with `do_exchange`, or read from a table
on the server) and, in the same run on the same data, by DuckDB and pandas `merge_asof` on Arrow
tables and DataFrames already in memory (no Iceberg, no Flight): the same three ASOF joins, the
same tie-break and TTL. Every result must hold the entity rows unchanged, and its sampled feature
values must match DuckDB's, or the run fails.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from benchmarks import datagen, report
from benchmarks.baselines import CATALOG_NAME
from benchmarks.datagen import (
    CHANNEL,
    CREATED_TIME,
    ENTITY_KEY,
    ENTITY_TIME,
    EVENT_TIME,
    LABEL,
    pit_feature_table,
)
from benchmarks.harness import Case, PeakRss, Settings, Target, local_server, measure, table_name, writing
from flight_client import FeatureClient
from flight_server.base.config import ServerConfig
from flight_server.iceberg.catalog import FeatureCatalog
from flight_server.reads.duck import Engine
from flight_server.training.entities import prepare_entities
from flight_server.training.join import run_historical, use_storage
from flight_server.training.plan import plan_historical
from flight_server.wire.reads import HistoricalRequest

FEATURE_ROWS = 10_000_000  # rows of the largest feature table; --rows scales every size from here
ROWS_PER_ENTITY = 100  # default --entities: 100K keys for 10M rows
ENTITY_ROWS_SHARE = 10  # default entity rows: --rows / 10, so 1M by default and 2K with --quick
SAMPLE_ROWS = 10_000
# Beyond this many entity rows the two replica cases (cold, DuckDB) are left out: two more servers and two
# more results of that size would not fit next to the others on a 24 GiB machine.
REPLICA_CASES_MAX_ROWS = 2_000_000  # rows whose feature values are compared with the DuckDB baseline
EXCHANGE = "flight_exchange"
COLD = "flight_exchange_cold"
DUCKDB_SERVER = "flight_exchange_duckdb"
ENTITY_COLUMNS = (ENTITY_KEY, CHANNEL, ENTITY_TIME, LABEL)
LABELS = {
    EXCHANGE: "(a) Flight do_exchange, entities streamed from pandas -> pandas",
    COLD: "(a) on a fresh server: sorting the feature snapshots included",
    DUCKDB_SERVER: "(a) on a server joining with DuckDB (--historical-cache-mb 0)",
    "flight_entity_table": "(b) Flight, entity table on the server -> pandas",
    "server_join_local": "server's plan + join on the Iceberg files, in process (no Flight) -> pandas",
    "duckdb_memory": "(c) DuckDB ASOF JOINs on Arrow in memory, in process -> pandas",
    "pandas_merge_asof": "(c) pandas sort + merge_asof x3 in memory, in process",
}


@dataclass(frozen=True)
class FeatureShape:
    """One generated feature table: its share of --rows and its point-in-time definition."""

    name: str
    share: float
    table_seed: int
    created: bool
    ttl: dt.timedelta | None
    composite: bool

    @property
    def keys(self) -> list[str]:
        return [ENTITY_KEY, CHANNEL] if self.composite else [ENTITY_KEY]

    def write(self, client: FeatureClient, name: str, table: pa.Table) -> None:
        """Write `table` to a new feature table `name` with this shape's definition."""
        created = CREATED_TIME if self.created else None
        client.write(name, table, entity_keys=self.keys, event_time=EVENT_TIME, created_time=created, ttl=self.ttl)


SHAPES = (
    FeatureShape("txn", 1.0, 1, created=True, ttl=None, composite=False),
    FeatureShape("profile", 0.25, 2, created=True, ttl=dt.timedelta(days=7), composite=False),
    FeatureShape("device", 0.5, 3, created=False, ttl=None, composite=True),
)


def feature_columns(columns: list[str]) -> list[str]:
    return [n for n in columns if n not in (ENTITY_KEY, CHANNEL, EVENT_TIME, CREATED_TIME)]


def feature_refs(names: dict[FeatureShape, str], tables: dict[FeatureShape, pa.Table]) -> list[str]:
    """Every feature of the tables, as `table:feature`, each table under its name in `names`."""
    return [f"{names[shape]}:{f}" for shape, table in tables.items() for f in feature_columns(table.column_names)]


def checksum(values: pd.Series | np.ndarray) -> str:
    """A digest of a column's values in order: equal only if the rows came back in input order."""
    return hashlib.blake2b(np.ascontiguousarray(np.asarray(values)).tobytes(), digest_size=8).hexdigest()


def duckdb_sql(names: list[str], tables: dict[FeatureShape, pa.Table]) -> str:
    """The dedup-free ASOF LEFT JOIN chain, as the server writes it: created time in the inequality, TTL after."""
    selects = [f"e.{c}" for c in ENTITY_COLUMNS]
    joins = []
    for i, ((shape, table), name) in enumerate(zip(tables.items(), names, strict=True)):
        alias = f"f{i}"
        on = " AND ".join(f"e.{k} = {alias}.{k}" for k in shape.keys)
        if shape.created:
            inequality = (
                f"struct_pack(t := e.{ENTITY_TIME}, c := 'infinity'::TIMESTAMPTZ) >= "
                f"struct_pack(t := {alias}.{EVENT_TIME}, c := {alias}.{CREATED_TIME})"
            )
        else:
            inequality = f"e.{ENTITY_TIME} >= {alias}.{EVENT_TIME}"
        joins.append(f"ASOF LEFT JOIN {name} {alias} ON {on} AND {inequality}")
        for feature in feature_columns(table.column_names):
            if shape.ttl is None:
                selects.append(f"{alias}.{feature}")
            else:
                fresh = f"{alias}.{EVENT_TIME} >= e.{ENTITY_TIME} - to_seconds({int(shape.ttl.total_seconds())})"
                selects.append(f"CASE WHEN {fresh} THEN {alias}.{feature} END AS {feature}")
    return f"SELECT {', '.join(selects)} FROM ent e {' '.join(joins)} ORDER BY e.__row"


class DuckDBMemory:
    """The DuckDB baseline: the feature tables and entity rows scanned as Arrow tables in memory."""

    def __init__(self, tables: dict[FeatureShape, pa.Table], entities: pa.Table):
        self.con = duckdb.connect()
        self.tables = {f"mem_{shape.name}": table for shape, table in tables.items()}
        self.entities = entities
        self.sql = duckdb_sql(list(self.tables), tables)

    def run(self) -> pd.DataFrame:
        cursor = self.con.cursor()  # registrations are per cursor: each run starts from scratch
        try:
            cursor.execute("SET TimeZone = 'UTC'")
            # Arrow scans tell the planner nothing of their size (it assumes ~1 row), so below 64 rows
            # DuckDB would rewrite an ASOF join into a nested loop join: 50x slower at 100K x 500K rows.
            cursor.execute("SET asof_loop_join_threshold = 0")
            for name, table in self.tables.items():
                cursor.register(name, table)
            rows = pa.array(np.arange(self.entities.num_rows, dtype=np.int64))
            cursor.register("ent", self.entities.append_column("__row", rows))
            return cursor.execute(self.sql).to_arrow_table().to_pandas()
        finally:
            cursor.close()


def pandas_merge_asof(entities: pd.DataFrame, frames: dict[FeatureShape, pd.DataFrame]) -> pd.DataFrame:
    """The pandas baseline: sort, `merge_asof` backward by key (with the TTL as tolerance), three times.

    Sorting by (event time, created time) makes the latest created row win a tie, as merge_asof
    takes the last of equal times; the input order is restored at the end.
    """
    out = entities.assign(__row=np.arange(len(entities))).sort_values(ENTITY_TIME, kind="stable")
    for shape, frame in frames.items():
        right = frame.sort_values([EVENT_TIME, CREATED_TIME] if shape.created else EVENT_TIME, kind="stable")
        right = right[[*shape.keys, EVENT_TIME, *feature_columns(list(frame.columns))]]
        right = right.rename(columns={EVENT_TIME: "__ts"})
        out = pd.merge_asof(
            out,
            right,
            left_on=ENTITY_TIME,
            right_on="__ts",
            by=shape.keys,
            direction="backward",
            tolerance=pd.Timedelta(shape.ttl) if shape.ttl else None,
        ).drop(columns="__ts")
    return out.sort_values("__row").drop(columns="__row").reset_index(drop=True)


class Replica:
    """A server on the target's catalog, restarted before each run so that its caches start empty."""

    def __init__(self, target: Target):
        self.target = target
        self.location = ""
        self._running = contextlib.ExitStack()

    def restart(self) -> None:
        self._running.close()
        self.location = self._running.enter_context(
            local_server(self.target.catalog_config, self.target.warehouse)
        ).location

    def stop(self) -> None:
        self._running.close()


class ServerJoinLocal:
    """The server's own plan and query (`iceberg_scan` ASOF chain) in this process: its join minus Flight."""

    def __init__(self, properties: dict[str, str], features: list[str], entities: pa.Table):
        self.catalog = FeatureCatalog(CATALOG_NAME, properties)
        self.engine = Engine()
        self.features, self.entities = features, entities

    def run(self) -> pd.DataFrame:
        plan = plan_historical(self.catalog, HistoricalRequest(features=self.features), self.entities.schema)
        use_storage(self.engine, plan)  # object-storage credentials, as the server registers them per request
        cursor = self.engine.cursor()
        try:
            cursor.register("__bench_entities", prepare_entities(self.entities, plan, 0))
            reader = run_historical(plan, cursor, "__bench_entities", [], ServerConfig.batch_rows)
            return reader.read_all().to_pandas()
        finally:
            cursor.close()


def compare(result: pd.DataFrame, expected: pd.DataFrame, sample: np.ndarray, what: str) -> int:
    """Check the sampled rows: entity columns equal, and every feature null in both or equal in both."""
    if list(result.columns) != list(expected.columns):
        raise RuntimeError(f"{what}: columns {list(result.columns)}; expected {list(expected.columns)}")
    compared = 0
    for column in expected.columns:
        got, want = result[column].iloc[sample], expected[column].iloc[sample]
        got_na, want_na = got.isna().to_numpy(), want.isna().to_numpy()
        both = ~got_na & ~want_na
        differ = (got_na != want_na) | (both & (got.to_numpy() != want.to_numpy()))
        if differ.any():
            row = int(sample[np.flatnonzero(differ)[0]])
            raise RuntimeError(
                f"{what}: {int(differ.sum())} of {len(sample)} sampled values of {column!r} differ "
                f"from the DuckDB baseline; first at row {row}: {result.iloc[row].to_dict()} "
                f"vs {expected.iloc[row].to_dict()}"
            )
        compared += int(both.sum())
    return compared


def check(results: dict[str, pd.DataFrame], entities: pd.DataFrame, seed: int) -> dict[str, Any]:
    """Every path returns one row per entity row with the entity columns unchanged, and the same features.

    Row order must be the input order, except for the server-side entity table, whose rows come
    back in the server's order; it is compared after sorting both sides on every entity column.
    """
    expected = results["duckdb_memory"]
    label_checksum = checksum(entities[LABEL])
    sample = np.sort(np.random.default_rng(seed).choice(len(entities), min(len(entities), SAMPLE_ROWS), replace=False))
    if checksum(expected[LABEL]) != label_checksum or len(expected) != len(entities):
        raise RuntimeError("the DuckDB baseline lost the entity rows' order")
    compared = {}
    for name, result in results.items():
        if len(result) != len(entities):
            raise RuntimeError(f"{name}: {len(result):,} rows for {len(entities):,} entity rows")
        if name == "flight_entity_table":
            order = list(ENTITY_COLUMNS)
            result = result.sort_values(order, kind="stable").reset_index(drop=True)
            sorted_expected = expected.sort_values(order, kind="stable").reset_index(drop=True)
            compared[name] = compare(result, sorted_expected, sample, name)
            continue
        if checksum(result[LABEL]) != label_checksum:
            raise RuntimeError(f"{name}: the label column is not in the entity rows' order")
        if name != "duckdb_memory":
            compared[name] = compare(result, expected, sample, name)
    return {"label_checksum": label_checksum, "sampled_rows": len(sample), "values_compared": compared}


def run(target: Target, settings: Settings, entity_rows: int | None = None) -> dict[str, Any]:
    rows = {shape: max(1, round(settings.rows * shape.share)) for shape in SHAPES}
    n_entities = entity_rows or max(1, settings.rows // ENTITY_ROWS_SHARE)
    per_table = max(1, settings.features)
    report.progress(
        f"historical: generating {sum(rows.values()):,} feature rows in {len(SHAPES)} tables and "
        f"{n_entities:,} entity rows over {settings.entities:,} keys"
    )
    start = time.perf_counter()
    tables = {
        shape: pit_feature_table(
            rows[shape],
            settings.entities,
            settings.seed,
            per_table,
            prefix=shape.name,
            table_seed=shape.table_seed,
            created=shape.created,
            composite=shape.composite,
        )
        for shape in SHAPES
    }
    entities = datagen.entity_rows(n_entities, settings.entities, settings.seed, exact=tables[SHAPES[0]])
    generate_s = time.perf_counter() - start
    names = {shape: table_name(f"hist_{shape.name}") for shape in SHAPES}
    entity_table = table_name("hist_entities")
    write_s: dict[str, float] = {}
    with FeatureClient(target.location) as client:
        for shape, table in tables.items():
            report.progress(f"historical: writing {table.num_rows:,} rows to {names[shape]}")
            start = time.perf_counter()
            shape.write(client, names[shape], table)
            write_s[names[shape]] = time.perf_counter() - start
        report.progress(f"historical: writing {entities.num_rows:,} entity rows to {entity_table}")
        start = time.perf_counter()
        client.write(entity_table, entities, entity_keys=[ENTITY_KEY], event_time=ENTITY_TIME)
        write_s[entity_table] = time.perf_counter() - start

        features = feature_refs(names, tables)
        entity_df = entities.to_pandas()
        frames = {shape: table.to_pandas() for shape, table in tables.items()}
        memory = DuckDBMemory(tables, entities)
        last: dict[str, pd.DataFrame] = {}
        arrow_bytes: list[int] = []

        def keep(name: str, produce: Callable[[], pd.DataFrame]) -> Case:
            def run_case() -> None:
                last[name] = produce()

            return Case(run_case)

        def exchange() -> pd.DataFrame:
            table = client.get_historical_features(entity_df, features)
            arrow_bytes[:] = [table.nbytes]
            return table.to_pandas()

        def exchange_at(location: str) -> pd.DataFrame:
            with FeatureClient(location) as other:
                return other.get_historical_features(entity_df, features).to_pandas()

        cases = {
            EXCHANGE: keep(EXCHANGE, exchange),
            "flight_entity_table": keep(
                "flight_entity_table", lambda: client.get_historical_features(entity_table, features).to_pandas()
            ),
        }
        properties = target.catalog_properties()
        replicas = contextlib.ExitStack()
        if properties is not None and n_entities <= REPLICA_CASES_MAX_ROWS:
            # Replicas on the same catalog: one joining with DuckDB, and a fresh one before every cold run.
            duckdb_server = replicas.enter_context(
                local_server(target.catalog_config, target.warehouse, args=["--historical-cache-mb", "0"])
            )
            cases[DUCKDB_SERVER] = keep(DUCKDB_SERVER, lambda: exchange_at(duckdb_server.location))
            cold = Replica(target)
            replicas.callback(cold.stop)
            cases[COLD] = Case(lambda: last.__setitem__(COLD, exchange_at(cold.location)), cold.restart)
        if properties is not None:
            cases["server_join_local"] = keep("server_join_local", ServerJoinLocal(properties, features, entities).run)
        cases["duckdb_memory"] = keep("duckdb_memory", memory.run)
        cases["pandas_merge_asof"] = keep("pandas_merge_asof", lambda: pandas_merge_asof(entity_df, frames))
        report.progress(
            f"historical: timing {len(cases)} ways to join {n_entities:,} entity rows to "
            f"{len(features)} features, interleaved"
        )
        with replicas:
            timings = measure(cases, settings.repeat, settings.warmup, "historical")
    report.progress("historical: checking the results against the DuckDB baseline")
    checks = check(last, entity_df, settings.seed)
    live, live_peak = live_tables(target, settings, tables, entities)
    exchange_s = timings[EXCHANGE].median
    results = {}
    for key, timing in timings.items():
        results[key] = {
            "label": LABELS[key],
            **timing.as_dict(),
            "rows_per_s": n_entities / timing.median,
            "mb_per_s": arrow_bytes[0] / report.MB / timing.median,
            "ratio_to_exchange": exchange_s / timing.median,
        }
    return {
        "entity_rows": n_entities,
        "entity_table": entity_table,
        "entities": settings.entities,
        "features": len(features),
        "tables": [
            {
                "table": names[shape],
                "rows": table.num_rows,
                "keys": shape.keys,
                "created_time": shape.created,
                "ttl_s": int(shape.ttl.total_seconds()) if shape.ttl else None,
                "features": feature_columns(table.column_names),
            }
            for shape, table in tables.items()
        ],
        "result_arrow_mb": arrow_bytes[0] / report.MB,
        "setup_s": {"generate": generate_s, "write": write_s},
        "checks": checks,
        "results": results,
        "live": live,
        "live_server_peak_rss_bytes": live_peak.serving if live_peak else None,
        "live_server_write_process_peak_rss_bytes": live_peak.write if live_peak else None,
    }


LIVE_FRACTIONS = (0.001, 0.1)  # rows appended to every feature table before each live round, of its rows
LIVE_SERVER_ARGS = ["--no-auto-maintenance"]  # the live rounds' server: see `live_tables`


def live_tables(
    target: Target,
    settings: Settings,
    tables: dict[FeatureShape, pa.Table],
    entities: pa.Table,
) -> tuple[dict[str, Any], PeakRss | None]:
    """Training sets on tables that keep growing: each round appends `fraction` new rows to every feature table,
    then times (1) the training set asked for right after the last put's ack (it waits for, or does, the index
    extension), and (2) after another append, how long until the server has brought every index forward on its own
    (`refreshed_ahead`, polled; or given up on one that does not fit, `too_large`) and the training set then; each
    against the same request again (warm, same snapshots), and the first also against the request at the round's
    start, before its append (steady: the best of two; a fold that waited for the first to end runs beside the warm
    one, and the tables grow round after round). The last result of each fraction is compared with the server's
    DuckDB join of the same snapshots. Each round records how the indexes of its two appends came to be (extended,
    read whole again, or left to DuckDB), and the compactions committed meanwhile: a round that rebuilt or fell back
    is reported, not hidden.

    A server this run started is measured on a second server on its catalog, started with `--no-auto-maintenance`
    (the puts go through it, so the first server's maintenance does not see them either): with maintenance on, a
    round a minute compacted the buckets that the appends had filled with small files (8 files a put, 10 make a
    compaction), and an index past a compaction is read whole by design (its files were replaced), so two of four
    10 % rounds measured a rebuild instead of an extension. The rounds append to copies of the feature tables,
    written through that server first: the first server followed the tables of the earlier cases and brought its own
    indexes forward after every append, on the same cores as the measured request (a 10 % round took 1.7-2.7 s
    instead of 1.2 s). Also returned: that server's peak memory (None when the server was given)."""
    with contextlib.ExitStack() as stack:
        if target.warehouse is not None:  # else a server given by --location: measured as it is
            target = stack.enter_context(local_server(target.catalog_config, target.warehouse, args=LIVE_SERVER_ARGS))
        names = {shape: table_name(f"hist_live_{shape.name}") for shape in tables}
        features = feature_refs(names, tables)
        properties = target.catalog_properties()
        entity_df = entities.to_pandas()
        out: dict[str, Any] = {}
        catalog = FeatureCatalog(CATALOG_NAME, properties) if properties is not None else None
        seen: set[int] = set()

        def compactions() -> int | None:
            """Snapshots committed since the last call (the first call: ever) that replaced files instead of appending
            them (compactions, overwrites, deletes), over the feature tables; None without the catalog."""
            if catalog is None:
                return None
            found = 0
            for name in names.values():
                for snapshot in catalog.read(name).snapshots():
                    if snapshot.snapshot_id not in seen:
                        seen.add(snapshot.snapshot_id)
                        operation = snapshot.summary.operation.value if snapshot.summary is not None else "append"
                        found += operation != "append"
            return found

        with FeatureClient(target.location) as client:
            for shape, table in tables.items():  # tables no other server follows (the docstring says why)
                shape.write(client, names[shape], table)
            writing(client)
            compactions()

            def stats() -> dict[str, int]:
                found: dict[str, int] = client.health()["training_set_cache"]
                return found

            def append(fraction: float, round_: int) -> None:
                for shape, table in tables.items():
                    more = pit_feature_table(
                        max(1, round(table.num_rows * fraction)),
                        settings.entities,
                        settings.seed + 1000 * (round_ + 1) + int(fraction * 1e6),
                        max(1, settings.features),
                        prefix=shape.name,
                        table_seed=shape.table_seed,
                        created=shape.created,
                        composite=shape.composite,
                    )
                    client.write(names[shape], more)

            def timed() -> tuple[float, pd.DataFrame]:
                start = time.perf_counter()
                result = client.get_historical_features(entity_df, features).to_pandas()
                return time.perf_counter() - start, result

            sample = np.sort(
                np.random.default_rng(settings.seed).choice(
                    len(entity_df), min(len(entity_df), SAMPLE_ROWS), replace=False
                )
            )

            def check_live(result: pd.DataFrame, what: str) -> int | None:
                """The result against the server's DuckDB join of the current snapshots, in this process."""
                if properties is None:
                    return None
                return compare(result, ServerJoinLocal(properties, features, entities).run(), sample, what)

            def outcome(before: dict[str, int]) -> dict[str, int]:
                """How the indexes since `before` came to be: brought forward, read whole again, or left to DuckDB."""
                now = stats()
                return {
                    "extended": now["incremental_builds"] - before["incremental_builds"],
                    "rebuilt": now["builds"] - before["builds"],
                    "duckdb": now.get("too_large", 0) - before.get("too_large", 0),
                }

            timed()  # a new server: its indexes built before the rounds, as the earlier cases left the first server's
            for fraction in LIVE_FRACTIONS:
                report.progress(f"historical: live tables, appending {fraction:.1%} to every feature table per round")
                first, ready, warm, fresh, steady = [], [], [], [], []
                indexes: list[dict[str, Any]] = []
                compared = 0
                rounds = settings.warmup + settings.repeat
                for round_ in range(rounds):
                    steady_s = min(timed()[0] for _ in range(2))  # before the append: the best of two
                    before = stats()
                    append(fraction, 2 * round_)
                    after_s, result = timed()
                    warm_s = timed()[0]
                    after_put, compacted = outcome(before), {"first_after_put": compactions()}
                    if round_ == rounds - 1:
                        compared += check_live(result, f"first training set after appending {fraction:.1%}") or 0
                    before = stats()  # read first: refreshes start with the first put
                    append(fraction, 2 * round_ + 1)
                    acked = time.perf_counter()
                    while (now := stats())["refreshed_ahead"] + now.get("too_large", 0) < (
                        before["refreshed_ahead"] + before.get("too_large", 0) + len(tables)
                    ):
                        if time.perf_counter() - acked > 600:
                            raise RuntimeError("the server did not bring its training-set indexes forward in 10 min")
                        time.sleep(0.005)
                    fresh_s = time.perf_counter() - acked
                    ready_s, result = timed()
                    refreshed = outcome(before)
                    compacted["refreshed"] = compactions()
                    if round_ == rounds - 1:
                        compared += check_live(result, f"training set after appending {fraction:.1%}, refreshed") or 0
                    indexes.append(
                        {
                            "round": round_,
                            "warmup": round_ < settings.warmup,
                            "first_after_put": after_put,
                            "refreshed": refreshed,
                            "compactions": compacted,  # snapshots that replaced files, committed meanwhile
                        }
                    )
                    if after_put["extended"] < len(tables) or refreshed["extended"] < len(tables):
                        report.progress(
                            f"historical: round {round_} after appending {fraction:.1%}: indexes {after_put} at first, "
                            f"{refreshed} refreshed ahead (of {len(tables)} tables), compactions {compacted}: not all "
                            "extended"
                        )
                    if round_ >= settings.warmup:
                        steady.append(steady_s)
                        first.append(after_s)
                        warm.append(warm_s)
                        fresh.append(fresh_s)
                        ready.append(ready_s)
                warm_median = float(np.median(warm))
                out[f"{fraction:g}"] = {
                    "fraction": fraction,
                    "first_after_put_s": first,
                    "after_refresh_s": ready,
                    "warm_s": warm,
                    "freshness_s": fresh,
                    "ratio_first_to_warm": warm_median / float(np.median(first)),
                    "steady_s": steady,
                    "ratio_first_to_steady": float(np.median(steady)) / float(np.median(first)),
                    "ratio_after_refresh_to_warm": warm_median / float(np.median(ready)),
                    "values_compared": compared if properties is not None else None,
                    "indexes": indexes,
                    "all_extended": all(
                        r[when]["extended"] >= len(tables) for r in indexes for when in ("first_after_put", "refreshed")
                    ),
                }
        return out, target.peak_rss()


def short(table: str) -> str:
    """`bench.hist_txn_0123456789` -> `hist_txn`."""
    return table.split(".")[-1].rsplit("_", 1)[0]


def render(result: dict[str, Any]) -> str:
    tables = ", ".join(
        f"{short(t['table'])} {t['rows']:,}"
        + (f" (TTL {t['ttl_s'] // 86_400}d)" if t["ttl_s"] else "")
        + (" (2 keys)" if len(t["keys"]) > 1 else "")
        for t in result["tables"]
    )
    setup = result["setup_s"]
    header = (
        f"historical: {result['entity_rows']:,} entity rows x {len(result['tables'])} feature tables "
        f"({tables} rows; {result['entities']:,} keys), {result['features']} features "
        f"= {result['result_arrow_mb']:.1f} MB of Arrow; rows/s = entity rows / s"
    )
    rows = [
        [r["label"], *report.timing_cells(r), report.ratio(r["ratio_to_exchange"])] for r in result["results"].values()
    ]
    checks = result["checks"]
    footer = [
        f"setup (untimed): generate {setup['generate']:.1f}s, write "
        + ", ".join(f"{short(name)} {s:.1f}s" for name, s in setup["write"].items()),
        f"checks: every path returned {result['entity_rows']:,} rows with the entity columns unchanged (label "
        f"checksum {checks['label_checksum']}); feature values of {checks['sampled_rows']:,} sampled rows equal "
        "DuckDB's",
    ]
    live = [
        [
            f"after appending {r['fraction']:.1%} to every feature table{_not_extended(r)}",
            report.seconds(float(np.median(r["warm_s"]))),
            report.seconds(float(np.median(r["first_after_put_s"]))),
            report.ratio(r["ratio_first_to_warm"]),
            report.ratio(r["ratio_first_to_steady"]) if "ratio_first_to_steady" in r else "-",
            report.seconds(float(np.median(r["freshness_s"]))),
            report.seconds(float(np.median(r["after_refresh_s"]))),
            report.ratio(r["ratio_after_refresh_to_warm"]),
        ]
        for r in result.get("live", {}).values()
    ]
    live_table = report.table(
        [
            "live tables (do_exchange)",
            "warm s",
            "first after put s",
            "warm / first",
            "steady / first",
            "put ack -> indexes ready s",
            "then s",
            "warm / then",
        ],
        live,
    )
    notes = [
        f"live, after appending {r['fraction']:.1%}, round {i['round']}{' (warmup)' if i['warmup'] else ''}: "
        + "; ".join(
            f"{when.replace('_', ' ')} {_counts(i[when], i.get('compactions', {}).get(when))}"
            for when in ("first_after_put", "refreshed")
        )
        for r in result.get("live", {}).values()
        if not r.get("all_extended", True)
        for i in r["indexes"]
    ]
    if any("steady_s" in r for r in result.get("live", {}).values()):
        notes.append(
            "live: warm = the same request again right after the first (same snapshots); steady = the request at the "
            "round's start, before its append (the best of two: nothing to bring forward)"
        )
    if result.get("live_server_peak_rss_bytes") is not None:
        peak = PeakRss(result["live_server_peak_rss_bytes"], result.get("live_server_write_process_peak_rss_bytes"))
        notes.append(f"live tables measured on a server without automatic maintenance: peak RSS {peak.describe()}")
    return "\n".join(
        [
            header,
            report.table(["training set path", *report.TIMING_HEADERS, "vs (a)"], rows),
            *footer,
            live_table,
            *notes,
        ]
    )


def _counts(outcome: dict[str, int], compacted: int | None) -> str:
    done = f"{outcome['extended']} extended, {outcome['rebuilt']} read whole, {outcome['duckdb']} left to DuckDB"
    return done + (f", {compacted} compaction(s) committed meanwhile" if compacted else "")


def _not_extended(live: dict[str, Any]) -> str:
    """The marker of a live case in which an index was not extended (read whole, or left to DuckDB): its rounds
    are listed below the table."""
    return "" if live.get("all_extended", True) else " (NOT ALL EXTENDED: see below)"
