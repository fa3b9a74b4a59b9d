"""Actions on the wire: the bodies of describe, delete, compact, expire, pin and unpin, and every action's reply
(`run_maintenance` takes `TableRequest`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from flight_server.wire.codec import Fields, Reply, format_timestamp, parse_timestamp
from flight_server.wire.errors import ProtocolError

DELETE_MODES = ("copy-on-write", "merge-on-read")

_PIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class TableRequest:
    """Action body naming one table (`describe`)."""

    table: str

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> TableRequest:
        f = Fields(body, "action body", {"table"})
        return cls(table=f.required_str("table"))


@dataclass(frozen=True)
class HealthRequest:
    """`health` action: whether to check the catalog too (the default; an empty body asks for it)."""

    catalog: bool = True

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> HealthRequest:
        f = Fields(body, "health body", {"catalog"})
        return cls(catalog=f.bool("catalog") if "catalog" in body else True)


@dataclass(frozen=True)
class DeleteRequest:
    """`delete` action: remove the rows of some entities (`keys`) and/or matching a `filter`."""

    table: str
    keys: dict[str, list[Any]] | None = None
    filter: str | None = None
    mode: str | None = None

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> DeleteRequest:
        f = Fields(body, "delete request", {"table", "keys", "filter", "mode"})
        keys = body.get("keys")
        if keys is not None:
            if (
                not isinstance(keys, dict)
                or not keys
                or not all(isinstance(k, str) and isinstance(v, list) and v for k, v in keys.items())
            ):
                raise ProtocolError("delete request: 'keys' must map key columns to non-empty lists of values")
            if len({len(v) for v in keys.values()}) != 1:
                raise ProtocolError("delete request: the lists in 'keys' must have equal lengths")
            if not all(
                v is None or (isinstance(v, (int, str)) and not isinstance(v, bool)) for vs in keys.values() for v in vs
            ):
                raise ProtocolError("delete request: key values must be integers, strings or null")
        mode = f.str("mode")
        if mode is not None and mode not in DELETE_MODES:
            raise ProtocolError(f"delete request: unknown mode {mode!r}; use one of {list(DELETE_MODES)}")
        request = cls(f.required_str("table"), keys, f.str("filter"), mode)
        if request.keys is None and request.filter is None:
            raise ProtocolError("delete request: name the rows to delete with 'keys', 'filter' or both")
        return request


@dataclass(frozen=True)
class CompactRequest:
    """`compact` action: rewrite a table's data and delete files (or those a `filter` touches) into
    well-sized data files."""

    table: str
    filter: str | None = None

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> CompactRequest:
        f = Fields(body, "compact request", {"table", "filter"})
        return cls(f.required_str("table"), f.str("filter"))


@dataclass(frozen=True)
class ExpireRequest:
    """`expire_snapshots` action: forget snapshots older than `older_than` beyond the last `retain_last`, and
    then the oldest until at most `max_snapshots` (or `retain_last`, if more) remain, and delete the files only
    they used; pinned snapshots stay unless `force`. `capped_before` (automatic maintenance's; not a field of the
    action): the cap takes only snapshots committed before this time."""

    table: str
    older_than: str | None = None
    retain_last: int | None = None
    force: bool = False
    max_snapshots: int | None = None
    capped_before: str | None = None

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ExpireRequest:
        f = Fields(body, "expire_snapshots request", {"table", "older_than", "retain_last", "force", "max_snapshots"})
        older_than = body.get("older_than")
        if older_than is not None:
            older_than = format_timestamp(parse_timestamp(older_than, "expire_snapshots request: 'older_than'"))
        return cls(
            f.required_str("table"),
            older_than,
            f.int("retain_last", minimum=1),
            f.bool("force"),
            f.int("max_snapshots", minimum=1),
        )


def _pin_name(what: str, name: str) -> str:
    if not _PIN_NAME.match(name) or name == "main":
        raise ProtocolError(f"{what}: invalid pin name {name!r}: use letters, digits, '_', '-' or '.', not 'main'")
    return name


@dataclass(frozen=True)
class PinRequest:
    """`pin` action: keep a snapshot (default: the current one) from expiring, as an Iceberg tag `name`
    (default `pin-<snapshot id>`)."""

    table: str
    snapshot_id: int | None = None
    name: str | None = None

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> PinRequest:
        f = Fields(body, "pin request", {"table", "snapshot_id", "name"})
        table, snapshot_id, name = f.required_str("table"), f.snapshot_id("snapshot_id"), f.str("name")
        return cls(table, snapshot_id, _pin_name(f.what, name) if name is not None else None)


@dataclass(frozen=True)
class UnpinRequest:
    """`unpin` action: drop the pin (tag) `name`; the snapshot may then expire."""

    table: str
    name: str

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> UnpinRequest:
        f = Fields(body, "unpin request", {"table", "name"})
        return cls(f.required_str("table"), _pin_name(f.what, f.required_str("name")))


# Replies: one JSON message per action (`Reply.to_bytes`); flight_client hands them to its callers as dicts.


@dataclass(frozen=True)
class Health(Reply):
    """`health`: the server answers and (unless not asked to check it) its catalog too; what it holds in memory."""

    status: str
    version: str
    catalog: str
    catalog_type: str
    catalog_checked: bool  # false when the request asked not to (`HealthRequest.catalog`)
    writes_in_progress: int
    online: dict[str, Any]
    training_set_cache: dict[str, int]
    scan_cache: dict[str, int]
    maintenance: dict[str, Any]  # automatic maintenance: settings, totals, the last round
    memory: dict[str, Any]  # the memory budget: its size, what each cache holds and reserves, evictions
    # each sorted index: table, snapshot_id, share (this replica's slots of the table's keys; None: all), rows
    training_set_indexes: list[dict[str, Any]] = field(default_factory=list)
    # the write process (None: off): its pid while it runs, how often it started, why its last start failed; while
    # it answers, its `caches` and `process` as below
    write_process: dict[str, Any] | None = None
    # the caches every server process keeps (the above aside), by name: entries, hits, misses, bytes or weight held
    caches: dict[str, Any] = field(default_factory=dict)
    # this process's resident memory, CPU seconds, start time, open files (Linux: as /metrics says them)
    process: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RunningCall(Reply):
    """One call of `calls`: who asked what, for how long so far, and how much it moved (None: metrics are off)."""

    request_id: str  # the client's x-request-id, or the one the server gave it (in its log lines too)
    trace_id: str | None  # of the client's W3C traceparent header
    method: str  # do_get, do_put, do_exchange, get_flight_info, do_action...
    kind: str  # the request kind (scan, training_set, online, write) or action name, once known
    caller: str | None  # the token's name, when the server requires authentication
    tables: list[str]  # the tables the request names, once checked
    peer: str | None  # the client's address, as gRPC gives it
    seconds: float
    rows_received: int | None
    bytes_received: int | None
    rows_sent: int | None
    bytes_sent: int | None


@dataclass(frozen=True)
class Calls(Reply):
    """`calls`: the calls the server is running, the longest running first. `tracked` is false when the server does
    not track calls (neither --metrics-port nor --log-format json: tracking costs every call a little), and the
    list is empty then."""

    tracked: bool
    calls: list[RunningCall]


@dataclass(frozen=True)
class TableSummary(Reply):
    """One table of `list_tables` (and the `app_metadata` of its `list_flights` entry)."""

    table: str
    feature: dict[str, Any] | None
    current_snapshot_id: int | None
    rows: int


@dataclass(frozen=True)
class TableDescription(Reply):
    """`describe`: a table's definition and recent history, and its online index (None if it has none)."""

    table: str
    feature: dict[str, Any] | None
    schema: list[dict[str, Any]]
    partition_spec: list[str]
    current_snapshot_id: int | None
    rows: int
    snapshots: list[dict[str, Any]]
    location: str
    format_version: int
    delete_mode: str
    pins: dict[str, int]
    online: dict[str, Any] | None
    maintenance: dict[str, Any] | None = None  # this server's last maintenance round of the table, if any
    # What the table itself records, whichever replica answers: its last expiry and its last compaction (table
    # properties their own commits set).
    last_expiry: dict[str, Any] | None = None
    last_compaction: dict[str, Any] | None = None


@dataclass(frozen=True)
class DeleteResult(Reply):
    """`delete`: the snapshot committed (the current one when nothing matched) and what changed."""

    table: str
    mode: str
    snapshot_id: int | None
    rows_deleted: int
    data_files_removed: int
    data_files_added: int
    delete_files_added: int
    delete_files_removed: int


@dataclass(frozen=True)
class CompactResult(Reply):
    """`compact`: the snapshot committed (`compacted` false: nothing to do, the current one) and the files."""

    table: str
    snapshot_id: int | None
    compacted: bool
    data_files_removed: int
    delete_files_removed: int
    data_files_added: int
    rows: int


@dataclass(frozen=True)
class ExpireResult(Reply):
    """`expire_snapshots`: the snapshots expired, those kept for their pins or because this server's reads or
    cached training sets use them, the pins `force` dropped, and the files (and their bytes) deleted."""

    table: str
    expired: list[int]
    kept_pinned: list[int]
    kept_in_use: list[int]
    unpinned: list[str]
    files_deleted: int
    bytes_deleted: int
    snapshots_left: int


@dataclass(frozen=True)
class PinResult(Reply):
    """`pin` and `unpin`: the pin and the snapshot it names (or named)."""

    table: str
    name: str
    snapshot_id: int


@dataclass(frozen=True)
class OrphanFilesRequest:
    """`remove_orphan_files` action: delete the files under the table's data and metadata folders that no
    metadata references and that are older than `older_than` (default: 3 days ago); `dry_run` only lists them."""

    table: str
    older_than: str | None = None
    dry_run: bool = False

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> OrphanFilesRequest:
        f = Fields(body, "remove_orphan_files request", {"table", "older_than", "dry_run"})
        older_than = body.get("older_than")
        if older_than is not None:
            older_than = format_timestamp(parse_timestamp(older_than, "remove_orphan_files request: 'older_than'"))
        return cls(f.required_str("table"), older_than, f.bool("dry_run"))


@dataclass(frozen=True)
class OrphanFilesResult(Reply):
    """`remove_orphan_files`: the orphan files found (deleted unless `dry_run`; `files` names the first
    1000), what was deleted, and the unreferenced files kept because they are newer than `older_than`."""

    table: str
    older_than: str
    dry_run: bool
    orphan_files: int
    orphan_bytes: int
    files_deleted: int
    bytes_deleted: int
    files: list[str]
    recent_files: int


@dataclass(frozen=True)
class MaintenanceResult(Reply):
    """`run_maintenance`, and each table's entry in `describe` and `health`: one round of automatic maintenance
    on a table, when it ran (`at`, for `seconds`) and what it did. `enabled` false: the table's
    `flight.maintenance.enabled` turned it off and nothing ran. `gave_way` names the steps another commit (a
    replica doing the same, a writer) won against; they run again next round. `error` is a step's failure."""

    table: str
    at: str
    seconds: float
    enabled: bool
    data_files_compacted: int
    data_files_added: int
    snapshots_expired: int
    kept_pinned: int
    kept_in_use: int
    files_deleted: int
    orphan_files_deleted: int
    bytes_freed: int
    gave_way: list[str]
    error: str | None
