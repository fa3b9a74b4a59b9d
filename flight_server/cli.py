"""`flight-server`: the command line that starts the server."""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING

import click

from flight_server import __version__
from flight_server.base.config import (
    ServerConfig,
    catalog_properties_from_env,
    parse_property_flags,
    read_catalog_file,
    redact,
)
from flight_server.transport.auth import READ, WRITE, load_tokens

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from flight_server.transport.service import FeatureFlightServer

GIL_SWITCH_SECONDS = 0.0005


@click.group()
@click.version_option(__version__, prog_name="flight-server")
def main() -> None:
    """Arrow Flight server for ML features stored in Apache Iceberg tables."""


@main.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    envvar="FLIGHT_SERVER_HOST",
    show_envvar=True,
    help="Address to listen on; 0.0.0.0 for every interface.",
)
@click.option(
    "--port",
    default=8815,
    show_default=True,
    type=int,
    envvar="FLIGHT_SERVER_PORT",
    show_envvar=True,
    help="TCP port for gRPC (0 picks a free one).",
)
@click.option(
    "--warehouse",
    default="./warehouse",
    show_default=True,
    envvar="FLIGHT_SERVER_WAREHOUSE",
    show_envvar=True,
    type=click.Path(file_okay=False),
    help="Folder of the embedded default (SQLite catalog + data files), created on first start. "
    "Ignored when the catalog configuration names its own warehouse.",
)
@click.option(
    "--catalog-config",
    type=click.Path(exists=True, dir_okay=False),
    envvar="FLIGHT_SERVER_CATALOG_CONFIG",
    show_envvar=True,
    help="YAML or JSON file of pyiceberg catalog properties (type, uri, warehouse, s3.endpoint, ...). "
    "Without it (and without FLIGHT_SERVER_CATALOG__* variables) the embedded default is used.",
)
@click.option(
    "--catalog-property",
    "catalog_property",
    multiple=True,
    metavar="KEY=VALUE",
    help="One catalog property, overriding the file and the environment; repeatable.",
)
@click.option(
    "--catalog-name",
    default="default",
    show_default=True,
    envvar="FLIGHT_SERVER_CATALOG_NAME",
    show_envvar=True,
    help="Name of the catalog (pyiceberg's SQL catalogs keep tables per name).",
)
@click.option(
    "--namespace",
    default="default",
    show_default=True,
    envvar="FLIGHT_SERVER_NAMESPACE",
    show_envvar=True,
    help="Namespace for table names given without one.",
)
@click.option(
    "--duckdb-memory-limit",
    default="4GB",
    show_default=True,
    envvar="FLIGHT_SERVER_DUCKDB_MEMORY_LIMIT",
    show_envvar=True,
    help="Memory DuckDB may use for queries before it spills to disk.",
)
@click.option(
    "--duckdb-threads",
    type=int,
    envvar="FLIGHT_SERVER_DUCKDB_THREADS",
    show_envvar=True,
    help="Threads DuckDB uses per query [default: number of cores].",
)
@click.option(
    "--duckdb-temp-dir",
    type=click.Path(file_okay=False),
    envvar="FLIGHT_SERVER_DUCKDB_TEMP_DIR",
    show_envvar=True,
    help="Where DuckDB spills when a query exceeds its memory limit.",
)
@click.option(
    "--batch-rows",
    default=131_072,
    show_default=True,
    type=int,
    envvar="FLIGHT_SERVER_BATCH_ROWS",
    show_envvar=True,
    help="Rows per record batch in streamed results.",
)
@click.option(
    "--scan-partitions",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    envvar="FLIGHT_SERVER_SCAN_PARTITIONS",
    show_envvar=True,
    help="Endpoints get_flight_info splits a whole-table scan into when the request does not ask for a "
    "number ('partitions'); clients fetch them in parallel.",
)
@click.option(
    "--historical-partitions",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    envvar="FLIGHT_SERVER_HISTORICAL_PARTITIONS",
    show_envvar=True,
    help="Endpoints get_flight_info splits a training set over a server-side entity table into (by entity "
    "key) when the request does not ask for a number ('partitions').",
)
@click.option(
    "--historical-cache-mb",
    default=4096,
    show_default=True,
    type=click.IntRange(0),
    envvar="FLIGHT_SERVER_HISTORICAL_CACHE_MB",
    show_envvar=True,
    help="Memory for feature-table snapshots sorted for training sets (kept between requests, least recently "
    "used dropped first); a table larger than this is joined by DuckDB instead. 0: always DuckDB.",
)
@click.option(
    "--write-chunk-mb",
    default=128,
    show_default=True,
    type=click.IntRange(1),
    envvar="FLIGHT_SERVER_WRITE_CHUNK_MB",
    show_envvar=True,
    help="Memory a write may buffer before it writes Parquet files; bounds memory per concurrent put.",
)
@click.option(
    "--online-table",
    "online_tables",
    multiple=True,
    envvar="FLIGHT_SERVER_ONLINE_TABLES",
    show_envvar=True,
    help="Build this table's online index at start-up (repeatable; the variable takes a space-separated "
    "list). Other tables are indexed on their first online request.",
)
@click.option(
    "--online-refresh-seconds",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0.01),
    envvar="FLIGHT_SERVER_ONLINE_REFRESH_SECONDS",
    show_envvar=True,
    help="How often the online indexes poll the catalog for new snapshots (freshness of online reads).",
)
@click.option(
    "--online-max-mb",
    default=2048,
    show_default=True,
    type=click.IntRange(1),
    envvar="FLIGHT_SERVER_ONLINE_MAX_MB",
    show_envvar=True,
    help="Memory all online indexes together may take; a table that would pass it is refused.",
)
@click.option(
    "--advertise",
    metavar="URI",
    envvar="FLIGHT_SERVER_ADVERTISE",
    show_envvar=True,
    help="The address clients reach this server at (e.g. grpc://flight-1:8815). With --peer, get_flight_info "
    "spreads the endpoints of split scans and training sets over this server and its peers, round robin.",
)
@click.option(
    "--peer",
    "peers",
    multiple=True,
    metavar="URI",
    envvar="FLIGHT_SERVER_PEERS",
    show_envvar=True,
    help="Another replica on the same catalog, as clients reach it (repeatable; the variable takes a "
    "space-separated list). Needs --advertise.",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False),
    envvar="FLIGHT_SERVER_TLS_CERT",
    show_envvar=True,
    help="PEM certificate (chain) of the server: serve grpc+tls instead of plain grpc. Needs --tls-key.",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False),
    envvar="FLIGHT_SERVER_TLS_KEY",
    show_envvar=True,
    help="PEM private key of --tls-cert.",
)
@click.option(
    "--tls-client-ca",
    type=click.Path(exists=True, dir_okay=False),
    envvar="FLIGHT_SERVER_TLS_CLIENT_CA",
    show_envvar=True,
    help="PEM CA certificate(s): require mutual TLS, accepting only client certificates they signed.",
)
@click.option(
    "--auth-tokens-file",
    type=click.Path(exists=True, dir_okay=False),
    envvar="FLIGHT_SERVER_AUTH_TOKENS_FILE",
    show_envvar=True,
    help="JSON or YAML list of bearer tokens ({name, token, permissions: [read, write, admin], namespaces}); "
    "FLIGHT_SERVER_AUTH_TOKENS may hold the same list. With any token, every call needs one.",
)
@click.option(
    "--max-concurrent-requests",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    envvar="FLIGHT_SERVER_MAX_CONCURRENT_REQUESTS",
    show_envvar=True,
    help="Calls (streams included, until they end) served at once; more are refused with RESOURCE_EXHAUSTED. "
    "0: no limit.",
)
@click.option(
    "--max-request-kb",
    default=1024,
    show_default=True,
    type=click.IntRange(1),
    envvar="FLIGHT_SERVER_MAX_REQUEST_KB",
    show_envvar=True,
    help="Largest ticket, descriptor or action body (inline entity rows included); larger requests are "
    "refused with RESOURCE_EXHAUSTED (stream rows with do_exchange instead).",
)
@click.option(
    "--max-exchange-mb",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    envvar="FLIGHT_SERVER_MAX_EXCHANGE_MB",
    show_envvar=True,
    help="Entity rows (Arrow size) one streamed training set may send; more are refused with "
    "RESOURCE_EXHAUSTED. They spill to --duckdb-temp-dir beyond the memory limit. 0: no limit.",
)
@click.option(
    "--max-concurrent-per-caller",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    envvar="FLIGHT_SERVER_MAX_CONCURRENT_PER_CALLER",
    show_envvar=True,
    help="Calls one token (by its name) may run at once, so that one caller cannot take every slot of "
    "--max-concurrent-requests; more are refused with RESOURCE_EXHAUSTED. 0: no limit.",
)
@click.option(
    "--max-batch-mb",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    envvar="FLIGHT_SERVER_MAX_BATCH_MB",
    show_envvar=True,
    help="Largest record batch (Arrow size) a client may send in a put or an exchange; a larger one ends the "
    "call with RESOURCE_EXHAUSTED. 0: no limit (gRPC's 2 GiB).",
)
@click.option(
    "--idle-timeout-seconds",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0),
    envvar="FLIGHT_SERVER_IDLE_TIMEOUT_SECONDS",
    show_envvar=True,
    help="End a call whose client has not read results (or not sent its stream) for this long, by closing "
    "its connection: its slot and memory are freed. Linux only. 0: never.",
)
@click.option(
    "--demo/--no-demo",
    default=False,
    show_default=True,
    envvar="FLIGHT_SERVER_DEMO",
    show_envvar=True,
    help="Load the demo feature tables (namespace 'demo') at start if they are missing.",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    envvar="FLIGHT_SERVER_LOG_LEVEL",
    show_envvar=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Logging detail.",
)
def serve(
    host: str,
    port: int,
    warehouse: str,
    catalog_config: str | None,
    catalog_property: tuple[str, ...],
    catalog_name: str,
    namespace: str,
    duckdb_memory_limit: str,
    duckdb_threads: int | None,
    duckdb_temp_dir: str | None,
    batch_rows: int,
    scan_partitions: int,
    historical_partitions: int,
    historical_cache_mb: int,
    write_chunk_mb: int,
    online_tables: tuple[str, ...],
    online_refresh_seconds: float,
    online_max_mb: int,
    advertise: str | None,
    peers: tuple[str, ...],
    tls_cert: str | None,
    tls_key: str | None,
    tls_client_ca: str | None,
    auth_tokens_file: str | None,
    max_concurrent_requests: int,
    max_request_kb: int,
    max_exchange_mb: int,
    max_concurrent_per_caller: int,
    max_batch_mb: int,
    idle_timeout_seconds: float,
    demo: bool,
    log_level: str,
) -> None:
    """Serve feature tables over Arrow Flight until interrupted (Ctrl-C or SIGTERM)."""
    # An online lookup takes the GIL a few times for ~0.1 ms each; while a write or an index refresh
    # runs Python code, the default 5 ms switch interval would make each of those waits up to 5 ms.
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    properties = read_catalog_file(catalog_config) if catalog_config else {}
    properties.update(catalog_properties_from_env())
    try:
        properties.update(parse_property_flags(catalog_property))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--catalog-property") from None
    try:
        tokens = load_tokens(auth_tokens_file)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--auth-tokens-file / FLIGHT_SERVER_AUTH_TOKENS") from None
    if demo and tls_cert:
        raise click.UsageError("--demo loads its tables over plain grpc on loopback: load them without TLS first")
    config = ServerConfig(
        host=host,
        port=port,
        warehouse=warehouse,
        catalog_name=catalog_name,
        catalog_properties=properties,
        default_namespace=namespace,
        batch_rows=batch_rows,
        scan_partitions=scan_partitions,
        historical_partitions=historical_partitions,
        historical_cache_bytes=historical_cache_mb << 20,
        write_chunk_bytes=write_chunk_mb << 20,
        duckdb_memory_limit=duckdb_memory_limit,
        duckdb_threads=duckdb_threads,
        duckdb_temp_dir=duckdb_temp_dir,
        online_tables=list(online_tables),
        online_refresh_seconds=online_refresh_seconds,
        online_max_bytes=online_max_mb << 20,
        advertise=advertise,
        peers=[p for value in peers for p in value.split()],
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        auth_tokens=tokens,
        auth_tokens_file=auth_tokens_file,
        max_concurrent_requests=max_concurrent_requests,
        max_request_bytes=max_request_kb << 10,
        max_exchange_bytes=max_exchange_mb << 20,
        max_concurrent_per_caller=max_concurrent_per_caller,
        max_batch_bytes=max_batch_mb << 20,
        idle_timeout_seconds=idle_timeout_seconds,
    )
    from flight_server.transport.service import FeatureFlightServer

    try:
        server = FeatureFlightServer(config)
    except ValueError as exc:  # inconsistent settings (TLS, tokens, peers): say which, without a traceback
        raise click.UsageError(str(exc)) from None
    log = logging.getLogger("flight_server")
    log.info("catalog properties: %s", redact(config.resolved_catalog_properties()))
    location = f"{config.scheme}://{'127.0.0.1' if host == '0.0.0.0' else host}:{server.port}"
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    _reload_on_sighup(server)
    if demo:
        from flight_server.demo import load_demo

        load_demo(location, _writer_token(tokens))
    log.info(
        'ready: try  python -c "from flight_client import read_flight; '
        "print(read_flight('%s', 'demo.driver_stats', limit=5))\"",
        location,
    )
    server.serve()
    log.info("stopped")


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


def _writer_token(tokens: list[dict]) -> str | None:
    """A token that may read and write namespace `demo`, for loading the demo through the server's own API."""
    for entry in tokens:
        if {READ, WRITE} <= set(entry["permissions"]) and "demo" in entry.get("namespaces", ["demo"]):
            return entry["token"]
    if tokens:
        raise click.UsageError("--demo with authentication needs a token with read and write permission on 'demo'")
    return None


@main.command()
@click.option(
    "--location",
    default="grpc://127.0.0.1:8815",
    show_default=True,
    envvar="FLIGHT_SERVER_HEALTH_LOCATION",
    show_envvar=True,
    help="The server to check.",
)
@click.option(
    "--token",
    envvar="FLIGHT_SERVER_HEALTH_TOKEN",
    show_envvar=True,
    help="Bearer token (any permission) when the server requires authentication.",
)
@click.option(
    "--tls-root-certs",
    type=click.Path(exists=True, dir_okay=False),
    envvar="FLIGHT_SERVER_HEALTH_TLS_ROOT_CERTS",
    show_envvar=True,
    help="PEM CA certificate of a grpc+tls server [default: the system's].",
)
@click.option(
    "--tls-cert-chain",
    type=click.Path(exists=True, dir_okay=False),
    envvar="FLIGHT_SERVER_HEALTH_TLS_CERT_CHAIN",
    show_envvar=True,
    help="PEM client certificate, for a server that requires mutual TLS (with --tls-private-key).",
)
@click.option(
    "--tls-private-key",
    type=click.Path(exists=True, dir_okay=False),
    envvar="FLIGHT_SERVER_HEALTH_TLS_PRIVATE_KEY",
    show_envvar=True,
    help="PEM private key of --tls-cert-chain.",
)
@click.option("--timeout", default=5.0, show_default=True, type=float, help="Seconds to wait for the answer.")
def health(
    location: str,
    token: str | None,
    tls_root_certs: str | None,
    tls_cert_chain: str | None,
    tls_private_key: str | None,
    timeout: float,
) -> None:
    """Ask a server for its `health` action; exit 0 when it answers ok (for container health checks)."""
    from flight_client import FeatureClient, FeatureServerError

    try:
        with FeatureClient(
            location,
            timeout=timeout,
            token=token,
            tls_root_certs=tls_root_certs,
            cert_chain=tls_cert_chain,
            private_key=tls_private_key,
        ) as client:
            status = client.health()
    except (FeatureServerError, OSError) as exc:
        raise click.ClickException(f"{location}: {exc}") from None
    click.echo(json.dumps(status))
    if status.get("status") != "ok":
        sys.exit(1)
