"""The online indexes of every table a replica serves, refreshed in the background as snapshots land."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.flight as flight
from pyiceberg.table import Table

from flight_server.base.locks import LockPool
from flight_server.base.memory import MemoryBudget
from flight_server.base.outages import outage
from flight_server.base.schemas import table_arrow_schema
from flight_server.iceberg.catalog import FeatureCatalog, FeatureSpec, feature_spec, table_name
from flight_server.iceberg.lineage import commit_ranks
from flight_server.online.index import (
    ENTRY_BYTES,
    READ_BATCH_ROWS,
    SMALL_KEY_BYTES,
    IndexState,
    OnlineIndex,
    Rows,
    appended_files,
    estimate_bytes,
    key_kind,
    latest_sql,
    table_keys,
)
from flight_server.reads.caches import ReadCaches
from flight_server.reads.duck import Engine
from flight_server.reads.paths import files_relation, scan_relation
from flight_server.reads.plan import plan_table_scan, renamed
from flight_server.wire.errors import LimitError, NotFoundError, RequestError, detail_code, error_kind, error_message
from flight_server.wire.reads import ScanRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefreshPlan:
    """What an index refresh needs of its table's current state, worked out where the table's metadata is
    parsed. Parsing it (pydantic, in one call that holds the GIL for milliseconds as the history grows) and
    reading the new manifests are most of a refresh's Python work: with `--write-process` the write process
    does both, and reads the appended Parquet files too (`OnlineStore.plan`); the serving process only merges."""

    name: str
    version: str  # `table_version`
    snapshot_id: int | None = None
    schema_id: int = 0
    properties: dict[str, str] = field(default_factory=dict)
    files: list[str] | None = None  # appended since the index's snapshot (past compactions); None: something else

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> RefreshPlan:
        return cls(**json.loads(raw))


# (table, the metadata file the index was refreshed from, its snapshot, the bytes its new rows may take, the bytes a
# rebuilt index may take) -> the plan and the latest row per key of its appended files, or of the whole table when
# more than appends happened (`OnlineStore.plan`), or None when none was made
Planner = Callable[[str, "str | None", "int | None", int, int], "tuple[RefreshPlan, pa.Table | None] | None"]


def plan_results(plan: RefreshPlan, rows: pa.Table | None) -> list[bytes]:
    """A plan and its rows as the results of one Flight action: the plan's JSON, then the rows in Arrow IPC."""
    if rows is None:
        return [plan.to_bytes()]
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_table(rows)
    return [plan.to_bytes(), sink.getvalue().to_pybytes()]


def from_results(results: list[bytes]) -> tuple[RefreshPlan, pa.Table | None]:
    """`plan_results` read back."""
    rows = pa.ipc.open_stream(results[1]).read_all() if len(results) > 1 else None
    return RefreshPlan.from_bytes(results[0]), rows


def table_version(table: Table) -> str:
    """What an index checks to know its table unchanged: the table's metadata file, which is never rewritten, and its
    uuid, since a REST catalog may name a table dropped and created again the same way (SeaweedFS's
    `<location>/metadata/v<N>.metadata.json`: review 23 saw an index keep the dropped table's rows)."""
    return f"{table.metadata.table_uuid} {table.metadata_location}"


def plan_refresh(name: str, table: Table, known: str | None, since: int | None) -> RefreshPlan:
    """The `RefreshPlan` of an index of `name` (`table`) refreshed from version `known` at snapshot `since`."""
    version = table_version(table)
    if version == known:
        return RefreshPlan(name, version)
    snapshot = table.current_snapshot()
    current = snapshot.snapshot_id if snapshot else None
    files = None
    if since is not None and current is not None and not renamed(table):
        files = appended_files(table, since, current)  # read by column name (`_read_latest`)
    return RefreshPlan(
        name,
        version,
        current,
        table.metadata.current_schema_id,
        dict(table.metadata.properties),
        files,
    )


class OnlineStore:
    """The online indexes of one server, refreshed by a background thread."""

    def __init__(
        self,
        catalog: FeatureCatalog,
        engine: Engine,
        caches: ReadCaches,
        refresh_seconds: float = 0.5,
        max_bytes: int = 2 << 30,
        preload: tuple[str, ...] | list[str] = (),
        budget: MemoryBudget | None = None,
        planner: Planner | None = None,
    ):
        self.catalog = catalog
        self.planner = planner  # refreshes planned in another process (the write process): no metadata parsed here
        self.engine, self.caches = engine, caches
        self.refresh_seconds = refresh_seconds
        self.max_bytes = max_bytes
        self._indexes: dict[str, OnlineIndex] = {}
        self._building = LockPool()  # one build or refresh of a table at a time
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._preload = list(preload)
        # Pinned in the server's memory budget: serving needs every index, so the other caches make room.
        self._account = (budget or MemoryBudget(max_bytes)).account("online_index", max_bytes)
        self._over = False  # the indexes alone pass the budget (logged once each time it starts)
        self._thread = threading.Thread(target=self._run, name="online-refresh", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def name(self, ref: str) -> str:
        return ".".join(self.catalog.identifier(ref))

    def get(self, ref: str) -> OnlineIndex:
        """The table's index, built now if this is its first use (later callers wait for that one build)."""
        name = self.name(ref)
        index = self._indexes.get(name)
        if index is not None:
            return index
        with self._building(name):
            index = self._indexes.get(name)
            if index is None:
                index = self.build(self.catalog.read(name))
                self._indexes[name] = index
                self._charge()
            return index

    def peek(self, ref: str) -> OnlineIndex | None:
        """The index if the table has one; never builds."""
        return self._indexes.get(ref) or self._indexes.get(self.name(ref))

    def notify(self, ref: str) -> None:
        """A write through this server committed: refresh now rather than at the next poll."""
        if self.name(ref) in self._indexes:
            self._wake.set()

    def indexes(self) -> dict[str, OnlineIndex]:
        """Every index, by table name."""
        return dict(self._indexes)

    def stats(self) -> dict[str, Any]:
        indexes = list(self._indexes.values())
        return {
            "tables": len(indexes),
            "bytes": sum(i.nbytes() for i in indexes),
            "max_bytes": self.max_bytes,
            "refresh_seconds": self.refresh_seconds,
        }

    def _room(self, name: str, within_budget: bool = True) -> int:
        """Bytes an index of `name` may take without the indexes together passing `max_bytes`, nor (for a new
        index) the memory budget once the other caches have made room. An index already served is refreshed
        whatever the budget says: dropping it would stop its lookups."""
        others = sum(i.nbytes() for n, i in list(self._indexes.items()) if n != name)
        return (min(self.max_bytes, self._account.limit()) if within_budget else self.max_bytes) - others

    def _charge(self) -> None:
        """Tell the memory budget what the indexes take now (the other caches evict to make room)."""
        with self._account.lock:  # summed under it, so that the last charge counts every index added before it
            over = self._account.hold(sum(i.nbytes() for i in list(self._indexes.values())))
        if over and not self._over:
            log.warning(
                "the online indexes pass the memory budget by %.1f MiB: they keep serving, and the scan and "
                "training-set caches keep nothing until they shrink (raise --memory-budget-mb)",
                over / 2**20,
            )
        self._over = over > 0

    def _read_latest(
        self,
        table: Table,
        spec: FeatureSpec,
        schema: pa.Schema,
        files: list[str] | None,
        room: int,
    ) -> tuple[pa.Table, str]:
        """The latest row per key of the current snapshot (read on the path a scan of it takes: the direct
        one for position deletes, `iceberg_scan` for equality deletes), or of just `files` (appended
        Parquet files); and the read path.

        Streamed, so that a table whose index would not fit in `room` bytes is refused as soon as
        that is clear, not after its rows have filled the machine's memory.
        """
        self.engine.use_storage(table.io.properties)
        name = table_name(table)
        cursor = self.engine.cursor()
        try:
            if files is None:
                snapshot = table.current_snapshot()
                request = ScanRequest(  # in the table's current schema, which `build` indexes (`IndexState.schema_id`)
                    table=name,
                    snapshot_id=snapshot.snapshot_id if snapshot else None,
                    schema_id=table.metadata.current_schema_id,
                )
                plan = plan_table_scan(table, request, self.caches)
                ranks = commit_ranks(table, plan.snapshot_id) if plan.snapshot_id is not None else {}
                source, params, path = scan_relation(plan, self.engine, cursor, READ_BATCH_ROWS, ranks)
            else:
                (source, params), path = files_relation(files, schema.names, cursor), "read_parquet"
            try:
                result = cursor.execute(latest_sql(spec, schema.names, source), params)
            except duckdb.BinderException:  # a column added to the table since these rows were written: nulls
                found = {column[0] for column in cursor.execute(f"SELECT * FROM {source} LIMIT 0", params).description}
                result = cursor.execute(latest_sql(spec, schema.names, source, found), params)
            batches, taken = [], 0
            for batch in result.to_arrow_reader(READ_BATCH_ROWS):
                batches.append(batch)
                taken += batch.nbytes + batch.num_rows * (ENTRY_BYTES + SMALL_KEY_BYTES)
                if taken > room:
                    raise LimitError(
                        f"the online index of {name!r} would take more than the memory cap leaves "
                        f"({max(room, 0) >> 20} MiB; raise --online-max-mb or --memory-budget-mb)"
                    )
            return (pa.Table.from_batches(batches).cast(schema) if batches else schema.empty_table()), path
        finally:
            cursor.close()

    def build(self, table: Table, within_budget: bool = True) -> OnlineIndex:
        """An index of the table's current snapshot, read whole on a scan's read path (a rebuild of an index
        already served: whatever the memory budget says)."""
        name = table_name(table)
        spec = feature_spec(table)
        schema = table_arrow_schema(table.schema())
        for key in spec.entity_keys:
            if key_kind(schema.field(key).type) is None:
                raise RequestError(
                    f"table {name!r}: online lookups need integer or string keys; {key!r} is {schema.field(key).type}"
                )
        started = time.perf_counter()
        snapshot = table.current_snapshot()
        path = "empty"
        if snapshot is None:
            rows = schema.empty_table()
        else:
            rows, path = self._read_latest(table, spec, schema, None, self._room(name, within_budget))
        snapshot_id = snapshot.snapshot_id if snapshot else None
        state = self._state(name, rows, spec, snapshot_id, table.metadata.current_schema_id, within_budget)
        index = OnlineIndex(name, state, time.perf_counter() - started, path)
        index.version = table_version(table)
        log.info(
            "online index %s: %d entities, %.1f MiB, from snapshot %s (%s path) in %.2f s",
            name,
            len(state.positions),
            index.nbytes() / 2**20,
            state.snapshot_id,
            path,
            index.build_seconds,
        )
        return index

    def _state(
        self, name: str, rows: pa.Table, spec: FeatureSpec, snapshot_id: int | None, schema_id: int, within_budget: bool
    ) -> IndexState:
        """A whole index's state from the latest row per key (refused past the memory cap)."""
        rows = rows.combine_chunks()
        keys = table_keys(rows, spec)
        if keys and estimate_bytes(rows, keys[0]) > self._room(name, within_budget):
            raise LimitError(
                f"the online index of {name!r} would take about {estimate_bytes(rows, keys[0]) >> 20} MiB "
                f"({len(keys)} entities), more than the memory cap leaves (raise --online-max-mb or "
                "--memory-budget-mb)"
            )
        return IndexState(
            snapshot_id, schema_id, spec, Rows.of(rows, spec), dict(zip(keys, range(len(keys)), strict=True))
        )

    def plan(
        self, name: str, known: str | None, since: int | None, room: int, rebuild_room: int | None = None
    ) -> tuple[RefreshPlan, pa.Table | None]:
        """A refresh of another process's index planned here (in the write process: `Planner`), with the latest row
        per key of the appended files read here too (at most `room` bytes), so that the serving process only merges
        them: the Parquet read's CPU and DuckDB's threads stay off the cores and the GIL that serve lookups
        (compactions in between change no rows: `appended_files`). When more than appends and compactions happened
        (a delete, an overwrite), or an appended file is gone, the latest rows of the whole table (at most
        `rebuild_room` bytes), which the serving process swaps in. No rows when there are none to read, or the table
        is no longer a feature table (that process rebuilds)."""
        table = self.catalog.read(name)
        plan = plan_refresh(name, table, known, since)
        spec = FeatureSpec.from_properties(plan.properties)
        if spec is None or plan.snapshot_id is None or plan.snapshot_id == since:
            return plan, None
        schema = table_arrow_schema(table.schema())
        if plan.files is None:
            if rebuild_room is None:
                return plan, None
            return plan, self._read_latest(table, spec, schema, None, rebuild_room)[0]
        if not plan.files:
            return plan, None
        latest = self._read_appended(table, spec, schema, plan.files, room)
        if latest is None:
            whole = None if rebuild_room is None else self._read_latest(table, spec, schema, None, rebuild_room)[0]
            return replace(plan, files=None), whole
        return plan, latest

    def _read_appended(
        self, table: Table, spec: FeatureSpec, schema: pa.Schema, files: list[str], room: int
    ) -> pa.Table | None:
        """The latest row per key of appended files; None when one is gone: compacted away after it was appended,
        then deleted by snapshot expiry (the index is rebuilt instead)."""
        try:
            return self._read_latest(table, spec, schema, files, room)[0]
        except duckdb.IOException as exc:
            log.info("online index %s: an appended file is gone (%s); rebuilding", table_name(table), exc)
            return None

    def refresh(self, name: str) -> str:
        """Bring one index up to its table's current snapshot; says what it did. Polling an unchanged
        table is cheap where the catalog says so without reading its metadata (SQL: `FeatureCatalog.read`)."""
        index = self._indexes[name]
        if self.planner is not None:
            planned = self._planned(name, index, self.planner)
            if planned is not None:
                return planned
        table = self.catalog.read(name)
        version = table_version(table)
        if version == index.version:
            return "current"
        outcome = self._catch_up(name, index, table)
        index.version = version
        return outcome

    def _planned(self, name: str, index: OnlineIndex, planner: Planner) -> str | None:
        """The refresh from a `RefreshPlan` made in another process; None when it needs the table here (a new
        schema or spec that the other process read no whole table under) or no plan could be made (the refresh then
        runs here, as without one)."""
        state = index.state
        room = self._room(name, within_budget=False)
        planned = planner(name, index.version, state.snapshot_id, room - index.nbytes(), room)
        if planned is None:
            return None
        plan, latest = planned
        if plan.version == index.version:
            return "current"
        spec = FeatureSpec.from_properties(plan.properties)
        if spec != state.spec or plan.schema_id != state.schema_id:
            if spec is None or plan.files is not None or latest is None:
                return None  # only appended rows (or none) read there: of no use under the new shape
        elif plan.snapshot_id == state.snapshot_id:
            index.version = plan.version
            return "current"
        if plan.snapshot_id is None or (latest is None and plan.files is None):
            return None
        if plan.files is None:  # rebuilt from the whole table's latest rows (its current shape), read there
            assert latest is not None and spec is not None
            index.state = self._state(name, latest, spec, plan.snapshot_id, plan.schema_id, within_budget=False)
            index.rebuilds += 1
            index.version = plan.version
            return "rebuilt in the write process"
        changed = index.apply(latest if latest is not None else index.schema.empty_table(), plan.snapshot_id)
        index.appends += 1
        index.version = plan.version
        return f"appended {len(plan.files)} file(s), {changed} key(s) changed"

    def _catch_up(self, name: str, index: OnlineIndex, table: Table) -> str:
        state = index.state
        snapshot = table.current_snapshot()
        current = snapshot.snapshot_id if snapshot else None
        spec = FeatureSpec.from_properties(table.metadata.properties)
        same_shape = spec == state.spec and table.metadata.current_schema_id == state.schema_id
        if current == state.snapshot_id and same_shape:
            return "current"
        files = None
        if state.snapshot_id is not None and current is not None and same_shape and not renamed(table):
            files = appended_files(table, state.snapshot_id, current)  # read by column name (`_read_latest`)
        latest = None
        if files:
            room = self._room(name, within_budget=False) - index.nbytes()
            latest = self._read_appended(table, state.spec, index.schema, files, room)
        if files is not None and (latest is not None or not files):
            assert current is not None, "files are appended up to a current snapshot"
            changed = index.apply(latest if latest is not None else index.schema.empty_table(), current)
            index.appends += 1
            return f"appended {len(files)} file(s), {changed} key(s) changed"
        rebuilt = self.build(table, within_budget=False)
        index.state, index.build_seconds, index.read_path = rebuilt.state, rebuilt.build_seconds, rebuilt.read_path
        index.rebuilds += 1
        return "rebuilt"

    def _run(self) -> None:
        for ref in self._preload:
            try:
                self.get(ref)
            except Exception as exc:
                log.error("online index %s: not built at start-up: %s", ref, exc)
        while not self._stop.is_set():
            self._wake.wait(self.refresh_seconds)
            self._wake.clear()
            polled, pointers = time.monotonic(), self.catalog.metadata_locations(list(self._indexes))
            for name in list(self._indexes):
                if self._stop.is_set():
                    return
                if pointers is None or not self._unchanged(name, pointers, polled):
                    self._refresh_one(name)

    def _unchanged(self, name: str, pointers: dict[str, str], polled: float) -> bool:
        """Whether the index was refreshed from the metadata file the catalog points its table at now (recorded as
        checked then): a metadata file is never rewritten, and SQL catalogs name each one anew (`table_version`). A
        failing index, or a table the catalog no longer has, is refreshed on its own (that says so)."""
        index = self._indexes.get(name)
        pointer = pointers.get(name)
        if index is None or pointer is None or index.failure is not None or index.version is None:
            return False
        if index.version.partition(" ")[2] != pointer:
            return False
        index.checked_at = polled
        return True

    def _refresh_one(self, name: str) -> None:
        index = self._indexes[name]
        try:
            started = time.monotonic()
            with self._building(name):
                outcome = self.refresh(name)
            if index.failure is not None:  # the end of an outage is worth a line, as its start was
                log.info("online index %s: refreshes work again (snapshot %s)", name, index.state.snapshot_id)
            index.failure = index.error = None
            index.checked_at = started
            if outcome != "current":
                self._charge()
                log.info("online index %s: %s (snapshot %s)", name, outcome, index.state.snapshot_id)
        except NotFoundError:
            log.info("online index %s: the table is gone; index dropped", name)
            self._indexes.pop(name, None)
            self._charge()
        except LimitError as exc:  # lookups build it again, and are refused the same way
            log.error("online index %s: %s", name, exc)
            self._indexes.pop(name, None)
            self._charge()
        except Exception as exc:
            failure = f"{type(exc).__name__}: {exc}"
            if failure != index.failure:  # once per distinct failure, not at every poll
                log.exception("online index %s: refresh failed; serving snapshot %s", name, index.state.snapshot_id)
            index.failure, index.error = failure, refresh_error(exc)


def refresh_error(exc: Exception) -> str:
    """What `describe` shows of a failed refresh, one line without traceback or server path: the outage's message
    when the catalog or the object store is away, here or in the write process (which relays the message it would
    answer a client, in a Flight error carrying its kind), else `error_kind`'s."""
    if (down := outage(exc)) is not None:
        return down
    if isinstance(exc, flight.FlightError) and detail_code(exc) is not None:
        return error_message(exc)
    return error_kind(exc)[1]
