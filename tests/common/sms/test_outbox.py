"""demo/common/sms/outbox.py: a ``Sender`` drains the outbox that ``Accounts.request_code`` fills, on
SQLite and MariaDB, through a fake backend, then through the providers' stand-ins (failover, give-up,
what the rows record; one test over HTTP with the sender running as the server runs it)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from sqlalchemy import select, update
from tornado.testing import bind_unused_port

from demo.common.sms.backends import text_language
from demo.common.sms.outbox import Sender, SenderRules
from demo.conf import settings as config
from demo.main import make_server
from demo.models import SmsCode, SmsOutbox
from tests.helpers import Api

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


# -- through the providers' stand-ins (tests/sms_standins.py) ------------------------------------------


@pytest.fixture
def providers_app(build_app, settings, sms_providers):
    """An app sending through tencent, then aliyun (their stand-ins), one second each before the next."""
    return build_app(settings.replace(**sms_providers.settings("tencent,aliyun", sms_gateway_timeout=0.5)))


def provider_count(app, provider: str, result: str) -> float:
    value = app.services.metrics.registry.get_sample_value(
        "demo_sms_provider_sends_total", {"provider": provider, "result": result}
    )
    return value or 0.0


@gen_test
async def test_a_code_goes_out_through_the_first_provider_and_works(providers_app, sms_providers):
    accounts = providers_app.services.accounts
    await accounts.request_code("18866668888", "regist", "127.0.0.1")
    assert await providers_app.services.sender.drain() == 1
    [sent] = sms_providers.tencent.accepted
    assert sent["template"] == "1001" and sms_providers.aliyun.accepted == []  # no language yet: the default
    [row] = outbox_rows(providers_app)
    assert (row.status, row.attempts, row.provider, row.message_id, row.last_error) == (
        "sent",
        1,
        "tencent",
        sent["id"],
        None,
    )
    grant = await accounts.register("18866668888", "demo123456", sent["code"], "127.0.0.1")
    assert grant.token  # the code the provider carried is the one the server checks
    assert provider_count(providers_app, "tencent", "ok") == 1
    assert b'demo_sms_provider_sends_total{provider="tencent",result="ok"} 1.0' in (
        providers_app.services.metrics.exposition()
    )


@gen_test
async def test_the_rows_language_picks_the_template(providers_app, sms_providers):
    await providers_app.services.accounts.request_code("18866668888", "regist", "127.0.0.1")
    providers_app.services.db.run_sync(lambda s: s.execute(update(SmsOutbox).values(lang="zh-CN")))
    await providers_app.services.sender.drain()
    assert [m["template"] for m in sms_providers.tencent.accepted] == ["2001"]


@pytest.mark.parametrize("trouble", ["error", "timeout"])
@gen_test
async def test_a_failing_or_silent_provider_hands_the_text_to_the_next_in_the_same_try(
    providers_app, sms_providers, trouble
):
    if trouble == "error":
        sms_providers.tencent.fail = "InternalError.ServerError"
    else:
        sms_providers.tencent.hang = 5
    await providers_app.services.accounts.request_code("18866668888", "regist", "127.0.0.1")
    assert await providers_app.services.sender.drain() == 1
    [sent] = sms_providers.aliyun.accepted
    assert sms_providers.tencent.accepted == [] and sent["template"] == "SMS_1001"
    [row] = outbox_rows(providers_app)
    assert (row.status, row.attempts, row.provider, row.message_id) == ("sent", 1, "aliyun", sent["id"])
    why = "InternalError.ServerError" if trouble == "error" else "no answer within 0.5s"
    assert row.last_error.startswith(f"tencent: {why}")  # what went wrong on the way is kept
    assert (provider_count(providers_app, "tencent", trouble), provider_count(providers_app, "aliyun", "ok")) == (1, 1)


@gen_test
async def test_when_every_provider_fails_the_try_is_retried_then_given_up_and_the_code_voided(
    providers_app, sms_providers
):
    clock, accounts = providers_app.services.clock, providers_app.services.accounts
    sms_providers.tencent.fail = "InternalError.ServerError"
    sms_providers.aliyun.fail = "isp.SYSTEM_ERROR"
    await accounts.request_code("18866668888", "regist", "127.0.0.1")
    down = sender(providers_app, providers_app.services.sender.backend, attempts=2, retry_delay=1.0)
    assert await down.drain() == 1
    [row] = outbox_rows(providers_app)
    assert (row.status, row.attempts, row.provider) == ("pending", 1, None)
    assert row.last_error.startswith("tencent: InternalError.ServerError") and "; aliyun: isp.SYSTEM_ERROR" in (
        row.last_error
    )
    clock.advance(1.0)
    assert await down.drain() == 1
    [row] = outbox_rows(providers_app)
    assert (row.status, row.attempts, row.provider, row.code) == ("failed", 2, None, None)
    code = providers_app.services.db.run_sync(lambda s: s.scalars(select(SmsCode)).one())
    assert code.expires_at == clock.now()  # no provider took it: it cannot be used
    assert sms_providers.tencent.accepted == sms_providers.aliyun.accepted == []
    assert provider_count(providers_app, "tencent", "error") == provider_count(providers_app, "aliyun", "error") == 2


@gen_test
async def test_a_number_a_provider_refuses_is_given_up_at_once(providers_app, sms_providers):
    sms_providers.tencent.reject_number = "InvalidParameterValue.IncorrectPhoneNumber"
    await providers_app.services.accounts.request_code("18866668888", "regist", "127.0.0.1")
    assert providers_app.services.sender.rules.attempts == 5
    assert await providers_app.services.sender.drain() == 1
    [row] = outbox_rows(providers_app)
    assert (row.status, row.attempts) == ("failed", 1)  # no retry, no other provider
    assert row.last_error.startswith("tencent: InvalidParameterValue.IncorrectPhoneNumber")
    assert sms_providers.aliyun.accepted == [] and sms_providers.aliyun.refused == []
    code = providers_app.services.db.run_sync(lambda s: s.scalars(select(SmsCode)).one())
    assert code.expires_at == providers_app.services.clock.now()
    assert provider_count(providers_app, "tencent", "rejected") == 1


@pytest.mark.parametrize(
    ("first", "code"),
    [("tencent", "LimitExceeded.PhoneNumberOneHourLimit"), ("aliyun", "isv.BUSINESS_LIMIT_CONTROL")],
)
@gen_test
async def test_a_number_over_a_providers_own_limit_is_given_up_at_once(build_app, settings, sms_providers, first, code):
    other = "aliyun" if first == "tencent" else "tencent"
    app = build_app(settings.replace(**sms_providers.settings(f"{first},{other}", sms_gateway_timeout=0.5)))
    if first == "tencent":
        sms_providers.tencent.reject_number = code  # Tencent says it in the number's status
    else:
        sms_providers.aliyun.fail = code  # Alibaba in the answer's Code
    await app.services.accounts.request_code("18866668888", "regist", "127.0.0.1")
    assert app.services.sender.rules.attempts == 5
    assert await app.services.sender.drain() == 1
    [row] = outbox_rows(app)
    assert (row.status, row.attempts, row.code) == ("failed", 1, None)  # no retry
    assert row.last_error.startswith(f"{first}: {code}")
    spare = getattr(sms_providers, other)
    assert spare.accepted == [] and spare.refused == []  # no other provider texted the number
    sms_code = app.services.db.run_sync(lambda s: s.scalars(select(SmsCode)).one())
    assert sms_code.expires_at == app.services.clock.now()  # the code is void
    assert (provider_count(app, first, "limited"), provider_count(app, other, "ok")) == (1, 0)


@gen_test
async def test_stopping_the_sender_closes_the_providers_clients(providers_app, sms_providers):
    await providers_app.services.accounts.request_code("18866668888", "regist", "127.0.0.1")
    sender_ = providers_app.services.sender
    sender_.start()
    await sender_.drain()
    [(_, tencent), _] = sender_.backend.backends
    client = tencent.client._client
    assert client is not None
    await sender_.stop()
    assert tencent.client._client is None and client._closed


@gen_test
async def test_a_notice_goes_out_with_its_own_template(providers_app, sms_providers, user_phone_registered):
    await providers_app.services.accounts.request_code("18866668888", "regist", "127.0.0.1")
    await providers_app.services.sender.drain()
    assert [(m["template"], m["params"]) for m in sms_providers.tencent.accepted][-1] == ("1006", [])


@pytest.fixture
def user_phone_registered(providers_app, sms_providers, io_loop):
    """+8618866668888 has an account (registered through the stand-ins; their records are then cleared)."""

    async def register() -> None:
        accounts = providers_app.services.accounts
        await accounts.request_code("18866668888", "regist", "127.0.0.1")
        await providers_app.services.sender.drain()
        await accounts.register(
            "18866668888", "demo123456", sms_providers.tencent.codes("+8618866668888")[-1], "1.2.3.4"
        )
        providers_app.services.clock.advance(providers_app.services.accounts.rules.resend_after)
        sms_providers.tencent.accepted.clear()

    io_loop.run_sync(register)


@gen_test
async def test_over_http_the_code_a_provider_carried_registers(providers_app, sms_providers):
    """The whole path: POST /users/code answers, the running sender hands the text to the stand-in,
    and the code it carried registers."""
    server = make_server(providers_app)
    sock, port = bind_unused_port()
    server.add_sockets([sock])
    providers_app.services.sender.start()
    api = Api(f"http://127.0.0.1:{port}")
    try:
        assert (await api.post("/users/code", {"phone": "18866668888"})).code == 200
        deadline = time.monotonic() + 10
        while not sms_providers.tencent.codes(E164):
            assert time.monotonic() < deadline, "no text reached the stand-in"
            await asyncio.sleep(0.01)
        [code] = sms_providers.tencent.codes(E164)
        registered = await api.post("/users/regist", {"phone": "18866668888", "password": "demo123456", "code": code})
        assert registered.code == 201, registered.body
    finally:
        api.close()
        server.stop()
        await server.close_all_connections()
        await providers_app.services.sender.stop()


def test_a_claim_outlives_every_backend_of_the_list_timing_out_in_turn():
    rules = SenderRules.from_settings(config.defaults(sms_backend="tencent,aliyun,http", sms_gateway_timeout=20.0))
    assert rules.lease == 3 * 4 * 20.0  # else another sender could claim a text still being tried, and send it twice
    assert SenderRules.from_settings(config.defaults(sms_backend="aliyun")).lease == 60.0
    assert rules.default_language == text_language(None, config.defaults())  # "en" until default_language exists
