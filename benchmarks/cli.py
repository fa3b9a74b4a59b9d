"""`flight-bench`: the command line that runs the benchmarks and prints (and optionally saves) their results."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import click

from benchmarks import historical, ingest, partitioning, report, scan
from benchmarks.harness import Settings, machine, target
from flight_client import FeatureServerError

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
    "partitioning": Benchmark(partitioning.run, partitioning.render, rows=1_000_000, features=8),
    # rows: of the largest of its 3 feature tables (the others get 1/4 and 1/2); features: per table.
    "historical": Benchmark(historical.run, historical.render, rows=historical.FEATURE_ROWS, features=3,
                            rows_per_entity=historical.ROWS_PER_ENTITY),
}


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
    click.option("--rows", type=click.IntRange(1), help="Rows per generated table [default: per benchmark; "
                 f"{QUICK_ROWS:,} with --quick]."),
    click.option("--entities", type=click.IntRange(1),
                 help="Distinct entity keys [default: rows / 20; historical rows / 100]."),
    click.option("--seed", type=int, default=42, show_default=True, help="Seed of the data generator."),
    click.option("--features", type=click.IntRange(0),
                 help="Feature columns (ingest: of the wide table; historical: per table) [default: 8; ingest 47; "
                      "historical 3]."),
    click.option("--repeat", type=click.IntRange(1),
                 help=f"Timed runs of each measurement [default: {REPEAT}; {QUICK_REPEAT} with --quick]."),
    click.option("--warmup", type=click.IntRange(0), help="Untimed runs first [default: 1; 0 with --quick]."),
    click.option("--quick", is_flag=True,
                 help="Tiny data and few runs: proves the benchmarks work (the tests use it), measures nothing."),
    click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
                 help="Also write the results and a description of the machine to this JSON file."),
    click.option("--location", metavar="URI",
                 help="Measure a running server (e.g. grpc://host:8815) instead of starting one; its bench.* tables "
                      "stay behind, and baselines that need its warehouse are skipped."),
]


def common_options(command: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def machine_line(info: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if k != "iceberg-feature-flight")
    memory = f"{info['memory_bytes'] / 2**30:.1f} GiB" if info["memory_bytes"] else "? GiB"
    load = f"{info['load_average_1m']:.2f}" if info["load_average_1m"] is not None else "?"
    return (f"machine: {info['cpu']}, {info['usable_cores']} cores, {memory}, load average {load}; "
            f"Python {info['python']}, {versions}")


def execute(names: list[str], options: Options, extra: dict[str, dict[str, Any]] | None = None) -> None:
    """Run the named benchmarks, each against its own fresh server unless `--location` names one."""
    info = machine()
    click.echo(machine_line(info))
    payload: dict[str, Any] = {"machine": info, "benchmarks": {}}
    for name in names:
        benchmark = BENCHMARKS[name]
        settings = options.settings(benchmark)
        report.progress(f"{name}: {'using ' + options.location if options.location else 'starting a server'}")
        try:
            with target(options.location) as server:
                result = benchmark.run(server, settings, **(extra or {}).get(name, {}))
                peak = server.peak_rss_bytes()
        except (RuntimeError, FeatureServerError) as exc:
            raise click.ClickException(f"{name}: {exc}") from exc
        result["settings"] = dataclasses.asdict(settings)
        result["server"] = {"location": options.location or "local", "peak_rss_bytes": peak}
        payload["benchmarks"][name] = result
        click.echo()
        click.echo(benchmark.render(result))
        if peak is not None:
            click.echo(f"server peak RSS: {peak / 2**20:.0f} MiB")
    if options.json_path is not None:
        report.write_json(options.json_path, payload)
        report.progress(f"results written to {options.json_path}")


@click.group()
def main() -> None:
    """Benchmarks of the feature Flight server: scans, ingest, partitioning and training sets, each next to its
    ceiling or baseline.

    Each subcommand starts its own server on a temporary warehouse unless --location names one.
    Results go to stdout as a table, progress to stderr.
    """


@main.command("scan")
@common_options
def scan_command(**kwargs: Any) -> None:
    """Full-table scan into Arrow and pandas, against the raw Flight ceiling and in-process readers."""
    execute(["scan"], Options(**kwargs))


@main.command("ingest")
@common_options
def ingest_command(**kwargs: Any) -> None:
    """Appends (narrow and wide tables, two batch sizes, 1 and 4 writers), against a local Parquet write."""
    execute(["ingest"], Options(**kwargs))


@main.command("partitioning")
@common_options
def partitioning_command(**kwargs: Any) -> None:
    """Writes, key lookups and time-range scans with the default partitioning, against an unpartitioned table."""
    execute(["partitioning"], Options(**kwargs))


@main.command("historical")
@common_options
@click.option("--entity-rows", type=click.IntRange(1),
              help="Entity rows to join [default: rows / 10, so 1,000,000; 2,000 with --quick].")
def historical_command(entity_rows: int | None, **kwargs: Any) -> None:
    """Point-in-time training sets (3 feature tables) into pandas, against DuckDB and pandas merge_asof in process."""
    execute(["historical"], Options(**kwargs), {"historical": {"entity_rows": entity_rows}})


@main.command("all")
@common_options
def all_command(**kwargs: Any) -> None:
    """Every benchmark, one after the other, into one report."""
    execute(list(BENCHMARKS), Options(**kwargs))
