"""`WeightedLru` against a plain reference: a list of (key, value) pairs, the most recently used last."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from flight_server.base.lru import WeightedLru

OPS = st.lists(
    st.tuples(st.sampled_from(["get", "put", "put", "discard", "in", "newest"]), st.integers(0, 6), st.integers(0, 12)),
    min_size=1,
    max_size=60,
)


@given(ops=OPS, limit=st.integers(0, 30))
def test_weighted_lru_keeps_what_a_plain_list_keeps(ops: list[tuple[str, int, int]], limit: int) -> None:
    lru: WeightedLru[int, int] = WeightedLru(limit, lambda value: value)
    reference: list[tuple[int, int]] = []
    for op, key, value in ops:
        found = next((v for k, v in reference if k == key), None)
        if op == "discard":
            lru.discard(key)
            reference = [(k, v) for k, v in reference if k != key]
        elif op == "newest":  # the most recently used of the keys at least `value` / 2
            least = value // 2
            found_newest = next(((k, v) for k, v in reversed(reference) if k >= least), None)
            assert lru.newest(lambda k, least=least: k >= least) == found_newest
        elif op == "in":
            assert (key in lru) == (found is not None)
        elif op == "get":
            assert lru.get(key) == found
            if found is not None:
                reference = [(k, v) for k, v in reference if k != key] + [(key, found)]
        else:
            lru.put(key, value)
            reference = [(k, v) for k, v in reference if k != key]
            if value <= limit:
                reference.append((key, value))
                while sum(v for _, v in reference) > limit:
                    reference.pop(0)
        assert lru.newest_first() == reference[::-1]
        assert lru.total == sum(v for _, v in reference) <= limit
        assert len(lru) == len(reference)
    lru.clear()
    assert (len(lru), lru.total, lru.newest_first()) == (0, 0, [])


def test_a_value_its_check_refuses_is_a_miss() -> None:
    """Kept under a key that now names something else (an object id reused): not answered, and counted as a miss,
    as the snapshot JSON cache's metrics need (`metadata_files`)."""
    lru: WeightedLru[int, str] = WeightedLru(100, len)
    lru.put(1, "old")
    assert lru.get(1, lambda value: value == "new") is None
    assert (lru.hits, lru.misses) == (0, 1)
    assert lru.get(1, lambda value: value == "old") == "old"
    assert (lru.hits, lru.misses) == (1, 1)
