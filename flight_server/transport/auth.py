"""Who may do what: static bearer tokens checked by Flight middleware, and the permissions they carry.

Every RPC but the handshake must present `authorization: Bearer <token>` when tokens are configured.
A token grants some of `read` (scans, training sets, online lookups, describe, list, health), `write`
(`do_put`) and `admin` (maintenance actions: delete, compact, expire snapshots), optionally only in
some namespaces. Tokens are compared in constant time and never logged: logs name the token's `name`.
A token with a `password` can also be had through Flight's handshake with basic authentication
(user name = the token's `name`), for clients such as Flight SQL drivers that log in that way; failed
logins are throttled per user name (`LoginThrottle`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.flight as flight

from flight_server.iceberg.catalog import FeatureCatalog
from flight_server.transport.calls import refused
from flight_server.transport.errors import to_flight_error
from flight_server.wire.errors import LimitError, PermissionDeniedError, RequestError, UnauthenticatedError
from flight_server.wire.reads import HistoricalRequest, OnlineRequest

log = logging.getLogger(__name__)

READ, WRITE, ADMIN = "read", "write", "admin"

PERMISSIONS = (READ, WRITE, ADMIN)

MIDDLEWARE_KEY = "auth"

ENV_TOKENS = "FLIGHT_SERVER_AUTH_TOKENS"

LOGIN_FAILURES = 5  # failed password logins a user name may have within LOGIN_WINDOW_SECONDS

LOGIN_WINDOW_SECONDS = 60.0

LOGIN_NAMES = 10_000  # user names whose failures are remembered; past it, the least recent is forgotten

# What each RPC needs before its body is read; do_action depends on the action (its row in transport/actions.py).
_METHOD_PERMISSIONS = {
    flight.FlightMethod.DO_PUT: WRITE,
    flight.FlightMethod.DO_GET: READ,
    flight.FlightMethod.DO_EXCHANGE: READ,
    flight.FlightMethod.GET_FLIGHT_INFO: READ,
    flight.FlightMethod.GET_SCHEMA: READ,
    flight.FlightMethod.LIST_FLIGHTS: READ,
    flight.FlightMethod.LIST_ACTIONS: READ,
}


@dataclass(frozen=True)
class Principal:
    """The caller as its token describes it; `namespaces` None means every namespace."""

    name: str
    permissions: frozenset[str]
    namespaces: frozenset[str] | None = None

    def require(self, permission: str, what: str) -> None:
        if permission not in self.permissions:
            raise PermissionDeniedError(
                f"token {self.name!r} lacks the {permission!r} permission that {what} needs "
                f"(it has: {sorted(self.permissions) or 'none'})"
            )

    def may_use(self, namespace: str) -> bool:
        return self.namespaces is None or namespace in self.namespaces

    def check_tables(self, catalog: FeatureCatalog, tables: Iterable[str]) -> None:
        """Refuse tables outside the token's namespaces, whether they exist or not (so nothing leaks)."""
        if self.namespaces is None:
            return
        for table in tables:
            namespace = ".".join(catalog.identifier(table)[:-1])
            if not self.may_use(namespace):
                raise PermissionDeniedError(
                    f"token {self.name!r} may not use namespace {namespace!r} "
                    f"(it may use: {sorted(self.namespaces or [])})"
                )


EVERYONE = Principal("anonymous", frozenset(PERMISSIONS))


def request_tables(request: Any) -> list[str]:
    """Every table a request reads, writes or names: its `table`, or its features' (and entity) tables and the
    tables it pins (a pin of a table outside the caller's namespaces is refused like a read of it); none for a
    request that names no table (`health`'s)."""
    if not isinstance(request, (HistoricalRequest, OnlineRequest)):
        table = getattr(request, "table", None)
        return [table] if table is not None else []
    tables = [ref.rpartition(":")[0] for ref in request.features]
    if isinstance(request, HistoricalRequest):
        if request.entities is not None and request.entities.table:
            tables.append(request.entities.table)
        tables += list(request.snapshot_ids or {})
    return tables


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenStore:
    """The configured tokens; `authenticate` compares a presented token with each in constant time."""

    def __init__(self, entries: list[dict[str, Any]]):
        if not entries:
            raise ValueError("authentication needs at least one token")
        self._tokens: list[tuple[bytes, Principal]] = []
        self._logins: list[tuple[bytes, str]] = []  # digest of "name:password", the token it is exchanged for
        names = set()
        for i, entry in enumerate(entries):
            principal, token = _parse_entry(entry, i)
            if principal.name in names:
                raise ValueError(f"auth token #{i + 1}: name {principal.name!r} is used twice")
            names.add(principal.name)
            self._tokens.append((_digest(token), principal))
            if "password" in entry:
                self._logins.append((_digest(f"{principal.name}:{entry['password']}"), token))

    @property
    def count(self) -> int:
        return len(self._tokens)

    @property
    def logins(self) -> bool:
        """Whether any token can be had with a user name and password."""
        return bool(self._logins)

    def exchange(self, name: str, password: str) -> str | None:
        """The token a user name and password log in to, compared in constant time like tokens."""
        presented = _digest(f"{name}:{password}")
        found = None
        for digest, token in self._logins:
            if hmac.compare_digest(presented, digest):
                found = token
        return found

    def authenticate(self, token: str) -> Principal | None:
        presented = _digest(token)
        found = None
        for digest, principal in self._tokens:  # no early exit: the time taken says nothing about which matched
            if hmac.compare_digest(presented, digest):
                found = principal
        return found


def _parse_entry(entry: Any, index: int) -> tuple[Principal, str]:
    where = f"auth token #{index + 1}"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected a mapping with name, token, permissions and optional namespaces")
    unknown = sorted(set(entry) - {"name", "token", "permissions", "namespaces", "password"})
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}")
    name, token = entry.get("name"), entry.get("token")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: 'name' must be a non-empty string (it names the token in logs)")
    if not isinstance(token, str) or len(token) < 16:
        raise ValueError(f"{where} ({name}): 'token' must be a string of at least 16 characters")
    password = entry.get("password")
    if password is not None and (not isinstance(password, str) or len(password) < 12):
        raise ValueError(f"{where} ({name}): 'password' must be a string of at least 12 characters")
    permissions = entry.get("permissions")
    if not isinstance(permissions, list) or not permissions or not set(permissions) <= set(PERMISSIONS):
        raise ValueError(f"{where} ({name}): 'permissions' must be a non-empty list of {list(PERMISSIONS)}")
    namespaces = entry.get("namespaces")
    if namespaces is not None and not (isinstance(namespaces, list) and all(isinstance(n, str) for n in namespaces)):
        raise ValueError(f"{where} ({name}): 'namespaces' must be a list of namespace names")
    return Principal(name, frozenset(permissions), None if namespaces is None else frozenset(namespaces)), token


def parse_tokens(text: str, source: str) -> list[dict[str, Any]]:
    """Token entries from JSON or YAML text: a list of {name, token, permissions, namespaces}."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        import strictyaml  # pyiceberg's YAML reader, always installed with it

        try:
            data = strictyaml.load(text).data
        except strictyaml.YAMLError:
            # The parser's message quotes the text, which holds the tokens.
            raise ValueError(
                f"{source} is neither JSON nor YAML (block style only: one '- item' per line, no [a, b])"
            ) from None
    if not isinstance(data, list):
        raise ValueError(f"{source}: expected a list of tokens")
    return data


def load_tokens(path: str | None, environ: Mapping[str, str] = os.environ) -> list[dict[str, Any]]:
    """Token entries from `--auth-tokens-file` and the FLIGHT_SERVER_AUTH_TOKENS variable (JSON or YAML)."""
    entries = parse_tokens(Path(path).read_text(), path) if path else []
    if environ.get(ENV_TOKENS):
        entries += parse_tokens(environ[ENV_TOKENS], ENV_TOKENS)
    return entries


class TokenSource:
    """The tokens in force: those of `--auth-tokens-file` are read again when the file changes (its
    modification time, size or inode, checked at most once a second, or at once on `reload`), so
    operators rotate tokens without a restart. A file that no longer parses leaves the previous tokens."""

    CHECK_SECONDS = 1.0

    def __init__(self, entries: list[dict[str, Any]], path: str | None = None):
        self.path = path
        self.store = TokenStore(entries)
        self._stamp = self._stat()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def _stat(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def current(self) -> TokenStore:
        """The tokens to check a call against, re-read first if the file changed since the last check."""
        if self.path is not None and time.monotonic() - self._checked >= self.CHECK_SECONDS:
            self.reload(force=False)
        return self.store

    def reload(self, force: bool = True) -> None:
        """Read the file again (unless `force` is off and it has not changed); log the outcome, never a token."""
        if self.path is None:
            return
        with self._lock:
            self._checked = time.monotonic()
            stamp = self._stat()
            if not force and stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                store = TokenStore(load_tokens(self.path))
            except (OSError, ValueError) as exc:
                log.error("%s not reloaded, the previous tokens stay in force: %s", self.path, exc)
                return
            self.store = store
            log.info("%s reloaded: %d token(s)", self.path, store.count)


class LoginThrottle:
    """Failed password logins per user name: after `failures` within `window` seconds, the name's logins
    (the right password's too) are refused until the oldest of them is `window` seconds old, so a
    password is guessed at `failures` tries a minute at most. Each attempt counts as failed until it
    succeeds, so guesses sent at once are bounded too. By name only: pyarrow shows the handshake's
    middleware the headers, not the peer's address."""

    def __init__(
        self,
        failures: int = LOGIN_FAILURES,
        window: float = LOGIN_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.failures = failures
        self.window = window
        self.clock = clock
        self._failed: OrderedDict[str, deque[float]] = OrderedDict()  # by name, least recently failed first
        self._lock = threading.Lock()

    def attempt(self, name: str) -> float:
        """Count a login of `name` as failed, or raise `LimitError` when it has failed too often; the
        returned stamp is what `succeeded` takes back."""
        now = self.clock()
        with self._lock:
            stamps = self._failed.setdefault(name, deque())
            while stamps and stamps[0] <= now - self.window:
                stamps.popleft()
            if len(stamps) >= self.failures:
                wait = max(1, math.ceil(stamps[0] + self.window - now))
                raise LimitError(f"too many failed logins for {name!r}; retry in {wait} s")
            stamps.append(now)
            self._failed.move_to_end(name)
            if len(self._failed) > LOGIN_NAMES:
                self._failed.popitem(last=False)
        return now

    def succeeded(self, name: str, stamp: float) -> None:
        with self._lock:
            stamps = self._failed.get(name)
            if stamps is not None and stamp in stamps:
                stamps.remove(stamp)
                if not stamps:
                    del self._failed[name]


class AuthMiddleware(flight.ServerMiddleware):
    """Carries the caller's `Principal` into the handlers (`context.get_middleware("auth")`)."""

    def __init__(self, principal: Principal):
        self.principal = principal


class _Issued(flight.ServerMiddleware):
    """Answers a basic-authentication handshake with the bearer token it logged in to."""

    def __init__(self, token: str):
        self._token = token

    def sending_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self._token}"}


class _Handshake(flight.ServerAuthHandler):
    """Lets the handshake through (the middleware checks its credentials) and leaves calls to the middleware."""

    def authenticate(self, outgoing: flight.ServerAuthSender, incoming: flight.ServerAuthReader) -> None:
        return None

    def is_valid(self, token: bytes) -> str:
        return ""


class AuthMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Rejects calls without a valid bearer token, or whose token lacks the RPC's permission."""

    def __init__(self, tokens: TokenSource):
        self.tokens = tokens
        self.logins = LoginThrottle()

    def server_options(self) -> dict[str, Any]:
        """`FlightServerBase` arguments: the handshake, when tokens have passwords (or a reload may add some)."""
        return {"auth_handler": _Handshake()} if self.tokens.store.logins or self.tokens.path else {}

    def caller_name(self, headers: dict[str, list[str]]) -> str:
        """The name of the token a call presents (start_call has checked it): what per-caller limits count."""
        scheme, _, token = str((headers.get("authorization") or [""])[0]).partition(" ")
        found = self.tokens.current().authenticate(token.strip()) if scheme.lower() == "bearer" else None
        return found.name if found is not None else EVERYONE.name

    def start_call(self, info: flight.CallInfo, headers: dict[str, list[str]]) -> flight.ServerMiddleware | None:
        try:
            if info.method == flight.FlightMethod.HANDSHAKE:
                return self._login(headers)
            return AuthMiddleware(self._caller(info, headers))
        except RequestError as exc:  # the reason only: never the credentials
            log.info("%s refused: %s", info.method.name.lower(), exc)
            refused(exc)
            raise to_flight_error(exc) from None  # middleware must raise a Flight error to set the status

    def _caller(self, info: flight.CallInfo, headers: dict[str, list[str]]) -> Principal:
        values = headers.get("authorization") or []
        if not values:
            raise UnauthenticatedError(
                "this server requires a bearer token: send the header 'authorization: Bearer <token>'"
            )
        scheme, _, token = str(values[0]).partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthenticatedError("the authorization header must be 'Bearer <token>'")
        principal = self.tokens.current().authenticate(token.strip())
        if principal is None:
            raise UnauthenticatedError("the bearer token is not valid")
        permission = _METHOD_PERMISSIONS.get(info.method)
        if permission is not None:
            principal.require(permission, info.method.name.lower())
        return principal

    def _login(self, headers: dict[str, list[str]]) -> _Issued | None:
        """Basic authentication (`FlightClient.authenticate_basic_token`): the token for a name and password."""
        scheme, _, credentials = str((headers.get("authorization") or [""])[0]).partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            name, _, password = base64.b64decode(credentials, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise UnauthenticatedError("the basic credentials are not base64 of 'name:password'") from None
        stamp = self.logins.attempt(name)  # a LimitError once the name has failed too often
        token = self.tokens.current().exchange(name, password)
        if token is None:
            raise UnauthenticatedError("wrong user name or password")
        self.logins.succeeded(name, stamp)
        return _Issued(token)


def principal(context: flight.ServerCallContext) -> Principal:
    """The caller of this RPC; everyone may do everything when authentication is off."""
    middleware = context.get_middleware(MIDDLEWARE_KEY)
    return middleware.principal if middleware is not None else EVERYONE
