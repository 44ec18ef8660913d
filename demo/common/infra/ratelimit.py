"""Fixed-window counters in the database, so limits hold across processes and restarts.

A limit that guards work (a password check, a hash) reserves the attempt before the work, inside a
unit of work: the counter's upsert locks its row, so parallel attempts queue there and each sees the
others' reservations; past the limit the unit raises ``RateLimited`` and rolls back, so a refused
request uses up no quota. An attempt that should not count (a good login) is refunded afterwards.
``hit`` does this for one window; ``reserve``/``refund`` for several at once (one statement each, for
the login). Everything here runs on a ``SqlCursor`` (a ``@sql_unit``'s cursor).

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

from demo.common.errors import RateLimited
from demo.common.infra.db import Sql, SqlCursor

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


def hit(c: SqlCursor, window: Window, now: dt.datetime) -> int:
    """Count one event; raise RateLimited once the window holds more than ``limit``."""
    params = window_params([window], now)
    reserve(c, params, 1)  # locks the row: hits serialise
    row = c.first(_COUNT, params)
    count = 0 if row is None else int(row.n)
    if count > window.limit:
        raise RateLimited(window.retry_after(now))
    return count


def refund(c: SqlCursor, params: dict[str, Any], size: int) -> None:
    """Give back the event ``reserve(c, params, size)`` counted (in the same or a later unit of work)."""
    c.execute(statements(size)[1], params)


def refund_one(c: SqlCursor, window: Window, reserved_at: dt.datetime) -> None:
    """Give back the event ``hit`` counted at ``reserved_at``."""
    refund(c, window_params([window], reserved_at), 1)


def refuse_if_over(window: Window, count: int | None, now: dt.datetime) -> None:
    """Raise RateLimited if ``count`` (the window's count, this attempt included) is over the limit."""
    if (count or 0) > window.limit:
        raise RateLimited(window.retry_after(now))


def reserve(c: SqlCursor, params: dict[str, Any], size: int) -> None:
    """One event counted in the first ``size`` windows of ``params`` (``window_params``) at once: one
    multi-row upsert, whose rows stay locked until commit. Callers pass their windows in key order, as
    every statement here locks rows (MariaDB: no lock-order deadlock)."""
    c.execute(statements(size)[0], params)


def window_params(windows: Sequence[Window], now: dt.datetime, first: int = 0) -> dict[str, Any]:
    """The parameters of ``reserve``/``refund``/``count_of`` for ``windows`` (numbered from ``first``:
    windows at other times can be added to one statement's parameters)."""
    params: dict[str, Any] = {}
    for i, window in enumerate(windows, first):
        row = window.row(now)
        params.update({f"key{i}": row["key"], f"start{i}": row["window_start"], f"expires{i}": row["expires_at"]})
    return params


def count_of(i: int) -> str:
    """SQL for the count of window ``i`` of ``window_params`` (NULL: none yet), inside a larger statement."""
    return f"(SELECT count FROM rate_counters WHERE {_window_row(i)})"


@functools.cache
def statements(size: int) -> tuple[Sql, Sql]:
    """The statements of ``reserve`` and ``refund`` for ``size`` windows."""
    columns = "INSERT INTO rate_counters (`key`, window_start, count, expires_at) VALUES "
    rows = ", ".join(f"(:key{i}, :start{i}, 1, :expires{i})" for i in range(size))
    reserve = Sql(
        sqlite=f"{columns}{rows} ON CONFLICT (`key`, window_start) DO UPDATE SET count = count + excluded.count",
        mysql=f"{columns}{rows} ON DUPLICATE KEY UPDATE count = count + VALUES(count)",
    )
    windows = " OR ".join(_window_row(i) for i in range(size))
    give_back = Sql(f"UPDATE rate_counters SET count = count - 1 WHERE {windows}")
    return reserve, give_back


def _window_row(i: int) -> str:
    """The counter row of window ``i`` of ``window_params``."""
    return f"(`key` = :key{i} AND window_start = :start{i})"


_COUNT = Sql(f"SELECT count AS n FROM rate_counters WHERE {_window_row(0)}")


# Reset every window of a key (e.g. a phone's login failures after a good login).
_FORGET = Sql("DELETE FROM rate_counters WHERE `key` = :key")
# ... and of every key under it (``key:...``): LIKE with the key's own wildcards escaped.
_FORGET_FAMILY = Sql("DELETE FROM rate_counters WHERE `key` = :key OR `key` LIKE :under ESCAPE '/'")
_SWEEP = Sql("DELETE FROM rate_counters WHERE expires_at < :now")


def forget(c: SqlCursor, key: str) -> None:
    """Reset every window of ``key``."""
    c.execute(_FORGET, {"key": key})


def forget_family(c: SqlCursor, key: str) -> None:
    """Reset every window of ``key`` and of every key under it (``key:...``)."""
    escaped = key.replace("/", "//").replace("%", "/%").replace("_", "/_")
    c.execute(_FORGET_FAMILY, {"key": key, "under": f"{escaped}:%"})


def sweep(c: SqlCursor, now: dt.datetime) -> int:
    """Drop counters whose window has closed."""
    return c.execute(_SWEEP, {"now": now})
