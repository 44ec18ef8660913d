"""demo/common/sms/costguard.py: the daily SMS budget and the conversion breaker, through the account
rules on SQLite and MariaDB (the HTTP answers are in tests/views/test_costguard_views.py)."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest
from sqlalchemy import select

from demo.common.errors import PrefixThrottled, RateLimited, SmsBudgetSpent
from demo.common.infra.db import SqlCursor
from demo.common.infra.startup import ConfigError
from demo.common.sms import costguard, queries
from demo.common.sms.costguard import HOUR, RECENT, SPAN, CostRules
from demo.conf import settings as config
from demo.conf.validate import check_values
from demo.models import RateCounter, SmsCode, SmsOutbox

gen_test = pytest.mark.gen_test(timeout=60)
PASSWORD = "demo123456"
RULES = CostRules(daily_budget=0, prefix_digits=5, min_sent=20, conversion=0.2, throttled_hourly=3, min_networks=3)


def pumped(n: int, prefix: str = "86138") -> list[str]:
    """``n`` numbers of one prefix (CN mobiles: +86 138 ...)."""
    return [f"+{prefix}{i:08d}" for i in range(n)]


def client(i: int) -> str:
    """Client ``i``, in a network (/24) of its own: the breaker trips on unused texts from several."""
    return f"198.51.{i % 250}.1"


def to_window_start(clock, seconds: int, into: float = 5) -> None:
    """Move the clock ``into`` seconds past the start of the next window of ``seconds``."""
    clock.advance(seconds - clock.timestamp() % seconds + into)


async def ask(app, phone: str, i: int = 0, purpose: str = "regist") -> None:
    await app.services.accounts.request_code(phone, purpose, client(i))


def code_of(app, phone: str) -> str:
    """The code of the phone's latest text, read from its outbox row (no sender runs here)."""
    return app.services.db.run_sync(
        lambda s: s.scalars(
            select(SmsOutbox.code).where(SmsOutbox.phone == phone).order_by(SmsOutbox.id.desc())
        ).first()
    )


def counter(app, key: str) -> dict[int, int]:
    rows = app.services.db.run_sync(
        lambda s: s.execute(select(RateCounter).where(RateCounter.key == key)).scalars().all()
    )
    return {row.window_start: row.count for row in rows}


# -- the rule, as numbers ------------------------------------------------------------------------------


def test_a_prefix_trips_on_judged_texts_that_go_unused_and_a_healthy_burst_does_not():
    assert RULES.throttled(sent=21, recent=1, used=3, marked=False, networks=3)  # 20 judged, 15% used
    assert not RULES.throttled(sent=21, recent=1, used=4, marked=False, networks=3)  # 20%: the threshold is "below"
    assert not RULES.throttled(sent=19, recent=0, used=0, marked=False, networks=3)  # too few to judge
    # A marketing push: 200 texts in two minutes, none used yet (too young to judge), then mostly used.
    assert not RULES.throttled(sent=200, recent=200, used=0, marked=False, networks=3)
    assert not RULES.throttled(sent=260, recent=60, used=130, marked=False, networks=3)


def test_a_tripped_prefix_stays_throttled_while_its_texts_go_unused_and_recovers_when_they_are_used():
    # Marked: a pumper's few throttled texts keep it closed below min_sent...
    assert RULES.throttled(sent=3, recent=0, used=0, marked=True, networks=3)
    # ... until its texts are used, or its last hour has nothing left to judge.
    assert not RULES.throttled(sent=3, recent=0, used=1, marked=True, networks=3)
    assert not RULES.throttled(sent=1, recent=1, used=0, marked=True, networks=3)


def test_the_breaker_is_off_at_conversion_0_and_the_prefix_holds_the_calling_code():
    off = CostRules(daily_budget=0, prefix_digits=5, min_sent=1, conversion=0, throttled_hourly=0)
    assert not off.throttled(sent=1000, recent=0, used=0, marked=True, networks=3)
    assert off.send_guard("+8613800000000", "192.0.2.1") is None and off.use_guard("+8613800000000", "::1") is None
    assert RULES.prefix("+8613800000000") == "86138" and RULES.prefix("+12015550123") == "12015"
    exempt = CostRules(daily_budget=5, prefix_digits=5, min_sent=1, conversion=0.2, throttled_hourly=0, exempt={"+1"})
    assert exempt.send_guard("+1", "192.0.2.1") is None and exempt.use_guard("+1", "192.0.2.1") is None


def test_a_prefix_trips_only_on_unused_texts_from_enough_client_networks():
    three = CostRules(daily_budget=0, prefix_digits=5, min_sent=20, conversion=0.2, throttled_hourly=3, min_networks=3)
    assert not three.throttled(sent=40, recent=0, used=0, marked=False, networks=2)
    assert not three.throttled(sent=40, recent=0, used=0, marked=True, networks=2)  # a mark does not hold it
    assert three.throttled(sent=40, recent=0, used=0, marked=False, networks=3)


@pytest.mark.parametrize(
    ("address", "network"),
    [
        ("203.0.113.7", "203.0.113.0/24"),
        ("203.0.113.250", "203.0.113.0/24"),  # the same /24: one network, however many addresses
        ("2001:db8:1:2::5", "2001:db8:1::/48"),
        ("2001:db8:1:ffff::5", "2001:db8:1::/48"),
        ("::ffff:203.0.113.9", "203.0.113.0/24"),  # an IPv4-mapped address is its IPv4 network
        ("unix-socket", "unix-socket"),
    ],
)
def test_a_client_network_is_an_ipv4_24_or_an_ipv6_48(address, network):
    assert costguard.network_of(address) == network


def test_the_young_texts_cap_follows_the_codes_used():
    assert [RULES.young_cap(used) for used in (0, 3, 4, 30)] == [20, 20, 22, 100]


# -- the budget -----------------------------------------------------------------------------------------


@pytest.mark.settings(sms_daily_budget=5, sms_ip_hourly=1000)
@gen_test
async def test_the_budget_holds_for_parallel_requests_of_two_processes(app, build_app, settings, clock):
    other = build_app(settings)  # a second process on the same database
    to_window_start(clock, 86400, into=60)
    apps = [app, other]
    results = await asyncio.gather(
        *[apps[i % 2].services.accounts.request_code(phone, "regist", client(i)) for i, phone in enumerate(pumped(16))],
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(results) - len(refused) == 5 and all(isinstance(r, SmsBudgetSpent) for r in refused), refused
    assert {abs(r.retry_after - (86400 - 60)) <= 1 for r in refused} == {True}  # to midnight UTC
    assert app.services.db.run_sync(lambda s: len(s.scalars(select(SmsCode)).all())) == 5
    assert list(counter(app, "sms:budget").values()) == [5]  # refused requests rolled back: never over
    # The next UTC day has its own budget.
    clock.advance(86400)
    await ask(app, "+8613900000001")


@pytest.mark.settings(sms_daily_budget=3, sms_ip_hourly=1000)
@gen_test
async def test_a_registered_and_an_unregistered_phone_cost_the_same(app, clock):
    registered = "+8613800000001"
    await ask(app, registered)
    await app.services.accounts.register(registered, PASSWORD, code_of(app, registered), client(0))
    clock.advance(61)
    await ask(app, registered, 1, purpose="reset")  # texted
    await ask(app, "+8613800000002", 2, purpose="reset")  # no account: a skipped row, answered alike
    statuses = app.services.db.run_sync(lambda s: sorted(s.scalars(select(SmsOutbox.status)).all()))
    assert statuses == ["pending", "pending", "skipped"]
    with pytest.raises(SmsBudgetSpent):
        await ask(app, "+8613800000003", 3, purpose="reset")
    # Both counted in the breaker too: 3 texts, 1 used (the registration).
    assert max(counter(app, "sms:prefix:86138:sent").values()) == 3
    assert max(counter(app, "sms:prefix:86138:used").values()) == 1


@pytest.mark.settings(sms_daily_budget=1, sms_test_numbers="+8618800000000:123456", sms_ip_hourly=1000)
@gen_test
async def test_test_numbers_count_nowhere(app, clock):
    for _ in range(3):
        await ask(app, "+8618800000000")
        clock.advance(61)
    await app.services.accounts.register("+8618800000000", PASSWORD, "123456", client(0))
    assert counter(app, "sms:budget") == {} and counter(app, "sms:prefix:86188:used") == {}
    await ask(app, "+8613800000001")  # the budget is whole
    with pytest.raises(SmsBudgetSpent):
        await ask(app, "+8613800000002")


@pytest.mark.settings(sms_daily_budget=2, sms_ip_hourly=1000)
@gen_test
async def test_a_spent_budget_is_counted_each_time_and_logged_once_a_day(app, clock, caplog):
    to_window_start(clock, 86400, into=60)
    for i, phone in enumerate(pumped(2)):
        await ask(app, phone, i)
    with caplog.at_level(logging.ERROR, logger="demo.sms.costguard"):
        for i, phone in enumerate(pumped(5)[2:]):
            with pytest.raises(SmsBudgetSpent):
                await ask(app, phone, i)
    assert len(caplog.records) == 1
    assert re.fullmatch(
        r"SMS daily budget spent \(2 texts\): code requests are refused for 8634[01] s, until midnight UTC",
        caplog.records[0].getMessage(),
    )
    assert app.services.metrics.sms_budget_exhausted._value.get() == 3


# -- the breaker ---------------------------------------------------------------------------------------


async def trip(app, clock, prefix: str = "86138") -> list[str]:
    """Pump ``prefix``: 20 texts nobody uses, judged once they are no longer young, then the request
    that trips the breaker (accepted: the first of the hourly allowance). The numbers texted."""
    to_window_start(clock, SPAN)
    phones = pumped(24, prefix)
    for i, phone in enumerate(phones[:20]):
        await ask(app, phone, i)
    clock.advance(2 * RECENT + 1)
    await ask(app, phones[20], 20)
    return phones


@pytest.mark.settings(sms_ip_hourly=1000)
@gen_test
async def test_a_pumped_prefix_trips_and_gets_its_hourly_allowance_under_parallel_requests(app, clock, caplog):
    with caplog.at_level(logging.WARNING, logger="demo.sms.costguard"):
        phones = await trip(app, clock)
        # Two texts of the allowance left: of 8 parallel requests, 2 go out, the others are refused.
        results = await asyncio.gather(
            *[ask(app, f"+86138{900 + i:08d}", 100 + i) for i in range(8)], return_exceptions=True
        )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 6 and all(isinstance(r, PrefixThrottled) for r in refused), refused
    assert all(0 < r.retry_after <= 3600 and r.code == "rate_limited" for r in refused)
    assert max(counter(app, "sms:prefix:86138:throttle").values()) == 3
    texts = app.services.db.run_sync(
        lambda s: len(s.scalars(select(SmsCode).where(SmsCode.phone.like("+86138%"))).all())
    )
    assert texts == 23  # 20 pumped, 3 allowed; refused requests stored nothing
    # One line when it tripped (this process logs it once), none per refusal.
    assert [r.getMessage() for r in caplog.records] == [
        "SMS breaker: prefix +86138 (CN) tripped (21 texts, 0 codes used in the last 30-60 min): "
        "throttled to 3 texts an hour until its codes are used"
    ]
    assert app.services.metrics.sms_breaker_refused.labels("CN")._value.get() == 6
    # Another prefix of the same country is not throttled.
    await ask(app, "+8613900000001", 200)
    assert phones


@pytest.mark.settings(sms_ip_hourly=1000, sms_breaker_hourly=0)
@gen_test
async def test_a_blocked_prefix_reopens_once_its_pumped_hour_has_passed(app, clock, caplog):
    to_window_start(clock, SPAN)
    for i, phone in enumerate(pumped(20)):
        await ask(app, phone, i)
    clock.advance(2 * RECENT + 1)
    with caplog.at_level(logging.WARNING, logger="demo.sms.costguard"):
        for i in range(3):
            with pytest.raises(PrefixThrottled):
                await ask(app, f"+86138{500 + i:08d}", 50 + i)
        clock.advance(2 * SPAN)  # the pumped texts are out of the breaker's window
        await ask(app, "+8613800000600", 60)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "tripped" in messages[0] and "recovered" in messages[1], messages


@pytest.mark.settings(sms_ip_hourly=1000, sms_code_ttl=3600)
@gen_test
async def test_a_tripped_prefix_recovers_once_its_codes_are_used(app, clock, caplog):
    phones = await trip(app, clock)
    # A pumper's throttled texts keep it closed...
    for i in range(2):
        await ask(app, phones[21 + i], 21 + i)
    with pytest.raises(RateLimited):
        await ask(app, phones[23], 23)
    # ... and real people using their codes reopen it: 5 of 20 judged texts used is 25%.
    for i, phone in enumerate(phones[:5]):
        await app.services.accounts.register(phone, PASSWORD, code_of(app, phone), client(i))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="demo.sms.costguard"):
        clock.advance(2 * RECENT + 1)  # the throttled texts are judged too: 5 used of 23
        await ask(app, phones[23], 23)
        await ask(app, "+8613800000700", 70)  # no allowance any more
    assert [r.getMessage() for r in caplog.records] == [
        "SMS breaker: prefix +86138 (CN) recovered: 24 texts, 5 codes used in the last 30-60 min"
    ]
    assert counter(app, "sms:prefix:86138:tripped") == {}  # the mark is dropped


@pytest.mark.settings(sms_ip_hourly=1000, sms_phone_daily=100, sms_resend_after=0)
@gen_test
async def test_a_healthy_burst_does_not_trip(app, clock):
    """A marketing push: people ask for codes in waves within two minutes, three in four use theirs as
    they come; the burst flows on as its codes are used, and nothing trips once its texts are judged."""
    to_window_start(clock, SPAN)
    phones, used = pumped(110), 0
    for wave in (phones[:20], phones[20:50], phones[50:90]):  # each wave within the young texts' cap
        await asyncio.gather(*[ask(app, phone, int(phone[-3:])) for phone in wave])
        clock.advance(10)
        for phone in wave[: len(wave) * 3 // 4]:
            await app.services.accounts.register(phone, PASSWORD, code_of(app, phone), client(int(phone[-3:])))
            used += 1
    assert used == 15 + 22 + 30
    clock.advance(2 * RECENT + 1)
    # The push goes on: every text is judged now, 3 in 4 used.
    await asyncio.gather(*[ask(app, phone, int(phone[-3:])) for phone in phones[90:]])
    assert counter(app, "sms:prefix:86138:tripped") == {} and counter(app, "sms:prefix:86138:throttle") == {}


@pytest.mark.settings(sms_ip_hourly=1000)
@gen_test
async def test_a_burst_past_the_young_texts_cap_is_refused_under_parallel_requests(app, clock):
    to_window_start(clock, SPAN)
    results = await asyncio.gather(*[ask(app, phone, i) for i, phone in enumerate(pumped(30))], return_exceptions=True)
    refused = [r for r in results if isinstance(r, BaseException)]
    # No code used yet: max(min_sent 20, 3 * 0 + 10) young texts at once.
    assert len(refused) == 10 and all(isinstance(r, PrefixThrottled) and r.burst for r in refused), refused
    assert all(r.code == "rate_limited" and 0 < r.retry_after <= RECENT for r in refused)
    assert max(counter(app, "sms:prefix:86138:recent").values()) == 20  # refused requests counted nowhere
    # Not a trip: no mark, no allowance; another prefix is not held back.
    assert counter(app, "sms:prefix:86138:tripped") == {} and counter(app, "sms:prefix:86138:throttle") == {}
    await ask(app, "+8613900000001", 99)
    assert app.services.metrics.sms_breaker_refused.labels("CN")._value.get() == 10
    # Codes used raise the cap at once: 4 used make it 22.
    sent = [r for r in pumped(30) if code_of(app, r)]
    for i, phone in enumerate(sent[:4]):
        await app.services.accounts.register(phone, PASSWORD, code_of(app, phone), client(i))
    more = [ask(app, f"+86138{500 + i:08d}", 50 + i) for i in range(4)]
    results = await asyncio.gather(*more, return_exceptions=True)
    assert sum(isinstance(r, PrefixThrottled) for r in results) == 2
    # Once the oldest young texts are judged, the prefix takes texts again.
    clock.advance(2 * RECENT + 1)
    await ask(app, "+8613800000600", 60)


@gen_test(timeout=180)
async def test_one_client_an_hour_asking_reset_codes_for_unregistered_numbers_does_not_trip_a_prefix(app, clock):
    """The review's probe: each hour a fresh client asks the most it may (sms_ip_hourly, 20) reset codes
    for numbers without an account (skipped rows: no text, no cost), while real users of the prefix
    ask for a code every ten minutes or so and use it. One network: nothing trips, nobody is refused."""
    to_window_start(clock, HOUR)
    served, n = 0, 0
    for hour in range(4):
        for _ in range(20):
            n += 1
            await ask(app, f"+86138{n:08d}", 1 + hour, purpose="reset")
        for minute in (6, 15, 25, 35, 45, 55):
            clock.advance(60 * minute - clock.timestamp() % HOUR)
            n += 1
            phone = f"+86138{n:08d}"
            await ask(app, phone, 100 + hour)
            await app.services.accounts.register(phone, PASSWORD, code_of(app, phone), client(100 + hour))
            served += 1
        to_window_start(clock, HOUR)
    assert served == 24
    skipped = app.services.db.run_sync(
        lambda s: s.scalars(select(SmsOutbox.status).where(SmsOutbox.purpose == "reset")).all()
    )
    assert set(skipped) == {"skipped"} and len(skipped) == 80  # they still counted, as texts do
    assert counter(app, "sms:prefix:86138:tripped") == {} and counter(app, "sms:prefix:86138:throttle") == {}


@pytest.mark.settings(sms_ip_hourly=1000)
@gen_test
async def test_unused_texts_from_two_networks_do_not_trip_a_prefix_and_from_a_third_they_do(app, clock, caplog):
    to_window_start(clock, SPAN)
    phones = pumped(25)
    # 19 from two /24s: many addresses in each, still two networks.
    for i, phone in enumerate(phones[:19]):
        await app.services.accounts.request_code(phone, "reset", f"203.0.{113 + i % 2}.{i + 1}")
    # A real user of a third network who uses the code is not a network with unused texts.
    await app.services.accounts.request_code(phones[20], "regist", "192.0.2.1")
    await app.services.accounts.register(phones[20], PASSWORD, code_of(app, phones[20]), "192.0.2.99")
    clock.advance(2 * RECENT + 1)
    with caplog.at_level(logging.WARNING, logger="demo.sms.costguard"):
        await app.services.accounts.request_code(phones[21], "reset", "203.0.113.200")
        assert counter(app, "sms:prefix:86138:tripped") == {} and caplog.records == []
        # An unused text from a third network: 3 networks, 1 of 20 judged texts used: it trips.
        await app.services.accounts.request_code(phones[22], "reset", "2001:db8:1:2::1")
    assert max(counter(app, "sms:prefix:86138:nets").values()) == 3
    assert counter(app, "sms:prefix:86138:tripped") != {}
    assert [r.getMessage() for r in caplog.records] == [
        "SMS breaker: prefix +86138 (CN) tripped (22 texts, 1 codes used in the last 30-60 min): "
        "throttled to 3 texts an hour until its codes are used"
    ]


@pytest.mark.settings(sms_ip_hourly=1000, sms_countries="CN,US", sms_daily_budget=100)
@gen_test
async def test_the_snapshot_shows_each_country_and_the_throttled_prefixes(app, clock):
    await trip(app, clock)
    for i, phone in enumerate(["+12015550123", "+12015550124"]):
        await ask(app, phone, 30 + i)
    await app.services.accounts.register("+12015550123", PASSWORD, code_of(app, "+12015550123"), client(0))
    state = await app.services.cost_guard.snapshot(clock.now())
    assert state is not None and (state.budget, state.spent) == (100, 23)
    assert state.countries() == {
        "CN": {"sent": 21, "used": 0, "throttled": 1},
        "US": {"sent": 2, "used": 1, "throttled": 0},
    }
    cn = next(p for p in state.prefixes if p.prefix == "86138")
    assert (cn.country, cn.throttled, cn.throttle_used, cn.conversion) == ("CN", True, 1, 0.0)


# -- settings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("sms_breaker_prefix", 2, "--sms_breaker_prefix=2: must be from 3 to 15"),
        ("sms_breaker_conversion", 1.5, "--sms_breaker_conversion=1.5: must be from 0 to 1"),
        ("sms_breaker_min_sent", 0, "--sms_breaker_min_sent=0: must be at least 1"),
        ("sms_daily_budget", -1, "--sms_daily_budget=-1: must be at least 0"),
    ],
)
def test_bad_cost_guard_settings_are_refused(name, value, says):
    with pytest.raises(ConfigError) as refused:
        check_values(config.defaults(cookie_secret="x" * 40, **{name: value}))
    assert str(refused.value) == says


def test_no_budget_is_allowed_with_a_warning_outside_debug_mode(caplog, tmp_path):
    from demo.common.services import build_services

    for debug in (False, True):
        caplog.clear()
        settings = config.defaults(
            cookie_secret="x" * 40,
            sms_daily_budget=0,
            debug=debug,
            database_url=f"sqlite:///{tmp_path}/d.sqlite3",
            media_root=str(tmp_path / "media"),
        )
        with caplog.at_level(logging.WARNING, logger="demo"):
            services = build_services(settings)
        services.close()
        warned = [r.getMessage() for r in caplog.records if "sms_daily_budget" in r.getMessage()]
        assert warned == (
            [] if debug else ["sms_daily_budget is 0: nothing bounds what a day's texts may cost (set a budget)"]
        )


def test_the_defaults_are_a_budget_and_a_breaker():
    rules = CostRules.from_settings(config.defaults())
    assert (rules.daily_budget, rules.prefix_digits, rules.min_sent, rules.conversion, rules.throttled_hourly) == (
        1000,
        5,
        20,
        0.2,
        3,
    )
    assert costguard.rate(0, 0) is None and costguard.rate(3, 1) == 0.3333


# -- the budget raised for the day, and the order the unit takes its rows in -----------------------------


@pytest.mark.settings(sms_daily_budget=2, sms_ip_hourly=1000)
@gen_test
async def test_a_budget_raised_for_the_day_lets_that_many_more_through_in_every_process(
    app, build_app, settings, clock
):
    other = build_app(settings)
    to_window_start(clock, 86400, into=60)
    for i, phone in enumerate(pumped(2)):
        await ask(app, phone, i)
    with pytest.raises(SmsBudgetSpent):
        await ask(app, "+8613900000001", 10)
    added = await app.services.db.run(queries.add_to_budget, costguard.extra_params(clock.now()), 3)
    assert added == 3
    results = await asyncio.gather(
        *[
            [app, other][i % 2].services.accounts.request_code(f"+86139{i:08d}", "regist", client(20 + i))
            for i in range(6)
        ],
        return_exceptions=True,
    )
    assert sum(isinstance(r, SmsBudgetSpent) for r in results) == 3  # 2 + 3 in all, whatever the process
    state = await other.services.cost_guard.snapshot(clock.now())
    assert state is not None and (state.budget, state.extra, state.spent) == (5, 3, 5)
    # The next day is sms_daily_budget's again.
    clock.advance(86400)
    await ask(app, "+8613700000001", 40)
    await ask(app, "+8613700000002", 41)
    with pytest.raises(SmsBudgetSpent):
        await ask(app, "+8613700000003", 42)


def locked_keys(monkeypatch) -> list[str]:
    """The keys of the counter rows each statement writes (and so locks), in the order written."""
    written: list[str] = []
    run = SqlCursor.run

    def record(cursor, sql, params):
        text = sql.for_dialect(cursor.dialect)
        if "rate_counters" in text and not text.lstrip().upper().startswith("SELECT"):
            written.extend(str(params[f"key{i}"]) for i in sorted({int(i) for i in re.findall(r"\bkey(\d+)\b", text)}))
        return run(cursor, sql, params)

    monkeypatch.setattr(SqlCursor, "run", record)
    return written


def family(key: str) -> str:
    if key.startswith("sms:prefix:"):
        return "sms:prefix:*:" + key.rsplit(":", 1)[1]
    return key if key.startswith("sms:budget") else key.rsplit(":", 1)[0]


@pytest.mark.settings(sms_daily_budget=100, sms_ip_hourly=1000, sms_breaker_hourly=5)
@gen_test
async def test_every_unit_takes_the_codes_then_the_prefix_counters_then_the_budget(app, clock, monkeypatch):
    phones = await trip(app, clock)  # throttled: the unit takes the mark and the allowance too
    written = locked_keys(monkeypatch)
    await ask(app, phones[21], 21)
    assert [family(k) for k in dict.fromkeys(written)] == [
        "sms:phone",
        "sms:ip",
        "sms:pnet:86138",
        "sms:prefix:*:recent",
        "sms:prefix:*:sent",
        "sms:prefix:*:nets",
        "sms:prefix:*:tripped",
        "sms:prefix:*:throttle",
        "sms:budget",  # last: every request's row is held for one statement and the commit
    ]
    written.clear()
    await app.services.accounts.register(phones[21], PASSWORD, code_of(app, phones[21]), client(21))
    spent = [family(k) for k in dict.fromkeys(written)]
    # Then the users row; the network's rows come before the prefix's, as in a code request.
    assert spent[:4] == ["code:ip", "sms:pnet:86138", "sms:prefix:*:nets", "sms:prefix:*:used"], spent
