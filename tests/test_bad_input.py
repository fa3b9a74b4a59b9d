"""Every client mistake gets a Flight error naming the problem, and the server keeps serving."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_client import FeatureClient, FeatureServerError, InvalidRequestError, NotFoundError, ResourceExhaustedError
from flight_client.errors import from_flight_error
from flight_server.wire.writes import WriteRequest, end_marker
from tests.test_roundtrip import features, write


def raw_get(client: FeatureClient, ticket: bytes) -> None:
    client._client.do_get(flight.Ticket(ticket)).read_all()


def raw_put(client: FeatureClient, command: bytes, data: pa.Table) -> None:
    writer, _ = client._client.do_put(flight.FlightDescriptor.for_command(command), data.schema)
    writer.write_table(data)
    writer.close()


def unbegun_exchange(client: FeatureClient, command: bytes) -> None:
    """A `do_exchange` the client ends without ever sending a schema."""
    writer, reader = client._client.do_exchange(flight.FlightDescriptor.for_command(command))
    writer.done_writing()
    try:
        reader.read_all()
    finally:
        with contextlib.suppress(flight.FlightError, pa.ArrowException):
            writer.close()  # reports the same error again


def marked_exchange(client: FeatureClient, command: bytes, marker: bytes | None) -> None:
    """A `do_exchange` of two entity rows (keys and `ts`) whose request promises the end-of-stream marker, ended
    with `marker` (None: with a half-close instead)."""
    rows = pa.table({"user_id": [1, 2], "region": ["r1", "r2"], "ts": pa.array([0, 0], pa.timestamp("us", "UTC"))})
    if json.loads(command)["kind"] == "online":
        rows = rows.drop_columns(["ts"])
    writer, reader = client._client.do_exchange(flight.FlightDescriptor.for_command(command))
    writer.begin(rows.schema)
    writer.write_table(rows)
    if marker is None:
        writer.done_writing()
    else:
        writer.write_metadata(pa.py_buffer(marker))
    try:
        reader.read_all()
    finally:
        with contextlib.suppress(flight.FlightError, pa.ArrowException):
            writer.close()  # reports the same error again


def ticket(**body: object) -> bytes:
    return json.dumps({"v": 1, "kind": "scan", **body}).encode()


Case = Callable[[FeatureClient, str], object]
CASES: dict[str, tuple[Case, type[FeatureServerError], str]] = {
    "unknown table": (lambda c, t: c.scan("tests.no_such_table"), NotFoundError, "does not exist"),
    "unknown column": (lambda c, t: c.scan(t, columns=["nope"]), NotFoundError, r"no column\(s\) \['nope'\]"),
    "no columns": (
        lambda c, t: c.scan(t, columns=[]),
        InvalidRequestError,
        "columns: give at least one column, or leave it out for all",
    ),
    "malformed json": (lambda c, t: raw_get(c, b"{not json"), InvalidRequestError, "not valid JSON"),
    "ticket not an object": (lambda c, t: raw_get(c, b"[1, 2]"), InvalidRequestError, "must be a JSON object"),
    "empty ticket": (lambda c, t: raw_get(c, b""), InvalidRequestError, "empty"),
    "wrong protocol version": (
        lambda c, t: raw_get(c, json.dumps({"v": 99, "table": t}).encode()),
        InvalidRequestError,
        "protocol version 99",
    ),
    "unknown ticket kind": (
        lambda c, t: raw_get(c, ticket(kind="teleport", table=t)),
        InvalidRequestError,
        "unknown kind 'teleport'",
    ),
    "unknown field": (
        lambda c, t: raw_get(c, ticket(table=t, colums=["a"])),
        InvalidRequestError,
        r"unknown field\(s\) \['colums'\]; allowed: \['as_of', .*'table'.*\], and in every request \['kind', 'v'\]",
    ),
    "wrong type": (
        lambda c, t: raw_get(c, ticket(table=t, limit="ten")),
        InvalidRequestError,
        "'limit' must be an integer",
    ),
    "negative limit": (lambda c, t: c.scan(t, limit=-1), InvalidRequestError, "'limit' must be an integer >= 0"),
    "zero partitions": (
        lambda c, t: c.flight_info(t, partitions=0),
        InvalidRequestError,
        "'partitions' must be an integer >= 1",
    ),
    "part out of range": (
        lambda c, t: raw_get(c, ticket(table=t, part=[2, 2])),
        InvalidRequestError,
        r"'part' must be \[index, count\] with 0 <= index < count, got \[2, 2\]",
    ),
    "part not a pair": (
        lambda c, t: raw_get(c, ticket(table=t, part=[0])),
        InvalidRequestError,
        r"'part' must be \[index, count\]",
    ),
    "negative part": (
        lambda c, t: raw_get(c, ticket(table=t, part=[-1, 2])),
        InvalidRequestError,
        r"'part' must be \[index, count\]",
    ),
    "part and partitions": (
        lambda c, t: raw_get(c, ticket(table=t, part=[0, 2], partitions=2)),
        InvalidRequestError,
        "'partitions' asks get_flight_info for endpoints and 'part' names one of them: not both",
    ),
    "part of a filtered scan": (
        lambda c, t: raw_get(c, ticket(table=t, filter="user_id < 5", part=[0, 2])),
        InvalidRequestError,
        "cannot be read in parts",
    ),
    "part asked of get_flight_info": (
        lambda c, t: c._client.get_flight_info(flight.FlightDescriptor.for_command(ticket(table=t, part=[0, 2]))),
        InvalidRequestError,
        "'part' is for tickets",
    ),
    "unparseable filter": (lambda c, t: c.scan(t, filter="user_id >"), InvalidRequestError, "cannot parse filter"),
    "filter on unknown column": (lambda c, t: c.scan(t, filter="nope = 1"), NotFoundError, "nope"),
    "filter with wrong literal type": (
        lambda c, t: c.scan(t, filter="user_id = 'abc'"),
        InvalidRequestError,
        "Could not convert abc into a long",
    ),
    "snapshot and as_of": (
        lambda c, t: c.scan(t, snapshot_id=1, as_of="2025-01-01T00:00:00"),
        InvalidRequestError,
        "either 'snapshot_id' or 'as_of'",
    ),
    "unknown snapshot": (lambda c, t: c.scan(t, snapshot_id=12345), NotFoundError, "no snapshot 12345"),
    "bad as_of": (lambda c, t: c.scan(t, as_of="yesterday"), InvalidRequestError, "not an ISO-8601 timestamp"),
    "as_of before the table": (
        lambda c, t: c.scan(t, as_of="1999-01-01T00:00:00"),
        NotFoundError,
        "no snapshot at or before 1999",
    ),
    "invalid table name": (lambda c, t: c.scan("bad name; drop table"), InvalidRequestError, "invalid table name"),
    "oversized ticket": (
        lambda c, t: raw_get(c, ticket(table=t, filter="x" * (2 << 20))),
        ResourceExhaustedError,
        "accepts at most 1048576 bytes inline",
    ),
    "unknown mode": (
        lambda c, t: write(c, t, features(3), mode="upsert"),
        InvalidRequestError,
        "unknown mode 'upsert'",
    ),
    "empty stream": (lambda c, t: write(c, t, features(3).slice(0, 0)), InvalidRequestError, "stream is empty"),
    "mistyped column": (
        lambda c, t: write(c, t, features(3).set_column(3, "i32", pa.array(["a", "b", "c"]))),
        InvalidRequestError,
        "column 'i32' has type string but the table stores int32",
    ),
    "unknown column in write": (
        lambda c, t: write(c, t, features(3, extra={"zzz": pa.array([1, 2, 3])})),
        InvalidRequestError,
        "evolve",
    ),
    "missing key column": (
        lambda c, t: c.write(t, features(3).drop_columns(["region"])),
        InvalidRequestError,
        "required column 'region' is missing",
    ),
    "null in key": (
        lambda c, t: write(c, t, features(3).set_column(0, "user_id", pa.array([1, None, 3]))),
        InvalidRequestError,
        "'user_id' is required but has 1 null",
    ),
    "new table without keys": (
        lambda c, t: c.write(t + "_new", features(3)),
        InvalidRequestError,
        "name its entity_keys and event_time",
    ),
    "key not in stream": (
        lambda c, t: c.write(t + "_new", features(3), entity_keys=["uid"], event_time="ts"),
        InvalidRequestError,
        "'uid' named as a key",
    ),
    "event time not a timestamp": (
        lambda c, t: c.write(t + "_new", features(3), entity_keys=["user_id"], event_time="f64"),
        InvalidRequestError,
        "must be a timestamp",
    ),
    "contradicting keys": (
        lambda c, t: c.write(t, features(3), entity_keys=["user_id"], event_time="ts"),
        InvalidRequestError,
        "has entity_keys=\\('user_id', 'region'\\)",
    ),
    "bad partition transform": (
        lambda c, t: c.write(
            t + "_new", features(3), entity_keys=["user_id"], event_time="ts", partition_by=["weekly(ts)"]
        ),
        InvalidRequestError,
        "unknown transform",
    ),
    "put with path descriptor": (
        lambda c, t: c._client.do_put(flight.FlightDescriptor.for_path(t), features(3).schema)[0].close(),
        InvalidRequestError,
        "needs a command descriptor",
    ),
    "bad end marker": (
        lambda c, t: _put_with_metadata(c, t, b'{"hello": 1}'),
        InvalidRequestError,
        "expected the end-of-stream marker",
    ),
    "row count mismatch": (
        lambda c, t: _put_with_metadata(c, t, b'{"end_of_stream": true, "rows": 99}'),
        InvalidRequestError,
        "says it sent 99 rows but 3",
    ),
    "online unknown table": (
        lambda c, t: c.get_online_features({"user_id": [1], "region": ["r1"]}, ["tests.no_such_table:f64"]),
        NotFoundError,
        "does not exist",
    ),
    "online unknown feature": (
        lambda c, t: c.get_online_features({"user_id": [1], "region": ["r1"]}, [f"{t}:nope"]),
        NotFoundError,
        "has no column 'nope'",
    ),
    "online malformed feature": (
        lambda c, t: c.get_online_features({"user_id": [1], "region": ["r1"]}, ["f64"]),
        InvalidRequestError,
        "not of the form 'table:feature'",
    ),
    "online missing key column": (
        lambda c, t: c.get_online_features({"user_id": [1]}, [f"{t}:f64"]),
        InvalidRequestError,
        r"lack key column\(s\) \['region'\]",
    ),
    "online extra key column": (
        lambda c, t: c.get_online_features({"user_id": [1], "region": ["r1"], "zone": [2]}, [f"{t}:f64"]),
        InvalidRequestError,
        r"\['zone'\] are not keys",
    ),
    "online stream without a schema": (
        lambda c, t: unbegun_exchange(c, ticket(kind="online", features=[f"{t}:f64"])),
        InvalidRequestError,
        "the entity key stream ended before its schema",
    ),
    "training-set stream without a schema": (
        lambda c, t: unbegun_exchange(c, ticket(kind="historical", features=[f"{t}:f64"], entity_time="ts")),
        InvalidRequestError,
        "the entity row stream ended before its schema",
    ),
    "training-set marker with the wrong row count": (
        lambda c, t: marked_exchange(
            c, ticket(kind="historical", features=[f"{t}:f64"], entity_time="ts", end_marker=True), end_marker(3)
        ),
        InvalidRequestError,
        "the client says it sent 3 entity rows but 2 arrived",
    ),
    "training-set stream without its promised marker": (
        lambda c, t: marked_exchange(
            c, ticket(kind="historical", features=[f"{t}:f64"], entity_time="ts", end_marker=True), None
        ),
        InvalidRequestError,
        "the entity stream ended after 2 rows without its end-of-stream marker",
    ),
    "online stream with a malformed marker": (
        lambda c, t: marked_exchange(c, ticket(kind="online", features=[f"{t}:f64"], end_marker=True), b"{}"),
        InvalidRequestError,
        "entity key stream: unexpected app metadata {}; expected the end-of-stream marker",
    ),
    "online wrong key type": (  # over a session (a stream kept open)
        lambda c, t: c.get_online_features({"user_id": ["one"], "region": ["r1"]}, [f"{t}:f64"]),
        InvalidRequestError,
        "entity column 'user_id' is string; the tables key it as int64",
    ),
    "online wrong key type in a ticket": (  # a request time sends the keys inline with do_get
        lambda c, t: c.get_online_features(
            {"user_id": ["one"], "region": ["r1"]}, [f"{t}:f64"], request_time="2025-01-01T00:00:00Z"
        ),
        InvalidRequestError,
        "'user_id' is int64: expected int values, got 'one'",
    ),
    "online mixed key types": (  # Arrow cannot type them: sent inline, where the server says what is wrong
        lambda c, t: c.get_online_features({"user_id": [1, "one"], "region": ["r1", "r1"]}, [f"{t}:f64"]),
        InvalidRequestError,
        "'user_id' is int64: expected int values, got 'one'",
    ),
    "online wrong key type streamed": (
        lambda c, t: c.get_online_features(  # more entities than go inline: streamed with do_exchange
            pa.table({"user_id": ["one"] * 10_001, "region": ["r1"] * 10_001}), [f"{t}:f64"]
        ),
        InvalidRequestError,
        "entity column 'user_id' is string; the tables key it as int64",
    ),
    "online too many keys inline": (
        lambda c, t: raw_get(
            c,
            ticket(kind="online", features=[f"{t}:f64"], entities={"user_id": [1] * 10_001, "region": ["r"] * 10_001}),
        ),
        InvalidRequestError,
        "more than 10000 entities inline; stream them with do_exchange",
    ),
    "online without entities": (
        lambda c, t: raw_get(c, ticket(kind="online", features=[f"{t}:f64"])),
        InvalidRequestError,
        "no 'entities'",
    ),
    "online bad apply_ttl": (
        lambda c, t: raw_get(c, ticket(kind="online", features=[f"{t}:f64"], entities={"user_id": [1]}, apply_ttl=1)),
        InvalidRequestError,
        "'apply_ttl' must be true or false",
    ),
    "delete in an unknown mode": (
        lambda c, t: c.delete(t, keys={"user_id": [1]}, mode="sideways"),
        InvalidRequestError,
        "unknown mode 'sideways'",
    ),
    "delete naming no rows": (lambda c, t: c.delete(t), InvalidRequestError, "name the rows to delete"),
    "delete by a column that is not a key": (
        lambda c, t: c.delete(t, keys={"name": ["x"]}),
        InvalidRequestError,
        r"\['name'\] are not entity keys",
    ),
    "delete a key of the wrong type": (
        lambda c, t: c.delete(t, keys={"user_id": ["one"]}),
        InvalidRequestError,
        "key column 'user_id' is int64",
    ),
    "delete a boolean key": (
        lambda c, t: c.delete(t, keys={"user_id": [True]}),
        InvalidRequestError,
        "key values must be integers, strings or null",
    ),
    "delete keys of unequal lengths": (
        lambda c, t: c.delete(t, keys={"user_id": [1, 2], "region": ["r1"]}),
        InvalidRequestError,
        "must have equal lengths",
    ),
    "delete with a bad filter": (lambda c, t: c.delete(t, filter="user_id >"), InvalidRequestError, "cannot parse"),
    "delete from an unknown table": (
        lambda c, t: c.delete("tests.no_such_table", filter="user_id = 1"),
        NotFoundError,
        "does not exist",
    ),
    "compact by a filter on an unknown column": (lambda c, t: c.compact(t, filter="nope = 1"), NotFoundError, "nope"),
    "expire keeping no snapshot": (
        lambda c, t: c.expire_snapshots(t, retain_last=0),
        InvalidRequestError,
        "'retain_last' must be an integer >= 1",
    ),
    "expire capping at no snapshot": (
        lambda c, t: c.expire_snapshots(t, max_snapshots=0),
        InvalidRequestError,
        "'max_snapshots' must be an integer >= 1",
    ),
    "expire capping at a string": (
        lambda c, t: c.expire_snapshots(t, max_snapshots="10"),  # type: ignore[arg-type]
        InvalidRequestError,
        "'max_snapshots' must be an integer >= 1",
    ),
    "expire before a bad time": (
        lambda c, t: c.expire_snapshots(t, older_than="soon"),
        InvalidRequestError,
        "not an ISO-8601 timestamp",
    ),
    "pin an unknown snapshot": (lambda c, t: c.pin(t, 12345), NotFoundError, "no snapshot 12345"),
    "pin named main": (lambda c, t: c.pin(t, name="main"), InvalidRequestError, "invalid pin name 'main'"),
    "unpin an unknown pin": (lambda c, t: c.unpin(t, "nope"), NotFoundError, "has no pin 'nope'"),
    "unknown action": (lambda c, t: c._action("explode"), InvalidRequestError, "unknown action 'explode'"),
    "describe without table": (
        lambda c, t: c._action("describe", {}),
        InvalidRequestError,
        "field 'table' is required",
    ),
    "health catalog not a bool": (
        lambda c, t: c._action("health", {"catalog": "no"}),
        InvalidRequestError,
        "health body: field 'catalog' must be true or false",
    ),
    "health unknown field": (
        lambda c, t: c._action("health", {"catlog": False}),
        InvalidRequestError,
        r"unknown field\(s\) \['catlog'\]; allowed: \['catalog'\], and in every request \['kind', 'v'\]",
    ),
    "deeply nested json": (
        lambda c, t: raw_get(c, b'{"v": 1, "table": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        InvalidRequestError,
        "nests arrays or objects too deeply",
    ),
    "number of thousands of digits": (
        lambda c, t: raw_get(c, b'{"v": 1, "limit": ' + b"9" * 5000 + b"}"),
        InvalidRequestError,
        "not valid JSON",
    ),
    "limit beyond 64 bits": (
        lambda c, t: raw_get(c, ticket(table=t, limit=10**30)),
        InvalidRequestError,
        "'limit' must be an integer <= 9223372036854775807",
    ),
    "as_of in epoch milliseconds far beyond year 9999": (
        lambda c, t: raw_get(c, ticket(table=t, as_of=10**20)),
        InvalidRequestError,
        "out of range",
    ),
    "as_of past year 9999 in UTC": (
        lambda c, t: raw_get(c, ticket(table=t, as_of="9999-12-31T23:00:00-05:00")),
        InvalidRequestError,
        "out of range",
    ),
    "snapshot id neither number nor digits": (
        lambda c, t: raw_get(c, ticket(table=t, snapshot_id="latest")),
        InvalidRequestError,
        r"'snapshot_id' must be a snapshot id \(a 64-bit integer, as a number or a string\)",
    ),
    "snapshot id as a string that names none": (
        lambda c, t: raw_get(c, ticket(table=t, snapshot_id="12345")),
        NotFoundError,
        "no snapshot 12345",
    ),
    "non-UTF-8 list_flights criteria": (
        lambda c, t: list(c._client.list_flights(b"\xff\xfe")),
        InvalidRequestError,
        "list_flights criteria is not UTF-8 text",
    ),
    "bucket of zero": (
        lambda c, t: c.write(
            t + "_new", features(3), entity_keys=["user_id"], event_time="ts", partition_by=["bucket(0, user_id)"]
        ),
        InvalidRequestError,
        r"'bucket\(0, user_id\)': N must be from 1 to 2147483647",
    ),
    "truncate too wide": (
        lambda c, t: c.write(
            t + "_new",
            features(3),
            entity_keys=["user_id"],
            event_time="ts",
            partition_by=["truncate(99999999999, name)"],
        ),
        InvalidRequestError,
        "N must be from 1 to 2147483647",
    ),
}

# What a plain pyarrow client raises for each kind: the gRPC status (docs/protocol.md, "Errors").
STATUS_CLASSES: dict[type[FeatureServerError], type[Exception]] = {
    InvalidRequestError: pa.ArrowInvalid,  # INVALID_ARGUMENT
    NotFoundError: pa.ArrowKeyError,  # NOT_FOUND
    ResourceExhaustedError: flight.FlightUnavailableError,  # UNAVAILABLE, RESOURCE_EXHAUSTED in the detail
}

# What an error message must never hold: a traceback, or a path on the server.
LEAKS = ("Traceback", "/work", '.py"', 'File "', "/tmp/")


def _put_with_metadata(c: FeatureClient, t: str, metadata: bytes) -> None:
    data = features(3)
    writer, _ = c._client.do_put(flight.FlightDescriptor.for_command(WriteRequest(table=t).to_bytes()), data.schema)
    writer.write_table(data)
    writer.write_metadata(pa.py_buffer(metadata))
    writer.close()


@pytest.fixture
def seeded(client: FeatureClient, table: str) -> str:
    write(client, table, features(20))
    return table


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_error(client: FeatureClient, seeded: str, case: str) -> None:
    action, error, message = CASES[case]
    before = client.describe(seeded)["current_snapshot_id"]
    with pytest.raises((error, flight.FlightError, pa.ArrowException)) as caught:
        action(client, seeded)
    exc = caught.value
    # What pyarrow raised: the gRPC status. FeatureClient raises its own class from it.
    raw = exc.__context__ if isinstance(exc, FeatureServerError) else exc
    assert type(raw) is STATUS_CLASSES[error], f"{type(raw).__name__}: {raw}"
    if not isinstance(exc, FeatureServerError):  # raised by the raw pyarrow client in a helper above
        exc = from_flight_error(exc)
    assert isinstance(exc, error), f"{type(exc).__name__}: {exc}"
    assert re.search(message, str(exc)), str(exc)
    assert not [leak for leak in LEAKS if leak in str(raw)], str(raw)
    # Nothing was committed, and the server still serves.
    assert client.describe(seeded)["current_snapshot_id"] == before
    assert client.scan(seeded).read_all().num_rows == 20


@pytest.mark.parametrize(
    "call",
    [
        lambda c, t: c._client.get_flight_info(flight.FlightDescriptor.for_path(b"\xff")),
        lambda c, t: list(c._client.do_action(flight.Action(b"\xff", b""))),
    ],
    ids=["descriptor path", "action type"],
)
def test_non_utf8_protobuf_strings_are_refused_by_grpc(client: FeatureClient, seeded: str, call: Case) -> None:
    """Paths and action types are protobuf strings: gRPC refuses a message with bytes that are not UTF-8 as
    INTERNAL before any server code runs (documented in docs/protocol.md). The server serves on."""
    with pytest.raises(flight.FlightInternalError):
        call(client, seeded)
    assert client.scan(seeded).read_all().num_rows == 20
