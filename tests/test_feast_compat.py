"""Feast's call forms and results work on FeatureClient, and Feast's feature-view definitions become feature
tables. Feast is not installed: the stand-ins below have the shape of Feast's definition classes
(`Entity`, `Field`, `FileSource`, `FeatureView`, `feast.types`), not of anything of ours."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flight_client import FeatureClient, FeatureResult
from flight_client.feast import FeatureTable, tables_from_feature_views
from flight_client.results import HistoricalResult, OnlineResult
from tests.conftest import sqlite_catalog, start_server

UTC = dt.timezone.utc
BASE = dt.datetime(2026, 1, 1, tzinfo=UTC)


class PrimitiveFeastType(Enum):
    """Like `feast.types`: enum members that print as `Int64`, `Float32`..."""

    INT64 = 4
    FLOAT32 = 6
    FLOAT64 = 5
    STRING = 2
    UNIX_TIMESTAMP = 8

    def __str__(self) -> str:
        return {"UNIX_TIMESTAMP": "UnixTimestamp"}.get(self.name, self.name.title())


Int64, Float32, String = PrimitiveFeastType.INT64, PrimitiveFeastType.FLOAT32, PrimitiveFeastType.STRING


class Array:
    def __init__(self, base_type: PrimitiveFeastType):
        self.base_type = base_type

    def __str__(self) -> str:
        return f"Array({self.base_type})"


class Field:
    def __init__(self, name: str, dtype: Any):
        self.name, self.dtype = name, dtype


class Entity:
    def __init__(self, name: str, join_keys: list[str]):
        self.name, self.join_keys = name, join_keys


class FileSource:
    def __init__(self, path: str, timestamp_field: str, created_timestamp_column: str = ""):
        self.path, self.timestamp_field, self.created_timestamp_column = path, timestamp_field, created_timestamp_column


class FeatureView:
    """Feast keeps the entities' names, and splits the schema into entity columns and features."""

    def __init__(self, name: str, entities: list[Entity], ttl: dt.timedelta, schema: list[Field], source: FileSource):
        self.name, self.ttl, self.batch_source = name, ttl, source
        self.entities = [e.name for e in entities]
        keys = {k for e in entities for k in e.join_keys}
        self.entity_columns = [f for f in schema if f.name in keys]
        self.features = [f for f in schema if f.name not in keys]
        self.schema = self.entity_columns + self.features


class OldFeatureView:
    """An older shape: entity names only (looked up in the entities given), features without keys."""

    def __init__(self, name: str, entities: list[str], ttl: int, features: list[Field], source: FileSource):
        self.name, self.entities, self.ttl, self.features, self.batch_source = name, entities, ttl, features, source


@pytest.fixture(scope="module")
def location(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root: Path = tmp_path_factory.mktemp("feast")
    server = start_server(sqlite_catalog(root))
    yield f"grpc://127.0.0.1:{server.port}"
    server.shutdown()


@pytest.fixture
def client(location: str) -> Iterator[FeatureClient]:
    with FeatureClient(location) as c:
        yield c


def driver_view(path: str) -> FeatureView:
    schema = [
        Field("driver_id", Int64),
        Field("conv_rate", Float32),
        Field("avg_daily_trips", Int64),
        Field("embedding", Array(Float32)),
    ]
    source = FileSource(path, "event_timestamp", "created")
    return FeatureView("driver_hourly_stats", [Entity("driver", ["driver_id"])], dt.timedelta(hours=2), schema, source)


CUSTOMER = Entity("customer", ["customer_id"])


def customer_view(path: str) -> OldFeatureView:
    features = [Field("customer_id", String), Field("segment", String)]
    return OldFeatureView("customer_profile", ["customer"], 0, features, FileSource(path, "ts"))


@pytest.fixture(scope="module")
def migrated(location: str, tmp_path_factory: pytest.TempPathFactory) -> list[FeatureTable]:
    """Feast's offline data as Parquet files, and the tables made from the views and those files."""
    root = tmp_path_factory.mktemp("feast_offline")
    drivers = pa.table(
        {
            "driver_id": [1001, 1002, 1001],
            "event_timestamp": [BASE, BASE, BASE + dt.timedelta(hours=3)],
            "created": [BASE, BASE, BASE + dt.timedelta(hours=3)],
            "conv_rate": [0.5, 0.25, 0.75],  # float64 in the file; the view says Float32
            "avg_daily_trips": [10, 20, 30],
            "embedding": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
        }
    )
    customers = pa.table({"customer_id": ["c1", "c2"], "ts": [BASE, BASE], "segment": ["gold", "silver"]})
    pq.write_table(drivers, root / "drivers.parquet")
    pq.write_table(customers, root / "customers.parquet")
    views = [driver_view(str(root / "drivers.parquet")), customer_view(str(root / "customers.parquet"))]
    tables = tables_from_feature_views(views, entities=[CUSTOMER])
    with FeatureClient(location) as client:
        for table in tables:
            assert table.source_path is not None
            table.write(client, pq.read_table(table.source_path))
    return tables


def test_feature_views_become_table_definitions(migrated: list[FeatureTable]) -> None:
    drivers, customers = migrated
    assert (drivers.name, drivers.entity_keys, drivers.event_time, drivers.created_time, drivers.ttl_seconds) == (
        "driver_hourly_stats",
        ["driver_id"],
        "event_timestamp",
        "created",
        7200,
    )
    assert drivers.schema == pa.schema(
        [
            ("driver_id", pa.int64()),
            ("event_timestamp", pa.timestamp("us", "UTC")),
            ("created", pa.timestamp("us", "UTC")),
            ("conv_rate", pa.float32()),
            ("avg_daily_trips", pa.int64()),
            ("embedding", pa.list_(pa.float32())),
        ]
    )
    assert (customers.entity_keys, customers.created_time, customers.ttl_seconds) == (["customer_id"], None, None)


def test_migrated_tables_carry_the_views_definition(client: FeatureClient, migrated: list[FeatureTable]) -> None:
    described = client.describe("driver_hourly_stats")
    assert described["feature"] == {
        "entity_keys": ["driver_id"],
        "event_time": "event_timestamp",
        "created_time": "created",
        "ttl_seconds": 7200,
    }
    assert {f["name"]: f["type"] for f in described["schema"]}["conv_rate"] == "float"  # the view's Float32
    assert client.describe("customer_profile")["feature"]["ttl_seconds"] is None


def test_a_yaml_description_gives_the_same_tables(migrated: list[FeatureTable]) -> None:
    described = yaml.safe_load(
        f"""
        - name: driver_hourly_stats
          entities: [{{name: driver, join_keys: [driver_id]}}]
          ttl: 2h
          batch_source: {{path: {migrated[0].source_path}, timestamp_field: event_timestamp,
                          created_timestamp_column: created}}
          schema:
            - {{name: driver_id, dtype: Int64}}
            - {{name: conv_rate, dtype: Float32}}
            - {{name: avg_daily_trips, dtype: Int64}}
            - {{name: embedding, dtype: Array(Float32)}}
        - name: customer_profile
          entities: [customer]
          batch_source: {{path: {migrated[1].source_path}, timestamp_field: ts}}
          schema: [{{name: customer_id, dtype: String}}, {{name: segment, dtype: String}}]
        """
    )
    assert (
        tables_from_feature_views(described, entities=[{"name": "customer", "join_keys": ["customer_id"]}]) == migrated
    )
    namespaced = tables_from_feature_views(described[:1], namespace="feast")
    assert namespaced[0].name == "feast.driver_hourly_stats"


@pytest.mark.parametrize(
    ("view", "error"),
    [
        ({"name": "v", "entities": ["k"], "schema": [{"name": "k", "dtype": "Int64"}]}, "names no timestamp field"),
        ({"name": "v", "timestamp_field": "ts", "schema": []}, "has no entities"),
        ({"name": "v", "timestamp_field": "ts", "entities": ["k"]}, r"give the type of join key\(s\) \['k'\]"),
        (
            {"name": "v", "timestamp_field": "ts", "entities": ["k"], "schema": [{"name": "k", "dtype": "Map"}]},
            "field 'k' has type Map, unknown here",
        ),
        (
            {
                "name": "v",
                "timestamp_field": "ts",
                "ttl": "soon",
                "join_keys": ["k"],
                "schema": [{"name": "k", "dtype": "Int64"}],
            },
            "ttl 'soon' is not a duration",
        ),
    ],
)
def test_views_that_cannot_be_tables_say_why(view: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        tables_from_feature_views([view])


def entity_df() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "driver_id": [1001, 1002, 1001, 1001],
            "customer_id": ["c1", "c2", "c3", "c1"],
            "event_timestamp": [BASE + dt.timedelta(hours=h) for h in (1, 1, 4, 6)],
        }
    )


FEATURES = ["driver_hourly_stats:conv_rate", "driver_hourly_stats:avg_daily_trips", "customer_profile:segment"]


def test_get_historical_features_in_feasts_form(client: FeatureClient, migrated: list[FeatureTable]) -> None:
    job = client.get_historical_features(entity_df=entity_df(), features=FEATURES)
    assert isinstance(job, HistoricalResult)
    frame = job.to_df()
    # The 2-hour TTL: the row of 03:00 serves 04:00 but not 06:00.
    assert frame["conv_rate"].tolist()[:3] == [0.5, 0.25, 0.75] and pd.isna(frame["conv_rate"][3])
    assert frame["segment"].tolist()[:2] == ["gold", "silver"] and pd.isna(frame["segment"][2])
    ours = client.get_historical_features(entity_df(), FEATURES)
    assert job.to_arrow().equals(ours) and frame.equals(ours.to_pandas()) and job.to_pandas().equals(frame)
    assert job.to_polars().equals(pl.from_arrow(ours))
    assert pa.table(job).equals(ours)  # the Arrow C stream, for any Arrow-native library
    assert len(job) == 4


def test_native_forms_return_tables_that_wrap_for_the_usual_names(
    client: FeatureClient, migrated: list[FeatureTable]
) -> None:
    """The native forms keep returning `pyarrow.Table` (pyarrow allows no methods on it); `FeatureResult`
    gives any of them Feast's names."""
    results = [
        client.read_table("driver_hourly_stats"),
        client.get_historical_features(entity_df(), FEATURES),
        client.get_online_features({"driver_id": [1001, 1002]}, FEATURES[:2]),
    ]
    for table in results:
        assert type(table) is pa.Table
        result = FeatureResult(table)
        assert result.to_arrow() is table and pa.table(result).equals(table)
        assert result.to_df().equals(table.to_pandas()) and result.to_pandas().equals(table.to_pandas())
        assert result.to_polars().equals(pl.from_arrow(table))


def test_full_feature_names_as_feast_names_them(client: FeatureClient, migrated: list[FeatureTable]) -> None:
    job = client.get_historical_features(entity_df=entity_df(), features=FEATURES, full_feature_names=True)
    assert job.to_df().columns.tolist() == [
        "driver_id",
        "customer_id",
        "event_timestamp",
        "driver_hourly_stats__conv_rate",
        "driver_hourly_stats__avg_daily_trips",
        "customer_profile__segment",
    ]
    online = client.get_online_features(
        features=FEATURES[:1], entity_rows=[{"driver_id": 1002}], full_feature_names=True, apply_ttl=False
    )
    assert online.to_dict() == {"driver_id": [1002], "driver_hourly_stats__conv_rate": [0.25]}


def test_get_online_features_in_feasts_form(client: FeatureClient, migrated: list[FeatureTable]) -> None:
    rows = [{"driver_id": 1001, "customer_id": "c2"}, {"driver_id": 7, "customer_id": "c1"}]
    response = client.get_online_features(features=FEATURES, entity_rows=rows)
    assert isinstance(response, OnlineResult)
    expected = {
        "driver_id": [1001, 7],
        "customer_id": ["c2", "c1"],
        "conv_rate": [0.75, None],
        "avg_daily_trips": [30, None],
        "segment": ["silver", "gold"],
    }
    # The TTL counts from now, long after these rows: like Feast's own server, expired rows are nulls
    # unless apply_ttl=False, one of our options that the Feast form keeps.
    stale = response.to_dict()
    assert stale["conv_rate"] == [None, None] and stale["segment"] == ["silver", "gold"]
    response = client.get_online_features(features=FEATURES, entity_rows=rows, apply_ttl=False)
    assert response.to_dict() == expected
    frame = response.to_df()
    assert frame.columns.tolist() == list(expected) and frame["segment"].tolist() == ["silver", "gold"]
    assert response.to_arrow().column_names == list(expected)
    with_times = response.to_dict(include_event_timestamps=True)
    assert list(with_times)[len(expected) :] == ["driver_hourly_stats__event_timestamp", "customer_profile__ts"]
    assert with_times["driver_hourly_stats__event_timestamp"][0] == BASE + dt.timedelta(hours=3)
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    assert client.get_online_features(features=FEATURES, entity_rows=columns, apply_ttl=False).to_dict() == expected
    assert response.to_polars().columns == list(expected)
    # Feast's order by position, or features by position and entity_rows by name.
    assert client.get_online_features(FEATURES, rows, apply_ttl=False).to_dict() == expected
    assert client.get_online_features(FEATURES, entity_rows=rows, apply_ttl=False).to_dict() == expected


def test_the_entities_are_given_once(client: FeatureClient) -> None:
    twice: dict[str, Any] = {"entity_df": entity_df()}
    with pytest.raises(TypeError, match="entity_rows, or Feast's entity_df"):
        client.get_historical_features(entity_df(), FEATURES, **twice)
    with pytest.raises(TypeError, match="entities, or Feast's entity_rows"):
        client.get_online_features({"driver_id": [1]}, FEATURES, **{"entity_rows": [{"driver_id": 1}]})
