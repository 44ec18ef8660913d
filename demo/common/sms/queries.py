"""The SQL of the SMS outbox (see outbox.py): named units of work for ``Database.run``, and ``enqueue``
for the unit of work that issues a code."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from demo.common.errors import PrefixThrottled, RateLimited, SmsBudgetSpent
from demo.common.infra import ratelimit
from demo.common.infra.db import Row, Sql, SqlCursor, idempotent, sql_unit

if TYPE_CHECKING:
    from demo.common.sms.costguard import SendGuard, UseGuard, Verdict

PENDING, SENDING, SENT, FAILED, SKIPPED = "pending", "sending", "sent", "failed", "skipped"
WAITING = (PENDING, SENDING)  # not finished: due now, later, or when a lease runs out
FINISHED = (SENT, FAILED, SKIPPED)


def _sql_list(statuses: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"'{status}'" for status in statuses) + ")"


_WAITING = _sql_list(WAITING)
_FINISHED = _sql_list(FINISHED)

ENQUEUE = Sql(
    "INSERT INTO sms_outbox (sms_code_id, phone, purpose, code, text, lang, status, attempts, next_attempt_at,"
    " created_at) VALUES (:sms_code_id, :phone, :purpose, :code, :text, :lang, :status, 0, :now, :now)"
)
BACKLOG = Sql(f"SELECT COUNT(*) AS n FROM sms_outbox WHERE status IN {_WAITING}")
SWEEP = Sql(f"DELETE FROM sms_outbox WHERE status IN {_FINISHED} AND created_at < :before")
# Due rows with their code's expiry (a plain subquery: FOR UPDATE locks the outbox rows only, never the
# codes a request is checking). No ORDER BY: MariaDB would lock every due row to sort them, starving the
# other senders; the (status, next_attempt_at) index yields pending rows, oldest first, then lapsed
# claims. Another sender's rows are skipped, never waited for (SQLite has a single writer).
_DUE = (
    "SELECT id, sms_code_id, phone, purpose, code, text, lang, attempts, created_at,"
    " (SELECT expires_at FROM sms_codes WHERE sms_codes.id = sms_outbox.sms_code_id) AS code_expires_at"
    f" FROM sms_outbox WHERE status IN {_WAITING} AND next_attempt_at <= :now LIMIT :batch"
)
DUE = Sql(sqlite=_DUE, mysql=f"{_DUE} FOR UPDATE SKIP LOCKED", datetimes=["created_at", "code_expires_at"])
CLAIM = Sql(
    "UPDATE sms_outbox SET status = 'sending', attempts = :attempts, next_attempt_at = :lease_until WHERE id = :id"
)
# A claim is settled only while it is still this try's (a later claim of the row has another ``attempts``).
_MINE = " WHERE id = :id AND status = 'sending' AND attempts = :attempts"
GIVE_UP = Sql("UPDATE sms_outbox SET status = 'failed', code = NULL, text = '', last_error = :error WHERE id = :id")
SETTLE = {
    # last_error stays on a sent row: the providers that failed before the one that took it.
    SENT: Sql(
        "UPDATE sms_outbox SET status = 'sent', sent_at = :now, code = NULL, text = '', last_error = :error,"
        " provider = :provider, message_id = :message_id" + _MINE
    ),
    PENDING: Sql(f"UPDATE sms_outbox SET status = 'pending', next_attempt_at = :retry_at, last_error = :error{_MINE}"),
    FAILED: Sql(f"UPDATE sms_outbox SET status = 'failed', code = NULL, text = '', last_error = :error{_MINE}"),
}
VOID_CODE = Sql("UPDATE sms_codes SET expires_at = :now WHERE id = :id AND expires_at > :now")


@dataclass(frozen=True)
class Claim:
    """What ``claim_due`` found: the rows it claimed (``attempts`` is this try's number), the rows whose
    code died first (settled as failed, unsent), and the backlog."""

    claimed: list[Row]
    dead: list[Row]
    backlog: int


@dataclass(frozen=True)
class Outcome:
    """How one claimed try ended: ``status`` SENT (by ``provider``, its id ``message_id``), PENDING
    (retry at ``retry_at``) or FAILED (given up); ``error`` says what failed on the way."""

    id: int
    attempts: int
    sms_code_id: int
    status: str
    error: str | None = None
    retry_at: dt.datetime | None = None
    provider: str | None = None
    message_id: str | None = None


def enqueue(
    c: SqlCursor,
    code_id: int,
    phone: str,
    purpose: str,
    now: dt.datetime,
    *,
    text: str | None,
    code: str | None,
    lang: str | None = None,
) -> None:
    """Write the text of code ``code_id``, in ``lang`` (a BCP 47 tag: the provider's template is chosen by
    it; None: the default language); with ``text`` None, the same row as ``skipped``."""
    c.insert(
        ENQUEUE,
        {
            "sms_code_id": code_id,
            "phone": phone,
            "purpose": purpose,
            "code": code,
            "text": text or "",
            "lang": lang,
            "status": SKIPPED if text is None else PENDING,
            "now": now,
        },
    )


@sql_unit
@idempotent
def backlog(c: SqlCursor) -> int:
    """Texts not yet sent nor given up (the ``demo_sms_outbox_pending`` gauge)."""
    row = c.first(BACKLOG)
    return 0 if row is None else int(row.n)


@sql_unit
@idempotent  # deletes old rows: a re-run finds fewer (the count is only logged)
def sweep(c: SqlCursor, before: dt.datetime) -> int:
    """Delete finished rows created before ``before`` (their texts were blanked when they finished)."""
    return c.execute(SWEEP, {"before": before})


@sql_unit
def claim_due(c: SqlCursor, now: dt.datetime, lease_until: dt.datetime, batch: int) -> Claim:
    """Claim up to ``batch`` due rows whose code still lives, until ``lease_until``; settle the others as
    failed, unsent (a text late by an outage, or for a code used or replaced since, would only mislead)."""
    claimed, dead = [], []
    for row in c.all(DUE, {"now": now, "batch": batch}):
        if row.code_expires_at is None or row.code_expires_at <= now:
            c.execute(GIVE_UP, {"id": row.id, "error": "code expired before sending"})
            dead.append(row)
            continue
        row = row._replace(attempts=row.attempts + 1)
        c.execute(CLAIM, {"id": row.id, "attempts": row.attempts, "lease_until": lease_until})
        claimed.append(row)
    return Claim(claimed, dead, backlog(c))


@sql_unit
def settle(c: SqlCursor, outcomes: list[Outcome], now: dt.datetime) -> list[Outcome]:
    """Record how each try ended; the texts given up now (their codes are void: nobody received them,
    so they must not stay usable, nor be guessed at for their lifetime)."""
    given_up = []
    for outcome in outcomes:
        params = {
            "id": outcome.id,
            "attempts": outcome.attempts,
            "now": now,
            "error": outcome.error,
            "retry_at": outcome.retry_at,
            "provider": outcome.provider,
            "message_id": outcome.message_id,
        }
        if c.execute(SETTLE[outcome.status], params) and outcome.status == FAILED:
            c.execute(VOID_CODE, {"id": outcome.sms_code_id, "now": now})
            given_up.append(outcome)
    return given_up


# -- statistics (python -m demo.admin sms stats) ------------------------------------------------------
# Codes texted (their outbox row sent) and used, per day of the code and per phone prefix: a "+" and 3
# digits, which hold the calling code whole (calling codes are 1 to 3 digits, and none is the start of
# another), so the rows stay one per day and country whatever the traffic. Notices (no code: an empty
# hash) are not codes. Housekeeping adds up the texts it is about to delete into sms_daily_counts
# (``keep_counts``, in the unit that deletes them: each is counted once, live or kept).
_DAY = "SUBSTR(CAST(sms_codes.created_at AS CHAR), 1, 10)"
_PREFIX = "SUBSTR(sms_codes.phone, 1, 4)"
_CODE_COUNTS = (
    f"SELECT {_DAY} AS day, {_PREFIX} AS prefix, COUNT(sms_codes.id) AS sent,"
    " SUM(CASE WHEN sms_codes.used_at IS NULL THEN 0 ELSE 1 END) AS used"
    " FROM sms_codes JOIN sms_outbox ON sms_outbox.sms_code_id = sms_codes.id"
    " WHERE sms_outbox.status = 'sent' AND sms_codes.code_hash <> '' AND "
)
CODE_STATS = Sql(f"{_CODE_COUNTS}sms_codes.created_at >= :since GROUP BY {_DAY}, {_PREFIX}")
# The texts ``SWEEP`` deletes at ``before`` (the sent ones among them).
SWEPT_COUNTS = Sql(f"{_CODE_COUNTS}sms_outbox.created_at < :before GROUP BY {_DAY}, {_PREFIX}")
KEEP_COUNTS = Sql(
    sqlite="INSERT INTO sms_daily_counts (sent_on, phone_prefix, sent, used) VALUES (:day, :prefix, :sent, :used)"
    " ON CONFLICT (sent_on, phone_prefix) DO UPDATE SET sent = sent + excluded.sent, used = used + excluded.used",
    mysql="INSERT INTO sms_daily_counts (sent_on, phone_prefix, sent, used) VALUES (:day, :prefix, :sent, :used)"
    " ON DUPLICATE KEY UPDATE sent = sent + VALUES(sent), used = used + VALUES(used)",
)
KEPT_STATS = Sql(
    "SELECT sent_on AS day, phone_prefix AS prefix, sent, used FROM sms_daily_counts WHERE sent_on >= :since_day"
)


def keep_counts(c: SqlCursor, before: dt.datetime) -> int:
    """Add the codes of the texts ``sweep(before)`` is about to delete to sms_daily_counts (call it
    first, in the same unit of work); how many codes."""
    counted = 0
    for row in c.all(SWEPT_COUNTS, {"before": before}):
        c.execute(KEEP_COUNTS, {"day": row.day, "prefix": row.prefix, "sent": int(row.sent), "used": int(row.used)})
        counted += int(row.sent)
    return counted


@sql_unit
def code_stats(c: SqlCursor, since: dt.datetime) -> list[Row]:
    """Per day (``YYYY-MM-DD``, UTC) and phone prefix, from ``since`` (a midnight): codes texted
    (``sent``) and used, kept and live; a day and prefix may come twice (add them up)."""
    kept = c.all(KEPT_STATS, {"since_day": f"{since:%Y-%m-%d}"})
    return kept + c.all(CODE_STATS, {"since": since})


# -- the cost guard (costguard.py): the daily budget and the conversion breaker ---------------------------
# A prefix's counts as ``SendGuard.counted`` numbers its windows: young texts, sent, used, the trip mark,
# the client networks with unused texts.
BREAKER_COUNTS = Sql(
    f"SELECT {ratelimit.count_of(0)} AS recent, {ratelimit.count_of(2)} AS sent,"
    f" {ratelimit.count_of(4)} AS used, {ratelimit.count_of(5)} AS tripped, {ratelimit.count_of(6)} AS nets"
)
# The client network's unused texts in the prefix, now and next (``SendGuard.network_params``).
NETWORK_COUNTS = Sql(f"SELECT {ratelimit.count_of(0)} AS now, {ratelimit.count_of(1)} AS later")
# A spent code: one unused text less for the spender's network (window 0 of ``UseGuard.network_params``),
# never below none; and one network less for the prefix (window 1) when that was its last.
_ONE_LESS = (
    "UPDATE rate_counters SET count = count - 1 WHERE count > 0 AND `key` = :key{0} AND window_start = :start{0}"
)
NETWORK_USED = Sql(_ONE_LESS.format(0))
NETWORK_LEFT = Sql(f"SELECT {ratelimit.count_of(0)} AS n")
NETWORK_GONE = Sql(_ONE_LESS.format(1))
# What ``sms budget --add`` added to today's budget (``SendGuard.extra_params``), and its addition.
BUDGET_EXTRA = Sql(f"SELECT {ratelimit.count_of(0)} AS n")
ADD_EXTRA = Sql(
    sqlite="INSERT INTO rate_counters (`key`, window_start, count, expires_at) VALUES (:key0, :start0, :n, :expires0)"
    " ON CONFLICT (`key`, window_start) DO UPDATE SET count = count + excluded.count",
    mysql="INSERT INTO rate_counters (`key`, window_start, count, expires_at) VALUES (:key0, :start0, :n, :expires0)"
    " ON DUPLICATE KEY UPDATE count = count + VALUES(count)",
)
# Today's budget rows and every prefix counter of the windows read now (the caller sorts them out).
COST_COUNTERS = Sql(
    "SELECT `key`, window_start, count AS n FROM rate_counters"
    " WHERE (`key` IN (:budget_key, :extra_key) AND window_start = :day)"
    " OR (`key` LIKE :prefixes AND window_start IN (:span, :recent, :hour))"
)


def guard_send(c: SqlCursor, guard: SendGuard, now: dt.datetime) -> Verdict | None:
    """Count a code request in its prefix's breaker counters (``PrefixThrottled`` past the young texts'
    cap, or when the prefix is throttled, marked then, past its hourly allowance), then against the
    daily budget (``SmsBudgetSpent`` past it). The breaker's verdict (None: the breaker is off).
    Raising rolls the unit back: a refused request counts nowhere. The budget's row, every request's,
    comes last, so that its lock is held for one statement and the commit; the rows are taken in one
    order in every unit (codes, then the prefix's counters: its networks', young and sent, its network
    count, its mark and allowance; then the budget), which ``count_use`` keeps too."""
    verdict = _judge(c, guard, now) if guard.judging else None
    if guard.budget is not None:
        extra = c.first(BUDGET_EXTRA, guard.extra_params(now))
        budget = guard.budget_with(int(extra.n or 0) if extra is not None else 0)
        assert budget is not None
        try:
            ratelimit.hit(c, budget, now)
        except RateLimited as refused:
            raise SmsBudgetSpent(refused.retry_after) from None
    return verdict


def _judge(c: SqlCursor, guard: SendGuard, now: dt.datetime) -> Verdict:
    mine = guard.network_params(now)
    ratelimit.reserve(c, mine, 2)  # the network's unused texts in the prefix, now and next
    firsts = c.first(NETWORK_COUNTS, mine)
    assert firsts is not None  # a SELECT without FROM has its one row
    params = guard.counted(now)
    ratelimit.reserve(c, params, 4)  # locks the prefix's rows: its requests are judged one at a time
    new = guard.new_network_params(now, int(firsts.now or 0) == 1, int(firsts.later or 0) == 1)
    if new:  # the network's first unused text in the prefix, in either window: one network more
        ratelimit.reserve(c, new, len(new) // 3)
    counts = c.first(BREAKER_COUNTS, params)
    assert counts is not None
    refused = guard.burst_refusal(counts, now)
    if refused is not None:
        raise refused
    verdict = guard.judge(counts)
    if verdict.recovered:
        ratelimit.forget(c, guard.mark.key)
    if verdict.throttled:
        ratelimit.reserve(c, guard.mark_params(now), 2)
        try:
            ratelimit.hit(c, guard.throttle, now)
        except RateLimited as refused_past:
            raise PrefixThrottled(refused_past.retry_after, guard.prefix) from None
    return verdict


def count_use(c: SqlCursor, guard: UseGuard, now: dt.datetime) -> None:
    """A code was spent: one unused text less for the spender's network in its prefix (now and next),
    and one more in the prefix's ``used``."""
    for params in guard.network_params(now):
        if c.execute(NETWORK_USED, params):
            left = c.first(NETWORK_LEFT, params)
            if left is not None and int(left.n or 0) == 0:
                c.execute(NETWORK_GONE, params)
    ratelimit.reserve(c, guard.params(now), 2)


@sql_unit
@idempotent
def cost_counters(c: SqlCursor, params: dict[str, Any]) -> list[Row]:
    """The counters ``costguard.snapshot`` reads (key, window_start, n: the count): ``params`` are
    ``costguard.counter_params``'s."""
    return c.all(COST_COUNTERS, params)


@sql_unit
def add_to_budget(c: SqlCursor, params: dict[str, Any], n: int) -> int:
    """Raise today's budget by ``n`` (``params``: ``SendGuard.extra_params``'s); what was added today."""
    c.execute(ADD_EXTRA, {**params, "n": n})
    added = c.first(BUDGET_EXTRA, params)
    return int(added.n or 0) if added is not None else 0


@sql_unit
def reset_prefix(c: SqlCursor, families: list[str]) -> None:
    """Drop every counter of ``families`` (``costguard.prefix_families``: a prefix's trip mark and
    counters, its networks' too), so that the prefix is judged afresh."""
    for family in families:
        ratelimit.forget_family(c, family)
