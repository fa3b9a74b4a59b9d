"""Filters: the SQL built from a parsed filter selects exactly the rows a plain evaluator selects."""

from __future__ import annotations

import datetime as dt

import duckdb
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyiceberg.schema import Schema
from pyiceberg.types import DoubleType, LongType, NestedField, StringType, TimestamptzType

from flight_server.errors import NotFoundError, RequestError
from flight_server.filters import parse_filter, quote, to_sql

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
