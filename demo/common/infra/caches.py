"""The one style of in-process cache: a cachetools cache behind a lock (threads read and fill it).

``Cache.expiring`` forgets an entry ``ttl`` seconds after it was stored (and the least recently used
past ``max_items``); ``Cache.sized`` keeps the least recently used values within a total of bytes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sized
from typing import Generic, TypeVar

import cachetools

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
S = TypeVar("S", bound=Sized)


class Cache(Generic[K, V]):
    """Thread-safe get/put/pop over a cachetools cache; ``put`` of a value the cache cannot hold is a no-op."""

    def __init__(self, cache: cachetools.Cache[K, V], fits: Callable[[V], bool] = lambda _: True) -> None:
        self._cache = cache
        self._fits = fits
        self._lock = threading.Lock()

    @classmethod
    def expiring(cls, max_items: int, ttl: float, timer: Callable[[], float] = time.monotonic) -> Cache[K, V]:
        """Entries live ``ttl`` seconds (0 or less: nothing is kept)."""
        return cls(cachetools.TTLCache(maxsize=max_items, ttl=ttl, timer=timer), fits=lambda _: ttl > 0)

    @classmethod
    def sized(cls, max_bytes: int, max_item: int) -> Cache[K, S]:
        """Values (bytes) kept while their total is within ``max_bytes``; larger than ``max_item``: never kept."""
        return Cache(
            cachetools.LRUCache(maxsize=max(max_bytes, 1), getsizeof=len),
            fits=lambda value: len(value) <= max_item and len(value) <= max_bytes,
        )

    def get(self, key: K) -> V | None:
        with self._lock:
            try:
                return self._cache[key]  # one look-up (cachetools' get() looks twice)
            except KeyError:
                return None

    def put(self, key: K, value: V) -> None:
        if self._fits(value):
            with self._lock:
                self._cache[key] = value

    def pop(self, key: K) -> None:
        with self._lock:
            self._cache.pop(key, None)

    def pop_where(self, predicate: Callable[[K], bool]) -> None:
        """Forget every entry whose key matches."""
        with self._lock:
            for key in [k for k in self._cache if predicate(k)]:
                del self._cache[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)
