"""A client in another language, written from docs/protocol.md alone: tests/clients/feature_client.cc, Arrow Flight
C++ built against pyarrow's own headers and libraries, gets the answers the Python FeatureClient gets (tables,
health, a split read over replicas of which one is down, a training set, an online lookup, a put retried with its
write_id, the status of bad requests)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from flight_client import FeatureClient, FeatureServerError
from flight_server import demo
from tests.conftest import sqlite_catalog, start_server
from tests.services import free_ports

SOURCE = Path(__file__).parent / "clients" / "feature_client.cc"
DRIVERS = ["demo.driver_stats:conv_rate", "demo.driver_stats:acc_rate", "demo.driver_stats:avg_daily_trips"]
LIBRARIES = ("arrow_flight", "arrow")
MAX_REQUEST_BYTES = 4096  # small, so that a large inline request shows how a C++ client sees RESOURCE_EXHAUSTED
DOWN = "grpc://127.0.0.1:9"  # a replica that is down: nothing listens on the discard port
ROWS = pa.table(
    {
        "id": pa.array([1, 2, 3], pa.int64()),
        "ts": pa.array([0, 3_600_000_000, 7_200_000_000], pa.timestamp("us", "UTC")),
        "v": [0.5, None, 2.5],
    }
)


def compile_command(output: Path) -> list[str]:
    """g++ against the wheel's headers and its versioned libraries (the wheel ships no unversioned names), with an
    rpath so the binary finds them. The wheel's libraries use the C++11 ABI, g++'s default: no ABI flag is needed;
    its headers need C++20."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.fail("g++ is needed to build tests/clients/feature_client.cc (Debian: apt-get install g++)")
    libdir = Path(pa.get_library_dirs()[0])
    libraries = [min(libdir.glob(f"lib{name}.so.*"), key=lambda p: len(p.name), default=None) for name in LIBRARIES]
    if None in libraries:
        pytest.fail(f"pyarrow's wheel has no libarrow_flight.so.* / libarrow.so.* in {libdir}")
    return [
        compiler, "-std=c++20", "-O1", "-isystem", pa.get_include(), str(SOURCE), "-o", str(output),
        *map(str, libraries), f"-Wl,-rpath,{libdir}",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client, built once per source, pyarrow and command (cached next to pytest's temporary folders)."""
    probe = compile_command(Path("feature_client"))
    key = hashlib.sha256(SOURCE.read_bytes() + json.dumps([pa.__version__, probe]).encode()).hexdigest()[:16]
    cache = tmp_path_factory.getbasetemp().parent / "cpp-clients"
    built = cache / f"feature_client-{key}"
    if not built.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / f".{built.name}.{os.getpid()}"
        started = time.monotonic()
        done = subprocess.run(compile_command(partial), capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.fail(f"compiling {SOURCE.name} failed:\n{done.stderr[-4000:]}")
        print(f"compiled {SOURCE.name} in {time.monotonic() - started:.1f}s")
        partial.replace(built)  # atomic: a concurrent session sees the whole binary or none
    return built


@pytest.fixture(scope="module")
def location(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server holding the demo tables that advertises itself and a replica that is down, so every endpoint it gives
    names both, one of them first by turns: a client must move on to the next location of an endpoint."""
    (port,) = free_ports(1)
    here = f"grpc://127.0.0.1:{port}"
    server = start_server(
        sqlite_catalog(tmp_path_factory.mktemp("cpp-warehouse")),
        port=port,
        advertise=here,
        peers=[DOWN],
        max_request_bytes=MAX_REQUEST_BYTES,
    )
    with FeatureClient(here) as client:
        small_demo(client)
    yield here
    server.shutdown()


def small_demo(client: FeatureClient) -> None:
    """The demo's driver and customer tables, small: what the clients in other languages read."""
    client.write(
        "demo.driver_stats",
        demo.driver_stats(drivers=50, hours=24, now=dt.datetime.now(dt.timezone.utc)),
        entity_keys=["driver_id"],
        event_time="event_timestamp",
        created_time="created",
        ttl=dt.timedelta(days=1),
    )
    client.write(
        "demo.customer_profile",
        demo.customer_profile(customers=20),
        entity_keys=["customer_id"],
        event_time="event_timestamp",
    )


@pytest.fixture
def client(location: str) -> Iterator[FeatureClient]:
    with FeatureClient(location) as c:
        yield c


def run(binary: Path, location: str, *args: str | Path) -> list[dict[str, Any]]:
    """The client's JSON lines; its exit status says whether it printed an error."""
    done = subprocess.run([binary, location, *map(str, args)], capture_output=True, text=True, timeout=120)
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == (1 if lines and "error" in lines[-1] else 0), done.stderr
    return lines


def arguments(entities: dict[str, list[Any]]) -> list[str]:
    """Entity columns as the client takes them: `name=value,value,...`."""
    return [f"{name}={','.join(map(str, values))}" for name, values in entities.items()]


def write_rows(path: Path) -> Path:
    """ROWS as an Arrow IPC file, for the client to put."""
    with ipc.new_file(path, ROWS.schema) as writer:
        writer.write_table(ROWS)
    return path


def read_file(path: Path) -> pa.Table:
    with ipc.open_file(path) as reader:
        return reader.read_all()


def by_key(table: pa.Table) -> pa.Table:
    return table.sort_by([("driver_id", "ascending"), ("event_timestamp", "ascending")])


def test_tables_and_health(binary: Path, location: str, client: FeatureClient) -> None:
    listed = run(binary, location, "tables")
    assert [line["app_metadata"] for line in listed] == client.tables()
    assert [line["total_records"] for line in listed] == [t["rows"] for t in client.tables()]
    assert run(binary, location, "tables", "demo.cust") == listed[:1]

    (health,) = run(binary, location, "health")
    python = client.health()
    assert health.keys() == python.keys()
    assert (health["status"], health["version"], health["catalog"]) == (python["status"], python["version"], "default")


def test_whole_table_read(binary: Path, location: str, client: FeatureClient, tmp_path: Path) -> None:
    info = client.flight_info("demo.driver_stats", partitions=4)
    assert len(info.endpoints) == 4
    assert {endpoint.locations[0].uri.decode() for endpoint in info.endpoints} == {location, DOWN}  # by turns

    (answer,) = run(binary, location, "read", tmp_path / "rows.arrow", "demo.driver_stats", "4")
    rows = read_file(tmp_path / "rows.arrow")
    python = client.read_table("demo.driver_stats", partitions=4)
    assert (answer["endpoints"], answer["rows"]) == (4, python.num_rows)
    assert answer["app_metadata"] == json.loads(info.app_metadata)
    assert rows.schema.equals(python.schema, check_metadata=True)
    assert by_key(rows).equals(by_key(python))

    (whole,) = run(binary, location, "read", tmp_path / "one.arrow", "demo.driver_stats")
    assert whole["endpoints"] == 1
    assert by_key(read_file(tmp_path / "one.arrow")).equals(by_key(python))


def test_training_set_of_inline_entity_rows(binary: Path, location: str, client: FeatureClient, tmp_path: Path) -> None:
    entities: dict[str, list[Any]] = {
        "driver_id": [1001, 1002, 1001, 99, 1003],
        "customer_id": ["C00001", "C00002", "C00003", "C00004", "C99999"],
        # ISO-8601 with and without an offset, and epoch milliseconds, as the protocol allows
        "event_timestamp": ["2026-01-01T10:00:00Z", "2026-01-01T12:30:00+00:00", 1767261600000,
                            "2026-01-01T05:00:00", "2025-12-31T00:00:00Z"],
    }  # fmt: skip
    features = [*DRIVERS, "demo.customer_profile:segment", "demo.customer_profile:lifetime_value"]
    (answer,) = run(binary, location, "train", tmp_path / "train.arrow", ",".join(features), *arguments(entities))
    rows = read_file(tmp_path / "train.arrow")

    python = client.get_historical_features(entities, features)
    assert answer["rows"] == 5
    assert answer["app_metadata"] == json.loads(python.schema.metadata[b"flight.snapshots"])
    assert rows.equals(python)  # the same rows in entity order, the same columns and types
    assert rows.schema.metadata[b"flight.snapshots"] == python.schema.metadata[b"flight.snapshots"]


def test_online_lookup(binary: Path, location: str, client: FeatureClient, tmp_path: Path) -> None:
    entities: dict[str, list[Any]] = {
        "driver_id": [1001, 1002, 99, 1001],
        "customer_id": ["C00001", "C00002", "C00003", "nobody"],
    }
    features = [*DRIVERS, "demo.customer_profile:segment"]
    (answer,) = run(binary, location, "online", tmp_path / "online.arrow", ",".join(features), *arguments(entities))
    rows = read_file(tmp_path / "online.arrow")

    python = client.get_online_features(entities, features)
    assert answer["rows"] == 4
    assert rows.equals(python)
    assert rows.column("conv_rate").null_count < 4  # fresh rows: the TTL keeps them


def test_put_retried_with_its_write_id(binary: Path, location: str, client: FeatureClient, tmp_path: Path) -> None:
    put: list[str | Path] = [write_rows(tmp_path / "rows.arrow"), "cpp.puts", "cpp-put-1", "id", "ts"]
    (first,) = run(binary, location, "write", *put)
    (again,) = run(binary, location, "write", *put)

    assert first["duplicate"] is False and again["duplicate"] is True
    assert {**again, "duplicate": False} == first == {**first, "table": "cpp.puts", "rows": 3, "write_id": "cpp-put-1"}
    python = client.write("cpp.puts", ROWS, write_id="cpp-put-1")  # the same id from Python: that one snapshot again
    assert (python.duplicate, python.snapshot_id, python.rows) == (True, first["snapshot_id"], 3)
    assert client.scan("cpp.puts").read_all().sort_by("id").to_pylist() == ROWS.to_pylist()  # keys now NOT NULL


TOO_LARGE = ["1001"] * 1000, ["2026-01-01T10:00:00Z"] * 1000
# The client's arguments, the same request from Python, the status and the detail's kind (for kinds sharing a status).
BAD_REQUESTS = {
    "unknown table": (
        ["read", "{out}", "demo.nope"], lambda c: c.read_table("demo.nope"), "NOT_FOUND", None
    ),
    "unknown feature": (
        ["online", "{out}", "demo.driver_stats:nope", "driver_id=1001"],
        lambda c: c.get_online_features({"driver_id": [1001]}, ["demo.driver_stats:nope"]),
        "NOT_FOUND", None,
    ),
    "bad timestamp": (
        ["train", "{out}", "demo.driver_stats:conv_rate", "driver_id=1001", "event_timestamp=yesterday"],
        lambda c: c.get_historical_features(
            {"driver_id": [1001], "event_timestamp": ["yesterday"]}, ["demo.driver_stats:conv_rate"]
        ),
        "INVALID_ARGUMENT", None,
    ),
    "put refused": (  # its explanation arrives when the client closes the put
        ["write", "{rows}", "cpp.refused", "refused-1", "id", "nope"],
        lambda c: c.write("cpp.refused", ROWS, entity_keys=["id"], event_time="nope", write_id="refused-1"),
        "INVALID_ARGUMENT", None,
    ),
    "request too large": (
        ["train", "{out}", "demo.driver_stats:conv_rate", "driver_id=" + ",".join(TOO_LARGE[0]),
         "event_timestamp=" + ",".join(TOO_LARGE[1])],
        lambda c: c.get_historical_features(
            {"driver_id": [int(k) for k in TOO_LARGE[0]], "event_timestamp": TOO_LARGE[1]},
            ["demo.driver_stats:conv_rate"],
        ),
        "UNAVAILABLE", "RESOURCE_EXHAUSTED",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_status_of_a_bad_request(binary: Path, location: str, client: FeatureClient, tmp_path: Path, case: str) -> None:
    args, call, status, kind = BAD_REQUESTS[case]
    files = {"out": tmp_path / "out.arrow", "rows": write_rows(tmp_path / "rows.arrow")}
    (line,) = run(binary, location, *(a.format(**files) for a in args))
    error = line["error"]
    assert error["status"] == status
    assert (json.loads(error["detail"])["code"] if error["detail"] else None) == kind
    with pytest.raises(FeatureServerError) as raised:
        call(client)
    assert (raised.value.code, sized(str(raised.value))) == (kind or status, sized(error["message"]))


def sized(message: str) -> str:
    """A message without the request's size, which differs between clients: Python's sends its defaults along."""
    return re.sub(r"is \d+ bytes", "is N bytes", message)


def test_protocol_doc_quotes_this_client() -> None:
    """The C++ in docs/protocol.md is taken from the tested client: every line of it but comments and elisions."""
    doc = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
    quoted = doc.split("## From other languages", 1)[1].split("```cpp", 1)[1].split("```", 1)[0]
    source = {code(line) for line in SOURCE.read_text().splitlines()}
    missing = [code(line) for line in quoted.splitlines() if code(line) not in source | {"..."}]
    assert not missing, f"docs/protocol.md quotes lines that tests/clients/feature_client.cc lacks: {missing}"


def code(line: str) -> str:
    """A line of C++ without its indentation and comment."""
    return line.split("//", 1)[0].strip()
