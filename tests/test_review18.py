"""Review 18: tests for problems found in the changes since 41c4359 (the snapshot cap's age floor, pins through
`commit_staged`, `WeightedLru` in more caches, manifest lists kept as paths), fixed since."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from pyiceberg.catalog import load_catalog
from pyiceberg.manifest import DataFile, DataFileContent, FileFormat
from pyiceberg.typedef import Record

from flight_client import FeatureClient, InvalidRequestError
from flight_server.base.lru import WeightedLru
from flight_server.base.settings import MARKDOWN_END
from flight_server.changes import reachable
from flight_server.changes.upkeep import CAP_MIN_AGE_PROPERTY, COMPACT_MIN_FILES_PROPERTY, MAX_SNAPSHOTS_PROPERTY
from flight_server.iceberg import lineage
from flight_server.iceberg.catalog import FeatureCatalog
from flight_server.transport.service import FeatureFlightServer
from tests.conftest import sqlite_catalog, start_server

DOCS = Path(__file__).resolve().parent.parent / "docs"
T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


def rows(ids: list[int]) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "ts": pa.array([T0 + dt.timedelta(minutes=i) for i in ids], pa.timestamp("us", "UTC")),
            "value": pa.array([float(i) for i in ids]),
        }
    )


def set_properties(properties: dict[str, str], table: str, values: dict[str, str]) -> None:
    with FeatureCatalog("default", properties).load(table).transaction() as transaction:
        transaction.set_properties(values)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return sqlite_catalog(tmp_path_factory.mktemp("review18"))


@pytest.fixture(scope="module")
def served(catalog: dict[str, str]) -> Iterator[FeatureFlightServer]:
    server = start_server(catalog)
    yield server
    server.shutdown()


@pytest.fixture
def client(served: FeatureFlightServer) -> Iterator[FeatureClient]:
    with FeatureClient(f"grpc://127.0.0.1:{served.port}") as c:
        yield c


def test_a_huge_cap_floor_leaves_the_age_rule_working(
    client: FeatureClient, catalog: dict[str, str], table: str
) -> None:
    """`flight.maintenance.max-snapshots-min-age-ms` set to Java's Long.MAX_VALUE ("the cap never takes anything", as
    Iceberg's own age properties are often set) is accepted by `_at_least`, but `now - timedelta(that)` raises
    OverflowError outside `done.step`: the whole round fails (INTERNAL for run_maintenance, a logged exception in the
    background loop), so the age rule, the cap and orphan removal never run for that table again."""
    client.write(table, rows([0]), entity_keys=["id"], event_time="ts", partition_by=[])
    set_properties(
        catalog,
        table,
        {
            COMPACT_MIN_FILES_PROPERTY: "100000",
            MAX_SNAPSHOTS_PROPERTY: "1",
            CAP_MIN_AGE_PROPERTY: str(2**63 - 1),
            "history.expire.max-snapshot-age-ms": "1",
            "history.expire.min-snapshots-to-keep": "1",
        },
    )
    client.write(table, rows([1]))
    result = client.run_maintenance(table)
    assert result["error"] is None and result["snapshots_expired"] >= 1, result


def test_expire_snapshots_on_a_table_whose_age_property_is_not_a_number(
    client: FeatureClient, catalog: dict[str, str], table: str
) -> None:
    """Automatic maintenance reads `history.expire.max-snapshot-age-ms` with `_at_least` (a warning, the default),
    but the `expire_snapshots` action without `older_than` does `int(properties.get(...))` (maintenance.py
    `_expire_locked`, before this change too): a property another engine's user set to "a day" makes it INTERNAL
    instead of the default or an INVALID_ARGUMENT naming the property."""
    client.write(table, rows([0]), entity_keys=["id"], event_time="ts", partition_by=[])
    set_properties(catalog, table, {"history.expire.max-snapshot-age-ms": "a day"})
    client.write(table, rows([1]))
    assert client.run_maintenance(table)["error"] is None  # the round takes the default
    try:
        client.expire_snapshots(table)
    except InvalidRequestError as exc:
        assert "history.expire.max-snapshot-age-ms" in str(exc)


def test_kept_manifest_lists_are_weighed_by_their_paths(tmp_path: Path) -> None:
    """Each manifest list read holds its own copy of every manifest path, so the cache's bound counts characters, not
    paths (review 18 measured 177 bytes a path where 8 were assumed): on a fast-append table, whose n lists name
    n²/2 manifests, what is kept weighs what its strings hold."""
    properties = sqlite_catalog(tmp_path)
    catalog = load_catalog("default", **properties)
    catalog.create_namespace("ns")
    created = catalog.create_table("ns.t", schema=rows([0]).schema)
    for i in range(40):  # pyiceberg's append is a fast append: a new manifest each, the old ones listed again
        created.append(rows([i]))
    table = catalog.load_table("ns.t")
    reachable._listed.clear()
    reachable._files.clear()
    for snapshot in table.metadata.snapshots:
        reachable.snapshot_files(table.io, snapshot)
    kept = [paths for _, paths in reachable._listed.newest_first()]
    assert sum(len(paths) for paths in kept) == 40 * 41 // 2
    assert reachable._listed.total == sum(len(path) for paths in kept for path in paths) + len(kept)


def test_finding_a_puts_own_append_looks_at_the_newest_first_and_stops() -> None:
    """The write process looks up the files of every put's snapshot (`appended_message` -> `committed_appends`),
    which was just kept: the lookup stops at it instead of copying the whole cache first (`newest_first`: 1.3 ms a
    put answer with the cache full of one-row puts, review 18)."""
    one = DataFile.from_args(
        content=DataFileContent.DATA,
        file_path="s3://bucket/t/data/f.parquet",
        file_format=FileFormat.PARQUET,
        partition=Record(),
        record_count=1,
        file_size_in_bytes=1000,
        column_sizes={1: 10, 2: 10, 3: 10},
        value_counts={1: 1, 2: 1, 3: 1},
    )
    before, lineage._own = lineage._own, WeightedLru(lineage.OWN_WEIGHT_KEPT, lineage._weight)
    try:
        count = lineage.OWN_WEIGHT_KEPT // lineage._weight([one])
        for snapshot_id in range(count):
            lineage.keep_appended(("uuid", snapshot_id), [one])
        assert len(lineage._own) == count
        looked_at: list[tuple[str, int]] = []
        newest = lineage._own.newest
        lineage._own.newest = lambda match: newest(lambda key: looked_at.append(key) or match(key))  # type: ignore[method-assign]
        assert lineage.committed_appends(count - 1) == (("uuid", count - 1), [one])
        assert looked_at == [("uuid", count - 1)]
        assert lineage.committed_appends(-1) is None
    finally:
        lineage._own = before


def test_the_settings_table_has_one_end_marker() -> None:
    """The generator's markers bound the table; a second end marker (configuration.md's last line) is left over from
    a hand edit, and the next regeneration that replaces text up to the *last* marker would eat the text between."""
    assert (DOCS / "configuration.md").read_text().count(MARKDOWN_END) == 1


def test_operations_no_longer_says_the_cap_ignores_age() -> None:
    """The cap now takes only snapshots older than its floor (an hour by default): 'the oldest past 2,000 whatever
    their age' (the long-history paragraph) contradicts the Automatic maintenance section."""
    assert "whatever their age" not in (DOCS / "operations.md").read_text()
