"""demo/common/infra/ratelimit.py without HTTP: who a per-client limit counts as one client, and the
counters on SQLite and MariaDB, without the rules."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from demo.common.errors import RateLimited
from demo.common.infra import ratelimit
from demo.common.infra.db import sql_unit
from demo.common.infra.ratelimit import Window, client_key
from demo.models import RateCounter


@pytest.mark.parametrize(
    ("address", "client"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # any address of the /64, any spelling
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),  # the next /64 is another client
        ("::ffff:198.51.100.7", "198.51.100.7"),  # IPv4-mapped: the IPv4 client it is
        ("::1", "::/64"),
        ("", ""),  # no address (a unix socket peer): the only name there is
    ],
)
def test_client_key_is_the_ipv4_address_or_the_ipv6_64(address, client):
    assert client_key(address) == client


NOW = dt.datetime(2026, 11, 22, 10, 0, 30)


@pytest.fixture
def db(app):
    return app.services.db


def run(db, step, *args):
    """``step(cursor, *args)`` as a unit of work of its own."""
    return db.run_sync(sql_unit(lambda c: step(c, *args)))


def counts(db) -> dict[str, int]:
    return dict(db.run_sync(lambda s: s.execute(select(RateCounter.key, RateCounter.count)).all()))


def test_hit_counts_until_the_limit_then_refuses_without_counting(db):
    window = Window("k", 2, 60)
    assert [run(db, ratelimit.hit, window, NOW) for _ in range(2)] == [1, 2]
    with pytest.raises(RateLimited) as refused:
        run(db, ratelimit.hit, window, NOW)
    assert refused.value.retry_after == 30 and counts(db) == {"k": 2}
    assert run(db, ratelimit.hit, window, NOW + dt.timedelta(seconds=30)) == 1  # the next window
    expires = db.run_sync(lambda s: s.scalars(select(RateCounter.expires_at).order_by(RateCounter.window_start)).all())
    assert expires == [dt.datetime(2026, 11, 22, 10, 1), dt.datetime(2026, 11, 22, 10, 2)]


def test_reserve_and_refund_several_windows_at_once(db):
    windows = [Window("a", 5, 60), Window("b", 5, 60), Window("c", 5, 60)]
    params = ratelimit.window_params(windows, NOW)
    run(db, ratelimit.reserve, params, 3)
    run(db, ratelimit.reserve, params, 2)  # the first two only
    assert counts(db) == {"a": 2, "b": 2, "c": 1}
    run(db, ratelimit.refund, params, 3)
    assert counts(db) == {"a": 1, "b": 1, "c": 0}
    run(db, ratelimit.refund_one, windows[0], NOW)
    assert counts(db)["a"] == 0


def test_forget_family_forgets_the_key_and_those_under_it_only(db):
    keys = ["p:1", "p:1:from:x", "p:10", "p_1:x", "p%1:x", "p:1x"]
    for key in keys:
        run(db, ratelimit.hit, Window(key, 9, 60), NOW)
    run(db, ratelimit.forget_family, "p:1")
    assert sorted(counts(db)) == ["p%1:x", "p:10", "p:1x", "p_1:x"]
    run(db, ratelimit.forget_family, "p_1")  # wildcards in the key are plain characters
    assert sorted(counts(db)) == ["p%1:x", "p:10", "p:1x"]
    run(db, ratelimit.forget_family, "p%1")
    assert sorted(counts(db)) == ["p:10", "p:1x"]
    run(db, ratelimit.forget, "p:10")
    assert sorted(counts(db)) == ["p:1x"]


def test_sweep_drops_closed_windows(db):
    run(db, ratelimit.hit, Window("k", 9, 60), NOW)
    assert run(db, ratelimit.sweep, NOW + dt.timedelta(seconds=30)) == 0
    assert run(db, ratelimit.sweep, NOW + dt.timedelta(seconds=31)) == 1
