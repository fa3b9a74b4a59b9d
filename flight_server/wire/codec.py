"""The wire protocol: JSON tickets, descriptors and action bodies, versioned.

Both the server and `flight_client` build and parse requests here, so the two can never
disagree about a field. `docs/protocol.md` describes the same format for clients written in
other languages.
"""

from __future__ import annotations

import builtins
import datetime as dt
import json
import re
from collections.abc import Sequence
from dataclasses import Field, asdict
from typing import Any, ClassVar, TypeVar

from flight_server.wire.errors import ProtocolError, RequestTooLargeError, UnknownFieldsError

PROTOCOL_VERSION = 1

MAX_REQUEST_BYTES = 1 << 20

# A `do_exchange` online lookup kept open between lookups carries this header (value "1"): it waits on
# its client by design, so it holds no slot of the concurrency limits and the idle timeout spares it.
ONLINE_SESSION_HEADER = "x-online-session"

# A call's request id, which tags the server's log lines of it: sent by the client, or else made by the server
# (which returns it in this response header either way).
REQUEST_ID_HEADER = "x-request-id"

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

_INTEGER = re.compile(r"^-?[0-9]{1,19}$")

_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z_][A-Za-z0-9_\-]*)*$")


def parse_table_name(name: Any, default_namespace: str = "default") -> tuple[str, ...]:
    """Split `ns.table` (or `table`, which lands in the default namespace) into an identifier."""
    if not isinstance(name, str) or not _TABLE_NAME.match(name):
        raise ProtocolError(f"invalid table name {name!r}: use 'namespace.table' with letters, digits, '_' or '-'")
    parts = tuple(name.split("."))
    return parts if len(parts) > 1 else (default_namespace, parts[0])


def parse_timestamp(value: Any, what: str) -> dt.datetime:
    """An ISO-8601 string or epoch milliseconds, as an aware UTC datetime (naive means UTC)."""
    if isinstance(value, bool):
        raise ProtocolError(f"{what} must be an ISO-8601 timestamp or epoch milliseconds, got {value!r}")
    if isinstance(value, (int, float)):
        try:
            return dt.datetime.fromtimestamp(value / 1000, tz=dt.timezone.utc)
        except (OverflowError, ValueError, OSError):
            raise ProtocolError(f"{what} is out of range (years 1 to 9999): {value!r} epoch milliseconds") from None
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ProtocolError(f"{what} is not an ISO-8601 timestamp: {value!r}") from None
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=dt.timezone.utc)
        try:  # in UTC now: an offset can carry a time past year 9999 (or before year 1)
            return parsed.astimezone(dt.timezone.utc)
        except OverflowError:
            raise ProtocolError(f"{what} is out of range (years 1 to 9999 in UTC): {value!r}") from None
    raise ProtocolError(f"{what} must be an ISO-8601 timestamp or epoch milliseconds, got {value!r}")


def parse_snapshot_id(value: Any, what: str) -> int:
    """A snapshot id as a request may send it: a 64-bit integer, as a JSON number or a string of decimal digits.

    Iceberg's snapshot ids use all 63 bits, and JSON decoders that read numbers as doubles (JavaScript, jq, Go's
    generic decoding) round them; a string keeps every digit."""
    if isinstance(value, str) and _INTEGER.match(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not INT64_MIN <= value <= INT64_MAX:
        raise ProtocolError(f"{what} must be a snapshot id (a 64-bit integer, as a number or a string), got {value!r}")
    return value


def decode_text(raw: bytes, what: str) -> str:
    """Request bytes that hold text (list_flights criteria) as a string."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8 text") from None


def format_timestamp(value: dt.datetime) -> str:
    """ISO-8601 in UTC, the form the protocol sends."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).isoformat()


def decode(raw: bytes, what: str, limit: int = MAX_REQUEST_BYTES) -> dict[str, Any]:
    """Parse a JSON request body, checking size (at most `limit` bytes), shape and protocol version."""
    if len(raw) > limit:
        raise RequestTooLargeError(
            f"{what} is {len(raw)} bytes; this server accepts at most {limit} bytes inline: "
            "stream entity rows with do_exchange instead"
        )
    if not raw:
        raise ProtocolError(f"{what} is empty: expected a JSON object")
    try:
        body = json.loads(raw)
    except ValueError as exc:  # not UTF-8, not JSON, or a number of thousands of digits
        raise ProtocolError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError(f"{what} nests arrays or objects too deeply") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(body).__name__}")
    version = body.get("v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"{what} has protocol version {version!r}; this server speaks {PROTOCOL_VERSION}")
    return body


def encode(body: dict[str, Any]) -> bytes:
    """Serialise a request or reply, dropping unset optional fields."""
    fields = {k: v for k, v in body.items() if v is not None}
    return json.dumps({"v": PROTOCOL_VERSION, **fields}, default=_scalar).encode()


def _scalar(value: Any) -> Any:
    """A NumPy scalar (an int taken from a DataFrame: a limit, a snapshot id, a TTL) as the Python value it holds."""
    plain = unwrapped(value)
    if plain is value:
        raise TypeError(f"a request cannot hold a {type(value).__name__}: {value!r}")
    return plain


def unwrapped(value: Any) -> Any:
    """A NumPy scalar as the Python value it holds, times finer than microseconds first cut to them (`.item()`
    gives those as integer nanoseconds); any other value as it is. NumPy is not imported: the client needs only
    pyarrow."""
    if type(value).__module__ != "numpy":
        return value
    kind = value.dtype.name  # datetime64[ns] and the like
    if kind.endswith(("[ns]", "[ps]", "[fs]", "[as]")):
        value = value.astype(kind.split("[")[0] + "[us]")
    return value.item()


ReplyT = TypeVar("ReplyT", bound="Reply")


class Reply:
    """Base of the server's replies (dataclasses), all serialised alike: a JSON object with every field (null
    when unset) and, unlike requests, no protocol version: the request it answers carried that."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    def to_bytes(self) -> bytes:
        return encode_reply(self)

    @classmethod
    def from_bytes(cls: type[ReplyT], raw: bytes) -> ReplyT:
        """The reply, without the fields this release does not know: replies may grow (docs/protocol.md,
        "Compatibility"), and a client must read a newer server's."""
        body = decode_reply(raw)
        return cls(**{name: value for name, value in body.items() if name in cls.__dataclass_fields__})


def encode_reply(reply: Reply | Sequence[Reply]) -> bytes:
    """One reply, or a list of them (`list_tables`), as the JSON message the client reads."""
    value = asdict(reply) if isinstance(reply, Reply) else [asdict(r) for r in reply]
    return json.dumps(value).encode()


def decode_reply(raw: bytes) -> Any:
    """A reply as plain JSON values (objects as dicts): what `flight_client` hands its callers."""
    return json.loads(raw)


# Fields every request may carry: the protocol version and the request's kind (`decode`, docs/protocol.md).
COMMON_FIELDS = frozenset({"v", "kind"})


class Fields:
    """Typed access to a request's fields, with errors that name the field."""

    def __init__(self, body: dict[str, Any], what: str, allowed: set[str]):
        unknown = sorted(set(body) - allowed - COMMON_FIELDS)
        if unknown:
            own = sorted(allowed - COMMON_FIELDS)
            raise UnknownFieldsError(
                f"{what}: unknown field(s) {unknown}; allowed: {own}, and in every request {sorted(COMMON_FIELDS)}"
            )
        self.body, self.what = body, what

    def _bad(self, name: str, expected: str) -> ProtocolError:
        return ProtocolError(f"{self.what}: field {name!r} must be {expected}, got {self.body[name]!r}")

    def str(self, name: str, required: bool = False) -> str | None:
        value = self.body.get(name)
        if value is None:
            if required:
                raise ProtocolError(f"{self.what}: field {name!r} is required")
            return None
        if not isinstance(value, str) or not value:
            raise self._bad(name, "a non-empty string")
        return value

    def required_str(self, name: builtins.str) -> builtins.str:
        """A field that must be given, as a non-empty string."""
        value = self.str(name, required=True)
        assert value is not None  # str() raises for a missing required field
        return value

    def int(self, name: builtins.str, minimum: builtins.int = 0) -> builtins.int | None:
        """A 64-bit integer (what the server stores and computes with) of at least `minimum`."""
        value = self.body.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._bad(name, f"an integer >= {minimum}")
        if value > INT64_MAX:
            raise self._bad(name, f"an integer <= {INT64_MAX}")
        return value

    def snapshot_id(self, name: builtins.str) -> builtins.int | None:
        """A snapshot id: a JSON number, or a string of digits for clients whose JSON numbers are doubles."""
        value = self.body.get(name)
        return None if value is None else parse_snapshot_id(value, f"{self.what}: field {name!r}")

    def bool(self, name: builtins.str) -> bool:
        value = self.body.get(name, False)
        if not isinstance(value, bool):
            raise self._bad(name, "true or false")
        return value

    def choice(self, name: builtins.str, choices: tuple[builtins.str, ...]) -> builtins.str | None:
        """One of `choices`, or None when the field is absent."""
        value = self.body.get(name)
        if value is not None and value not in choices:
            raise self._bad(name, f"one of {list(choices)}")
        return value

    def str_list(self, name: builtins.str) -> list[builtins.str] | None:
        value = self.body.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self._bad(name, "a list of non-empty strings")
        if len(set(value)) != len(value):
            raise self._bad(name, "a list without duplicates")
        return value

    def part(self, name: builtins.str) -> list[builtins.int] | None:
        """`[index, count]`: one of `count` endpoint shares of a result."""
        value = self.body.get(name)
        if value is None:
            return None
        if not (
            isinstance(value, list)
            and len(value) == 2
            and all(type(v) is int for v in value)
            and 0 <= value[0] < value[1]
        ):
            raise self._bad(name, "[index, count] with 0 <= index < count")
        return value
