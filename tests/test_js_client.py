"""A client in another language, written from docs/protocol.md alone: tests/clients/feature_client.mjs, Node.js over
@grpc/grpc-js with Flight's service definition and FlightData framed by hand (there is no Arrow Flight client for
JavaScript), its batches read and written by apache-arrow, gets the answers the Python FeatureClient gets: listings and
actions, scans, get_flight_info and its endpoints, online lookups (inline, streamed, a session of several lookups),
a training set of entity rows built in JavaScript, a put retried with its write_id, a login, and the status of bad
requests. Its packages are installed by scripts/test.sh (`npm ci`), never at test time."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.ipc as ipc
import pytest

from flight_client import FeatureClient, FeatureServerError
from tests.conftest import sqlite_catalog, start_server
from tests.test_cpp_client import small_demo

CLIENTS = Path(__file__).parent / "clients"
SOURCE = CLIENTS / "feature_client.mjs"
ADMIN_TOKEN = "js-admin-" + uuid.uuid4().hex
READER_TOKEN = "js-reader-" + uuid.uuid4().hex
READER_PASSWORD = "password-" + uuid.uuid4().hex
TOKENS = [
    {"name": "ops", "token": ADMIN_TOKEN, "permissions": ["read", "write", "admin"]},
    {"name": "notebooks", "token": READER_TOKEN, "permissions": ["read"], "password": READER_PASSWORD},
]
MAX_REQUEST_BYTES = 4096  # small, so that a large inline request shows how a JS client sees RESOURCE_EXHAUSTED
DRIVERS = ["demo.driver_stats:conv_rate", "demo.driver_stats:acc_rate", "demo.driver_stats:avg_daily_trips"]
LATER = "2100-01-01T00:00:00Z"  # an entity time after every row


@pytest.fixture(scope="module")
def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.fail("node is needed to run tests/clients/feature_client.mjs (Debian: apt-get install nodejs npm)")
    if not (CLIENTS / "node_modules" / "apache-arrow").is_dir():
        pytest.fail("tests/clients has no node_modules: run scripts/test.sh, or `npm ci --prefix tests/clients`")
    return found


@pytest.fixture(scope="module")
def location(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server holding the demo tables that requires tokens and limits concurrent calls, as a production one."""
    server = start_server(
        sqlite_catalog(tmp_path_factory.mktemp("js-warehouse")),
        auth_tokens=TOKENS,
        max_concurrent_requests=32,
        max_request_bytes=MAX_REQUEST_BYTES,
    )
    here = f"grpc://127.0.0.1:{server.port}"
    with FeatureClient(here, token=ADMIN_TOKEN) as client:
        small_demo(client)
    yield here
    server.shutdown()


@pytest.fixture
def client(location: str) -> Iterator[FeatureClient]:
    with FeatureClient(location, token=ADMIN_TOKEN) as c:
        yield c


def run(node: str, location: str, tmp_path: Path, *steps: dict[str, Any], **plan: Any) -> list[dict[str, Any]]:
    """One node process for the steps; a line of JSON each. Its exit status says whether a step printed an error."""
    path = tmp_path / f"plan-{uuid.uuid4().hex[:8]}.json"
    path.write_text(json.dumps({"token": ADMIN_TOKEN, **plan, "steps": list(steps)}))
    done = subprocess.run([node, SOURCE, location, path], capture_output=True, text=True, timeout=60)
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == len(steps), done.stderr
    assert done.returncode == (1 if any("error" in line for line in lines) else 0), done.stderr
    return lines


def arrow_file(path: str | Path) -> pa.Table:
    with ipc.open_file(path) as reader:
        return reader.read_all()


def column(type_: str, values: list[Any]) -> dict[str, Any]:
    """An entity column for the JS client to build: int64, utf8, dictionary, float64, timestamp (ms, UTC) or null."""
    return {"type": type_, "values": values}


def test_listings_and_actions(node: str, location: str, client: FeatureClient, tmp_path: Path) -> None:
    actions, tables, described, health, flights = run(
        node, location, tmp_path,
        {"op": "list_actions"},
        {"op": "action", "type": "list_tables"},
        {"op": "action", "type": "describe", "body": {"v": 1, "table": "demo.driver_stats"}},
        {"op": "action", "type": "health"},
        {"op": "list_flights", "criteria": "demo."},
    )  # fmt: skip
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {ADMIN_TOKEN}".encode())])
    with flight.connect(location) as plain:
        python_actions = [{"type": a.type, "description": a.description} for a in plain.list_actions(options)]
        python_flights = list(plain.list_flights(b"demo.", options))
    assert actions["actions"] == python_actions
    assert tables["result"] == [client.tables()]  # 63-bit snapshot ids kept whole
    assert described["result"] == [client.describe("demo.driver_stats")]
    assert health["result"][0].keys() == client.health().keys()
    assert [f["path"] for f in flights["flights"]] == [f.descriptor.path[0].decode().split("/") for f in python_flights]
    assert [f["app_metadata"] for f in flights["flights"]] == [json.loads(f.app_metadata) for f in python_flights]
    assert [f["total_records"] for f in flights["flights"]] == [f.total_records for f in python_flights]
    assert [f["columns"] for f in flights["flights"]] == [f.schema.names for f in python_flights]
    assert [f["tickets"] for f in flights["flights"]] == [
        [json.loads(e.ticket.ticket) for e in f.endpoints] for f in python_flights
    ]


def test_scan_with_a_filter_and_columns(node: str, location: str, client: FeatureClient, tmp_path: Path) -> None:
    request = {"v": 1, "table": "demo.driver_stats", "columns": ["conv_rate", "driver_id", "event_timestamp"],
               "filter": "driver_id in (1001, 1002) and conv_rate >= 0.1"}  # fmt: skip
    (scan,) = run(node, location, tmp_path, {"op": "get", "request": request, "out": str(tmp_path / "scan.arrow")})
    rows = arrow_file(tmp_path / "scan.arrow")
    python = client.scan("demo.driver_stats", columns=request["columns"], filter=request["filter"]).read_all()
    assert rows.equals(python, check_metadata=True)
    assert scan["metadata"] == {k.decode(): v.decode() for k, v in python.schema.metadata.items()}

    # The snapshot id as the schema metadata gives it, text, sent back as a string: the same rows after a write.
    pinned = {**request, "snapshot_id": scan["metadata"]["flight.snapshot_id"]}
    later = pa.table({"driver_id": [5000], "event_timestamp": pa.array([0], pa.timestamp("us", "UTC"))})
    client.write("demo.driver_stats", later)  # a new snapshot, of a driver the other tests do not ask for
    (again,) = run(node, location, tmp_path, {"op": "get", "request": pinned, "out": str(tmp_path / "pinned.arrow")})
    assert arrow_file(tmp_path / "pinned.arrow").equals(rows, check_metadata=True)


def test_flight_info_and_its_endpoints(node: str, location: str, client: FeatureClient, tmp_path: Path) -> None:
    split, by_path = run(
        node, location, tmp_path,
        {"op": "read", "request": {"v": 1, "table": "demo.driver_stats", "partitions": 4},
         "out": str(tmp_path / "split.arrow")},
        {"op": "read", "path": ["demo.customer_profile"], "out": str(tmp_path / "path.arrow")},
    )  # fmt: skip
    info = client.flight_info("demo.driver_stats", partitions=4)
    python = client.read_table("demo.driver_stats", partitions=4)
    assert (split["endpoints"], split["total_records"]) == (len(info.endpoints), info.total_records)
    assert split["endpoints"] == 4
    assert split["app_metadata"] == json.loads(info.app_metadata)
    assert split["info_metadata"] == {k.decode(): v.decode() for k, v in info.schema.metadata.items()}
    assert split["get_schema"]["metadata"] == split["info_metadata"]
    order = [("driver_id", "ascending"), ("event_timestamp", "ascending")]
    assert arrow_file(tmp_path / "split.arrow").sort_by(order).equals(python.sort_by(order), check_metadata=True)

    assert by_path["endpoints"] == 1
    assert arrow_file(tmp_path / "path.arrow").equals(client.read_table("demo.customer_profile"), check_metadata=True)


def test_online_lookups_inline_streamed_and_in_a_session(
    node: str, location: str, client: FeatureClient, tmp_path: Path
) -> None:
    features = [*DRIVERS, "demo.customer_profile:segment"]
    keys = {"driver_id": [1001, 1002, 99, 1001], "customer_id": ["C00001", "C00002", "C00003", "nobody"]}
    request = {"v": 1, "kind": "online", "features": features}
    lookups = [{"driver_id": [1001]}, {"driver_id": [1002, 1003, 1002]}, {"driver_id": []}, {"driver_id": [42]}]
    inline, described, streamed, session, nulls = run(
        node, location, tmp_path,
        {"op": "get", "request": {**request, "entities": keys}, "out": str(tmp_path / "inline.arrow")},
        {"op": "read", "request": {**request, "entities": keys}, "out": str(tmp_path / "info.arrow")},
        {"op": "exchange", "request": request, "batches": 2, "out": str(tmp_path / "streamed.arrow"),
         "rows": {"driver_id": column("int64", keys["driver_id"]),
                  "customer_id": column("dictionary", keys["customer_id"])}},  # JS's own inference for strings
        {"op": "session", "request": {**request, "features": DRIVERS}, "out": str(tmp_path / "session"),
         "lookups": [{"driver_id": column("int64", k["driver_id"])} for k in lookups]},
        {"op": "exchange", "request": {**request, "features": DRIVERS}, "out": str(tmp_path / "nulls.arrow"),
         "rows": {"driver_id": column("null", [None, None])}},
    )  # fmt: skip
    python = client.get_online_features(keys, features)
    assert python.column("conv_rate").null_count < 4  # fresh rows: the TTL keeps them
    assert arrow_file(tmp_path / "inline.arrow").equals(python)
    assert arrow_file(tmp_path / "streamed.arrow").equals(python)  # one answer per batch, in order
    # get_flight_info: one endpoint, no count, no app_metadata, no schema metadata (protocol.md)
    assert (described["endpoints"], described["total_records"], described["app_metadata"]) == (1, -1, None)
    assert described["info_metadata"] == described["get_schema"]["metadata"] == described["metadata"] == {}
    assert arrow_file(tmp_path / "info.arrow").equals(python)

    assert [answer["rows"] for answer in session["answers"]] == [1, 3, 0, 1]
    for i, keys_of_lookup in enumerate(lookups):
        answer = arrow_file(f"{tmp_path / 'session'}.{i}")
        assert answer.equals(client.get_online_features(keys_of_lookup, DRIVERS)), i

    expected = client.get_online_features({"driver_id": [None, None]}, DRIVERS)
    assert nulls["rows"] == 2 and arrow_file(tmp_path / "nulls.arrow").equals(expected)


def test_training_set_of_entity_rows_built_in_javascript(
    node: str, location: str, client: FeatureClient, tmp_path: Path
) -> None:
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    times = [now.isoformat(), "2000-01-01T00:00:00Z", now.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat(),
             LATER, (now - dt.timedelta(hours=3)).isoformat()]  # fmt: skip
    entities = {"driver_id": [1001, 1002, 1001, 99, 1003], "customer_id": ["C00001", "C00002", "C00003", "C00004", "x"]}
    features = [*DRIVERS, "demo.customer_profile:segment", "demo.customer_profile:lifetime_value"]
    request = {"v": 1, "kind": "historical", "features": features, "entity_time": "event_timestamp"}
    (answer,) = run(
        node, location, tmp_path,
        {"op": "exchange", "request": request, "batches": 3, "out": str(tmp_path / "train.arrow"),
         "rows": {"driver_id": column("int64", entities["driver_id"]),
                  "customer_id": column("utf8", entities["customer_id"]),
                  "event_timestamp": column("timestamp", times)}},
    )  # fmt: skip
    rows = pa.table(
        {
            **entities,
            "event_timestamp": pa.array(
                [dt.datetime.fromisoformat(t.replace("Z", "+00:00")) for t in times], pa.timestamp("ms", "UTC")
            ),
        }
    )
    python = client.get_historical_features(rows, features)
    trained = arrow_file(tmp_path / "train.arrow")
    assert answer["rows"] == 5
    assert trained.equals(python, check_metadata=True)  # entity columns unchanged: milliseconds stay milliseconds
    assert trained.column("conv_rate").null_count == 3  # 2000 is before every row, 2100 past the TTL; 99 has none


def test_put_retried_with_its_write_id(node: str, location: str, client: FeatureClient, tmp_path: Path) -> None:
    rows = {
        "id": column("int64", [1, 2, 3]),
        "ts": column("timestamp", ["2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z", "2026-01-01T02:00:00.123Z"]),
        "v": column("float64", [0.5, None, 2.5]),
    }
    command = {"v": 1, "table": "js.puts", "entity_keys": ["id"], "event_time": "ts", "write_id": "js-put-1"}
    put = {"op": "put", "command": command, "rows": rows}
    first, again = run(node, location, tmp_path, put, put)
    assert first["reply"]["duplicate"] is False and again["reply"]["duplicate"] is True
    assert {**again["reply"], "duplicate": False} == first["reply"]
    assert (first["reply"]["rows"], first["reply"]["write_id"]) == (3, "js-put-1")
    assert client.describe("js.puts")["current_snapshot_id"] == first["reply"]["snapshot_id"]  # one snapshot

    stored = client.scan("js.puts").read_all().sort_by("id")
    assert stored.column("v").to_pylist() == [0.5, None, 2.5]
    assert [t.isoformat() for t in stored.column("ts").to_pylist()] == [
        "2026-01-01T00:00:00+00:00", "2026-01-01T01:00:00+00:00", "2026-01-01T02:00:00.123000+00:00",
    ]  # fmt: skip


def test_login_with_a_password(node: str, location: str, tmp_path: Path) -> None:
    login, health, refused = run(
        node, location, tmp_path,
        {"op": "login", "name": "notebooks", "password": READER_PASSWORD},
        {"op": "action", "type": "health"},
        {"op": "action", "type": "compact", "body": {"v": 1, "table": "demo.driver_stats"}},
        token=None,
    )  # fmt: skip
    assert login["token"] == READER_TOKEN
    assert health["result"][0]["status"] == "ok"
    assert refused["error"]["status"] == "PERMISSION_DENIED"


UNKNOWN_TOKEN = "not-a-token-" + "x" * 16
TOO_LARGE = {"driver_id": [1001] * 1000, "event_timestamp": [LATER] * 1000}
# The JS client's step, the same request from Python, the status and the detail's kind (for kinds sharing a status).
BAD_REQUESTS: dict[str, tuple[dict[str, Any], Callable[[FeatureClient], Any], str, str | None]] = {
    "unknown table": (
        {"op": "get", "request": {"v": 1, "table": "demo.nope"}},
        lambda c: c.scan("demo.nope").read_all(),
        "NOT_FOUND", None,
    ),
    "unknown table, get_flight_info of a path": (
        {"op": "read", "path": ["demo.nope"]},
        lambda c: c.flight_info("demo.nope"),
        "NOT_FOUND", None,
    ),
    "filter naming an unknown column": (
        {"op": "get", "request": {"v": 1, "table": "demo.driver_stats", "filter": "nope = 1"}},
        lambda c: c.scan("demo.driver_stats", filter="nope = 1").read_all(),
        "NOT_FOUND", None,
    ),
    "filter that does not parse": (
        {"op": "get", "request": {"v": 1, "table": "demo.driver_stats", "filter": "driver_id in (1001"}},
        lambda c: c.scan("demo.driver_stats", filter="driver_id in (1001"),
        "INVALID_ARGUMENT", None,
    ),
    "filter with a literal of the wrong type": (
        {"op": "get", "request": {"v": 1, "table": "demo.driver_stats", "filter": "driver_id = 'abc'"}},
        lambda c: c.scan("demo.driver_stats", filter="driver_id = 'abc'"),
        "INVALID_ARGUMENT", None,
    ),
    "unknown feature": (
        {"op": "get", "request": {"v": 1, "kind": "online", "features": ["demo.driver_stats:nope"],
                                  "entities": {"driver_id": [1001]}}},
        lambda c: c.get_online_features(
            {"driver_id": [1001]}, ["demo.driver_stats:nope"]
        ),
        "NOT_FOUND", None,
    ),
    "keys as JavaScript numbers (float64)": (
        {"op": "exchange", "request": {"v": 1, "kind": "online", "features": DRIVERS},
         "rows": {"driver_id": column("float64", [1001, 1002])}},
        lambda c: c.get_online_features(
            pa.table({"driver_id": pa.array([1001, 1002], pa.float64())}), DRIVERS
        ),
        "INVALID_ARGUMENT", None,
    ),
    "put refused": (
        {"op": "put", "command": {"v": 1, "table": "js.refused", "entity_keys": ["id"], "event_time": "nope"},
         "rows": {"id": column("int64", [1]), "ts": column("timestamp", [LATER])}},
        lambda c: c.write(
            "js.refused", pa.table({"id": [1], "ts": pa.array([0], pa.timestamp("ms", "UTC"))}),
            entity_keys=["id"], event_time="nope",
        ),
        "INVALID_ARGUMENT", None,
    ),
    "missing token": (
        {"op": "get", "request": {"v": 1, "table": "demo.driver_stats"}, "token": None},
        lambda c: c.scan("demo.driver_stats").read_all(),
        "UNAUTHENTICATED", "UNAUTHENTICATED",
    ),
    "unknown token": (
        {"op": "get", "request": {"v": 1, "table": "demo.driver_stats"}, "token": UNKNOWN_TOKEN},
        lambda c: c.scan("demo.driver_stats").read_all(),
        "UNAUTHENTICATED", "UNAUTHENTICATED",
    ),
    "token without the write permission": (
        {"op": "put", "command": {"v": 1, "table": "js.puts", "entity_keys": ["id"], "event_time": "ts"},
         "rows": {"id": column("int64", [1]), "ts": column("timestamp", [LATER])}, "token": READER_TOKEN},
        lambda c: c.write(
            "js.puts", pa.table({"id": [1], "ts": pa.array([0], pa.timestamp("ms", "UTC"))}),
            entity_keys=["id"], event_time="ts",
        ),
        "PERMISSION_DENIED", "PERMISSION_DENIED",
    ),
    "request too large": (  # get_flight_info, as Python asks: the message names the descriptor
        {"op": "read", "request": {"v": 1, "kind": "historical", "features": ["demo.driver_stats:conv_rate"],
                                  "entities": {"rows": TOO_LARGE}}},
        lambda c: c.get_historical_features(
            TOO_LARGE, ["demo.driver_stats:conv_rate"]
        ),
        "UNAVAILABLE", "RESOURCE_EXHAUSTED",
    ),
}  # fmt: skip


def test_status_of_bad_requests(node: str, location: str, tmp_path: Path) -> None:
    """All in one node process: the status, the explanation (the message cut at '. Detail: ', which is also the
    trailer x-arrow-status-message-bin) and the detail's kind, as the Python client raises them."""
    steps = [{**step, "out": str(tmp_path / f"{i}.arrow")} for i, (step, *_) in enumerate(BAD_REQUESTS.values())]
    lines = run(node, location, tmp_path, *steps)
    for case, line in zip(BAD_REQUESTS, lines, strict=True):
        step, call, status, kind = BAD_REQUESTS[case]
        error = line["error"]
        assert (error["status"], json.loads(error["detail"])["code"] if error["detail"] else None) == (status, kind)
        assert error["trailer_message"] == error["message"], case
        python = FeatureClient(location, token=step.get("token", ADMIN_TOKEN))
        with python, pytest.raises(FeatureServerError) as raised:
            call(python)
        assert (raised.value.code, sized(str(raised.value))) == (kind or status, sized(error["message"])), case


def sized(message: str) -> str:
    """A message without the request's size, which differs between clients: Python's sends its defaults along."""
    return re.sub(r"is \d+ bytes", "is N bytes", message)


def test_session_header_on_a_training_set(node: str, location: str, tmp_path: Path) -> None:
    """protocol.md: the header `x-online-session` is refused on a do_exchange that is not an online lookup. The server
    reads it only where a middleware sees the call's headers, the concurrency limit's (this server has one); a server
    without `--max-concurrent-requests` / `--max-concurrent-per-caller` ignores it, as protocol.md now says."""
    request = {"v": 1, "kind": "historical", "features": ["demo.driver_stats:conv_rate"]}
    rows = {"driver_id": column("int64", [1001]), "event_timestamp": column("timestamp", [LATER])}
    (line,) = run(
        node, location, tmp_path,
        {"op": "exchange", "request": request, "rows": rows, "headers": {"x-online-session": "1"},
         "out": str(tmp_path / "x.arrow")},
    )  # fmt: skip
    assert line["error"]["status"] == "INVALID_ARGUMENT"
    assert line["error"]["message"] == "the 'x-online-session' header is for online lookups only"


def test_what_a_javascript_client_must_set(node: str, location: str, client: FeatureClient, tmp_path: Path) -> None:
    """Two limits of JavaScript's libraries that protocol.md names: grpc-js refuses a received message over 4 MiB
    unless told otherwise (a batch of the server's 128K rows passes it easily: here 100 rows of 50 KB, one batch on
    the DuckDB path), with a RESOURCE_EXHAUSTED of its own; apache-arrow reads compressed batches only with a codec
    registered (`compressionRegistry`), which it does not ship."""
    text = "x" * 50_000
    client.write(
        "js.wide",
        pa.table({"id": range(100), "ts": pa.array([0] * 100, pa.timestamp("us", "UTC")), "text": [text] * 100}),
        entity_keys=["id"],
        event_time="ts",
    )
    scan = {"v": 1, "table": "js.wide", "filter": "id >= 0"}
    (limited,) = run(
        node,
        location,
        tmp_path,
        {"op": "get", "request": scan, "out": str(tmp_path / "w.arrow")},
        max_receive_bytes=4 << 20,
    )
    assert limited["error"]["status"] == "RESOURCE_EXHAUSTED"  # not the server's, which would be UNAVAILABLE
    assert limited["error"]["message"].startswith("Received message larger than max")

    unlimited, compressed = run(
        node, location, tmp_path,
        {"op": "get", "request": scan, "out": str(tmp_path / "w.arrow")},
        {"op": "get", "request": {**scan, "compression": "zstd"}, "out": str(tmp_path / "z.arrow")},
    )  # fmt: skip
    assert unlimited["rows"] == 100
    assert compressed["error"] == {"status": None, "message": "Record batch is compressed but codec not found"}


def test_protocol_doc_quotes_this_client() -> None:
    """The JavaScript in docs/protocol.md is taken from the tested client: every line of it but elisions."""
    doc = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
    quoted = doc.split("### JavaScript, and Flight without a Flight library", 1)[1].split("```js", 1)[1]
    source = {line.strip() for line in SOURCE.read_text().splitlines()}
    missing = [line.strip() for line in quoted.split("```", 1)[0].splitlines() if line.strip() not in source | {"..."}]
    assert not missing, f"docs/protocol.md quotes lines that tests/clients/feature_client.mjs lacks: {missing}"


def test_filter_with_a_timestamp_in_utc_designator_form(
    node: str, location: str, client: FeatureClient, tmp_path: Path
) -> None:
    """A JavaScript client writes a time as `Date.prototype.toISOString()` gives it, `2026-01-01T12:00:00.000Z`:
    ISO-8601 with `Z`, its designator of UTC, which every other timestamp of a request (`as_of`, `request_time`,
    entity rows) takes. In a filter on a timestamptz column it was refused (`Invalid timestamp with zone: ... (must
    be ISO-8601)`): pyiceberg's literal parser takes only `+HH:MM` offsets. The server now reads `Z` there as `+00:00`
    (base/filters.py), for timestamptz columns only: a string column's literal stays as written."""
    since = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) - dt.timedelta(hours=3)
    zulu = since.isoformat(timespec="milliseconds").replace("+00:00", "Z")  # toISOString's form
    request = {"v": 1, "table": "demo.driver_stats", "filter": f"event_timestamp >= '{zulu}' and driver_id = 1001"}
    (scan,) = run(node, location, tmp_path, {"op": "get", "request": request, "out": str(tmp_path / "z.arrow")})
    python = client.scan("demo.driver_stats", filter=f"event_timestamp >= '{since.isoformat()}' and driver_id = 1001")
    expected = python.read_all()
    assert 0 < expected.num_rows < 24
    assert scan.get("error") is None and arrow_file(tmp_path / "z.arrow").equals(expected)
    assert client.scan("demo.driver_stats", filter=f"event_timestamp in ('{zulu}')").read_all().num_rows == 0
