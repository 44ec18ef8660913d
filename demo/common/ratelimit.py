"""Fixed-window counters in the database, so limits hold across processes and restarts.

Call these inside a unit of work: ``hit`` increments and raises ``RateLimited`` when the limit is
passed (the unit of work then rolls back, so a refused request does not use up the quota).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import bindparam, delete, select
from sqlalchemy.sql.selectable import ScalarSelect
from sqlalchemy.orm import Session

from demo.common.db import Prepared, upsert_add
from demo.common.errors import RateLimited
from demo.models import RateCounter

_counters = RateCounter.__table__


@dataclass(frozen=True)
class Window:
    key: str
    limit: int
    seconds: int

    def start(self, now: dt.datetime) -> int:
        epoch = int(now.replace(tzinfo=dt.UTC).timestamp())
        return epoch - epoch % self.seconds

    def retry_after(self, now: dt.datetime) -> int:
        epoch = now.replace(tzinfo=dt.UTC).timestamp()
        return int(self.start(now) + self.seconds - epoch) + 1


def hit(session: Session, window: Window, now: dt.datetime, *, enforce: bool = True) -> int:
    """Count one event; raise RateLimited once the window holds more than ``limit`` (if ``enforce``)."""
    start = window.start(now)
    values = dict(
        key=window.key,
        window_start=start,
        count=1,
        expires_at=dt.datetime.fromtimestamp(start + window.seconds, dt.UTC).replace(tzinfo=None),
    )
    upsert_add(session, RateCounter, values, ["key", "window_start"], "count")  # locks the row: hits serialise
    count = _count(session, window.key, start)
    if enforce and count > window.limit:
        raise RateLimited(window.retry_after(now))
    return count


def refuse_if_full(window: Window, count: int | None, now: dt.datetime) -> None:
    """Raise RateLimited if ``count`` (the window's current count, read by the caller) fills it."""
    if (count or 0) >= window.limit:
        raise RateLimited(window.retry_after(now))


def count_of(key: str, start: str) -> ScalarSelect:
    """The count of the window named by the bind parameters ``key`` and ``start`` (NULL: none yet),
    to read inside a larger statement."""
    return (select(_counters.c.count)
            .where(_counters.c.key == bindparam(key), _counters.c.window_start == bindparam(start))
            .scalar_subquery())


# Reset every window of a key (e.g. a phone's login failures after a good login), in a direct unit.
FORGET = Prepared(delete(_counters).where(_counters.c.key == bindparam("key")))


def sweep(session: Session, now: dt.datetime) -> int:
    """Drop counters whose window has closed."""
    return session.execute(delete(RateCounter).where(RateCounter.expires_at < now)).rowcount


def _count(session: Session, key: str, start: int) -> int:
    stmt = select(RateCounter.count).where(RateCounter.key == key, RateCounter.window_start == start)
    return session.execute(stmt).scalar() or 0
