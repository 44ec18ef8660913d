"""The SMS cost guard: a daily budget for the whole deployment, and a conversion breaker per number prefix.

Texts cost money, and a code request is anonymous: both limits are counted in the unit of work that
issues the code (``accounts.queries.issue_code``, through ``sms.queries.guard_send``), so a refused
request stores nothing and the limits hold across processes and hosts (the counters are rows of
``rate_counters``: their upserts serialise the requests that share them). Every code request counts,
a text or a row written as skipped alike (a reset code for a number without an account): the answer
and its cost must not tell whether a number is registered. Test numbers (``sms_test_numbers``) are
never texted and count nowhere.

Budget: ``sms_daily_budget`` requests per UTC day (key ``sms:budget``, one window a day). Past it
``/users/code`` fails closed: 503 ``unavailable`` with Retry-After = the seconds to midnight UTC.

Breaker: SMS pumping (a fraudster has texts sent to numbers whose termination fees they share) shows
as codes sent and never used. Per prefix (the first ``sms_breaker_prefix`` digits of the E.164
number: the calling code and a range of its numbers), codes sent and codes used are counted in
half-hour windows, each event in its window and the next, so the window read now holds the last 30
to 60 minutes. Texts of the last 2 to 4 minutes (``RECENT``-second windows, counted the same way)
are not judged yet: a burst of real users (a marketing push) uses its codes a minute or two after
asking, and must not trip the breaker while its codes are in flight. A prefix with at least
``sms_breaker_min_sent`` judged texts whose conversion (used / judged) is below
``sms_breaker_conversion`` trips: it is marked, and gets ``sms_breaker_hourly`` texts an hour (429
``rate_limited`` beyond). While marked it stays throttled as long as its judged texts go unused, even
below ``min_sent`` (a pumper's few throttled texts keep it closed); it recovers, and the mark is
dropped, once its conversion is back above the threshold or its last hour holds nothing to judge.
``used`` rises only when a code is spent (``claim_code``, a login with a code), and a code is spent
only by whoever received its text: nobody raises a prefix's conversion without phones in it, and a
real phone gets ``sms_phone_daily`` codes a day at most.

Metrics: ``demo_sms_budget_exhausted`` and ``demo_sms_breaker_refused`` count refusals per process
(Prometheus adds them up); the state shared by the deployment (today's spend, the last hour per
country, the throttled prefixes) is read from the database at scrape (``CostGuard.refresh_metrics``,
cached ``SNAPSHOT_TTL`` seconds), so every process shows the same values. Logs: one line per process
when the budget runs out (and once more per day it stays out), when a prefix trips and when it
recovers.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from demo.common.errors import PrefixThrottled, SmsBudgetSpent
from demo.common.infra import ratelimit
from demo.common.infra.ratelimit import Window
from demo.common.sms import queries
from demo.common.sms.countries import calling_code, country

if TYPE_CHECKING:
    from demo.common.infra.db import Database, Row
    from demo.common.infra.metrics import Metrics
    from demo.conf.settings import Settings

log = logging.getLogger("demo.sms.costguard")

DAY, HOUR = 86400, 3600
SPAN = 1800  # the breaker's windows: each event counts in its window and the next (the last 30-60 min)
RECENT = 120  # texts younger than this (2-4 min, counted the same way) are not judged yet
SNAPSHOT_TTL = 5.0  # seconds a process keeps the database's view for /metrics
FORGET_AFTER = 10_000  # prefixes a process remembers as tripped (for its log lines) before starting over

BUDGET_KEY = "sms:budget"
PREFIX_KEYS = "sms:prefix:"
SENT, USED, YOUNG, TRIPPED, THROTTLE = "sent", "used", "recent", "tripped", "throttle"


def prefix_key(prefix: str, kind: str) -> str:
    return f"{PREFIX_KEYS}{prefix}:{kind}"


@dataclass(frozen=True, kw_only=True)
class CostRules:
    """The settings the cost guard reads (defaults and meaning: demo/conf/settings.py)."""

    daily_budget: int  # 0: none
    prefix_digits: int
    min_sent: int
    conversion: float  # 0: the breaker is off
    throttled_hourly: int
    exempt: frozenset[str] = frozenset()  # the test numbers

    @classmethod
    def from_settings(cls, settings: Settings, exempt: Iterable[str] = ()) -> CostRules:
        return cls(
            daily_budget=settings.sms_daily_budget,
            prefix_digits=settings.sms_breaker_prefix,
            min_sent=settings.sms_breaker_min_sent,
            conversion=settings.sms_breaker_conversion,
            throttled_hourly=settings.sms_breaker_hourly,
            exempt=frozenset(exempt),
        )

    def prefix(self, phone: str) -> str:
        """The breaker's prefix of an E.164 number: its first digits after '+'."""
        return phone.lstrip("+")[: self.prefix_digits]

    def throttled(self, sent: int, recent: int, used: int, marked: bool) -> bool:
        """Whether a prefix is throttled, from its counts over the last 30-60 minutes: ``sent`` texts
        (``recent`` of them too young to judge), ``used`` codes, ``marked``: it tripped and has not
        recovered since."""
        if self.conversion <= 0:
            return False
        judged = max(0, sent - recent)
        poor = used < self.conversion * judged
        return poor and (judged >= self.min_sent or (marked and judged > 0))

    def send_guard(self, phone: str) -> SendGuard | None:
        """What a code request to ``phone`` counts (None: nothing, a test number)."""
        if phone in self.exempt or (not self.daily_budget and self.conversion <= 0):
            return None
        return SendGuard(self, self.prefix(phone))

    def use_guard(self, phone: str) -> UseGuard | None:
        """What spending a code of ``phone`` counts (None: nothing)."""
        if phone in self.exempt or self.conversion <= 0:
            return None
        return UseGuard(Window(prefix_key(self.prefix(phone), USED), 0, SPAN))


@dataclass(frozen=True)
class Verdict:
    """The breaker's view of a prefix after a code request counted in it."""

    prefix: str
    sent: int
    used: int
    throttled: bool
    tripped: bool  # it was not marked before this request
    recovered: bool  # it was marked, and is no more


@dataclass(frozen=True)
class SendGuard:
    """The counters of one code request (``sms.queries.guard_send`` counts them in its unit of work)."""

    rules: CostRules
    prefix: str

    @property
    def budget(self) -> Window | None:
        return Window(BUDGET_KEY, self.rules.daily_budget, DAY) if self.rules.daily_budget else None

    @property
    def judging(self) -> bool:
        return self.rules.conversion > 0

    def counted(self, now: dt.datetime) -> dict[str, Any]:
        """``window_params`` of the request's breaker counters: 0-3 counted (young texts, now and next;
        sent, now and next: in key order), 4 and 5 only read (used, the trip mark)."""
        young, sent = self._window(YOUNG, RECENT), self._window(SENT, SPAN)
        return {
            **ratelimit.window_params([young], now),
            **ratelimit.window_params([young], now + dt.timedelta(seconds=RECENT), 1),
            **ratelimit.window_params([sent], now, 2),
            **ratelimit.window_params([sent], now + dt.timedelta(seconds=SPAN), 3),
            **ratelimit.window_params([self._window(USED, SPAN)], now, 4),
            **ratelimit.window_params([self.mark], now, 5),
        }

    @property
    def mark(self) -> Window:
        return self._window(TRIPPED, SPAN)

    def mark_params(self, now: dt.datetime) -> dict[str, Any]:
        """The trip mark, now and in the next window: it outlives the last throttled text by 30-60 min."""
        later = now + dt.timedelta(seconds=SPAN)
        return {**ratelimit.window_params([self.mark], now), **ratelimit.window_params([self.mark], later, 1)}

    @property
    def throttle(self) -> Window:
        return self._window(THROTTLE, HOUR, self.rules.throttled_hourly)

    def judge(self, counts: Row) -> Verdict:
        """The verdict on the counts ``guard_send`` read (this request included)."""
        sent, recent, used = int(counts.sent or 0), int(counts.recent or 0), int(counts.used or 0)
        marked = bool(counts.tripped)
        throttled = self.rules.throttled(sent, recent, used, marked)
        return Verdict(self.prefix, sent, used, throttled, throttled and not marked, marked and not throttled)

    def _window(self, kind: str, seconds: int, limit: int = 0) -> Window:
        return Window(prefix_key(self.prefix, kind), limit, seconds)


@dataclass(frozen=True)
class UseGuard:
    """The counter a spent code adds to: its prefix's ``used``, now and in the next window."""

    used: Window

    def params(self, now: dt.datetime) -> dict[str, Any]:
        later = now + dt.timedelta(seconds=SPAN)
        return {**ratelimit.window_params([self.used], now), **ratelimit.window_params([self.used], later, 1)}


# -- what the operator sees (the CLI and /metrics) ------------------------------------------------------


@dataclass(frozen=True)
class PrefixState:
    prefix: str
    country: str
    sent: int  # over the last 30-60 minutes
    used: int
    recent: int  # of ``sent``, too young to judge
    throttled: bool
    throttle_used: int  # texts sent this hour while throttled

    @property
    def conversion(self) -> float | None:
        return rate(self.sent, self.used)


@dataclass(frozen=True)
class Snapshot:
    """The cost guard's shared state at ``at``: today's budget and the breaker's prefixes."""

    at: dt.datetime
    budget: int  # 0: none
    spent: int  # today (UTC)
    resets_in: int  # seconds to midnight UTC
    prefixes: list[PrefixState]

    def countries(self) -> dict[str, dict[str, int]]:
        """Per country: sent, used (last 30-60 min) and throttled prefixes."""
        found: dict[str, dict[str, int]] = {}
        for p in self.prefixes:
            totals = found.setdefault(p.country, {"sent": 0, "used": 0, "throttled": 0})
            totals["sent"] += p.sent
            totals["used"] += p.used
            totals["throttled"] += int(p.throttled)
        return found


def rate(sent: int, used: int) -> float | None:
    return round(min(used, sent) / sent, 4) if sent else None


def snapshot(rules: CostRules, rows: list[Row], now: dt.datetime) -> Snapshot:
    """The state of ``sms.queries.cost_counters(now)``'s rows."""
    starts = {
        SENT: Window("", 0, SPAN).start(now),
        USED: Window("", 0, SPAN).start(now),
        TRIPPED: Window("", 0, SPAN).start(now),
        YOUNG: Window("", 0, RECENT).start(now),
        THROTTLE: Window("", 0, HOUR).start(now),
    }
    day = Window(BUDGET_KEY, rules.daily_budget, DAY)
    spent, counts = 0, dict[str, dict[str, int]]()
    for row in rows:
        if row.key == BUDGET_KEY:
            spent += int(row.n) if int(row.window_start) == day.start(now) else 0
            continue
        prefix, _, kind = row.key.removeprefix(PREFIX_KEYS).rpartition(":")
        if starts.get(kind) == int(row.window_start):
            counts.setdefault(prefix, {})[kind] = int(row.n)
    prefixes = []
    for prefix, c in sorted(counts.items()):
        sent, recent, used = c.get(SENT, 0), c.get(YOUNG, 0), c.get(USED, 0)
        if not (sent or used):
            continue
        throttled = rules.throttled(sent, recent, used, bool(c.get(TRIPPED)))
        where = country(calling_code(f"+{prefix}"))
        prefixes.append(PrefixState(prefix, where, sent, used, recent, throttled, c.get(THROTTLE, 0)))
    return Snapshot(now, rules.daily_budget, spent, day.retry_after(now), prefixes)


def counter_params(now: dt.datetime) -> dict[str, Any]:
    """The parameters of ``sms.queries.cost_counters``: today's budget row, and the prefixes' windows
    read at ``now``."""
    return {
        "budget_key": BUDGET_KEY,
        "day": Window("", 0, DAY).start(now),
        "prefixes": PREFIX_KEYS + "%",
        "span": Window("", 0, SPAN).start(now),
        "recent": Window("", 0, RECENT).start(now),
        "hour": Window("", 0, HOUR).start(now),
    }


class CostGuard:
    """One process's side of the cost guard: the guards of its requests, its metrics and log lines."""

    def __init__(self, rules: CostRules | None, db: Database | None = None, metrics: Metrics | None = None) -> None:
        self.rules = rules
        self.db = db
        self.metrics = metrics
        self._spent_logged: dt.date | None = None  # the day this process last logged the budget out
        self._tripped: set[str] = set()  # prefixes this process logged as tripped
        self._snapshot: tuple[float, Snapshot | None] = (-SNAPSHOT_TTL, None)
        self._refreshing = asyncio.Lock()

    def send_guard(self, phone: str) -> SendGuard | None:
        return self.rules.send_guard(phone) if self.rules else None

    def use_guard(self, phone: str) -> UseGuard | None:
        return self.rules.use_guard(phone) if self.rules else None

    async def checked(self, work: Awaitable[Verdict | None], now: dt.datetime) -> None:
        """Await the unit of work that issues a code, with the refusals and verdict it brings counted
        and logged."""
        try:
            verdict = await work
        except SmsBudgetSpent as spent:
            if self.metrics:
                self.metrics.sms_budget_exhausted.inc()
            if self._spent_logged != now.date():
                self._spent_logged = now.date()
                log.error(
                    "SMS daily budget spent (%d texts): code requests are refused for %d s, until midnight UTC",
                    self.rules.daily_budget if self.rules else 0,
                    spent.retry_after,
                )
            raise
        except PrefixThrottled as throttled:
            if self.metrics:
                self.metrics.sms_breaker_refused.labels(_country(throttled.prefix)).inc()
            self._trip(throttled.prefix, "texts past its hourly allowance refused")
            raise
        if verdict is None:
            return
        if verdict.tripped:
            self._trip(verdict.prefix, f"{verdict.sent} texts, {verdict.used} codes used in the last 30-60 min")
        elif verdict.recovered or (not verdict.throttled and verdict.prefix in self._tripped):
            self._tripped.discard(verdict.prefix)
            log.warning(
                "SMS breaker: prefix +%s (%s) recovered: %d texts, %d codes used in the last 30-60 min",
                verdict.prefix,
                _country(verdict.prefix),
                verdict.sent,
                verdict.used,
            )

    def _trip(self, prefix: str, why: str) -> None:
        if prefix in self._tripped:
            return
        if len(self._tripped) >= FORGET_AFTER:
            self._tripped.clear()
        self._tripped.add(prefix)
        hourly = self.rules.throttled_hourly if self.rules else 0
        log.error(
            "SMS breaker: prefix +%s (%s) tripped (%s): throttled to %d texts an hour until its codes are used",
            prefix,
            _country(prefix),
            why,
            hourly,
        )

    async def snapshot(self, now: dt.datetime) -> Snapshot | None:
        """The shared state, read at most every ``SNAPSHOT_TTL`` seconds (None: no rules or database)."""
        if self.rules is None or self.db is None:
            return None
        async with self._refreshing:  # scrapes at once share one read
            read_at, known = self._snapshot
            if known is None or time.monotonic() - read_at >= SNAPSHOT_TTL:
                rows = await self.db.run(queries.cost_counters, counter_params(now))
                self._snapshot = (time.monotonic(), snapshot(self.rules, rows, now))
            return self._snapshot[1]

    async def refresh_metrics(self, now: dt.datetime) -> None:
        """Put the shared state into the metrics' database-backed gauges; on a database error they are
        left out of the scrape (a stale value would be a lie; the other metrics still show)."""
        if self.metrics is None:
            return
        try:
            state = await self.snapshot(now)
        except Exception as error:  # noqa: BLE001 - /metrics must answer whatever the database does
            log.warning("SMS cost guard metrics left out of this scrape: %s", error or type(error).__name__)
            state = None
        self.metrics.shared.show(families(state) if state is not None else [])


def families(state: Snapshot) -> list[Metric]:
    """The shared state as metric families (the same in every process: read from the database)."""
    budget = GaugeMetricFamily("demo_sms_budget_texts", "The daily SMS budget (sms_daily_budget; 0: none)")
    budget.add_metric([], state.budget)
    spent = GaugeMetricFamily("demo_sms_budget_spent", "Code requests counted against today's SMS budget (UTC)")
    spent.add_metric([], state.spent)
    per_country = {
        name: GaugeMetricFamily(f"demo_sms_recent_{name}", help, labels=["country"])
        for name, help in (
            ("sent", "Code requests over the breaker's window (the last 30 to 60 minutes), per country"),
            ("used", "Codes used over the breaker's window (the last 30 to 60 minutes), per country"),
            ("conversion", "Codes used / code requests over the breaker's window, per country"),
        )
    }
    throttled = GaugeMetricFamily(
        "demo_sms_breaker_throttled", "Number prefixes the conversion breaker throttles now", labels=["country"]
    )
    for where, totals in sorted(state.countries().items()):
        per_country["sent"].add_metric([where], totals["sent"])
        per_country["used"].add_metric([where], totals["used"])
        conversion = rate(totals["sent"], totals["used"])
        if conversion is not None:
            per_country["conversion"].add_metric([where], conversion)
        throttled.add_metric([where], totals["throttled"])
    return [budget, spent, *per_country.values(), throttled]


def _country(prefix: str) -> str:
    return country(calling_code(f"+{prefix}"))
