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
@pytest.mark.gen_test
async def test_work_runs_off_the_loop_thread_on_its_own_pool(offloader, pool, prefix):
    worker = await getattr(offloader, pool)(thread_name)
    assert worker != thread_name() and worker.startswith(prefix + "_")


@pytest.mark.gen_test
async def test_arguments_and_keywords_reach_the_function_and_its_result_comes_back(offloader):
    def combine(a, b, *, sep):
        return f"{a}{sep}{b}"

    assert await offloader.cpu(combine, "x", "y", sep="+") == "x+y"
    assert await offloader.io(combine, 1, 2, sep="-") == "1-2"


@pytest.mark.parametrize("pool", ["db", "cpu", "io"])
@pytest.mark.gen_test
async def test_an_exception_reaches_the_awaiting_coroutine(offloader, pool):
    class Boom(Exception):
        pass

    def fail():
        raise Boom("from the pool")

    with pytest.raises(Boom, match="from the pool"):
        await getattr(offloader, pool)(fail)


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


@pytest.mark.gen_test
async def test_a_full_db_pool_runs_no_more_than_its_threads_at_once_and_counts_the_queue():
    """Two db threads: of five blocking calls, two run and three wait (queue_depth counts them)."""
    pools = Offloader(db_threads=2, cpu_threads=1, io_threads=1)
    release = threading.Event()
    running = []
    lock = threading.Lock()

    def block():
        with lock:
            running.append(thread_name())
        release.wait(5)

    try:
        calls = [asyncio.ensure_future(pools.db(block)) for _ in range(5)]
        for _ in range(200):
            await asyncio.sleep(0.005)
            if len(running) == 2 and pools.queue_depth() == 3:
                break
        assert (len(running), pools.queue_depth()) == (2, 3)
        release.set()
        await asyncio.gather(*calls)
        assert len(running) == 5 and len(set(running)) == 2 and pools.queue_depth() == 0
    finally:
        release.set()
        pools.shutdown()


@pytest.mark.gen_test
async def test_the_loop_keeps_running_while_work_blocks(offloader):
    """A blocked pool thread does not stall other coroutines on the loop."""
    release = threading.Event()
    blocked = asyncio.ensure_future(offloader.io(release.wait, 5))
    try:
        for _ in range(3):
            await asyncio.sleep(0.001)
        assert not blocked.done()
    finally:
        release.set()
    assert await blocked is True


@pytest.mark.gen_test
async def test_after_shutdown_no_more_work_is_taken():
    pools = Offloader(db_threads=1, cpu_threads=1, io_threads=1)
    pools.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        await pools.db(thread_name)
