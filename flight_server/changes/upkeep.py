"""Automatic maintenance: what keeps a table that is written a few rows at a time cheap to write and to read.

Each put adds a snapshot (listed in the metadata file every commit rewrites) and small data files (every scan
opens each one); only snapshot expiry and compaction bound them. A background thread, one per server, looks
at the tables this server changed since its last round (and at every table it has changed, hourly), and at those
of the catalog it finds due from their metadata alone (`_survey`: a restarted server, a table no longer written),
one table at a time, and on each:

* compacts the small data files (under 3/4 of `write.target-file-size-bytes`) of the partitions that have
  gathered `flight.maintenance.compact-min-files` of them, bin-packed to the target size, at most
  `ROUND_BYTES` of them per round (the rewrite streams within `--write-chunk-mb`);
* expires the snapshots older than `history.expire.max-snapshot-age-ms` beyond the newest
  `history.expire.min-snapshots-to-keep` (Iceberg's own properties), then the oldest until at most
  `flight.maintenance.max-snapshots` remain (in the same commit), except pinned ones and those this server's
  reads and cached training sets use, and deletes the files only they used;
* removes orphan files older than 3 days, once a day per table.

A table's properties override the server's defaults (`--expire-snapshot-age-hours`, ...), and
`flight.maintenance.enabled=false` leaves the table alone. Every step commits optimistically and tries once:
when another commit wins (a replica doing the same maintenance, a put), the step gives way and the next round
tries again. There is no lock across replicas and none is needed.

With peers (`--peer`, `--advertise`) each table has one owner among the replicas, by rendezvous hashing of its name
(base/shards.py), and only its owner maintains it in the background: the others watch it, and take it over
(`_runs`) only once it has been due in their eyes for `TAKEOVER_INTERVALS` intervals while the table records no
expiry nor compaction that recent (its owner is away, or its maintenance off). The records alone would not do: a round
with nothing to do records nothing, so an idle table would look abandoned; being due alone would not do either: a
table written all the time is due again before every round of its owner. Reads and lookups never wait for it: it
takes only the table's commit lock of this server, for its commits.

Expiry and compaction record themselves in the table's properties, in their own commits (`describe` shows them
through any replica); what this module keeps (each table's last round, the totals) is this server's since it
started.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypeVar

from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.refs import SnapshotRefType
from pyiceberg.utils.properties import property_as_bool

from flight_server.base.config import ServerConfig
from flight_server.base.outages import outage
from flight_server.base.shards import owner
from flight_server.changes.files import target_file_size
from flight_server.changes.maintenance import (
    MAX_SNAPSHOT_AGE_PROPERTY,
    MIN_SNAPSHOTS_PROPERTY,
    Maintenance,
    choose_expired,
    int_property,
)
from flight_server.changes.orphans import remove_orphan_files
from flight_server.iceberg.catalog import (
    LAST_COMPACTION_PROPERTY,
    LAST_EXPIRY_PROPERTY,
    FeatureSpec,
    maintenance_record,
    pins,
)
from flight_server.wire.actions import ExpireRequest, MaintenanceResult, OrphanFilesRequest
from flight_server.wire.codec import format_timestamp, parse_timestamp
from flight_server.wire.errors import ConflictError, NotFoundError, RequestError

log = logging.getLogger(__name__)

ENABLED_PROPERTY = "flight.maintenance.enabled"

COMPACT_MIN_FILES_PROPERTY = "flight.maintenance.compact-min-files"

# Iceberg has no cap on the number of snapshots: at a few commits a second, a day's would be hundreds of thousands,
# and every commit rewrites (and every replica re-parses) the metadata file that lists them all.
MAX_SNAPSHOTS_PROPERTY = "flight.maintenance.max-snapshots"

CAP_MIN_AGE_PROPERTY = "flight.maintenance.max-snapshots-min-age-ms"

SMALL_SHARE = 0.75  # a data file under this share of the target size is small (Iceberg's rewrite_data_files)

ROUND_BYTES = 1 << 30  # small files one round compacts per table, at most (beyond the first partition's minimum)

RECHECK_SECONDS = 3600.0  # a table not written since is looked at again after this long (snapshots age)

# Tables watched at most: past it, those whose last round is oldest are forgotten (a dropped table is forgotten at its
# next round, which without the background thread never comes: tables created and dropped would otherwise add up, and
# with them the per-table label sets of /metrics). A forgotten table the survey finds due is watched again.
MAX_WATCHED = 4096
ORPHAN_SECONDS = 24 * 3600.0  # orphan removal of one table, at most this often (it lists every file)

# Tables not written here whose metadata one round reads (in the serving process: up to ~0.1 s each for a long
# history) to see whether they are due, at most: 600 an hour at the default interval.
SURVEY_TABLES = 10

# A table another replica owns is taken over once it has been due this many intervals with no expiry nor compaction
# recorded in as long: its owner maintains a due table within one interval (two, behind a long round of others).
TAKEOVER_INTERVALS = 3

T = TypeVar("T")


@dataclass(frozen=True)
class Policy:
    """What maintenance does to one table: the server's defaults, overridden by the table's properties."""

    enabled: bool
    max_snapshot_age_ms: int
    min_snapshots: int
    max_snapshots: int  # 0: no cap
    cap_min_age_ms: int  # the cap takes only snapshots older than this
    compact_min_files: int
    small_bytes: int

    @classmethod
    def of(cls, metadata: TableMetadata, config: ServerConfig) -> Policy:
        properties = metadata.properties
        return cls(
            enabled=property_as_bool(properties, ENABLED_PROPERTY, True),
            max_snapshot_age_ms=int_property(properties, MAX_SNAPSHOT_AGE_PROPERTY, config.expire_snapshot_age_ms, 0),
            min_snapshots=int_property(properties, MIN_SNAPSHOTS_PROPERTY, config.expire_min_snapshots, 1),
            max_snapshots=int_property(properties, MAX_SNAPSHOTS_PROPERTY, config.expire_max_snapshots, 0),
            cap_min_age_ms=int_property(properties, CAP_MIN_AGE_PROPERTY, config.expire_cap_min_age_ms, 0),
            compact_min_files=int_property(properties, COMPACT_MIN_FILES_PROPERTY, config.compact_min_files, 2),
            small_bytes=int(target_file_size(metadata) * SMALL_SHARE),
        )

    def due(self, metadata: TableMetadata, now_ms: int) -> bool:
        """Whether a round would likely change the table, from its metadata alone (no manifest read): snapshots
        the age rule or the cap would expire now (pins and branch heads kept), or at least `compact_min_files` data
        files of less than the small size on average (the round's compaction checks each partition)."""
        if not self.enabled:
            return False
        heads = {ref.snapshot_id for ref in metadata.refs.values() if ref.snapshot_ref_type == SnapshotRefType.BRANCH}
        choice = choose_expired(
            [(s.snapshot_id, s.timestamp_ms) for s in metadata.snapshots],
            older_than=now_ms - self.max_snapshot_age_ms,
            retain_last=self.min_snapshots,
            max_snapshots=self.max_snapshots or None,
            capped_before=now_ms - self.cap_min_age_ms,
            heads=heads,
            pinned=pins(metadata),
            in_use=(),
            force=False,
        )
        facts = TableFacts.of(metadata)
        crowded = facts.data_files >= self.compact_min_files and facts.bytes < facts.data_files * self.small_bytes
        return bool(choice.expired) or crowded


@dataclass
class Totals:
    """What maintenance did so far: on one table, or on every table of the server (`health`)."""

    rounds: int = 0
    snapshots_expired: int = 0
    data_files_compacted: int = 0
    files_deleted: int = 0  # by expiry (data, delete, manifest and metadata files) and orphan removal
    bytes_freed: int = 0
    gave_way: int = 0  # steps that gave way to a concurrent commit
    errors: int = 0  # rounds with a step that failed

    def add(self, result: MaintenanceResult) -> None:
        self.rounds += 1
        self.snapshots_expired += result.snapshots_expired
        self.data_files_compacted += result.data_files_compacted
        self.files_deleted += result.files_deleted + result.orphan_files_deleted
        self.bytes_freed += result.bytes_freed
        self.gave_way += len(result.gave_way)
        self.errors += result.error is not None


@dataclass(frozen=True)
class TableFacts:
    """A table's size as its current snapshot's summary and its metadata tell, read at the end of a round: what an
    operator watches to see maintenance keep a long-written table bounded."""

    snapshots: int
    data_files: int
    delete_files: int
    records: int
    bytes: int  # of its data and delete files

    @classmethod
    def of(cls, metadata: TableMetadata) -> TableFacts:
        current = metadata.snapshot_by_id(metadata.current_snapshot_id) if metadata.current_snapshot_id else None
        summary = current.summary.additional_properties if current is not None and current.summary else {}

        def total(key: str) -> int:
            try:
                return int(summary.get(key, 0))
            except ValueError:  # another writer's summary: its figure is not ours to fix
                return 0

        return cls(
            snapshots=len(metadata.snapshots),
            data_files=total("total-data-files"),
            delete_files=total("total-delete-files"),
            records=total("total-records"),
            bytes=total("total-files-size"),
        )


@dataclass
class Watched:
    """A table this server changed: whether it changed since its last round, when rounds ran, what they did."""

    due: bool = True
    checked: float = 0.0  # time.monotonic() of its last round
    orphans_checked: float | None = None
    last: MaintenanceResult | None = None
    totals: Totals = field(default_factory=Totals)
    ran_at: float | None = None  # time.time() at the end of its last round
    succeeded_at: float | None = None  # ... of its last round whose every step ran (none failed or gave way)
    facts: TableFacts | None = None  # as its last round left it
    due_since: float | None = None  # time.monotonic() since when it is due, in the eyes of a replica not its owner
    seen: str | None = None  # its metadata file when `_runs` last read it (with peers)


@dataclass
class _Round:
    """What one round on one table did so far."""

    counts: dict[str, int] = field(default_factory=dict)
    gave_way: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def step(self, name: str, run: Callable[[], T]) -> T | None:
        """Run one step; a lost race gives way (None), a failure is recorded (None) and the round goes on."""
        try:
            return run()
        except (CommitFailedException, ValidationException, ConflictError) as exc:
            log.info("maintenance %s gave way to a concurrent commit: %s", name, exc)
            self.gave_way.append(name)
        except NotFoundError:
            raise
        except RequestError as exc:
            log.warning("maintenance %s refused: %s", name, exc)
            self.errors.append(f"{name}: {exc}")
        except Exception as exc:  # the message may name server paths: it goes to the log only
            if (down := outage(exc)) is not None:  # the catalog or the object store away: no traceback to read
                log.warning("maintenance %s failed: %s", name, down)
                self.errors.append(f"{name}: {down}")
                return None
            log.warning("maintenance %s failed", name, exc_info=True)
            self.errors.append(f"{name} failed ({type(exc).__name__}; see the server log)")
        return None

    def add(self, **counts: int) -> None:
        for key, value in counts.items():
            self.counts[key] = self.counts.get(key, 0) + value

    def result(self, name: str, started: dt.datetime, seconds: float, enabled: bool) -> MaintenanceResult:
        """The round as `run_maintenance` answers it (a count no step added is 0)."""
        return MaintenanceResult(
            table=name,
            at=format_timestamp(started),
            seconds=round(seconds, 3),
            enabled=enabled,
            data_files_compacted=self.counts.get("data_files_compacted", 0),
            data_files_added=self.counts.get("data_files_added", 0),
            snapshots_expired=self.counts.get("snapshots_expired", 0),
            kept_pinned=self.counts.get("kept_pinned", 0),
            kept_in_use=self.counts.get("kept_in_use", 0),
            files_deleted=self.counts.get("files_deleted", 0),
            orphan_files_deleted=self.counts.get("orphan_files_deleted", 0),
            bytes_freed=self.counts.get("bytes_freed", 0),
            gave_way=self.gave_way,
            error="; ".join(self.errors) or None,
        )


class Upkeep:
    """Automatic maintenance of the tables one server changes: a background thread (with `auto_maintenance`)
    and `run`, one round on one table now (the `run_maintenance` action)."""

    def __init__(self, maintenance: Maintenance, config: ServerConfig):
        self.maintenance, self.config = maintenance, config
        self.catalog = maintenance.catalog
        self._tables: dict[str, Watched] = {}
        self._totals = Totals()
        self._lock = threading.Lock()  # guards the records above
        self._working = threading.Lock()  # one table at a time, background and actions alike
        self._stop = threading.Event()
        self._unseen: list[str] = []  # tables not watched yet, still to look at (`_survey`)
        self._listed: float | None = None  # time.monotonic() when the catalog's tables were last listed
        # The replicas that share the tables' maintenance: none (this one maintains all it watches) without peers.
        replicas = config.endpoint_locations() if config.shared_maintenance else []
        self._replicas = replicas if len(replicas) > 1 else []
        self._skipped = 0  # background rounds not run: the table is another replica's, which maintains it
        self._taken_over = 0  # background rounds run on another replica's table, which it left due
        self._thread: threading.Thread | None = None
        if config.auto_maintenance:
            self._thread = threading.Thread(target=self._loop, name="maintenance", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the background thread after the step it is in."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def notify(self, ref: str) -> None:
        """This server changed the table: look at it in the next round (none without the background thread)."""
        if self._thread is None:
            return
        name = ".".join(self.catalog.identifier(ref))
        with self._lock:
            self._watch(name).due = True

    def _watch(self, name: str) -> Watched:
        """The table's record, made if new, within `MAX_WATCHED` (under `_lock`)."""
        watched = self._tables.get(name)
        if watched is None:
            if len(self._tables) >= MAX_WATCHED:
                oldest = min(self._tables, key=lambda n: (self._tables[n].due, self._tables[n].checked))
                del self._tables[oldest]
            watched = self._tables[name] = Watched()
        return watched

    def last(self, ref: str) -> MaintenanceResult | None:
        """The table's last round on this server, if it had one."""
        with self._lock:
            watched = self._tables.get(".".join(self.catalog.identifier(ref)))
            return watched.last if watched else None

    def stats(self) -> dict[str, Any]:
        """What `health` shows: the settings, the totals since start, and the last round."""
        with self._lock:
            rounds = [w.last for w in self._tables.values() if w.last is not None]
            last = max(rounds, key=lambda r: r.at, default=None)
            return {
                "enabled": self.config.auto_maintenance,
                "interval_seconds": self.config.maintenance_interval_seconds,
                "tables": len(self._tables),
                "replicas": len(self._replicas) or 1,
                "owned_tables": sum(self.owns(name) for name in self._tables),
                "skipped_not_owned": self._skipped,
                "taken_over": self._taken_over,
                **asdict(self._totals),
                "last": asdict(last) if last is not None else None,
            }

    def tables(self) -> dict[str, Watched]:
        """Each table this server watches, as its last round left it (copies: for `/metrics`)."""
        with self._lock:
            return {name: replace(w, totals=replace(w.totals)) for name, w in self._tables.items()}

    def owns(self, name: str) -> bool:
        """Whether this replica maintains the table in the background: it is the table's owner among the replicas,
        or there are none to share with."""
        return not self._replicas or self._replicas[owner(self._replicas, name)] == self.config.advertise

    def figures(self) -> dict[str, int] | None:
        """The background rounds skipped and taken over since start (`/metrics`); None when no peers share them."""
        if not self._replicas:
            return None
        with self._lock:
            return {"skipped_not_owned": self._skipped, "taken_over": self._taken_over}

    def run(self, ref: str) -> MaintenanceResult:
        """One round on the table now, whatever the schedule (orphan removal keeps its own)."""
        with self._working:
            return self._round(".".join(self.catalog.identifier(ref)))

    def _loop(self) -> None:
        while not self._stop.wait(self.config.maintenance_interval_seconds):
            self._pass()

    def _pass(self) -> None:
        """One pass of the background thread: the survey, then a round on each table due. The tables' locations
        that orphan removal reads are shared by the rounds of one pass (`remove_orphan_files`)."""
        self._survey()
        locations: dict[str, str] = {}
        names = self._due()
        # With peers, where the catalog points each table now (one query): `_runs` reads only the tables changed since.
        pointers = self.catalog.metadata_locations(names) if self._replicas else None
        for name in names:
            if self._stop.is_set():
                return
            with self._working:
                try:
                    if self._runs(name, pointers):
                        self._round(name, locations)
                except NotFoundError:  # dropped: no longer watched
                    with self._lock:
                        self._tables.pop(name, None)
                except Exception as exc:  # never let one table stop the thread
                    if (down := outage(exc)) is not None:
                        log.warning("maintenance of %s failed: %s", name, down)
                    else:
                        log.exception("maintenance of %s failed", name)

    def _survey(self) -> None:
        """Watch the feature tables of the catalog that this server did not write since it started but that are due (a
        restarted server, a replica that takes no puts): after the first interval and then every `RECHECK_SECONDS`
        it lists the catalog's tables, and reads the metadata of at most `SURVEY_TABLES` of them per round, never
        their manifests. A table found due is watched from then on, as one this server wrote."""
        now = time.monotonic()
        if not self._unseen and (self._listed is None or now - self._listed >= RECHECK_SECONDS):
            self._listed = now
            try:
                names = self.catalog.table_names()
            except Exception as exc:  # the catalog is down: the rounds of the tables written here say so too
                log.warning("maintenance could not list the catalog's tables: %s", exc)
                return
            with self._lock:
                self._unseen = [name for name in names if name not in self._tables]
        batch, self._unseen = self._unseen[:SURVEY_TABLES], self._unseen[SURVEY_TABLES:]
        now_ms = int(time.time() * 1000)
        for name in batch:
            if self._stop.is_set():
                return
            with self._lock:
                if name in self._tables:
                    continue
            try:
                metadata = self.catalog.load(name).metadata  # not `read`: its cache is for the tables in use
                # Only feature tables: a catalog's other tables (another engine's) keep their own upkeep.
                due = FeatureSpec.from_properties(metadata.properties) is not None and Policy.of(
                    metadata, self.config
                ).due(metadata, now_ms)
            except NotFoundError:
                continue
            except Exception:  # never let one table stop the thread
                log.warning("maintenance could not see whether %s is due", name, exc_info=True)
                continue
            if due:
                log.info("maintenance: %s, not written by this server since it started, is due: watched", name)
                with self._lock:
                    self._watch(name)

    def _due(self) -> list[str]:
        """The tables to look at: written here since their last round, or not looked at for `RECHECK_SECONDS`; with
        peers, every table watched (`_runs` looks at each one's metadata: written through another replica, say)."""
        now = time.monotonic()
        with self._lock:
            if self._replicas:
                return list(self._tables)
            return [n for n, w in self._tables.items() if w.due or now - w.checked >= RECHECK_SECONDS]

    def _runs(self, name: str, pointers: dict[str, str] | None) -> bool:
        """Whether the background runs a round on the table now. Without peers, every table `_due` gives. With peers,
        a table this replica owns when written here or not looked at for `RECHECK_SECONDS` (as without), or else when
        it changed since this replica last read it (`_changed`: written through another replica) and its metadata says
        it is due (`Policy.due`). A table another replica owns is looked at likewise (and at every pass while found
        due); it is taken over only once it has been due for `TAKEOVER_INTERVALS` intervals in this replica's
        eyes with no expiry nor compaction recorded in as long; the wait starts again after each takeover, so a table
        whose owner is away is maintained within about that long of becoming due (by each replica not its owner,
        racing as without owners), and one its owner keeps up never is."""
        if not self._replicas:
            return True
        mine = self.owns(name)
        with self._lock:
            watched = self._tables.get(name)
            if watched is None:
                return False
            written = watched.due or time.monotonic() - watched.checked >= RECHECK_SECONDS
            if mine and written:
                return True
            seen, waiting = watched.seen, watched.due_since is not None
        if not (written or waiting or self._changed(name, pointers, seen)):
            return False
        table = self.catalog.read(name)
        metadata = table.metadata
        due = Policy.of(metadata, self.config).due(metadata, int(time.time() * 1000))
        wait = TAKEOVER_INTERVALS * self.config.maintenance_interval_seconds
        now = time.monotonic()
        with self._lock:
            watched = self._watch(name)
            watched.seen = table.metadata_location
            if mine:
                return due
            watched.due, watched.checked = False, now
            if not due:
                watched.due_since = None
            elif watched.due_since is None:
                watched.due_since = now
            take = watched.due_since is not None and now - watched.due_since >= wait
            take = take and time.time() - last_maintained(metadata) >= wait
            if take:
                watched.due_since = None
                self._taken_over += 1
            else:
                self._skipped += 1
        if take:
            log.info(
                "maintenance: %s, another replica's, has been due for %.0f s, unmaintained: taken over", name, wait
            )
        return take

    def _changed(self, name: str, pointers: dict[str, str] | None, seen: str | None) -> bool:
        """Whether the catalog points the table elsewhere than when `_runs` last read it: from the pass's `pointers`
        (SQL catalogs, one query for all; a table left out was dropped), else from one look at the table where the
        catalog answers that cheaply (REST catalogs: one loadTable request, its metadata parsed only when it changed);
        False where it cannot say (other catalogs, or the catalog away: the hourly look remains)."""
        if pointers is not None:
            return pointers.get(name) != seen
        try:
            pointer = self.catalog.metadata_location(name)
        except Exception as exc:  # the catalog is away: the rounds of the tables written here say so
            log.debug("maintenance could not see whether %s changed: %s", name, outage(exc) or exc)
            return False
        return pointer is not None and pointer != seen

    def _round(self, name: str, locations: dict[str, str] | None = None) -> MaintenanceResult:
        """Compact, expire, remove orphans (when due): each step once, a lost race left to the next round. `locations`:
        the other tables' locations as the pass's earlier rounds read them (`remove_orphan_files`)."""
        started, clock = dt.datetime.now(dt.timezone.utc), time.perf_counter()
        with self._lock:
            watched = self._watch(name)  # the action may name a table not written here
            watched.due, watched.checked = False, time.monotonic()
            orphans_due = (
                watched.orphans_checked is None or time.monotonic() - watched.orphans_checked >= ORPHAN_SECONDS
            )
        done = _Round()
        try:
            try:
                metadata = self.catalog.read(name).metadata
            except NotFoundError:
                raise
            except Exception as exc:  # the catalog is away, say: a failed round, counted as one whose step failed
                self._failed_round(name, started, time.perf_counter() - clock, exc)
                raise
            policy = Policy.of(metadata, self.config)  # properties only: no fresh parse
            if policy.enabled:
                self._steps(name, policy, orphans_due, done, locations)
                if done.counts.get("data_files_added") or done.counts.get("snapshots_expired"):
                    metadata = done.step("reading the table", lambda: self.catalog.read(name).metadata) or metadata
        except NotFoundError:
            log.info("maintenance: table %s is gone; no longer watched", name)
            with self._lock:
                self._tables.pop(name, None)
            raise
        result = done.result(name, started, time.perf_counter() - clock, policy.enabled)
        self._record(name, result, orphans_due and policy.enabled, TableFacts.of(metadata))
        return result

    def _steps(
        self, name: str, policy: Policy, orphans_due: bool, done: _Round, locations: dict[str, str] | None
    ) -> None:
        compacted = done.step(
            "compaction",
            lambda: self.maintenance.compact_small_files(
                name, policy.compact_min_files, policy.small_bytes, ROUND_BYTES
            ),
        )
        if compacted is not None and compacted.compacted:
            done.add(data_files_compacted=compacted.data_files_removed, data_files_added=compacted.data_files_added)
        now = dt.datetime.now(dt.timezone.utc)
        request = ExpireRequest(
            name,
            _ago(now, policy.max_snapshot_age_ms),
            policy.min_snapshots,
            max_snapshots=policy.max_snapshots or None,
            capped_before=_ago(now, policy.cap_min_age_ms),
        )
        expired = done.step("expiry", lambda: self.maintenance.expire_once(request))
        if expired is not None:
            done.add(
                snapshots_expired=len(expired.expired),
                kept_pinned=len(expired.kept_pinned),
                kept_in_use=len(expired.kept_in_use),
                files_deleted=expired.files_deleted,
                bytes_freed=expired.bytes_deleted,
            )
        if orphans_due:
            orphans = done.step(
                "orphan removal", lambda: remove_orphan_files(self.catalog, OrphanFilesRequest(name), locations)
            )
            if orphans is not None:
                done.add(orphan_files_deleted=orphans.files_deleted, bytes_freed=orphans.bytes_deleted)

    def _failed_round(self, name: str, started: dt.datetime, seconds: float, exc: Exception) -> None:
        """Record a round that could not read the table: `flight_maintenance_failed_rounds_total` counts it, and the
        table's figures stay as its last round left them."""
        why = outage(exc) or f"failed ({type(exc).__name__}; see the server log)"
        result = _Round(errors=[f"reading the table: {why}"]).result(name, started, seconds, enabled=True)
        with self._lock:
            facts = self._tables[name].facts if name in self._tables else None
        self._record(name, result, False, facts)

    def _record(self, name: str, result: MaintenanceResult, orphans_ran: bool, facts: TableFacts | None) -> None:
        with self._lock:
            watched = self._tables.get(name)
            if watched is not None:
                watched.last, watched.ran_at = result, time.time()
                watched.facts = facts if facts is not None else watched.facts
                watched.totals.add(result)
                if result.error is None and not result.gave_way:
                    watched.succeeded_at = watched.ran_at
                if orphans_ran:
                    watched.orphans_checked = time.monotonic()
            self._totals.add(result)
        did = result.data_files_compacted or result.snapshots_expired or result.files_deleted
        log.log(
            logging.INFO if did or result.gave_way or result.error else logging.DEBUG,
            "maintenance of %s: %d data file(s) compacted into %d, %d snapshot(s) expired (%d pinned and %d in use "
            "kept), %d file(s) deleted, %d orphan(s), %d bytes freed%s%s in %.2f s",
            name,
            result.data_files_compacted,
            result.data_files_added,
            result.snapshots_expired,
            result.kept_pinned,
            result.kept_in_use,
            result.files_deleted,
            result.orphan_files_deleted,
            result.bytes_freed,
            f"; gave way: {', '.join(result.gave_way)}" if result.gave_way else "",
            f"; failed: {result.error}" if result.error else "",
            result.seconds,
        )


def last_maintained(metadata: TableMetadata) -> float:
    """When the table's last expiry or compaction committed, as its records say (Unix time; 0 without a record that
    reads as one). The recording replica's clock: replicas' clocks agree within far less than an interval."""
    times = [0.0]
    for key in (LAST_EXPIRY_PROPERTY, LAST_COMPACTION_PROPERTY):
        record = maintenance_record(metadata, key)
        if record is not None and isinstance(record.get("at"), str):
            try:
                times.append(parse_timestamp(record["at"], "at").timestamp())
            except RequestError:  # another tool's value: no record of ours
                continue
    return max(times)


def _ago(now: dt.datetime, ms: int) -> str:
    """The time `ms` before `now`, or the epoch when that is earlier: Java's Long.MAX_VALUE, which Iceberg users
    set to mean "never", is far past what a datetime holds."""
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    since_epoch = (now - epoch) // dt.timedelta(milliseconds=1)
    return format_timestamp(now - dt.timedelta(milliseconds=min(ms, since_epoch)))
