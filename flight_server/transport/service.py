"""The Flight service: routes each RPC to the part that does the work. Reads go to the handler of their request's
kind (`handlers.py`), actions to their row of the action table (`actions.py`), writes to the writer.

Every RPC turns client mistakes into Flight errors that carry only the explanation
(`errors.to_flight_error`), so one bad request never disturbs anyone else.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import pyarrow as pa
import pyarrow.flight as flight

from flight_server.base.config import ServerConfig
from flight_server.base.outages import OutageLog, outage
from flight_server.iceberg.catalog import table_name
from flight_server.online.store import plan_results
from flight_server.reads.plan import plan_table_scan
from flight_server.transport.actions import ACTIONS, table_summary, visible_tables
from flight_server.transport.auth import MIDDLEWARE_KEY, AuthMiddlewareFactory, TokenSource, principal, request_tables
from flight_server.transport.calls import KINDS, CallLog, flows, note, tag
from flight_server.transport.calls import MIDDLEWARE_KEY as CALLS_KEY
from flight_server.transport.client_streams import ClientReader, ClientWriter, CompressedWriter
from flight_server.transport.components import Components
from flight_server.transport.errors import plain_error_messages, to_flight_error
from flight_server.transport.handlers import Endpoints, ReadRequest, handlers, scan_schema
from flight_server.transport.idle import MIDDLEWARE_KEY as IDLE_KEY
from flight_server.transport.idle import IdleWatch, OpenSessions, WatchedCall
from flight_server.transport.limits import MIDDLEWARE_KEY as LIMITS_KEY
from flight_server.transport.limits import ConcurrencyLimit, is_session
from flight_server.transport.metrics import CountedReader, CountedWriter, ServerMetrics, process_figures, sending
from flight_server.transport.offload import (
    COMPACT_SMALL_FILES,
    EXPIRE_ONCE,
    PLAN_REFRESH,
    PROCESS_STATS,
    RELAYED_ACTIONS,
    appended_message,
    compact_small_files,
    expire_once,
)
from flight_server.transport.tls import server_tls_options
from flight_server.wire.codec import ONLINE_SESSION_HEADER, decode, decode_text, encode_reply
from flight_server.wire.errors import RequestError
from flight_server.wire.reads import COMPRESSIONS, ScanRequest, parse_ticket
from flight_server.wire.writes import parse_write

log = logging.getLogger(__name__)
OUTAGES = OutageLog(log)  # calls that failed because the catalog or the object store is away

F = TypeVar("F", bound=Callable[..., Any])

# Passed explicitly: pyarrow reads two environment variables per stream to make the default.
WRITE_OPTIONS = pa.ipc.IpcWriteOptions()
# Results a reader asked compressed (`compression` in its request): buffers compressed on several threads.
COMPRESSED_OPTIONS = {codec: pa.ipc.IpcWriteOptions(compression=codec) for codec in COMPRESSIONS}


def write_options(request: object) -> pa.ipc.IpcWriteOptions:
    """The IPC options of a request's results: compressed when it asks (scans and training sets)."""
    codec = getattr(request, "compression", None)
    return WRITE_OPTIONS if codec is None else COMPRESSED_OPTIONS[codec]


SHUTDOWN_GRACE_SECONDS = 2.0  # for running calls to end before open online sessions are cut


def _flight_errors(handler: F) -> F:
    """Answer exceptions as Flight errors with their kind's gRPC status (`errors.ROUTES`); log the unexpected ones
    (bugs, answered INTERNAL with no more than their class) with their traceback."""

    @functools.wraps(handler)
    def wrapper(self: FeatureFlightServer, context: flight.ServerCallContext, *args: Any) -> Any:
        try:
            return handler(self, context, *args)
        except Exception as exc:
            raise _answered(handler.__name__, exc) from None

    return cast(F, wrapper)


def _answered(name: str, exc: Exception) -> Exception:
    """The Flight error that answers `exc` raised by RPC `name`, logged: a refusal as such, an outage of the catalog or
    the object store once a minute (`OutageLog`), anything else with its traceback."""
    if isinstance(exc, (RequestError, flight.FlightError)):
        log.info("%s refused: %s", name, exc)
    elif (down := outage(exc)) is not None:
        OUTAGES.failed(name, down, exc)
    else:
        log.error("%s failed", name, exc_info=exc)
    return to_flight_error(exc)


def _answering(reader: pa.RecordBatchReader) -> pa.RecordBatchReader:
    """`reader`, its errors answered as `_flight_errors` answers a handler's: Flight reads the batches of a `do_get`
    after it returned, where an error would otherwise reach the client as its raw text (server paths and all) and the
    log not at all. One generator step a batch."""

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            yield from reader
        except Exception as exc:
            raise _answered("do_get (while streaming)", exc) from None

    return pa.RecordBatchReader.from_batches(reader.schema, batches())


def _plan_refresh(parts: Components, body: bytes) -> list[bytes]:
    fields = json.loads(body)
    plan = parts.store.plan(fields["table"], fields["known"], fields["since"], fields["room"], fields["rebuild_room"])
    return plan_results(*plan)


def _process_stats(parts: Components, body: bytes) -> list[bytes]:
    """What `health` says of a process, less what asks the catalog: a catalog down must not read as a child down."""
    stats = {"writes_in_progress": parts.writer.in_progress, "caches": parts.cache_stats()}
    return [json.dumps({**stats, "process": process_figures()}).encode()]


# A write process's own actions, which only its server calls (not in the action table): refresh planning, its figures
# (`Components.write_process_stats`), and its server's maintenance steps run here (`OffloadedMaintenance`: compaction
# of small files, snapshot expiry).
_OWN_ACTIONS: dict[str, Callable[[Components, bytes], list[bytes]]] = {
    PLAN_REFRESH: _plan_refresh,
    PROCESS_STATS: _process_stats,
    COMPACT_SMALL_FILES: lambda parts, body: [compact_small_files(parts.maintenance, body)],
    EXPIRE_ONCE: lambda parts, body: [expire_once(parts.maintenance, body)],
}


class FeatureFlightServer(flight.FlightServerBase):
    """Arrow Flight over Iceberg feature tables."""

    def __init__(self, config: ServerConfig, location: str | None = None, write_process: bool = False, **kwargs: Any):
        # Settings are checked first, and everything a handler needs exists before the base class opens the port.
        self.config = config
        self.write_process = write_process  # this is a server's write process (transport/offload.py)
        plain_error_messages()
        tls = server_tls_options(config)
        endpoints = Endpoints(config.endpoint_locations())
        self.metrics = ServerMetrics() if config.metrics_port else None
        if self.metrics is not None:  # a port in use stops the start before anything is built
            self.metrics.serve(config.metrics_host or config.host, config.metrics_port)
        middleware: dict[str, flight.ServerMiddlewareFactory] = {}
        calls = None
        if self.metrics is not None or config.log_format == "json":  # a Python middleware costs every call
            calls = middleware[CALLS_KEY] = CallLog(self.metrics)  # first: it ends the calls the others refuse, too
        self.auth: AuthMiddlewareFactory | None = None
        if config.auth_tokens:  # first: calls without a valid token take no slot of the limit
            self.auth = AuthMiddlewareFactory(TokenSource(config.auth_tokens, config.auth_tokens_file))
            middleware[MIDDLEWARE_KEY] = self.auth
            kwargs.update(self.auth.server_options())
        if config.max_concurrent_requests or config.max_concurrent_per_caller:
            caller = self.auth.caller_name if self.auth else lambda _: "anonymous"
            middleware[LIMITS_KEY] = ConcurrencyLimit(
                config.max_concurrent_requests, config.max_concurrent_per_caller, caller
            )
        self.idle = IdleWatch(config.idle_timeout_seconds) if config.idle_timeout_seconds else None
        if self.idle is not None:
            middleware[IDLE_KEY] = self.idle
        self.parts = Components.build(config, write_process, calls)
        self.sessions = OpenSessions()
        self._handlers = handlers(self.parts, endpoints, self.sessions)
        if self.metrics is not None:
            self.metrics.watch(self.parts)
        location = location or f"{config.scheme}://{config.host}:{config.port}"
        super().__init__(location, middleware=middleware, **tls, **kwargs)
        if self.idle is not None:
            self.idle.start(self.port)
        log.info(
            "serving Flight on %s://%s:%d (authentication %s)",
            config.scheme,
            config.host,
            self.port,
            "on" if config.auth_tokens else "off",
        )

    def shutdown(self) -> None:
        """Stop taking calls and wait for running ones; online sessions still open after a short grace
        (their clients keep them open between lookups) have their connections cut. Then the server's parts close."""
        if self.idle is not None:
            self.idle.stop()
        stopping = threading.Thread(target=super().shutdown, name="flight-shutdown")
        stopping.start()
        stopping.join(SHUTDOWN_GRACE_SECONDS)
        while stopping.is_alive():
            if self.sessions.cut(self.port):
                log.info("shutdown: ended the open online sessions")
            stopping.join(1.0)
        self.parts.close()
        if self.metrics is not None:
            self.metrics.close()

    def reload_tokens(self) -> None:
        """Read `--auth-tokens-file` again now (SIGHUP); otherwise it is re-read within a second of changing."""
        if self.auth is not None:
            self.auth.tokens.reload()

    def _watched(self, context: flight.ServerCallContext) -> WatchedCall | None:
        """This call's entry in the idle watch, when `--idle-timeout-seconds` is set."""
        call = context.get_middleware(IDLE_KEY)
        return call.identify(context) if call is not None else None

    def _stream(
        self,
        context: flight.ServerCallContext,
        reader: pa.RecordBatchReader | pa.Table,
        options: pa.ipc.IpcWriteOptions,
    ) -> flight.RecordBatchStream:
        """A `do_get` result; with an idle timeout, the time Flight spends writing each batch is watched. A reader's
        errors are answered as a handler's (a Table is in memory: nothing of it fails, and it streams without
        Python per batch)."""
        streamed = not isinstance(reader, pa.Table)
        call = self._watched(context)
        if self.metrics is not None:
            reader = sending(flows(context, self.metrics)[1], reader)
        if call is not None:
            reader = call.stream(reader)
        return flight.RecordBatchStream(_answering(reader) if streamed else reader, options)

    def _client_streams(
        self,
        context: flight.ServerCallContext,
        reader: flight.MetadataRecordBatchReader,
        writer: Any,
        watch_reads: bool = True,
        options: pa.ipc.IpcWriteOptions = WRITE_OPTIONS,
    ) -> tuple[Any, Any]:
        """The client's stream and the writer back to it, within `--max-batch-mb` and the idle timeout
        (which, without `watch_reads`, counts only the waits for the client to read results), its streams
        written with `options` (compressed when the request asks)."""
        if options is not WRITE_OPTIONS:
            writer = CompressedWriter(writer, options)
        if self.metrics is not None:
            received, sent = flows(context, self.metrics)
            reader, writer = CountedReader(reader, received), CountedWriter(writer, sent)
        call = self._watched(context)
        if call is None and not self.config.max_batch_bytes:
            return reader, writer
        client_reader = ClientReader(reader, call if watch_reads else None, self.config.max_batch_bytes)
        return client_reader, ClientWriter(writer, call) if call else writer

    def _request(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor) -> ReadRequest:
        if descriptor.descriptor_type == flight.DescriptorType.PATH:
            if len(descriptor.path) != 1:
                raise RequestError("a path descriptor names one table: ['namespace.table']")
            request: ReadRequest = ScanRequest(table=descriptor.path[0].decode())
        else:
            request = parse_ticket(descriptor.command, "descriptor", self.config.max_request_bytes)
        return self._authorized(context, request)

    def _authorized(self, context: flight.ServerCallContext, request: Any) -> Any:
        """`request`, once the caller may use every table it names (the RPC's permission is checked earlier)."""
        if type(request) in KINDS:
            tag(context, KINDS[type(request)])
        caller, tables = principal(context), request_tables(request)
        caller.check_tables(self.parts.catalog, tables)
        note(context, caller.name if self.auth is not None else None, tables)
        return request

    @_flight_errors
    def get_flight_info(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        request = self._request(context, descriptor)
        return self._handlers[type(request)].info(descriptor, request)

    @_flight_errors
    def get_schema(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor) -> flight.SchemaResult:
        request = self._request(context, descriptor)
        return flight.SchemaResult(self._handlers[type(request)].schema(request))

    @_flight_errors
    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.RecordBatchStream:
        request = self._authorized(context, parse_ticket(ticket.ticket, limit=self.config.max_request_bytes))
        return self._stream(
            context, self._handlers[type(request)].open(request, context.is_cancelled), write_options(request)
        )

    @_flight_errors
    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        if descriptor.descriptor_type != flight.DescriptorType.CMD:
            raise RequestError("do_put needs a command descriptor holding a write request (see docs/protocol.md)")
        request = self._authorized(context, parse_write(descriptor.command, self.config.max_request_bytes))
        reader, writer = self._client_streams(context, reader, writer)
        if (writes := self.parts.offloaded()) is not None:  # in the write process: its commits hold no GIL of ours
            result = writes.put(request, reader, context.is_cancelled)
        else:
            result = self.parts.writer.write(request, reader, context.is_cancelled)
        self.parts.changed(result.table)
        writer.write(pa.py_buffer(result.to_bytes()))
        if self.write_process and (appended := appended_message(result.snapshot_id)) is not None:
            writer.write(pa.py_buffer(appended))  # to the serving process, which relays only the result to its client

    @_flight_errors
    def do_exchange(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
    ) -> None:
        request = self._request(context, descriptor)
        handler = self._handlers[type(request)]
        if is_session(context) and not handler.waits_on_client:
            raise RequestError(f"the {ONLINE_SESSION_HEADER!r} header is for online lookups only")
        reader, writer = self._client_streams(
            context, reader, writer, watch_reads=not handler.waits_on_client, options=write_options(request)
        )
        handler.exchange(request, reader, writer, context)

    @_flight_errors
    def list_flights(self, context: flight.ServerCallContext, criteria: bytes) -> Iterator[flight.FlightInfo]:
        prefix = decode_text(criteria, "list_flights criteria")
        infos = []
        names = [name for name in visible_tables(self.parts.catalog, principal(context)) if name.startswith(prefix)]
        for table in self.parts.catalog.current(names):
            name, summary = table_name(table), table_summary(table)
            plan = plan_table_scan(table, ScanRequest(table=name), self.parts.caches)
            infos.append(
                flight.FlightInfo(
                    scan_schema(plan),
                    flight.FlightDescriptor.for_path(name),
                    [flight.FlightEndpoint(ScanRequest(table=name).to_bytes(), [])],
                    summary.rows,
                    -1,
                    app_metadata=summary.to_bytes(),
                )
            )
        return iter(infos)

    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return [(action.name, action.doc) for action in ACTIONS.values()]

    @_flight_errors
    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> Iterator[bytes]:
        name = action.type
        if self.write_process and (own := _OWN_ACTIONS.get(name)) is not None:  # its server's, on its own socket
            return iter(own(self.parts, action.body.to_pybytes()))
        row = ACTIONS.get(name)
        if row is None:
            raise RequestError(f"unknown action {name!r}; available: {sorted(ACTIONS)}")
        tag(context, name)
        caller = principal(context)
        note(context, caller.name if self.auth is not None else None, [])
        caller.require(row.permission, f"action {name!r}")
        request = None
        if row.parse is not None:
            body = action.body.to_pybytes() if action.body is not None else b""
            limit = self.config.max_request_bytes
            fields = decode(body, f"{name} body", limit) if body or not row.optional_body else {}
            request = self._authorized(context, row.parse(fields))
            if name in RELAYED_ACTIONS and (writes := self.parts.offloaded()) is not None:  # run in the write process
                reply = writes.action(name, body)
                self.parts.changed(request.table)
                return iter([reply])
        return iter([encode_reply(row.run(self.parts, caller, request))])
