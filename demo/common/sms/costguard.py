"""The SMS cost guard: a daily budget for the whole deployment, and a conversion breaker per number prefix.

Texts cost money, and a code request is anonymous: both limits are counted in the unit of work that
issues the code (``accounts.queries.issue_code``, through ``sms.queries.guard_send``), so a refused
request stores nothing and the limits hold across processes and hosts (the counters are rows of
``rate_counters``: their upserts serialise the requests that share them). Every code request counts,
a text or a row written as skipped alike (a reset code for a number without an account): the answer
and its cost must not tell whether a number is registered. Test numbers (``sms_test_numbers``) are
never texted and count nowhere.

Budget: ``sms_daily_budget`` requests per UTC day (key ``sms:budget``, one window a day), raised for
the day by what ``sms budget --add`` put in ``sms:budget:extra`` (read by every request: no restart).
Past it ``/users/code`` fails closed: 503 ``unavailable`` with Retry-After = the seconds to midnight
UTC. Its row is every request's, so the unit hits it last: its lock is held for one statement and the
commit, not while the breaker's statements run.

Breaker: SMS pumping (a fraudster has texts sent to numbers whose termination fees they share) shows
as codes sent and never used. Per prefix (the first ``sms_breaker_prefix`` digits of the E.164
number: the calling code and a range of its numbers), codes sent and codes used are counted in
half-hour windows, each event in its window and the next, so the window read now holds the last 30
to 60 minutes. Texts of the last 2 to 4 minutes (``RECENT``-second windows, counted the same way)
are not judged yet: a burst of real users (a marketing push) uses its codes a minute or two after
asking, and must not trip the breaker while its codes are in flight. A prefix with at least
``sms_breaker_min_sent`` judged texts whose conversion (used / judged) is below
``sms_breaker_conversion`` trips, if its unused texts came from ``sms_breaker_min_networks`` client
networks (``network_of``: a /24, a /48): it is marked, and gets ``sms_breaker_hourly`` texts an hour
(429 ``rate_limited`` beyond). One network never trips it: it is bounded by ``sms_ip_hourly``
anyway, and its requests for numbers without an account (skipped rows, counted like texts so that the
answers tell nothing) cost nothing; they must not close the prefix to its real users. A network's
unused texts in a prefix are counted per window (``sms:pnet:<prefix>:<network>``); its first makes
one network more in ``sms:prefix:<prefix>:nets``, and a code spent from that network takes one back
(the last, the network too). Texts too young to judge are capped per prefix at ``young_cap`` (from
the codes it used): a burst nobody uses cannot put the day's budget into one prefix before it is
judged, and a burst whose codes are used flows on as they are. While marked it stays throttled as
long as its judged texts go unused, even below ``min_sent`` (a pumper's few throttled texts keep it
closed); it recovers, and the mark is dropped, once its conversion is back above the threshold, its
last hour holds nothing to judge, or its unused texts come from fewer networks.
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
import dataclasses
import datetime as dt
import ipaddress
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
EXTRA_KEY = "sms:budget:extra"  # what ``sms budget --add`` raised today's budget by
PREFIX_KEYS = "sms:prefix:"
# A prefix's unused texts per client network: outside PREFIX_KEYS, so the snapshot never reads them.
NETWORK_KEYS = "sms:pnet:"
SENT, USED, YOUNG, TRIPPED, THROTTLE, NETS = "sent", "used", "recent", "tripped", "throttle", "nets"
IPV4_NETWORK, IPV6_NETWORK = 24, 48


def prefix_key(prefix: str, kind: str) -> str:
    return f"{PREFIX_KEYS}{prefix}:{kind}"


def network_key(prefix: str, network: str) -> str:
    return f"{NETWORK_KEYS}{prefix}:{network}"


def extra_params(now: dt.datetime) -> dict[str, Any]:
    """``window_params`` of what ``sms budget --add`` added to the budget of ``now``'s day."""
    return ratelimit.window_params([Window(EXTRA_KEY, 0, DAY)], now)


def prefix_families(prefix: str) -> list[str]:
    """The counter keys ``sms breaker --reset`` drops (with the keys under them)."""
    return [f"{PREFIX_KEYS}{prefix}", f"{NETWORK_KEYS}{prefix}"]


def network_of(address: str) -> str:
    """The client network the breaker counts ``address`` in: its IPv4 /24 or IPv6 /48 (an IPv4-mapped
    address as IPv4), wider than ``ratelimit.client_key``'s address or /64, so that one small block
    of addresses cannot pass for several networks."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # not an IP (a unix socket peer): it is the only name there is
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    bits = IPV4_NETWORK if isinstance(ip, ipaddress.IPv4Address) else IPV6_NETWORK
    return str(ipaddress.ip_network((ip, bits), strict=False))


@dataclass(frozen=True, kw_only=True)
class CostRules:
    """The settings the cost guard reads (defaults and meaning: demo/conf/settings.py)."""

    daily_budget: int  # 0: none
    prefix_digits: int
    min_sent: int
    conversion: float  # 0: the breaker is off
    throttled_hourly: int
    min_networks: int = 1
    exempt: frozenset[str] = frozenset()  # the test numbers

    @classmethod
    def from_settings(cls, settings: Settings, exempt: Iterable[str] = ()) -> CostRules:
        return cls(
            daily_budget=settings.sms_daily_budget,
            prefix_digits=settings.sms_breaker_prefix,
            min_sent=settings.sms_breaker_min_sent,
            conversion=settings.sms_breaker_conversion,
            throttled_hourly=settings.sms_breaker_hourly,
            min_networks=settings.sms_breaker_min_networks,
            exempt=frozenset(exempt),
        )

    def prefix(self, phone: str) -> str:
        """The breaker's prefix of an E.164 number: its first digits after '+'."""
        return phone.lstrip("+")[: self.prefix_digits]

    def throttled(self, sent: int, recent: int, used: int, marked: bool, networks: int) -> bool:
        """Whether a prefix is throttled, from its counts over the last 30-60 minutes: ``sent`` texts
        (``recent`` of them too young to judge), ``used`` codes, ``marked``: it tripped and has not
        recovered since, ``networks``: the client networks with texts not used (one client network
        never trips it: sms_ip_hourly bounds it already, and its unused texts, which cost nothing
        when they are skipped rows, must not close the prefix to its real users)."""
        if self.conversion <= 0 or networks < self.min_networks:
            return False
        judged = max(0, sent - recent)
        poor = used < self.conversion * judged
        return poor and (judged >= self.min_sent or (marked and judged > 0))

    def young_cap(self, used: int) -> int:
        """How many texts to a prefix may be too young to judge at once (2-4 min), given its codes
        ``used`` over the last 30-60 minutes: a burst is not judged, so it is bounded by what the
        prefix's real users have been using, and flows on as its codes are used."""
        return max(self.min_sent, 3 * used + 10)

    def send_guard(self, phone: str, client_ip: str) -> SendGuard | None:
        """What a code request to ``phone`` from ``client_ip`` counts (None: nothing, a test number)."""
        if phone in self.exempt or (not self.daily_budget and self.conversion <= 0):
            return None
        return SendGuard(self, self.prefix(phone), network_of(client_ip))

    def use_guard(self, phone: str, client_ip: str) -> UseGuard | None:
        """What spending a code of ``phone`` from ``client_ip`` counts (None: nothing)."""
        if phone in self.exempt or self.conversion <= 0:
            return None
        prefix = self.prefix(phone)
        return UseGuard(
            Window(prefix_key(prefix, USED), 0, SPAN),
            Window(network_key(prefix, network_of(client_ip)), 0, SPAN),
            Window(prefix_key(prefix, NETS), 0, SPAN),
        )


@dataclass(frozen=True)
class Verdict:
    """The breaker's view of a prefix after a code request counted in it."""

    prefix: str
    sent: int
    used: int
    networks: int
    throttled: bool
    tripped: bool  # it was not marked before this request
    recovered: bool  # it was marked, and is no more


@dataclass(frozen=True)
class SendGuard:
    """The counters of one code request (``sms.queries.guard_send`` counts them in its unit of work)."""

    rules: CostRules
    prefix: str
    network: str  # the client's (``network_of``)

    @property
    def budget(self) -> Window | None:
        return Window(BUDGET_KEY, self.rules.daily_budget, DAY) if self.rules.daily_budget else None

    def budget_with(self, extra: int) -> Window | None:
        """Today's budget window, raised by ``extra`` (``sms budget --add``)."""
        budget = self.budget
        return None if budget is None else dataclasses.replace(budget, limit=budget.limit + max(0, extra))

    def extra_params(self, now: dt.datetime) -> dict[str, Any]:
        return extra_params(now)

    def network_params(self, now: dt.datetime) -> dict[str, Any]:
        """``window_params`` of the client network's unused texts in the prefix, now and next (counted
        like ``sent``)."""
        mine = Window(network_key(self.prefix, self.network), 0, SPAN)
        later = now + dt.timedelta(seconds=SPAN)
        return {**ratelimit.window_params([mine], now), **ratelimit.window_params([mine], later, 1)}

    def new_network_params(self, now: dt.datetime, first_now: bool, first_later: bool) -> dict[str, Any]:
        """``window_params`` of the prefix's network count, in the windows (now, next) where the
        client's network had no unused text before this request."""
        nets, params = self._window(NETS, SPAN), dict[str, Any]()
        for at in [now] * first_now + [now + dt.timedelta(seconds=SPAN)] * first_later:
            params.update(ratelimit.window_params([nets], at, len(params) // 3))
        return params

    @property
    def judging(self) -> bool:
        return self.rules.conversion > 0

    def counted(self, now: dt.datetime) -> dict[str, Any]:
        """``window_params`` of the request's breaker counters: 0-3 counted (young texts, now and next;
        sent, now and next: in key order), 4 to 6 only read (used, the trip mark, the networks)."""
        young, sent = self._window(YOUNG, RECENT), self._window(SENT, SPAN)
        return {
            **ratelimit.window_params([young], now),
            **ratelimit.window_params([young], now + dt.timedelta(seconds=RECENT), 1),
            **ratelimit.window_params([sent], now, 2),
            **ratelimit.window_params([sent], now + dt.timedelta(seconds=SPAN), 3),
            **ratelimit.window_params([self._window(USED, SPAN)], now, 4),
            **ratelimit.window_params([self.mark], now, 5),
            **ratelimit.window_params([self._window(NETS, SPAN)], now, 6),
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
        marked, networks = bool(counts.tripped), int(counts.nets or 0)
        throttled = self.rules.throttled(sent, recent, used, marked, networks)
        tripped, recovered = throttled and not marked, marked and not throttled
        return Verdict(self.prefix, sent, used, networks, throttled, tripped, recovered)

    def burst_refusal(self, counts: Row, now: dt.datetime) -> PrefixThrottled | None:
        """The refusal of a request past the prefix's young texts' cap (``CostRules.young_cap``), with
        a Retry-After of the time until the oldest of them is judged; None: within it."""
        if int(counts.recent or 0) <= self.rules.young_cap(int(counts.used or 0)):
            return None
        return PrefixThrottled(Window("", 0, RECENT).retry_after(now), self.prefix, burst=True)

    def _window(self, kind: str, seconds: int, limit: int = 0) -> Window:
        return Window(prefix_key(self.prefix, kind), limit, seconds)


@dataclass(frozen=True)
class UseGuard:
    """The counters of a spent code: its prefix's ``used``, now and in the next window, and the
    unused texts of the spender's client network in the prefix (with the prefix's network count
    when they drop to none)."""

    used: Window
    network: Window
    networks: Window

    def network_params(self, now: dt.datetime) -> list[dict[str, Any]]:
        """``window_params`` of the spender's network (0) and the prefix's network count (1), now and
        in the next window."""
        later = now + dt.timedelta(seconds=SPAN)
        return [ratelimit.window_params([self.network, self.networks], at) for at in (now, later)]

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
    networks: int  # client networks with texts not used
    throttled: bool
    throttle_used: int  # texts sent this hour while throttled

    @property
    def conversion(self) -> float | None:
        return rate(self.sent, self.used)


@dataclass(frozen=True)
class Snapshot:
    """The cost guard's shared state at ``at``: today's budget and the breaker's prefixes."""

    at: dt.datetime
    budget: int  # 0: none; today's, with what ``sms budget --add`` added
    extra: int  # what ``sms budget --add`` added today
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
        NETS: Window("", 0, SPAN).start(now),
    }
    day = Window(BUDGET_KEY, rules.daily_budget, DAY)
    spent, extra, counts = 0, 0, dict[str, dict[str, int]]()
    for row in rows:
        if row.key in (BUDGET_KEY, EXTRA_KEY):
            today = int(row.n) if int(row.window_start) == day.start(now) else 0
            spent, extra = (spent + today, extra) if row.key == BUDGET_KEY else (spent, extra + today)
            continue
        prefix, _, kind = row.key.removeprefix(PREFIX_KEYS).rpartition(":")
        if starts.get(kind) == int(row.window_start):
            counts.setdefault(prefix, {})[kind] = int(row.n)
    prefixes = []
    for prefix, c in sorted(counts.items()):
        sent, recent, used = c.get(SENT, 0), c.get(YOUNG, 0), c.get(USED, 0)
        if not (sent or used):
            continue
        networks = c.get(NETS, 0)
        throttled = rules.throttled(sent, recent, used, bool(c.get(TRIPPED)), networks)
        where = country(calling_code(f"+{prefix}"))
        prefixes.append(PrefixState(prefix, where, sent, used, recent, networks, throttled, c.get(THROTTLE, 0)))
    budget = rules.daily_budget + extra if rules.daily_budget else 0
    return Snapshot(now, budget, extra if rules.daily_budget else 0, spent, day.retry_after(now), prefixes)


def counter_params(now: dt.datetime) -> dict[str, Any]:
    """The parameters of ``sms.queries.cost_counters``: today's budget row, and the prefixes' windows
    read at ``now``."""
    return {
        "budget_key": BUDGET_KEY,
        "extra_key": EXTRA_KEY,
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

    def send_guard(self, phone: str, client_ip: str) -> SendGuard | None:
        return self.rules.send_guard(phone, client_ip) if self.rules else None

    def use_guard(self, phone: str, client_ip: str) -> UseGuard | None:
        return self.rules.use_guard(phone, client_ip) if self.rules else None

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
            if not throttled.burst:  # a capped burst is not a trip: it flows on as its codes are used
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
    budget = GaugeMetricFamily(
        "demo_sms_budget_texts", "Today's SMS budget (sms_daily_budget and what sms budget --add added; 0: none)"
    )
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
