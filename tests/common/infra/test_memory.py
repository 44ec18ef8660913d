"""infra/memory.py: the one budget API (shares taken at once or waited for) and giving memory back."""

from __future__ import annotations

import asyncio
import threading

import pytest

from demo.common.infra.memory import Budget, release_free_memory, trims_after

gen_test = pytest.mark.gen_test(timeout=60)


@gen_test
async def test_decoding_shares_a_pixel_budget():
    """Concurrent uploads never decode more pixels at once than the budget (one oversize share runs alone)."""
    budget, peak, order = Budget(100), [0], []

    async def job(name: str, pixels: int) -> None:
        async with budget.reserve(pixels):
            peak[0] = max(peak[0], budget.in_use)
            order.append(name)
            await asyncio.sleep(0.01)

    await asyncio.gather(job("a", 60), job("b", 60), job("huge", 500), job("c", 30))
    assert peak[0] <= 100 and order == ["a", "b", "huge", "c"]  # first come, first served: no starving
    assert budget.in_use == 0


@gen_test
async def test_a_cancelled_wait_for_the_pixel_budget_lets_the_next_in():
    budget, entered = Budget(100), []

    async def job(name: str, pixels: int, hold: asyncio.Event) -> None:
        async with budget.reserve(pixels):
            entered.append(name)
            await hold.wait()

    release = asyncio.Event()
    first = asyncio.ensure_future(job("first", 80, release))
    blocked = asyncio.ensure_future(job("blocked", 50, release))  # waits: 80 + 50 > 100
    small = asyncio.ensure_future(job("small", 10, release))  # waits behind it, though 10 would fit
    await asyncio.sleep(0.01)
    assert entered == ["first"] and budget.in_use == 80
    blocked.cancel()
    await asyncio.sleep(0.01)
    assert entered == ["first", "small"] and budget.in_use == 90
    release.set()
    await asyncio.gather(first, small)
    assert blocked.cancelled() and budget.in_use == 0


def test_try_take_takes_a_share_that_fits_or_nothing():
    budget = Budget(100)
    assert budget.try_take(60) and budget.try_take(40) and budget.in_use == 100
    assert not budget.try_take(1) and budget.in_use == 100  # refused: nothing counted
    budget.give_back(60)
    assert budget.try_take(50) and budget.in_use == 90


@gen_test
async def test_try_take_does_not_jump_the_line():
    budget = Budget(100)
    held = budget.try_take(90)
    waiting = asyncio.ensure_future(_hold(budget, 50))
    await asyncio.sleep(0.01)
    assert held and not waiting.done()
    assert not budget.try_take(5)  # 5 would fit, but the waiter came first
    budget.give_back(90)
    await waiting
    assert budget.in_use == 0


async def _hold(budget: Budget, amount: int) -> None:
    async with budget.reserve(amount):
        await asyncio.sleep(0)


@gen_test
async def test_a_share_given_back_on_another_thread_lets_a_waiter_in():
    """Upload memory is given back on whichever thread discards the upload: waiters still wake."""
    budget = Budget(100)
    assert budget.try_take(100)
    entered = asyncio.Event()

    async def waiter() -> None:
        async with budget.reserve(30):
            entered.set()

    task = asyncio.ensure_future(waiter())
    await asyncio.sleep(0.01)
    assert not entered.is_set()
    thread = threading.Thread(target=budget.give_back, args=(100,))
    thread.start()
    thread.join()
    await asyncio.wait_for(entered.wait(), 5)
    await task
    assert budget.in_use == 0


@gen_test
async def test_a_waiter_cancelled_after_being_let_in_gives_its_share_back():
    budget = Budget(100)
    assert budget.try_take(100)
    task = asyncio.ensure_future(_hold(budget, 70))
    await asyncio.sleep(0.01)
    budget.give_back(100)  # lets the waiter in (its share counted) ...
    task.cancel()  # ... and it is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await task
    assert budget.in_use == 0


def test_trims_after_returns_what_the_call_returns_and_trims_even_on_error(monkeypatch):
    from demo.common.infra import memory

    trimmed = []
    monkeypatch.setattr(memory, "release_free_memory", lambda: trimmed.append(1))

    @trims_after
    def work(fail: bool) -> str:
        if fail:
            raise ValueError("boom")
        return "done"

    assert work(False) == "done"
    with pytest.raises(ValueError):
        work(True)
    assert trimmed == [1, 1]
    release_free_memory()  # the real one: harmless anywhere
