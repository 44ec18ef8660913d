"""The Offloader (infra/offload.py): blocking work runs on its pool's threads, never on the loop's."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from demo.common.infra.offload import Offloader


@pytest.fixture
def offloader():
    pools = Offloader(db_threads=2, cpu_threads=3, io_threads=4)
    yield pools
    pools.shutdown()


def thread_name() -> str:
    return threading.current_thread().name


@pytest.mark.parametrize(("pool", "prefix"), [("db", "demo-db"), ("cpu", "demo-cpu"), ("io", "demo-io")])
def test_work_runs_off_the_loop_thread_on_its_own_pool(offloader, pool, prefix):
    async def run() -> tuple[str, str]:
        return thread_name(), await getattr(offloader, pool)(thread_name)

    loop_thread, worker = asyncio.run(run())
    assert worker != loop_thread and worker.startswith(prefix + "_")


def test_arguments_and_keywords_reach_the_function_and_its_result_comes_back(offloader):
    def combine(a, b, *, sep):
        return f"{a}{sep}{b}"

    async def run():
        return await offloader.cpu(combine, "x", "y", sep="+"), await offloader.io(combine, 1, 2, sep="-")

    assert asyncio.run(run()) == ("x+y", "1-2")


@pytest.mark.parametrize("pool", ["db", "cpu", "io"])
def test_an_exception_reaches_the_awaiting_coroutine(offloader, pool):
    class Boom(Exception):
        pass

    def fail():
        raise Boom("from the pool")

    async def run():
        await getattr(offloader, pool)(fail)

    with pytest.raises(Boom, match="from the pool"):
        asyncio.run(run())


def test_pools_are_sized_as_asked():
    pools = Offloader(db_threads=5, cpu_threads=2, io_threads=7)
    try:
        assert [pool._max_workers for pool in pools.pools] == [5, 2, 7]
    finally:
        pools.shutdown()


def test_the_cpu_pool_defaults_to_one_thread_per_core():
    pools = Offloader(db_threads=1)
    try:
        assert pools.cpu_pool._max_workers == (os.cpu_count() or 1) and pools.io_pool._max_workers == 4
    finally:
        pools.shutdown()


def test_a_full_db_pool_runs_no_more_than_its_threads_at_once_and_counts_the_queue():
    """Two db threads: of five blocking calls, two run and three wait (queue_depth counts them)."""
    pools = Offloader(db_threads=2, cpu_threads=1, io_threads=1)
    release = threading.Event()
    running = []
    lock = threading.Lock()

    def block():
        with lock:
            running.append(thread_name())
        release.wait(5)

    async def run():
        calls = [asyncio.ensure_future(pools.db(block)) for _ in range(5)]
        for _ in range(200):
            await asyncio.sleep(0.005)
            if len(running) == 2 and pools.queue_depth() == 3:
                break
        seen = (len(running), pools.queue_depth())
        release.set()
        await asyncio.gather(*calls)
        return seen

    try:
        assert asyncio.run(run()) == (2, 3)
        assert len(running) == 5 and len(set(running)) == 2 and pools.queue_depth() == 0
    finally:
        release.set()
        pools.shutdown()


def test_the_loop_keeps_running_while_work_blocks(offloader):
    """A blocked pool thread does not stall other coroutines on the loop."""
    release = threading.Event()

    async def run():
        blocked = asyncio.ensure_future(offloader.io(release.wait, 5))
        ticks = 0
        while ticks < 3:
            await asyncio.sleep(0.001)
            ticks += 1
        assert not blocked.done()
        release.set()
        return ticks, await blocked

    assert asyncio.run(run()) == (3, True)


def test_shutdown_cancels_queued_work_and_refuses_more():
    pools = Offloader(db_threads=1, cpu_threads=1, io_threads=1)
    pools.shutdown()

    async def run():
        await pools.db(thread_name)

    with pytest.raises(RuntimeError, match="shutdown"):
        asyncio.run(run())
