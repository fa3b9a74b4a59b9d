"""Idle timeout: end calls whose client has stopped reading results, or stopped sending its stream.

A Flight handler that writes to a client which does not read blocks in gRPC on flow control, and
one that reads from a client which sends nothing blocks in gRPC's read; neither returns while the
connection stays open. pyarrow's Flight server can neither cancel a call (no `TryCancel` on its
`ServerCallContext`: apache/arrow#43819) nor set gRPC's server options such as keepalive or
`max_connection_age` (`FlightServerOptions.builder_hook` is C++ only: apache/arrow#40257, #44916).
What still ends a blocked call from the server is closing its TCP connection: gRPC then fails the
blocked write or read, the handler returns, and the call's slot, cursor and buffers are released.

So each call records when it started waiting on its client (a result batch handed to Flight and
not yet taken, or a read not yet answered); a watchdog shuts down the connection of any call that
has waited longer than `--idle-timeout-seconds`. Every call multiplexed on that connection ends
with it (the client sees UNAVAILABLE and reconnects for its next call). Linux only: the call's
socket is found through /proc.

The same cut ends online sessions when the server shuts down (`OpenSessions`): a session waits for
its client's next keys by design, and gRPC's shutdown would wait for it for ever.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.flight as flight

from flight_server.transport.auth import principal

log = logging.getLogger(__name__)

MIDDLEWARE_KEY = "idle"

PROC_NET = Path("/proc/self/net")

Address = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


class WatchedCall(flight.ServerMiddleware):
    """One call: who made it, over which connection, and since when it waits on its client."""

    def __init__(self, watch: IdleWatch, method: flight.FlightMethod):
        self._watch = watch
        self.method = method.name.lower()
        self.peer: str | None = None  # set by the handler: CallInfo does not carry it
        self.caller = ""
        self.waiting_since: float | None = None
        self.waiting_for = ""
        self.cut = False

    def identify(self, context: flight.ServerCallContext) -> WatchedCall:
        self.peer, self.caller = context.peer(), principal(context).name
        return self

    def idle_seconds(self, now: float) -> float:
        """How long this call has waited on its client (0 while it works, or once its connection was cut)."""
        if self.peer is None or self.cut or self.waiting_since is None:
            return 0.0
        return now - self.waiting_since

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """Mark the block as time spent waiting on the client (`what`: what the client should do)."""
        self.waiting_since, self.waiting_for = time.monotonic(), what
        try:
            yield
        finally:
            self.waiting_since = None

    def stream(self, reader: pa.RecordBatchReader | pa.Table) -> pa.RecordBatchReader:
        """`reader`, marking the time from handing each batch to Flight until Flight asks for the next
        (Flight writes the batch in between, blocking while the client does not read)."""
        if isinstance(reader, pa.Table):
            reader = reader.to_reader()

        def batches() -> Iterator[pa.RecordBatch]:
            for batch in reader:
                with self.waiting("read results"):
                    yield batch

        return pa.RecordBatchReader.from_batches(reader.schema, batches())

    def call_completed(self, exception: Exception | None) -> None:
        self._watch.forget(self)


class IdleWatch(flight.ServerMiddlewareFactory):
    """Tracks every call and, from a watchdog thread, cuts the connection of calls idle past `timeout`."""

    def __init__(self, timeout: float):
        if not (PROC_NET / "tcp").exists():
            raise ValueError("--idle-timeout-seconds needs Linux (/proc/self/net/tcp) to find a call's connection")
        self.timeout = timeout
        self.port = 0  # the server's, known once it listens (start)
        self._calls: set[WatchedCall] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start_call(self, info: flight.CallInfo, headers: dict[str, list[str]]) -> WatchedCall:
        call = WatchedCall(self, info.method)
        with self._lock:
            self._calls.add(call)
        return call

    def forget(self, call: WatchedCall) -> None:
        with self._lock:
            self._calls.discard(call)

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._calls)

    def start(self, port: int) -> None:
        self.port = port
        threading.Thread(target=self._watch, name="idle-watch", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        interval = min(1.0, self.timeout / 4)
        while not self._stop.wait(interval):
            now = time.monotonic()
            with self._lock:
                idle = [c for c in self._calls if c.idle_seconds(now) > self.timeout]
            for call in idle:
                call.cut = True
                self._cut(call)

    def _cut(self, call: WatchedCall) -> None:
        try:
            found = shutdown_connection(call.peer or "", self.port)
        except OSError as exc:  # the connection went away meanwhile, or /proc is unreadable
            log.warning("idle %s from %s: its connection stays open: %s", call.method, call.peer, exc)
            return
        log.warning(
            "ended %s of %r from %s%s: its client did not %s for %.0f s (--idle-timeout-seconds); "
            "other calls on that connection end too",
            call.method,
            call.caller,
            call.peer,
            "" if found else " (connection already closed)",
            call.waiting_for,
            self.timeout,
        )


class OpenSessions:
    """The peers of the online streams open on this server, so that shutdown can end them."""

    def __init__(self) -> None:
        self._peers: Counter[str] = Counter()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def open(self, peer: str) -> Iterator[None]:
        with self._lock:
            self._peers[peer] += 1
        try:
            yield
        finally:
            with self._lock:
                self._peers[peer] -= 1
                if not self._peers[peer]:
                    del self._peers[peer]

    def cut(self, port: int) -> int:
        """Shut down the connections of the open sessions (Linux; elsewhere they end when their clients
        close them); returns how many were cut."""
        with self._lock:
            peers = list(self._peers)
        cut = 0
        for peer in peers:
            with contextlib.suppress(OSError):
                cut += shutdown_connection(peer, port)
        return cut


def parse_peer(peer: str) -> Address:
    """gRPC's peer string (`ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000`, possibly percent-encoded) as (address, port)."""
    kind, _, rest = unquote(peer).partition(":")
    if kind not in ("ipv4", "ipv6"):
        raise OSError(f"not a TCP peer: {peer!r}")
    host, _, port = rest.rpartition(":")
    return _plain(ipaddress.ip_address(host.strip("[]"))), int(port)


def _plain(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """IPv4-mapped IPv6 addresses (a dual-stack listener's view of IPv4 clients) as IPv4."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _proc_address(field: str) -> Address:
    """An `address:port` field of /proc/net/tcp{,6}: hex, each 32-bit word in host (little-endian) order."""
    hex_address, _, hex_port = field.partition(":")
    raw = b"".join(bytes.fromhex(hex_address[i : i + 8])[::-1] for i in range(0, len(hex_address), 8))
    return _plain(ipaddress.ip_address(raw)), int(hex_port, 16)


def _socket_inode(local_port: int, remote: Address) -> str | None:
    """The inode of the server-side socket of the connection from `remote` to `local_port`."""
    for name in ("tcp", "tcp6"):
        path = PROC_NET / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if _proc_address(fields[1])[1] == local_port and _proc_address(fields[2]) == remote:
                return fields[9]
    return None


def shutdown_connection(peer: str, local_port: int) -> bool:
    """Shut down this process's TCP connection from `peer`; False when it is no longer open."""
    inode = _socket_inode(local_port, parse_peer(peer))
    if inode is None:
        return False
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != f"socket:[{inode}]":
                continue
            duplicate = os.dup(int(fd))
        except OSError:  # closed meanwhile
            continue
        with socket.socket(fileno=duplicate) as sock:
            # The descriptor number may have been reused between readlink and dup: act on the socket only.
            if os.fstat(duplicate).st_ino == int(inode):
                sock.shutdown(socket.SHUT_RDWR)
                return True
    return False
