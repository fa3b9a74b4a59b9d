"""Row filters: parsed by pyiceberg's expression parser, checked against the table, then turned
into a DuckDB WHERE clause whose identifiers are quoted and whose values are bound parameters.

The user's text never reaches SQL: only column names that exist in the table (quoted) and
operators chosen here do. Comparisons follow SQL semantics: a null never satisfies one.

Parsing is the costly part (pyparsing, superlinear in the number of values: 1,000 values in an IN list
take 0.1 s, 10,000 take 0.6 s, 100,000 take 33 s), so `check_filter_cost` counts values, operators and
nesting with one regular expression first and refuses a filter above the limits before pyiceberg sees it.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from typing import Any

from pyiceberg.expressions import (
    AlwaysTrue,
    And,
    BooleanExpression,
    BoundTerm,
    LiteralPredicate,
    Not,
    Or,
    Reference,
    SetPredicate,
)
from pyiceberg.expressions.literals import Literal, StringLiteral
from pyiceberg.expressions.parser import parse
from pyiceberg.expressions.visitors import BoundBooleanExpressionVisitor, bind, visit
from pyiceberg.schema import Schema
from pyiceberg.types import DateType, TimestampType, TimestamptzType, TimeType, UUIDType

from flight_server.wire.errors import LimitError, NotFoundError, RequestError

_EPOCH = dt.datetime(1970, 1, 1)

# The largest filter these allow parses, binds and becomes SQL in about 0.2 s on one core.
MAX_FILTER_CHARS = 64 * 1024
MAX_FILTER_VALUES = 1_000  # literals: strings, numbers, true/false
MAX_FILTER_OPERATORS = 200  # and, or, not
MAX_FILTER_DEPTH = 50  # parentheses

# Quoted strings and identifiers (unterminated ones too), words, numbers, parentheses; anything else is skipped.
_TOKENS = re.compile(
    r"""'(?:[^'\\]|''|\\.)*'?|"(?:[^"\\]|\\.)*"?|[A-Za-z_][\w$]*|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[()]"""
)
# ISO-8601 with `Z`, its designator of UTC (JavaScript's `Date.prototype.toISOString` ends so).
_UTC_DESIGNATOR = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?)[Zz]")
_ENTITY_STREAMS = (
    "a large key set belongs in entity rows, which are streamed and joined instead of parsed: "
    "a training set's entities, an online lookup's keys, or delete(keys=...)"
)


def quote(identifier: str) -> str:
    """A DuckDB identifier, double-quoted with embedded quotes doubled."""
    return '"' + identifier.replace('"', '""') + '"'


def parse_filter(text: str | None, schema: Schema) -> BooleanExpression:
    """The parsed filter, checked against `schema`; a `RequestError` that says what is wrong otherwise."""
    if text is None or not text.strip():
        return AlwaysTrue()
    check_filter_cost(text)
    try:
        expression = parse(text)
    except Exception as exc:  # pyparsing's message lists the whole grammar: keep the position only
        where = getattr(exc, "loc", None)
        hint = f" near {text[where : where + 20]!r} (character {where})" if isinstance(where, int) else ""
        raise RequestError(
            f"cannot parse filter {text!r}{hint}; expected e.g. \"driver_id = 5 and ts >= '2024-01-01T00:00:00+00:00'\""
        ) from None
    expression = _utc_offsets(expression, schema)
    try:
        bind(schema, expression, case_sensitive=True)
    except ValueError as exc:
        message = str(exc)
        if message.startswith("Could not find field"):
            raise NotFoundError(
                f"filter {text!r}: {message.split(',')[0].lower()} (columns: {schema.column_names})"
            ) from None
        raise RequestError(f"filter {text!r}: {message}") from None
    return expression


def _utc_offsets(expression: BooleanExpression, schema: Schema) -> BooleanExpression:
    """The expression with `Z` read as `+00:00` in the literals compared with timestamptz columns: pyiceberg takes only
    `+HH:MM` offsets there, where every other timestamp of a request takes `Z` too."""
    if isinstance(expression, And | Or):
        return type(expression)(_utc_offsets(expression.left, schema), _utc_offsets(expression.right, schema))
    if isinstance(expression, Not):
        return Not(_utc_offsets(expression.child, schema))
    if not isinstance(expression, LiteralPredicate | SetPredicate) or not isinstance(expression.term, Reference):
        return expression
    try:
        field_type = schema.find_field(expression.term.name, case_sensitive=True).field_type
    except ValueError:
        return expression  # binding names the unknown column
    if not isinstance(field_type, TimestamptzType):
        return expression
    if isinstance(expression, LiteralPredicate):
        return type(expression)(expression.term, _utc_offset(expression.literal))
    return type(expression)(expression.term, {_utc_offset(literal) for literal in expression.literals})


def _utc_offset(literal: Literal[Any]) -> Literal[Any]:
    if isinstance(literal, StringLiteral) and (match := _UTC_DESIGNATOR.fullmatch(literal.value)):
        return StringLiteral(match.group(1) + "+00:00")
    return literal


def check_filter_cost(text: str) -> None:
    """Refuse a filter too large to parse in reasonable time (a `LimitError` with the numbers), before parsing."""
    if len(text) > MAX_FILTER_CHARS:
        raise LimitError(
            f"filter of {len(text):,} characters: this server parses at most {MAX_FILTER_CHARS:,}; {_ENTITY_STREAMS}"
        )
    values = operators = depth = deepest = 0
    for token in _TOKENS.findall(text):
        first = token[0]
        if first == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif first == ")":
            depth -= 1
        elif first == "'" or not (first.isalpha() or first in '_"'):
            values += 1
        elif (word := token.lower()) in ("and", "or", "not"):
            operators += 1
        elif word in ("true", "false"):
            values += 1
    for count, limit, what in (
        (values, MAX_FILTER_VALUES, "values"),
        (operators, MAX_FILTER_OPERATORS, "and/or/not operators"),
        (deepest, MAX_FILTER_DEPTH, "levels of parentheses"),
    ):
        if count > limit:
            raise LimitError(
                f"filter with {count:,} {what}: this server takes at most {limit:,} (a filter's cost grows faster "
                f"than its size: 1,000 values parse in 0.1 s, 100,000 in 30 s); {_ENTITY_STREAMS}"
            )


def to_sql(expression: BooleanExpression, schema: Schema) -> tuple[str, list[Any]]:
    """A SQL condition with `?` placeholders and the values to bind to them."""
    params: list[Any] = []
    sql = visit(bind(schema, expression, case_sensitive=True), _SqlBuilder(schema, params))
    return sql, params


class _SqlBuilder(BoundBooleanExpressionVisitor[str]):
    def __init__(self, schema: Schema, params: list[Any]):
        self.schema, self.params = schema, params

    def _column(self, term: BoundTerm) -> str:
        field = term.ref().field
        if all(field.field_id != top.field_id for top in self.schema.fields):
            raise RequestError(
                f"filters on nested field {self.schema.find_column_name(field.field_id)!r} are not supported"
            )
        return quote(field.name)

    def _value(self, term: BoundTerm, literal: Literal[Any] | Any) -> str:
        """A `?` placeholder for a literal (or a value of an IN set), its value in `params`."""
        value = literal.value if isinstance(literal, Literal) else literal
        field_type = term.ref().field.field_type
        if isinstance(field_type, TimestamptzType):
            value = (_EPOCH + dt.timedelta(microseconds=value)).replace(tzinfo=dt.timezone.utc)
        elif isinstance(field_type, TimestampType):
            value = _EPOCH + dt.timedelta(microseconds=value)
        elif isinstance(field_type, DateType):
            value = _EPOCH.date() + dt.timedelta(days=value)
        elif isinstance(field_type, TimeType):
            value = (_EPOCH + dt.timedelta(microseconds=value)).time()
        elif isinstance(field_type, UUIDType) and isinstance(value, bytes):
            value = uuid.UUID(bytes=value)
        self.params.append(value)
        return "?"

    def _compare(self, term: BoundTerm, op: str, literal: Literal[Any]) -> str:
        return f"{self._column(term)} {op} {self._value(term, literal)}"

    def visit_true(self) -> str:
        return "TRUE"

    def visit_false(self) -> str:
        return "FALSE"

    def visit_not(self, child_result: str) -> str:
        return f"(NOT {child_result})"

    def visit_and(self, left_result: str, right_result: str) -> str:
        return f"({left_result} AND {right_result})"

    def visit_or(self, left_result: str, right_result: str) -> str:
        return f"({left_result} OR {right_result})"

    def visit_in(self, term: BoundTerm, literals: set[Any]) -> str:
        values = ", ".join(self._value(term, v) for v in sorted(literals, key=repr))
        return f"{self._column(term)} IN ({values})"

    def visit_not_in(self, term: BoundTerm, literals: set[Any]) -> str:
        values = ", ".join(self._value(term, v) for v in sorted(literals, key=repr))
        return f"{self._column(term)} NOT IN ({values})"

    def visit_is_nan(self, term: BoundTerm) -> str:
        return f"isnan({self._column(term)})"

    def visit_not_nan(self, term: BoundTerm) -> str:
        return f"NOT isnan({self._column(term)})"

    def visit_is_null(self, term: BoundTerm) -> str:
        return f"{self._column(term)} IS NULL"

    def visit_not_null(self, term: BoundTerm) -> str:
        return f"{self._column(term)} IS NOT NULL"

    def visit_equal(self, term: BoundTerm, literal: Literal[Any]) -> str:
        return self._compare(term, "=", literal)

    def visit_not_equal(self, term: BoundTerm, literal: Literal[Any]) -> str:
        return self._compare(term, "<>", literal)

    def visit_greater_than_or_equal(self, term: BoundTerm, literal: Literal[Any]) -> str:
        return self._compare(term, ">=", literal)

    def visit_greater_than(self, term: BoundTerm, literal: Literal[Any]) -> str:
        return self._compare(term, ">", literal)

    def visit_less_than(self, term: BoundTerm, literal: Literal[Any]) -> str:
        return self._compare(term, "<", literal)

    def visit_less_than_or_equal(self, term: BoundTerm, literal: Literal[Any]) -> str:
        return self._compare(term, "<=", literal)

    def visit_starts_with(self, term: BoundTerm, literal: Literal[Any]) -> str:
        return f"starts_with({self._column(term)}, {self._value(term, literal)})"

    def visit_not_starts_with(self, term: BoundTerm, literal: Literal[Any]) -> str:
        return f"NOT starts_with({self._column(term)}, {self._value(term, literal)})"
