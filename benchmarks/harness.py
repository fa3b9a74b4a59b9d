"""Where and how benchmarks run: a throwaway server process, repeated timing, and the machine they ran on.

The server runs in its own process, exactly as users start it, so a benchmark measures the
real process boundary, gRPC on loopback and the server's own GIL, never a shortcut.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks.processes import family, peak_rss_bytes
from benchmarks.report import steps
from flight_client import FeatureClient, FeatureServerError
from flight_server.base.config import ServerConfig, read_catalog_file

START_TIMEOUT_SECONDS = 90.0
STOP_TIMEOUT_SECONDS = 30.0
_VERSIONED = ("iceberg-feature-flight", "pyarrow", "duckdb", "pyiceberg", "numpy", "pandas")


@dataclass(frozen=True)
class Timing:
    """Wall times of the measured repeats (warm-up runs excluded)."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def as_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median,
            "min_s": min(self.seconds),
            "max_s": max(self.seconds),
            "repeat": len(self.seconds),
            "times_s": self.seconds,
        }


@dataclass(frozen=True)
class Case:
    """One thing to time; `setup` runs untimed before each run (e.g. to create a fresh table)."""

    run: Callable[[], object]
    setup: Callable[[], None] | None = None


def measure(cases: Mapping[str, Case], repeat: int, warmup: int, label: str) -> dict[str, Timing]:
    """Time each case `repeat` times after `warmup` untimed runs, interleaving the cases round by round.

    Interleaving spreads the bursts of a shared, noisy machine over all cases, so their ratios stay
    fair; the median resists those bursts and min/max show the spread. A progress bar on stderr
    follows the rounds, since a round of a full-size benchmark can take a minute.
    """
    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    rounds = f"{warmup} warm-up and {repeat} timed round(s)" if warmup else f"{repeat} timed round(s)"
    for run in steps(range(warmup + repeat), f"{label}: {rounds} of {len(cases)} case(s)"):
        for name, case in cases.items():
            if case.setup is not None:
                case.setup()
            start = time.perf_counter()
            case.run()
            elapsed = time.perf_counter() - start
            if run >= warmup:
                seconds[name].append(elapsed)
    return {name: Timing(times) for name, times in seconds.items()}


@dataclass
class Target:
    """The server under test; `warehouse`, `pid` and `catalog` are known only for a server this run started.

    `catalog` holds the properties of `--catalog-config` the server was given, if any.
    """

    location: str
    warehouse: Path | None = None
    pid: int | None = None
    catalog: dict[str, str] | None = None
    catalog_config: Path | None = None

    def catalog_properties(self) -> dict[str, str] | None:
        """The catalog the local server uses (`--catalog-config`'s, or the embedded default), so baselines can
        read the same tables; resolved as the server resolves it."""
        if self.warehouse is None:
            return None
        config = ServerConfig(warehouse=str(self.warehouse), catalog_properties=dict(self.catalog or {}))
        return config.resolved_catalog_properties()

    def peak_rss(self) -> PeakRss | None:
        """The server's peak resident memory so far, when it is a local Linux process: its serving process's and
        its write process's apart, since each process has its own peak (not at the same moment)."""
        if self.pid is None:
            return None
        members = family(self.pid)
        children = [peak for peak in map(peak_rss_bytes, members[1:]) if peak is not None]
        return PeakRss(peak_rss_bytes(self.pid), sum(children) if children else None)


class PeakRss(NamedTuple):
    """Peak resident bytes (VmHWM) of a server's processes; None where unknown. `write`: the write process's (with
    its descendants', if any), None while it has not started; one that stopped or was restarted took its peak
    with it."""

    serving: int | None
    write: int | None

    def describe(self) -> str:
        """`555 MiB (serving process) + 280 MiB (write process)`."""
        serving = "?" if self.serving is None else f"{self.serving / 2**20:.0f} MiB"
        if self.write is None:
            return f"{serving} (serving process; no write process running)"
        return f"{serving} (serving process) + {self.write / 2**20:.0f} MiB (write process)"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_healthy(location: str) -> bool:
    try:
        with FeatureClient(location, timeout=2) as client:
            return client.health().get("status") == "ok"
    except (FeatureServerError, OSError):
        return False


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# Passed on to the servers started here (the other FLIGHT_SERVER_* are not): =0 measures without the write process.
WRITE_PROCESS_VARIABLE = "FLIGHT_SERVER_WRITE_PROCESS"


def writing(client: FeatureClient, timeout: float = 120.0) -> None:
    """After a server's first write: wait until its write process (on by default) listens, so that the timed writes
    all go through it, as on a server that has been writing for a while. It starts in the background at the first
    write, and the writes until it listens run in the serving process. Returns at once for a server without one, or
    one whose start failed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.health().get("write_process")
        if state is None or state["pid"] is not None or not state["starting"]:
            return
        time.sleep(0.05)
    raise RuntimeError(f"the server's write process did not start within {timeout:.0f} s")


@contextlib.contextmanager
def local_server(
    catalog_config: Path | None = None,
    warehouse: Path | None = None,
    port: int | None = None,
    args: Sequence[str] = (),
) -> Iterator[Target]:
    """A server on a fresh temporary warehouse and a free loopback port, stopped with SIGTERM at the end.

    With `catalog_config` (a YAML/JSON file of pyiceberg catalog properties) the server uses that
    catalog, as `flight-server serve --catalog-config` does, instead of the embedded default; the
    temporary warehouse then only serves a SQL catalog whose properties name no warehouse. With
    `warehouse` (another local server's) it is a replica sharing that server's catalog. `port` (default: a
    free one) and `args` (more `serve` options, such as `--advertise` and `--peer`) start it as a replica would.
    """
    with local_servers([(port, args)], catalog_config, warehouse) as [server]:
        yield server


@contextlib.contextmanager
def local_servers(
    servers: Sequence[tuple[int | None, Sequence[str]]],
    catalog_config: Path | None = None,
    warehouse: Path | None = None,
) -> Iterator[list[Target]]:
    """Servers on one catalog, as `local_server` starts one, each with its `(port, args)`: all started at once, then
    each waited for, since a start is mostly Python importing the server (a second or two) and the starts overlap
    on a machine's other cores; yields them once every one answers health. Without `warehouse`, they share a fresh
    temporary one."""
    catalog = read_catalog_file(catalog_config) if catalog_config is not None else None
    with tempfile.TemporaryDirectory(prefix="flight-bench-") as tmp, contextlib.ExitStack() as stack:
        warehouse = warehouse or Path(tmp) / "warehouse"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLIGHT_SERVER_") or k == WRITE_PROCESS_VARIABLE}
        started: list[tuple[subprocess.Popen[bytes], str, Path]] = []
        for index, (port, args) in enumerate(servers):
            log_path = Path(tmp) / f"server-{index}.log"
            port = port or free_port()
            command = [
                sys.executable,
                "-m",
                "flight_server",
                "serve",
                "--port",
                str(port),
                "--warehouse",
                str(warehouse),
                "--log-level",
                "WARNING",
                *args,
            ]
            if catalog_config is not None:
                command += ["--catalog-config", str(Path(catalog_config).resolve())]
            with log_path.open("wb") as log:
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            stack.callback(_stop, proc)
            started.append((proc, f"grpc://127.0.0.1:{port}", log_path))
        stack.callback(_terminate, [proc for proc, _, _ in started])  # runs first: every server stops at once
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        for proc, location, log_path in started:
            while not is_healthy(location):
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited with code {proc.returncode}:\n{_tail(log_path)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the server did not answer health within {START_TIMEOUT_SECONDS:.0f}s:\n{_tail(log_path)}"
                    )
                time.sleep(0.05)
        yield [
            Target(location, warehouse.resolve(), proc.pid, catalog, catalog_config) for proc, location, _ in started
        ]


def _terminate(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Wait for a server sent SIGTERM; kill it after `STOP_TIMEOUT_SECONDS`."""
    proc.send_signal(signal.SIGTERM)  # no-op for one that ended: `send_signal` checks
    try:
        proc.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def target(location: str | None, catalog_config: Path | None = None) -> Iterator[Target]:
    """The server given by `--location`, or a fresh local one (on `catalog_config`'s catalog, if given)."""
    if location is None:
        with local_server(catalog_config) as started:
            yield started
        return
    if catalog_config is not None:
        raise ValueError("a catalog configuration applies only to a server the benchmark starts, not to --location")
    if not is_healthy(location):
        raise RuntimeError(f"no healthy feature server at {location}")
    yield Target(location)


def _memory_bytes() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def machine() -> dict[str, Any]:
    """What the figures were measured on; a benchmark result means little without it."""
    versions: dict[str, str | None] = {}
    for package in _VERSIONED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "versions": versions,
    }


@dataclass(frozen=True)
class Settings:
    """The knobs every benchmark shares, after `--quick` and per-benchmark defaults are applied."""

    rows: int
    entities: int
    seed: int
    features: int
    repeat: int
    warmup: int


def table_name(prefix: str) -> str:
    """A table name no earlier run used, so runs against a long-lived server never collide."""
    return f"bench.{prefix}_{uuid.uuid4().hex[:10]}"
