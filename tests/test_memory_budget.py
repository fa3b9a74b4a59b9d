"""One memory budget for a server's caches (`base/memory.py`): the scan cache, the training-set indexes and the
online indexes together, reservations included, stay within `--memory-budget-mb` while every answer is the one
a server without caches gives; the least recently used entry of any cache makes room; each cache's own cap
still holds; online indexes are never evicted and keep answering when they alone pass the budget."""

from __future__ import annotations

import datetime as dt
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flight_client import FeatureClient, ResourceExhaustedError
from flight_server.base.memory import MemoryBudget, default_budget, machine_memory
from tests.conftest import sqlite_catalog, start_server, wait_until
from tests.services import free_ports
from tests.test_metrics import scrape, value

START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
KB = 1 << 10


def rows(first: int, count: int, entities: int = 97) -> pa.Table:
    ids = list(range(first, first + count))
    return pa.table(
        {
            "id": pa.array([i % entities for i in ids], pa.int64()),
            "ts": pa.array([START + dt.timedelta(minutes=i) for i in ids], pa.timestamp("us", "UTC")),
            "n": pa.array(ids, pa.int64()),
            "x": pa.array([i * 0.5 for i in ids]),
        }
    )


def write(client: FeatureClient, table: str, data: pa.Table) -> None:
    client.write(table, data, entity_keys=["id"], event_time="ts")


def ordered(table: pa.Table) -> pa.Table:
    return table.replace_schema_metadata(None).sort_by([(name, "ascending") for name in table.column_names])


def entities(count: int) -> pa.Table:
    return pa.table(
        {
            "id": pa.array([i % 97 for i in range(count)], pa.int64()),
            "event_timestamp": pa.array(
                [START + dt.timedelta(minutes=37 * i) for i in range(count)], pa.timestamp("us", "UTC")
            ),
        }
    )


def memory(client: FeatureClient) -> dict[str, Any]:
    return client.health()["memory"]


def within(stats: dict[str, Any]) -> None:
    """The budget holds, and each cache its own cap."""
    assert stats["bytes"] <= stats["max_bytes"] and stats["over_bytes"] == 0, stats
    assert stats["bytes"] == sum(c["bytes"] + c["reserved"] for c in stats["caches"].values()), stats
    for cache in stats["caches"].values():
        assert cache["bytes"] + cache["reserved"] <= cache["max_bytes"], stats


class Watch:
    """Reads `health` over and over in a thread while a test runs: the budget must hold at every look."""

    def __init__(self, location: str):
        self.looks, self.failures = 0, []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._location = location
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with FeatureClient(self._location) as client:
            while not self._stop.is_set():
                stats = memory(client)
                self.looks += 1
                try:
                    within(stats)
                except AssertionError as exc:
                    self.failures.append(str(exc))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        assert self.looks > 0 and self.failures == []


@pytest.fixture
def catalog(tmp_path: Path) -> dict[str, str]:
    return sqlite_catalog(tmp_path)


@pytest.fixture
def plain(catalog: dict[str, str]) -> Iterator[FeatureClient]:
    """A server on the same catalog without caches: the reference answers."""
    server = start_server(catalog, scan_cache_bytes=0, historical_cache_bytes=0)
    with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
        yield client
    server.shutdown()


def test_caches_filled_past_the_budget_stay_within_it_and_answer_like_no_cache(
    catalog: dict[str, str], plain: FeatureClient
) -> None:
    """Scans, training sets and lookups over more tables than the budget holds, in a seeded random order and
    from threads: every answer equals the uncached server's, the budget holds at every look, and the caches
    evict each other's least recently used entries to make room."""
    server = start_server(catalog, memory_budget_bytes=400 * KB)  # the caps (1, 4, 2 GiB) do not bind
    location = f"grpc://127.0.0.1:{server.port}"
    tables = [f"budget.t{i}" for i in range(5)]
    try:
        with FeatureClient(location) as client:
            for i, table in enumerate(tables):
                write(client, table, rows(0, 1500 + 300 * i))
                write(client, table, rows(5000, 500))  # two files each
            watch = Watch(location)
            chance = random.Random(11)
            steps = [(kind, table) for kind in ("scan", "columns", "training", "online") for table in tables] * 2
            chance.shuffle(steps)

            def run(kind: str, table: str) -> None:
                with FeatureClient(location) as mine:
                    if kind == "scan":
                        assert ordered(mine.read_table(table, partitions=2)).equals(ordered(plain.read_table(table)))
                    elif kind == "columns":
                        got = mine.read_table(table, columns=["n", "x"])
                        assert ordered(got).equals(ordered(plain.read_table(table, columns=["n", "x"])))
                    elif kind == "training":
                        got = mine.get_historical_features(entities(300), [f"{table}:x"])
                        assert ordered(got).equals(
                            ordered(plain.get_historical_features(entities(300), [f"{table}:x"]))
                        )
                    else:
                        wanted = {"id": list(range(0, 97, 3))}
                        got = mine.get_online_features(wanted, [f"{table}:x"], apply_ttl=False)
                        assert got.equals(plain.get_online_features(wanted, [f"{table}:x"], apply_ttl=False))

            errors: list[BaseException] = []

            def worker(share: list[tuple[str, str]]) -> None:
                try:
                    for kind, table in share:
                        run(kind, table)
                except BaseException as exc:  # reported below, with the others
                    errors.append(exc)

            threads = [threading.Thread(target=worker, args=(steps[i::3],)) for i in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            watch.stop()
            assert errors == []

            stats = memory(client)
            within(stats)
            caches = stats["caches"]
            assert caches["online_index"]["bytes"] > 0 and caches["online_index"]["evictions"] == {
                "cap": 0,
                "budget": 0,
            }
            assert caches["scan"]["evictions"]["budget"] > 0 and caches["training_set"]["evictions"]["budget"] > 0
            assert caches["scan"]["evictions"]["cap"] == 0 and caches["training_set"]["evictions"]["cap"] == 0
            health = client.health()
            assert health["scan_cache"]["bytes"] == caches["scan"]["bytes"]
            assert health["scan_cache"]["collecting"] == 0  # every scan gave its reservation back
            assert health["training_set_cache"]["bytes"] == caches["training_set"]["bytes"]
            assert health["online"]["bytes"] == caches["online_index"]["bytes"]
    finally:
        server.shutdown()


def test_a_cache_that_needs_room_evicts_the_least_recently_used_entry_of_any_cache(
    catalog: dict[str, str], plain: FeatureClient
) -> None:
    """A training-set index and the scans of two tables fill the budget. A third scan takes the room of the
    index, used longest ago, not of the scans; the index, built again, takes the room of the scan entries
    least recently used, and the one read since stays."""
    server = start_server(catalog, memory_budget_bytes=400 * KB)  # an index (~115 KB), two scans (~130 KB each)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            for table in ("lru.a", "lru.b", "lru.c", "lru.d"):
                write(client, table, rows(0, 2000))

            def training_set() -> None:
                got = client.get_historical_features(entities(200), ["lru.c:x"])
                assert ordered(got).equals(ordered(plain.get_historical_features(entities(200), ["lru.c:x"])))

            def scan_counts() -> tuple[int, int]:
                stats = client.health()["scan_cache"]
                return stats["hits"], stats["misses"]

            training_set()
            client.read_table("lru.a")
            client.read_table("lru.b")
            caches = memory(client)["caches"]
            assert caches["training_set"]["bytes"] > 0 and caches["scan"]["bytes"] > 0
            assert caches["training_set"]["evictions"]["budget"] == caches["scan"]["evictions"]["budget"] == 0

            client.read_table("lru.d")  # needs room: the index was used longest ago
            stats = memory(client)
            within(stats)
            assert stats["caches"]["training_set"]["bytes"] == 0
            assert stats["caches"]["training_set"]["evictions"]["budget"] == 1
            assert stats["caches"]["scan"]["evictions"]["budget"] == 0
            hits, misses = scan_counts()
            client.read_table("lru.b")  # the scans stayed (b is now the most recently used of them)
            assert scan_counts()[1] == misses and scan_counts()[0] > hits

            training_set()  # built again: evicts a's files, the least recently used
            stats = memory(client)
            within(stats)
            assert stats["caches"]["training_set"]["bytes"] > 0 and stats["caches"]["scan"]["evictions"]["budget"] > 0
            hits, misses = scan_counts()
            client.read_table("lru.b")
            assert scan_counts()[1] == misses and scan_counts()[0] > hits  # b's files from memory
            client.read_table("lru.a")
            assert scan_counts()[1] > misses  # a's decoded again
    finally:
        server.shutdown()


def test_each_cache_keeps_within_its_own_cap_inside_a_larger_budget(
    catalog: dict[str, str], plain: FeatureClient
) -> None:
    server = start_server(
        catalog, memory_budget_bytes=64 << 20, scan_cache_bytes=120 * KB, historical_cache_bytes=200 * KB
    )
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            tables = [f"caps.t{i}" for i in range(4)]
            for table in tables:
                write(client, table, rows(0, 2000))
            for table in tables:
                assert ordered(client.read_table(table)).equals(ordered(plain.read_table(table)))
                got = client.get_historical_features(entities(100), [f"{table}:x"])
                assert ordered(got).equals(ordered(plain.get_historical_features(entities(100), [f"{table}:x"])))
                within(memory(client))
            caches = memory(client)["caches"]
            assert caches["scan"]["max_bytes"] == 120 * KB and caches["training_set"]["max_bytes"] == 200 * KB
            for name in ("scan", "training_set"):
                assert caches[name]["evictions"]["cap"] > 0 and caches[name]["evictions"]["budget"] == 0
    finally:
        server.shutdown()


def test_online_indexes_keep_answering_when_they_alone_pass_the_budget(
    catalog: dict[str, str], plain: FeatureClient
) -> None:
    """A new index past the budget is refused; an index already served grows past it through refreshes and
    keeps answering, fresh, while the other caches give up their room and keep nothing."""
    server = start_server(catalog, memory_budget_bytes=200 * KB)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            write(client, "online.big", rows(0, 20_000, entities=20_000))
            with pytest.raises(ResourceExhaustedError, match="memory-budget-mb"):
                client.get_online_features({"id": [1]}, ["online.big:x"], apply_ttl=False)
            write(client, "online.grows", rows(0, 500, entities=500))
            write(client, "online.scanned", rows(0, 1000))
            client.read_table("online.scanned")
            assert memory(client)["caches"]["scan"]["bytes"] > 0
            wanted = {"id": [0, 499, 2999]}
            assert client.get_online_features(wanted, ["online.grows:x"], apply_ttl=False).column("x").to_pylist() == [
                0.0,
                249.5,
                None,
            ]
            write(client, "online.grows", rows(500, 2500, entities=3000))  # the index now passes the budget

            def fresh() -> bool:
                got = client.get_online_features(wanted, ["online.grows:x"], apply_ttl=False)
                return bool(got.column("x").to_pylist() == [0.0, 249.5, 1499.5])

            wait_until(fresh, what="the refreshed index")
            stats = memory(client)
            assert stats["over_bytes"] > 0 and stats["caches"]["online_index"]["bytes"] > stats["max_bytes"]
            assert stats["caches"]["scan"]["bytes"] == 0 and stats["caches"]["scan"]["evictions"]["budget"] > 0
            for _ in range(2):  # still answered, from the files: nothing is kept while over
                assert ordered(client.read_table("online.scanned")).equals(ordered(plain.read_table("online.scanned")))
            assert memory(client)["caches"]["scan"]["bytes"] == 0
            for _ in range(2):  # joined by DuckDB: an index with no room is neither kept nor built per request
                got = client.get_historical_features(entities(50), ["online.scanned:x"])
                assert ordered(got).equals(ordered(plain.get_historical_features(entities(50), ["online.scanned:x"])))
            assert memory(client)["caches"]["training_set"]["bytes"] == 0
            assert client.health()["training_set_cache"]["snapshots"] == 0
            assert client.health()["training_set_cache"]["builds"] == 0
    finally:
        server.shutdown()


def test_the_metrics_show_the_budget_what_each_cache_holds_and_evictions(catalog: dict[str, str]) -> None:
    [port] = free_ports(1)
    server = start_server(catalog, memory_budget_bytes=100 * KB, metrics_port=port)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            for table in ("m.a", "m.b"):
                write(client, table, rows(0, 2000))
                client.read_table(table)
            stats = memory(client)
        samples = scrape(port)
        assert value(samples, "flight_memory_budget_bytes") == 100 * KB
        for name, cache in stats["caches"].items():
            assert value(samples, "flight_memory_budget_used_bytes", cache=name, kind="held") == cache["bytes"]
            assert value(samples, "flight_memory_budget_used_bytes", cache=name, kind="reserved") == 0
        scan = stats["caches"]["scan"]
        assert scan["evictions"]["budget"] > 0
        for why, count in scan["evictions"].items():
            assert value(samples, "flight_cache_evictions_total", cache="scan", why=why) == count
        assert value(samples, "flight_cache_evicted_bytes_total", cache="scan") == scan["evicted_bytes"] > 0
    finally:
        server.shutdown()


def test_read_plans_and_deleted_positions_count_in_the_budget(catalog: dict[str, str]) -> None:
    """The plans of reads and the positions of merge-on-read deletes are kept within the budget with the other
    caches: scans that fill it evict them as any entry (a soak's serving process held 140-280 MB of plans outside
    it)."""
    server = start_server(catalog, memory_budget_bytes=200 * KB)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            write(client, "plans.deleted", rows(0, 2000))
            client.delete("plans.deleted", keys={"id": [1, 2]}, mode="merge-on-read")
            assert client.read_table("plans.deleted").num_rows == 2000 - 2 * 21
            stats = memory(client)
            within(stats)
            assert stats["caches"]["plans"]["bytes"] > 0 and stats["caches"]["positions"]["bytes"] > 0, stats
            for table in ("plans.a", "plans.b", "plans.c"):
                write(client, table, rows(0, 2000))
                client.read_table(table)
            stats = memory(client)
            within(stats)
            evicted = (
                stats["caches"]["plans"]["evictions"]["budget"] + stats["caches"]["positions"]["evictions"]["budget"]
            )
            assert evicted > 0, stats
            assert client.read_table("plans.deleted").num_rows == 2000 - 2 * 21  # planned and read again
    finally:
        server.shutdown()


def test_the_default_budget_is_half_the_memory_the_server_may_use(catalog: dict[str, str]) -> None:
    server = start_server(catalog)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            budget = memory(client)["max_bytes"]
        assert budget == default_budget() == machine_memory() // 2 > 0
        assert machine_memory() <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    finally:
        server.shutdown()


# The accountant alone, against a plain reference.


class Reference:
    """The budget's rules, plainly: one list of entries, least recently used first."""

    def __init__(self, total: int, caps: dict[str, int]):
        self.total, self.caps = total, caps
        self.order: list[tuple[str, int, int]] = []  # (account, key, bytes)
        self.reserved = dict.fromkeys(caps, 0)

    def held(self, name: str) -> int:
        return sum(size for account, _, size in self.order if account == name)

    def used(self) -> int:
        return sum(size for _, _, size in self.order) + sum(self.reserved.values())

    def _take(self, name: str, size: int, keep: frozenset[int] = frozenset()) -> bool:
        if self.reserved[name] + size > self.caps[name] or sum(self.reserved.values()) + size > self.total:
            return False
        while self.held(name) + self.reserved[name] + size > self.caps[name]:
            mine = [entry for entry in self.order if entry[0] == name]
            self.order.remove(next((entry for entry in mine if entry[1] not in keep), mine[0]))
        while self.used() + size > self.total:
            self.order.pop(0)
        return True

    def room_beside(self, name: str, keep: frozenset[int]) -> int:
        limit = min(self.caps[name] - self.reserved[name], self.total - sum(self.reserved.values()))
        return limit - sum(size for account, key, size in self.order if account == name and key in keep)

    def discard(self, name: str, key: int) -> None:
        self.order = [entry for entry in self.order if entry[:2] != (name, key)]

    def admit(self, name: str, key: int, size: int, keep: frozenset[int] = frozenset()) -> bool:
        for entry in self.order:
            if entry[:2] == (name, key):
                self.order.remove(entry)
                self.order.append(entry)
                return True
        if not self._take(name, size, keep):
            return False
        self.order.append((name, key, size))
        return True

    def touch(self, name: str, key: int) -> None:
        for entry in self.order:
            if entry[:2] == (name, key):
                self.order.remove(entry)
                self.order.append(entry)
                return

    def resize(self, name: str, key: int, size: int) -> bool:
        at = next((i for i, entry in enumerate(self.order) if entry[:2] == (name, key)), None)
        fits = self.reserved[name] + size <= self.caps[name] and sum(self.reserved.values()) + size <= self.total
        if at is None or not fits:
            return False
        self.order[at] = (name, key, size)  # in place: its LRU rank stays
        while self.held(name) + self.reserved[name] > self.caps[name]:
            self.order.remove(next(entry for entry in self.order if entry[0] == name))
        while self.used() > self.total:
            self.order.pop(0)
        return True

    def reserve(self, name: str, size: int) -> bool:
        if not self._take(name, size):
            return False
        self.reserved[name] += size
        return True


NAMES = ("a", "b", "c")
operation = st.tuples(
    st.sampled_from(["admit", "admit", "admit beside", "discard", "touch", "resize", "reserve", "release"]),
    st.sampled_from(NAMES),
    st.integers(0, 7),  # key
    st.integers(1, 60),  # bytes
)


@settings(max_examples=300, deadline=None)
@given(
    total=st.integers(0, 150),
    caps=st.lists(st.integers(0, 120), min_size=3, max_size=3),
    operations=st.lists(operation, max_size=60),
)
def test_the_accountant_follows_the_plain_reference(total: int, caps: list[int], operations: list[Any]) -> None:
    budget = MemoryBudget(total)
    held: dict[str, dict[int, int]] = {name: {} for name in NAMES}  # what each cache keeps, by the callbacks
    accounts = {name: budget.account(name, cap, held[name].pop) for name, cap in zip(NAMES, caps, strict=True)}
    reference = Reference(total, dict(zip(NAMES, caps, strict=True)))
    reservations: dict[str, list[int]] = {name: [] for name in NAMES}
    for kind, name, key, size in operations:
        account = accounts[name]
        if kind == "admit":
            admitted = account.admit(key, size)
            assert admitted == reference.admit(name, key, size)
            if admitted:
                held[name].setdefault(key, size)
        elif kind == "admit beside":  # as the training-set cache does: only when the kept entries leave room
            keep = frozenset(range(key % 4))
            assert account.room_beside(keep) == reference.room_beside(name, keep)
            if size <= account.room_beside(keep):
                assert account.admit(key, size, keep=keep) == reference.admit(name, key, size, keep)
                held[name].setdefault(key, size)
        elif kind == "discard":
            account.discard(key)
            reference.discard(name, key)
        elif kind == "touch":
            account.touch(key)
            reference.touch(name, key)
        elif kind == "resize":
            resized = account.resize(key, size)
            assert resized == reference.resize(name, key, size)
            if resized and key in held[name]:
                held[name][key] = size
        elif kind == "reserve":
            granted = account.reserve(size)
            assert granted == reference.reserve(name, size)
            if granted:
                reservations[name].append(size)
        elif reservations[name]:
            size = reservations[name].pop()
            account.release(size)
            reference.reserved[name] -= size
        assert budget.used == reference.used() <= max(total, 0)
        for other in NAMES:
            assert list(accounts[other]._entries) == [k for n, k, _ in reference.order if n == other]
            assert held[other].keys() == set(accounts[other]._entries)
            assert (
                accounts[other].held == reference.held(other) and accounts[other].reserved == reference.reserved[other]
            )
        stamps = sorted((stamp, n, k) for n in NAMES for k, (_, stamp) in accounts[n]._entries.items())
        assert [(n, k) for _, n, k in stamps] == [(n, k) for n, k, _ in reference.order]  # one LRU order


def test_an_entry_admitted_beside_others_evicts_around_them() -> None:
    """The training-set cache admits a generation brought forward beside the indexes of the other tables in use:
    the least recently used entry that is not one of them goes; a discarded entry goes at once."""
    dropped: list[int] = []
    account = MemoryBudget(100).account("training_set", 100, dropped.append)
    for key in range(3):
        assert account.admit(key, 30)
    assert account.room_beside({0, 1}) == 40
    assert account.admit(3, 40, keep={0, 1})
    assert dropped == [2] and account.held == 100
    account.discard(0)
    assert dropped == [2, 0] and account.held == 70


def test_the_accountant_never_passes_the_budget_under_threads() -> None:
    """Threads admit, touch, reserve and release at random on three accounts while another looks at the total
    over and over; at the end what the caches hold (by the eviction callbacks) is what the accounts say."""
    budget = MemoryBudget(10_000)
    held: dict[str, dict[tuple[int, int], int]] = {name: {} for name in NAMES}
    caps = {"a": 6_000, "b": 10_000, "c": 3_000}
    accounts = {name: budget.account(name, caps[name], held[name].pop) for name in NAMES}
    stop, looks, worst, failures = threading.Event(), [0], [0], []

    def look() -> None:
        while not stop.is_set():
            with budget.lock:
                used = budget.used
                over_cap = [n for n, a in accounts.items() if a.held + a.reserved > caps[n]]
                miscounted = [n for n, a in accounts.items() if a.held != sum(held[n].values())]
            if used > budget.total or over_cap or miscounted:
                failures.append((used, over_cap, miscounted))
            worst[0] = max(worst[0], used)
            looks[0] += 1

    def work(seed: int) -> None:
        chance = random.Random(seed)
        mine: list[tuple[str, int]] = []
        for step in range(3_000):
            name = chance.choice(NAMES)
            account, size = accounts[name], chance.randint(1, 1_500)
            roll = chance.random()
            if roll < 0.5:
                key = (seed, chance.randrange(40))
                with account.lock:  # as the caches do: the entry and its accounting change together
                    if account.admit(key, size):
                        held[name].setdefault(key, account._entries[key][0])
            elif roll < 0.65:
                account.touch((seed, chance.randrange(40)))
            elif roll < 0.85 and account.reserve(size):
                mine.append((name, size))
            elif mine:
                name, size = mine.pop(chance.randrange(len(mine)))
                if chance.random() < 0.5:
                    accounts[name].release(size)
                else:  # the reserved rows become an entry
                    key = (seed, 1000 + step)
                    with accounts[name].lock:
                        if accounts[name].admit(key, size, reserved=size):
                            held[name][key] = size
        for name, size in mine:
            accounts[name].release(size)

    looker = threading.Thread(target=look)
    looker.start()
    workers = [threading.Thread(target=work, args=(seed,)) for seed in range(6)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    stop.set()
    looker.join()
    assert failures == [] and looks[0] > 0 and 0 < worst[0] <= 10_000
    for name, account in accounts.items():
        assert account.reserved == 0 and account.held == sum(held[name].values())
        assert set(held[name]) == set(account._entries)
    assert budget.used == sum(a.held for a in accounts.values()) <= 10_000
