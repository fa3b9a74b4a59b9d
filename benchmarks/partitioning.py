"""`flight-bench partitioning`: what the default partitioning buys, against the same table unpartitioned.

The default (month of the event time, 8 buckets of the key) should let a key lookup read about
one file in eight and a one-week range about one month of files; this measures whether it does,
and what it costs at write time. Both layouts must return the same rows, checked against the
generated data, or the run fails.
"""

from __future__ import annotations

import datetime as dt
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from benchmarks import report
from benchmarks.datagen import CREATED_TIME, ENTITY_KEY, EVENT_TIME, START, TIMESTAMP, feature_table
from benchmarks.harness import Case, Settings, Target, measure, table_name
from flight_client import FeatureClient
from flight_server.iceberg.catalog import DEFAULT_BUCKETS

LAYOUTS: dict[str, list[str] | None] = {"default": None, "unpartitioned": []}
DEFAULT_LAYOUT = f"month({EVENT_TIME}), bucket({DEFAULT_BUCKETS}, {ENTITY_KEY})"
WEEK_START = START + dt.timedelta(days=31)
WEEK_END = WEEK_START + dt.timedelta(days=7)


class TableWrites:
    """Writes the data to a new table per run with one layout; remembers the last table for the scans."""

    def __init__(self, client: FeatureClient, data: pa.Table, partition_by: list[str] | None, prefix: str):
        self.client, self.data, self.partition_by, self.prefix = client, data, partition_by, prefix
        self.table, self.files = "", 0

    def run(self) -> None:
        self.table = table_name(self.prefix)
        result = self.client.write(
            self.table,
            self.data,
            entity_keys=[ENTITY_KEY],
            event_time=EVENT_TIME,
            created_time=CREATED_TIME,
            partition_by=self.partition_by,
        )
        self.files = result.files


def queries(data: pa.Table) -> dict[str, tuple[str, int]]:
    """Each query's filter and the row count it must return, computed from the generated data."""
    key = data[ENTITY_KEY][data.num_rows // 2].as_py()  # an existing key, picked as the data's own skew picks
    in_week = pc.and_(
        pc.greater_equal(data[EVENT_TIME], pa.scalar(WEEK_START, TIMESTAMP)),
        pc.less(data[EVENT_TIME], pa.scalar(WEEK_END, TIMESTAMP)),
    )
    return {
        "key lookup": (f"{ENTITY_KEY} = {key}", pc.sum(pc.equal(data[ENTITY_KEY], key)).as_py()),
        "one-week range": (
            f"{EVENT_TIME} >= '{WEEK_START.isoformat()}' and {EVENT_TIME} < '{WEEK_END.isoformat()}'",
            pc.sum(in_week).as_py(),
        ),
    }


def run(target: Target, settings: Settings) -> dict[str, Any]:
    data = feature_table(settings.rows, settings.entities, settings.seed, settings.features)
    checks = queries(data)
    with FeatureClient(target.location) as client:
        writes = {
            layout: TableWrites(client, data, partition_by, f"part_{layout}")
            for layout, partition_by in LAYOUTS.items()
        }
        report.progress(f"partitioning: timing writes of {settings.rows:,} rows with each layout, interleaved")
        timings = measure(
            {f"write|{layout}": Case(w.run) for layout, w in writes.items()},
            settings.repeat,
            settings.warmup,
            "partitioning: writes",
        )

        def scan(table: str, text: str) -> pa.Table:
            return client.scan(table, filter=text).read_all()

        scans = {
            f"{query}|{layout}": Case(partial(scan, w.table, text))
            for query, (text, _) in checks.items()
            for layout, w in writes.items()
        }
        report.progress(f"partitioning: timing {len(scans)} filtered scans, interleaved")
        timings.update(measure(scans, settings.repeat, settings.warmup, "partitioning: scans"))
        results = []
        for key, timing in timings.items():
            operation, layout = key.split("|")
            table = writes[layout].table
            entry: dict[str, Any] = {"operation": operation, "layout": layout, "table": table, **timing.as_dict()}
            if operation == "write":
                entry.update(rows=data.num_rows, files=writes[layout].files)
            else:
                text, expected = checks[operation]
                rows = client.scan(table, filter=text).read_all().num_rows
                if rows != expected:
                    raise RuntimeError(f"{layout} table: filter {text!r} returned {rows} rows; the data has {expected}")
                entry.update(filter=text, rows=rows, planned_rows=client.flight_info(table, filter=text).total_records)
            results.append(entry)
    for entry in results:
        other = next(r for r in results if r["operation"] == entry["operation"] and r["layout"] == "unpartitioned")
        entry["ratio_to_unpartitioned"] = entry["median_s"] / other["median_s"]
    return {"rows": settings.rows, "default_layout": DEFAULT_LAYOUT, "results": results}


def render(result: dict[str, Any]) -> str:
    header = (
        f"partitioning: {result['rows']:,} rows; default layout {result['default_layout']} vs unpartitioned; "
        "time ratio < 1 means the default is faster"
    )
    filters = "\n".join(
        f"  {r['operation']}: {r['filter']}" for r in result["results"] if r["layout"] == "default" and "filter" in r
    )
    rows = [
        [
            f"{r['operation']}, {r['layout']}",
            report.seconds(r["median_s"]),
            report.seconds(r["min_s"]),
            report.seconds(r["max_s"]),
            f"{r['rows']:,}",
            f"{r['planned_rows']:,}" if "planned_rows" in r else "-",
            str(r["files"]) if "files" in r else "-",
            report.ratio(r["ratio_to_unpartitioned"]),
        ]
        for r in result["results"]
    ]
    table = report.table(
        [
            "operation, layout",
            "median s",
            "min s",
            "max s",
            "rows",
            "rows in planned files",
            "files",
            "time vs unpartitioned",
        ],
        rows,
    )
    return "\n".join([header, table, "filters:", filters])
