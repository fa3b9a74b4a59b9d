"""The write process (`--write-process`, the default on POSIX): puts, deletes and compactions run in a child process
of the server, automatic maintenance's compactions too (`OffloadedMaintenance`; snapshot expiry does not: see
`RELAYED_ACTIONS`).

Why: while a writer puts through a server, its commits (pyiceberg's manifest and metadata work), the Parquet
encoding around it and the online index refresh held the serving process's GIL for most of each second (measured
with `py-spy record --gil`: 56 % of the GIL-held samples in commits, 15 % in writing files, 17 % in the index
refresh, 6.5 % in lookups), and every lookup waited its turn for it several times. In a child process the
commits and files take no GIL the lookups need, and run at a lower OS priority (`NICE`), so the scheduler
prefers serving when both want a core.

The child runs the server's own code: a `FeatureFlightServer` on a Unix socket in a private folder, with the
same catalog and write settings, and without the serving process's listeners, tokens and limits (the serving
process checked the caller). The serving process relays the client's stream batch by batch (pyarrow reads and
writes them without the GIL), checks the stream as the writer would, and sends the end-of-stream marker only once
the client's stream ended intact: a stream that breaks or is cancelled ends the child's put without its marker, so
the child commits nothing. The child's answers and errors (same gRPC status, same message) come back as they are,
and the serving process then runs what follows a commit (its online indexes and training sets look at once).

The child's counters (`base/metrics.py`: commit retries, DuckDB databases reopened) live in memory-mapped files in
its private folder (prometheus_client's multiprocess mode, `METRICS_FOLDER`): the serving process adds them to its
own at each scrape (`WriteProcess.counted`), with no call to the child, and the counts of a child that stopped stay
counted.

The child lives as long as the server: it starts at the first write, in the background (the writes run in the
serving process until it listens: `WriteProcess.usable`), reads its settings from its stdin and stops when that
pipe closes (the server stopped, or died); one that stopped is started again at the next write, and the call it
stopped during fails with UNAVAILABLE: it may have committed, and a retry with the same `write_id` commits once
whichever happened.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pyiceberg
from prometheus_client.multiprocess import MultiProcessCollector
from pyiceberg.exceptions import CommitFailedException, ValidationException

from flight_server.base.config import ServerConfig
from flight_server.base.logs import current
from flight_server.base.lru import WeightedLru
from flight_server.base.streams import chunks, stream_schema
from flight_server.changes.maintenance import Maintenance
from flight_server.iceberg.lineage import committed_appends, keep_appended, kept_appended
from flight_server.online.store import RefreshPlan, from_results
from flight_server.transport.errors import ROUTES
from flight_server.wire.actions import CompactResult, ExpireRequest, ExpireResult
from flight_server.wire.codec import REQUEST_ID_HEADER
from flight_server.wire.errors import (
    CancelledError,
    ConflictError,
    LimitError,
    NotFoundError,
    PermissionDeniedError,
    RequestError,
    UnauthenticatedError,
    detail_code,
    error_code,
    error_message,
)
from flight_server.wire.writes import WriteRequest, WriteResult, end_marker, parse_end_marker

log = logging.getLogger(__name__)

NICE = 5  # added to the child's OS niceness: a core both want goes to serving first
START_TIMEOUT_SECONDS = 120.0  # for the child to import, open the catalog and listen
STOPPED_SECONDS = 5.0  # for a child whose call failed with gRPC's own UNAVAILABLE to be seen to have stopped
OOM_SCORE_ADJ = 500  # of 1000: the child before the serving process when the machine or container runs out of memory
RETRY_START_SECONDS = 60.0  # after a failed start, writes stay in the serving process this long before another try
SOCKET_PATH_MAX = 100  # bytes; gRPC refuses a Unix socket path over 107 (macOS's limit is 104)
STOP_SECONDS = 30.0  # for the child to finish its running calls once the server stops
READY = b"ready\n"
_ASKING = flight.FlightCallOptions(timeout=2.0)  # for its figures (`ask`): never hang on the child
# For refresh plans, which read the appended files: longer, or a big append (or a busy child) would time out and
# the serving process would read it all again itself.
_PLANNING = flight.FlightCallOptions(timeout=30.0)

METRICS_FOLDER = "metrics"  # in the child's private folder: its counters, one memory-mapped file per child started
MULTIPROCESS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client as it is imported (in the child)

# The child's own actions (not in the action table: only a write process answers them): `plan_refresh`, its figures
# for its server's `health` and `/metrics` (which ask nothing of the catalog: a catalog down is not a child down), and
# maintenance's compaction of small files and snapshot expiry (`OffloadedMaintenance`, answered by
# `compact_small_files` and `expire_once`).
PLAN_REFRESH = "_plan_refresh"
PROCESS_STATS = "_process_stats"
COMPACT_SMALL_FILES = "_compact_small_files"
EXPIRE_ONCE = "_expire_once"

# Before the files a put's snapshot added, in the child's second reply to it (`appended_message`): DataFiles pickled,
# which only the same pyiceberg reads back field for field (a child started after an upgrade may run another one).
APPENDED_TAG = f"appended 2 pyiceberg {pyiceberg.__version__}\n".encode()
APPENDED_MESSAGES_BYTES = 8 << 20  # the child's latest `appended_message`s, each made once for a group's puts

# The actions that change tables (or their files): relayed to the write process as the client sent them. Not
# snapshot expiry (nor automatic maintenance, which expires): it must keep the snapshots this process's running
# reads and cached training sets use, which only this process knows; `OffloadedMaintenance` sends them along.
RELAYED_ACTIONS = frozenset({"delete", "compact", "pin", "unpin", "remove_orphan_files"})

# A relayed error's kind (its structured detail, else its class) -> the request error it came from.
_KINDS: dict[str, type[RequestError]] = {
    cls.code: cls
    for cls in (
        RequestError,
        NotFoundError,
        ConflictError,
        LimitError,
        UnauthenticatedError,
        PermissionDeniedError,
        CancelledError,
    )
}


class WriteProcessError(flight.FlightUnavailableError):
    """The write process stopped during the call, or could not start: UNAVAILABLE without a kind, as when a server
    goes away. A put may have committed before the process stopped: its retry with the same `write_id` says which
    (and never commits twice)."""


class LaunchError(Exception):
    """`_launch`: the write process did not start; the message says why (`WriteProcess._start` logs it)."""


def relayed_error(exc: BaseException) -> Exception:
    """The exception that gives the client the child's error as the child sent it: same status, kind, message."""
    message, kind = error_message(exc), error_code(exc)
    if kind == "UNAVAILABLE" and detail_code(exc) is None:  # gRPC's own, from a running child: for the server's
        # own calls (`_failure`), a lost race
        kind = "CONFLICT"
    if kind in _KINDS:
        return _KINDS[kind](message)
    error = ROUTES.get(kind, ROUTES["INTERNAL"]).error
    return error(message, extra_info=json.dumps({"code": kind}).encode())


def child_config(config: ServerConfig) -> ServerConfig:
    """The child's settings: the server's catalog and write settings (its DuckDB spills into a folder of its own in
    the same `--duckdb-temp-dir`: `base/spill.py`), nothing that faces clients, and no automatic maintenance (the
    serving process runs it: see `RELAYED_ACTIONS`)."""
    return replace(
        config,
        catalog_properties=config.resolved_catalog_properties(),
        write_process=False,
        auto_maintenance=False,
        host="127.0.0.1",
        port=0,
        advertise=None,
        peers=[],
        tls_cert=None,
        tls_key=None,
        tls_client_ca=None,
        auth_tokens=[],
        auth_tokens_file=None,
        max_concurrent_requests=0,
        max_concurrent_per_caller=0,
        max_batch_bytes=0,
        idle_timeout_seconds=0.0,
        metrics_port=0,
        online_tables=[],
    )


class WriteProcess:
    """The serving side of the write process: starts it (again) when needed, relays puts and actions to it."""

    def __init__(self, config: ServerConfig):
        self._config = child_config(config)
        self._folder: str | None = None  # made at the first start (mode 0700: only this user reaches the socket)
        self._lock = threading.Lock()  # guards the fields below; never held while a child starts
        self._process: subprocess.Popen[bytes] | None = None
        self._client: flight.FlightClient | None = None
        self._starts = 0
        self._starting = False  # a thread is starting a child
        self._closed = False
        self._failed: tuple[float, str] | None = None  # the last failed start: when (monotonic), and why

    def usable(self) -> bool:
        """Whether writes go to the child now: one runs. When none runs, one starts in the background (not within
        `RETRY_START_SECONDS` of a start that failed: no folder or socket, no interpreter, failed imports), and
        the writes meanwhile run in the serving process as without a write process: the same results, only not
        apart from the lookups. So no write waits for a start (about 2 s of imports), neither the first ones nor
        those after the child stopped (killed, out of memory)."""
        with self._lock:
            if self._closed:
                raise WriteProcessError("the server is stopping: it takes no more writes")
            if self._live() is not None:
                return True
            failed = self._failed
            if self._starting or (failed is not None and time.monotonic() - failed[0] < RETRY_START_SECONDS):
                return False
            self._starting = True
        try:
            threading.Thread(target=self._start, name="write-process-start", daemon=True).start()
        except RuntimeError as exc:  # no thread to be had
            with self._lock:
                self._failed, self._starting = (time.monotonic(), f"no thread to start the write process: {exc}"), False
        return False

    def stats(self) -> dict[str, Any]:
        """For `health`: the running child's pid, whether one is starting, how often one was started, why the last
        start failed."""
        failed = self._failed
        return {
            "pid": self.pid,
            "starting": self._starting,
            "starts": self._starts,
            "start_error": failed[1] if failed is not None else None,
        }

    @property
    def pid(self) -> int | None:
        """The running child's process id (None while none runs)."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def put(
        self, request: WriteRequest, reader: flight.MetadataRecordBatchReader, is_cancelled: Callable[[], bool]
    ) -> WriteResult:
        """Relay one `do_put` to the child and return its result: committed only if the client's stream ended
        intact (the checks on the stream are the writer's own, with its messages)."""
        client, process = self._connect()
        schema = stream_schema(reader, "write")
        descriptor = flight.FlightDescriptor.for_command(replace(request, end_marker=True).to_bytes())
        try:
            writer, answers = client.do_put(descriptor, schema, _tagged())
        except (flight.FlightError, pa.ArrowException, OSError) as exc:
            raise self._failure(exc, process) from None
        try:
            marker = self._relay(request, reader, writer, is_cancelled)
        except RequestError:
            self._abandon(writer)  # no marker sent: the child refuses the put, commits nothing
            raise
        except (flight.FlightError, pa.ArrowException, OSError) as exc:
            raise self._failure(self._child_error(writer, exc), process) from None
        try:
            if marker is not None:
                writer.write_metadata(pa.py_buffer(marker))
            writer.done_writing()
            reply = answers.read()
            appended = answers.read() if reply is not None else None  # `appended_message`, if the child sent one
            writer.close()
        except (flight.FlightError, pa.ArrowException, OSError) as exc:
            raise self._failure(self._child_error(writer, exc), process) from None
        if reply is None:
            raise self._failure(OSError("no reply"), process)
        if appended is not None:
            keep_relayed(appended.to_pybytes())
        return WriteResult.from_bytes(reply.to_pybytes())

    def action(self, name: str, body: bytes) -> bytes:
        """Run one of `RELAYED_ACTIONS` in the child; its reply as the child encoded it."""
        client, process = self._connect()
        try:
            results = list(client.do_action(flight.Action(name, body), _tagged()))
        except (flight.FlightError, pa.ArrowException, OSError) as exc:
            raise self._failure(exc, process, name) from None
        return results[0].body.to_pybytes()

    def plan_refresh(
        self, name: str, known: str | None, since: int | None, room: int, rebuild_room: int
    ) -> tuple[RefreshPlan, pa.Table | None] | None:
        """An online index refresh planned in the child (`OnlineStore.plan`): the table's metadata and manifests are
        parsed there, and the appended files read there into their latest row per key (at most `room` bytes). None
        when no child runs (a refresh starts none: a replica that only serves needs none) or it cannot answer within
        30 s (`_PLANNING`, since it reads the append; `health`'s 2 s would fail big appends): the refresh then runs
        in the serving process."""
        fields = {"table": name, "known": known, "since": since, "room": room, "rebuild_room": rebuild_room}
        body = json.dumps(fields).encode()
        running = self._running()
        if running is None:
            return None
        client, process = running
        try:
            results = list(client.do_action(flight.Action(PLAN_REFRESH, body), _PLANNING))
        except (flight.FlightError, pa.ArrowException, OSError) as exc:
            failure = self._failure(exc, process, asked=False)
            if isinstance(failure, NotFoundError | LimitError):  # the table is gone or too big: the index is dropped
                raise failure from None
            if isinstance(failure, flight.FlightUnavailableError) and detail_code(failure) is not None:
                raise failure from None  # the catalog or store is away for this process too: the refresh fails once
            log.info("online refresh of %s planned in the serving process: %s", name, failure)
            return None
        return from_results([result.body.to_pybytes() for result in results])

    def counted(self, name: str) -> float:
        """What the counter `name` (`base/metrics.py`) counted in every child this server started, read from their
        files: a scrape neither waits for a busy child nor loses the count of one that stopped."""
        folder = self._folder
        if folder is None:
            return 0.0
        try:
            merged = MultiProcessCollector.merge(glob.glob(os.path.join(folder, METRICS_FOLDER, "counter_*.db")))
        except FileNotFoundError:  # the server is stopping: `close` removed the folder
            return 0.0
        for metric in merged:
            if metric.name == name:
                return sum(sample.value for sample in metric.samples if sample.name.endswith("_total"))
        return 0.0

    def compact_small_files(self, table: str, min_files: int, small_bytes: int, max_bytes: int) -> CompactResult:
        """`Maintenance.compact_small_files` in the child; a lost race is a `ConflictError`."""
        body = {"table": table, "min_files": min_files, "small_bytes": small_bytes, "max_bytes": max_bytes}
        return CompactResult.from_bytes(self._own_action(COMPACT_SMALL_FILES, body))

    def expire_once(self, request: ExpireRequest, in_use: set[int]) -> ExpireResult:
        """`Maintenance.expire_once` in the child, keeping the snapshots `in_use` here too; a lost race is a
        `ConflictError`."""
        body = {"request": asdict(request), "in_use": sorted(in_use)}
        return ExpireResult.from_bytes(self._own_action(EXPIRE_ONCE, body))

    def _own_action(self, name: str, body: dict[str, Any]) -> bytes:
        """One of the child's own actions (the running child's: `usable` said one runs), its reply."""
        client, process = self._connect()
        try:
            results = list(client.do_action(flight.Action(name, json.dumps(body).encode()), _tagged()))
        except (flight.FlightError, pa.ArrowException, OSError) as exc:
            raise self._failure(exc, process, asked=False) from None
        return results[0].body.to_pybytes()

    def ask(self, name: str) -> Any | None:
        """A read-only action's reply from the running child (None when none runs: nothing is started for it)."""
        running = self._running()
        if running is None:
            return None
        try:
            results = list(running[0].do_action(flight.Action(name, b""), _ASKING))
        except (flight.FlightError, pa.ArrowException, OSError):
            return None
        return json.loads(results[0].body.to_pybytes())

    def _running(self) -> tuple[flight.FlightClient, subprocess.Popen[bytes]] | None:
        """The running child's client, None while none runs (nothing is started for it)."""
        with self._lock:
            return self._live()

    def _live(self) -> tuple[flight.FlightClient, subprocess.Popen[bytes]] | None:
        """The child's client and process if it runs (under `_lock`)."""
        if self._client is None or self._process is None or self._process.poll() is not None:
            return None
        return self._client, self._process

    def close(self) -> None:
        """Stop the child (it finishes its running calls) and remove its folder."""
        with self._lock:
            self._closed = True  # a start running now stops the child it started, and makes no folder
            process, client, folder = self._process, self._client, self._folder
            self._process = self._client = None
        if client is not None:
            client.close()
        if process is not None:
            _stop(process)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def _relay(
        self,
        request: WriteRequest,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightStreamWriter,
        is_cancelled: Callable[[], bool],
    ) -> bytes | None:
        """Pass the client's batches on; return the end-of-stream marker to send once all arrived intact (None:
        the client declared one and sent none, which the child refuses as the writer does)."""
        rows = 0
        marker: bytes | None = None
        for chunk in chunks(reader, "write", "; nothing was committed"):
            if chunk.app_metadata is not None:
                marker = chunk.app_metadata.to_pybytes()
                parse_end_marker(marker)  # a malformed one fails here, with the writer's message
            if chunk.data is not None and chunk.data.num_rows:
                if marker is not None:
                    raise RequestError("the write stream sent data after its end-of-stream marker")
                writer.write_batch(chunk.data)
                rows += chunk.data.num_rows
        if is_cancelled():
            raise CancelledError(f"the client cancelled the write after {rows} rows; nothing was committed")
        if marker is None and not request.end_marker:
            marker = end_marker(rows)
        return marker

    def _abandon(self, writer: flight.FlightStreamWriter) -> None:
        """End the child's put without its marker: the child refuses it and deletes its files."""
        try:
            writer.done_writing()
            writer.close()
        except (flight.FlightError, pa.ArrowException, OSError):
            pass  # the child's refusal: expected

    def _child_error(self, writer: flight.FlightStreamWriter, exc: BaseException) -> BaseException:
        """The child's own error behind a failed write of a batch (its status arrives when the stream closes)."""
        try:
            writer.close()
        except (flight.FlightError, pa.ArrowException, OSError) as closing:
            return closing
        return exc

    def _failure(
        self, exc: BaseException, process: subprocess.Popen[bytes], action: str | None = None, asked: bool = True
    ) -> Exception:
        """`exc` relayed, or `WriteProcessError` when the child stopped (gRPC then says only UNAVAILABLE), with the
        advice for a put, or for the relayed `action`. For a client's call (`asked`; not the server's own: refresh
        plans, maintenance), gRPC's own UNAVAILABLE from a child that runs on is a `WriteProcessError` too: the
        connection broke, maybe after the commit, so it is no lost race (`relayed_error`'s CONFLICT, which says
        nothing was committed)."""
        if isinstance(exc, flight.FlightUnavailableError | OSError) and detail_code(exc) is None:
            retry = (
                "Retry a put with the same write_id: it commits once whichever happened"
                if action is None
                else f"Run {action} again: it does what is left to do, or finds it done"
            )
            try:
                code = process.wait(timeout=STOPPED_SECONDS)
            except subprocess.TimeoutExpired:
                if asked and isinstance(exc, flight.FlightUnavailableError):
                    log.warning("the connection to the write process broke during a call: %s", error_message(exc))
                    return WriteProcessError(
                        f"the connection to the server's write process broke during this call, which may have "
                        f"committed. {retry}"
                    )
            else:
                log.warning("the write process stopped (exit code %s) during a call", code)
                return WriteProcessError(
                    f"the server's write process stopped (exit code {code}) during this call, which may have "
                    f"committed; it starts again at the next write. {retry}"
                )
        return relayed_error(exc)

    def _connect(self) -> tuple[flight.FlightClient, subprocess.Popen[bytes]]:
        """The running child's client (`usable` said one runs; it may have stopped since)."""
        with self._lock:
            if self._closed:
                raise WriteProcessError("the server is stopping: it takes no more writes")
            if (live := self._live()) is not None:
                return live
        raise WriteProcessError(
            "the server's write process stopped before this call reached it: nothing was committed; it starts again "
            "at the next write. Retry"
        )

    def _start(self) -> None:
        """Start a child and make it the one writes go to (in a thread of its own: see `usable`). Any failure is the
        start's: logged, in `health`, and tried again `RETRY_START_SECONDS` later."""
        process: subprocess.Popen[bytes] | None = None
        try:
            with self._lock:
                stopped, client = self._process, self._client
                self._process = self._client = None
                if self._closed:
                    self._starting = False
                    return
                self._starts += 1
                if self._folder is None:
                    self._folder = _private_folder()
                socket = os.path.join(self._folder, f"writes-{self._starts}.sock")
            if client is not None:
                client.close()
            if stopped is not None:
                log.warning("the write process had stopped (exit code %s): starting it again", stopped.poll())
            process = _launch(self._config, socket)
            client = flight.FlightClient(f"grpc+unix://{socket}")
        except Exception as exc:  # whatever it was, the writes go on in the serving process
            if process is not None:
                _stop(process, 0.0)
            reason = str(exc) if isinstance(exc, LaunchError) else f"the server's write process could not start: {exc}"
            with self._lock:
                self._failed, self._starting, closed = (time.monotonic(), reason), False, self._closed
            if not closed:  # at a stop, a start that fails for it is no news
                log.error("%s: writes run in the serving process; trying again in %.0f s", reason, RETRY_START_SECONDS)
            return
        with self._lock:
            self._starting = False  # with the child in place: `usable` never sees neither
            if not self._closed:
                self._process, self._client, self._failed = process, client, None
                return
        client.close()  # the server stopped meanwhile
        _stop(process)


@dataclass
class OffloadedMaintenance(Maintenance):
    """`Maintenance` whose compaction of small files and snapshot expiry run in the write process.

    Under steady ingest each round compacted the files the puts made: 2.2-2.5 s of Parquet and commit work in the
    serving process (measured with a writer putting 1,000 rows at a time), during which the p99 of 100-entity lookups
    went from 0.6 to over 2 ms. Expiry commits beside the puts too, under the same commit lock: from here it raced
    the write process's puts to one table, and pyiceberg's retries of each lost race waited longer each time (a
    round took 5-11 s against puts every 10-30 ms), so snapshots piled up faster than they expired and every put
    rewrote a larger metadata file (`flight-bench history --maintenance`: put p50 9.5x slower after 2,000 puts). It
    also reads the expired snapshots' manifests (seconds of Python) there, not beside the lookups. The snapshots
    this process's reads and cached training sets use, which only it knows, go along with each request."""

    writes: WriteProcess | None = None

    def compact_small_files(self, table: str, min_files: int, small_bytes: int, max_bytes: int) -> CompactResult:
        if self.writes is None or not self.writes.usable():
            return super().compact_small_files(table, min_files, small_bytes, max_bytes)
        return self.writes.compact_small_files(table, min_files, small_bytes, max_bytes)

    def expire_once(self, request: ExpireRequest, in_use_elsewhere: frozenset[int] = frozenset()) -> ExpireResult:
        if self.writes is None or not self.writes.usable():
            return super().expire_once(request, in_use_elsewhere)
        table = self.catalog.read(request.table)  # its uuid, which the snapshots in use are kept by
        in_use = self.in_use(str(table.metadata.table_uuid)) | in_use_elsewhere
        try:
            return self.writes.expire_once(request, in_use)
        except ConflictError as exc:  # as in process: `until` tries again, a maintenance round gives way
            raise CommitFailedException(str(exc)) from None


def appended_message(snapshot_id: int) -> bytes | None:
    """The child's second reply to a put, after its `WriteResult`: the files its snapshot added (with every put of a
    group commit: whichever answer arrives first), for the serving process to keep (`keep_relayed`). Following that
    snapshot there (training-set indexes brought forward, scans since a snapshot) then reads no manifest back, which
    after a merge-append lists every file of the table (10-13 % of the serving process's CPU beside a writer). None
    when this process no longer keeps them. Pickled: only the serving process reads it, on a socket only it reaches;
    once a snapshot (a group's puts answer with the same message), behind its key in plain text, so that the serving
    process unpickles only the first to arrive."""
    message = appended_messages.get(snapshot_id)
    if message is None:
        appended = committed_appends(snapshot_id)
        if appended is None:
            return None
        (table_uuid, committed), files = appended
        message = APPENDED_TAG + f"{table_uuid} {committed}\n".encode() + pickle.dumps(files, pickle.HIGHEST_PROTOCOL)
        appended_messages.put(snapshot_id, message)
    return message


appended_messages: WeightedLru[int, bytes] = WeightedLru(APPENDED_MESSAGES_BYTES, len)


def keep_relayed(message: bytes) -> None:
    """Keep the files the child's `appended_message` names, unless kept already or another pyiceberg wrote it."""
    if not message.startswith(APPENDED_TAG):
        return
    end = message.index(b"\n", len(APPENDED_TAG))
    table_uuid, snapshot_id = message[len(APPENDED_TAG) : end].decode().split(" ")
    key = (table_uuid, int(snapshot_id))
    if not kept_appended(key):
        keep_appended(key, pickle.loads(message[end + 1 :]))


def expire_once(maintenance: Maintenance, body: bytes) -> bytes:
    """The child's answer to `EXPIRE_ONCE`: as `compact_small_files`, a race lost (once pyiceberg's own retries ran
    out) is a `ConflictError`."""
    fields = json.loads(body)
    request = ExpireRequest(**fields["request"])
    try:
        return maintenance.expire_once(request, frozenset(fields["in_use"])).to_bytes()
    except CommitFailedException as exc:
        raise ConflictError(f"snapshot expiry of {request.table}: a concurrent commit won ({exc})") from None


def compact_small_files(maintenance: Maintenance, body: bytes) -> bytes:
    """The child's answer to `COMPACT_SMALL_FILES`: a race lost to another commit is a `ConflictError`, which the
    serving process's maintenance round takes as giving way, as it does in process."""
    fields = json.loads(body)
    try:
        return maintenance.compact_small_files(
            fields["table"], fields["min_files"], fields["small_bytes"], fields["max_bytes"]
        ).to_bytes()
    except (CommitFailedException, ValidationException) as exc:
        raise ConflictError(f"compaction of {fields['table']}: a concurrent commit won ({exc})") from None


def _tagged() -> flight.FlightCallOptions:
    """Options of a relayed call: the client's request id, so that the child's log lines carry it too."""
    call = current()
    if call is None:
        return flight.FlightCallOptions()
    return flight.FlightCallOptions(headers=[(REQUEST_ID_HEADER.encode(), call.request_id.encode())])


def _private_folder() -> str:
    """A new folder only this user can open, for the child's socket and counters: in the temporary folder, or in
    /tmp where that one's path is too long for a Unix socket (macOS's per-user folders, a deep $TMPDIR)."""
    folder = tempfile.mkdtemp(prefix="flight-writes-")
    if len(os.path.join(folder, "writes-0000.sock").encode()) > SOCKET_PATH_MAX and os.path.isdir("/tmp"):
        os.rmdir(folder)
        folder = tempfile.mkdtemp(prefix="flight-writes-", dir="/tmp")
    os.mkdir(os.path.join(folder, METRICS_FOLDER))
    return folder


def _launch(config: ServerConfig, socket: str) -> subprocess.Popen[bytes]:
    """Start the child and wait until it listens on `socket`."""
    level = logging.getLevelName(logging.getLogger("flight_server").getEffectiveLevel())
    metrics = os.path.join(os.path.dirname(socket), METRICS_FOLDER)
    process = subprocess.Popen(
        [sys.executable, "-m", "flight_server.transport.offload", socket, str(level)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, MULTIPROCESS_VARIABLE: metrics},
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(json.dumps(asdict(config)).encode() + b"\n")
        process.stdin.flush()
        ready = select.poll()  # not select.select: it fails for descriptors past 1023, as a busy server has
        ready.register(process.stdout, select.POLLIN)
        line = process.stdout.readline() if ready.poll(START_TIMEOUT_SECONDS * 1000) else b""
    except OSError:
        line = b""
    if line != READY:
        _stop(process, 0.0)
        raise LaunchError(
            f"the server's write process did not start (exit code {process.poll()}); the server's log says why"
        )
    log.info("write process %d listening on %s", process.pid, socket)
    return process


def _stop(process: subprocess.Popen[bytes], seconds: float = STOP_SECONDS) -> None:
    """Close the child's stdin (it stops after its running calls), then kill it past `seconds`."""
    if process.stdin is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()


def _serve(socket: str, level: str) -> None:
    """The child: the server's own code on `socket`, with the settings on stdin, until stdin closes."""
    from flight_server.base.logs import setup_logging
    from flight_server.transport.service import FeatureFlightServer

    config = ServerConfig(**json.loads(sys.stdin.readline()))
    # Ctrl-C and a service manager's SIGTERM reach the whole process group: the server stops us once its calls end.
    # (A terminal's SIGHUP too: the server reloads its tokens on it; we stop when its pipe closes.)
    for sent_to_the_group in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sent_to_the_group, signal.SIG_IGN)
    os.nice(NICE)
    # Out of memory, the kernel stops this process first: it starts again at the next write, and puts retry.
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as adj:
        adj.write(str(OOM_SCORE_ADJ))
    setup_logging(level, config.log_format)
    server = FeatureFlightServer(config, location=f"grpc+unix://{socket}", write_process=True)

    def watch_parent() -> None:
        sys.stdin.buffer.read()  # returns at EOF: the server closed the pipe, or died
        threading.Timer(STOP_SECONDS, os._exit, (1,)).start()  # never outlive the server by more than this
        server.shutdown()

    threading.Thread(target=watch_parent, name="write-process-parent", daemon=True).start()
    sys.stdout.buffer.write(READY)
    sys.stdout.buffer.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # nobody reads the pipe from now on: it must never fill
    server.serve()
    shutil.rmtree(os.path.dirname(socket), ignore_errors=True)  # the server is gone (or removes it too)


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2])
