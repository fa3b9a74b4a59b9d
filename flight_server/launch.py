"""The `flight-server` and `flight-bench` commands: a client-only install gets one line naming the extra
to install instead of an import traceback."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

# Top-level modules of the `server` extra (pyiceberg brings sqlalchemy, pyiceberg-core and the rest).
SERVER_MODULES = frozenset(
    {"click", "duckdb", "pandas", "pyiceberg", "sqlalchemy", "pyiceberg_core", "prometheus_client"}
)
INSTALL_HINT = "pip install 'iceberg-feature-flight[server]'"


def _command(module: str) -> Callable[[], None]:
    """The command's `main`, or exit 2 with the install hint when a server dependency is missing."""
    try:
        main: Callable[[], None] = importlib.import_module(module).main
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in SERVER_MODULES:
            raise
        missing = f"error: this command needs the server's dependencies ({exc.name} is missing)"
        print(f"{missing}: {INSTALL_HINT}", file=sys.stderr)
        raise SystemExit(2) from None
    return main


def serve() -> None:
    """`flight-server`."""
    _command("flight_server.cli")()


def bench() -> None:
    """`flight-bench`."""
    _command("benchmarks.cli")()
