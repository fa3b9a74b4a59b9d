"""Every kind of rows the client takes (polars, DuckDB relations, pandas with any index, dicts, lists of
dicts, Arrow readers and C streams) gives the same rows as the pyarrow path, in writes, training sets,
online lookups and deletes; readers and C streams are streamed, not collected."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pytest

from flight_client import FeatureClient, InvalidRequestError, inputs
from tests.conftest import sqlite_catalog, start_server

UTC = dt.timezone.utc
BASE = dt.datetime(2026, 1, 1, tzinfo=UTC)

ROWS = pa.table(
    {
        "driver_id": pa.array([1, 2, 3, 1], pa.int64()),
        "event_timestamp": pa.array([BASE + dt.timedelta(hours=h) for h in (0, 1, 2, 3)], pa.timestamp("us", "UTC")),
        "rate": [0.1, 0.2, 0.3, 0.4],
        "city": ["a", "b", "c", "d"],
    }
)
ENTITIES = pa.table(
    {
        "driver_id": pa.array([1, 2, 3, 1, 9], pa.int64()),
        "event_timestamp": pa.array(
            [BASE + dt.timedelta(hours=h, minutes=30) for h in (0, 2, 2, 3, 3)], pa.timestamp("us", "UTC")
        ),
        "label": [1, 0, 1, 1, 0],
    }
)
KEYS = pa.table({"driver_id": pa.array([3, 1, 9, 1], pa.int64())})


def reader_of(table: pa.Table) -> pa.RecordBatchReader:
    return pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=2))


class CStream:
    """Only the Arrow PyCapsule stream interface, as nanoarrow and other libraries export it."""

    def __init__(self, table: pa.Table):
        self.table = table

    def __arrow_c_stream__(self, requested_schema: object | None = None) -> object:
        return reader_of(self.table).__arrow_c_stream__(requested_schema)


def duckdb_relation(table: pa.Table) -> duckdb.DuckDBPyRelation:
    return duckdb.connect().from_arrow(table)


# Each form of the same rows; the pyarrow Table is the reference the others must match.
FORMS: dict[str, Callable[[pa.Table], Any]] = {
    "arrow": lambda t: t,
    "record_batch": lambda t: t.combine_chunks().to_batches()[0],
    "reader": reader_of,
    "c_stream": CStream,
    "polars": pl.from_arrow,
    "duckdb": duckdb_relation,
    "pandas": lambda t: t.to_pandas(),
    "pandas_unnamed_index": lambda t: t.to_pandas().set_axis(range(100, 100 + t.num_rows)),
    "pandas_named_index": lambda t: t.to_pandas().set_index("driver_id"),
    "dict_of_lists": lambda t: t.to_pydict(),
    "dict_of_arrays": lambda t: {name: t.column(name).combine_chunks() for name in t.column_names},
    "list_of_dicts": lambda t: t.to_pylist(),
}


@pytest.fixture(scope="module")
def location(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root: Path = tmp_path_factory.mktemp("inputs")
    server = start_server(sqlite_catalog(root))
    yield f"grpc://127.0.0.1:{server.port}"
    server.shutdown()


@pytest.fixture(scope="module")
def features(location: str) -> str:
    """A feature table holding ROWS."""
    name = f"inputs.f_{uuid.uuid4().hex[:10]}"
    with FeatureClient(location) as client:
        client.write(name, ROWS, entity_keys=["driver_id"], event_time="event_timestamp")
    return name


@pytest.fixture
def client(location: str) -> Iterator[FeatureClient]:
    with FeatureClient(location) as c:
        yield c


def table_name() -> str:
    return f"inputs.t_{uuid.uuid4().hex[:10]}"


def as_written(table: pa.Table) -> list[dict[str, Any]]:
    return sorted(table.select(ROWS.column_names).to_pylist(), key=lambda r: (r["driver_id"], r["event_timestamp"]))


@pytest.mark.parametrize("form", FORMS)
def test_write_takes_every_form_of_rows(client: FeatureClient, form: str) -> None:
    name = table_name()
    result = client.write(name, FORMS[form](ROWS), entity_keys="driver_id", event_time="event_timestamp")
    assert result.rows == ROWS.num_rows
    written = client.read_table(name)
    assert sorted(written.column_names) == sorted(ROWS.column_names)  # no index column from pandas
    assert as_written(written) == as_written(ROWS)


@pytest.mark.parametrize("form", FORMS)
def test_training_sets_take_every_form_of_entity_rows(client: FeatureClient, features: str, form: str) -> None:
    expected = client.get_historical_features(ENTITIES, [f"{features}:rate", f"{features}:city"])
    result = client.get_historical_features(FORMS[form](ENTITIES), [f"{features}:rate", f"{features}:city"])
    assert result.column("rate").to_pylist() == expected.column("rate").to_pylist() == [0.1, 0.2, 0.3, 0.4, None]
    assert result.column("city").to_pylist() == expected.column("city").to_pylist()
    assert result.column("driver_id").to_pylist() == ENTITIES.column("driver_id").to_pylist()


@pytest.mark.parametrize("form", FORMS)
def test_online_lookups_take_every_form_of_keys(client: FeatureClient, features: str, form: str) -> None:
    wanted = [f"{features}:rate"]
    result = client.get_online_features(FORMS[form](KEYS), wanted, apply_ttl=False)
    assert result.column("rate").to_pylist() == [0.3, 0.4, None, 0.4]
    assert result.equals(client.get_online_features(KEYS, wanted, apply_ttl=False))
    later = BASE + dt.timedelta(days=1)  # as of a time: the keys go inline in the ticket, not over a session
    as_of = client.get_online_features(FORMS[form](KEYS), wanted, apply_ttl=False, as_of=later)
    assert as_of.column("rate").to_pylist() == [0.3, 0.4, None, 0.4]


@pytest.mark.parametrize("form", ["polars", "duckdb", "list_of_dicts", "dict_of_arrays", "pandas_unnamed_index"])
def test_delete_takes_keys_in_every_form(client: FeatureClient, form: str) -> None:
    name = table_name()
    client.write(name, ROWS, entity_keys=["driver_id"], event_time="event_timestamp")
    client.delete(name, keys=FORMS[form](pa.table({"driver_id": pa.array([1, 3], pa.int64())})))
    assert sorted(client.read_table(name).column("driver_id").to_pylist()) == [2]


def test_a_reader_is_streamed_not_collected(client: FeatureClient) -> None:
    """Batches are pulled as they are sent: the stream is never read whole before the first is sent."""
    pulled: list[int] = []

    def batches() -> Iterator[pa.RecordBatch]:
        for i, batch in enumerate(ROWS.to_batches(max_chunksize=1)):
            pulled.append(i)
            yield batch

    reader = pa.RecordBatchReader.from_batches(ROWS.schema, batches())
    schema, stream = inputs.stream(reader)
    assert pulled == []  # nothing read yet
    next(stream)
    assert pulled == [0]  # one batch at a time
    name = table_name()
    pulled.clear()
    lazy = pa.RecordBatchReader.from_batches(ROWS.schema, batches())
    client.write(name, lazy, entity_keys=["driver_id"], event_time="event_timestamp")
    assert pulled == [0, 1, 2, 3] and client.read_table(name).num_rows == ROWS.num_rows


def test_large_batches_are_cut_to_grpc_sized_ones() -> None:
    big = pa.table({"x": pa.array(range(inputs.BATCH_ROWS * 2 + 1))})
    for data in (big, reader_of(big.combine_chunks()), CStream(big.combine_chunks())):
        _, batches = inputs.stream(data)
        sizes = [b.num_rows for b in batches]
        assert max(sizes) <= inputs.BATCH_ROWS and sum(sizes) == big.num_rows


def test_a_pandas_index_becomes_columns_only_when_named() -> None:
    frame = ROWS.to_pandas()
    assert inputs.to_table(frame.set_index("driver_id")).column_names == ["driver_id", *ROWS.column_names[1:]]
    both = frame.set_index(["driver_id", "city"])
    assert sorted(inputs.to_table(both).column_names) == sorted(ROWS.column_names)
    kept = frame.set_index("driver_id", drop=False)  # the column is still there: the index is not added twice
    assert inputs.to_table(kept).column_names == ROWS.column_names
    filtered = frame[frame["rate"] > 0.15]  # an unnamed index of positions: dropped
    assert inputs.to_table(filtered).column_names == ROWS.column_names


def test_rows_of_an_unknown_kind_are_refused_with_the_kinds_taken(client: FeatureClient) -> None:
    with pytest.raises(TypeError, match="polars or pandas DataFrame, a DuckDB relation"):
        client.write(table_name(), "not rows", entity_keys=["driver_id"], event_time="event_timestamp")
    with pytest.raises(TypeError, match="polars or pandas DataFrame"):
        client.get_online_features(42, ["t:rate"])


@pytest.mark.parametrize(
    "partition_by",
    [
        ["bucket[4](driver_id)"],
        ["day(event_timestamp)", "truncate[2](city)"],
        ["identity(city)", "hour(event_timestamp)"],
        ["month(event_timestamp)", "bucket(8, driver_id)"],
        [],
    ],
)
def test_partition_specs_that_describe_prints_are_accepted_back(client: FeatureClient, partition_by: list[str]) -> None:
    first, second = table_name(), table_name()
    definition: dict[str, Any] = {"entity_keys": ["driver_id"], "event_time": "event_timestamp"}
    client.write(first, ROWS, partition_by=partition_by, **definition)
    printed = client.describe(first)["partition_spec"]
    client.write(second, ROWS, partition_by=printed, **definition)  # a new table, laid out alike
    assert client.describe(second)["partition_spec"] == printed
    client.write(first, ROWS, partition_by=printed, **definition)  # and the same layout for the existing one
    assert client.read_table(first).num_rows == 2 * ROWS.num_rows


def test_a_partition_width_given_twice_is_refused(client: FeatureClient) -> None:
    with pytest.raises(InvalidRequestError, match="give N once"):
        client.write(
            table_name(),
            ROWS,
            entity_keys=["driver_id"],
            event_time="event_timestamp",
            partition_by=["bucket[4](4, driver_id)"],
        )


@pytest.mark.timeout(60)  # the failure was a hang: both sides waiting for the rest of the entity rows
class Broken(Exception):
    pass


@pytest.mark.parametrize(
    "error",
    [
        Broken("the entity source failed"),
        FileNotFoundError("entities-part-2.parquet"),  # an OSError, as a failed server call raises (review 20)
        pa.ArrowInvalid("CSV parse error: expected 2 columns, got 3"),  # an Arrow error, as Flight's are (review 20)
    ],
    ids=["own", "oserror", "arrow"],
)
def test_entity_rows_that_fail_midway_fail_the_call(client: FeatureClient, features: str, error: Exception) -> None:
    """A stream of entity rows that raises partway cancels the exchange and raises its own error as it is, whatever
    its kind (a file of the caller's gone, a CSV reader's parse error): the server never answers for part of the
    rows, and the client is still usable."""

    def batches() -> Iterator[pa.RecordBatch]:
        yield from ENTITIES.to_batches(max_chunksize=2)[:1]
        raise error

    broken = pa.RecordBatchReader.from_batches(ENTITIES.schema, batches())
    with pytest.raises(type(error), match=str(error).split(":")[0]):
        client.get_historical_features(broken, [f"{features}:rate"])
    assert client.get_historical_features(ENTITIES, [f"{features}:rate"]).num_rows == ENTITIES.num_rows


KEY_VALUES = {  # keys JSON does not carry as they are, two of each
    "date": pa.array([dt.date(2026, 1, 1), dt.date(2026, 1, 2)]),
    "timestamp": pa.array([BASE, BASE + dt.timedelta(seconds=1)], pa.timestamp("us", "UTC")),
    "decimal": pa.array([Decimal("1.10"), Decimal("2.20")], pa.decimal128(10, 2)),
}


@pytest.mark.parametrize("kind", KEY_VALUES)
def test_keys_json_does_not_carry_go_as_arrow_or_as_text(client: FeatureClient, kind: str) -> None:
    """Dates, times and decimals given as Python values (or Arrow arrays in a dict): inline requests would have
    sent them as text or failed to encode them, so training sets and lookups as of a time send them as Arrow, and
    deletes, which only go inline, as text that the server reads as the key's type."""
    keys = KEY_VALUES[kind]
    name = table_name()
    stamps = pa.array([BASE, BASE], pa.timestamp("us", "UTC"))
    client.write(name, pa.table({"k": keys, "ts": stamps, "v": [1.0, 2.0]}), entity_keys=["k"], event_time="ts")
    later = pa.array([BASE + dt.timedelta(hours=1)] * 2, pa.timestamp("us", "UTC"))
    for entities in ({"k": keys.to_pylist(), "ts": later.to_pylist()}, {"k": keys, "ts": later}):
        training = client.get_historical_features(entities, [f"{name}:v"], entity_time="ts")
        assert training.column("v").to_pylist() == [1.0, 2.0]
        assert training.column("k").to_pylist() == keys.to_pylist()  # not their text
    for given in ({"k": keys.to_pylist()}, {"k": keys}):
        as_of = client.get_online_features(given, [f"{name}:v"], as_of=BASE + dt.timedelta(days=1), apply_ttl=False)
        assert as_of.column("v").to_pylist() == [1.0, 2.0]
    assert client.delete(name, keys={"k": keys.to_pylist()[:1]})["rows_deleted"] == 1
    assert client.read_table(name).column("k").to_pylist() == keys.to_pylist()[1:]


def test_bytes_keys_of_a_delete_are_refused_before_sending(client: FeatureClient) -> None:
    with pytest.raises(InvalidRequestError, match="cannot be sent as bytes; delete those rows with a filter"):
        client.delete(table_name(), keys={"k": [b"a"]})
