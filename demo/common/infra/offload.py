"""The one way blocking work leaves the event loop.

Three thread pools: ``db`` sized to the connection pool (a thread never waits for a connection),
``cpu`` for password hashing and image decoding (one per core: more would only queue in the kernel),
and ``io`` for file reads and writes, so a burst of logins can starve neither queries nor downloads.
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
    def __init__(self, db_threads: int, cpu_threads: int = 0, io_threads: int = 4) -> None:
        cpu_threads = cpu_threads or (os.cpu_count() or 1)
        self.db_pool = ThreadPoolExecutor(max_workers=db_threads, thread_name_prefix="demo-db")
        self.cpu_pool = ThreadPoolExecutor(max_workers=cpu_threads, thread_name_prefix="demo-cpu")
        self.io_pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="demo-io")
        self.pools = (self.db_pool, self.cpu_pool, self.io_pool)

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the database pool (it may block on I/O)."""
        return await self._run(self.db_pool, fn, args, kwargs)

    async def cpu(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the CPU pool (hashing, image decoding, large file I/O)."""
        return await self._run(self.cpu_pool, fn, args, kwargs)

    async def io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the file I/O pool (upload chunks, image reads)."""
        return await self._run(self.io_pool, fn, args, kwargs)

    @staticmethod
    async def _run(pool: ThreadPoolExecutor, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        call = functools.partial(fn, *args, **kwargs) if kwargs else functools.partial(fn, *args)
        return await asyncio.get_running_loop().run_in_executor(pool, call)

    def queue_depth(self) -> int:
        """Tasks waiting for a thread in any pool (private attribute, read only for metrics)."""
        return sum(pool._work_queue.qsize() for pool in self.pools)

    def shutdown(self) -> None:
        for pool in self.pools:
            pool.shutdown(wait=True, cancel_futures=True)
