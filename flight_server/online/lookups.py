"""Online requests: the latest features of the entities a request names, as one Arrow table.

Without `as_of` the answer comes from the online indexes (`online/index.py`): no catalog, Parquet or
DuckDB work happens per request. With `as_of` it is a point lookup into history: a training set
of one row per entity at that time (`training/`), computed by DuckDB.

The answer has one row per requested entity, in request order, duplicates kept: the key columns,
each requested feature, and per table `<table>__<event time column>` (the event time of the row
returned; `<table>` as training sets name it, `training.plan.table_labels`). Unknown entities, null
keys, and rows older than the table's TTL relative to the request time (now unless the request says;
`as_of` when given; `apply_ttl: false` switches it off) come back as nulls.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa

from flight_server.base.schemas import UTC_MICROS, table_arrow_schema
from flight_server.iceberg.catalog import FeatureCatalog, FeatureSpec, feature_spec, table_name
from flight_server.online.index import MISSING, IndexState, OnlineIndex, Rows, key_kind, key_values
from flight_server.online.store import OnlineStore
from flight_server.training.plan import plan_historical, table_labels
from flight_server.training.sets import TrainingSets, held_snapshots
from flight_server.wire.codec import parse_timestamp
from flight_server.wire.errors import NotFoundError, RequestError
from flight_server.wire.reads import HistoricalRequest, OnlineRequest, parse_feature_ref, values_type

AS_OF_COLUMN = "__online_as_of"

PLAN_CACHE_SIZE = 1024


@dataclass(frozen=True)
class Source:
    """One feature table as a request sees it."""

    name: str
    spec: FeatureSpec
    schema: pa.Schema
    index: OnlineIndex | None = None


@dataclass(frozen=True)
class OnlinePlan:
    """A checked online request: the tables, the output columns, the key columns and their types."""

    request: OnlineRequest
    sources: list[Source]
    columns: list[tuple[int, str, str]]  # per requested feature: source, column, output name
    key_types: dict[str, pa.DataType]
    time_columns: list[str]  # per source, the answer column of its event time
    # Per source, the index generation the plan was checked against (index plans only).
    states: tuple[IndexState, ...] = field(default=(), compare=False, repr=False)
    # Per source, its rows in answer form for the index generation they came from (see `answer_rows`).
    _answers: dict[int, tuple[Rows, Answer]] = field(default_factory=dict, compare=False, repr=False)

    @cached_property
    def schema(self) -> pa.Schema:
        fields = [pa.field(k, t) for k, t in self.key_types.items()]
        fields += [pa.field(out, self.sources[i].schema.field(col).type) for i, col, out in self.columns]
        times = zip(self.sources, self.time_columns, strict=True)
        fields += [pa.field(out, s.schema.field(s.spec.event_time).type) for s, out in times]
        return pa.schema(fields)

    @cached_property
    def answer_columns(self) -> list[list[tuple[str, str]]]:
        """Per source, the answer columns it gives, as (column of its index, answer name): its keys, its
        features in request order, its event time. With one source that is the whole answer."""
        return [
            [
                *((k, k) for k in s.spec.entity_keys),
                *((c, out) for i, c, out in self.columns if i == n),
                (s.spec.event_time, self.time_columns[n]),
            ]
            for n, s in enumerate(self.sources)
        ]

    @cached_property
    def answer_schemas(self) -> list[pa.Schema]:
        return [pa.schema([self.schema.field(out) for _, out in columns]) for columns in self.answer_columns]

    @cached_property
    def null_rows(self) -> list[pa.Table]:
        """Per source, its answer for one entity it does not know (the keys are filled in later)."""
        return [pa.Table.from_arrays([pa.nulls(1, f.type) for f in s], schema=s) for s in self.answer_schemas]

    def answer_rows(self, n: int, rows: Rows) -> Answer:
        """Source `n`'s index rows as answer columns (zero-copy), made once per index generation."""
        cached = self._answers.get(n)
        if cached is not None and cached[0] is rows:
            return cached[1]
        columns = [rows.table.column(c) for c, _ in self.answer_columns[n]]
        answer = Answer(pa.Table.from_arrays(columns, schema=self.answer_schemas[n]))
        self._answers[n] = (rows, answer)  # one assignment: concurrent readers see the old pair or this one
        return answer


class Answer:
    """An index's rows in answer form, and the rows of several entities taken from them at the cost of those rows.

    Arrow's `take` first concatenates a table of several chunks whole (4 ms a call for a million rows, for
    every lookup of more than one entity), and an index's rows are a base chunk and the tail chunks its refreshes
    added (`Rows.extend`). So `take` takes from each chunk its own rows and puts them in order after."""

    def __init__(self, table: pa.Table):
        self.table = table
        self.batches = table.to_batches()
        self.starts = np.cumsum([0, *(len(b) for b in self.batches)])[:-1]

    def take(self, positions: np.ndarray, missing: np.ndarray) -> pa.Table:
        """The rows at `positions` in their order, a row of nulls where `missing`."""
        if len(self.batches) <= 1:
            return self.table.take(pa.array(positions, mask=missing))
        found = np.flatnonzero(~missing)
        wanted = positions[found]
        chunk = np.searchsorted(self.starts, wanted, side="right") - 1
        if not len(found) or chunk.min() == chunk.max():  # all in one chunk: one take (the nulls' indices unread)
            c = int(chunk[0]) if len(found) else 0
            return pa.Table.from_batches([self.batches[c].take(pa.array(positions - self.starts[c], mask=missing))])
        order = np.argsort(chunk, kind="stable")  # the found rows grouped by chunk
        bounds = np.searchsorted(chunk[order], np.arange(len(self.batches) + 1))
        pieces = [
            self.batches[c].take(pa.array(wanted[order[low:high]] - self.starts[c]))
            for c, (low, high) in enumerate(itertools.pairwise(bounds))
            if low < high
        ]
        gathered = pa.Table.from_batches(pieces, schema=self.table.schema)  # as many rows as were found
        at = np.zeros(len(positions), np.int64)
        at[found[order]] = np.arange(len(found))
        return gathered.take(pa.array(at, mask=missing))


def plan_online(request: OnlineRequest, resolve: Callable[[str], Source]) -> OnlinePlan:
    """Check the features against their tables; `resolve` finds a table (an index, or the catalog)."""
    sources: list[Source] = []
    by_name: dict[str, int] = {}
    columns = []
    for ref in request.features:
        table_ref, feature = parse_feature_ref(ref)
        source = resolve(table_ref)
        if source.name not in by_name:
            by_name[source.name] = len(sources)
            sources.append(source)
        if source.schema.get_field_index(feature) < 0:
            raise NotFoundError(
                f"feature {ref!r}: {source.name!r} has no column {feature!r} (columns: {source.schema.names})"
            )
        columns.append((by_name[source.name], feature, feature))
    labels = table_labels([s.name for s in sources])  # as training sets name them
    if request.full_feature_names:
        columns = [(i, feature, f"{labels[sources[i].name]}__{feature}") for i, feature, _ in columns]
    times = [f"{labels[s.name]}__{s.spec.event_time}" for s in sources]
    key_types: dict[str, pa.DataType] = {}
    owners: dict[str, str] = {}
    for source in sources:
        for key in source.spec.entity_keys:
            kind = source.schema.field(key).type
            if key in key_types and key_kind(key_types[key]) != key_kind(kind):
                raise RequestError(
                    f"key {key!r} is {key_types[key]} in {owners[key]!r} but {kind} in {source.name!r}: "
                    "request them separately"
                )
            key_types.setdefault(key, kind)
            owners.setdefault(key, source.name)
    names = [*key_types, *(c[2] for c in columns), *times]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        hint = "" if request.full_feature_names else "; full_feature_names=true prefixes features with their table"
        raise RequestError(f"output column name(s) {clashes} would appear twice{hint}")
    return OnlinePlan(request, sources, columns, key_types, times)


def index_source(store: OnlineStore) -> Callable[[str], Source]:
    def resolve(ref: str) -> Source:
        index = store.get(ref)
        return Source(index.name, index.spec, index.schema, index)

    return resolve


def catalog_source(catalog: FeatureCatalog) -> Callable[[str], Source]:
    def resolve(ref: str) -> Source:
        table = catalog.read(ref)
        return Source(table_name(table), feature_spec(table), table_arrow_schema(table.schema()))

    return resolve


def _check_columns(plan: OnlinePlan, given: list[str]) -> None:
    missing = [k for k in plan.key_types if k not in given]
    if missing:
        raise RequestError(f"the entities lack key column(s) {missing}; the tables are keyed by {list(plan.key_types)}")
    extra = [c for c in given if c not in plan.key_types]
    if extra:
        raise RequestError(f"entity column(s) {extra} are not keys of the tables (keys: {list(plan.key_types)})")


def inline_keys(plan: OnlinePlan, entities: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Key values from a ticket, checked against the key types (JSON has ints and strings)."""
    _check_columns(plan, list(entities))
    for key, values in entities.items():
        expected = int if key_kind(plan.key_types[key]) == "int" else str
        for value in values:
            if value is not None and type(value) is not expected:
                raise RequestError(
                    f"entity key {key!r} is {plan.key_types[key]}: expected {expected.__name__} values, got {value!r}"
                )
    return {k: entities[k] for k in plan.key_types}


def key_columns(plan: OnlinePlan, stream: pa.Schema) -> list[int]:
    """Where a `do_exchange` stream carries each key column, checked against the key types once per
    stream (not per batch: a session's batches are its lookups)."""
    _check_columns(plan, stream.names)
    for key, expected in plan.key_types.items():
        given = stream.field(key).type
        if pa.types.is_dictionary(given):  # categorical keys: looked up by their values
            given = values_type(given)
        if key_kind(given) != key_kind(expected) and not pa.types.is_null(given):
            raise RequestError(f"entity column {key!r} is {given}; the tables key it as {expected}")
    return [stream.get_field_index(key) for key in plan.key_types]


def _key_arrays(plan: OnlinePlan, keys: dict[str, list[Any]]) -> list[pa.Array]:
    arrays = []
    for key, values in keys.items():
        try:
            arrays.append(pa.array(values, plan.key_types[key]))
        except (pa.ArrowException, OverflowError) as exc:
            raise RequestError(f"entity key {key!r}: {exc}") from None
    return arrays


def lookup(plan: OnlinePlan, keys: dict[str, list[Any]]) -> pa.Table:
    """Answer from the online indexes: a dict lookup per key, then one slice or `take` per table.

    This is the serving hot path. The index rows are kept in answer form (`answer_rows`), keys
    included: a key found in the index equals the requested one, so one known entity of one table
    is a zero-copy slice, and the wire, not the server, sets the latency.
    """
    request = plan.request
    if request.request_time:
        now = int(parse_timestamp(request.request_time, "request_time").timestamp() * 1_000_000)
    else:
        now = time.time_ns() // 1000
    taken, complete = [], True
    for n, source in enumerate(plan.sources):
        spec, index = source.spec, source.index
        assert index is not None
        cutoff = now - spec.ttl_seconds * 1_000_000 if request.apply_ttl and spec.ttl_seconds else None
        wanted = key_values([keys[k] for k in spec.entity_keys])
        if len(wanted) == 1:  # no numpy or take for the commonest request
            rows, position = index.lookup_one(wanted[0])
            found = position != MISSING and (cutoff is None or rows.event_us[position] >= cutoff)
            taken.append(plan.answer_rows(n, rows).table.slice(position, 1) if found else plan.null_rows[n])
            complete = complete and found
            continue
        rows, positions = index.lookup(wanted)
        missing = positions == MISSING
        if cutoff is not None and len(rows.event_us):
            missing |= rows.event_us[positions] < cutoff
        complete = complete and not missing.any()
        taken.append(plan.answer_rows(n, rows).take(positions, missing))
    if len(taken) == 1 and complete:
        return taken[0]
    arrays: list[Any] = _key_arrays(plan, keys)  # nulls where an entity was not found: the request's keys
    first = [len(s.spec.entity_keys) for s in plan.sources]  # each answer's first feature column
    for i, _, _ in plan.columns:
        arrays.append(taken[i].column(first[i]))
        first[i] += 1
    arrays += [t.column(t.num_columns - 1) for t in taken]
    return pa.Table.from_arrays(arrays, schema=plan.schema)


def lookup_as_of(
    catalog: FeatureCatalog,
    training: TrainingSets,
    plan: OnlinePlan,
    keys: dict[str, list[Any]],
    is_cancelled: Callable[[], bool] | None = None,
) -> pa.Table:
    """Answer from history: the latest rows at or before `as_of`, through a point-in-time join."""
    request = plan.request
    assert request.as_of is not None
    key_arrays = _key_arrays(plan, keys)
    rows = len(key_arrays[0])
    entities = pa.Table.from_arrays(
        [*key_arrays, pa.array([parse_timestamp(request.as_of, "as_of")] * rows, UTC_MICROS)],
        names=[*plan.key_types, AS_OF_COLUMN],
    )
    refs = [f"{plan.sources[i].name}:{column}" for i, column, _ in plan.columns]
    refs += [f"{s.name}:{s.spec.event_time}" for s in plan.sources]
    historical = HistoricalRequest(list(dict.fromkeys(refs)), entity_time=AS_OF_COLUMN, full_feature_names=True)
    joined_plan = replace(plan_historical(catalog, historical, entities.schema), apply_ttl=request.apply_ttl)
    with training.cache.caches.in_use.hold(held_snapshots(joined_plan)):  # expiry keeps them until it is read
        joined = training.run_inline(joined_plan, entities, build=False, is_cancelled=is_cancelled).read_all()
    arrays = [joined.column(k) for k in plan.key_types]
    labels = table_labels([s.name for s in plan.sources])  # the training set's full feature names
    arrays += [joined.column(f"{labels[plan.sources[i].name]}__{column}") for i, column, _ in plan.columns]
    arrays += [joined.column(name) for name in plan.time_columns]
    return pa.Table.from_arrays(arrays, schema=plan.schema)
