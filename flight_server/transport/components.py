"""What the RPCs work with, built once per server from its settings: the catalog, the query engine, the
writers and the read services. The service routes to them, and closes them when it shuts down."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flight_server.base.config import ServerConfig
from flight_server.base.locks import LockPool
from flight_server.base.memory import MemoryBudget, default_budget
from flight_server.changes import reachable
from flight_server.changes.deletes import Deleter
from flight_server.changes.maintenance import Maintenance
from flight_server.changes.upkeep import Upkeep
from flight_server.changes.writes import Writer
from flight_server.iceberg import lineage
from flight_server.iceberg.catalog import FeatureCatalog
from flight_server.iceberg.metadata_files import snapshot_json
from flight_server.online.service import OnlineService
from flight_server.online.store import OnlineStore
from flight_server.reads.caches import (
    PLAN_CACHE_BYTES,
    POSITION_CACHE_BYTES,
    FileCache,
    PlanCache,
    PositionCache,
    ReadCaches,
)
from flight_server.reads.duck import Engine, object_storage
from flight_server.training.asof import AsofCache
from flight_server.training.entities import EntitySplits
from flight_server.training.sets import TrainingSets
from flight_server.transport.offload import PROCESS_STATS, OffloadedMaintenance, WriteProcess, appended_messages

if TYPE_CHECKING:  # calls.py counts through metrics.py, which reads these components
    from flight_server.transport.calls import CallLog


@dataclass(frozen=True)
class Components:
    """The server's working parts; one instance per server, so two servers in a process share nothing."""

    config: ServerConfig
    catalog: FeatureCatalog
    engine: Engine
    memory: MemoryBudget  # what the caches below hold together
    caches: ReadCaches
    writer: Writer
    deleter: Deleter
    maintenance: Maintenance
    upkeep: Upkeep
    store: OnlineStore
    training: TrainingSets
    online: OnlineService
    writes: WriteProcess | None  # with --write-process: puts, deletes and maintenance run there, not in the above
    calls: CallLog | None = None  # the calls running now, when the server tracks them (metrics or JSON logs)

    @classmethod
    def build(cls, config: ServerConfig, write_process: bool = False, calls: CallLog | None = None) -> Components:
        """The parts of a server, or of a server's write process (`write_process`). DuckDB keeps copies of the files
        it read (`Engine`) only in a serving process that reads them from object storage; where a REST server names
        the metadata files (not `names_metadata_files`), `Engine.metadata_file` keeps a path that came back with
        another table's file (SeaweedFS's `v<N>.metadata.json`, of a table created again) from the cache."""
        catalog = FeatureCatalog(config.catalog_name, config.resolved_catalog_properties(), config.default_namespace)
        file_cache = not write_process and object_storage(catalog.properties)
        engine = Engine(
            config.duckdb_memory_limit,
            config.duckdb_threads,
            config.duckdb_temp_dir,
            file_cache,
            unique_metadata_names=catalog.names_metadata_files,
        )
        engine.use_storage(catalog.properties)
        budget = config.memory_budget_bytes
        memory = MemoryBudget(default_budget() if budget is None else budget)
        caches = ReadCaches(
            PlanCache(PLAN_CACHE_BYTES, memory),
            PositionCache(POSITION_CACHE_BYTES, memory),
            FileCache(config.scan_cache_bytes, memory),
        )
        # Deletes and maintenance commit through the same per-table locks as writes.
        locks = LockPool()
        limits = (config.write_chunk_bytes, config.commit_timeout_seconds, config.batch_rows)
        writes = WriteProcess(config) if config.write_process else None
        store = OnlineStore(
            catalog,
            engine,
            caches,
            config.online_refresh_seconds,
            config.online_max_bytes,
            config.online_tables,
            memory,
            planner=writes.plan_refresh if writes is not None else None,
        )
        cache = AsofCache(engine, caches, config.historical_cache_bytes, catalog, config.online_refresh_seconds, memory)
        splits = EntitySplits(config.historical_cache_bytes, memory)
        training = TrainingSets(catalog, engine, cache, config.batch_rows, config.max_exchange_bytes, splits)

        def in_use(table_uuid: str) -> set[int]:
            """Snapshots that expiry keeps: those running reads and cached training sets use."""
            return caches.in_use.kept(table_uuid) | cache.snapshots(table_uuid)

        # With the write process, automatic maintenance compacts there (`OffloadedMaintenance`), beside the puts.
        maintenance = OffloadedMaintenance(catalog, engine, locks, *limits, in_use=in_use, writes=writes)
        return cls(
            config=config,
            catalog=catalog,
            engine=engine,
            memory=memory,
            caches=caches,
            writer=Writer(
                catalog,
                config.write_chunk_bytes,
                config.commit_timeout_seconds,
                locks,
                config.group_commit,
                config.group_commit_linger_seconds,
            ),
            deleter=Deleter(catalog, engine, locks, *limits),
            maintenance=maintenance,
            upkeep=Upkeep(maintenance, config),
            store=store,
            training=training,
            online=OnlineService(store, catalog, training),
            writes=writes,
            calls=calls,
        )

    def offloaded(self) -> WriteProcess | None:
        """The write process, when writes go there now (`WriteProcess.usable`); None: they run in this process."""
        return self.writes if self.writes is not None and self.writes.usable() else None

    def write_process_stats(self) -> dict[str, Any] | None:
        """The write process's puts in progress, caches and process figures (one call to it, within 2 s; it asks
        nothing of the catalog); None when there is none, none runs (nothing waits for one to start) or it did not
        answer."""
        return self.writes.ask(PROCESS_STATS) if self.writes is not None else None

    def writes_in_progress(self, child: dict[str, Any] | None) -> int:
        """Puts being written or committed, by this process or its write process (both, while it starts), whose
        figures are `child` (`write_process_stats`)."""
        return self.writer.in_progress + (int(child["writes_in_progress"]) if child is not None else 0)

    def cache_stats(self) -> dict[str, dict[str, Any]]:
        """The caches that every server process keeps, its write process too (the serving process's scan,
        training-set and online caches aside), by name: entries, hits and misses, and the weight each holds and may
        hold (`WeightedLru.stats`)."""
        return {
            "plans": self.caches.plans.stats("bytes"),
            "positions": self.caches.positions.stats("bytes"),
            **self.catalog.cache_stats(),
            "snapshot_json": snapshot_json.kept.stats("bytes"),  # JSON text: a character a byte
            **reachable.cache_stats(),
            "appended_files": lineage.cache_stats(),
            "appended_messages": appended_messages.stats("bytes"),  # the write process's answers to its puts
        }

    def changed(self, table: str) -> None:
        """This server committed to `table`: the online index, the training-set cache and maintenance look now
        instead of at their next poll."""
        self.store.notify(table)
        self.training.cache.notify(table)
        self.upkeep.notify(table)

    def close(self) -> None:
        """Stop the background work, once the server takes no more calls: automatic maintenance, the online
        store's refresh thread, the training sets' join workers, the engine's cancel watch, the write process."""
        self.upkeep.close()
        self.store.close()
        self.training.close()
        self.engine.close()
        if self.writes is not None:
            self.writes.close()
