"""``python -m demo.admin sms stats [--days N]``: codes texted and used, per day and country, and the
conversion rate (used / sent): a country whose rate falls has a gateway or a fraud problem.
``sms budget``: today's use of the daily SMS budget; ``--add N`` raises today's budget by N texts for
the whole deployment, at once and without a restart (it is read from the database by every request).
``sms breaker``: the conversion breaker's view, the last 30 to 60 minutes per number prefix and
country, and which prefixes it throttles; ``--reset PREFIX`` drops a prefix's trip and its counters,
so that it is judged afresh (see demo/common/sms/costguard.py).

A country is the one of the phone's calling code (phones are E.164); codes shared by several countries
(+1, +7) count under their main one. Texts still in the database are counted from their rows; those
housekeeping deleted (a day after they went) from the daily counts it kept of them (sms_daily_counts),
so any day back to the release that brought them (migration 0011) counts. The texts of an account
purged within a day of sending are gone uncounted, as the rest of it.
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from demo.admin import cli
from demo.admin.cli import BAD_INPUT, DONE, CommandError
from demo.common.infra.clock import Clock
from demo.common.sms import costguard, queries
from demo.common.sms.backends import parse_test_numbers
from demo.common.sms.countries import calling_code, country
from demo.conf.settings import Settings

NAME = "sms"
MAX_DAYS = 366
MAX_ADD = 1_000_000  # texts one --add may add: a typo's extra zeros are refused, not spent


def add_parser(commands: Any) -> None:
    """Register ``sms`` and its commands on the subparsers of python -m demo.admin."""
    group = cli.add_group(commands, NAME, help="SMS statistics", description=__doc__ or "")
    stats = cli.add_command(
        group, "stats", "codes texted and used per day and country, and the conversion rate", _stats, "sms stats"
    )
    stats.add_argument("--days", type=int, default=7, help=f"days back, today included (1 to {MAX_DAYS}; default 7)")
    budget = cli.add_command(group, "budget", "today's use of the daily SMS budget (UTC)", _budget, "sms budget")
    budget.add_argument(
        "--add",
        type=int,
        metavar="N",
        help=f"raise today's budget (UTC) by N texts (1 to {MAX_ADD}) for every process, without a restart",
    )
    breaker = cli.add_command(
        group,
        "breaker",
        "the conversion breaker: texts and used codes of the last 30 to 60 minutes per number prefix and "
        "country, and the prefixes it throttles",
        _breaker,
        "sms breaker",
    )
    breaker.add_argument(
        "--reset",
        metavar="PREFIX",
        help="clear the trip and the counters of PREFIX (e.g. +86138: the number's first sms_breaker_prefix "
        "digits), so that it is judged afresh",
    )


def _rate(sent: int, used: int) -> float | None:
    return round(used / sent, 4) if sent else None


def _stats(args: argparse.Namespace, settings: Settings) -> int:
    if not 1 <= args.days <= MAX_DAYS:
        raise CommandError(BAD_INPUT, f"--days={args.days}: must be from 1 to {MAX_DAYS}")
    now = Clock().now()
    since = dt.datetime.combine(now.date() - dt.timedelta(days=args.days - 1), dt.time())
    with cli.database(settings) as db:
        rows = db.run(queries.code_stats, since)
    counts: dict[tuple[str, int | None], list[int]] = {}
    for row in rows:
        key = (row.day, calling_code(row.prefix))
        sent_used = counts.setdefault(key, [0, 0])
        sent_used[0] += int(row.sent)
        sent_used[1] += int(row.used or 0)
    days: list[dict[str, Any]] = [
        {
            "day": day,
            "country": country(code),
            "calling_code": None if code is None else f"+{code}",
            "sent": sent,
            "used": used,
            "conversion": _rate(sent, used),
        }
        for (day, code), (sent, used) in sorted(counts.items(), key=lambda item: (item[0][0], item[0][1] or 0))
    ]
    sent, used = sum(d["sent"] for d in days), sum(d["used"] for d in days)
    total = {"sent": sent, "used": used, "conversion": _rate(sent, used)}
    lines = [f"{'day':<12}{'country':<13}{'sent':>8}{'used':>8}{'conversion':>12}"]
    for d in days:
        where = f"{d['country']} ({d['calling_code']})"
        lines.append(f"{d['day']:<12}{where:<13}{d['sent']:>8}{d['used']:>8}{_percent(d['conversion']):>12}")
    lines.append(f"{'total':<25}{sent:>8}{used:>8}{_percent(total['conversion']):>12}")
    lines.append(f"(days in UTC, from {since:%Y-%m-%d})")
    cli.output(args, lines, {"since": f"{since:%Y-%m-%d}", "days": days, "total": total})
    return DONE


def _percent(rate: Any) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def _snapshot(settings: Settings) -> costguard.Snapshot:
    try:
        rules = costguard.CostRules.from_settings(settings, parse_test_numbers(settings.sms_test_numbers))
    except ValueError as error:
        raise CommandError(BAD_INPUT, str(error)) from None
    now = Clock().now()
    with cli.database(settings) as db:
        rows = db.run(queries.cost_counters, costguard.counter_params(now))
    return costguard.snapshot(rules, rows, now)


def _budget(args: argparse.Namespace, settings: Settings) -> int:
    if args.add is not None:
        _add_to_budget(args.add, settings)
    state = _snapshot(settings)
    day = f"{state.at:%Y-%m-%d}"
    left = max(0, state.budget - state.spent) if state.budget else None
    resets = f"resets in {state.resets_in // 3600}h {state.resets_in % 3600 // 60:02d}m (midnight UTC)"
    if state.budget:
        refused = "; code requests are refused until then" if left == 0 else ""
        line = f"{day}: {state.spent} of {state.budget} texts, {left} left; {resets}{refused}"
    else:
        line = f"{day}: {state.spent} texts; no budget (sms_daily_budget=0)"
    if state.extra:
        line += f" (sms_daily_budget {settings.sms_daily_budget}, {state.extra} added today)"
    document = {
        "day": day,
        "budget": state.budget,
        "added": state.extra,
        "spent": state.spent,
        "left": left,
        "resets_in": state.resets_in,
    }
    cli.output(args, [line], document)
    return DONE


def _add_to_budget(n: int, settings: Settings) -> None:
    if not 1 <= n <= MAX_ADD:
        raise CommandError(BAD_INPUT, f"--add={n}: must be from 1 to {MAX_ADD}")
    if not settings.sms_daily_budget:
        raise CommandError(BAD_INPUT, "--add: there is no budget to raise (sms_daily_budget=0)")
    with cli.database(settings) as db:
        db.run(queries.add_to_budget, costguard.extra_params(Clock().now()), n)


def _reset(raw: str, settings: Settings) -> dict[str, Any]:
    prefix = raw.removeprefix("+")
    digits = settings.sms_breaker_prefix
    if not (prefix.isascii() and prefix.isdigit() and len(prefix) == digits):
        raise CommandError(
            BAD_INPUT, f"--reset={raw}: a prefix is '+' and the number's first {digits} digits (sms_breaker_prefix)"
        )
    with cli.database(settings) as db:
        db.run(queries.reset_prefix, costguard.prefix_families(prefix))
    return {"prefix": f"+{prefix}"}


def _breaker(args: argparse.Namespace, settings: Settings) -> int:
    reset = _reset(args.reset, settings) if args.reset is not None else None
    state = _snapshot(settings)
    prefixes = [
        {
            "prefix": f"+{p.prefix}",
            "country": p.country,
            "sent": p.sent,
            "used": p.used,
            "recent": p.recent,
            "networks": p.networks,
            "conversion": p.conversion,
            "throttled": p.throttled,
            "throttled_sent_this_hour": p.throttle_used if p.throttled else 0,
        }
        for p in sorted(state.prefixes, key=lambda p: (-p.sent, p.prefix))
    ]
    countries = [
        {**totals, "country": where, "conversion": costguard.rate(totals["sent"], totals["used"])}
        for where, totals in sorted(state.countries().items())
    ]
    rules = {
        "min_sent": settings.sms_breaker_min_sent,
        "min_networks": settings.sms_breaker_min_networks,
        "conversion": settings.sms_breaker_conversion,
        "hourly": settings.sms_breaker_hourly,
    }
    hourly = settings.sms_breaker_hourly
    lines = [f"{reset['prefix']}: its trip and counters are cleared"] if reset else []
    lines.append(f"{'prefix':<14}{'country':<9}{'sent':>6}{'used':>6}{'conversion':>12}  state")
    for p in prefixes:
        shown = "throttled" if p["throttled"] else "ok"
        if p["throttled"]:
            shown += f" ({p['throttled_sent_this_hour']} of {hourly} texts this hour)"
        lines.append(
            f"{p['prefix']:<14}{p['country']:<9}{p['sent']:>6}{p['used']:>6}{_percent(p['conversion']):>12}  {shown}"
        )
    for c in countries:
        throttled = f"{c['throttled']} prefix(es) throttled" if c["throttled"] else "ok"
        where = f"total {c['country']}"
        lines.append(f"{where:<23}{c['sent']:>6}{c['used']:>6}{_percent(c['conversion']):>12}  {throttled}")
    if settings.sms_breaker_conversion <= 0:
        lines.append("(the breaker is off: sms_breaker_conversion=0)")
    lines.append(
        f"(the last 30 to 60 minutes; a prefix with {rules['min_sent']}+ texts older than a few minutes, "
        f"under {rules['conversion'] * 100:.0f}% of them used and unused texts from {rules['min_networks']}+ "
        f"client networks is throttled to {hourly} texts an hour)"
    )
    document = {"prefixes": prefixes, "countries": countries, "rules": rules}
    cli.output(args, lines, {**document, "reset": reset["prefix"]} if reset else document)
    return DONE
