"""infra/memory.py: the one budget API (shares taken at once or waited for) and giving memory back."""
from __future__ import annotations

import asyncio

import pytest

gen_test = pytest.mark.gen_test(timeout=60)


@gen_test
async def test_decoding_shares_a_pixel_budget(app):
    """Concurrent uploads never decode more pixels at once than the budget (one oversize share runs alone)."""
    from demo.common.infra.memory import Budget

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
    from demo.common.infra.memory import Budget

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
