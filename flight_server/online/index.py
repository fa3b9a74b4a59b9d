"""The online index: every entity's latest feature row, in memory, for millisecond lookups.

`OnlineIndex` holds one feature table's latest row per entity (latest event time, ties to the
latest created time, then to the row last in commit order, as for training sets; rows with a null
key or event time never count) as an
Arrow table, and a dict from key to row. `OnlineStore` builds an index on first use (or at
start-up), polls the catalog, and refreshes in the background: snapshots that only appended data
are applied from their added files alone, and compactions (checked `replace` snapshots: the same
rows) change nothing; anything else (overwrite, delete, a schema or definition change) rebuilds from
the whole table, read as a scan reads it (`reads.paths.scan_relation`: Arrow's reader of the data
files without the rows of position delete files, or DuckDB's `iceberg_scan` where there are equality
delete files) into DuckDB's latest-per-key query.

Readers never wait for a refresh and never see a half-built index. A rebuild publishes a new
`IndexState` in one assignment. An incremental refresh first publishes the longer row table, then
points the dict at the new rows; a reader looks keys up before it reads the row table, so every
key it finds maps to a complete row.
"""

from __future__ import annotations

import itertools
import sys
import time
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from pyiceberg.table import Table

from flight_server.base.filters import quote
from flight_server.base.schemas import micros
from flight_server.iceberg.catalog import FeatureSpec
from flight_server.iceberg.lineage import appended_since
from flight_server.reads.paths import ORDER

MISSING = -1

NULL_MICROS = np.iinfo(np.int64).min

# Rows appended by refreshes are kept in tail chunks after the base: small refreshes gather in the last one up to
# TAIL_ROWS rows (copied whole each time), larger ones add a chunk of their own. The tail is merged into the base
# once it passes TAIL_ROWS and an eighth of the base (TAIL_FRACTION); past TAIL_CHUNKS chunks it is combined into
# one. Merging at every refresh that passed TAIL_ROWS copied a 5M-row index each time (0.94 s a refresh). A lookup's
# `take` over 64 chunks took 7x as long as over one (0.42 ms against 0.06 ms for 100 keys of 24,573 entities), over
# two 2.5x.
TAIL_ROWS = 65_536
TAIL_FRACTION = 8
TAIL_CHUNKS = 4

COMPACT_STEP = 8192  # entities re-numbered per C call by a compaction: each holds the GIL ~1 ms

READ_BATCH_ROWS = 65_536

SMALL_KEY_BYTES = 32  # an int key; string and composite keys take more, which the final estimate counts

ENTRY_BYTES = 100  # per entity beyond its Arrow row and key object: dict slot, row number, two times


def key_kind(t: pa.DataType) -> str | None:
    """'int' or 'str': the key types an index can hold (and compare across int widths)."""
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "str"
    return None


def key_values(columns: list[list[Any]]) -> list[Any]:
    """Python keys from key columns' values: the value for one key, a tuple for composite keys."""
    if len(columns) == 1:
        return columns[0]
    return list(zip(*columns, strict=True))


def table_keys(rows: pa.Table, spec: FeatureSpec) -> list[Any]:
    return key_values([rows.column(k).to_pylist() for k in spec.entity_keys])


def tie_micros(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Timestamps as int64 UTC microseconds, nulls as the smallest int64 (they lose every tie)."""
    values, valid = micros(column)
    return np.where(valid, values, NULL_MICROS)


def latest_sql(spec: FeatureSpec, columns: list[str], source: str, found: set[str] | None = None) -> str:
    """The latest row per key of `source`: the same choice a training-set join makes, full ties (keys, event time,
    created time) going to the row last in commit order (the source's `ORDER` column: `scan_relation`). Columns of
    the table that the source lacks (not in `found`: added to the schema after its files were written) are nulls."""
    keys = ", ".join(quote(k) for k in spec.entity_keys)
    order = f"{quote(spec.event_time)} DESC"
    if spec.created_time:
        order += f", {quote(spec.created_time)} DESC NULLS LAST"
    order += f", {quote(ORDER)} DESC"
    present = " AND ".join(f"{quote(c)} IS NOT NULL" for c in (*spec.entity_keys, spec.event_time))
    return (
        f"SELECT {', '.join(quote(c) if found is None or c in found else f'NULL AS {quote(c)}' for c in columns)} "
        f"FROM {source} WHERE {present} "
        f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY {order}) = 1"
    )


def appended_files(table: Table, since: int, until: int) -> list[str] | None:
    """Data files added after snapshot `since` up to `until` if every commit between them only appended or
    compacted (a `replace` whose entries show the rows unchanged: the index holds the latest row per key of the
    same rows); None when anything else happened (or `since` is no longer an ancestor). A file may have been
    compacted away since it was appended: readable until snapshot expiry deletes it (`OnlineStore` rebuilds then)."""
    files = appended_since(table, since, until, through_replaces=True).files
    return None if files is None else [f.file_path for f in files]


def _key_bytes(key: Any) -> int:
    if isinstance(key, tuple):
        return sys.getsizeof(key) + sum(sys.getsizeof(k) for k in key)
    return sys.getsizeof(key)


def estimate_bytes(rows: pa.Table, sample_key: Any) -> int:
    """Memory an index over `rows` takes: the Arrow rows, and per entity its key object and `ENTRY_BYTES`."""
    return rows.nbytes + rows.num_rows * (ENTRY_BYTES + _key_bytes(sample_key))


class Rows(NamedTuple):
    """An index's rows with their event and created times as UTC microseconds (for TTL checks
    and refresh comparisons without Arrow calls); replaced whole, never mutated."""

    table: pa.Table
    event_us: np.ndarray
    created_us: np.ndarray

    @classmethod
    def of(cls, table: pa.Table, spec: FeatureSpec) -> Rows:
        created = (
            tie_micros(table.column(spec.created_time)) if spec.created_time else np.zeros(table.num_rows, np.int64)
        )
        return cls(table, tie_micros(table.column(spec.event_time)), created)

    def extend(self, more: Rows) -> Rows:
        """These rows and then `more`: the base chunk, then at most `TAIL_CHUNKS` tail chunks (see `TAIL_ROWS`)."""
        table, added = self.table, more.table.combine_chunks()
        lengths = [len(c) for c in table.column(0).chunks] if table.num_columns else []
        last = lengths[-1] if len(lengths) > 1 else 0
        if last and last + added.num_rows <= TAIL_ROWS:  # a small refresh: into the last tail chunk
            head = table.slice(0, table.num_rows - last)
            joined = pa.concat_tables([head, pa.concat_tables([table.slice(head.num_rows), added]).combine_chunks()])
        else:
            joined = pa.concat_tables([table, added])
        base = lengths[0] if lengths else 0
        tail = joined.num_rows - base
        if tail > max(TAIL_ROWS, base // TAIL_FRACTION):
            joined = joined.combine_chunks()
        elif joined.column(0).num_chunks > TAIL_CHUNKS + 1:  # the tail in one chunk: copies at most an eighth
            joined = pa.concat_tables([joined.slice(0, base), joined.slice(base).combine_chunks()])
        return Rows(
            joined,
            np.concatenate([self.event_us, more.event_us]),
            np.concatenate([self.created_us, more.created_us]),
        )

    def take(self, positions: np.ndarray) -> Rows:
        return Rows(
            self.table.take(pa.array(positions)).combine_chunks(),
            self.event_us[positions],
            self.created_us[positions],
        )


class IndexState:
    """One generation of an index: `positions[key]` is the row of `rows` holding the key's latest
    features. Incremental refreshes replace `rows` (before they touch `positions`); rebuilds
    replace the whole state."""

    def __init__(
        self, snapshot_id: int | None, schema_id: int, spec: FeatureSpec, rows: Rows, positions: dict[Any, int]
    ):
        self.snapshot_id = snapshot_id
        self.schema_id = schema_id
        self.spec = spec
        self.rows = rows
        self.positions = positions
        self.sample_key = next(iter(positions), None)  # for size estimates; iterating later would race refreshes
        self.dead = 0
        self.refreshed_at = time.time()


class OnlineIndex:
    """The latest row per entity of one feature table."""

    def __init__(self, name: str, state: IndexState, build_seconds: float, read_path: str):
        self.name = name
        self.state = state
        self.build_seconds = build_seconds
        self.read_path = read_path  # of the last full build: what the rows of a rebuild cost to read
        self.version: str | None = None  # of the table as last refreshed (`table_version`)
        self.error: str | None = None  # of the last refresh, if it failed: what a client may see of it
        self.failure: str | None = None  # the same with its whole text (server paths and all), for the log
        self.appends = 0  # refreshes applied from appended files alone (past compactions)
        self.rebuilds = 0  # refreshes that rebuilt from the whole table
        # When the index was last known to match its table's current snapshot (`time.monotonic`: its age is the
        # lag /metrics shows, which a step of the wall clock, NTP's or a resumed VM's, must not move).
        self.checked_at = time.monotonic()

    @property
    def spec(self) -> FeatureSpec:
        return self.state.spec

    @property
    def schema(self) -> pa.Schema:
        return self.state.rows.table.schema

    def lookup(self, keys: list[Any]) -> tuple[Rows, np.ndarray]:
        """The rows, and the position of each key in them (`MISSING` for unknown keys)."""
        state = self.state
        get = state.positions.get
        found = np.fromiter((get(k, MISSING) for k in keys), np.int64, len(keys))
        return state.rows, found  # rows read after the lookups: see the module docstring

    def lookup_one(self, key: Any) -> tuple[Rows, int]:
        """`lookup` of a single key."""
        state = self.state
        return state.rows, state.positions.get(key, MISSING)

    def nbytes(self) -> int:
        state = self.state
        return estimate_bytes(state.rows.table, state.sample_key)

    def stats(self) -> dict[str, Any]:
        state = self.state
        return {
            "entities": len(state.positions),
            "bytes": self.nbytes(),
            "snapshot_id": state.snapshot_id,
            "refreshed_at": state.refreshed_at,
            "build_seconds": round(self.build_seconds, 3),
            "read_path": self.read_path,
            "appends": self.appends,
            "rebuilds": self.rebuilds,
            "error": self.error,
        }

    def apply(self, latest: pa.Table, snapshot_id: int) -> int:
        """Fold the latest rows of newly appended files in; returns how many keys changed."""
        state = self.state
        new = Rows.of(latest.cast(self.schema), state.spec)
        keys = table_keys(new.table, state.spec)
        get = state.positions.get
        old = np.fromiter((get(k, MISSING) for k in keys), np.int64, len(keys))
        wins = old == MISSING
        present = ~wins
        if present.any():
            before = old[present]
            new_ts, old_ts = new.event_us[present], state.rows.event_us[before]
            newer = (new_ts > old_ts) | (
                (new_ts == old_ts) & (new.created_us[present] >= state.rows.created_us[before])
            )
            wins[present] = newer
        winners = np.flatnonzero(wins)
        if len(winners):
            if state.sample_key is None:
                state.sample_key = keys[0]
            first = len(state.rows.event_us)
            state.rows = state.rows.extend(new.take(winners))
            state.positions.update(zip([keys[i] for i in winners], range(first, first + len(winners)), strict=True))
            state.dead += int(present[winners].sum())
        state.snapshot_id = snapshot_id
        state.refreshed_at = time.time()
        if state.dead > len(state.positions):
            self.compact()
        return len(winners)

    def compact(self) -> None:
        """Drop rows that newer ones replaced, into one contiguous table (published as a new state).

        The entities are numbered `COMPACT_STEP` at a time: one C call over all of them holds the GIL, and stalls
        every lookup, for as long as it takes (measured: 9-12 ms for 80,000 entities, 0.6 s for a million)."""
        state = self.state
        live = np.empty(len(state.positions), np.int64)
        keys, rows = iter(state.positions), iter(state.positions.values())  # only this refresh changes the dict
        positions: dict[Any, int] = {}
        for start in range(0, len(live), COMPACT_STEP):
            step = list(itertools.islice(keys, COMPACT_STEP))
            live[start : start + len(step)] = np.fromiter(itertools.islice(rows, COMPACT_STEP), np.int64, len(step))
            positions.update(zip(step, range(start, start + len(step)), strict=True))
        compacted = IndexState(state.snapshot_id, state.schema_id, state.spec, state.rows.take(live), positions)
        compacted.refreshed_at = state.refreshed_at
        self.state = compacted
