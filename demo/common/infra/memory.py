"""Memory of one process: budgets that share it out (``Budget``), and giving big freed buffers back.

One budget API for every share: ``try_take``/``give_back`` for a share taken at once or not at all
(upload bodies held in memory), ``reserve`` for a share worth waiting for (pixels being decoded).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import wraps
from typing import Any, TypeVar

log = logging.getLogger("demo")
T = TypeVar("T")


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):  # not glibc: nothing to tune
        log.debug("malloc_trim unavailable; malloc left as it is")
        return None


_LIBC = _libc()


def release_free_memory() -> None:
    """Return the free pages of every malloc heap to the OS (glibc ``malloc_trim``).

    Why not a fixed mmap threshold (``mallopt``)? glibc raises its threshold after each large free,
    so Pillow's decode blocks end up in per-thread heaps that keep their pages, and RSS grows with
    every large upload. Fixing the threshold cured that but made every argon2 hash mmap, fault in and
    unmap its buffer afresh (measured in bench/README.md). So the threshold stays dynamic (the hasher
    reuses its buffer) and image work trims after itself.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def trims_after(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn``, then ``release_free_memory()``: for calls that allocate and free big buffers."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        finally:
            release_free_memory()

    return wrapper


class _Turn:
    """A waiter of ``Budget.reserve``: its share, its wake-up, and whether the share is counted."""

    __slots__ = ("amount", "future", "admitted")

    def __init__(self, amount: int, future: asyncio.Future[None]) -> None:
        self.amount, self.future, self.admitted = amount, future, False


class Budget:
    """``capacity`` units (bytes, pixels) shared by one process; safe to give back from any thread.

    ``try_take`` takes a share now or refuses; ``reserve`` waits in line until the share fits (a
    share larger than the whole budget waits for an empty one). First come, first served: a big
    share at the head of the line is not starved by small ones behind it, and a give-back wakes only
    the waiters it lets in.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._waiting: deque[_Turn] = deque()
        self._lock = threading.Lock()

    def try_take(self, amount: int) -> bool:
        """Count ``amount`` as used if it fits now (and nobody waits); False otherwise."""
        with self._lock:
            if self._waiting or self.in_use + amount > self.capacity:
                return False
            self.in_use += amount
            return True

    def give_back(self, amount: int) -> None:
        with self._lock:
            self.in_use -= amount
            admitted = self._admit()
        _wake(admitted)

    @asynccontextmanager
    async def reserve(self, amount: int) -> AsyncIterator[None]:
        """Hold ``amount`` (at most the capacity) for the block, waiting for room first."""
        amount = min(max(amount, 0), self.capacity)
        if not self.try_take(amount):
            turn = _Turn(amount, asyncio.get_running_loop().create_future())
            with self._lock:
                self._waiting.append(turn)
                admitted = self._admit()  # room may have been given back since try_take
            _wake(admitted)
            try:
                await turn.future
            except BaseException:  # cancelled while waiting, or between being let in and waking up
                with self._lock:
                    if turn.admitted:
                        self.in_use -= amount
                    else:
                        self._waiting.remove(turn)
                    admitted = self._admit()  # we may have been the head that held others back
                _wake(admitted)
                raise
        try:
            yield
        finally:
            self.give_back(amount)

    def _admit(self) -> list[_Turn]:
        """Count the shares of the waiters that fit now, in order (called holding the lock)."""
        admitted = []
        while self._waiting and self.in_use + self._waiting[0].amount <= self.capacity:
            turn = self._waiting.popleft()
            turn.admitted = True
            self.in_use += turn.amount
            admitted.append(turn)
        return admitted


def _wake(turns: list[_Turn]) -> None:
    for turn in turns:
        loop = turn.future.get_loop()
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            _set(turn.future)
        else:
            loop.call_soon_threadsafe(_set, turn.future)


def _set(future: asyncio.Future[None]) -> None:
    if not future.done():  # a waiter cancelled after being let in gives its share back itself
        future.set_result(None)
