"""A map that forgets its least recently used entries beyond a total weight: the bounded caches of things that
never change (files, snapshots), each weighed as its owner counts it."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

from flight_server.base.memory import Account, MemoryBudget

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class WeightedLru(Generic[K, V]):
    """`get` and `put` from any thread; past `limit` in total `weight`, the least recently used entries go.

    An entry heavier than `limit` alone is not kept. `hits` and `misses` count `get`s, for metrics. With a `budget`
    (weights in bytes), what it keeps also counts in the server's memory budget, as its account `name`: an entry of
    another cache that needs room may evict its least recently used ones, and its own evict theirs (`base.memory`);
    it then keeps its entries under the budget's lock."""

    def __init__(self, limit: int, weight: Callable[[V], int], budget: MemoryBudget | None = None, name: str = ""):
        self.limit = limit
        self._weight = weight
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._total = 0
        self._lock: AbstractContextManager[Any] = threading.Lock()
        self._account: Account | None = None
        if budget is not None:
            self._account = budget.account(name, limit, self._forget)
            self._lock = budget.lock
        self.hits = self.misses = 0

    def get(self, key: K, valid: Callable[[V], bool] | None = None) -> V | None:
        """The value (now the most recently used), or None; also None, and a miss, when `valid` refuses the value
        (kept under a key that now names something else: an object id reused, say)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or (valid is not None and not valid(entry[0])):
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            if self._account is not None:
                self._account.touch(key)
            self.hits += 1
            return entry[0]

    def peek(self, key: K) -> V | None:
        """The value if kept, neither counted as a `get` nor made the most recently used."""
        with self._lock:
            entry = self._entries.get(key)
            return entry[0] if entry is not None else None

    def put(self, key: K, value: V) -> None:
        """Keep `value` under `key` (replacing what was kept), then forget the least recently used beyond `limit`."""
        weight = self._weight(value)
        with self._lock:
            self._discard(key)
            if weight > self.limit:
                return
            if self._account is not None:  # it evicts what must go, of this cache or another, to make room
                if self._account.admit(key, weight):
                    self._entries[key] = (value, weight)
                    self._total += weight
                return
            self._entries[key] = (value, weight)
            self._total += weight
            while self._total > self.limit:
                self._total -= self._entries.popitem(last=False)[1][1]

    def stats(self, unit: str) -> dict[str, Any]:
        """For metrics and `health`: entries kept, `get`s that found theirs or not, and the weight kept and its limit,
        as `bytes`/`max_bytes` when weighed in bytes, else as `weight`/`max_weight` in `unit`."""
        counts = {"entries": len(self._entries), "hits": self.hits, "misses": self.misses}
        if unit == "bytes":
            return {**counts, "bytes": self._total, "max_bytes": self.limit}
        return {**counts, "weight": self._total, "max_weight": self.limit, "unit": unit}

    @property
    def total(self) -> int:
        """The weight of what is kept."""
        return self._total

    def __len__(self) -> int:
        return len(self._entries)

    def discard(self, key: K) -> None:
        """Forget `key`, if kept."""
        with self._lock:
            self._discard(key)

    def clear(self) -> None:
        with self._lock:
            for key in list(self._entries):
                self._discard(key)

    def _discard(self, key: K) -> None:
        if self._account is not None:
            self._account.discard(key)  # which forgets it here (`_forget`)
        self._forget(key)

    def _forget(self, key: Any) -> None:
        """Drop `key`'s entry, if kept (the lock held; also the budget's eviction of it)."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._total -= entry[1]

    def __contains__(self, key: K) -> bool:
        """Whether `key` is kept (no use recorded)."""
        return key in self._entries

    def newest(self, match: Callable[[K], bool]) -> tuple[K, V] | None:
        """The most recently used entry whose key `match`es (no use recorded), looking at the newest first."""
        with self._lock:
            for key, entry in reversed(self._entries.items()):
                if match(key):
                    return key, entry[0]
        return None

    def newest_first(self) -> list[tuple[K, V]]:
        """What is kept, the most recently used first (no use recorded)."""
        with self._lock:
            return [(key, entry[0]) for key, entry in reversed(self._entries.items())]
