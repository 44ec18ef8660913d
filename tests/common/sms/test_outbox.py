"""demo/common/sms/outbox.py without HTTP: a ``Sender`` with a fake backend drains the outbox that
``Accounts.request_code`` fills, on SQLite and MariaDB."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import select

from demo.common.sms.outbox import Sender
from demo.models import SmsCode, SmsOutbox

gen_test = pytest.mark.gen_test(timeout=60)
E164 = "+8618866668888"


class Backend:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.sent: list = []

    async def send(self, message) -> None:
        if self.fail:
            raise ConnectionError("gateway down")
        self.sent.append(message)


def sender(app, backend: Backend, **rules) -> Sender:
    """A sender of ``app``'s outbox through ``backend``, with ``app``'s rules changed by ``rules``."""
    return Sender(
        app.services.db,
        backend,
        app.services.metrics,
        app.services.clock,
        dataclasses.replace(app.services.sender.rules, **rules),
    )


def outbox_rows(app) -> list[SmsOutbox]:
    return app.services.db.run_sync(lambda s: list(s.scalars(select(SmsOutbox).order_by(SmsOutbox.id))))


@gen_test
async def test_drain_sends_each_text_once_and_blanks_it(app):
    await app.services.accounts.request_code("18866668888", "regist", "127.0.0.1")
    backend = Backend()
    assert await sender(app, backend).drain() == 1
    [message] = backend.sent
    assert message.phone == E164 and message.code and message.code in message.text
    [row] = outbox_rows(app)
    assert (row.status, row.attempts, row.code, row.text) == ("sent", 1, None, "")
    assert row.sent_at == app.services.clock.now()
    assert await sender(app, backend).drain() == 0 and len(backend.sent) == 1


@gen_test
async def test_a_failing_gateway_is_retried_then_given_up_and_the_code_voided(app):
    clock = app.services.clock
    await app.services.accounts.request_code("18866668888", "regist", "127.0.0.1")
    down = sender(app, Backend(fail=True), attempts=2, retry_delay=1.0)
    assert await down.drain() == 1
    [row] = outbox_rows(app)
    assert (row.status, row.attempts, row.last_error) == ("pending", 1, "ConnectionError: gateway down")
    assert await down.drain() == 0  # not due yet
    clock.advance(1.0)
    assert await down.drain() == 1
    [row] = outbox_rows(app)
    assert (row.status, row.attempts, row.code, row.text) == ("failed", 2, None, "")
    code = app.services.db.run_sync(lambda s: s.scalars(select(SmsCode)).one())
    assert code.expires_at == clock.now()  # nobody received it: it cannot be used


@gen_test
async def test_a_text_whose_code_died_while_it_waited_is_settled_unsent(app):
    await app.services.accounts.request_code("18866668888", "regist", "127.0.0.1")
    app.services.clock.advance(app.services.accounts.rules.code_ttl)
    backend = Backend()
    assert await sender(app, backend).drain() == 1 and backend.sent == []
    [row] = outbox_rows(app)
    assert (row.status, row.last_error, row.code) == ("failed", "code expired before sending", None)
