"""`flight-bench`: the command line that runs the benchmarks and prints (and optionally saves) their results."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import click
import strictyaml

from benchmarks import (
    cow_mor,
    historical,
    history,
    ingest,
    integrations,
    online,
    parquet,
    partitioning,
    plots,
    report,
    scale,
    scan,
    shards,
)
from benchmarks.harness import Settings, machine, target
from flight_client import FeatureServerError
from flight_server.base.config import read_catalog_file

QUICK_ROWS = 20_000
QUICK_REPEAT = 2
REPEAT = 5


class Benchmark(NamedTuple):
    """A benchmark's entry points and its default sizes."""

    run: Callable[..., dict[str, Any]]  # (Target, Settings, **options of its own subcommand)
    render: Callable[[dict[str, Any]], str]
    rows: int
    features: int
    rows_per_entity: int = 20  # the default --entities is rows / this


# Default sizes keep each benchmark within a few minutes on a 2-core machine.
BENCHMARKS = {
    "scan": Benchmark(scan.run, scan.render, rows=2_000_000, features=8),
    "ingest": Benchmark(ingest.run, ingest.render, rows=500_000, features=47),
    "parquet": Benchmark(parquet.run, parquet.render, rows=1_000_000, features=8),
    "partitioning": Benchmark(partitioning.run, partitioning.render, rows=1_000_000, features=8),
    # rows: of the largest of its 3 feature tables (the others get 1/4 and 1/2); features: per table.
    "historical": Benchmark(
        historical.run,
        historical.render,
        rows=historical.FEATURE_ROWS,
        features=3,
        rows_per_entity=historical.ROWS_PER_ENTITY,
    ),
    "online": Benchmark(online.run, online.render, rows=1_000_000, features=8, rows_per_entity=10),
    "cow-vs-mor": Benchmark(cow_mor.run, cow_mor.render, rows=1_000_000, features=8),
    "scale": Benchmark(scale.run, scale.render, rows=1_000_000, features=8),
    # rows: of the feature table (entity rows: a tenth); like scale, it starts servers of its own.
    "shards": Benchmark(shards.run, shards.render, rows=2_000_000, features=4),
    # rows: the one-row puts (--quick: history.QUICK_PUTS, set by its subcommand).
    "history": Benchmark(history.run, history.render, rows=history.PUTS, features=8, rows_per_entity=10),
    # rows: of the feature table; entity rows: as many, at most integrations.ENTITY_ROWS. Needs the torch, ray extras.
    "integrations": Benchmark(integrations.run, integrations.render, rows=1_000_000, features=8, rows_per_entity=10),
}
# `all` leaves out `scale`, which starts servers of its own and cannot measure a server given by --location, and
# `history`, which measures how a table's history grows rather than a steady state.
ALL = ["scan", "ingest", "partitioning", "historical", "online", "cow-vs-mor"]


@dataclasses.dataclass(frozen=True)
class Options:
    """The command-line options every subcommand takes; unset sizes fall back to each benchmark's default."""

    rows: int | None
    entities: int | None
    seed: int
    features: int | None
    repeat: int | None
    warmup: int | None
    quick: bool
    json_path: Path | None
    location: str | None
    plot_dir: Path | None
    catalog_config: Path | None

    def settings(self, benchmark: Benchmark) -> Settings:
        rows = self.rows or (QUICK_ROWS if self.quick else benchmark.rows)
        return Settings(
            rows=rows,
            entities=self.entities or max(1, rows // benchmark.rows_per_entity),
            seed=self.seed,
            features=benchmark.features if self.features is None else self.features,
            repeat=self.repeat or (QUICK_REPEAT if self.quick else REPEAT),
            warmup=(0 if self.quick else 1) if self.warmup is None else self.warmup,
        )


_OPTIONS = [
    click.option(
        "--rows",
        type=click.IntRange(1),
        help=f"Rows per generated table [default: per benchmark; {QUICK_ROWS:,} with --quick].",
    ),
    click.option(
        "--entities",
        type=click.IntRange(1),
        help="Distinct entity keys [default: rows / 20; historical rows / 100; history rows / 10].",
    ),
    click.option("--seed", type=int, default=42, show_default=True, help="Seed of the data generator."),
    click.option(
        "--features",
        type=click.IntRange(0),
        help="Feature columns (ingest: of the wide table; historical: per table) [default: 8; ingest 47; "
        "historical 3].",
    ),
    click.option(
        "--repeat",
        type=click.IntRange(1),
        help=f"Timed runs of each measurement [default: {REPEAT}; {QUICK_REPEAT} with --quick].",
    ),
    click.option("--warmup", type=click.IntRange(0), help="Untimed runs first [default: 1; 0 with --quick]."),
    click.option(
        "--quick",
        is_flag=True,
        help="Tiny data and few runs: proves the benchmarks work (the tests use it), measures nothing.",
    ),
    click.option(
        "--json",
        "json_path",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Also write the results and a description of the machine to this JSON file.",
    ),
    click.option(
        "--location",
        metavar="URI",
        help="Measure a running server (e.g. grpc://host:8815) instead of starting one; its bench.* tables "
        "stay behind, and baselines that need its warehouse are skipped.",
    ),
    click.option(
        "--catalog-config",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        metavar="FILE",
        help="Start the benchmark's server on the catalog described by this YAML or JSON file of pyiceberg "
        "catalog properties (type, uri, warehouse, s3.endpoint, ...; as flight-server serve "
        "--catalog-config) instead of the embedded default on a temporary warehouse. The in-process "
        "baselines read through the same catalog, DuckDB with its S3 credentials. Its bench.* tables "
        "stay behind. Not with --location.",
    ),
    click.option(
        "--plot",
        "plot_dir",
        type=click.Path(file_okay=False, path_type=Path),
        metavar="DIR",
        help="Also draw the results as PNG charts into DIR (created if missing), one per benchmark: "
        f"scan.png, ingest.png, ... Needs matplotlib: {plots.INSTALL_HINT}.",
    ),
]


def common_options(command: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def check_options(options: Options) -> None:
    """Refuse what would fail only after the benchmarks ran (or would quietly mean something else), up front."""
    if options.catalog_config is not None:
        if options.location is not None:
            raise click.UsageError(
                "--catalog-config configures the server the benchmark starts; a server given by "
                "--location already has its catalog: use one or the other"
            )
        try:
            read_catalog_file(options.catalog_config)
        except (OSError, ValueError, strictyaml.YAMLError) as exc:
            raise click.BadParameter(f"{options.catalog_config}: {exc}", param_hint="--catalog-config") from None
    if options.plot_dir is not None:
        plots.require()
        prepare_plot_dir(options.plot_dir)


def prepare_plot_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.BadParameter(f"cannot create {directory}: {exc}", param_hint="--plot") from None


def write_plots(payload: dict[str, Any], directory: Path) -> None:
    try:
        written = plots.write(payload, directory)
    except OSError as exc:
        raise click.ClickException(f"cannot write the charts to {directory}: {exc}") from None
    report.progress(f"charts written: {', '.join(str(path) for path in written)}")


def execute(names: list[str], options: Options, extra: dict[str, dict[str, Any]] | None = None) -> None:
    """Run the named benchmarks, each against its own fresh server unless `--location` names one."""
    check_options(options)
    info = machine()
    click.echo(report.machine_line(info))
    payload: dict[str, Any] = {"machine": info, "benchmarks": {}}
    for name in names:
        benchmark = BENCHMARKS[name]
        settings = options.settings(benchmark)
        where = (
            f"using {options.location}"
            if options.location
            else f"starting a server on the catalog of {options.catalog_config}"
            if options.catalog_config
            else "starting a server"
        )
        report.progress(f"{name}: {where}")
        try:
            with target(options.location, options.catalog_config) as server:
                result = benchmark.run(server, settings, **(extra or {}).get(name, {}))
                peak = server.peak_rss()
        except (RuntimeError, FeatureServerError) as exc:
            raise click.ClickException(f"{name}: {exc}") from exc
        result["settings"] = dataclasses.asdict(settings)
        result["server"] = {
            "location": options.location or "local",
            "peak_rss_bytes": peak.serving if peak else None,  # the serving process's, as before the write process
            "write_process_peak_rss_bytes": peak.write if peak else None,
        }
        payload["benchmarks"][name] = result
        click.echo()
        click.echo(benchmark.render(result))
        if peak is not None:
            click.echo(f"server peak RSS: {peak.describe()}")
    if options.json_path is not None:
        report.write_json(options.json_path, payload)
        report.progress(f"results written to {options.json_path}")
    if options.plot_dir is not None:
        write_plots(payload, options.plot_dir)


@click.group()
def main() -> None:
    """Benchmarks of the feature Flight server: scans, ingest, partitioning, training sets, online lookups,
    deletes (copy-on-write against merge-on-read) and a table's growing history, each next to its ceiling or
    baseline.

    Each subcommand starts its own server on a temporary warehouse (or on the catalog of --catalog-config)
    unless --location names one. Results go to stdout as a table, progress to stderr; --json and --plot
    also save them as JSON and as PNG charts, and `plot` redraws the charts of saved JSON files.
    """


@main.command("scan")
@common_options
def scan_command(**kwargs: Any) -> None:
    """Full-table scan into Arrow (one stream, and parallel endpoints) and pandas, against the raw Flight ceiling
    and in-process readers."""
    execute(["scan"], Options(**kwargs))


@main.command("ingest")
@common_options
def ingest_command(**kwargs: Any) -> None:
    """Appends (narrow and wide tables, two batch sizes, 1 and 4 writers), against a local Parquet write."""
    execute(["ingest"], Options(**kwargs))


@main.command("parquet")
@common_options
def parquet_command(**kwargs: Any) -> None:
    """Decode speed against file size for Parquet settings (codec and level, page and row-group sizes, dictionary,
    statistics): pyarrow's decode of a local file in process, and the server's cold scan of a table written with
    each setting through its write.parquet.* properties."""
    execute(["parquet"], Options(**kwargs))


@main.command("partitioning")
@common_options
def partitioning_command(**kwargs: Any) -> None:
    """Writes, key lookups and time-range scans with the default partitioning, against an unpartitioned table."""
    execute(["partitioning"], Options(**kwargs))


@main.command("historical")
@common_options
@click.option(
    "--entity-rows",
    type=click.IntRange(1),
    help="Entity rows to join [default: rows / 10, so 1,000,000; 2,000 with --quick].",
)
def historical_command(entity_rows: int | None, **kwargs: Any) -> None:
    """Point-in-time training sets (3 feature tables) into pandas, against DuckDB and pandas merge_asof in process."""
    execute(["historical"], Options(**kwargs), {"historical": {"entity_rows": entity_rows}})


@main.command("online")
@common_options
@click.option(
    "--requests",
    type=click.IntRange(1),
    help=f"Lookups per batch size [default: {online.REQUESTS:,} (a tenth for batches of 1000); "
    f"{online.QUICK_REQUESTS} with --quick].",
)
def online_command(requests: int | None, **kwargs: Any) -> None:
    """Online lookups of 1-1000 entities: latency percentiles alone and beside a writer, against the raw Flight
    floor and DuckDB without the index; freshness after a put."""
    options = Options(**kwargs)
    requests = requests or (online.QUICK_REQUESTS if options.quick else online.REQUESTS)
    execute(["online"], options, {"online": {"requests": requests}})


@main.command("scale")
@common_options
@click.option(
    "--replicas",
    metavar="N,N,...",
    help="Numbers of server processes to measure, comma-separated [default: 1,2,4; 1,2 with --quick].",
)
def scale_command(replicas: str | None, **kwargs: Any) -> None:
    """Whole-table reads by 4 concurrent clients against 1, 2 and 4 server processes sharing one catalog, the
    endpoints of each read spread over all of them; with the CPU the servers and the client used."""
    options = Options(**kwargs)
    if options.location is not None:
        raise click.UsageError("scale starts its own server processes: it cannot measure --location")
    counts: tuple[int, ...]
    if replicas is None:
        counts = (1, 2) if options.quick else scale.REPLICAS
    else:
        try:
            counts = tuple(int(n) for n in replicas.split(","))
        except ValueError:
            raise click.BadParameter(f"{replicas!r} is not a list of numbers", param_hint="--replicas") from None
    execute(["scale"], options, {"scale": {"replicas": counts}})


@main.command("shards")
@common_options
def shards_command(**kwargs: Any) -> None:
    """A training set over a feature table too large for one replica's training-set cache: 2 replicas that share
    its keys (each caching its share) against one server that holds it all and one that joins it with DuckDB."""
    options = Options(**kwargs)
    if options.location is not None:
        raise click.UsageError("shards starts its own server processes: it cannot measure --location")
    execute(["shards"], options)


@main.command("history")
@common_options
@click.option(
    "--puts-per-writer",
    type=click.IntRange(1),
    help=f"One-row puts of each of the {history.WRITERS[-1]} concurrent writers [default: "
    f"{history.PUTS_PER_WRITER}; {history.QUICK_PUTS_PER_WRITER} with --quick].",
)
@click.option(
    "--maintenance/--no-maintenance",
    default=False,
    show_default=True,
    help="Give the history table a compressed maintenance policy (snapshots expire after 2 s, at least 10 "
    "kept; partitions of 2 small files compacted) and run a maintenance round every second during the puts.",
)
@click.option(
    "--baseline-appends",
    type=click.IntRange(1),
    help="One-row appends of each of pyiceberg's own append loops (the baseline) [default: as many as the puts]: "
    "each append costs more than the one before, so 2,000 of them take hours on a busy machine.",
)
def history_command(
    puts_per_writer: int | None, maintenance: bool, baseline_appends: int | None, **kwargs: Any
) -> None:
    """One-row puts back to back as a table's history grows (--rows of them [default: 2,000; 40 with --quick]):
    put latency first against last, reads of the table against the same rows in one put, each on a freshly
    started server, its metadata, and 16 concurrent writers; against pyiceberg's own appends in process.
    --repeat: warm reads after each first one; --warmup does not apply (the first read is the measurement)."""
    options = Options(**kwargs)
    if options.rows is None and options.quick:
        options = dataclasses.replace(options, rows=history.QUICK_PUTS)
    quick_writers = history.QUICK_PUTS_PER_WRITER if options.quick else history.PUTS_PER_WRITER
    extra = {
        "puts_per_writer": puts_per_writer or quick_writers,
        "maintenance": maintenance,
        "baseline_appends": baseline_appends,
        "quick": options.quick,
    }
    execute(["history"], options, {"history": extra})


@main.command("integrations")
@common_options
@click.option(
    "--entity-rows",
    type=click.IntRange(1),
    help=f"Training rows to read [default: --rows, at most {integrations.ENTITY_ROWS:,}].",
)
def integrations_command(entity_rows: int | None, **kwargs: Any) -> None:
    """One epoch of a training set through PyTorch's DataLoader (2 workers) and Ray Data (2 CPUs), against the
    plain client into pandas. Needs the torch and ray extras."""
    execute(["integrations"], Options(**kwargs), {"integrations": {"entity_rows_count": entity_rows}})


def delete_files_option(value: str | None, quick: bool) -> tuple[int, ...]:
    if value is None:
        return cow_mor.QUICK_DELETE_FILES if quick else cow_mor.DELETE_FILES
    try:
        counts = tuple(int(v) for v in value.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"expected positive integers separated by commas, got {value!r}")
    return counts


@main.command("cow-vs-mor")
@common_options
@click.option(
    "--delete-files",
    metavar="N,N,...",
    help="Delete files the merge-on-read deletes are spread over [default: "
    f"{','.join(map(str, cow_mor.DELETE_FILES))}; {','.join(map(str, cow_mor.QUICK_DELETE_FILES))} with --quick].",
)
def cow_vs_mor_command(delete_files: str | None, **kwargs: Any) -> None:
    """Scans, filtered scans, training sets and online index builds of a table with 1-30 % of its rows deleted
    copy-on-write, merge-on-read (1-100 delete files) and compacted, next to pyiceberg's reader."""
    options = Options(**kwargs)
    execute(["cow-vs-mor"], options, {"cow-vs-mor": {"delete_files": delete_files_option(delete_files, options.quick)}})


@main.command("all")
@common_options
def all_command(**kwargs: Any) -> None:
    """Every benchmark, one after the other, into one report."""
    options = Options(**kwargs)
    requests = online.QUICK_REQUESTS if options.quick else online.REQUESTS
    extra: dict[str, dict[str, Any]] = {
        "online": {"requests": requests},
        "cow-vs-mor": {"delete_files": delete_files_option(None, options.quick)},
    }
    execute(ALL, options, extra)


@main.command("plot")
@click.argument(
    "json_files",
    nargs=-1,
    required=True,
    metavar="JSON...",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.option(
    "--plot",
    "plot_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Folder to draw the PNG charts into (created if missing): one per benchmark, as <benchmark>.png.",
)
def plot_command(json_files: tuple[Path, ...], plot_dir: Path) -> None:
    """Draw the charts of earlier runs from their --json files, without running anything.

    Each chart is titled with the machine of the file it comes from; a benchmark may appear in one file only.
    """
    plots.require()
    payloads = []
    seen: dict[str, Path] = {}
    for path in json_files:
        try:
            payload = json.loads(path.read_text())
            names = list(payload["benchmarks"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise click.BadParameter(
                f"{path} is not a flight-bench --json file: {exc!r}", param_hint="JSON..."
            ) from None
        for name in names:
            if name in seen:
                raise click.BadParameter(
                    f"{name} is in both {seen[name]} and {path}: its chart would be drawn twice", param_hint="JSON..."
                )
            seen[name] = path
        payloads.append(payload)
    prepare_plot_dir(plot_dir)
    for payload in payloads:
        write_plots(payload, plot_dir)


if __name__ == "__main__":  # python -m benchmarks.cli, as flight-bench (a checkout without the entry point)
    main()
