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

A try hands the text to the backends of ``sms_backend`` in order (``backends.Failover``): it fails only
when every one failed, and is then retried until ``sms_send_attempts``; a provider that refuses the
number itself, or says the number hit its own per-number limit, ends it at once (no other provider, no
retry, the code void). A provider that does not answer in time may have sent the text all the same:
failing over (or retrying) after a time-out can deliver a text twice. That is deliberate, delivery is
at least once: an unsent code is worse than a duplicate text. A sent row keeps the provider that took
it and its message id; any row keeps, in ``last_error``, what each provider that failed said.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from demo.common.accounts.phones import mask_phone
from demo.common.errors import Unavailable
from demo.common.infra.clock import Clock, isoformat
from demo.common.infra.db import Database
from demo.common.infra.metrics import Metrics
from demo.common.sms import queries
from demo.common.sms.backends import Delivery, SmsFailed, SmsMessage, parse_backends, text_language
from demo.common.sms.queries import FAILED, PENDING, SENT, backlog

if TYPE_CHECKING:
    from demo.common.sms.backends import Failover, SmsBackend
    from demo.conf.settings import Settings

__all__ = ["POLL_EVERY", "Claimed", "Sender", "SenderRules", "backlog"]  # backlog: a unit of work for Database.run
log = logging.getLogger("demo.sms")
POLL_EVERY = 1.0  # seconds between looks for other processes' rows and for retries


@dataclass(frozen=True, kw_only=True)
class SenderRules:
    """How the sender retries (the settings' defaults and meaning: demo/conf/settings.py)."""

    attempts: int  # tries before a text is given up and its code voided
    retry_delay: float  # seconds before the first retry; doubles with each try
    default_language: str  # the language of a text whose row names none
    lease: float = 60.0  # not a setting: seconds a claim holds a row, longer than any send may take
    batch: int = 10  # not a setting: rows claimed (and sent concurrently) at a time

    @classmethod
    def from_settings(cls, settings: Settings) -> SenderRules:
        """ValueError naming the setting for a bad attempt count or delay."""
        return cls(
            attempts=settings.sms_send_attempts,
            retry_delay=settings.sms_retry_delay,
            # A claim must outlive the slowest send (every backend of the list timing out in turn), or
            # another process could send the same text again.
            lease=max(cls.lease, 4 * settings.sms_gateway_timeout * len(parse_backends(settings.sms_backend))),
            default_language=text_language(None, settings),
        )

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.retry_delay <= 0:
            raise ValueError("sms_send_attempts must be at least 1 and sms_retry_delay above 0")

    def delay(self, attempts: int) -> dt.timedelta:
        return dt.timedelta(seconds=self.retry_delay * 2 ** (attempts - 1))


@dataclass(frozen=True)
class Tried:
    """One try of a text: who took it (None: nobody), what failed on the way, and whether it was final
    (the number refused, or over a provider's per-number limit: the text is then given up at once)."""

    delivery: Delivery | None
    error: str | None = None
    final: bool = False


@dataclass(frozen=True)
class Claimed:
    id: int
    attempts: int  # this try's number; also fences the settle against a later claim of the same row
    sms_code_id: int
    message: SmsMessage


class Sender:
    """Drains the outbox of one process; ``start`` and ``stop`` run on the event loop."""

    def __init__(
        self, db: Database, backend: Failover | SmsBackend, metrics: Metrics, clock: Clock, rules: SenderRules
    ) -> None:
        self.db = db
        self.backend = backend
        self.metrics = metrics
        self.clock = clock
        self.rules = rules
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._database_down = False

    def wake(self) -> None:
        """A text was committed in this process: send it now rather than at the next poll."""
        self._wake.set()

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, timeout: float = 10.0) -> None:
        """Let the sends in flight finish (within ``timeout``), then stop; the rest wait in the database.
        The backends' HTTP clients are closed last."""
        if self._task is not None:
            self._stopping = True
            self._wake.set()
            try:
                await asyncio.wait_for(self._task, timeout)
            except TimeoutError:
                log.warning("SMS outbox: sends still in flight at shutdown; they will be retried")
            self._task = None
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    async def _run(self) -> None:
        while not self._stopping:
            await self._drain_logged()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_EVERY)
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
            claimed, dead, waiting = await self.claim(self.clock.now())
            self.metrics.sms_outbox_pending.set(waiting)
            handled += dead
            if not claimed:
                if dead:
                    continue  # a batch of dead texts only: more may be due behind it
                return handled
            errors = await asyncio.gather(*(self._send(row) for row in claimed))
            await self.settle(list(zip(claimed, errors, strict=True)), self.clock.now())
            handled += len(claimed)
            if self._stopping:  # shutting down: the rest waits for the next sender
                return handled

    async def claim(self, now: dt.datetime) -> tuple[list[Claimed], int, int]:
        """Claim the due rows whose code still lives; settle the others as failed, unsent (a text late
        by an outage, or for a code used or replaced since, would only mislead). Returns the claimed
        rows, the number settled unsent, and the backlog."""
        lease_until = now + dt.timedelta(seconds=self.rules.lease)
        found = await self.db.run(queries.claim_due, now, lease_until, self.rules.batch)
        for row in found.dead:
            log.warning("SMS to %s not sent: its code expired, was used or was replaced first", mask_phone(row.phone))
        claimed = [
            Claimed(
                row.id,
                row.attempts,
                row.sms_code_id,
                SmsMessage(
                    row.phone,
                    row.purpose,
                    row.code,
                    row.text,
                    isoformat(row.created_at) or "",
                    row.lang or self.rules.default_language,
                ),
            )
            for row in found.claimed
        ]
        return claimed, len(found.dead), found.backlog

    async def settle(self, outcomes: list[tuple[Claimed, Tried]], now: dt.datetime) -> None:
        """Record how each claimed try ended."""
        settled = []
        for row, tried in outcomes:
            if tried.delivery is not None:
                status, retry_at = SENT, None
            elif row.attempts < self.rules.attempts and not tried.final:
                status, retry_at = PENDING, now + self.rules.delay(row.attempts)
            else:
                status, retry_at = FAILED, None
            delivery = tried.delivery or Delivery("")
            settled.append(
                queries.Outcome(
                    row.id,
                    row.attempts,
                    row.sms_code_id,
                    status,
                    tried.error,
                    retry_at,
                    delivery.provider or None,
                    delivery.message_id,
                )
            )
        given_up = {outcome.id for outcome in await self.db.run(queries.settle, settled, now)}
        for row, _ in outcomes:
            if row.id in given_up:
                log.error(
                    "SMS to %s given up after %d tries; its code is void", mask_phone(row.message.phone), row.attempts
                )

    async def _send(self, row: Claimed) -> Tried:
        """How this try went (logged and counted)."""
        try:
            delivered = await self.backend.send(row.message)
        except Exception as error:
            self.metrics.sms_failed.inc()
            failed = error if isinstance(error, SmsFailed) else None
            final = (
                ""
                if failed is None or not failed.final
                else ", the number refused: given up"
                if failed.rejected
                else ", over the provider's limit for the number: given up"
            )
            log.warning(
                "SMS to %s failed (try %d of %d%s): %s",
                mask_phone(row.message.phone),
                row.attempts,
                self.rules.attempts,
                final,
                error,
                exc_info=failed is None,  # not SmsFailed: a bug of a lone backend, its traceback once
            )
            # SmsFailed names the provider(s) and what each said; anything else is a bug: name its class.
            why = str(error) if failed is not None else f"{error.__class__.__name__}: {error}"
            return Tried(None, why[:255], bool(final))
        self.metrics.sms_sent.inc()
        if isinstance(delivered, Delivery):
            return Tried(delivered, delivered.error)
        return Tried(Delivery("", delivered), None)  # a lone backend (tests): no name to record
