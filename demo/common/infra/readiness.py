"""Readiness, cheap under a flood of probes: each check (the database, the image store) runs at most
once a second, and every probe meanwhile shares its answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping

from demo.common.errors import Unavailable

READY_TTL = 1.0  # seconds one answer (ready or not) is reused
READY_TIMEOUT = 2.0  # seconds: a readiness probe must answer before the prober gives up


class Check:
    """``await check.ok()``: the last probe's result while fresh, else one new probe shared by every
    caller that asks meanwhile (single flight), so probes cost at most one call per TTL."""

    def __init__(self, probe: Callable[[], Awaitable[object]], ttl: float, timeout: float) -> None:
        self.probe = probe
        self.ttl = ttl
        self.timeout = timeout
        self._result = False
        self._expires = 0.0  # time.monotonic() after which the result is stale
        self._pending: asyncio.Future[bool] | None = None

    async def ok(self) -> bool:
        if time.monotonic() < self._expires:
            return self._result
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._run())
        # shield: a caller that goes away must not cancel the check the others are waiting for
        return await asyncio.shield(self._pending)

    async def _run(self) -> bool:
        try:
            await asyncio.wait_for(self.probe(), self.timeout)
            ok = True
        except (TimeoutError, Unavailable, OSError):
            ok = False
        finally:
            self._pending = None
        self._result, self._expires = ok, time.monotonic() + self.ttl
        return ok


class Readiness:
    """Named checks (``{"database": db.ping, "storage": ...}``), each probed as ``Check`` says."""

    def __init__(
        self,
        probes: Mapping[str, Callable[[], Awaitable[object]]],
        ttl: float = READY_TTL,
        timeout: float = READY_TIMEOUT,
    ) -> None:
        self.ttl = ttl
        self.checks = {name: Check(probe, ttl, timeout) for name, probe in probes.items()}

    async def report(self) -> dict[str, bool]:
        """Every check's answer, probed together."""
        results = await asyncio.gather(*(check.ok() for check in self.checks.values()))
        return dict(zip(self.checks, results, strict=True))
