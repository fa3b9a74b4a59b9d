"""Fixtures: real catalogs (SQLite, PostgreSQL, REST on SeaweedFS S3) and real Flight servers."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_client import FeatureClient, FeatureServerError, ResourceExhaustedError
from flight_client.errors import from_flight_error
from flight_server.base.config import ENV_CATALOG_PREFIX, ServerConfig
from flight_server.transport.service import FeatureFlightServer
from tests.services import _stop_group, free_ports, postgres_server, seaweedfs_server

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["sqlite", "postgres", "rest"]
# Small chunks so that tests of multi-megabyte streams exercise several file flushes.
TEST_CHUNK_BYTES = 256 << 10


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[dict[str, str]]:
    with seaweedfs_server() as props:
        yield props


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Catalog properties for one of the three real catalogs."""
    if request.param == "sqlite":
        return sqlite_catalog(tmp_path_factory.mktemp("sqlite-warehouse"))
    if request.param == "postgres":
        root = tmp_path_factory.mktemp("pg-warehouse")
        return {"type": "sql", "uri": request.getfixturevalue("postgres_url"), "warehouse": root.as_uri()}
    return dict(request.getfixturevalue("seaweedfs"))


@pytest.fixture(scope="session")
def promtool() -> str:
    """Prometheus's promtool, which checks the alerting rules (tests/test_alerts.py) and the dashboard's queries
    (tests/test_dashboard.py): on PATH, or where scripts/test.sh unpacks it."""
    found = shutil.which("promtool") or ROOT / ".tools" / "prometheus" / "usr" / "bin" / "promtool"
    if not Path(found).is_file():
        pytest.fail("promtool is needed to check deploy/prometheus/: run scripts/test.sh, which unpacks it")
    return str(found)


def sqlite_catalog(root: Path) -> dict[str, str]:
    """Properties of an embedded SQLite catalog with its warehouse under `root`."""
    return {"type": "sql", "uri": f"sqlite:///{root / 'catalog.db'}", "warehouse": root.as_uri()}


def start_server(properties: dict[str, str], **overrides: object) -> FeatureFlightServer:
    config = ServerConfig(
        port=0,
        catalog_properties=properties,
        write_chunk_bytes=TEST_CHUNK_BYTES,
        duckdb_memory_limit="1GB",
        duckdb_threads=2,
        auto_maintenance=False,  # its background commits would race tests that count snapshots: opt in
        write_process=False,  # writes in this process, where tests patch and watch them: test_write_process opts in
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    server = FeatureFlightServer(config)
    threading.Thread(target=server.serve, daemon=True).start()
    return server


@contextlib.contextmanager
def two_replicas(properties: dict[str, str]) -> Iterator[tuple[FeatureFlightServer, FeatureClient, FeatureClient]]:
    """Two servers on one catalog in this process (replicas whose code a test can patch to provoke a race), and a
    client of each; yields the first server and both clients, and stops both servers after."""
    a, b = start_server(properties), start_server(properties)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{a.port}") as first, FeatureClient(f"grpc://127.0.0.1:{b.port}") as other:
            yield a, first, other
    finally:
        a.shutdown()
        b.shutdown()


def start_writing_server(properties: dict[str, str], **overrides: object) -> FeatureFlightServer:
    """`start_server` with its write process on and listening: a server starts it in the background at its first
    write, and runs the writes itself until it listens; tests of the write process's own path wait for it here."""
    server = start_server(properties, write_process=True, **overrides)
    writes = server.parts.writes
    assert writes is not None
    writes.usable()  # what a write does: start it
    wait_until(lambda: writes.pid is not None, timeout=120, what="the write process to listen")
    return server


def listening(client: FeatureClient, other_than: Collection[int] = ()) -> int:
    """The pid of the server's write process, once it listens (a server's first write starts it in the background),
    other than those given: a child killed a moment ago may still be reported while a thread of the server waits
    for it (`Popen.poll` says nothing then)."""
    pids: list[int | None] = []

    def found() -> bool:
        pids.append(client.health()["write_process"]["pid"])
        return pids[-1] is not None and pids[-1] not in other_than

    wait_until(found, timeout=120, what="the write process")
    return int(pids[-1] or 0)


@pytest.fixture(scope="session")
def server(backend: dict[str, str]) -> Iterator[str]:
    """Location of a server on the backend under test."""
    server = start_server(backend)
    yield f"grpc://127.0.0.1:{server.port}"
    server.shutdown()


@pytest.fixture(scope="session")
def second_server(backend: dict[str, str]) -> Iterator[str]:
    """Another server process-equivalent on the same catalog (a replica)."""
    server = start_server(backend)
    yield f"grpc://127.0.0.1:{server.port}"
    server.shutdown()


@pytest.fixture
def client(server: str) -> Iterator[FeatureClient]:
    with FeatureClient(server) as c:
        yield c


@pytest.fixture
def table() -> str:
    """A fresh table name per test, so tests on one catalog never see each other's rows."""
    return f"tests.t_{uuid.uuid4().hex[:12]}"


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def local_files(location: str) -> set[Path] | None:
    """Parquet files under a table location on local disk (None for object storage)."""
    if not location.startswith("file://"):
        return None
    return set(Path(location[len("file://") :]).rglob("*.parquet"))


def write_big(client: FeatureClient, table: str, rows: int) -> None:
    """A table of `rows` rows (id, ts, value) in one write: far more than gRPC's flow-control window."""
    client.write(
        table,
        pa.table(
            {
                "id": pa.array(range(rows), pa.int64()),
                "ts": pa.array([0] * rows, pa.timestamp("us", "UTC")),
                "value": pa.array(range(rows), pa.float64()),
            }
        ),
        entity_keys=["id"],
        event_time="ts",
        partition_by=[],
    )


def answers(location: str) -> bool:
    """Whether a server takes a call now (False when its concurrency limit refuses one). It asks
    `list_actions`, not `health`: actions may run beyond the limits."""
    with FeatureClient(location, timeout=5) as client:
        return takes_calls(client)


def takes_calls(client: FeatureClient) -> bool:
    """Whether the server gives `client` a slot now."""
    try:
        list(client._client.list_actions(client._options))
    except flight.FlightError as exc:
        if isinstance(from_flight_error(exc), ResourceExhaustedError):
            return False
        raise
    return True


def healthy(location: str, token: str | None = None) -> bool:
    """Whether a server answers `health` (False while it is not listening yet)."""
    try:
        with FeatureClient(location, timeout=2, token=token) as client:
            return client.health()["status"] == "ok"
    except (FeatureServerError, OSError):
        return False


def catalog_env(properties: dict[str, str]) -> dict[str, str]:
    """`s3.access-key-id` -> FLIGHT_SERVER_CATALOG__S3__ACCESS_KEY_ID, and so on."""
    return {ENV_CATALOG_PREFIX + k.upper().replace(".", "__").replace("-", "_"): v for k, v in properties.items()}


@contextlib.contextmanager
def serve_replicas(
    tmp: Path,
    properties: dict[str, str],
    settings: Callable[[str, list[str]], dict[str, str]] = lambda location, locations: {},
    token: str | None = None,
    count: int = 2,
) -> Iterator[list[str]]:
    """`count` `flight-server serve` processes on one catalog, each logging to `tmp/replica-<i>.log`; `settings`
    gives a replica's extra FLIGHT_SERVER_* variables from its location and all of them. Yields the locations
    once every replica answers `health`."""
    with replica_processes(tmp, properties, settings, token, count) as replicas:
        yield [location for location, _ in replicas]


@contextlib.contextmanager
def replica_processes(
    tmp: Path,
    properties: dict[str, str],
    settings: Callable[[str, list[str]], dict[str, str]] = lambda location, locations: {},
    token: str | None = None,
    count: int = 2,
) -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    """`serve_replicas`, yielding each replica's process beside its location, for tests that kill one (its process
    group: `os.killpg(process.pid, ...)`)."""
    locations = [f"grpc://127.0.0.1:{port}" for port in free_ports(count)]
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLIGHT_SERVER_")}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for i, location in enumerate(locations):
            env = {
                **base,
                **catalog_env(properties),
                "FLIGHT_SERVER_PORT": location.rsplit(":", 1)[1],
                "FLIGHT_SERVER_WAREHOUSE": str(tmp / f"unused-{i}"),
                **settings(location, locations),
            }
            with (tmp / f"replica-{i}.log").open("wb") as out:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "flight_server", "serve"],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        for i, (location, proc) in enumerate(zip(locations, processes, strict=True)):
            wait_until(lambda: healthy(location, token) or proc.poll() is not None, timeout=90, what=location)  # noqa: B023
            assert proc.poll() is None, (tmp / f"replica-{i}.log").read_text()[-3000:]
        yield list(zip(locations, processes, strict=True))
    finally:
        for proc in processes:
            _stop_group(proc)
