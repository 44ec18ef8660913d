"""Accounts (views/users_*): SMS codes, registration, login, logout, reset, profile — on both databases."""
from __future__ import annotations

import asyncio
import json

import pytest
from sqlalchemy import func, select
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

from demo.common.passwords import Passwords
from demo.models import User

PHONE, E164, PASSWORD = "18866668888", "+8618866668888", "demo123456"
gen_test = pytest.mark.gen_test(timeout=60)


def count_users(app) -> int:
    return app.services.db.run_sync(lambda s: s.scalar(select(func.count()).select_from(User)))


# -- the seed's flow -------------------------------------------------------------------------------


@gen_test
async def test_seed_example_registers_with_the_code_from_the_outbox(api, outbox, app):
    sent = await api.post("/users/code", {"phone": PHONE, "purpose": "regist"})
    assert sent.code == 200
    assert sent.json == {"expires_in": 300, "resend_after": 60}
    message = outbox.last(E164)
    assert message["purpose"] == "regist" and len(message["code"]) == 6 and message["code"].isdigit()
    assert message["code"] in message["text"] and message["sent_at"].endswith("Z")

    response = await api.post("/users/regist", {"phone": PHONE, "password": PASSWORD, "code": message["code"]})
    assert response.code == 201, response.body
    body = response.json
    assert set(body) == {"user", "token", "token_type", "expires_in", "h5_url"}
    assert body["user"]["phone"] == E164 and isinstance(body["user"]["id"], int)
    assert body["user"]["created_at"].endswith("Z")
    assert body["token_type"] == "Bearer" and body["expires_in"] == 30 * 24 * 3600
    assert len(body["token"]) >= 22  # >= 128 bits, URL-safe base64
    assert response.headers["X-Content-Type-Options"] == "nosniff" and response.headers["X-Request-Id"]
    assert count_users(app) == 1


@gen_test
async def test_e164_input_is_accepted_and_answers_are_e164(api, outbox):
    response = await api.register(outbox, phone=E164)
    assert response.code == 201 and response.json["user"]["phone"] == E164


@pytest.mark.parametrize("phone", ["12345", "1886666888x", "+15555550100", "010-12345678", ""])
@gen_test
async def test_invalid_phones_are_422(api, phone):
    response = await api.post("/users/code", {"phone": phone})
    assert response.code == 422 and response.error == "invalid_phone" and response.json["error"]["field"] == "phone"


@gen_test
async def test_wrong_types_and_bad_json(api):
    wrong_type = await api.post("/users/code", {"phone": 18866668888})
    assert wrong_type.code == 422 and wrong_type.json["error"] == {
        "code": "invalid_field", "message": "'phone' must be a string.", "field": "phone"}
    missing = await api.post("/users/regist", {"phone": PHONE, "password": PASSWORD})
    assert missing.code == 422 and missing.json["error"]["field"] == "code"
    bad_purpose = await api.post("/users/code", {"phone": PHONE, "purpose": "spam"})
    assert bad_purpose.code == 422 and bad_purpose.json["error"]["field"] == "purpose"
    as_json = {"Content-Type": "application/json"}
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        response = await api.post("/users/login", body=body, headers=as_json)
        assert response.code == 400 and response.error == "invalid_json", body
    huge = await api.post("/users/login", body=json.dumps({"phone": "x" * 70000}), headers=as_json)
    assert huge.code == 413 and huge.error == "too_large"


@pytest.mark.parametrize("password", ["short1", "x" * 129, "password123", "qwertyuiop", "Iloveyou1"])
@gen_test
async def test_weak_passwords_are_refused(api, outbox, password):
    await api.post("/users/code", {"phone": PHONE})
    response = await api.post("/users/regist", {"phone": PHONE, "password": password, "code": outbox.code(E164)})
    assert response.code == 422 and response.error == "weak_password" and response.json["error"]["field"] == "password"


# -- SMS code rules ----------------------------------------------------------------------------------


@gen_test
async def test_code_dies_after_five_wrong_tries(api, outbox):
    await api.post("/users/code", {"phone": PHONE})
    good = outbox.code(E164)
    wrong = "000000" if good != "000000" else "111111"
    for _ in range(5):
        response = await api.post("/users/regist", {"phone": PHONE, "password": PASSWORD, "code": wrong})
        assert response.code == 400 and response.error == "invalid_code"
    locked = await api.post("/users/regist", {"phone": PHONE, "password": PASSWORD, "code": good})
    assert locked.code == 400 and locked.error == "invalid_code"


@gen_test
async def test_code_expires_after_five_minutes(api, outbox, clock):
    await api.post("/users/code", {"phone": PHONE})
    clock.advance(301)
    response = await api.post("/users/regist", {"phone": PHONE, "password": PASSWORD, "code": outbox.code(E164)})
    assert response.code == 400 and response.error == "invalid_code"


@gen_test
async def test_code_still_valid_just_before_expiry(api, outbox, clock):
    await api.post("/users/code", {"phone": PHONE})
    clock.advance(299)
    response = await api.post("/users/regist", {"phone": PHONE, "password": PASSWORD, "code": outbox.code(E164)})
    assert response.code == 201


@gen_test
async def test_code_is_bound_to_purpose_and_phone(api, outbox, user, clock):
    clock.advance(61)
    await api.post("/users/code", {"phone": "18866669999", "purpose": "regist"})
    other_code = outbox.code("+8618866669999")
    # A regist code for another phone does not reset this user's password.
    response = await api.post("/users/password/reset", {"phone": PHONE, "code": other_code, "password": "new pass 1234"})
    assert response.code == 400 and response.error == "invalid_code"
    # Nor does it reset the phone it was sent to (wrong purpose).
    response = await api.post("/users/password/reset",
                              {"phone": "18866669999", "code": other_code, "password": "new pass 1234"})
    assert response.code == 400


@gen_test
async def test_code_is_single_use(api, outbox, user, clock):
    clock.advance(61)
    await api.post("/users/code", {"phone": PHONE, "purpose": "reset"})
    code = outbox.code(E164)
    first = await api.post("/users/password/reset", {"phone": PHONE, "code": code, "password": "first new pass"})
    second = await api.post("/users/password/reset", {"phone": PHONE, "code": code, "password": "second new pass"})
    assert (first.code, second.code) == (204, 400)


@gen_test
async def test_new_code_replaces_the_previous_one(api, outbox, clock):
    await api.post("/users/code", {"phone": PHONE})
    old = outbox.code(E164)
    clock.advance(61)
    await api.post("/users/code", {"phone": PHONE})
    new = outbox.code(E164)
    if old != new:
        stale = await api.post("/users/regist", {"phone": PHONE, "password": PASSWORD, "code": old})
        assert stale.code == 400
    assert (await api.post("/users/regist", {"phone": PHONE, "password": PASSWORD, "code": new})).code == 201


@gen_test
async def test_resend_waits_sixty_seconds(api, clock):
    assert (await api.post("/users/code", {"phone": PHONE})).code == 200
    clock.advance(20)
    again = await api.post("/users/code", {"phone": PHONE, "purpose": "reset"})
    assert again.code == 429 and again.error == "rate_limited"
    assert int(again.headers["Retry-After"]) == 40
    clock.advance(40)
    assert (await api.post("/users/code", {"phone": PHONE})).code == 200


@pytest.mark.settings(sms_phone_daily=3)
@gen_test
async def test_daily_quota_per_phone(api, clock, outbox):
    clock._now = clock.now().replace(hour=1, minute=0, second=0, microsecond=0)
    for _ in range(3):
        assert (await api.post("/users/code", {"phone": PHONE})).code == 200
        clock.advance(61)
    refused = await api.post("/users/code", {"phone": PHONE})
    assert refused.code == 429 and refused.error == "rate_limited"
    assert 0 < int(refused.headers["Retry-After"]) <= 23 * 3600
    assert len(outbox.messages()) == 3
    clock.advance(23 * 3600)  # a new UTC day
    assert (await api.post("/users/code", {"phone": PHONE})).code == 200


@pytest.mark.settings(sms_ip_hourly=3)
@gen_test
async def test_hourly_quota_per_ip(api, clock):
    for n in range(3):
        assert (await api.post("/users/code", {"phone": f"1886666000{n}"})).code == 200
    refused = await api.post("/users/code", {"phone": "18866660009"})
    assert refused.code == 429 and 0 < int(refused.headers["Retry-After"]) <= 3600
    # Behind the proxy, another client IP has its own quota.
    other = await api.post("/users/code", {"phone": "18866660009"}, headers={"X-Real-IP": "203.0.113.7"})
    assert other.code == 200


@gen_test
async def test_regist_code_for_registered_phone_answers_alike_and_texts_a_notice(api, outbox, user, clock):
    clock.advance(61)
    registered = await api.post("/users/code", {"phone": PHONE})
    fresh = await api.post("/users/code", {"phone": "18866669999"})
    assert registered.code == fresh.code == 200 and registered.body == fresh.body
    notice = outbox.last(E164)
    assert notice["code"] is None and "already" in notice["text"]


@gen_test
async def test_reset_code_for_unknown_phone_answers_alike_and_sends_nothing(api, outbox):
    response = await api.post("/users/code", {"phone": "18866669999", "purpose": "reset"})
    assert response.code == 200 and response.json == {"expires_in": 300, "resend_after": 60}
    assert outbox.messages() == []


@pytest.mark.settings(sms_test_numbers="+8618800000000:123456")
@gen_test
async def test_test_numbers_get_a_fixed_code_and_no_text(api, outbox):
    assert (await api.post("/users/code", {"phone": "18800000000"})).code == 200
    assert outbox.messages() == []
    response = await api.post("/users/regist", {"phone": "18800000000", "password": PASSWORD, "code": "123456"})
    assert response.code == 201


@gen_test
async def test_twenty_concurrent_registrations_make_one_account(api, outbox, app):
    await api.post("/users/code", {"phone": PHONE})
    code = outbox.code(E164)
    responses = await asyncio.gather(*[
        api.post("/users/regist", {"phone": PHONE, "password": PASSWORD, "code": code}) for _ in range(20)
    ])
    statuses = sorted(r.code for r in responses)
    assert statuses.count(201) == 1, statuses
    assert all(s in (400, 409) for s in statuses if s != 201), statuses
    assert count_users(app) == 1


# -- login, logout, profile ----------------------------------------------------------------------------


@gen_test
async def test_login_gives_a_working_token(api, user):
    response = await api.post("/users/login", {"phone": PHONE, "password": PASSWORD})
    assert response.code == 200
    token = response.json["token"]
    assert token != user.token
    me = await api.get("/users/me", token=token)
    assert me.code == 200
    profile = me.json["user"]
    assert set(profile) == {"id", "phone", "created_at", "last_login_at", "image_count"}
    assert profile["id"] == user.id and profile["phone"] == E164 and profile["image_count"] == 0


@gen_test
async def test_unknown_phone_and_wrong_password_answer_the_same(api, user):
    unknown = await api.post("/users/login", {"phone": "18866669999", "password": PASSWORD})
    wrong = await api.post("/users/login", {"phone": PHONE, "password": "not the password"})
    assert unknown.code == wrong.code == 401
    assert unknown.body == wrong.body
    assert wrong.error == "invalid_credentials"


@pytest.mark.settings(login_phone_failures=3)
@gen_test
async def test_login_failures_are_limited_per_phone(api, user, clock):
    for _ in range(3):
        assert (await api.post("/users/login", {"phone": PHONE, "password": "wrong password"})).code == 401
    limited = await api.post("/users/login", {"phone": PHONE, "password": PASSWORD})
    assert limited.code == 429 and int(limited.headers["Retry-After"]) > 0
    clock.advance(int(limited.headers["Retry-After"]))
    assert (await api.post("/users/login", {"phone": PHONE, "password": PASSWORD})).code == 200


@pytest.mark.settings(login_ip_failures=3)
@gen_test
async def test_login_failures_are_limited_per_ip(api, user):
    for n in range(3):
        await api.post("/users/login", {"phone": f"1886666000{n}", "password": "wrong password"})
    limited = await api.post("/users/login", {"phone": PHONE, "password": PASSWORD})
    assert limited.code == 429 and limited.error == "rate_limited"
    elsewhere = await api.post("/users/login", {"phone": PHONE, "password": PASSWORD},
                               headers={"X-Forwarded-For": "198.51.100.4"})
    assert elsewhere.code == 200


@gen_test
async def test_logout_kills_the_token(api, user):
    assert (await api.post("/users/logout", token=user.token)).code == 204
    after = await api.get("/users/me", token=user.token)
    assert after.code == 401 and after.error == "unauthorized"
    assert (await api.post("/users/logout", token=user.token)).code == 401


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer nope", "Basic abc", "Bearer " + "A" * 43])
@gen_test
async def test_bad_tokens_are_401(api, header):
    response = await api.get("/users/me", headers={"Authorization": header} if header else {})
    assert response.code == 401 and response.error == "unauthorized"


@gen_test
async def test_tokens_expire(api, user, clock):
    clock.advance(30 * 24 * 3600 + 1)
    assert (await api.get("/users/me", token=user.token)).code == 401


@gen_test
async def test_password_reset_revokes_every_session(api, outbox, user, clock):
    second = (await api.post("/users/login", {"phone": PHONE, "password": PASSWORD})).json["token"]
    clock.advance(61)
    await api.post("/users/code", {"phone": PHONE, "purpose": "reset"})
    reset = await api.post("/users/password/reset",
                           {"phone": PHONE, "code": outbox.code(E164), "password": "a brand new secret"})
    assert reset.code == 204 and reset.body == b""
    for token in (user.token, second):
        assert (await api.get("/users/me", token=token)).code == 401
    assert (await api.post("/users/login", {"phone": PHONE, "password": PASSWORD})).code == 401
    assert (await api.post("/users/login", {"phone": PHONE, "password": "a brand new secret"})).code == 200


@gen_test
async def test_login_rehashes_when_parameters_change(api, user, app):
    app.services.passwords = Passwords(time_cost=3)
    app.services.accounts.passwords = app.services.passwords
    assert (await api.post("/users/login", {"phone": PHONE, "password": PASSWORD})).code == 200
    stored = app.services.db.run_sync(lambda s: s.scalar(select(User.password_hash)))
    assert stored.startswith("$argon2id$") and ",t=3," in stored


@gen_test
async def test_event_loop_stays_free_while_logins_hash(api, user):
    finished: list[str] = []

    async def call(name, coro):
        await coro
        finished.append(name)

    logins = [call(f"login{n}", api.post("/users/login", {"phone": PHONE, "password": PASSWORD})) for n in range(8)]
    tasks = [asyncio.ensure_future(c) for c in logins]
    await asyncio.sleep(0.005)  # the logins are in flight (hashing) before the health check starts
    await call("healthz", api.get("/healthz"))
    await asyncio.gather(*tasks)
    assert finished[0] == "healthz", finished


# -- SMS gateway backend ---------------------------------------------------------------------------


class FakeProvider:
    """A real HTTP server standing in for an SMS provider; answers with ``status``."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.bodies: list[dict] = []
        provider = self

        class Handler(RequestHandler):
            def post(self):
                provider.bodies.append(json.loads(self.request.body))
                self.set_status(provider.status)
                self.finish("{}")

        [self.socket] = bind_sockets(0, "127.0.0.1")
        self.port = self.socket.getsockname()[1]
        self.server = HTTPServer(Application([(r"/send", Handler)]))
        self.server.add_sockets([self.socket])


@pytest.fixture
def provider(request, io_loop):
    fake = FakeProvider(request.param)
    yield fake
    fake.server.stop()


def gateway_app(settings, clock, provider):
    from demo.main import make_app

    return make_app(settings.replace(
        sms_backend="http", sms_gateway_url=f"http://127.0.0.1:{provider.port}/send",
        sms_gateway_body='{"mobile": $phone, "content": $text, "code": $code}', sms_gateway_timeout=2.0,
    ), clock=clock)


@pytest.fixture
def app(request, settings, clock):
    """Like conftest's app, but pointed at the fake provider when a test asks for one."""
    from demo.main import make_app

    if "provider" in request.fixturenames:
        application = gateway_app(settings, clock, request.getfixturevalue("provider"))
    else:
        application = make_app(settings, clock=clock)
    yield application
    application.services.close()


@pytest.mark.parametrize("provider", [200], indirect=True)
@gen_test
async def test_http_gateway_delivers(api, provider):
    response = await api.post("/users/code", {"phone": PHONE})
    assert response.code == 200
    [sent] = provider.bodies
    assert sent["mobile"] == E164 and sent["code"] in sent["content"]
    registered = await api.post("/users/regist", {"phone": PHONE, "password": PASSWORD, "code": sent["code"]})
    assert registered.code == 201


@pytest.mark.parametrize("provider", [500], indirect=True)
@gen_test
async def test_http_gateway_failure_is_503_and_the_code_is_dead(api, provider):
    response = await api.post("/users/code", {"phone": PHONE})
    assert response.code == 503 and response.error == "unavailable"
    [attempted] = provider.bodies
    dead = await api.post("/users/regist", {"phone": PHONE, "password": PASSWORD, "code": attempted["code"]})
    assert dead.code == 400 and dead.error == "invalid_code"
    # The failed text does not hold the user back for the resend delay.
    provider.status = 200
    assert (await api.post("/users/code", {"phone": PHONE})).code == 200


# -- logs ------------------------------------------------------------------------------------------


@gen_test
async def test_request_log_never_prints_secrets(api, outbox, caplog):
    caplog.set_level("DEBUG", logger="demo.access")  # 2xx lines are debug
    registered = await api.register(outbox)
    token = registered.json["token"]
    code = outbox.code(E164)
    await api.get(f"/users/me?token={token}&code={code}", token=token)
    await api.post("/users/login", {"phone": PHONE, "password": PASSWORD})
    access = "\n".join(r.getMessage() for r in caplog.records if r.name == "demo.access")
    assert "POST /users/regist" in access and "user=" in access and "ms " in access
    for secret in (token, code, PASSWORD):
        assert secret not in access
