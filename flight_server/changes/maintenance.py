"""Table maintenance: compaction, snapshot expiry, and pins that keep snapshots from expiring.

`compact` rewrites a table's live rows (all of them, or those of the data files a filter touches)
into new data files and drops the old data files and the delete files that applied to them, in one
snapshot: readers see the table before or after, never a mix, and the table reads on the direct
path again. `expire_snapshots` forgets old snapshots (Iceberg's age and count rules, and a cap on how many
remain: `choose_expired`) and deletes the files that only they used. A pin is an Iceberg tag on a snapshot (a
training set's, say): expiry keeps pinned snapshots unless told to `force`, which drops the pins first, and always
keeps the snapshots this server's reads and cached training sets use (`in_use`). `compact_small_files` and
`expire_once` are the single attempts automatic maintenance (changes/upkeep.py) makes: a lost race raises, and the
next round tries again.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pyiceberg.exceptions import BadRequestError, CommitFailedException
from pyiceberg.io import FileIO
from pyiceberg.manifest import DataFile, DataFileContent
from pyiceberg.table import Table
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.refs import SnapshotRefType
from pyiceberg.table.snapshots import Operation
from pyiceberg.table.update.snapshot import ExpireSnapshots, ManageSnapshots
from pyiceberg.utils.properties import property_as_int

from flight_server.base.filters import parse_filter, to_sql
from flight_server.changes.reachable import snapshot_files
from flight_server.changes.rewrite import Plan, Rewriter, Rewritten, SnapshotRows
from flight_server.iceberg.catalog import LAST_EXPIRY_PROPERTY, pins, table_name
from flight_server.iceberg.internals import MemoTransaction, commit_staged
from flight_server.iceberg.positions import referenced_data_file
from flight_server.wire.actions import (
    CompactRequest,
    CompactResult,
    ExpireRequest,
    ExpireResult,
    PinRequest,
    PinResult,
    UnpinRequest,
)
from flight_server.wire.codec import format_timestamp, parse_timestamp
from flight_server.wire.errors import NotFoundError, RequestError

log = logging.getLogger(__name__)

# Iceberg's own expiry properties and defaults: what Spark's expire_snapshots would keep.
MAX_SNAPSHOT_AGE_PROPERTY = "history.expire.max-snapshot-age-ms"

MIN_SNAPSHOTS_PROPERTY = "history.expire.min-snapshots-to-keep"

DEFAULT_MAX_SNAPSHOT_AGE_MS = 5 * 24 * 3600 * 1000

DEFAULT_MIN_SNAPSHOTS = 1

# The most snapshots one expiry removes for the cap (beyond the age rule's). pyiceberg's expiry costs (snapshots
# removed) x (snapshots listed), under the table's commit lock: 0.3 s for 2,000 of 4,000 and 1 s of 20,000, but 18 s
# for 18,000 of 20,000. A table far past its cap (one that only the age rule kept until now) comes down to it over
# several rounds instead of in one that holds its puts for minutes.
CAP_EXPIRIES = 2000


def worth_compacting(files: list[DataFile], obsolete: list[DataFile], equality_deletes: bool) -> bool:
    """Whether a rewrite changes anything: delete files to fold in, or a partition of several files."""
    if obsolete or equality_deletes:
        return True
    partitions = [(f.spec_id, f.partition) for f in files]
    return len(set(partitions)) < len(partitions)


def unreachable_files(io: FileIO, before: TableMetadata, after: TableMetadata, expired: set[int]) -> set[str]:
    """The manifest lists, manifests, data and delete files that expired snapshots used and no snapshot
    left in `after` does."""
    kept = set().union(*(snapshot_files(io, s) for s in after.snapshots))
    gone = set().union(*(snapshot_files(io, s) for s in before.snapshots if s.snapshot_id in expired))
    return gone - kept


@dataclass(frozen=True)
class ExpiryChoice:
    """What one expiry does: the snapshots it expires (in the metadata's order), those its rules chose that a pin
    or a read keeps, and the pins `force` drops."""

    expired: list[int]
    kept_pinned: list[int]
    kept_in_use: list[int]
    unpinned: list[str]


def choose_expired(
    snapshots: Sequence[tuple[int, int]],
    *,
    older_than: int,
    retain_last: int,
    max_snapshots: int | None,
    capped_before: int | None = None,
    heads: Collection[int],
    pinned: Mapping[str, int],
    in_use: Collection[int],
    force: bool,
    cap_expiries: int = CAP_EXPIRIES,
) -> ExpiryChoice:
    """Which of `snapshots` (id, commit time in ms; in the metadata's order) expire: those older than `older_than`,
    then the oldest while more than `max_snapshots` (None: no cap) would remain, so that a table committed to many
    times a second keeps a metadata file of bounded size (at most `cap_expiries` of those at once), but only those
    committed before `capped_before` (when given: the reads, puts and compactions that other replicas planned on a
    young snapshot are known to no one here, and the age rule alone protected them before). Never the newest
    `retain_last` (so at least that many remain, whatever the cap) nor the `heads` of branches (the current snapshot
    is main's). A snapshot pinned (unless `force`) or `in_use` is kept and counts among those that remain: the cap
    then takes a newer one in its place."""
    newest_first = sorted(snapshots, key=lambda s: s[1], reverse=True)
    spared = {sid for sid, _ in newest_first[:retain_last]} | set(heads)
    pinned_ids = set(pinned.values())
    left, capped = len(snapshots), 0
    due: set[int] = set()
    expired: set[int] = set()
    for sid, timestamp in reversed(newest_first):  # oldest first
        aged = timestamp < older_than
        over = (
            max_snapshots is not None
            and left > max_snapshots
            and capped < cap_expiries
            and (capped_before is None or timestamp < capped_before)
        )
        if sid in spared or not (aged or over):
            continue
        due.add(sid)
        if sid not in in_use and (force or sid not in pinned_ids):
            expired.add(sid)
            left -= 1
            capped += not aged
    pins_due = {name: sid for name, sid in pinned.items() if sid in due}
    kept_pinned = set() if force else set(pins_due.values())
    return ExpiryChoice(
        expired=[sid for sid, _ in snapshots if sid in expired],
        kept_pinned=sorted(kept_pinned),
        kept_in_use=sorted(due.intersection(in_use) - kept_pinned),
        unpinned=sorted(pins_due) if force else [],
    )


def _commit_refs(table: Table, change: Callable[[ManageSnapshots], ManageSnapshots], gone: str) -> None:
    """Commit a change of the table's tags on the metadata it was decided on (`commit_staged`: on a SQL catalog any
    commit since, another replica's expiry say, fails it and `until` decides again on the new metadata). Elsewhere
    pyiceberg, or a REST catalog itself, applies it again on newer metadata, where the snapshot or tag may be gone:
    `NotFoundError`, not the ValueError pyiceberg raises nor the REST server's refusal (HTTP 400), saying what is
    `gone`."""
    transaction = MemoTransaction(table)
    change(ManageSnapshots(transaction)).commit()
    try:
        commit_staged(transaction)
    except (ValueError, BadRequestError) as exc:
        raise NotFoundError(f"{gone} ({exc}); nothing was committed") from None


def int_property(properties: dict[str, str], key: str, default: int, minimum: int) -> int:
    """An integer table property, the default when it is unset or not a number, raised to `minimum`."""
    try:
        value = property_as_int(properties, key, default)
    except ValueError:
        log.warning("table property %s=%r is not an integer; using %d", key, properties.get(key), default)
        value = default
    return max(minimum, default if value is None else value)


def _millis(timestamp: str) -> int:
    return int(parse_timestamp(timestamp, "timestamp").timestamp() * 1000)


def small_file_groups(files: list[DataFile], min_files: int, small_bytes: int, max_bytes: int) -> list[DataFile]:
    """The small data files (below `small_bytes`) of the partitions that have at least `min_files` of them, most
    crowded partitions first, up to `max_bytes` in all (at least `min_files` of one partition): one round's work."""
    partitions: dict[tuple[int, Any], list[DataFile]] = defaultdict(list)
    for f in files:
        if f.content == DataFileContent.DATA and f.file_size_in_bytes < small_bytes:
            partitions[(f.spec_id, f.partition)].append(f)
    chosen: list[DataFile] = []
    total = 0
    for group in sorted(partitions.values(), key=len, reverse=True):
        if len(group) < min_files:
            break
        for f in sorted(group, key=lambda f: f.file_size_in_bytes):
            if total + f.file_size_in_bytes > max_bytes and len(chosen) >= min_files:
                return chosen
            chosen.append(f)
            total += f.file_size_in_bytes
    return chosen


def _expiry_record(choice: ExpiryChoice, snapshots_left: int) -> str:
    """What an expiry leaves in the table's properties, in its own commit: when, by which host (a replica's pod), and
    what it expired and kept. A few hundred bytes, replaced by each expiry. The files it deletes are known only once
    it has committed: this server's records (`describe`'s `maintenance`, `health`) count them."""
    return json.dumps(
        {
            "at": format_timestamp(dt.datetime.now(dt.timezone.utc)),
            "by": socket.gethostname(),
            "snapshots_expired": len(choice.expired),
            "kept_pinned": len(choice.kept_pinned),
            "kept_in_use": len(choice.kept_in_use),
            "pins_dropped": len(choice.unpinned),
            "snapshots_left": snapshots_left,
        },
        separators=(",", ":"),
    )


def _no_snapshots(table_uuid: str) -> set[int]:
    return set()


@dataclass
class Maintenance(Rewriter):
    """Runs the `compact`, `expire_snapshots`, `pin` and `unpin` actions, and automatic maintenance's steps.

    `in_use(table uuid)` gives the snapshots that reads and cached training sets of this server use."""

    in_use: Callable[[str], set[int]] = field(default=_no_snapshots)

    # Compaction

    def compact(self, request: CompactRequest) -> CompactResult:
        done = self.rewrite(request.table, "compact", "compact", lambda rows: self._plan_compaction(rows, request))
        return self._compacted(done)

    def compact_small_files(self, table: str, min_files: int, small_bytes: int, max_bytes: int) -> CompactResult:
        """One attempt at bin-packing the small files of the partitions that have gathered `min_files` of them
        (`small_file_groups`); their position delete files go with them."""
        done = self.rewrite_once(
            table, "compact", lambda rows: self._plan_small_files(rows, min_files, small_bytes, max_bytes)
        )
        return self._compacted(done)

    def _plan_small_files(self, rows: SnapshotRows, min_files: int, small_bytes: int, max_bytes: int) -> Plan | None:
        scope = small_file_groups(rows.files, min_files, small_bytes, max_bytes)
        if not scope:
            return None
        added, scope = rows.rewrite("filename IN (SELECT unnest(?))", [sorted(f.file_path for f in scope)], scope)
        paths = {f.file_path for f in scope}
        obsolete = [f for f in rows.files if referenced_data_file(f) in paths]
        return Plan(Operation.REPLACE, scope + obsolete, added, sum(f.record_count for f in added), tidy=True)

    def _compacted(self, done: Rewritten) -> CompactResult:
        if done.committed:
            log.info(
                "compacted %s: %d data and %d delete file(s) into %d data file(s) of %d rows: snapshot %s",
                done.table,
                done.data_files_removed,
                done.delete_files_removed,
                done.data_files_added,
                done.rows,
                done.snapshot_id,
            )
        else:
            log.info("compaction of %s: nothing to do", done.table)
        return CompactResult(
            table=done.table,
            snapshot_id=done.snapshot_id,
            compacted=done.committed,
            data_files_removed=done.data_files_removed,
            delete_files_removed=done.delete_files_removed,
            data_files_added=done.data_files_added,
            rows=done.rows,
        )

    def _plan_compaction(self, rows: SnapshotRows, request: CompactRequest) -> Plan | None:
        """The data files in scope (all, or those holding a row the filter matches) and the delete files that
        apply to them, when rewriting them changes anything; their live rows in new data files."""
        data = [f for f in rows.files if f.content == DataFileContent.DATA]
        deletes = [f for f in rows.files if f.content != DataFileContent.DATA]
        if request.filter is None:
            scope, obsolete, where, params = data, deletes, "TRUE", []
        else:
            condition, values = to_sql(parse_filter(request.filter, rows.schema), rows.schema)
            found = rows.query(f"SELECT DISTINCT filename FROM {rows.source} WHERE {condition}", values).fetchall()
            paths = {row[0] for row in found}
            scope = [f for f in data if f.file_path in paths]
            obsolete = [f for f in deletes if referenced_data_file(f) in paths]
            where, params = "filename IN (SELECT unnest(?))", [sorted(paths)]
        equality = any(f.content == DataFileContent.EQUALITY_DELETES for f in deletes)
        if not scope or not worth_compacting(scope, obsolete, equality):
            return None
        added, replaced = rows.rewrite(where, params, scope)
        if len(replaced) > len(scope):  # files `tie_runs` added: their position delete files go too
            paths = {f.file_path for f in replaced}
            scope, obsolete = replaced, [f for f in deletes if referenced_data_file(f) in paths]
        return Plan(Operation.REPLACE, scope + obsolete, added, sum(f.record_count for f in added), tidy=True)

    # Snapshot expiry and pins

    def expire(self, request: ExpireRequest) -> ExpireResult:
        return self.until(request.table, "expire snapshots of", lambda: self.expire_once(request))

    def expire_once(self, request: ExpireRequest, in_use_elsewhere: frozenset[int] = frozenset()) -> ExpireResult:
        """One attempt: a lost race raises (`CommitFailedException`) with nothing committed. `in_use_elsewhere`: more
        snapshots to keep, which another process's reads use (the serving process's, when this runs in its write
        process)."""
        result = ExpireResult(**self._expire_once(request, in_use_elsewhere))
        if result.expired or result.kept_pinned or result.kept_in_use:
            log.info(
                "expired %d snapshot(s) of %s (%d kept for pins, %d in use; pins %s dropped), %d file(s) deleted",
                len(result.expired),
                result.table,
                len(result.kept_pinned),
                len(result.kept_in_use),
                result.unpinned,
                result.files_deleted,
            )
        return result

    def _expire_once(self, request: ExpireRequest, in_use_elsewhere: frozenset[int]) -> dict[str, Any]:
        # Decided and committed under the table's commit lock, on metadata loaded there: a pin committed by this
        # server meanwhile is seen, never dropped with the snapshot it names (pyiceberg removes the refs of the
        # snapshots it expires). On a SQL catalog the commit fails when another replica committed since
        # (`commit_staged`); elsewhere pyiceberg applies the expiry again on the newer metadata.
        with self.locks(self.catalog.identifier(request.table)):
            table = self.catalog.load(request.table)
            metadata = table.metadata  # before the commit, which replaces the table's
            result, committed = self._expire_locked(request, table, in_use_elsewhere)
        if committed is None:
            return result
        files = unreachable_files(table.io, metadata, committed.metadata, set(result["expired"]))
        for path in files:
            try:
                size = len(table.io.new_input(path))
                table.io.delete(path)
            except Exception:  # the snapshots are gone either way; an orphan file is harmless
                log.warning("could not delete %s of an expired snapshot", path, exc_info=True)
            else:
                result["files_deleted"] += 1
                result["bytes_deleted"] += size
        return result

    def _expire_locked(
        self, request: ExpireRequest, table: Table, in_use_elsewhere: frozenset[int]
    ) -> tuple[dict[str, Any], Table | None]:
        """What to expire of `table`, and the table once its expiry is committed (None when nothing expires)."""
        metadata = table.metadata
        properties = metadata.properties
        if request.older_than is not None:
            older_than = _millis(request.older_than)
        else:
            max_age = int_property(properties, MAX_SNAPSHOT_AGE_PROPERTY, DEFAULT_MAX_SNAPSHOT_AGE_MS, 0)
            older_than = int(time.time() * 1000) - max_age
        retain_last = request.retain_last or int_property(properties, MIN_SNAPSHOTS_PROPERTY, DEFAULT_MIN_SNAPSHOTS, 1)
        branches = [ref for ref in metadata.refs.values() if ref.snapshot_ref_type == SnapshotRefType.BRANCH]
        choice = choose_expired(
            [(s.snapshot_id, s.timestamp_ms) for s in metadata.snapshots],
            older_than=older_than,
            retain_last=retain_last,
            max_snapshots=request.max_snapshots,
            capped_before=None if request.capped_before is None else _millis(request.capped_before),
            heads={ref.snapshot_id for ref in branches},
            pinned=pins(metadata),
            in_use=self.in_use(str(metadata.table_uuid)) | in_use_elsewhere,
            force=request.force,
        )
        result: dict[str, Any] = {
            "table": table_name(table),
            **asdict(choice),
            "files_deleted": 0,
            "bytes_deleted": 0,
            "snapshots_left": len(metadata.snapshots) - len(choice.expired),
        }
        if not choice.expired:
            return result, None
        # pyiceberg's own transaction works out (deep copies) the whole metadata twice per snapshot expired: 100
        # of a table of 170 took seconds. Committed on the metadata decided on: a commit since fails it.
        transaction = MemoTransaction(table)
        if choice.unpinned:
            manage = ManageSnapshots(transaction)
            for name in choice.unpinned:
                manage.remove_tag(name)
            manage.commit()
        ExpireSnapshots(transaction).by_ids(choice.expired).commit()
        transaction.set_properties({LAST_EXPIRY_PROPERTY: _expiry_record(choice, result["snapshots_left"])})
        try:
            return result, commit_staged(transaction)
        except ValueError as exc:  # pyiceberg's retry found a snapshot gone: another expiry won the race
            raise CommitFailedException("a snapshot to expire was expired concurrently") from exc

    def pin(self, request: PinRequest) -> PinResult:
        return PinResult(**self.until(request.table, "pin a snapshot of", lambda: self._pin_once(request)))

    def _pin_once(self, request: PinRequest) -> dict[str, Any]:
        table = self.catalog.load(request.table)
        name = table_name(table)
        snapshot_id = request.snapshot_id
        if snapshot_id is None:
            current = table.current_snapshot()
            if current is None:
                raise RequestError(f"table {name!r} has no snapshot to pin")
            snapshot_id = current.snapshot_id
        elif table.snapshot_by_id(snapshot_id) is None:
            raise NotFoundError(f"table {name!r} has no snapshot {snapshot_id}")
        pin = request.name or f"pin-{snapshot_id}"
        ref = table.metadata.refs.get(pin)
        if ref is not None and (ref.snapshot_ref_type != SnapshotRefType.TAG or ref.snapshot_id != snapshot_id):
            raise RequestError(
                f"{pin!r} already names snapshot {ref.snapshot_id} of {name!r} (a {ref.snapshot_ref_type.value}): "
                "unpin it first, or choose another name"
            )
        if ref is None:
            with self.locks(self.catalog.identifier(request.table)):
                gone = f"table {name!r} has no snapshot {snapshot_id} any more"
                _commit_refs(table, lambda manage: manage.create_tag(snapshot_id, pin), gone)
            log.info("pinned snapshot %s of %s as %r", snapshot_id, name, pin)
        return {"table": name, "name": pin, "snapshot_id": snapshot_id}

    def unpin(self, request: UnpinRequest) -> PinResult:
        return PinResult(**self.until(request.table, "unpin a snapshot of", lambda: self._unpin_once(request)))

    def _unpin_once(self, request: UnpinRequest) -> dict[str, Any]:
        table = self.catalog.load(request.table)
        name = table_name(table)
        snapshot_id = pins(table.metadata).get(request.name)
        if snapshot_id is None:
            raise NotFoundError(f"table {name!r} has no pin {request.name!r} (pins: {sorted(pins(table.metadata))})")
        with self.locks(self.catalog.identifier(request.table)):
            gone = f"table {name!r} has no pin {request.name!r} any more"
            _commit_refs(table, lambda manage: manage.remove_tag(request.name), gone)
        log.info("unpinned snapshot %s of %s (%r)", snapshot_id, name, request.name)
        return {"table": name, "name": request.name, "snapshot_id": snapshot_id}
