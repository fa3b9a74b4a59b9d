"""Action bodies on the wire: describe, delete, compact, expire, pin and unpin."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from flight_server.wire.codec import Fields, format_timestamp, parse_timestamp
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
        return cls(table=f.str("table", required=True))  # type: ignore[arg-type]


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
        request = cls(f.str("table", required=True), keys, f.str("filter"), mode)  # type: ignore[arg-type]
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
        return cls(f.str("table", required=True), f.str("filter"))  # type: ignore[arg-type]


@dataclass(frozen=True)
class ExpireRequest:
    """`expire_snapshots` action: forget snapshots older than `older_than` beyond the last `retain_last`,
    and delete the files only they used; pinned snapshots stay unless `force`."""

    table: str
    older_than: str | None = None
    retain_last: int | None = None
    force: bool = False

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ExpireRequest:
        f = Fields(body, "expire_snapshots request", {"table", "older_than", "retain_last", "force"})
        older_than = body.get("older_than")
        if older_than is not None:
            older_than = format_timestamp(parse_timestamp(older_than, "expire_snapshots request: 'older_than'"))
        return cls(
            f.str("table", required=True),  # type: ignore[arg-type]
            older_than,
            f.int("retain_last", minimum=1),
            f.bool("force"),
        )


def _pin_name(f: Fields, required: bool) -> str | None:
    name = f.str("name", required=required)
    if name is not None and (not _PIN_NAME.match(name) or name == "main"):
        raise ProtocolError(f"{f.what}: invalid pin name {name!r}: use letters, digits, '_', '-' or '.', not 'main'")
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
        return cls(
            f.str("table", required=True),  # type: ignore[arg-type]
            f.int("snapshot_id", minimum=-(1 << 63)),
            _pin_name(f, required=False),
        )


@dataclass(frozen=True)
class UnpinRequest:
    """`unpin` action: drop the pin (tag) `name`; the snapshot may then expire."""

    table: str
    name: str

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> UnpinRequest:
        f = Fields(body, "unpin request", {"table", "name"})
        return cls(f.str("table", required=True), _pin_name(f, required=True))  # type: ignore[arg-type]
