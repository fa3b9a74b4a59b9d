"""One memory budget that a server's caches share: the scan cache, the training-set indexes and the online
indexes each draw from it through an `Account`, under their own caps (`--scan-cache-mb`,
`--historical-cache-mb`, `--online-max-mb`) and together within `--memory-budget-mb`.

Without it, each cap is sound alone and their sum is not: three caches at their defaults, and the files
scans collect on their way into the scan cache, can take more than the machine has. Here what every
cache holds plus what scans have reserved never passes the budget: an entry that needs room evicts the
least recently used entry of any evictable cache (its own first when its cap is what is short).

The online indexes are what serving needs, so they are never evicted: their account is *pinned*
(`Account.hold`). A new online index is refused past what the budget leaves once every other cache is
emptied (`Account.limit`); an index already served keeps answering and keeps being refreshed even when
its growth takes the budget over, and then the other caches hold nothing and admit nothing until the
online indexes shrink or the budget grows (`over_bytes` in `health` says by how much).

The caches keep their entries under the budget's one lock (`MemoryBudget.lock`, re-entrant), so that an
eviction on behalf of one cache can drop another cache's entry at once, without any lock-order deadlock.
What a running read still streams from an evicted entry is freed once that read ends.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Hashable
from pathlib import Path
from typing import Any

# Where a container's memory limit is, cgroup v2 then v1; "max" or a huge number: no limit.
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def machine_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its container's limit when lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in _CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_budget() -> int:
    """Half the memory this process may use: the other half is for DuckDB's queries (`--duckdb-memory-limit`),
    the batches streaming to clients, the puts buffering (`--write-chunk-mb` each) and Python itself."""
    return machine_memory() // 2


class MemoryBudget:
    """The bytes a server's caches may hold together, and the accounts that draw from them."""

    def __init__(self, total: int):
        self.total = total
        self.lock = threading.RLock()
        self._accounts: dict[str, Account] = {}
        self._clock = itertools.count()  # use stamps: the lowest is the least recently used entry

    def account(self, name: str, cap: int, evict: Callable[[Any], object] | None = None) -> Account:
        """A cache's account, within `cap` bytes; `evict(key)` drops an entry the budget takes back (called
        under `lock`). Without `evict` the account is pinned: never evicted, sized with `Account.hold`."""
        with self.lock:
            if name in self._accounts:
                raise ValueError(f"the memory budget already has an account named {name!r}")
            account = Account(self, name, cap, evict)
            self._accounts[name] = account
            return account

    @property
    def used(self) -> int:
        """Bytes held and reserved, all accounts together."""
        with self.lock:
            return sum(a.held + a.reserved for a in self._accounts.values())

    def stats(self) -> dict[str, Any]:
        with self.lock:
            used = self.used
            return {
                "max_bytes": self.total,
                "bytes": used,
                "over_bytes": max(0, used - self.total),
                "caches": {name: account.stats() for name, account in self._accounts.items()},
            }

    def _stamp(self) -> int:
        return next(self._clock)

    def _fixed(self, besides: Account | None = None) -> int:
        """Bytes no eviction can free: every reservation, and what pinned accounts (but `besides`) hold."""
        return sum(a.reserved + (a.held if a.pinned and a is not besides else 0) for a in self._accounts.values())

    def _make_room(self, size: int) -> bool:
        """Evict the least recently used entries, whatever their cache, until `size` more bytes fit."""
        while self.used + size > self.total:
            holding = [a for a in self._accounts.values() if a._entries]
            if not holding:
                return False
            min(holding, key=Account._oldest_stamp)._evict_oldest("budget")
        return True


class Account:
    """What one cache holds (entries by key, least recently used first) and has reserved."""

    def __init__(self, budget: MemoryBudget, name: str, cap: int, evict: Callable[[Any], object] | None):
        self.budget, self.name, self.cap = budget, name, cap
        self.lock = budget.lock
        self.pinned = evict is None
        self._evict = evict
        self._entries: OrderedDict[Hashable, tuple[int, int]] = OrderedDict()  # key -> (bytes, use stamp)
        self.held = self.reserved = 0
        self.evictions: Counter[str] = Counter()  # entries evicted, by why: "cap" (its own) or "budget"
        self.evicted_bytes = 0

    def limit(self) -> int:
        """The most this account could hold now (its reservations aside), were every evictable entry evicted."""
        with self.lock:
            return min(self.cap - self.reserved, self.budget.total - self.budget._fixed(besides=self))

    def admit(self, key: Hashable, size: int, reserved: int = 0, keep: Collection[Hashable] = ()) -> bool:
        """Count `size` bytes kept under `key`, evicting what must go to make room (under the cap, never the
        entries under `keep`: `room_beside` says how much that leaves); False if they cannot fit (the cache keeps
        nothing). `reserved` bytes of the caller's reservation are released first: the reserved rows become the
        entry."""
        with self.lock:
            self.reserved -= reserved
            if key in self._entries:
                self.touch(key)
                return True
            if not self._fits(size):
                return False
            self._make_room(size, keep)
            self._entries[key] = (size, self.budget._stamp())
            self.held += size
            return True

    def room_beside(self, keep: Collection[Hashable]) -> int:
        """The most a new entry could take (as `limit`) while the entries under `keep` stay."""
        with self.lock:
            return self.limit() - sum(self._entries[k][0] for k in keep if k in self._entries)

    def charge(self, key: Hashable) -> int:
        """The bytes counted under `key` (0 if none)."""
        with self.lock:
            return self._entries[key][0] if key in self._entries else 0

    def touch(self, key: Hashable) -> None:
        """The entry was used: it is now the most recently used of the whole budget."""
        with self.lock:
            if key in self._entries:
                self._entries[key] = (self._entries[key][0], self.budget._stamp())
                self._entries.move_to_end(key)

    def resize(self, key: Hashable, size: int) -> bool:
        """The entry under `key` was replaced in place by one of `size` bytes (keeping its place in the LRU order):
        evict the least recently used entries, itself included, past the cap or the budget. False, and nothing
        changed, when it holds no such entry or `size` could not fit even with every entry evicted."""
        with self.lock:
            if key not in self._entries or not self._fits(size):
                return False
            old, stamp = self._entries[key]
            self._entries[key] = (size, stamp)
            self.held += size - old
            self._make_room(0)
            return True

    def reserve(self, size: int) -> bool:
        """Set `size` bytes aside for rows to keep later (evicting to make room); False if they cannot fit."""
        with self.lock:
            if not self._fits(size):
                return False
            self._make_room(size)
            self.reserved += size
            return True

    def _make_room(self, size: int, keep: Collection[Hashable] = ()) -> None:
        """Evict the least recently used entries (never those under `keep`) until `size` more bytes fit under the
        cap and in the budget (call under the lock, once `_fits` said they can)."""
        while self.held + self.reserved + size > self.cap:
            self._evict_oldest("cap", keep)
        self.budget._make_room(size)

    def release(self, size: int) -> None:
        """Give back `size` bytes of reservations."""
        with self.lock:
            self.reserved -= size

    def hold(self, size: int) -> int:
        """A pinned account now holds `size` bytes: evict from the other caches what that leaves no room for.
        Returns the bytes by which the budget is over even so (the pinned accounts alone pass it)."""
        with self.lock:
            assert self.pinned, "evictable accounts hold what they admit"
            self.held = size
            self.budget._make_room(0)
            return max(0, self.budget.used - self.budget.total)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "bytes": self.held,
                "reserved": self.reserved,
                "max_bytes": self.cap,
                "pinned": self.pinned,
                "evictions": {"cap": self.evictions["cap"], "budget": self.evictions["budget"]},
                "evicted_bytes": self.evicted_bytes,
            }

    def _fits(self, size: int) -> bool:
        """Whether `size` more bytes fit under the cap and the budget once evictions made room (checked before
        evicting anything, so that a refusal costs no cache its entries)."""
        return self.reserved + size <= self.cap and self.budget._fixed() + size <= self.budget.total

    def _oldest_stamp(self) -> int:
        return next(iter(self._entries.values()))[1]

    def discard(self, key: Hashable) -> None:
        """Evict the entry under `key` now, if held: one whose bytes were counted as part of another entry's must
        go when that one goes."""
        with self.lock:
            if key in self._entries:
                self._drop(key, None)

    def _evict_oldest(self, why: str, keep: Collection[Hashable] = ()) -> None:
        """Evict the least recently used entry not under `keep` (if all are, the least recently used)."""
        self._drop(next((k for k in self._entries if k not in keep), next(iter(self._entries))), why)

    def _drop(self, key: Hashable, why: str | None) -> None:
        size, _ = self._entries.pop(key)
        self.held -= size
        if why is not None:
            self.evictions[why] += 1
        self.evicted_bytes += size
        assert self._evict is not None, "pinned accounts have no entries"
        self._evict(key)
