"""A key space shared among replicas: keys fall into slots (Iceberg's bucket transform of the key, so a table
bucketed by its first key has one slot per bucket), and each slot belongs to the replica of highest random
weight (rendezvous hashing), so a replica joining or leaving moves only about 1/N of the slots.

Every replica computes the same owners from the same replica list, with no coordinator: the weights are a
fixed hash of (replica address, slot), never Python's salted `hash`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from pyiceberg_core.transform import bucket  # type: ignore[import-untyped]  # ships no type information

from flight_server.base.buffers import aligned_array

UNBUCKETED_SLOTS = 64  # slots of a table not bucketed by its first key: 64 shares balance a few replicas well


def shardable(kind: pa.DataType) -> bool:
    """Key types whose slot is the same on both sides of a join: integers of any width, and text."""
    return pa.types.is_integer(kind) or _text(kind)


def _text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def key_slots(column: pa.Array | pa.ChunkedArray, slots: int) -> np.ndarray:
    """The slot of each key, as Iceberg's `bucket[slots]` transform places it (integers hash as 64-bit, so an
    int32 entity key lands where the int64 feature key does). A null key matches nothing, but an entity row
    with one still needs a share to come out of: slot 0."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    array = array.cast(pa.int64() if pa.types.is_integer(array.type) else pa.large_string())
    if len(array) == 0:
        return np.empty(0, dtype=np.int64)
    array = aligned_array(array)  # pyiceberg-core panics on unaligned buffers
    return bucket(array, slots).cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)


def weight(replica: str, slot: int | str) -> int:
    """The rendezvous weight of `replica` for `slot` (a slot of a key space, or a name: a table's, whose automatic
    maintenance one replica owns): the same in every process."""
    return int.from_bytes(hashlib.blake2b(f"{replica}\x00{slot}".encode(), digest_size=8).digest(), "big")


def owners(replicas: Sequence[str], slots: int) -> list[int]:
    """For each slot, the index in `replicas` of the replica that owns it (highest weight; the list's order
    does not matter)."""
    return [owner(replicas, slot) for slot in range(slots)]


def owner(replicas: Sequence[str], slot: int | str) -> int:
    """The index in `replicas` of the replica that owns `slot`: the highest weight (ties, never seen, by address)."""
    return max(range(len(replicas)), key=lambda r: (weight(replicas[r], slot), replicas[r]))


def owned(replicas: Sequence[str], slots: int) -> list[list[int]]:
    """The slots each replica owns, in the order of `replicas`."""
    shares: list[list[int]] = [[] for _ in replicas]
    for slot, owner in enumerate(owners(replicas, slots)):
        shares[owner].append(slot)
    return shares
