"""The client's public API fed valid but unusual inputs a data scientist or pipeline passes (review 25): NumPy
scalars and nanosecond times, row dicts with optional fields, Series, column names outside Avro's letters, keys of
every type on every path. The pyarrow form of the same call is the reference: categorical (dictionary-encoded) keys
in training sets, polars' categorical features, an empty dict of entity rows, and tables of one name in two
namespaces in one lookup included."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from pyiceberg.catalog import load_catalog
from pyiceberg.transforms import BucketTransform

from flight_client import FeatureClient, InvalidRequestError
from tests.conftest import replica_processes, sqlite_catalog, start_server

UTC = dt.timezone.utc
BASE = dt.datetime(2026, 1, 1, tzinfo=UTC)
ROWS = pa.table(
    {
        "driver_id": pa.array([1, 2, 3, 1], pa.int64()),
        "event_timestamp": pa.array([BASE + dt.timedelta(hours=h) for h in (0, 1, 2, 3)], pa.timestamp("us", "UTC")),
        "rate": [0.1, 0.2, 0.3, 0.4],
    }
)


@pytest.fixture(scope="module")
def location(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = start_server(sqlite_catalog(tmp_path_factory.mktemp("inputs")))
    yield f"grpc://127.0.0.1:{server.port}"
    server.shutdown()


@pytest.fixture
def client(location: str) -> Iterator[FeatureClient]:
    with FeatureClient(location) as c:
        yield c


def table_name() -> str:
    return f"review25.t_{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def features(location: str) -> str:
    name = table_name()
    with FeatureClient(location) as client:
        client.write(name, ROWS, entity_keys="driver_id", event_time="event_timestamp")
    return name


def test_a_non_ascii_key_column_does_not_kill_the_server(tmp_path: Path) -> None:
    """`größe` is a valid Iceberg column name and is written fine, but the server's default partition spec names a
    partition field after it, which DuckDB's `iceberg_scan` cannot read from the manifest's Avro schema: it throws
    from a thread and the whole server process aborts (std::terminate) on the first delete, filtered read or
    online lookup `as_of` a time. One request takes the server down for everyone."""
    rows = pa.table({"größe": [1, 2], "ts": pa.array([BASE, BASE], pa.timestamp("us", "UTC")), "v": [1.0, 2.0]})
    with (
        replica_processes(tmp_path, sqlite_catalog(tmp_path), count=1) as [(location, process)],
        FeatureClient(location) as client,
    ):
        client.write("review25.umlaut", rows, entity_keys="größe", event_time="ts")
        try:
            assert client.delete("review25.umlaut", keys={"größe": [1]})["rows_deleted"] == 1
        finally:
            assert process.poll() is None, "the server process died"


def test_a_table_whose_partition_fields_duckdb_cannot_read_is_refused_not_crashed(tmp_path: Path) -> None:
    """A table another writer partitioned under a non-Avro field name (`größe_bucket`): a read through DuckDB is
    refused with a message saying why, and the server goes on serving."""
    catalog = sqlite_catalog(tmp_path)
    rows = pa.table({"größe": [1, 2], "ts": pa.array([BASE, BASE], pa.timestamp("us", "UTC")), "v": [1.0, 2.0]})
    with (
        replica_processes(tmp_path, catalog, count=1) as [(location, process)],
        FeatureClient(location) as client,
    ):
        client.write("review25.umlaut", rows, entity_keys="größe", event_time="ts", partition_by=[])
        table = load_catalog("default", **catalog).load_table("review25.umlaut")
        with table.update_spec() as spec:
            spec.add_field("größe", BucketTransform(2), "größe_bucket")
        client.write("review25.umlaut", rows)
        with pytest.raises(InvalidRequestError, match=r"partition fields \['größe_bucket'\] are not Avro names"):
            client.delete("review25.umlaut", keys={"größe": [1]})
        assert process.poll() is None and client.read_table("review25.umlaut").num_rows == 4


def test_rows_as_dicts_keep_the_columns_their_first_row_lacks(client: FeatureClient, features: str) -> None:
    """Row dicts with an optional field (JSON events, say) that the first row lacks: `write` drops that column
    without a word, as do training sets whose rows go as Arrow (a date among them); inline training sets keep it
    (`python_columns` takes every row's names), so the same rows give different columns by path."""
    rows = [
        {"driver_id": 1, "event_timestamp": BASE, "rate": 0.5},
        {"driver_id": 2, "event_timestamp": BASE, "rate": 0.6, "city": "x"},
    ]
    name = table_name()
    client.write(name, rows, entity_keys="driver_id", event_time="event_timestamp")
    written = client.read_table(name)
    assert "city" in written.column_names, written.column_names
    entities = [
        {"driver_id": 1, "event_timestamp": BASE},
        {"driver_id": 2, "event_timestamp": BASE, "day": dt.date(2026, 1, 1)},  # a date: sent as Arrow
    ]
    training = client.get_historical_features(entities, [f"{features}:rate"])
    assert training.column("day").to_pylist() == [None, dt.date(2026, 1, 1)]


NANOS = np.datetime64("2026-01-01T00:30:00", "ns")  # pandas' default resolution: `df["ts"].values[0]`


@pytest.mark.parametrize("given", ["scalars", "array"])
def test_numpy_nanosecond_times_in_entity_rows_are_times(client: FeatureClient, features: str, given: str) -> None:
    """`{"event_timestamp": df["ts"].values}` (or its elements): NumPy's `.item()` gives an int for nanosecond
    datetimes, which the inline request sends as epoch milliseconds: 'out of range (years 1 to 9999)'."""
    times = np.array([NANOS, NANOS + np.timedelta64(2, "h")])
    entities = {"driver_id": [1, 2], "event_timestamp": list(times) if given == "scalars" else times}
    training = client.get_historical_features(entities, [f"{features}:rate"])
    assert training.column("rate").to_pylist() == [0.1, 0.2]


def test_a_delete_by_numpy_nanosecond_time_keys_deletes_them(client: FeatureClient) -> None:
    """Worse on a delete: the int is read as microseconds of the timestamp key, matches nothing, and the delete
    succeeds having deleted no row."""
    name = table_name()
    stamps = pa.array([BASE, BASE], pa.timestamp("us", "UTC"))
    keys = pa.array([BASE, BASE + dt.timedelta(seconds=1)], pa.timestamp("us", "UTC"))
    client.write(name, pa.table({"k": keys, "ts": stamps, "v": [1.0, 2.0]}), entity_keys="k", event_time="ts")
    given = keys.to_numpy().astype("datetime64[ns]")[:1]
    assert client.delete(name, keys={"k": list(given)})["rows_deleted"] == 1


CATEGORICAL_KEYS = {  # string keys dictionary-encoded, as each library stores a categorical column
    "pandas_category": lambda keys: pd.DataFrame({"user": pd.Series(keys, dtype="category")}),
    "polars_categorical": lambda keys: pl.DataFrame({"user": pl.Series(keys, dtype=pl.Categorical)}),
    "arrow_dictionary": lambda keys: pa.table({"user": pa.array(keys).dictionary_encode()}),
}


@pytest.mark.parametrize("form", CATEGORICAL_KEYS)
def test_categorical_keys_are_looked_up_on_every_path(location: str, form: str) -> None:
    """A categorical key column (pandas `category`, polars `Categorical`): the default online path (sessions)
    refuses it ('entity column 'user' is dictionary<...>; the tables key it as string') while
    `online_sessions=False` and `as_of` answer it, and training sets refuse it too: the answer depends on a
    connection option. Keys streamed as they come (a reader, another language's client) are read by the server."""
    name = table_name()
    rows = pa.table({"user": ["u1", "u2"], "ts": pa.array([BASE, BASE], pa.timestamp("us", "UTC")), "v": [1.0, 2.0]})
    keys = CATEGORICAL_KEYS[form](["u2", "u1", "zz"])
    with FeatureClient(location) as client, FeatureClient(location, online_sessions=False) as single:
        client.write(name, rows, entity_keys="user", event_time="ts")
        assert single.get_online_features(keys, [f"{name}:v"]).column("v").to_pylist() == [2.0, 1.0, None]
        assert client.get_online_features(keys, [f"{name}:v"]).column("v").to_pylist() == [2.0, 1.0, None]
        streamed = pa.RecordBatchReader.from_batches(  # as it comes: the server reads the keys by their values
            pa.schema([("user", pa.dictionary(pa.int32(), pa.string()))]),
            [pa.record_batch([pa.array(["u2", "u1", "zz"]).dictionary_encode()], names=["user"])],
        )
        assert client.get_online_features(streamed, [f"{name}:v"]).column("v").to_pylist() == [2.0, 1.0, None]


@pytest.fixture(scope="module")
def duckdb_location(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server without a training-set cache: DuckDB joins every training set."""
    server = start_server(sqlite_catalog(tmp_path_factory.mktemp("duckdb")), historical_cache_bytes=0)
    yield f"grpc://127.0.0.1:{server.port}"
    server.shutdown()


@pytest.mark.parametrize("form", CATEGORICAL_KEYS)
@pytest.mark.parametrize("join", ["index", "duckdb"])
def test_categorical_keys_join_training_sets(location: str, duckdb_location: str, join: str, form: str) -> None:
    """Categorical entity keys in a training set's rows were refused ('is dictionary<...>; cast it first'), where
    online lookups take them. They join by their values and come back as them, through the sorted indexes and
    through DuckDB, streamed or not."""
    name = table_name()
    rows = pa.table({"user": ["u1", "u2"], "ts": pa.array([BASE, BASE], pa.timestamp("us", "UTC")), "v": [1.0, 2.0]})
    keys = CATEGORICAL_KEYS[form](["u2", "u1", "zz"])
    with FeatureClient(location if join == "index" else duckdb_location) as client:
        client.write(name, rows, entity_keys="user", event_time="ts")
        entities = pa.table(keys).append_column("event_timestamp", pa.array([BASE] * 3, pa.timestamp("us", "UTC")))
        training = client.get_historical_features(entities, [f"{name}:v"])
        assert training.column("v").to_pylist() == [2.0, 1.0, None]
        assert training.schema.field("user").type == pa.string()
        assert training.column("user").to_pylist() == ["u2", "u1", "zz"]
        streamed = pa.Table.from_batches(client.iter_historical_features(entities, [f"{name}:v"]))
        assert streamed.column("v").to_pylist() == [2.0, 1.0, None]


LATER = BASE + dt.timedelta(hours=1, minutes=30)
HOUR = dt.timedelta(hours=1)
TIMES = {  # the same time in the forms a NumPy / pandas pipeline hands over
    "numpy_datetime64": np.datetime64(LATER.replace(tzinfo=None), "us"),  # df["ts"].values.max()
    "numpy_int64_millis": np.int64(LATER.timestamp() * 1000),  # an epoch-millisecond column's max()
}


@pytest.mark.parametrize("form", TIMES)
def test_as_of_takes_numpy_times(client: FeatureClient, features: str, form: str) -> None:
    """`as_of` (and `request_time`, `older_than`) as a NumPy datetime64 or int64: `_as_of` converts only datetimes
    and Python ints, so the value reaches json.dumps and fails there with 'Object of type datetime64 is not JSON
    serializable', a raw TypeError from the encoder that does not say what the argument takes."""
    keys = {"driver_id": [1, 2, 3]}
    expected = client.get_online_features(keys, [f"{features}:rate"], apply_ttl=False, as_of=LATER)
    assert expected.column("rate").to_pylist() == [0.1, 0.2, None]
    given = client.get_online_features(keys, [f"{features}:rate"], apply_ttl=False, as_of=TIMES[form])
    assert given.column("rate").to_pylist() == [0.1, 0.2, None]


def test_as_of_a_date_is_taken_or_refused_clearly(client: FeatureClient, features: str) -> None:
    """A `datetime.date` (not a datetime): taken as its midnight UTC, or refused by the client with a message saying
    what `as_of` takes; not the JSON encoder's 'Object of type date is not JSON serializable'."""
    day: Any = dt.date(2026, 1, 2)  # outside as_of's annotation, as a caller's untyped value is
    try:
        client.get_online_features({"driver_id": [1]}, [f"{features}:rate"], as_of=day)
    except (TypeError, InvalidRequestError) as exc:
        assert "JSON serializable" not in str(exc)


@pytest.mark.parametrize("names", [("driver id", "event_timestamp"), ("driver_id", "event time"), ("2nd_key", "ts")])
def test_key_and_time_columns_with_spaces_are_written(client: FeatureClient, names: tuple[str, str]) -> None:
    """Column names from a CSV header ('event time', a key starting with a digit) are valid Iceberg names, and the
    table is written with `partition_by=[]`; without it the write is refused with "partition field 'month(event
    time)' is not of the form transform(column)", about a partition field the caller never gave: the server's
    default partitioning is built as text and parsed back by a regex that takes identifiers only."""
    key, time = names
    rows = pa.table({key: [1, 2], time: pa.array([BASE, BASE], pa.timestamp("us", "UTC")), "v": [1.0, 2.0]})
    assert client.write(table_name(), rows, entity_keys=key, event_time=time, partition_by=[]).rows == 2
    assert client.write(table_name(), rows, entity_keys=key, event_time=time).rows == 2


@pytest.mark.parametrize("dtype", [pl.Categorical, pl.Enum(["a", "b"])], ids=["categorical", "enum"])
def test_polars_categorical_feature_columns_are_written(client: FeatureClient, dtype: pl.DataType) -> None:
    """A pandas `category` column is written as a string column; a polars `Categorical` or `Enum` one (dictionary
    of `string_view`) is refused with Arrow's kernel error "cannot store dictionary<values=string_view, ...> as
    string: Function 'array_take' has no kernel matching input types (string_view, uint32)"."""
    frame = pl.DataFrame(ROWS.slice(0, 2)).with_columns(city=pl.Series(["a", "b"], dtype=dtype))
    name = table_name()
    client.write(name, frame, entity_keys="driver_id", event_time="event_timestamp")
    assert sorted(client.read_table(name).column("city").to_pylist()) == ["a", "b"]


def test_polars_view_columns_are_written_as_plain_ones(client: FeatureClient) -> None:
    """Polars exports its strings and bytes as `string_view` and `binary_view`: stored as string and binary."""
    frame = pl.DataFrame(ROWS.slice(0, 2)).with_columns(city=pl.Series(["a", "b"]), blob=pl.Series([b"x", b"y"]))
    name = table_name()
    client.write(name, frame, entity_keys="driver_id", event_time="event_timestamp")
    written = client.read_table(name).sort_by("driver_id")
    assert (written.schema.field("city").type, written.schema.field("blob").type) == (pa.string(), pa.binary())
    assert written.column("city").to_pylist() == ["a", "b"] and written.column("blob").to_pylist() == [b"x", b"y"]


def test_numpy_date_keys_are_looked_up_as_of_a_time(client: FeatureClient) -> None:
    """Date keys as a NumPy `datetime64[D]` array in a dict (a training set takes it): a lookup as of a time goes as
    Arrow, built by `pa.table(columns)` from the list of NumPy scalars, which pyarrow cannot convert, and the
    caller gets pyarrow's raw "TypeError: int() argument must be a string, a bytes-like object or a real number,
    not 'datetime.date'"."""
    name = table_name()
    days = [dt.date(2026, 1, 1), dt.date(2026, 1, 2)]
    stamps = pa.array([BASE, BASE], pa.timestamp("us", "UTC"))
    client.write(name, pa.table({"k": days, "ts": stamps, "v": [1.0, 2.0]}), entity_keys="k", event_time="ts")
    later = BASE + dt.timedelta(days=1)
    assert client.get_online_features({"k": days}, [f"{name}:v"], as_of=later).column("v").to_pylist() == [1.0, 2.0]
    given = {"k": np.array(days, dtype="datetime64[D]")}
    assert client.get_online_features(given, [f"{name}:v"], as_of=later).column("v").to_pylist() == [1.0, 2.0]


def test_a_delete_by_naive_time_keys_reads_them_as_utc(client: FeatureClient) -> None:
    """Naive datetimes are UTC everywhere else (writes, training-set times, `as_of`); as delete keys (a pandas
    frame of `datetime64[ns]` keys, say) they go as ISO text without an offset, which the server refuses with
    Arrow's "expected a zone offset. If these timestamps are in local time, cast to timestamp without timezone,
    then call assume_timezone": advice about Arrow calls the caller cannot make."""
    name = table_name()
    keys = pa.array([BASE, BASE + dt.timedelta(seconds=1)], pa.timestamp("us", "UTC"))
    stamps = pa.array([BASE, BASE], pa.timestamp("us", "UTC"))
    client.write(name, pa.table({"k": keys, "ts": stamps, "v": [1.0, 2.0]}), entity_keys="k", event_time="ts")
    naive = pd.DataFrame({"k": pd.Series([pd.Timestamp("2026-01-01 00:00:00")])})
    assert client.delete(name, keys=naive)["rows_deleted"] == 1


ENTITIES = pa.table(
    {
        "driver_id": pa.array([1, 2, 3, 1], pa.int64()),
        "event_timestamp": pa.array([BASE + dt.timedelta(hours=h) for h in (1, 2, 3, 4)], pa.timestamp("us", "UTC")),
    }
)


@pytest.mark.parametrize("form", ["dict_of_lists", "list_of_dicts"])
def test_workers_share_entity_rows_given_as_python_values(client: FeatureClient, features: str, form: str) -> None:
    """`iter_historical_features(rows, rank=r, world_size=n)` splits local rows by position: a pyarrow table or a
    DataFrame of 4 rows gives 2 to each of 2 workers. The same rows as a dict of lists or a list of dicts go inline,
    the server answers with one endpoint, and `endpoints[rank::world_size]` gives it all to rank 0 and nothing to
    rank 1: one worker trains on every row while the other has no batch (a DDP job then waits forever)."""
    given = ENTITIES.to_pydict() if form == "dict_of_lists" else ENTITIES.to_pylist()

    def shares(rows: object) -> list[int]:
        wanted = [f"{features}:rate"]
        return [
            sum(b.num_rows for b in client.iter_historical_features(rows, wanted, rank=r, world_size=2)) for r in (0, 1)
        ]

    assert shares(ENTITIES) == [2, 2]
    assert shares(given) == [2, 2]


@pytest.mark.parametrize("argument", ["limit", "snapshot_id", "snapshot_ids", "ttl"])
def test_numpy_integers_are_taken_where_an_int_is(client: FeatureClient, features: str, argument: str) -> None:
    """An int taken from a DataFrame or array is a NumPy int64 (`history["snapshot_id"].max()`, `len`-like counts
    from numpy): `limit`, `snapshot_id`, `snapshot_ids` values and `ttl` pass it on to json.dumps, which raises
    'Object of type int64 is not JSON serializable' from inside the request encoding."""
    snapshot = int(client.read_table(features).schema.metadata[b"flight.snapshot_id"])
    if argument == "limit":
        assert client.read_table(features, limit=np.int64(2)).num_rows == 2
    elif argument == "snapshot_id":
        assert client.read_table(features, snapshot_id=np.int64(snapshot)).num_rows == ROWS.num_rows
    elif argument == "snapshot_ids":
        pinned = {features: np.int64(snapshot)}
        assert client.get_historical_features(ENTITIES, [f"{features}:rate"], snapshot_ids=pinned).num_rows == 4
    else:
        client.write(table_name(), ROWS, entity_keys="driver_id", event_time="event_timestamp", ttl=np.int64(3600))


def test_an_empty_dict_of_entity_rows_gives_an_empty_training_set(client: FeatureClient, features: str) -> None:
    """A day with no entities, as a dict of empty lists: an empty Arrow table or DataFrame gives an empty training
    set, and online lookups take the empty dict, but the training set was refused with "entity column 'driver_id'
    is null but '...' keys it as int64; cast it first": there is nothing to cast. The empty column is typed as the
    table keys it; a null column of rows stays refused (most likely a mistake, and it would match nothing)."""
    wanted = [f"{features}:rate"]
    typed = client.get_historical_features(ENTITIES.slice(0, 0), wanted)
    assert typed.num_rows == 0
    assert client.get_online_features({"driver_id": []}, wanted).num_rows == 0
    empty = client.get_historical_features({"driver_id": [], "event_timestamp": []}, wanted)
    assert empty.num_rows == 0 and empty.schema.equals(typed.schema)
    for rank in range(2):
        streamed = client.iter_historical_features(
            {"driver_id": [], "event_timestamp": []}, wanted, rank=rank, world_size=2
        )
        assert sum(batch.num_rows for batch in streamed) == 0
    info = client.training_set_info({"driver_id": [], "event_timestamp": []}, wanted)
    assert info.schema.equals(typed.schema)
    assert sum(client.read_endpoint(e).read_all().num_rows for e in info.endpoints) == 0
    with pytest.raises(InvalidRequestError, match="entity column 'driver_id' is null"):
        client.get_historical_features({"driver_id": [None], "event_timestamp": [BASE]}, wanted)


def test_training_set_info_says_which_inline_values_it_cannot_take(client: FeatureClient, features: str) -> None:
    """`training_set_info` takes a dict of column lists; with a date among them (which JSON does not carry, so
    `get_historical_features` sends such rows as Arrow) the request goes with no entities at all and the server
    answers "this request has no 'entities': stream the entity rows with do_exchange, or name an entity table or
    inline rows", though inline rows were given. It should say which column cannot go in a ticket."""
    rows = {**ENTITIES.to_pydict(), "day": [dt.date(2026, 1, 1)] * 4}
    with pytest.raises((TypeError, ValueError, InvalidRequestError), match="day"):
        client.training_set_info(rows, [f"{features}:rate"])


@pytest.mark.parametrize("as_of", [None, LATER], ids=["latest", "as_of"])
def test_tables_of_one_name_in_two_namespaces_are_looked_up_together(client: FeatureClient, as_of: Any) -> None:
    """`drivers.stats:trips` and `riders.stats:rating`: a training set joins both, but an online lookup was refused
    ("output column name(s) ['stats__event_timestamp'] would appear twice; full_feature_names=true prefixes
    features with their table"), and with full_feature_names=True, as the message advised, refused again. Tables
    whose names clash without their namespaces are now named with them, in both (`<namespace>.<table>__...`)."""
    short = f"t_{uuid.uuid4().hex[:10]}"
    first, second = f"review25a.{short}", f"review25b.{short}"
    client.write(first, ROWS, entity_keys="driver_id", event_time="event_timestamp")
    client.write(
        second,
        ROWS.rename_columns(["driver_id", "event_timestamp", "score"]),
        entity_keys="driver_id",
        event_time="event_timestamp",
    )
    wanted = [f"{first}:rate", f"{second}:score"]
    assert client.get_historical_features(ENTITIES, wanted).num_rows == ENTITIES.num_rows
    full = client.get_historical_features(ENTITIES, wanted, full_feature_names=True)
    assert full.column_names[-2:] == [f"{first}__rate", f"{second}__score"]
    times = [f"{first}__event_timestamp", f"{second}__event_timestamp"]
    online = client.get_online_features(
        {"driver_id": [2]}, wanted, full_feature_names=True, apply_ttl=False, as_of=as_of
    )
    assert online.column_names == ["driver_id", *full.column_names[-2:], *times]
    assert list(online.to_pylist()[0].values()) == [2, 0.2, 0.2, BASE + HOUR, BASE + HOUR]
    plain = client.get_online_features({"driver_id": [2]}, wanted, apply_ttl=False, as_of=as_of)
    assert plain.column_names == ["driver_id", "rate", "score", *times]
    feast = client.get_online_features(wanted, entity_rows=[{"driver_id": 2}], apply_ttl=False, as_of=as_of)
    assert list(feast.to_dict()) == ["driver_id", "rate", "score"]


@pytest.mark.parametrize("library", ["pandas", "polars"])
def test_a_series_of_keys_is_taken_or_refused_clearly(client: FeatureClient, features: str, library: str) -> None:
    """`get_online_features(df["driver_id"], ...)`: a named Series of keys. It reaches `pa.table(data)` through its
    Arrow export, and the caller gets pyarrow's "ArrowInvalid: Cannot import schema: ArrowSchema describes
    non-struct type int64" instead of the key column's answer (the Series has its name) or a TypeError naming
    the kinds of rows taken."""
    keys = pd.Series([3, 1], name="driver_id") if library == "pandas" else pl.Series("driver_id", [3, 1])
    try:
        rates = client.get_online_features(keys, [f"{features}:rate"], apply_ttl=False).column("rate").to_pylist()
    except TypeError as exc:
        assert "DataFrame" in str(exc)
    else:
        assert rates == [0.3, 0.4]
