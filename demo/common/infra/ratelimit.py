"""Fixed-window counters in the database, so limits hold across processes and restarts.

A limit that guards work (a password check, a hash) reserves the attempt before the work, inside a
unit of work: the counter's upsert locks its row, so parallel attempts queue there and each sees the
others' reservations; past the limit the unit raises ``RateLimited`` and rolls back, so a refused
request uses up no quota. An attempt that should not count (a good login) is refunded afterwards.
``hit`` does this for one window in an ORM unit; ``reserve_statement``/``refund_statement`` for
several at once in a direct unit (one statement each, for the login).

Per-client limits key the client with ``client_key``: an IPv6 client owns a whole /64.
"""
from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, bindparam, delete, or_, select, update
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import ScalarSelect
from sqlalchemy.orm import Session

from demo.common.infra.db import Prepared, session_cursor, upsert_add, upsert_add_statement
from demo.common.errors import RateLimited
from demo.models import RateCounter

_counters = RateCounter.__table__
IPV6_CLIENT_PREFIX = 64


def client_key(address: str) -> str:
    """The client behind ``address``, for per-client limits: an IPv4 address as is, an IPv6 address
    as its /64 (one subscriber is routed a whole /64 and picks any address in it at will, so counting
    addresses would give them 2**64 quotas), an IPv4-mapped IPv6 address as its IPv4 address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # not an IP (a unix socket peer): it is the only name there is
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, IPV6_CLIENT_PREFIX)))
    return str(ip)


@dataclass(frozen=True)
class Window:
    key: str
    limit: int
    seconds: int

    def start(self, now: dt.datetime) -> int:
        epoch = int(now.replace(tzinfo=dt.UTC).timestamp())
        return epoch - epoch % self.seconds

    def retry_after(self, now: dt.datetime) -> int:
        """Whole seconds to the window's end (so a Retry-After is never more than the window)."""
        epoch = now.replace(tzinfo=dt.UTC).timestamp()
        return math.ceil(self.start(now) + self.seconds - epoch)

    def row(self, now: dt.datetime) -> dict[str, Any]:
        """The counter row of one event in the current window."""
        start = self.start(now)
        expires_at = dt.datetime.fromtimestamp(start + self.seconds, dt.UTC).replace(tzinfo=None)
        return {"key": self.key, "window_start": start, "count": 1, "expires_at": expires_at}


def hit(session: Session, window: Window, now: dt.datetime) -> int:
    """Count one event; raise RateLimited once the window holds more than ``limit``."""
    row = window.row(now)
    upsert_add(session, RateCounter, row, ["key", "window_start"], "count")  # locks the row: hits serialise
    count = _count(session, window.key, row["window_start"])
    if count > window.limit:
        raise RateLimited(window.retry_after(now))
    return count


def refund(session: Session, window: Window, reserved_at: dt.datetime) -> None:
    """Give back the event ``hit`` counted at ``reserved_at`` (in the same or a later unit of work)."""
    session_cursor(session).execute(refund_statement(1), window_params([window], reserved_at))


def refuse_if_over(window: Window, count: int | None, now: dt.datetime) -> None:
    """Raise RateLimited if ``count`` (the window's count, this attempt included) is over the limit."""
    if (count or 0) > window.limit:
        raise RateLimited(window.retry_after(now))


def reserve_statement(size: int) -> Prepared:
    """One event counted in ``size`` windows at once (parameters ``key0``, ``start0``, ``expires0``, ...;
    see ``window_params``): one multi-row upsert, whose rows stay locked until commit. Callers pass
    their windows in key order, as every statement here locks rows (MariaDB: no lock-order deadlock)."""
    return _statements(size)[0]


def refund_statement(size: int) -> Prepared:
    """Give back the event ``reserve_statement(size)`` counted (same parameters)."""
    return _statements(size)[1]


def window_params(windows: Sequence[Window], now: dt.datetime, first: int = 0) -> dict[str, Any]:
    """The parameters of ``reserve_statement``/``refund_statement``/``count_of`` for ``windows``
    (numbered from ``first``: windows at other times can be added to one statement's parameters)."""
    params: dict[str, Any] = {}
    for i, window in enumerate(windows, first):
        row = window.row(now)
        params.update({f"key{i}": row["key"], f"start{i}": row["window_start"],
                       f"expires{i}": row["expires_at"]})
    return params


def count_of(i: int) -> ScalarSelect:
    """The count of window ``i`` of ``window_params`` (NULL: none yet), to read inside a larger statement."""
    return select(_counters.c.count).where(_window_row(i)).scalar_subquery()


@functools.cache
def _statements(size: int) -> tuple[Prepared, Prepared]:
    rows = [{"key": bindparam(f"key{i}"), "window_start": bindparam(f"start{i}"), "count": 1,
             "expires_at": bindparam(f"expires{i}", type_=_counters.c.expires_at.type)} for i in range(size)]
    reserve = Prepared(lambda dialect: upsert_add_statement(
        dialect, RateCounter, rows, ["key", "window_start"], "count"))
    give_back = Prepared(update(_counters).values(count=_counters.c.count - 1)
                         .where(or_(*(_window_row(i) for i in range(size)))))
    return reserve, give_back


def _window_row(i: int) -> ColumnElement[bool]:
    """The counter row of window ``i`` of ``window_params``."""
    return and_(_counters.c.key == bindparam(f"key{i}"), _counters.c.window_start == bindparam(f"start{i}"))


# Reset every window of a key (e.g. a phone's login failures after a good login), in a direct unit.
FORGET = Prepared(delete(_counters).where(_counters.c.key == bindparam("key")))


def forget_family(session: Session, key: str) -> None:
    """Reset every window of ``key`` and of every key under it (``key:...``)."""
    family = or_(RateCounter.key == key, RateCounter.key.startswith(f"{key}:", autoescape=True))
    session.execute(delete(RateCounter).where(family))


def sweep(session: Session, now: dt.datetime) -> int:
    """Drop counters whose window has closed."""
    return session.execute(delete(RateCounter).where(RateCounter.expires_at < now)).rowcount


def _count(session: Session, key: str, start: int) -> int:
    stmt = select(RateCounter.count).where(RateCounter.key == key, RateCounter.window_start == start)
    return session.execute(stmt).scalar() or 0
