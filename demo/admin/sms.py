"""``python -m demo.admin sms stats [--days N]``: codes texted and used, per day and country, and the
conversion rate (used / sent): a country whose rate falls has a gateway or a fraud problem.

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

import phonenumbers

from demo.admin import cli
from demo.admin.cli import BAD_INPUT, DONE, CommandError
from demo.common.infra.clock import Clock
from demo.common.sms import queries
from demo.conf.settings import Settings

NAME = "sms"
MAX_DAYS = 366


def add_parser(commands: Any) -> None:
    """Register ``sms`` and its commands on the subparsers of python -m demo.admin."""
    group = cli.add_group(commands, NAME, help="SMS statistics", description=__doc__ or "")
    stats = cli.add_command(
        group, "stats", "codes texted and used per day and country, and the conversion rate", _stats, "sms stats"
    )
    stats.add_argument("--days", type=int, default=7, help=f"days back, today included (1 to {MAX_DAYS}; default 7)")


def calling_code(prefix: str) -> int | None:
    """The calling code an E.164 prefix (``+`` and up to 3 digits) starts with, or None."""
    for length in (1, 2, 3):
        code = int(prefix[1 : 1 + length]) if prefix[1 : 1 + length].isdigit() else 0
        if code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            return code
    return None


def country(code: int | None) -> str:
    return "??" if code is None else phonenumbers.region_code_for_country_code(code)


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
