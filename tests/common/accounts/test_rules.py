"""demo/common/accounts/rules.py without HTTP: ``Accounts`` driven directly, on SQLite and MariaDB."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import func, select

from demo.common.accounts import queries
from demo.common.accounts.rules import Accounts
from demo.common.errors import InvalidCode, InvalidCredentials, PhoneTaken, RateLimited, Unauthorized
from demo.common.infra.ratelimit import Window
from demo.models import RateCounter

gen_test = pytest.mark.gen_test(timeout=60)
PHONE, E164, PASSWORD, IP = "18866668888", "+8618866668888", "demo123456", "198.51.100.7"


@pytest.fixture
def accounts(app) -> Accounts:
    return app.services.accounts


def with_rules(app, **rules) -> Accounts:
    """``app``'s accounts with other rules."""
    accounts = app.services.accounts
    return Accounts(
        accounts.db,
        accounts.passwords,
        accounts.sender,
        code_key=accounts.code_key,
        rules=dataclasses.replace(accounts.rules, **rules),
        clock=app.services.clock,
    )


async def code_for(app, outbox, phone: str = E164) -> str:
    await app.services.sender.drain()  # no HTTP server here: send the queued texts now
    return await outbox.code(phone)


async def register(app, outbox, accounts: Accounts, password: str = PASSWORD):
    await accounts.request_code(PHONE, "regist", IP)
    return await accounts.register(PHONE, password, await code_for(app, outbox), IP)


@gen_test
async def test_register_signs_the_new_user_in(app, outbox, accounts):
    grant = await register(app, outbox, accounts)
    assert grant.user["phone"] == E164 and grant.user["id"] and grant.user["created_at"].endswith("Z")
    assert grant.expires_in == accounts.rules.token_ttl and grant.h5_ticket
    principal = await accounts.authenticate(grant.token)
    assert (principal.session_id, principal.phone) == (grant.session_id, E164)
    assert await app.services.h5.exchange(grant.h5_ticket)  # the ticket is good
    profile = await accounts.profile(principal)
    assert profile == {**grant.user, "last_login_at": grant.user["created_at"], "image_count": 0}


@gen_test
async def test_register_with_a_wrong_code_is_refused_before_hashing(app, outbox, accounts, monkeypatch):
    await accounts.request_code(PHONE, "regist", IP)
    good = await code_for(app, outbox)
    monkeypatch.setattr(accounts.passwords, "hash", lambda password: pytest.fail("hashed"))
    with pytest.raises(InvalidCode):
        await accounts.register(PHONE, PASSWORD, "000000" if good != "000000" else "111111", IP)


@gen_test
async def test_register_of_a_phone_registered_meanwhile_is_phone_taken(app, outbox, accounts):
    await accounts.request_code(PHONE, "regist", IP)
    code = await code_for(app, outbox)
    # Another request registers the phone between this one's code check and its insert.
    checks, now = Window("code:ip:x", 1, 3600), app.services.clock.now()
    grant = queries.NewGrant("t" * 64, now, "k" * 64, now)
    await app.services.db.run(queries.register, "other-public-id", E164, "hash", checks, now, grant, now)
    with pytest.raises(PhoneTaken):
        await accounts.register(PHONE, PASSWORD, code, IP)


@gen_test
async def test_login_logout_and_wrong_passwords(app, outbox, accounts):
    registered = await register(app, outbox, accounts)
    grant = await accounts.login(PHONE, PASSWORD, IP)
    assert grant.user == registered.user and grant.token != registered.token
    principal = await accounts.authenticate(grant.token)
    await accounts.logout(principal)
    with pytest.raises(Unauthorized):
        await accounts.authenticate(grant.token)
    await accounts.authenticate(registered.token)  # the other session lives on
    with pytest.raises(InvalidCredentials):
        await accounts.login(PHONE, "wrong-password", IP)
    with pytest.raises(InvalidCredentials):
        await accounts.login("13900000000", PASSWORD, IP)  # no such user: the same answer


@gen_test
async def test_login_failures_of_one_client_are_limited_and_a_good_login_clears_them(app, outbox):
    accounts = with_rules(app, login_phone_failures=3)
    await register(app, outbox, accounts)
    for _ in range(2):
        with pytest.raises(InvalidCredentials):
            await accounts.login(PHONE, "wrong-password", IP)
    await accounts.login(PHONE, PASSWORD, IP)  # the third attempt: within the limit
    for _ in range(3):  # the good login cleared the client's failures: three more tries
        with pytest.raises(InvalidCredentials):
            await accounts.login(PHONE, "wrong-password", IP)
    with pytest.raises(RateLimited):
        await accounts.login(PHONE, PASSWORD, IP)
    await accounts.login(PHONE, PASSWORD, "198.51.100.8")  # another client is not held up


@gen_test
async def test_reset_changes_the_password_and_ends_every_session(app, outbox, accounts):
    grant = await register(app, outbox, accounts)
    app.services.clock.advance(accounts.rules.resend_after)
    await accounts.request_code(PHONE, "reset", IP)
    code = await code_for(app, outbox)
    await accounts.reset_password(PHONE, code, "new-password-1", IP)
    with pytest.raises(Unauthorized):
        await accounts.authenticate(grant.token)
    with pytest.raises(InvalidCredentials):
        await accounts.login(PHONE, PASSWORD, IP)
    await accounts.login(PHONE, "new-password-1", IP)
    with pytest.raises(InvalidCode):  # the code is spent
        await accounts.reset_password(PHONE, code, "new-password-2", IP)


@gen_test
async def test_a_second_code_request_within_resend_after_is_refused(app, outbox, accounts):
    await accounts.request_code(PHONE, "regist", IP)
    with pytest.raises(RateLimited) as refused:
        await accounts.request_code(PHONE, "regist", IP)
    assert 0 < refused.value.retry_after <= accounts.rules.resend_after
    app.services.clock.advance(accounts.rules.resend_after)
    await accounts.request_code(PHONE, "regist", IP)
    counted = await app.services.db.run(
        lambda s: s.scalar(select(func.sum(RateCounter.count)).where(RateCounter.key == f"sms:phone:{E164}"))
    )
    assert counted == 2  # the refused request counted nowhere
