"""`flight-bench --quick` end to end, so the benchmarks never rot: every subcommand runs and reports sane figures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute below)
import pytest
from click.testing import CliRunner
from pyiceberg.catalog import load_catalog

from benchmarks.cli import main
from benchmarks.datagen import (
    CHANNEL,
    CREATED_TIME,
    ENTITY_KEY,
    ENTITY_TIME,
    EVENT_TIME,
    LABEL,
    entity_rows,
    feature_table,
    pit_feature_table,
)
from benchmarks.harness import Target, local_server, table_name
from benchmarks.history import FEATURE_SPEC, QUICK_FIRST_CALLS, QUICK_PUTS
from benchmarks.processes import cpu_seconds, family, family_cpu_seconds, peak_rss_bytes
from flight_client import FeatureClient
from tests.conftest import listening, wait_until

pytestmark = pytest.mark.timeout(300)

TIMING_KEYS = {"median_s", "min_s", "max_s", "repeat", "times_s"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHARTS = ("scan.png", "ingest.png", "partitioning.png", "historical.png", "online.png", "cow-vs-mor.png")


@pytest.fixture(scope="module")
def running_server() -> Iterator[Target]:
    """One server for the `--location` runs, so they do not each pay a start-up."""
    with local_server() as server:
        yield server


def run_bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    """Run `flight-bench ARGS --quick --json FILE` and return the parsed file after checking its machine part."""
    out = tmp_path / "results.json"
    result = CliRunner().invoke(main, [*args, "--quick", "--json", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    payload = json.loads(out.read_text())
    assert {"cores", "memory_bytes", "python", "versions"} <= payload["machine"].keys()
    assert payload["machine"]["versions"]["pyarrow"]
    return payload


def positive(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and v > 0 for v in values)


def check_scan(result: dict[str, Any], local: bool) -> None:
    paths = {"raw_flight_ceiling", "flight_arrow", "flight_arrow_2", "flight_arrow_4", "flight_pandas"}
    paths |= {"flight_arrow_lz4", "flight_arrow_zstd"}
    assert positive(*result["wire_mb"].values()) and result["wire_mb"].keys() == {"none", "lz4", "zstd"}
    local_paths = {"duckdb_local", "duckdb_cold_local", "pyiceberg_local", "flight_arrow_cold"}
    assert set(result["results"]) == paths | (local_paths if local else set())
    assert result["warm_vs_ceiling"] > 0 and (result["cold_vs_local"] > 0 if local else result["cold_vs_local"] is None)
    for entry in result["results"].values():
        assert entry.keys() >= TIMING_KEYS
        assert positive(entry["rows_per_s"], entry["mb_per_s"], entry["ratio_to_ceiling"])
    assert result["results"]["raw_flight_ceiling"]["ratio_to_ceiling"] == 1.0


def check_ingest(result: dict[str, Any]) -> None:
    flight = {(r["shape"], r["batch_rows"], r["writers"]) for r in result["results"] if r["method"] == "flight"}
    assert flight == {
        (shape, batch, writers) for shape in ("narrow", "wide") for batch in (16_384, 131_072) for writers in (1, 4)
    }
    assert {r["columns"] for r in result["results"]} == {4, 50}
    for entry in result["results"]:
        assert entry.keys() >= TIMING_KEYS
        assert positive(entry["rows_per_s"], entry["mb_per_s"], entry["ratio_to_parquet"])


def check_partitioning(result: dict[str, Any]) -> None:
    entries = {(r["operation"], r["layout"]): r for r in result["results"]}
    assert set(entries) == {
        (op, layout) for op in ("write", "key lookup", "one-week range") for layout in ("default", "unpartitioned")
    }
    for entry in entries.values():
        assert entry.keys() >= TIMING_KEYS
        assert positive(entry["median_s"], entry["rows"], entry["ratio_to_unpartitioned"])
    # The default layout splits the data by month and key bucket, and so reads fewer files for both queries.
    assert entries["write", "default"]["files"] > entries["write", "unpartitioned"]["files"] == 1
    for query in ("key lookup", "one-week range"):
        assert entries[query, "default"]["rows"] == entries[query, "unpartitioned"]["rows"]
        assert entries[query, "default"]["planned_rows"] < entries[query, "unpartitioned"]["planned_rows"]


HISTORICAL_PATHS = {"flight_exchange", "flight_entity_table", "duckdb_memory", "pandas_merge_asof"}


def check_historical(result: dict[str, Any], local: bool) -> None:
    local_paths = {"server_join_local", "flight_exchange_duckdb", "flight_exchange_cold"}
    assert set(result["results"]) == HISTORICAL_PATHS | (local_paths if local else set())
    for entry in result["results"].values():
        assert entry.keys() >= TIMING_KEYS
        assert positive(entry["rows_per_s"], entry["mb_per_s"], entry["ratio_to_exchange"])
    assert result["results"]["flight_exchange"]["ratio_to_exchange"] == 1.0
    assert result["entity_rows"] == 2_000 and result["features"] == 9
    assert [t["rows"] for t in result["tables"]] == [20_000, 5_000, 10_000]
    assert [t["ttl_s"] for t in result["tables"]] == [None, 7 * 86_400, None]
    # Every path was checked against the DuckDB baseline on real matches, not just on nulls.
    checks = result["checks"]
    assert checks["sampled_rows"] == 2_000
    assert set(checks["values_compared"]) == set(result["results"]) - {"duckdb_memory"}
    assert all(n > 2_000 * 4 for n in checks["values_compared"].values())
    # Each live round says how its indexes came to be: at this size, every one extended.
    for live in result["live"].values():
        assert live["all_extended"] and live["indexes"], live
        for outcome in (r[when] for r in live["indexes"] for when in ("first_after_put", "refreshed")):
            assert outcome == {"extended": 3, "rebuilt": 0, "duckdb": 0}


def test_historical_generator_shares_keys_and_breaks_ties() -> None:
    txn = pit_feature_table(20_000, 200, 7, 3, prefix="txn", table_seed=1)
    assert txn.equals(pit_feature_table(20_000, 200, 7, 3, prefix="txn", table_seed=1))
    assert txn.column_names == [
        ENTITY_KEY,
        EVENT_TIME,
        CREATED_TIME,
        "txn_f00_float64",
        "txn_f01_category",
        "txn_f02_int64",
    ]
    # Ties on (key, event time), each broken by a distinct created time.
    assert txn.group_by([ENTITY_KEY, EVENT_TIME]).aggregate([]).num_rows < txn.num_rows
    assert txn.group_by([ENTITY_KEY, EVENT_TIME, CREATED_TIME]).aggregate([]).num_rows == txn.num_rows
    device = pit_feature_table(10_000, 200, 7, 3, prefix="device", table_seed=3, created=False, composite=True)
    assert device.column_names[:3] == [ENTITY_KEY, CHANNEL, EVENT_TIME]
    assert device.group_by([ENTITY_KEY, CHANNEL, EVENT_TIME]).aggregate([]).num_rows == device.num_rows
    # One key space, with the same hot keys in every table; a few entity keys are unknown to all.
    entities = entity_rows(2_000, 200, 7, exact=txn)
    assert entities.column_names == [ENTITY_KEY, CHANNEL, ENTITY_TIME, LABEL]

    def hottest(table: pa.Table) -> int:
        counts = table[ENTITY_KEY].value_counts()
        top = pa.compute.index(counts.field("counts"), pa.compute.max(counts.field("counts"))).as_py()
        return counts.field("values")[top].as_py()

    assert hottest(txn) == hottest(device) == hottest(entities)
    known = pa.compute.is_in(entities[ENTITY_KEY], value_set=txn[ENTITY_KEY].unique())
    assert 0 < pa.compute.sum(pa.compute.invert(known)).as_py() < 200


def test_generator_is_deterministic_skewed_and_tied() -> None:
    table = feature_table(5_000, 200, seed=7, feature_columns=5)
    assert table.equals(feature_table(5_000, 200, seed=7, feature_columns=5))
    assert not table.equals(feature_table(5_000, 200, seed=8, feature_columns=5))
    assert table.column_names[:3] == [ENTITY_KEY, EVENT_TIME, CREATED_TIME]
    assert {str(t) for t in table.schema.types} >= {"int64", "double", "float", "string", "timestamp[us, tz=UTC]"}
    assert table["f00_float64"].null_count > 0
    counts = table[ENTITY_KEY].value_counts().field("counts").to_numpy()
    assert counts.max() > 10 * counts.mean()  # a few hot keys
    assert table.group_by([ENTITY_KEY, EVENT_TIME]).aggregate([]).num_rows < table.num_rows  # ties to break


def test_server_figures_count_its_write_process() -> None:
    """A server's CPU time and peak memory include its write process, the child that runs its puts, and its CPU
    time stays counted after that child ended and the server reaped it."""
    with local_server(args=["--write-process"]) as server:
        assert server.pid is not None and family(server.pid) == [server.pid]  # nothing written: no write process
        peak = server.peak_rss()
        assert peak is not None and positive(peak.serving) and peak.write is None
        with FeatureClient(server.location) as client:
            client.write(table_name("family"), feature_table(1_000, 10, seed=1, feature_columns=2), **FEATURE_SPEC)
            listening(client)  # the write started it in the background
            members = family(server.pid)
            assert len(members) == 2 and members[0] == server.pid
            child = members[1]
            peak = server.peak_rss()
            assert peak is not None and peak.serving == peak_rss_bytes(server.pid)
            assert positive(peak.write) and peak.write == peak_rss_bytes(child)
            assert peak.describe().endswith(" MiB (write process)")
            alone, child_cpu = cpu_seconds(server.pid), cpu_seconds(child)
            before = family_cpu_seconds(server.pid)
            assert child_cpu > 0.1 and before >= alone + child_cpu  # the child imported the server's code
            os.kill(child, signal.SIGKILL)
            # The server reaps its dead child when health asks after it; its CPU time then counts in the server's.
            wait_until(lambda: client.health() is not None and family(server.pid) == [server.pid], what="the reap")
            assert family_cpu_seconds(server.pid) >= before


def test_scan_on_its_own_server(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "scan")["benchmarks"]["scan"]
    check_scan(result, local=True)
    assert result["rows"] == 20_000 and result["settings"]["repeat"] == 2
    assert positive(result["server"]["peak_rss_bytes"], result["server"]["write_process_peak_rss_bytes"])


def test_ingest(tmp_path: Path, running_server: Target) -> None:
    check_ingest(run_bench(tmp_path, "ingest", "--location", running_server.location)["benchmarks"]["ingest"])


def test_ingest_against_pyiceberg_on_its_own_server(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "ingest", "--rows", "4000")["benchmarks"]["ingest"]
    check_ingest(result)
    baselines = {(r["shape"], r["writers"]): r for r in result["pyiceberg"]}
    assert set(baselines) == {(shape, writers) for shape in ("narrow", "wide") for writers in (1, 4)}
    for entry in baselines.values():
        assert entry["method"] == "pyiceberg" and entry.keys() >= TIMING_KEYS and positive(entry["rows_per_s"])
    for entry in result["results"]:
        if entry["method"] == "flight":  # each put against pyiceberg with as many writers
            same = baselines[entry["shape"], entry["writers"]]
            assert entry["ratio_to_pyiceberg"] == pytest.approx(same["median_s"] / entry["median_s"])


def test_parquet_on_its_own_server(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "parquet")["benchmarks"]["parquet"]
    assert result["rows"] == 20_000 and result["columns"] == 11 and result["baseline"] == "zstd"
    entries = {r["setting"]: r for r in result["results"]}
    assert {"zstd", "snappy", "lz4", "uncompressed", "server_default"} <= set(entries)
    assert entries["zstd"]["decode_ratio"] == entries["zstd"]["size_ratio"] == entries["zstd"]["cold_ratio"] == 1.0
    for entry in entries.values():
        assert entry["decode"].keys() >= TIMING_KEYS and positive(entry["file_mb"], entry["decode_ratio"])
        in_table = not entry["label"].endswith("(in process only)")
        assert ("cold_scan" in entry) == in_table  # settings no table property sets are decoded in process only
        if in_table:
            assert positive(entry["cold_scan"]["rows_per_s"], entry["cold_ratio"], entry["server_cpu_cores"])
    # the codecs do what they say: uncompressed files are the largest, zstd's the smallest of the fast ones
    assert entries["uncompressed"]["file_mb"] > entries["lz4"]["file_mb"] > entries["zstd"]["file_mb"]


def test_partitioning(tmp_path: Path, running_server: Target) -> None:
    result = run_bench(tmp_path, "partitioning", "--location", running_server.location)["benchmarks"]["partitioning"]
    check_partitioning(result)


def test_historical_on_its_own_server(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "historical")["benchmarks"]["historical"]
    check_historical(result, local=True)
    assert result["settings"]["rows"] == 20_000 and result["settings"]["entities"] == 200
    assert result["server"]["peak_rss_bytes"] > 0


def check_online(result: dict[str, Any], local: bool) -> None:
    paths = {"index", "index_calls", "index_writing", "floor", "floor_stream", "floor_writing", "as_of"}
    paths |= {"duckdb", "index_writing_elsewhere", "floor_writing_elsewhere"} if local else set()
    assert set(result["latency"]) == paths
    for by_batch in result["latency"].values():
        assert list(by_batch) == ["1", "10", "100", "1000"]
        for p in by_batch.values():
            assert positive(p["p50_ms"], p["p99_ms"], p["requests"]) and p["p50_ms"] <= p["p99_ms"] <= p["p99.9_ms"]
    assert set(result["writer_puts_per_s"]) == set(result["latency"]) & {"index_writing", "index_writing_elsewhere"}
    assert set(result["freshness"]) == ({"same_server", "other_replica"} if local else {"same_server"})
    assert all(positive(lag["p50_ms"]) for lag in result["freshness"].values())
    assert result["index"]["entities"] == result["entities"] > 0
    assert [c["clients"] for c in result["concurrency"]] == [1, 2, 4]
    assert all(positive(c["lookups_per_s"], c["p50_ms"]) for c in result["concurrency"])
    if local and len(os.sched_getaffinity(0)) >= 2:  # measured again with the processes placed on cores
        placed = result["placement"]
        assert set(placed["latency"]) == {"index", "index_writing", "index_writing_elsewhere"}
        assert set(placed["writer_puts_per_s"]) == {"index_writing", "index_writing_elsewhere"}
        assert all(list(by_batch) == ["1", "10", "100", "1000"] for by_batch in placed["latency"].values())
    else:
        assert result["placement"] == {}


def test_online_on_its_own_server(tmp_path: Path) -> None:
    check_online(run_bench(tmp_path, "online")["benchmarks"]["online"], local=True)


def test_scale_over_replicas(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "scale")["benchmarks"]["scale"]
    assert list(result["results"]) == ["1", "2"] and result["clients"] == 4 and result["endpoints"] > 1
    for entry in result["results"].values():
        assert entry.keys() >= TIMING_KEYS
        assert positive(entry["rows_per_s"], entry["mb_per_s"], entry["speedup"], entry["server_cpu_cores"])
    assert result["results"]["1"]["speedup"] == 1.0
    refused = CliRunner().invoke(main, ["scale", "--quick", "--location", "grpc://127.0.0.1:1"])
    assert refused.exit_code == 2 and "cannot measure --location" in refused.output


def test_shards_over_replicas(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "shards")["benchmarks"]["shards"]
    assert list(result["results"]) == ["one_server_whole_cache", "replicas_sharing_keys", "one_server_small_cache"]
    for entry in result["results"].values():
        assert entry.keys() >= TIMING_KEYS and positive(entry["vs_whole"])
    # each replica held a share, smaller than the table; together, the table once
    assert sum(result["rows_per_replica"]) == result["feature_rows"] > max(result["rows_per_replica"]) > 0
    assert result["cap_mb"] < result["index_mb"]
    refused = CliRunner().invoke(main, ["shards", "--quick", "--location", "grpc://127.0.0.1:1"])
    assert refused.exit_code == 2 and "cannot measure --location" in refused.output


def check_cow_mor(result: dict[str, Any], local: bool) -> None:
    shares = ("1%", "10%", "30%")
    layouts = {f"cow_{s}" for s in shares} | {f"mor_{s}_{n}" for s in shares for n in (1, 3)} | {"compacted_10%"}
    assert set(result["results"]) == layouts
    measures = {"scan", "filtered", "training"} | ({"online_build", "pyiceberg"} if local else set())
    for key, entry in result["results"].items():
        assert set(entry["measures"]) == measures, key
        for m in entry["measures"].values():
            assert m.keys() >= TIMING_KEYS and positive(m["ratio_to_cow"])
        mor = entry["mode"] == "merge-on-read"
        assert entry["read_path"] == "direct"  # position deletes are applied by Arrow
        assert entry["filtered_read_path"] == ("read_parquet" if mor else "iceberg_scan")
        assert entry["delete_files"] == (len(entry["delete_s"]) if mor else 0) and entry["delete_s"]
        # The same rows deleted in every layout of a share, and every read returned the rest.
        assert entry["rows_deleted"] == result["results"][f"cow_{key.split('_')[1]}"]["rows_deleted"] > 0
        assert entry["measures"]["scan"]["rows"] == result["rows"] - entry["rows_deleted"]
        if entry["mode"] == "copy-on-write":
            assert all(m["ratio_to_cow"] == 1.0 for m in entry["measures"].values())
    compacted = result["results"]["compacted_10%"]
    assert compacted["compaction"]["compacted"]
    assert set(result["checks"]["compared"]) == measures
    for m in compacted["measures"].values():  # timed again in pairs against copy-on-write
        assert positive(m["paired"]["ratio"]) and m["paired"]["q1"] <= m["paired"]["q3"]
    if local:  # the compacted file is laid out as the copy-on-write one (checked by the run itself)
        assert result["checks"]["same_layout"]["files"][0]["rows"] == result["rows"] - compacted["rows_deleted"]


def test_cow_vs_mor_on_its_own_server(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "cow-vs-mor")["benchmarks"]["cow-vs-mor"]
    check_cow_mor(result, local=True)
    assert result["delete_files"] == [1, 3] and result["rows"] == 20_000


def test_integrations_on_its_own_server(tmp_path: Path) -> None:
    # In a process of its own, as users run it: a Ray driver ends its process if anything touches Ray after
    # `ray.shutdown()` (tests/ray_driver.py), which must not be the test run's process. As a module (`-m`), whose
    # main module every DataLoader worker imports again unless the forkserver preloaded it.
    out = tmp_path / "results.json"
    bench = [sys.executable, "-m", "benchmarks.cli"]
    done = subprocess.run([*bench, "integrations", "--quick", "--json", str(out)], capture_output=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr).decode(errors="replace")[-5000:]
    result = json.loads(out.read_text())["benchmarks"]["integrations"]
    assert result["entity_rows"] == 20_000 and result["partitions"] == 8
    floors = {"torch_floor", "ray_floor"}
    assert set(result["results"]) == {
        "pandas_read_flight",
        "torch_dataloader",
        "torch_persistent",
        "torch_in_process",
        "torch_local_rows",
        "ray_data",
        *floors,
    }
    assert positive(result["forkserver_start_s"])
    for name, entry in result["results"].items():
        assert entry.keys() >= TIMING_KEYS and entry["server_cpu_s"] >= 0 and entry["client_cpu_s"] > 0
        if name in floors:  # the frameworks alone: no rows, no ratio
            assert entry["rows_per_s"] is None and entry["ratio_to_pandas"] is None
        else:
            assert positive(entry["rows_per_s"], entry["ratio_to_pandas"])
    # Two workers started per epoch that imported `benchmarks.cli` (every benchmark) would cost 2 s of CPU.
    assert result["results"]["torch_dataloader"]["client_cpu_s"] < 1.0
    assert set(result["load_average_1m"]) == {"start", "end"}


@pytest.mark.timeout(900)  # 3 x 40 one-row appends, 9 server starts and 3 x 32 concurrent puts
def test_history_on_its_own_server(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "history", "--plot", str(tmp_path / "charts"))["benchmarks"]["history"]
    check_charts(tmp_path / "charts", ("history.png",))
    assert result["puts"] == QUICK_PUTS and result["settings"]["rows"] == QUICK_PUTS
    assert set(result["appends"]) == {"server", "pyiceberg_fast", "pyiceberg_merge"}
    for entry in result["appends"].values():
        assert entry["puts"] == QUICK_PUTS and len(entry["curve"]) == 20
        assert positive(entry["first_p50_ms"], entry["last_p50_ms"], entry["last_to_first"], entry["total_s"])
        assert all(positive(p["p50_ms"]) for p in entry["curve"])
    assert set(result["reads"]) == {"scan", "online", "training"}
    for read in result["reads"].values():
        assert positive(read["first_ratio"], read["warm_ratio"])
        for kind in ("history", "one_put"):
            assert read[kind]["fresh_server"] and positive(read[kind]["first_s"], read[kind]["warm_median_s"])
            assert len(read[kind]["first_all_s"]) == QUICK_FIRST_CALLS and positive(*read[kind]["first_all_s"])
    metadata = result["metadata"]
    assert set(metadata) == {"history", "one_put", "pyiceberg_fast", "pyiceberg_merge"}
    assert metadata["history"]["snapshots"] == QUICK_PUTS + 1 and metadata["one_put"]["snapshots"] == 1
    assert metadata["history"]["metadata_json_files"] > 1 and metadata["history"]["newest_metadata_json_bytes"] > 0
    # Without merging, pyiceberg's current snapshot reads a manifest per append; merging keeps them few.
    assert (
        metadata["pyiceberg_fast"]["current_manifests"] == QUICK_PUTS > metadata["pyiceberg_merge"]["current_manifests"]
    )
    # One writer, 16 with group commit, the same 16 on a server with it off, and to the ceiling server: as many puts
    # each, all on local servers.
    writers = result["writers"]
    assert [(w["writers"], w["group_commit"], w["puts"]) for w in writers] == [
        (1, True, 32),
        (16, True, 32),
        (16, False, 32),
        (16, None, 32),
    ]
    assert all(positive(w["puts_per_s"], w["vs_one_writer"], w["client_cpu_ms_per_put"]) for w in writers)
    assert all(positive(w["server_cpu_ms_per_put"]) for w in writers[:3])
    assert writers[3]["server_cpu_ms_per_put"] is None and writers[3]["snapshots_per_put"] is None
    assert writers[2]["snapshots_per_put"] == 1 and 0 < writers[1]["snapshots_per_put"] <= 1
    assert writers[1]["vs_no_group_commit"] == writers[1]["puts_per_s"] / writers[2]["puts_per_s"]
    assert writers[1]["vs_ceiling"] == writers[1]["puts_per_s"] / writers[3]["puts_per_s"]


@pytest.fixture(scope="module")
def all_run(tmp_path_factory: pytest.TempPathFactory, running_server: Target) -> tuple[dict[str, Any], Path]:
    """One `flight-bench all --quick --plot DIR` run, shared by the report and the chart tests."""
    tmp = tmp_path_factory.mktemp("all")
    payload = run_bench(
        tmp, "all", "--location", running_server.location, "--repeat", "1", "--plot", str(tmp / "charts" / "new")
    )
    return payload, tmp


def check_charts(directory: Path, names: tuple[str, ...] = CHARTS) -> None:
    assert sorted(p.name for p in directory.iterdir()) == sorted(names)
    for name in names:
        data = (directory / name).read_bytes()
        assert len(data) > 10_000 and data.startswith(PNG_SIGNATURE), name


def test_all_in_one_report(all_run: tuple[dict[str, Any], Path]) -> None:
    payload, _ = all_run
    assert list(payload["benchmarks"]) == ["scan", "ingest", "partitioning", "historical", "online", "cow-vs-mor"]
    check_scan(payload["benchmarks"]["scan"], local=False)  # no warehouse at hand: in-process baselines skipped
    check_ingest(payload["benchmarks"]["ingest"])
    check_partitioning(payload["benchmarks"]["partitioning"])
    check_historical(payload["benchmarks"]["historical"], local=False)
    check_online(payload["benchmarks"]["online"], local=False)
    check_cow_mor(payload["benchmarks"]["cow-vs-mor"], local=False)
    servers = [b["server"] for b in payload["benchmarks"].values()]
    assert all(s["peak_rss_bytes"] is None and s["write_process_peak_rss_bytes"] is None for s in servers)


def test_plot_writes_a_chart_per_benchmark(all_run: tuple[dict[str, Any], Path]) -> None:
    _, tmp = all_run
    check_charts(tmp / "charts" / "new")  # --plot created the missing folders
    # The same charts again from the saved JSON, without running anything.
    result = CliRunner().invoke(main, ["plot", str(tmp / "results.json"), "--plot", str(tmp / "redrawn")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    check_charts(tmp / "redrawn")
    twice = CliRunner().invoke(
        main, ["plot", str(tmp / "results.json"), str(tmp / "results.json"), "--plot", str(tmp / "twice")]
    )
    assert twice.exit_code == 2 and "would be drawn twice" in twice.output


def test_options_are_checked_before_any_benchmark_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without matplotlib, --plot fails at once with what to install; so does a bad --catalog-config."""
    config = tmp_path / "catalog.json"
    config.write_text(json.dumps({"type": "sql", "uri": f"sqlite:///{tmp_path / 'c.db'}"}))
    with_location = CliRunner().invoke(
        main, ["scan", "--quick", "--catalog-config", str(config), "--location", "grpc://127.0.0.1:1"]
    )
    assert with_location.exit_code == 2 and "--catalog-config" in with_location.output
    config.write_text("[1, 2]")
    not_a_mapping = CliRunner().invoke(main, ["scan", "--quick", "--catalog-config", str(config)])
    assert not_a_mapping.exit_code == 2 and "mapping of catalog properties" in not_a_mapping.output
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    no_matplotlib = CliRunner().invoke(main, ["all", "--quick", "--plot", str(tmp_path / "charts")])
    assert no_matplotlib.exit_code == 1
    assert "pip install 'iceberg-feature-flight[plot]'" in no_matplotlib.output
    assert "machine:" not in no_matplotlib.output and not (tmp_path / "charts").exists()


def test_scan_on_a_catalog_config(tmp_path: Path) -> None:
    """The benchmark's server, and the in-process baselines, use the catalog of --catalog-config."""
    properties = {"type": "sql", "uri": f"sqlite:///{tmp_path / 'c.db'}", "warehouse": (tmp_path / "wh").as_uri()}
    config = tmp_path / "catalog.json"
    config.write_text(json.dumps(properties))
    result = run_bench(tmp_path, "scan", "--catalog-config", str(config))["benchmarks"]["scan"]
    check_scan(result, local=True)
    namespace, table = result["table"].split(".")
    assert (namespace, table) in load_catalog("default", **properties).list_tables(namespace)
    assert any((tmp_path / "wh").rglob("*.parquet"))  # the data went to that catalog's warehouse
