"""`flight-server`: the command line that starts the server."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from flight_server import __version__
from flight_server.config import (
    ServerConfig,
    catalog_properties_from_env,
    parse_property_flags,
    read_catalog_file,
    redact,
)

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
    write_chunk_mb: int,
    online_tables: tuple[str, ...],
    online_refresh_seconds: float,
    online_max_mb: int,
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
        write_chunk_bytes=write_chunk_mb << 20,
        duckdb_memory_limit=duckdb_memory_limit,
        duckdb_threads=duckdb_threads,
        duckdb_temp_dir=duckdb_temp_dir,
        online_tables=list(online_tables),
        online_refresh_seconds=online_refresh_seconds,
        online_max_bytes=online_max_mb << 20,
    )
    from flight_server.service import FeatureFlightServer

    server = FeatureFlightServer(config)
    log = logging.getLogger("flight_server")
    log.info("catalog properties: %s", redact(config.resolved_catalog_properties()))
    location = f"grpc://{'127.0.0.1' if host == '0.0.0.0' else host}:{server.port}"
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    if demo:
        from flight_server.demo import load_demo

        load_demo(location)
    log.info(
        'ready: try  python -c "from flight_client import read_flight; '
        "print(read_flight('%s', 'demo.driver_stats', limit=5))\"",
        location,
    )
    server.serve()
    log.info("stopped")
