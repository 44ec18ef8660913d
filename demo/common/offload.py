"""The one way blocking work leaves the event loop.

Two thread pools: ``db`` sized to the connection pool (a thread never waits for a connection) and
``cpu`` for password hashing and image work, so a burst of logins cannot starve database calls.
"""
from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Offloader:
    def __init__(self, db_threads: int, cpu_threads: int = 0) -> None:
        cpu_threads = cpu_threads or (os.cpu_count() or 1)
        self.db_pool = ThreadPoolExecutor(max_workers=db_threads, thread_name_prefix="demo-db")
        self.cpu_pool = ThreadPoolExecutor(max_workers=cpu_threads, thread_name_prefix="demo-cpu")

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the database pool (it may block on I/O)."""
        return await self._run(self.db_pool, fn, args, kwargs)

    async def cpu(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the CPU pool (hashing, image decoding, large file I/O)."""
        return await self._run(self.cpu_pool, fn, args, kwargs)

    @staticmethod
    async def _run(pool: ThreadPoolExecutor, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
        call = functools.partial(fn, *args, **kwargs) if kwargs else functools.partial(fn, *args)
        return await asyncio.get_running_loop().run_in_executor(pool, call)

    def queue_depth(self) -> int:
        """Tasks waiting for a thread, both pools (private attribute, read only for metrics)."""
        return self.db_pool._work_queue.qsize() + self.cpu_pool._work_queue.qsize()

    def shutdown(self) -> None:
        self.db_pool.shutdown(wait=True, cancel_futures=True)
        self.cpu_pool.shutdown(wait=True, cancel_futures=True)
