"""The SMS outbox: texts are rows in the database, sent off the request path by a sender in each process.

A request that issues a code writes its text here in the same unit of work and answers once that
commits, so its answer (status, body, time) never depends on the SMS gateway, nor on whether a text
had to go out at all: with nothing to send the same row is written as ``skipped``.

Each process runs one ``Sender``. It is woken at once after a commit in this process and polls every
``POLL_EVERY`` seconds for rows of other processes and for retries. It claims due rows before sending
them (status ``sending``, ``next_attempt_at`` = the end of its lease) with ``SELECT ... FOR UPDATE SKIP
LOCKED`` on MariaDB (SQLite has a single writer), so two senders never send one row. A process that
dies between claim and settle leaves the row to be retried once its lease runs out: delivery is at
least once, and nothing is lost between the commit and the send. A text whose code died while it
waited (expired, used or replaced: after an outage) is settled as failed, never sent.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from demo.common.infra.clock import Clock, isoformat
from demo.common.infra.db import Database
from demo.common.errors import Unavailable
from demo.common.infra.metrics import Metrics
from demo.common.accounts.phones import mask_phone
from demo.common.sms.backends import SmsBackend, SmsMessage
from demo.models import SmsCode, SmsOutbox

if TYPE_CHECKING:
    from demo.conf.settings import Settings

log = logging.getLogger("demo.sms")
PENDING, SENDING, SENT, FAILED, SKIPPED = "pending", "sending", "sent", "failed", "skipped"
WAITING = (PENDING, SENDING)  # not finished: due now, later, or when a lease runs out
FINISHED = (SENT, FAILED, SKIPPED)
POLL_EVERY = 1.0  # seconds between looks for other processes' rows and for retries


def enqueue(session: Session, code_id: int, phone: str, purpose: str, now: dt.datetime, *,
            text: str | None, code: str | None) -> None:
    """Write the text of code ``code_id``; with ``text`` None, the same row as ``skipped``."""
    session.add(SmsOutbox(
        sms_code_id=code_id, phone=phone, purpose=purpose, code=code, text=text or "",
        status=SKIPPED if text is None else PENDING, attempts=0, next_attempt_at=now, created_at=now,
    ))


def backlog(session: Session) -> int:
    """Texts not yet sent nor given up (the ``demo_sms_outbox_pending`` gauge)."""
    return session.scalar(select(func.count()).select_from(SmsOutbox).where(SmsOutbox.status.in_(WAITING)))


def sweep(session: Session, before: dt.datetime) -> int:
    """Delete finished rows created before ``before`` (their texts were blanked when they finished)."""
    return session.execute(
        delete(SmsOutbox).where(SmsOutbox.status.in_(FINISHED), SmsOutbox.created_at < before)
    ).rowcount


@dataclass(frozen=True, kw_only=True)
class SenderRules:
    """How the sender retries (the settings' defaults and meaning: demo/conf/settings.py)."""

    attempts: int  # tries before a text is given up and its code voided
    retry_delay: float  # seconds before the first retry; doubles with each try
    lease: float = 60.0  # not a setting: seconds a claim holds a row, longer than any send may take
    batch: int = 10  # not a setting: rows claimed (and sent concurrently) at a time

    @classmethod
    def from_settings(cls, settings: Settings) -> SenderRules:
        """ValueError naming the setting for a bad attempt count or delay."""
        return cls(
            attempts=settings.sms_send_attempts, retry_delay=settings.sms_retry_delay,
            # A claim must outlive the slowest send, or another process could send the same text again.
            lease=max(cls.lease, 4 * settings.sms_gateway_timeout),
        )

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.retry_delay <= 0:
            raise ValueError("sms_send_attempts must be at least 1 and sms_retry_delay above 0")

    def delay(self, attempts: int) -> dt.timedelta:
        return dt.timedelta(seconds=self.retry_delay * 2 ** (attempts - 1))


@dataclass(frozen=True)
class Claimed:
    id: int
    attempts: int  # this try's number; also fences the settle against a later claim of the same row
    sms_code_id: int
    message: SmsMessage


class Sender:
    """Drains the outbox of one process; ``start`` and ``stop`` run on the event loop."""

    def __init__(self, db: Database, backend: SmsBackend, metrics: Metrics, clock: Clock,
                 rules: SenderRules) -> None:
        self.db = db
        self.backend = backend
        self.metrics = metrics
        self.clock = clock
        self.rules = rules
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._database_down = False

    def wake(self) -> None:
        """A text was committed in this process: send it now rather than at the next poll."""
        self._wake.set()

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, timeout: float = 10.0) -> None:
        """Let the sends in flight finish (within ``timeout``), then stop; the rest wait in the database."""
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(self._task, timeout)
        except TimeoutError:
            log.warning("SMS outbox: sends still in flight at shutdown; they will be retried")
        self._task = None

    async def _run(self) -> None:
        while not self._stopping:
            await self._drain_logged()
            try:
                await asyncio.wait_for(self._wake.wait(), POLL_EVERY)
            except TimeoutError:
                pass
            self._wake.clear()  # before draining: a wake from now on triggers one more drain

    async def _drain_logged(self) -> None:
        try:
            await self.drain()
        except Unavailable:  # the database is down: try again at the next poll, and say so once
            if not self._database_down:
                log.warning("SMS outbox: cannot reach the database; texts wait")
            self._database_down = True
        except Exception:  # never let the sender die: its rows are retried once their claim lapses
            log.exception("SMS outbox: drain failed")
        else:
            if self._database_down:
                log.info("SMS outbox: database back; sending")
            self._database_down = False

    async def drain(self) -> int:
        """Send every due text, batch by batch; the number of rows handled."""
        handled = 0
        while True:
            claimed, dead, waiting = await self.db.run(self._claim, self.clock.now())
            self.metrics.sms_outbox_pending.set(waiting)
            handled += dead
            if not claimed:
                if dead:
                    continue  # a batch of dead texts only: more may be due behind it
                return handled
            errors = await asyncio.gather(*(self._send(row) for row in claimed))
            await self.db.run(self._settle, list(zip(claimed, errors)), self.clock.now())
            handled += len(claimed)
            if self._stopping:  # shutting down: the rest waits for the next sender
                return handled

    def _claim(self, s: Session, now: dt.datetime) -> tuple[list[Claimed], int, int]:
        """Claim the due rows whose code still lives; settle the others as failed, unsent (a text late
        by an outage, or for a code used or replaced since, would only mislead). Returns the claimed
        rows, the number settled unsent, and the backlog."""
        # A plain subquery: FOR UPDATE locks the outbox rows only, never the codes a request is checking.
        code_expires = select(SmsCode.expires_at).where(SmsCode.id == SmsOutbox.sms_code_id).scalar_subquery()
        rows = s.execute(
            select(SmsOutbox, code_expires)
            .where(SmsOutbox.status.in_(WAITING), SmsOutbox.next_attempt_at <= now)
            # No ORDER BY: MariaDB would lock every due row to sort them, starving the other senders;
            # the (status, next_attempt_at) index yields pending rows, oldest first, then lapsed claims.
            .limit(self.rules.batch)
            .with_for_update(skip_locked=True)  # another sender's rows are skipped, never waited for
        ).all()
        claimed, dead = [], 0
        for row, expires_at in rows:
            if expires_at is None or expires_at <= now:
                row.status, row.code, row.text, row.last_error = FAILED, None, "", "code expired before sending"
                log.warning("SMS to %s not sent: its code expired, was used or was replaced first",
                            mask_phone(row.phone))
                dead += 1
                continue
            row.status, row.attempts = SENDING, row.attempts + 1
            row.next_attempt_at = now + dt.timedelta(seconds=self.rules.lease)
            claimed.append(Claimed(row.id, row.attempts, row.sms_code_id,
                                   SmsMessage(row.phone, row.purpose, row.code, row.text, isoformat(row.created_at))))
        return claimed, dead, backlog(s)

    async def _send(self, row: Claimed) -> str | None:
        """None when the backend took the text, else why not (logged and counted)."""
        try:
            await self.backend.send(row.message)
        except Exception as error:  # noqa: BLE001 - any failure of any backend is a failed try
            self.metrics.sms_failed.inc()
            log.warning("SMS to %s failed (try %d of %d): %s", mask_phone(row.message.phone), row.attempts,
                        self.rules.attempts, error)
            return f"{error.__class__.__name__}: {error}"[:255]
        self.metrics.sms_sent.inc()
        return None

    def _settle(self, s: Session, outcomes: list[tuple[Claimed, str | None]], now: dt.datetime) -> None:
        for row, error in outcomes:
            mine = update(SmsOutbox).where(SmsOutbox.id == row.id, SmsOutbox.status == SENDING,
                                           SmsOutbox.attempts == row.attempts)
            if error is None:
                s.execute(mine.values(status=SENT, sent_at=now, code=None, text="", last_error=None))
            elif row.attempts < self.rules.attempts:
                s.execute(mine.values(status=PENDING, next_attempt_at=now + self.rules.delay(row.attempts),
                                      last_error=error))
            elif s.execute(mine.values(status=FAILED, code=None, text="", last_error=error)).rowcount:
                # Nobody received this code: it must not stay usable (nor be guessed at for its lifetime).
                s.execute(update(SmsCode).where(SmsCode.id == row.sms_code_id, SmsCode.expires_at > now)
                          .values(expires_at=now))
                log.error("SMS to %s given up after %d tries; its code is void",
                          mask_phone(row.message.phone), row.attempts)
