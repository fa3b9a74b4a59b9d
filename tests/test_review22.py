"""Review 22: strict xfails for the bugs found in review of the session after 66d0af3 (written order of a
commit's files, plan cache by weight, DuckDB's external file cache on object storage, `_process_stats`)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pytest
from pyiceberg.catalog import load_catalog

from flight_client import FeatureClient
from tests.conftest import sqlite_catalog, start_server

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


@pytest.mark.xfail(strict=True, reason="a put's bin packing puts its last rows into its first file")
def test_a_put_over_the_target_size_answers_its_last_row_of_a_full_tie(tmp_path: Path) -> None:
    """Symptom: a put larger than `write.target-file-size-bytes` in which rows of one id tie fully (same key and
    event time) answers the earlier row for some ids, not its last row as docs/operations.md "Full ties and
    rewrites" promises. Cause: changes/files.py `write_data_files` splits a partition's rows with pyiceberg's
    `bin_pack_arrow_table`, whose first-fit packing (lookback = every batch) puts a later, smaller batch (here the
    last rows, with long strings sorted after short ones) into an earlier bin that still has room: the put's last
    rows land in file 0, before rows written in file 1, so `written_order` (the file number) ranks them first.
    Fix: split each partition's rows into consecutive runs of about the target size (no lookback: bins in row
    order), as the rolling compaction writer does."""
    catalog = sqlite_catalog(tmp_path)
    server = start_server(catalog)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            seed = pa.table(
                {
                    "id": pa.array([-1], pa.int64()),
                    "ts": pa.array([T0], pa.timestamp("us", "UTC")),
                    "s": ["x"],
                    "v": pa.array([0.0], pa.float64()),
                }
            )
            client.write("r22.pack", seed, entity_keys="id", event_time="ts", partition_by=[])
            with load_catalog("default", **catalog).load_table("r22.pack").transaction() as transaction:
                transaction.set_properties({"write.target-file-size-bytes": "2000"})
            pairs = 50  # ids 1..50 each twice in a row (a full tie, the second row the later one), after id 0
            ids = [0] + [1 + i // 2 for i in range(2 * pairs)]
            data = pa.table(
                {
                    "id": pa.array(ids, pa.int64()),
                    "ts": pa.array([T0] * len(ids), pa.timestamp("us", "UTC")),
                    "s": ["x" * (1 if i < 40 else 60) for i in range(len(ids))],
                    "v": pa.array([float(i) for i in range(len(ids))], pa.float64()),
                }
            )
            assert client.write("r22.pack", data).files > 1
            keys = list(range(1, pairs + 1))
            online = client.get_online_features({"id": keys}, "r22.pack:v", as_of=T0)["v"].to_pylist()
            trained = client.get_historical_features({"id": keys, "event_timestamp": [T0] * pairs}, "r22.pack:v")
        expected = [float(2 * i) for i in keys]  # the row of id i put last is row 2i
        assert online == expected
        assert trained["v"].to_pylist() == expected
    finally:
        server.shutdown()
