"""Online requests end to end: plans cached, lookups over `do_get` and over open `do_exchange` sessions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from flight_server.base.streams import entity_chunks, stream_schema
from flight_server.iceberg.catalog import FeatureCatalog
from flight_server.online.lookups import (
    PLAN_CACHE_SIZE,
    OnlinePlan,
    catalog_source,
    index_source,
    inline_keys,
    key_columns,
    lookup,
    lookup_as_of,
    plan_online,
)
from flight_server.online.store import OnlineStore
from flight_server.training.sets import TrainingSets
from flight_server.wire.errors import RequestError
from flight_server.wire.reads import OnlineRequest, one_batch


class OnlineService:
    """Online requests over one server's indexes and catalog (and its training sets, for `as_of`)."""

    def __init__(self, store: OnlineStore, catalog: FeatureCatalog, training: TrainingSets):
        self.store, self.catalog, self.training = store, catalog, training
        self._plans: dict[tuple[tuple[str, ...], bool, bool, str | None], OnlinePlan] = {}

    def plan(self, request: OnlineRequest) -> OnlinePlan:
        """The checked plan; index plans are reused while their indexes keep the same generation."""
        if request.as_of:
            return plan_online(request, catalog_source(self.catalog))
        key = (tuple(request.features), request.full_feature_names, request.apply_ttl, request.request_time)
        cached = self._plans.get(key)
        if cached is not None and self._is_current(cached):
            return cached
        plan = plan_online(request, index_source(self.store))
        plan = replace(plan, states=tuple(s.index.state for s in plan.sources if s.index is not None))
        if len(self._plans) >= PLAN_CACHE_SIZE:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def _is_current(self, plan: OnlinePlan) -> bool:
        """Whether the plan's indexes are still the store's, at the generation it was checked against."""
        for source, state in zip(plan.sources, plan.states, strict=True):
            index = self.store.peek(source.name)
            if index is None or index is not source.index or index.state is not state:
                return False
        return True

    def answer(
        self, plan: OnlinePlan, keys: dict[str, list[Any]], is_cancelled: Callable[[], bool] | None = None
    ) -> pa.Table:
        """The answer for `keys`; a lookup into history (`as_of`) runs DuckDB, interrupted once `is_cancelled()`."""
        if plan.request.as_of:
            return lookup_as_of(self.catalog, self.training, plan, keys, is_cancelled)
        return lookup(plan, keys)

    def get(self, request: OnlineRequest, is_cancelled: Callable[[], bool] | None = None) -> pa.Table:
        """`do_get`: the keys are inline in the ticket."""
        if request.entities is None:
            raise RequestError("this online request has no 'entities': put keys inline or stream them (do_exchange)")
        plan = self.plan(request)
        return self.answer(plan, inline_keys(plan, request.entities), is_cancelled)

    def exchange(
        self,
        request: OnlineRequest,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> int:
        """`do_exchange`: each batch of keys the client writes is answered with exactly one batch.

        So a client may keep the call open as a session, one lookup per batch. The plan is checked
        again for every batch (it is cached), so a session sees rebuilt and recreated indexes; if the
        answer's columns change, the call ends with an error and the client opens a new one.
        """
        if request.entities is not None:
            raise RequestError("a do_exchange online request takes its keys from the stream: drop 'entities'")
        plan = self.plan(request)
        schema = plan.schema
        writer.begin(schema)
        columns = key_columns(plan, stream_schema(reader, "entity key"))
        rows = 0
        for chunk in entity_chunks(reader, "entity key", request.end_marker):
            if chunk.data is None:
                continue
            if not request.as_of and not self._is_current(plan):
                plan = self.plan(request)
                if plan.schema != schema:
                    raise RequestError(
                        "the answer's columns changed while this stream was open (a table was altered or "
                        "recreated): open a new stream"
                    )
            keys = {key: chunk.data.column(i).to_pylist() for key, i in zip(plan.key_types, columns, strict=True)}
            answer = self.answer(plan, keys, is_cancelled) if chunk.data.num_rows else schema.empty_table()
            writer.write_batch(one_batch(answer))
            rows += chunk.data.num_rows
        return rows
