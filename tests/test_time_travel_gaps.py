"""Time travel after expiry: a time resolves to the snapshot that was current then, as the history before expiry
says, or is refused (`NOT_FOUND`) when that snapshot, or one current after it before the next kept, expired.
pyiceberg's expiry leaves gaps in the snapshot log (review 15), which must never answer from an older snapshot."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.table import Table

from flight_server.iceberg.snapshots import resolve_snapshot
from flight_server.wire.errors import NotFoundError
from tests.conftest import sqlite_catalog

NAMES = itertools.count()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    catalog = load_catalog("default", **sqlite_catalog(Path(tmp_path_factory.mktemp("gaps"))))
    catalog.create_namespace("gaps")
    return catalog


def appended(catalog: Catalog, puts: int, version: int = 2) -> Table:
    schema = pa.schema([pa.field("v", pa.int64())])
    table = catalog.create_table(f"gaps.t{next(NAMES)}", schema, properties={"format-version": str(version)})
    for n in range(puts):
        table.append(pa.table({"v": pa.array([n], pa.int64())}))
    return table


def expected(log: list[tuple[int, int]], expired: set[int], at: int) -> int | None:
    """The snapshot current at `at` by the log before expiry, or None where it or one after it (before the
    next entry kept) expired: a time in such a gap cannot be placed before or after the expired snapshot."""
    found = [i for i, (when, _) in enumerate(log) if when <= at]
    if not found:
        return None
    index = found[-1]
    kept = next((i for i in range(index + 1, len(log)) if log[i][1] not in expired), len(log))
    return None if any(sid in expired for _, sid in log[index:kept]) else log[index][1]


def iso(at: int) -> str:
    return dt.datetime.fromtimestamp(at / 1000, dt.timezone.utc).isoformat()


def resolved(table: Table, at: int) -> int | None:
    try:
        return resolve_snapshot(table, None, iso(at))
    except NotFoundError:
        return None


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(puts=st.integers(2, 6), version=st.sampled_from([1, 2]), data=st.data())
def test_a_time_resolves_as_the_history_before_expiry_said_or_is_refused(
    catalog: Catalog, puts: int, version: int, data: st.DataObject
) -> None:
    table = appended(catalog, puts, version)
    log = [(entry.timestamp_ms, entry.snapshot_id) for entry in table.history()]
    older = [sid for _, sid in log[:-1]]  # the current snapshot cannot expire
    expired = set(data.draw(st.lists(st.sampled_from(older), unique=True), "expired") if older else [])
    if expired:
        table.maintenance.expire_snapshots().by_ids(sorted(expired)).commit()
    table = catalog.load_table(table.name())
    for at in [log[0][0] - 1, *(when for when, _ in log), *(when + 1 for when, _ in log)]:
        assert resolved(table, at) == expected(log, expired, at), (at, log, expired)
    for sid in {sid for _, sid in log} - expired:  # a snapshot kept still reads by its id
        assert resolve_snapshot(table, sid, None) == sid


def test_the_refusal_names_the_time_and_says_the_snapshot_expired(catalog: Catalog) -> None:
    table = appended(catalog, 3)
    between = table.history()[1]
    table.maintenance.expire_snapshots().by_ids([between.snapshot_id]).commit()
    with pytest.raises(NotFoundError, match=r"the snapshot current at 20\d\d-.* was expired"):
        resolve_snapshot(catalog.load_table(table.name()), None, iso(between.timestamp_ms))


@pytest.mark.parametrize("version", [1, 2])
def test_a_rollback_to_the_first_snapshot_leaves_time_travel_before_it_as_it_was(
    catalog: Catalog, version: int
) -> None:
    """The log's entry after a rollback names an older snapshot without a parent, as an expiry's would: no gap
    (format 1 has no sequence numbers to tell)."""
    table = appended(catalog, 2, version)
    first, second = table.history()
    table.manage_snapshots().rollback_to_snapshot(first.snapshot_id).commit()
    table = catalog.load_table(table.name())
    assert [entry.snapshot_id for entry in table.history()][-1] == first.snapshot_id
    assert resolve_snapshot(table, None, iso(second.timestamp_ms)) == second.snapshot_id
