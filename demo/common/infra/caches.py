"""Small in-process caches for the delivery hot path (thread-safe, bounded), and a memory budget."""
from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
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
    waits until its share fits. A share larger than the whole budget waits for an empty budget.

    First come, first served: a big share at the head is not starved by small ones behind it. A
    release wakes only the waiters it lets in (an ``asyncio.Condition`` woke every waiter to re-check:
    50 queued uploads meant ~2,500 wake-ups a second on the event loop).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @asynccontextmanager
    async def reserve(self, amount: int) -> AsyncIterator[None]:
        amount = min(max(amount, 0), self.capacity)
        if self._waiting or self.in_use + amount > self.capacity:
            turn = (amount, asyncio.get_running_loop().create_future())
            self._waiting.append(turn)
            try:
                await turn[1]  # set once in_use counts our share
            except BaseException:  # cancelled while waiting
                if turn[1].cancelled():
                    if turn in self._waiting:
                        self._waiting.remove(turn)
                    self._let_in()  # we may have been the head that held others back
                else:
                    self._release(amount)  # let in and cancelled in the same tick
                raise
        else:
            self.in_use += amount
        try:
            yield
        finally:
            self._release(amount)

    def _release(self, amount: int) -> None:
        self.in_use -= amount
        self._let_in()

    def _let_in(self) -> None:
        while self._waiting and self.in_use + self._waiting[0][0] <= self.capacity:
            amount, turn = self._waiting.popleft()
            if not turn.cancelled():  # its owner has not run its clean-up yet
                self.in_use += amount
                turn.set_result(None)
