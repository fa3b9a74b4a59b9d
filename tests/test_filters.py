"""Filters: the SQL built from a parsed filter, and scans of a merge-on-read table on every read path that
filters, select exactly the rows a plain evaluator with SQL's three-valued logic selects."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyiceberg.catalog import load_catalog
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.types import DoubleType, LongType, NestedField, StringType, TimestamptzType

from flight_client import FeatureClient
from flight_server.base.filters import parse_filter, quote, to_sql
from flight_server.base.schemas import table_arrow_schema
from flight_server.reads.caches import ReadCaches
from flight_server.reads.duck import Engine
from flight_server.reads.paths import open_scan
from flight_server.reads.plan import plan_table_scan
from flight_server.wire.errors import NotFoundError, RequestError
from flight_server.wire.reads import ScanRequest
from tests.conftest import sqlite_catalog, start_server

UTC = dt.timezone.utc
SCHEMA = Schema(
    NestedField(1, "a", LongType()),
    NestedField(2, "s", StringType()),
    NestedField(3, "x", DoubleType()),
    NestedField(4, "ts", TimestamptzType()),
    NestedField(5, "select", LongType()),  # a reserved word: must be quoted
)
BASE = dt.datetime(2025, 1, 1, tzinfo=UTC)

ints = st.integers(-5, 5)
strs = st.sampled_from(["", "a", "ab", "b", "ba", "it's"])
floats = st.sampled_from([-1.5, 0.0, 0.5, 2.0])
times = st.integers(0, 4).map(lambda h: BASE + dt.timedelta(hours=h))
rows = st.lists(
    st.tuples(st.none() | ints, st.none() | strs, st.none() | floats, st.none() | times, st.none() | ints),
    max_size=25,
)


def _lit(value: object) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, dt.datetime):
        return f"'{value.isoformat()}'"
    return repr(value)


COLUMNS = {"a": ints, "s": strs, "x": floats, "ts": times, '"select"': ints}
OPS = {
    "=": lambda v, w: v == w,
    "!=": lambda v, w: v != w,
    "<": lambda v, w: v < w,
    "<=": lambda v, w: v <= w,
    ">": lambda v, w: v > w,
    ">=": lambda v, w: v >= w,
}
INDEX = {"a": 0, "s": 1, "x": 2, "ts": 3, '"select"': 4}


@st.composite
def predicates(draw: st.DrawFn) -> tuple[str, object]:
    """A filter string and a reference evaluator with SQL's three-valued logic (None = unknown)."""
    column = draw(st.sampled_from(sorted(COLUMNS)))
    i = INDEX[column]
    kind = draw(
        st.sampled_from(
            ["cmp", "in", "null", "notnull", "starts"] if column == "s" else ["cmp", "in", "null", "notnull"]
        )
    )
    if kind == "cmp":
        op = draw(st.sampled_from(sorted(OPS)))
        value = draw(COLUMNS[column])
        return f"{column} {op} {_lit(value)}", lambda r: None if r[i] is None else OPS[op](r[i], value)
    if kind == "in":
        values = draw(st.lists(COLUMNS[column], min_size=1, max_size=3, unique=True))
        if column == "ts":  # the grammar has no list of timestamps: spell it as ORs
            text = " or ".join(f"ts = {_lit(v)}" for v in values)
            return f"({text})", lambda r: None if r[i] is None else r[i] in values
        return f"{column} in ({', '.join(_lit(v) for v in values)})", lambda r: None if r[i] is None else r[i] in values
    if kind == "starts":
        prefix = draw(st.sampled_from(["a", "b", "it"]))
        return f"s like '{prefix}%'", lambda r: None if r[i] is None else r[i].startswith(prefix)
    if kind == "null":
        return f"{column} is null", lambda r: r[i] is None
    return f"{column} is not null", lambda r: r[i] is not None


def _and(p: object, q: object) -> object:
    return False if p is False or q is False else None if p is None or q is None else True


def _or(p: object, q: object) -> object:
    return True if p is True or q is True else None if p is None or q is None else False


expressions = st.recursive(
    predicates(),
    lambda inner: st.one_of(
        st.tuples(inner, inner).map(
            lambda pq: (f"({pq[0][0]}) and ({pq[1][0]})", lambda r, p=pq[0][1], q=pq[1][1]: _and(p(r), q(r)))
        ),
        st.tuples(inner, inner).map(
            lambda pq: (f"({pq[0][0]}) or ({pq[1][0]})", lambda r, p=pq[0][1], q=pq[1][1]: _or(p(r), q(r)))
        ),
        inner.map(lambda p: (f"not ({p[0]})", lambda r, f=p[1]: None if f(r) is None else not f(r))),
    ),
    max_leaves=4,
)


@settings(max_examples=150, deadline=None)
@given(data=rows, expression=expressions)
def test_sql_matches_reference(data: list[tuple[object, ...]], expression: tuple[str, object]) -> None:
    text, reference = expression
    table = pa.table(
        {
            "a": pa.array([r[0] for r in data], pa.int64()),
            "s": pa.array([r[1] for r in data], pa.string()),
            "x": pa.array([r[2] for r in data], pa.float64()),
            "ts": pa.array([r[3] for r in data], pa.timestamp("us", tz="UTC")),
            "select": pa.array([r[4] for r in data], pa.int64()),
            "row": pa.array(range(len(data)), pa.int64()),
        }
    )
    where, params = to_sql(parse_filter(text, SCHEMA), SCHEMA)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("t", table)
    got = [row for (row,) in con.execute(f"SELECT {quote('row')} FROM t WHERE {where} ORDER BY 1", params).fetchall()]
    expected = [n for n, r in enumerate(data) if reference(r) is True]  # type: ignore[operator]
    assert got == expected, (text, where, params)


def test_user_text_never_reaches_sql() -> None:
    where, params = to_sql(parse_filter("s = 'x''); DROP TABLE t; --'", SCHEMA), SCHEMA)
    assert "DROP" not in where and params == ["x'); DROP TABLE t; --"]


def test_utc_designator_of_timestamptz_literals() -> None:
    """`Z`, as JavaScript's `toISOString` writes it, is `+00:00` in a literal compared with a timestamptz column (whose
    literals pyiceberg reads with `+HH:MM` offsets only); a string column's literal stays as written."""
    text = "ts >= '2025-01-01T02:00:00.000Z' and s = '2025-01-01T00:00:00Z' or ts in ('2025-01-01T03:00:00Z', '{}')"
    _, params = to_sql(parse_filter(text.format("2025-01-01T04:00:00.5Z"), SCHEMA), SCHEMA)
    assert params[:2] == [BASE + dt.timedelta(hours=2), "2025-01-01T00:00:00Z"]
    assert sorted(params[2:]) == [BASE + dt.timedelta(hours=3), BASE + dt.timedelta(hours=4, milliseconds=500)]


@pytest.mark.parametrize(
    "text, error, message",
    [
        ("a >", RequestError, "cannot parse filter"),
        ("nope = 1", NotFoundError, "could not find field with name nope"),
        ("a = 'one'", RequestError, "Could not convert one into a long"),
        ("ts > '2025-01-01'", RequestError, "Invalid timestamp"),
    ],
)
def test_bad_filters(text: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        parse_filter(text, SCHEMA)


STORED_ROWS = 400  # in two data files of row groups of 25 rows; a few batches of 16 rows each
DELETED = {k for k in range(STORED_ROWS) if k % 7 == 3} | set(range(150, 260, 2))


def stored_row(k: int) -> tuple[object, ...]:
    """Row `k` of the stored table; `a` and `s` follow the key, so row group statistics rule groups out."""
    return (
        None if k % 9 == 0 else (k // 40) % 11 - 5,
        None if k % 11 == 0 else ["", "a", "ab", "b", "ba", "it's"][(k // 70) % 6],
        None if k % 6 == 0 else [-1.5, 0.0, 0.5, 2.0][k % 4],
        None if k % 13 == 0 else BASE + dt.timedelta(hours=k // 90),
        None if k % 5 == 0 else k % 11 - 5,
    )


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Table, Engine]:
    """A merge-on-read table (two data files, position deletes in both) holding the rows `stored_row` makes."""
    catalog = sqlite_catalog(Path(tmp_path_factory.mktemp("filters")))
    values = [stored_row(k) for k in range(STORED_ROWS)]
    data = pa.table(
        {
            "k": pa.array(range(STORED_ROWS), pa.int64()),
            "t": pa.array([BASE] * STORED_ROWS, pa.timestamp("us", tz="UTC")),
            **{f.name: pa.array([r[i] for r in values], f.type) for i, f in enumerate(table_arrow_schema(SCHEMA))},
        }
    )
    server = start_server(catalog)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            client.write("tests.filters", data.slice(0, 1), entity_keys=["k"], event_time="t", partition_by=[])
            with load_catalog("default", **catalog).load_table("tests.filters").transaction() as transaction:
                transaction.set_properties({"write.parquet.row-group-limit": "25"})
            client.write("tests.filters", data.slice(1, 199))
            client.write("tests.filters", data.slice(200))
            for keys in ([k for k in DELETED if k % 7 == 3], list(range(150, 260, 2))):
                client.delete("tests.filters", keys={"k": keys}, mode="merge-on-read")
    finally:
        server.shutdown()
    return load_catalog("default", **catalog).load_table("tests.filters"), Engine(memory_limit="256MB", threads=2)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(expression=expressions)
def test_scans_of_a_merge_on_read_table_match_reference(
    stored: tuple[Table, Engine], expression: tuple[str, object]
) -> None:
    """Over files with position deletes and row groups DuckDB prunes by their statistics; with a limit too."""
    (table, engine), (text, reference) = stored, expression
    expected = [k for k in range(STORED_ROWS) if k not in DELETED and reference(stored_row(k)) is True]  # type: ignore[operator]
    plan = plan_table_scan(table, ScanRequest(table="tests.filters", columns=["k"], filter=text), ReadCaches())
    reader, path = open_scan(plan, engine, batch_rows=16)
    assert path == "read_parquet"
    assert sorted(reader.read_all().column("k").to_pylist()) == expected, text
    limited = plan_table_scan(
        table, ScanRequest(table="tests.filters", columns=["k"], filter=text, limit=7), plan.caches
    )
    reader, path = open_scan(limited, engine, batch_rows=16)
    got = reader.read_all().column("k").to_pylist()
    assert path == "read_parquet" and len(got) == min(7, len(expected)) and set(got) <= set(expected), text
