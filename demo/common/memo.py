"""Small in-process caches for the delivery hot path (thread-safe, bounded), and a memory budget."""
from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
from typing import Any


class TtlCache:
    """At most ``max_items`` entries, each forgotten ``ttl`` seconds after it was stored (0 = off)."""

    def __init__(self, max_items: int, ttl: float, now: Callable[[], float] = time.monotonic) -> None:
        self.max_items, self.ttl, self._now = max_items, ttl, now
        self._items: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return None
            if entry[0] < self._now():
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return entry[1]

    def put(self, key: Hashable, value: Any) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            self._items[key] = (self._now() + self.ttl, value)
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def pop(self, key: Hashable) -> None:
        with self._lock:
            self._items.pop(key, None)


class BytesCache:
    """Least-recently-used file contents, bounded by total bytes. For immutable files only."""

    def __init__(self, max_bytes: int, max_item: int) -> None:
        self.max_bytes, self.max_item = max_bytes, max_item
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_item or self.max_bytes <= 0:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = data
            self._size += len(data)
            while self._size > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._size -= len(dropped)

    def pop_prefix(self, prefix: str) -> None:
        with self._lock:
            for key in [k for k in self._items if k.startswith(prefix)]:
                self._size -= len(self._items.pop(key))


class Budget:
    """Shares ``capacity`` units (e.g. decoded pixels) among coroutines of one event loop: a caller
    waits until its share fits. A share larger than the whole budget waits for an empty budget."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def reserve(self, amount: int) -> AsyncIterator[None]:
        amount = min(max(amount, 0), self.capacity)
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_use + amount <= self.capacity)
            self.in_use += amount
        try:
            yield
        finally:
            async with self._changed:
                self.in_use -= amount
                self._changed.notify_all()
