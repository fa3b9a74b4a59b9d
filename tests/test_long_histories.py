"""Answers served to ML users on long-written tables. Random histories of puts (new and existing entities, in-order,
out-of-order and tied event times, created times), deletes (by keys and by filter, both modes), compactions,
maintenance rounds, snapshot expiry with pins, schema evolution and overwrites, checked after every step against a
plain reference: online lookups (latest and `as_of`, through the writing server and through a replica), training
sets (docs/protocol.md's ASOF and tie rules, TTL included), whole-table reads, time travel by snapshot id and
incremental reads (`since_snapshot`), filtered, limited and split scans, training sets from an entity table and
`as_of` a time. Three servers share one catalog: the writer (training-set cache on), a replica (DuckDB joins
only) and a lagging replica (online index refreshed only after a put through it); puts, deletes, compactions, pins
and expiry go through one or another, so that each server sees changes it did not make.

By default two fixed histories run on SQLite and a short one on each catalog production runs on: PostgreSQL and
SeaweedFS's Iceberg REST catalog over its S3. A soak runs more: `HISTORY_SEEDS=30 HISTORY_SEED0=100
HISTORY_STEPS=40 [HISTORY_CATALOG=rest|postgres|sqlite] [HISTORY_WRITE_PROCESS=1] pytest tests/test_long_histories.py`
(about 20-30 s a seed of 30-40 steps on two cores; `HISTORY_CATALOG` runs the seeds on those catalogs only,
comma-separated; `HISTORY_WRITE_PROCESS` writes through a write process). Review 21 found with it that full ties
within one commit were ranked by file path as text (tests/test_ties.py), and a misleading refusal of incremental
reads (tests/test_incremental_scan.py); review 23 ran it on PostgreSQL and the REST catalog, and aimed beside it at
what only they show (tests/test_rest_catalog.py)."""

from __future__ import annotations

import datetime as dt
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from flight_client import FeatureClient, InvalidRequestError, NotFoundError
from flight_server.transport.service import FeatureFlightServer
from tests.conftest import sqlite_catalog, start_server, start_writing_server, wait_until

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
MINUTE = dt.timedelta(minutes=1)


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


@dataclass
class Row:
    """One row as the reference holds it: its values, and its place in commit order (`seq`: the commit, `pos`:
    the row of that put)."""

    id: int
    ts: dt.datetime
    created: dt.datetime | None
    v: float
    w: str | None
    seq: int
    pos: int

    def order(self) -> tuple[Any, ...]:
        """docs/protocol.md: latest event time, then latest created time (null loses), then committed last."""
        return (self.ts, self.created is not None, self.created or T0, self.seq, self.pos)


@dataclass
class Reference:
    """The rows a table should hold, and what every read of it should answer."""

    ttl: dt.timedelta | None
    rows: list[Row] = field(default_factory=list)
    seq: int = 0
    evolved: bool = False

    def latest(self, i: int, before: dt.datetime | None = None) -> Row | None:
        """The row a lookup of `i` uses: the latest one (at or before `before`, within the TTL back from it)."""
        found = [
            r
            for r in self.rows
            if r.id == i
            and (before is None or r.ts <= before)
            and (before is None or self.ttl is None or r.ts >= before - self.ttl)
        ]
        return max(found, key=Row.order) if found else None


def table_of(rows: list[Row], evolved: bool) -> pa.Table:
    columns: dict[str, pa.Array] = {
        "id": pa.array([r.id for r in rows], pa.int64()),
        "ts": pa.array([r.ts for r in rows], pa.timestamp("us", "UTC")),
        "created": pa.array([r.created for r in rows], pa.timestamp("us", "UTC")),
        "v": pa.array([r.v for r in rows], pa.float64()),
    }
    if evolved:
        columns["w"] = pa.array([r.w for r in rows], pa.string())
    return pa.table(columns)


def as_tuples(table: pa.Table, evolved: bool) -> list[tuple[Any, ...]]:
    names = ["id", "ts", "created", "v"] + (["w"] if evolved else [])
    d = table.select(names).to_pydict()
    return sorted(zip(*(d[n] for n in names), strict=True), key=repr)


def ref_tuples(rows: list[Row], evolved: bool) -> list[tuple[Any, ...]]:
    return sorted(
        ((r.id, r.ts, r.created, r.v) + ((r.w,) if evolved else ()) for r in rows),
        key=repr,
    )


class History:
    """A random history on one table, checked against the reference after every step."""

    def __init__(
        self, seed: int, clients: tuple[FeatureClient, FeatureClient, FeatureClient], name: str, log: list[str]
    ) -> None:
        self.rng = random.Random(seed)
        # the lagger polls the catalog seldom: its online index catches up on many changes at once, after a put
        # through it
        self.writer, self.replica, self.lagger = clients
        self.lagger_due = True
        self.table = name
        self.short = name.split(".")[-1]
        self.log = log
        ttl_minutes = self.rng.choice([None, None, 5])
        self.ref = Reference(ttl=None if ttl_minutes is None else dt.timedelta(minutes=ttl_minutes))
        self.partition_by = self.rng.choice([[], None, ["bucket(4, id)"], ["day(ts)"]])
        self.snapshots: dict[int, list[Row]] = {}  # snapshot id -> rows then
        self.expired: set[int] = set()
        self.appended: list[tuple[int, str, list[Row]]] = []  # (snapshot id, operation, rows appended)
        self.current: int | None = None
        self.times: list[tuple[dt.datetime, list[Row]]] = []  # wall-clock times just after commits, rows then
        self.next_v = 0.0
        self.ids = list(range(12))
        self.puts: dict[str, tuple[int, pa.Table, dict[str, Any]]] = {}  # write id -> snapshot, rows, arguments

    def name(self, client: FeatureClient) -> str:
        return "writer" if client is self.writer else "replica" if client is self.replica else "lagger"

    # Steps

    def put(self, evolve: bool = False, overwrite: bool = False) -> None:
        rng = self.rng
        n = rng.randint(1, 8)
        self.ref.seq += 1
        rows = []
        for pos in range(n):
            i = rng.choice(self.ids)
            ts = at(rng.choice([0, 1, 2, 3, 5, 8, 10, 10, 13]))
            created = rng.choice([None, at(rng.randint(0, 3)), at(rng.randint(0, 3))])
            self.next_v += 1
            rows.append(Row(i, ts, created, self.next_v, None, self.ref.seq, pos))
        if evolve:
            for r in rows:
                r.w = f"w{r.v:g}"
        data = table_of(rows, evolve)
        if not self.ref.evolved and not evolve and self.current is not None and rng.random() < 0.3:
            data = data.drop_columns(["created"])  # a column the stream lacks is filled with nulls
            for r in rows:
                r.created = None
        self.log.append(
            f"put{' evolve' if evolve else ''}{' overwrite' if overwrite else ''} "
            f"{[(r.id, r.ts.minute, r.created and r.created.minute, r.v) for r in rows]}"
        )
        through = rng.choices([self.writer, self.replica, self.lagger], [0.6, 0.25, 0.15])[0]
        self.lagger_due = self.lagger_due or through is self.lagger
        arguments: dict[str, Any] = {
            "entity_keys": ["id"],
            "event_time": "ts",
            "created_time": "created",
            "ttl": self.ref.ttl,
            "partition_by": self.partition_by,
            "evolve": evolve,
            "mode": "overwrite" if overwrite else "append",
            "write_id": f"{self.short}-{self.ref.seq}" if rng.random() < 0.3 else None,
        }
        self.log[-1] += f" write_id={arguments['write_id']} through the {self.name(through)}"
        result = through.write(self.table, data, **arguments)
        assert not result.duplicate, (result, self.log)
        self.ref.evolved = self.ref.evolved or evolve
        self.ref.rows = rows if overwrite else self.ref.rows + rows
        self.committed(result.snapshot_id, "overwrite" if overwrite else "append", rows)
        if arguments["write_id"] is not None:
            self.puts[arguments["write_id"]] = (result.snapshot_id, data, arguments)
        self.retry_put()

    def retry_put(self) -> None:
        """Now and then a put with a `write_id` is sent again, through any server: while its snapshot is kept, it
        commits nothing and answers the original snapshot (docs/protocol.md, "Exactly once")."""
        kept = [key for key, (snapshot_id, _, _) in self.puts.items() if snapshot_id not in self.expired]
        if not kept or self.rng.random() < 0.7:
            return
        write_id = self.rng.choice(sorted(kept))
        snapshot_id, data, arguments = self.puts[write_id]
        through = self.rng.choice([self.writer, self.replica, self.lagger])
        self.log.append(f"put again {write_id} through the {self.name(through)}")
        result = through.write(self.table, data, **arguments)
        assert result.duplicate and result.snapshot_id == snapshot_id, (result, snapshot_id, self.log)

    def committed(self, snapshot_id: int, operation: str, appended: list[Row]) -> None:
        if snapshot_id == self.current:
            return
        self.current = snapshot_id
        self.snapshots[snapshot_id] = list(self.ref.rows)
        self.times.append((dt.datetime.now(dt.timezone.utc), list(self.ref.rows)))
        self.appended.append((snapshot_id, operation, appended))

    def delete(self) -> None:
        rng = self.rng
        mode = rng.choice(["copy-on-write", "merge-on-read"])
        how = rng.choice(["keys", "filter", "both"])
        keys = rng.sample(self.ids, rng.randint(1, 3))
        cutoff = at(rng.choice([1, 3, 8, 10]))
        filter_text = f"ts < '{cutoff.isoformat()}'" if rng.random() < 0.5 else f"v < {self.next_v / 2:.1f}"
        hit: list[Row] = []
        for r in self.ref.rows:
            by_keys = r.id in keys
            by_filter = r.ts < cutoff if filter_text.startswith("ts") else r.v < float(filter_text.split()[-1])
            if (
                (how == "keys" and by_keys)
                or (how == "filter" and by_filter)
                or (how == "both" and by_keys and by_filter)
            ):
                hit.append(r)
        through = rng.choices([self.writer, self.replica], [0.7, 0.3])[0]
        self.log.append(f"delete {mode} {how} keys={keys} filter={filter_text!r} through the {self.name(through)}")
        reply = through.delete(
            self.table,
            keys={"id": keys} if how != "filter" else None,
            filter=filter_text if how != "keys" else None,
            mode=mode,
        )
        assert reply["rows_deleted"] == len(hit), (reply, self.log)
        self.ref.rows = [r for r in self.ref.rows if not any(r is h for h in hit)]
        self.committed(reply["snapshot_id"], "delete", [])

    def compact(self) -> None:
        filter_text = None
        if self.rng.random() < 0.4:
            filter_text = f"ts >= '{at(self.rng.choice([3, 8])).isoformat()}'"
        through = self.rng.choices([self.writer, self.replica], [0.7, 0.3])[0]
        self.log.append(f"compact filter={filter_text!r} through the {self.name(through)}")
        reply = through.compact(self.table, filter=filter_text)
        if reply["compacted"]:
            self.committed(reply["snapshot_id"], "replace", [])

    def maintain(self) -> None:
        self.log.append("run_maintenance")
        reply = self.writer.run_maintenance(self.table)
        assert reply.get("error") is None, reply
        current = self.writer.describe(self.table)["current_snapshot_id"]
        self.committed(current, "replace", [])

    def expire(self) -> None:
        """Pins and expiry through any of the servers: one expires snapshots whose training-set indexes another
        holds, or that a pin made through another keeps."""
        rng = self.rng
        if rng.random() < 0.5 and self.current is not None:
            pinned = rng.choice(sorted(self.snapshots))
            if pinned not in self.expired:
                through = rng.choice([self.writer, self.replica, self.lagger])
                self.log.append(f"pin {pinned} through the {self.name(through)}")
                through.pin(self.table, pinned)
        keep = rng.randint(1, 3)
        through = rng.choice([self.writer, self.writer, self.replica, self.lagger])
        self.log.append(f"expire retain_last={keep} through the {self.name(through)}")
        reply = through.expire_snapshots(self.table, older_than=dt.datetime.now(dt.timezone.utc), retain_last=keep)
        self.expired.update(reply["expired"])

    # Checks

    def check(self) -> None:
        self.check_scan()
        self.check_online(self.writer)
        self.check_online(self.replica)
        if self.lagger_due:
            self.check_online(self.lagger)
            self.lagger_due = False
        self.check_historical()
        self.check_time_travel()
        self.check_since()
        self.check_historical_as_of()
        if self.rng.random() < 0.3:
            self.check_entity_table()

    def check_scan(self) -> None:
        got = self.writer.read_table(self.table)
        assert as_tuples(got, self.ref.evolved) == ref_tuples(self.ref.rows, self.ref.evolved), self.log
        got = self.rng.choice([self.replica, self.lagger]).read_table(self.table, partitions=3)
        assert as_tuples(got, self.ref.evolved) == ref_tuples(self.ref.rows, self.ref.evolved), self.log
        keys = self.rng.sample(self.ids, 3)
        cutoff = at(self.rng.choice([2, 5, 10]))
        text = f"id in ({', '.join(map(str, keys))}) or ts >= '{cutoff.isoformat()}'"
        got = self.rng.choice([self.writer, self.replica]).read_table(self.table, filter=text)
        want = [r for r in self.ref.rows if r.id in keys or r.ts >= cutoff]
        assert as_tuples(got, self.ref.evolved) == ref_tuples(want, self.ref.evolved), (text, self.log)
        limited = self.writer.read_table(self.table, filter=f"v >= {self.next_v / 3:.1f}", limit=4)
        assert limited.num_rows == min(4, sum(r.v >= round(self.next_v / 3, 1) for r in self.ref.rows)), self.log

    def online_expected(self, keys: list[int], before: dt.datetime | None) -> list[Any]:
        out = []
        for i in keys:
            r = self.ref.latest(i, before)
            out.append(None if r is None else (r.v, r.ts))
        return out

    def check_online(self, client: FeatureClient) -> None:
        keys = self.ids + [99, self.rng.choice(self.ids)]
        want = self.online_expected(keys, None)
        seen: list[Any] = []

        def converged() -> bool:
            got = client.get_online_features({"id": keys}, [f"{self.table}:v"], apply_ttl=False).to_pydict()
            seen.append(list(zip(got["v"], got[f"{self.short}__ts"], strict=True)))
            seen[-1] = [None if v is None and t is None else (v, t) for v, t in seen[-1]]
            return seen[-1] == want

        wait_until(converged, timeout=20, what=f"online lookups to match the reference: {seen[-1:]} {want} {self.log}")
        # as_of: the latest row at or before, TTL counting back from it
        when = at(self.rng.choice([0, 2, 5, 9.5, 10, 12, 20]))
        got = client.get_online_features({"id": keys}, [f"{self.table}:v"], as_of=when).to_pydict()
        want_asof = self.online_expected(keys, when)
        pairs = [
            None if v is None and t is None else (v, t) for v, t in zip(got["v"], got[f"{self.short}__ts"], strict=True)
        ]
        assert pairs == want_asof, (when, self.log)
        if self.ref.ttl is not None:
            request_time = at(self.rng.choice([6, 9, 13, 15, 18]))
            got = client.get_online_features({"id": keys}, [f"{self.table}:v"], request_time=request_time).to_pydict()
            want_ttl = []
            for i in keys:
                r = self.ref.latest(i)
                ok = r is not None and r.ts >= request_time - self.ref.ttl
                want_ttl.append(r.v if ok and r is not None else None)
            assert got["v"] == want_ttl, (request_time, self.log)

    def historical_expected(self, ids: list[int], times: list[dt.datetime | None], rows: list[Row]) -> list[Any]:
        ref = Reference(ttl=self.ref.ttl, rows=rows)
        out: list[Any] = []
        for i, t in zip(ids, times, strict=True):
            r = None if t is None else ref.latest(i, t)
            out.append(None if r is None else r.v)
        return out

    def entity_rows(self) -> tuple[list[int], list[dt.datetime | None]]:
        n = self.rng.randint(1, 30)
        ids = [self.rng.choice(self.ids + [99]) for _ in range(n)]
        times: list[dt.datetime | None] = [
            None if self.rng.random() < 0.05 else at(self.rng.choice([-1, 0, 1, 2.5, 3, 5, 8, 10, 11, 13, 15, 18, 30]))
            for _ in range(n)
        ]
        return ids, times

    def check_historical(self) -> None:
        ids, times = self.entity_rows()
        want = self.historical_expected(ids, times, self.ref.rows)
        for client in (self.writer, self.replica, self.lagger):
            got = client.get_historical_features({"id": ids, "event_timestamp": times}, [f"{self.table}:v"])
            assert got.column("v").to_pylist() == want, (ids, times, self.log)
            streamed = client.get_historical_features(
                pa.table(
                    {"id": pa.array(ids, pa.int64()), "event_timestamp": pa.array(times, pa.timestamp("us", "UTC"))}
                ),
                [f"{self.table}:v"],
            )
            assert streamed.column("v").to_pylist() == want, (ids, times, self.log)
        if self.ref.evolved:  # the column added later: null in the rows written before it
            ref = Reference(ttl=self.ref.ttl, rows=self.ref.rows)
            rows = [None if t is None else ref.latest(i, t) for i, t in zip(ids, times, strict=True)]
            got = self.rng.choice([self.writer, self.replica]).get_historical_features(
                {"id": ids, "event_timestamp": times}, [f"{self.table}:w", f"{self.table}:v"]
            )
            assert got.column("w").to_pylist() == [r and r.w for r in rows], (ids, times, self.log)
            online = self.rng.choice([self.writer, self.replica]).get_online_features(
                {"id": self.ids}, [f"{self.table}:w"], apply_ttl=False
            )
            latest = [self.ref.latest(i) for i in self.ids]
            assert online.column("w").to_pylist() == [r and r.w for r in latest], self.log

    def check_historical_as_of(self) -> None:
        when, rows = self.rng.choice(self.times)
        ids, times = self.entity_rows()
        want = self.historical_expected(ids, times, rows)
        try:
            got = self.rng.choice([self.writer, self.replica]).get_historical_features(
                {"id": ids, "event_timestamp": times}, [f"{self.table}:v"], as_of=when
            )
        except NotFoundError:
            assert self.expired, (when, self.log)  # a time next to an expired snapshot is refused (docs)
            return
        assert got.column("v").to_pylist() == want, (when, ids, times, self.log)

    def check_entity_table(self) -> None:
        ids, times = self.entity_rows()
        pairs = [(i, t) for i, t in zip(ids, times, strict=True) if t is not None]
        if not pairs:  # a put of no rows is refused ("the write stream is empty")
            return
        entities = f"{self.table}_entities"
        self.writer.write(
            entities,
            pa.table(
                {
                    "id": pa.array([i for i, _ in pairs], pa.int64()),
                    "event_timestamp": pa.array([t for _, t in pairs], pa.timestamp("us", "UTC")),
                }
            ),
            entity_keys="id",
            event_time="event_timestamp",
            mode="overwrite",
            partition_by=[],
        )
        got = self.rng.choice([self.writer, self.replica]).get_historical_features(
            entities, [f"{self.table}:v"], partitions=self.rng.choice([1, 3])
        )
        want = sorted(
            zip(
                [i for i, _ in pairs],
                [t for _, t in pairs],
                self.historical_expected([i for i, _ in pairs], [t for _, t in pairs], self.ref.rows),
                strict=True,
            ),
            key=repr,
        )
        d = got.to_pydict()
        assert sorted(zip(d["id"], d["event_timestamp"], d["v"], strict=True), key=repr) == want, self.log

    def check_time_travel(self) -> None:
        live = [s for s in self.snapshots if s not in self.expired]
        if not live:
            return
        s = self.rng.choice(live)
        rows = self.snapshots[s]
        got = self.replica.read_table(self.table, snapshot_id=s)
        evolved = "w" in got.column_names
        assert as_tuples(got, evolved) == ref_tuples(rows, evolved), (s, self.log)
        ids, times = self.entity_rows()
        want = self.historical_expected(ids, times, rows)
        got = self.replica.get_historical_features(
            {"id": ids, "event_timestamp": times}, [f"{self.table}:v"], snapshot_ids={self.table: s}
        )
        assert got.column("v").to_pylist() == want, (s, ids, times, self.log)
        for gone in list(self.expired)[:1]:
            with pytest.raises(NotFoundError):
                self.replica.read_table(self.table, snapshot_id=gone)

    def check_since(self) -> None:
        if len(self.appended) < 2:
            return
        k = self.rng.randrange(len(self.appended) - 1)
        since = self.appended[k][0]
        if since in self.expired:
            return
        later = self.appended[k + 1 :]
        if all(op == "append" for _, op, _ in later) and not any(s in self.expired for s, _, _ in later):
            rows = [r for _, _, added in later for r in added]
            got = self.writer.scan(self.table, since_snapshot=since).read_all()
            evolved = "w" in got.column_names
            assert as_tuples(got, evolved) == ref_tuples(rows, evolved), (since, self.log)
        else:
            try:
                self.writer.scan(self.table, since_snapshot=since).read_all()
            except (InvalidRequestError, NotFoundError):
                pass
            else:
                raise AssertionError(f"since_snapshot {since} across {[op for _, op, _ in later]} answered: {self.log}")

    def step(self) -> None:
        rng = self.rng
        if self.current is None:
            self.put()
            return
        choice = rng.random()
        if choice < 0.45:
            self.put()
        elif choice < 0.49:
            self.put(evolve=not self.ref.evolved)
        elif choice < 0.51:
            self.put(overwrite=True)
        elif choice < 0.65:
            self.delete()
        elif choice < 0.78:
            self.compact()
        elif choice < 0.85:
            self.maintain()
        else:
            self.expire()


def catalog_properties(request: pytest.FixtureRequest, tmp: Path) -> dict[str, str]:
    """The shared catalog the three servers use: SQLite, PostgreSQL (files on local disk) or SeaweedFS's Iceberg
    REST catalog (files on its S3), the two that production runs on."""
    kind = request.param
    if kind == "sqlite":
        return sqlite_catalog(tmp)
    if kind == "postgres":
        return {"type": "sql", "uri": request.getfixturevalue("postgres_url"), "warehouse": tmp.as_uri()}
    assert kind == "rest", kind
    return dict(request.getfixturevalue("seaweedfs"))


@pytest.fixture(scope="module")
def servers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FeatureFlightServer, ...]]:
    catalog = catalog_properties(request, Path(tmp_path_factory.mktemp("histories")))
    start = start_writing_server if os.environ.get("HISTORY_WRITE_PROCESS") else start_server
    writer = start(catalog, online_refresh_seconds=0.05)
    replica = start_server(catalog, online_refresh_seconds=0.05, historical_cache_bytes=0)
    lagger = start_server(catalog, online_refresh_seconds=3600)
    yield writer, replica, lagger
    for server in (writer, replica, lagger):
        server.shutdown()


def run_history(servers: tuple[FeatureFlightServer, ...], seed: int, steps: int) -> None:
    log: list[str] = [f"seed {seed}"]
    with (
        FeatureClient(f"grpc://127.0.0.1:{servers[0].port}") as w,
        FeatureClient(f"grpc://127.0.0.1:{servers[1].port}") as r,
        FeatureClient(f"grpc://127.0.0.1:{servers[2].port}") as lag,
    ):
        history = History(seed, (w, r, lag), f"histories.t{seed}_{os.getpid()}", log)
        for _ in range(steps):
            history.step()
            history.check()


def history_cases() -> list[Any]:
    """By default two fixed histories on SQLite and one short one on each production catalog; with
    `HISTORY_CATALOG=sqlite|postgres|rest` (comma-separated for several), the soak's seeds on those only."""
    steps = int(os.environ.get("HISTORY_STEPS", "20"))
    seed0 = int(os.environ.get("HISTORY_SEED0", "0"))
    soak = range(seed0, seed0 + int(os.environ.get("HISTORY_SEEDS", "0")))
    chosen = os.environ.get("HISTORY_CATALOG")
    if chosen:
        return [pytest.param(kind, seed, steps, id=f"{kind}-{seed}") for kind in chosen.split(",") for seed in soak]
    cases = [pytest.param("sqlite", seed, steps, id=f"sqlite-{seed}") for seed in [3, 11, *soak]]
    return cases + [pytest.param(kind, 5, 15, id=f"{kind}-5") for kind in ("postgres", "rest")]


@pytest.mark.parametrize(("servers", "seed", "steps"), history_cases(), indirect=["servers"])
def test_a_long_history_answers_as_the_reference(
    servers: tuple[FeatureFlightServer, ...], seed: int, steps: int
) -> None:
    """Fixed histories of 20 steps (or `HISTORY_STEPS`) on SQLite, a short one on PostgreSQL and on the REST catalog
    over S3, and the soak's seeds, checked after every step."""
    run_history(servers, seed, steps)
