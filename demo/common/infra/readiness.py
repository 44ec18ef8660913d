"""Readiness, cheap under a flood of probes: one database ping answers every probe for a second."""

from __future__ import annotations

import asyncio
import time

from demo.common.errors import Unavailable
from demo.common.infra.db import Database

READY_TTL = 1.0  # seconds one answer (ready or not) is reused
READY_TIMEOUT = 2.0  # seconds: a readiness probe must answer before the prober gives up


class Readiness:
    """``await readiness.database_ok()``: the last ping's result while fresh, else one new ping shared
    by every caller that asks meanwhile (single flight), so probes cost at most one ping per TTL."""

    def __init__(self, db: Database, ttl: float = READY_TTL, timeout: float = READY_TIMEOUT) -> None:
        self.db = db
        self.ttl = ttl
        self.timeout = timeout
        self._result = False
        self._expires = 0.0  # time.monotonic() after which the result is stale
        self._pending: asyncio.Future[bool] | None = None

    async def database_ok(self) -> bool:
        if time.monotonic() < self._expires:
            return self._result
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._check())
        # shield: a caller that goes away must not cancel the check the others are waiting for
        return await asyncio.shield(self._pending)

    async def _check(self) -> bool:
        try:
            await asyncio.wait_for(self.db.ping(), self.timeout)
            ok = True
        except (TimeoutError, Unavailable):
            ok = False
        finally:
            self._pending = None
        self._result, self._expires = ok, time.monotonic() + self.ttl
        return ok
