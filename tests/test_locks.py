"""Per-key locks: one holder per key, never a lock shared by two keys, nothing kept once unused."""

from __future__ import annotations

import threading
import time

from flight_server.base.locks import LockPool


def test_a_key_has_one_holder_at_a_time_and_is_forgotten_after() -> None:
    pool = LockPool()
    inside = peak = 0
    count = threading.Lock()

    def work() -> None:
        nonlocal inside, peak
        for _ in range(20):
            with pool("table"):
                with count:
                    inside += 1
                    peak = max(peak, inside)
                time.sleep(0.0005)  # room for another thread to come in, were it let in
                with count:
                    inside -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak == 1
    assert not pool._locks


def test_other_keys_never_wait_for_a_held_one() -> None:
    """Whatever their hashes: a fixed pool of 64 locks made one pair of keys in 64 share one."""
    pool = LockPool()
    with pool("held"):
        for key in range(500):
            done = threading.Event()

            def take(key: int = key, done: threading.Event = done) -> None:
                with pool(key):
                    done.set()

            thread = threading.Thread(target=take)
            thread.start()
            assert done.wait(10), f"key {key} waited for another key's lock"
            thread.join()
    assert not pool._locks
