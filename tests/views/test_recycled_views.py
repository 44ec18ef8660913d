"""Recycled numbers (issue 17, point 6) over HTTP on both databases: a reset, SMS-login or registration
code for the number of a dormant account gives the number's holder a fresh account and freezes the old
one, which still signs in with the number and its password and gets no codes; nothing in the answers
tells a stranger whether a number is registered, dormant or was recycled; parallel requests for one
dormant number make one fresh account."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from sqlalchemy import func, select

from demo.common.accounts import queries
from demo.models import User
from tests.views.test_account_deletion_views import code_for, delete_me, login
from tests.views.test_h5_views import home, open_h5
from tests.views.test_users_views import count_calls, ks_statistic, statuses

PHONE, E164, PASSWORD = "18866668888", "+8618866668888", "demo123456"
NEW_PASSWORD = "new holder 4242"
OTHER, OTHER_E164 = "18866669999", "+8618866669999"
UNKNOWN = "18866660000"
DAY = 24 * 3600
DORMANT = 366 * DAY  # past the default dormant_account_after (365 days)
gen_test = pytest.mark.gen_test(timeout=60)


def accounts(app) -> list[tuple[str | None, str | None, bool]]:
    """Every account as (phone, former_phone, frozen), oldest first."""
    rows = app.services.db.run_sync(
        lambda s: s.execute(select(User.phone, User.former_phone, User.frozen_at).order_by(User.id)).all()
    )
    return [(phone, former, frozen_at is not None) for phone, former, frozen_at in rows]


async def reset(api, code: str, password: str = NEW_PASSWORD, phone: str = PHONE):
    return await api.post("/users/password/reset", {"phone": phone, "code": code, "password": password})


@gen_test
async def test_a_reset_code_for_a_dormant_number_gives_a_fresh_account_and_freezes_the_old_one(
    api, user, app, clock, outbox
):
    clock.advance(DORMANT)
    assert (await reset(api, await code_for(api, outbox, clock, "reset"))).code == 204
    assert accounts(app) == [(None, E164, True), (E164, None, False)]
    fresh = await login(api, password=NEW_PASSWORD)
    assert fresh.code == 200 and fresh.json["user"]["id"] != user.id and "frozen" not in fresh.json["user"]
    # The old owner still signs in with the number and the old password, to the frozen account.
    old = await login(api)
    assert old.code == 200, old.body
    assert old.json["user"] == {**user.body["user"], "frozen": True}
    me = await api.get("/users/me", token=old.json["token"])
    assert me.json["user"]["phone"] == E164 and me.json["user"]["frozen"] is True
    assert (await login(api, password="a wrong password")).code == 401


@gen_test
async def test_an_account_in_use_is_not_dormant(api, user, app, clock, outbox):
    """A login, or a session used, within the period keeps the account: the reset is its owner's."""
    clock.advance(DORMANT - 2 * DAY)
    assert (await login(api)).code == 200
    clock.advance(300 * DAY)
    assert (await reset(api, await code_for(api, outbox, clock, "reset"))).code == 204
    assert accounts(app) == [(E164, None, False)]
    assert (await login(api, password=NEW_PASSWORD)).json["user"]["id"] == user.id


@pytest.mark.settings(token_ttl=2 * DORMANT)
@gen_test
async def test_a_session_used_within_the_period_keeps_the_account(api, user, app, clock, outbox):
    clock.advance(DORMANT - DAY)
    assert (await api.get("/users/me", token=user.token)).code == 200  # the token check records the use
    clock.advance(2 * DAY)
    assert (await reset(api, await code_for(api, outbox, clock, "reset"))).code == 204
    assert accounts(app) == [(E164, None, False)]


@pytest.mark.settings(dormant_account_after=0)
@gen_test
async def test_the_rule_can_be_turned_off(api, user, app, clock, outbox):
    clock.advance(10 * DORMANT)
    assert (await reset(api, await code_for(api, outbox, clock, "reset"))).code == 204
    assert accounts(app) == [(E164, None, False)]


@gen_test
async def test_an_sms_login_on_a_dormant_number_signs_in_to_a_fresh_account_without_a_password(
    api, user, app, clock, outbox
):
    clock.advance(DORMANT)
    code = await code_for(api, outbox, clock, "login")
    fresh = await api.post("/users/login", {"phone": PHONE, "code": code})
    assert fresh.code == 200, fresh.body
    assert fresh.json["user"]["id"] != user.id and fresh.json["user"]["phone"] == E164
    assert fresh.json["deletion_cancelled"] is False and "frozen" not in fresh.json["user"]
    assert accounts(app) == [(None, E164, True), (E164, None, False)]
    assert (await api.get("/users/me", token=fresh.json["token"])).code == 200
    # No password opens the fresh account (it sets one with a reset); the old password opens the old one.
    assert (await login(api)).json["user"]["id"] == user.id
    assert (await reset(api, await code_for(api, outbox, clock, "reset"))).code == 204
    assert (await login(api, password=NEW_PASSWORD)).json["user"]["id"] == fresh.json["user"]["id"]
    assert accounts(app) == [(None, E164, True), (E164, None, False)]  # the fresh one is active: reset as usual


@gen_test
async def test_a_dormant_number_can_be_registered_and_an_active_one_cannot(api, user, app, clock, outbox):
    clock.advance(61)
    sent = await api.post("/users/code", {"phone": PHONE})
    assert sent.code == 200 and (await outbox.last(E164))["code"] is None  # active: a notice, no code
    clock.advance(DORMANT)
    code = await code_for(api, outbox, clock, "regist")
    made = await api.post("/users/regist", {"phone": PHONE, "password": NEW_PASSWORD, "code": code})
    assert made.code == 201, made.body
    assert made.json["user"]["id"] != user.id
    assert accounts(app) == [(None, E164, True), (E164, None, False)]
    assert (await login(api)).json["user"]["id"] == user.id
    assert (await login(api, password=NEW_PASSWORD)).json["user"]["id"] == made.json["user"]["id"]


@gen_test
async def test_a_frozen_account_gets_no_codes_and_moves_to_a_new_number_to_thaw(api, user, app, clock, outbox):
    clock.advance(DORMANT)
    assert (await reset(api, await code_for(api, outbox, clock, "reset"))).code == 204
    frozen = (await login(api)).json
    # A code to the number is the new holder's: a frozen account cannot use one.
    answer = await delete_me(api, frozen["token"], {"code": "123456"})
    assert answer.code == 422 and answer.json["error"]["field"] == "code"
    # It moves to its owner's new number (a code sent there, and its password) and is an account again.
    code = await code_for(api, outbox, clock, "phone", OTHER, OTHER_E164)
    moved = await api.post("/users/phone", {"phone": OTHER, "code": code, "password": PASSWORD}, token=frozen["token"])
    assert moved.code == 200, moved.body
    assert moved.json["user"]["phone"] == OTHER_E164 and "frozen" not in moved.json["user"]
    assert accounts(app) == [(OTHER_E164, None, False), (E164, None, False)]
    # The number it left is another account's: it got no notice of the move.
    texts = await outbox.after_delivery(app)
    assert not [m for m in texts if m["phone"] == E164 and m["purpose"] == "phone_notice"]
    assert (await login(api, OTHER)).json["user"]["id"] == user.id


@gen_test
async def test_an_account_moves_onto_a_dormant_number_which_freezes_its_old_account(api, user, app, clock, outbox):
    clock.advance(DORMANT)
    mover = (await api.register(outbox, OTHER, NEW_PASSWORD)).json
    code = await code_for(api, outbox, clock, "phone")  # a code, not the "number taken" notice
    body = {"phone": PHONE, "code": code, "password": NEW_PASSWORD}
    moved = await api.post("/users/phone", body, token=mover["token"])
    assert moved.code == 200, moved.body
    assert moved.json["user"]["phone"] == E164 and moved.json["user"]["id"] == mover["user"]["id"]
    assert accounts(app) == [(None, E164, True), (E164, None, False)]
    assert (await login(api)).json["user"] == {**user.body["user"], "frozen": True}
    assert (await login(api, password=NEW_PASSWORD)).json["user"]["id"] == mover["user"]["id"]


@gen_test
async def test_a_frozen_account_changes_its_password_and_deletes_itself_with_it(api, user, app, clock, outbox):
    clock.advance(DORMANT)
    assert (await reset(api, await code_for(api, outbox, clock, "reset"))).code == 204
    frozen = (await login(api)).json
    changed = await api.post(
        "/users/password", {"old_password": PASSWORD, "password": "another one 77"}, token=frozen["token"]
    )
    assert changed.code == 204, changed.body
    assert (await login(api, password="another one 77")).json["user"]["id"] == user.id
    token = (await login(api, password="another one 77")).json["token"]
    assert (await delete_me(api, token, {"password": "wrong password 1"})).code == 401
    assert (await delete_me(api, token, {"password": "another one 77"})).code == 202
    # The new holder's account is untouched.
    assert (await login(api, password=NEW_PASSWORD)).code == 200


@gen_test
async def test_the_h5_pages_of_a_frozen_account_show_the_number_it_had(api, user, app, clock, outbox):
    clock.advance(DORMANT)
    assert (await reset(api, await code_for(api, outbox, clock, "reset"))).code == 204
    frozen = (await login(api)).json
    page = await home(api, await open_h5(api, frozen["h5_url"]))
    assert page.code == 200 and "188****8888" in page.body.decode()


# -- nothing tells a stranger ------------------------------------------------------------------------


@gen_test
async def test_code_requests_answer_alike_for_unknown_active_and_dormant_numbers(api, user, app, clock, outbox):
    clock.advance(DORMANT)  # PHONE's account is dormant now; OTHER gets an active one
    assert (await api.register(outbox, OTHER)).code == 201
    for purpose in ("regist", "reset", "login", "delete"):
        clock.advance(61)
        answers = [await api.post("/users/code", {"phone": p, "purpose": purpose}) for p in (PHONE, OTHER, UNKNOWN)]
        assert {(a.code, a.body) for a in answers} == {(200, answers[0].body)}, purpose


@gen_test
async def test_failed_password_logins_do_the_same_work_whether_or_not_the_number_was_recycled(
    api, user, app, clock, monkeypatch, outbox
):
    clock.advance(DORMANT)
    assert (await reset(api, await code_for(api, outbox, clock, "reset"))).code == 204
    assert (await api.register(outbox, OTHER)).code == 201
    verified = count_calls(monkeypatch, app.services.passwords, "verify")
    answers = []
    for phone in (PHONE, OTHER, UNKNOWN):  # recycled, never recycled, no account
        before = len(verified)
        answers.append(await login(api, phone, "a wrong password"))
        assert len(verified) - before == 2, phone  # the number's account (or a decoy), the frozen one (or a decoy)
    assert {(a.code, a.body) for a in answers} == {(401, answers[0].body)}


@pytest.mark.settings(login_ip_failures=10_000)
@gen_test(timeout=180)
async def test_failed_password_logins_take_the_same_time_whether_or_not_the_number_was_recycled(api, app, outbox):
    """Recycled: the number has an account and one frozen off it; plain: an account only. Every account
    has a real hash (one password for all: each check is a full argon2 verification)."""
    samples = 50
    recycled = [f"+86188666{n:05d}" for n in range(samples)]
    plain = [f"+86188777{n:05d}" for n in range(samples)]
    now, password_hash = app.services.clock.now(), app.services.passwords.hash("the only password 1")

    def account(phone: str | None, former: str | None = None) -> User:
        frozen_at = now if former else None
        return User(phone=phone, former_phone=former, frozen_at=frozen_at, password_hash=password_hash, created_at=now)

    app.services.db.run_sync(
        lambda s: s.add_all([account(p) for p in recycled + plain] + [account(None, p) for p in recycled])
    )
    times: dict[str, list[float]] = {"recycled": [], "plain": []}
    bodies = set()
    requests = [("recycled", phone) for phone in recycled] + [("plain", phone) for phone in plain]
    random.Random(17).shuffle(requests)  # drift in the machine's load hits both alike
    for kind, phone in requests:
        started = time.perf_counter()
        response = await login(api, phone, "a wrong password")
        times[kind].append(time.perf_counter() - started)
        assert response.code == 401, (kind, response.body)
        bodies.add(response.body)
    assert len(bodies) == 1
    # Same distribution: with 50 + 50 samples D passes 0.5 about once in 100,000 runs; a skipped
    # second check on one side (half the hashing) gives D = 1.
    distance = ks_statistic(times["recycled"], times["plain"])
    assert distance < 0.5, (distance, sorted(times["recycled"]), sorted(times["plain"]))


# -- races ---------------------------------------------------------------------------------------------


@pytest.mark.settings(sms_resend_after=0)
@gen_test
async def test_parallel_reset_sms_login_and_registration_for_a_dormant_number_make_one_fresh_account(
    api, user, app, clock, outbox
):
    clock.advance(DORMANT)
    codes = {}
    for purpose in ("reset", "login", "regist"):
        assert (await api.post("/users/code", {"phone": PHONE, "purpose": purpose})).code == 200
        codes[purpose] = await outbox.code(E164)
    done_reset, done_login, done_regist = await asyncio.gather(
        reset(api, codes["reset"]),
        api.post("/users/login", {"phone": PHONE, "code": codes["login"]}),
        api.post("/users/regist", {"phone": PHONE, "password": "registered 555", "code": codes["regist"]}),
    )
    assert done_reset.code == 204 and done_login.code == 200, (done_reset.body, done_login.body)
    assert done_regist.code in (201, 409), done_regist.body
    assert accounts(app) == [(None, E164, True), (E164, None, False)]
    holder = app.services.db.run_sync(lambda s: s.scalar(select(User.public_id).where(User.phone == E164)))
    assert done_login.json["user"]["id"] == holder
    if done_regist.code == 201:
        assert done_regist.json["user"]["id"] == holder
    assert (await login(api)).json["user"]["id"] == user.id  # the frozen one, by its password


@pytest.mark.settings(sms_resend_after=0, login_phone_failures=100, login_slowdown_after=100)
@gen_test
async def test_parallel_logins_of_the_old_and_new_owner_each_reach_their_account(api, user, app, clock, outbox):
    clock.advance(DORMANT)
    assert (await reset(api, await code_for(api, outbox, clock, "reset"))).code == 204
    answers = await asyncio.gather(*[login(api, password=p) for p in [PASSWORD, NEW_PASSWORD, "wrong pass 99"] * 4])
    assert statuses(answers) == {200: 8, 401: 4}
    ids = {a.json["user"]["id"] for a in answers if a.code == 200}
    assert len(ids) == 2 and user.id in ids
    assert app.services.db.run_sync(lambda s: s.scalar(select(func.count()).select_from(User))) == 2


@gen_test
async def test_a_frozen_account_an_operator_disabled_is_refused_to_its_owner(api, user, app, clock, outbox):
    """The frozen account's own flag decides, not that of the number's fresh account."""
    clock.advance(DORMANT)
    assert (await reset(api, await code_for(api, outbox, clock, "reset"))).code == 204
    frozen_id = app.services.db.run_sync(lambda s: s.scalar(select(User.id).where(User.former_phone == E164)))
    await app.services.db.run(queries.set_disabled, frozen_id, True, clock.now())
    refused = await login(api)
    assert refused.code == 403 and refused.json["error"]["code"] == "account_disabled", refused.body
    assert (await login(api, password=NEW_PASSWORD)).code == 200  # the fresh account is not disabled


@gen_test
async def test_an_sms_login_on_the_number_of_a_disabled_dormant_account_gives_its_holder_a_fresh_one(
    api, user, app, clock, outbox
):
    """The operator disabled the old owner's account; the number's new holder is not refused for it."""
    await app.services.db.run(queries.set_disabled, app_user_id(app), True, clock.now())
    clock.advance(DORMANT)
    code = await code_for(api, outbox, clock, "login")
    fresh = await api.post("/users/login", {"phone": PHONE, "code": code})
    assert fresh.code == 200, fresh.body
    assert fresh.json["user"]["id"] != user.id and accounts(app) == [(None, E164, True), (E164, None, False)]
    assert (await login(api)).code == 403  # the frozen owner's account is still disabled


def app_user_id(app) -> int:
    return app.services.db.run_sync(lambda s: s.scalar(select(User.id).where(User.phone == E164)))
