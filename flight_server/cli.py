"""`flight-server`: the command line that starts the server."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from flight_server import __version__
from flight_server.base.config import CatalogError, ServerConfig, catalog_settings, parse_property_flags
from flight_server.base.logs import setup_logging
from flight_server.base.settings import CALLS_SETTINGS, HEALTH_SETTINGS, SERVE_SETTINGS, markdown, options, text
from flight_server.transport.auth import READ, WRITE, load_tokens

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from collections.abc import Callable

    from flight_client import FeatureClient
    from flight_server.transport.service import FeatureFlightServer

GIL_SWITCH_SECONDS = 0.0005


# How gRPC says that a connection failed, and why ("Connection refused", "Connection timed out", ...).
class StartError(click.ClickException):
    """What keeps the server from starting (a port in use, a catalog unknown or unreachable): one line, exit 2."""

    exit_code = 2


# The options that name the catalog, for commands that open it as `serve` does.
CATALOG_SETTINGS = tuple(setting for setting in SERVE_SETTINGS if setting.section == "Catalog")


@click.group()
@click.version_option(__version__, prog_name="flight-server")
def main() -> None:
    """Arrow Flight server for ML features stored in Apache Iceberg tables."""


@main.command()
@options(SERVE_SETTINGS)
def serve(
    catalog_config: str | None, catalog_property: tuple[str, ...], demo: bool, log_level: str, **fields: Any
) -> None:
    """Serve feature tables over Arrow Flight until interrupted (Ctrl-C or SIGTERM)."""
    # An online lookup takes the GIL a few times for ~0.1 ms each; while a write or an index refresh
    # runs Python code, the default 5 ms switch interval would make each of those waits up to 5 ms.
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    setup_logging(log_level, fields["log_format"])
    config = _config(catalog_config, catalog_property, fields)
    try:
        config.auth_tokens = load_tokens(config.auth_tokens_file)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--auth-tokens-file / FLIGHT_SERVER_AUTH_TOKENS") from None
    if demo and config.tls_cert:
        raise click.UsageError("--demo loads its tables over plain grpc on loopback: load them without TLS first")
    from flight_server.transport.service import FeatureFlightServer

    _check_port(config)
    log = logging.getLogger("flight_server")
    try:
        server = FeatureFlightServer(config)
    except CatalogError as exc:
        log.debug("the catalog did not open", exc_info=True)  # the library's traceback, for --log-level DEBUG
        raise StartError(str(exc)) from None
    except ValueError as exc:  # inconsistent settings (TLS, tokens, peers): say which, without a traceback
        raise click.UsageError(str(exc)) from None
    location = f"{config.scheme}://{'127.0.0.1' if config.host == '0.0.0.0' else config.host}:{server.port}"
    stopping: list[threading.Thread] = []

    def stop(*_: object) -> None:
        stopping.append(threading.Thread(target=server.shutdown, name="shutdown", daemon=True))
        stopping[-1].start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    _reload_on_sighup(server)
    if demo:
        from flight_server.demo import load_demo

        load_demo(location, _writer_token(config.auth_tokens))
    log.info(
        'ready: try  python -c "from flight_client import read_flight; '
        "print(read_flight('%s', 'demo.driver_stats', limit=5))\"",
        location,
    )
    # Start-up's objects (modules, the catalog, the components: ~150,000 of them) never become garbage: out of the
    # collector's sight, a full collection takes a millisecond instead of stalling every thread for ~90 ms. Start-up's
    # garbage is collected first, or it would be frozen (kept) with them.
    gc.collect()
    gc.freeze()
    server.serve()
    # `serve` returns once calls stop; the shutdown then closes the server's parts (their threads joined, DuckDB
    # closed). Exiting before that ends the interpreter under threads still in native code: an abort (SIGABRT).
    for thread in stopping:
        thread.join()
    log.info("stopped")
    # Everything the server owns is closed now. Native libraries' own threads still joinable at exit made their
    # static destructors abort the process now and then ("terminate called without an active exception", SIGABRT,
    # after a clean stop): the process ends here, its logs flushed, exit status 0.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _config(catalog_config: str | None, catalog_property: tuple[str, ...], fields: dict[str, Any]) -> ServerConfig:
    """The settings, and the catalog as base/config.py's `catalog_settings` finds it. `--catalog-name` counts
    only when given (flag or variable): naming a catalog is what makes pyiceberg's configuration apply."""
    config = ServerConfig(**fields)  # the options that fill a field are named after it, and in its unit
    try:
        flags = parse_property_flags(catalog_property)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--catalog-property") from None
    named = click.get_current_context().get_parameter_source("catalog_name") != ParameterSource.DEFAULT
    try:
        config.catalog_name, config.catalog_properties = catalog_settings(
            config.catalog_name if named else None, catalog_config, flags
        )
    except CatalogError as exc:
        raise StartError(str(exc)) from None
    return config


def _check_port(config: ServerConfig) -> None:
    """Refuse a port another process holds, in one line, before the catalog opens: gRPC would log its own
    error and pyarrow raise only "Server did not start properly"."""
    if not config.port:
        return
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    try:
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: a closed connection's port is free
            probe.bind((config.host, config.port))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise StartError(f"cannot listen on {config.scheme}://{config.host}:{config.port}: {reason.lower()}") from None


def _reload_on_sighup(server: FeatureFlightServer) -> None:
    """Re-read the tokens file on every SIGHUP (`kill -HUP`, `docker compose kill -s HUP`).

    The main thread waits in C++ (`serve`) and so never runs a Python signal handler; but Python's
    C-level handler writes each signal's number to the wakeup descriptor, whichever thread the
    signal lands on, and a thread of ours reads them there.
    """
    signals, wakeup = socket.socketpair()
    wakeup.setblocking(False)
    signal.set_wakeup_fd(wakeup.fileno())
    signal.signal(signal.SIGHUP, lambda *_: None)  # handled below; without a handler SIGHUP would end the process

    def reload(wakeup: socket.socket) -> None:  # holds `wakeup` open: the handler writes to it
        while numbers := signals.recv(64):
            if signal.SIGHUP in numbers:
                logging.getLogger("flight_server").info("SIGHUP: reloading the tokens file")
                server.reload_tokens()

    threading.Thread(target=reload, args=(wakeup,), name="sighup", daemon=True).start()


def _writer_token(tokens: list[dict[str, Any]]) -> str | None:
    """A token that may read and write namespace `demo`, for loading the demo through the server's own API."""
    for entry in tokens:
        if {READ, WRITE} <= set(entry["permissions"]) and "demo" in entry.get("namespaces", ["demo"]):
            return entry["token"]
    if tokens:
        raise click.UsageError("--demo with authentication needs a token with read and write permission on 'demo'")
    return None


@main.command()
@options(HEALTH_SETTINGS)
def health(catalog: bool, **connection: Any) -> None:
    """Ask a server for its `health` action; exit 0 when it answers ok (for container health checks)."""
    status = _ask(connection, lambda client: client.health(catalog=catalog))
    click.echo(json.dumps(status))
    if status.get("status") != "ok":
        sys.exit(1)


@main.command()
@options(CALLS_SETTINGS)
@click.option("--json", "as_json", is_flag=True, help="Print the `calls` action's reply as JSON.")
def calls(as_json: bool, **connection: Any) -> None:
    """List the calls a server is running now, the longest running first (its `calls` action; an admin token when
    the server requires authentication)."""
    reply = _ask(connection, lambda client: client.calls())
    if as_json:
        click.echo(json.dumps(reply))
    elif not reply["tracked"]:
        click.echo("the server does not track calls: start it with --metrics-port or --log-format json")
    else:
        click.echo(_calls_table(reply["calls"]))


def _ask(connection: dict[str, Any], ask: Callable[[FeatureClient], dict[str, Any]]) -> dict[str, Any]:
    """`ask` a running server over a client connected as the command's options say (`CALLS_SETTINGS`: location,
    token, TLS files, timeout); its failure as one line."""
    from flight_client import FeatureClient, FeatureServerError

    location = connection["location"]
    try:
        with FeatureClient(
            location,
            timeout=connection["timeout"],
            token=connection["token"],
            tls_root_certs=connection["tls_root_certs"],
            cert_chain=connection["tls_cert_chain"],
            private_key=connection["tls_private_key"],
        ) as client:
            return ask(client)
    except (FeatureServerError, OSError) as exc:  # the client's one line (UnavailableError: nothing listens there)
        raise click.ClickException(f"{location}: {exc}") from None


def _calls_table(calls: list[dict[str, Any]]) -> str:
    """The running calls as a plain table, a line each."""
    header = ("seconds", "method", "kind", "caller", "tables", "rows in", "rows out", "peer", "request id")
    rows = [header] + [
        (
            f"{call['seconds']:.1f}",
            call["method"],
            call["kind"] or "-",
            call["caller"] or "-",
            ",".join(call["tables"]) or "-",
            "-" if call["rows_received"] is None else str(call["rows_received"]),
            "-" if call["rows_sent"] is None else str(call["rows_sent"]),
            call["peer"] or "-",
            call["request_id"],
        )
        for call in calls
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


@main.command("remove-orphan-files")
@click.argument("table")
@click.option("--older-than", help="Delete only files last modified before this ISO-8601 time.  [default: 3 days ago]")
@click.option("--dry-run", is_flag=True, help="List the orphan files; delete nothing.")
@options(CATALOG_SETTINGS)
def remove_orphan_files(
    table: str,
    older_than: str | None,
    dry_run: bool,
    catalog_config: str | None,
    catalog_property: tuple[str, ...],
    **fields: Any,
) -> None:
    """Delete the files under TABLE's folders that its metadata does not reference (left by a server that
    died during a put), opening the catalog as `serve` does; prints what it found and deleted as JSON."""
    from flight_server.changes.orphans import remove_orphan_files
    from flight_server.iceberg.catalog import FeatureCatalog
    from flight_server.wire.actions import OrphanFilesRequest
    from flight_server.wire.errors import RequestError

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = _config(catalog_config, catalog_property, fields)
    try:
        catalog = FeatureCatalog(config.catalog_name, config.resolved_catalog_properties(), config.default_namespace)
    except CatalogError as exc:
        raise StartError(str(exc)) from None
    try:
        request = OrphanFilesRequest.from_body({"table": table, "older_than": older_than, "dry_run": dry_run})
        result = remove_orphan_files(catalog, request)
    except RequestError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(asdict(result)))


@main.command()
@click.option("--markdown", "as_markdown", is_flag=True, help="As the reference table of docs/configuration.md.")
def settings(as_markdown: bool) -> None:
    """List every setting of `serve`, and of `health` and `calls`: flag, environment variable, default."""
    click.echo(markdown() if as_markdown else text())
