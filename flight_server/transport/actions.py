"""Every action of `do_action`, in one table: its name, what `list_actions` says of it, the permission it needs,
how its body parses and what runs it. The service serves `do_action`, its permission check and `list_actions`
from this table alone; tests/test_actions.py checks that the client and docs/protocol.md cover every row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Generic, Protocol, TypeVar

from pyiceberg.table import Table

from flight_server import __version__
from flight_server.changes.orphans import remove_orphan_files
from flight_server.iceberg.catalog import FeatureCatalog, FeatureSpec, describe, table_name
from flight_server.transport.auth import ADMIN, READ, Principal
from flight_server.transport.components import Components
from flight_server.transport.metrics import process_figures
from flight_server.wire.actions import (
    Calls,
    CompactRequest,
    DeleteRequest,
    ExpireRequest,
    Health,
    HealthRequest,
    MaintenanceResult,
    OrphanFilesRequest,
    OrphanFilesResult,
    PinRequest,
    TableDescription,
    TableRequest,
    TableSummary,
    UnpinRequest,
)
from flight_server.wire.codec import Reply


class _OnTable(Protocol):
    """A request naming the table it changes."""

    @property
    def table(self) -> str: ...


Request = TypeVar("Request")
Change = TypeVar("Change", bound=_OnTable)
Result = TypeVar("Result", bound=Reply)


@dataclass(frozen=True)
class Action(Generic[Request]):
    """One action: `parse` turns the JSON body into its request (None: the action takes no body, and any body is
    ignored; `optional_body`: an empty body parses as `{}`); `run` answers it, for a caller whose permission and
    tables the service has checked."""

    name: str
    doc: str
    permission: str
    parse: Callable[[dict[str, Any]], Request] | None
    run: Callable[[Components, Principal, Request], Reply | list[Reply]]
    optional_body: bool = False


def visible_tables(catalog: FeatureCatalog, caller: Principal) -> list[str]:
    """The tables in the namespaces the caller may use."""
    return [name for name in catalog.table_names() if caller.may_use(name.rpartition(".")[0])]


def table_summary(table: Table) -> TableSummary:
    spec = FeatureSpec.from_properties(table.metadata.properties)
    snapshot = table.current_snapshot()
    return TableSummary(
        table=table_name(table),
        feature=spec.as_dict() if spec else None,
        current_snapshot_id=snapshot.snapshot_id if snapshot else None,
        rows=int(snapshot.summary["total-records"] or 0) if snapshot and snapshot.summary else 0,
    )


def _health(parts: Components, caller: Principal, request: HealthRequest) -> Health:
    if request.catalog:
        parts.catalog.catalog.list_namespaces()  # the catalog answers, or the action fails
    child = parts.write_process_stats()
    write_process = parts.writes.stats() if parts.writes is not None else None
    if write_process is not None and child is not None:
        write_process.update(caches=child.get("caches", {}), process=child.get("process", {}))
    return Health(
        status="ok",
        version=__version__,
        catalog=parts.catalog.name,
        catalog_type=parts.catalog.properties.get("type", ""),
        catalog_checked=request.catalog,
        writes_in_progress=parts.writes_in_progress(child),
        online=parts.store.stats(),
        training_set_cache=parts.training.cache.stats(),
        scan_cache=parts.caches.files.stats(),
        maintenance=parts.upkeep.stats(),
        memory=parts.memory.stats(),
        training_set_indexes=parts.training.cache.index_rows(),
        write_process=write_process,
        caches=parts.cache_stats(),
        process=process_figures(),
    )


def _calls(parts: Components, caller: Principal, request: None) -> Calls:
    return Calls(tracked=parts.calls is not None, calls=parts.calls.running() if parts.calls is not None else [])


def _list_tables(parts: Components, caller: Principal, request: None) -> list[Reply]:
    return [table_summary(table) for table in parts.catalog.current(visible_tables(parts.catalog, caller))]


def _describe(parts: Components, caller: Principal, request: TableRequest) -> TableDescription:
    index = parts.store.peek(request.table)
    online = index.stats() if index is not None else None
    last = parts.upkeep.last(request.table)
    maintenance = asdict(last) if last is not None else None
    return TableDescription(**describe(parts.catalog.load(request.table)), online=online, maintenance=maintenance)


def _remove_orphan_files(parts: Components, caller: Principal, request: OrphanFilesRequest) -> OrphanFilesResult:
    return remove_orphan_files(parts.catalog, request)


def _run_maintenance(parts: Components, caller: Principal, request: TableRequest) -> MaintenanceResult:
    result = parts.upkeep.run(request.table)
    parts.store.notify(request.table)
    parts.training.cache.notify(request.table)
    return result


def _change(
    runner: Callable[[Components], Callable[[Change], Result]],
) -> Callable[[Components, Principal, Change], Result]:
    """Run a change with the component `runner` picks, then tell the server's parts its table changed."""

    def run(parts: Components, caller: Principal, request: Change) -> Result:
        result = runner(parts)(request)
        parts.changed(request.table)
        return result

    return run


_ROWS: list[Action[Any]] = [
    Action[None](
        "list_tables",
        "List every table with its feature definition. Body: none.",
        READ,
        None,
        _list_tables,
    ),
    Action[TableRequest](
        "describe",
        'Describe one table: schema, keys, event time, TTL, partitioning, snapshots. Body: {"table": "ns.t"}.',
        READ,
        TableRequest.from_body,
        _describe,
    ),
    Action[HealthRequest](
        "health",
        'Server status, version and catalog. Body: none (the catalog must answer too), or {"catalog": false} (only '
        "the server: for readiness checks).",
        READ,
        HealthRequest.from_body,
        _health,
        optional_body=True,
    ),
    Action[None](
        "calls",
        "The calls the server is running now, the longest running first: request and trace ids, method, kind, "
        "caller, tables, client address, seconds so far, rows and bytes moved (with metrics on). Needs calls tracked "
        "(--metrics-port or --log-format json). Body: none.",
        ADMIN,
        None,
        _calls,
    ),
    Action[DeleteRequest](
        "delete",
        'Delete rows by entity keys and/or a filter, copy-on-write or merge-on-read. Body: {"table": "ns.t", '
        '"keys": {"driver_id": [1, 2]}, "filter": "...", "mode": "merge-on-read"}.',
        ADMIN,
        DeleteRequest.from_body,
        _change(lambda parts: parts.deleter.delete),
    ),
    Action[CompactRequest](
        "compact",
        'Rewrite data and delete files into well-sized data files, in one commit. Body: {"table": "ns.t", '
        '"filter": "..."}.',
        ADMIN,
        CompactRequest.from_body,
        _change(lambda parts: parts.maintenance.compact),
    ),
    Action[ExpireRequest](
        "expire_snapshots",
        "Forget old snapshots and delete the files only they used; pinned ones stay unless forced. "
        'Body: {"table": "ns.t", "older_than": "2026-01-01T00:00:00Z", "retain_last": 10, "force": false, '
        '"max_snapshots": 2000}.',
        ADMIN,
        ExpireRequest.from_body,
        _change(lambda parts: parts.maintenance.expire),
    ),
    Action[PinRequest](
        "pin",
        'Keep a snapshot from expiring (an Iceberg tag). Body: {"table": "ns.t", "snapshot_id": 1, "name": "..."}.',
        ADMIN,
        PinRequest.from_body,
        _change(lambda parts: parts.maintenance.pin),
    ),
    Action[UnpinRequest](
        "unpin",
        'Drop a pin. Body: {"table": "ns.t", "name": "..."}.',
        ADMIN,
        UnpinRequest.from_body,
        _change(lambda parts: parts.maintenance.unpin),
    ),
    Action[TableRequest](
        "run_maintenance",
        "Run one round of automatic maintenance on a table now (compact small files, expire snapshots, remove "
        'orphan files when due) and say what it did; it also runs in the background. Body: {"table": "ns.t"}.',
        ADMIN,
        TableRequest.from_body,
        _run_maintenance,
    ),
    Action[OrphanFilesRequest](
        "remove_orphan_files",
        "Delete files under the table's folders that no metadata references and older than the margin (default "
        '3 days), or list them. Body: {"table": "ns.t", "older_than": "2026-01-01T00:00:00Z", "dry_run": false}.',
        ADMIN,
        OrphanFilesRequest.from_body,
        _remove_orphan_files,
    ),
]

ACTIONS: dict[str, Action[Any]] = {action.name: action for action in _ROWS}
