"""infra/caches.py: the one cache style (cachetools behind a lock)."""

from __future__ import annotations

import threading

from demo.common.infra.caches import Cache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_expiring_cache_forgets_after_its_ttl_and_keeps_at_most_max_items():
    clock = Clock()
    cache: Cache[str, int] = Cache.expiring(max_items=2, ttl=30, timer=clock)
    cache.put("a", 1)
    clock.now = 29
    assert cache.get("a") == 1
    clock.now = 31
    assert cache.get("a") is None  # stored at 0: gone after 30 s
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a used last: b goes first
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)
    cache.pop("a")
    cache.pop("missing")
    assert cache.get("a") is None and len(cache) == 1


def test_an_expiring_cache_with_no_ttl_keeps_nothing():
    cache: Cache[str, int] = Cache.expiring(max_items=10, ttl=0)
    cache.put("a", 1)
    assert cache.get("a") is None and len(cache) == 0


def test_a_sized_cache_keeps_the_least_recently_used_bytes_within_its_total():
    cache: Cache[str, bytes] = Cache.sized(max_bytes=10, max_item=6)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.get("a") == b"1234"  # a used last
    cache.put("c", b"1234")  # 12 > 10: the least recently used (b) goes
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (b"1234", None, b"1234")
    cache.put("big", b"1234567")  # over max_item: never kept, nothing evicted for it
    assert cache.get("big") is None and len(cache) == 2
    cache.pop_where(lambda key: key in {"a", "z"})
    assert cache.get("a") is None and cache.get("c") == b"1234"


def test_a_sized_cache_of_zero_bytes_keeps_nothing():
    cache: Cache[str, bytes] = Cache.sized(max_bytes=0, max_item=512)
    cache.put("a", b"x")
    assert cache.get("a") is None


def test_threads_fill_and_read_one_cache_safely():
    cache: Cache[int, bytes] = Cache.sized(max_bytes=1000, max_item=100)

    def work(offset: int) -> None:
        for n in range(2000):
            key = (n * 7 + offset) % 50
            cache.put(key, bytes(key))
            cache.get((key + 1) % 50)
            if n % 100 == 0:
                cache.pop_where(lambda k: k % 10 == offset)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(cache) <= 50
