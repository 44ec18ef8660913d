"""Sessions (devices), password and phone changes (views/users_*): the list of sessions, signing out one
device or every other one, POST /users/password and POST /users/phone — on both databases, with real
parallel requests where two changes race."""

from __future__ import annotations

import asyncio
import re

import pytest
from sqlalchemy import select

from demo.common.accounts import tokens
from demo.models import AuthSession, SmsCode, User
from tests.views.test_h5_views import home, open_h5

PHONE, E164, PASSWORD = "18866668888", "+8618866668888", "demo123456"
NEW_PHONE, NEW_E164 = "18866669999", "+8618866669999"
NEW_PASSWORD = "a brand new secret"
IPHONE = {"User-Agent": "DemoApp/2.3 (iPhone; iOS 18.1)", "X-Real-IP": "203.0.113.7"}
ANDROID = {"User-Agent": "DemoApp/2.2 (Android 14)", "X-Real-IP": "2001:db8:1:2::9"}
gen_test = pytest.mark.gen_test(timeout=60)


async def login(api, headers: dict[str, str] | None = None, phone: str = PHONE, password: str = PASSWORD) -> dict:
    response = await api.post("/users/login", {"phone": phone, "password": password}, headers=headers)
    assert response.code == 200, response.body
    return response.json


async def sessions(api, token: str) -> list[dict]:
    response = await api.get("/users/me/sessions", token=token)
    assert response.code == 200, response.body
    return response.json["sessions"]


async def signed_in(api, token: str) -> bool:
    status = (await api.get("/users/me", token=token)).code
    assert status in (200, 401)
    return status == 200


def ticket_path(session_body: dict) -> str:
    """The path of a session body's ``h5_url`` (the H5 ticket exchange)."""
    return "/h5/home?" + session_body["h5_url"].split("?", 1)[1]


def live_sessions(app) -> set[int]:
    query = select(AuthSession.id).where(AuthSession.revoked_at.is_(None))
    return set(app.services.db.run_sync(lambda s: s.scalars(query).all()))


def password_hash(app) -> str:
    return app.services.db.run_sync(lambda s: s.scalars(select(User.password_hash)).one())


# -- the list ---------------------------------------------------------------------------------------


@gen_test
async def test_the_list_shows_each_device_with_a_coarse_network_and_marks_the_current_one(api, user):
    phone = await login(api, IPHONE)
    tablet = await login(api, ANDROID)
    listed = await sessions(api, phone["token"])
    assert len(listed) == 3  # the registration's session too
    by_agent = {s["user_agent"]: s for s in listed}
    assert by_agent[IPHONE["User-Agent"]]["ip"] == "203.0.113.0/24"
    assert by_agent[IPHONE["User-Agent"]]["current"] is True
    assert by_agent[ANDROID["User-Agent"]]["ip"] == "2001:db8:1::/48"
    assert [s["current"] for s in listed].count(True) == 1
    for session in listed:
        assert set(session) == {"id", "created_at", "last_used_at", "user_agent", "ip", "current"}
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", session["id"])
        assert session["created_at"].endswith("Z") and session["last_used_at"].endswith("Z")
        for token in (user.token, phone["token"], tablet["token"]):  # neither the token nor its hash
            assert session["id"] not in (token, tokens.digest(token)) and session["id"] not in tokens.digest(token)
    # Another device sees the same sessions, itself as the current one.
    seen_by_tablet = await sessions(api, tablet["token"])
    assert {s["id"] for s in seen_by_tablet} == {s["id"] for s in listed}
    assert next(s for s in seen_by_tablet if s["current"])["user_agent"] == ANDROID["User-Agent"]


@gen_test
async def test_a_long_user_agent_is_cut_and_none_is_null(api, user):
    long = await login(api, {"User-Agent": "A" * 1000})
    listed = await sessions(api, long["token"])
    assert next(s for s in listed if s["current"])["user_agent"] == "A" * 200
    empty = await login(api, {"User-Agent": ""})
    assert next(s for s in await sessions(api, empty["token"]) if s["current"])["user_agent"] is None


@gen_test
async def test_another_users_sessions_are_not_listed(api, user, outbox):
    other = await api.register(outbox, phone=NEW_PHONE)
    assert other.code == 201
    mine = {s["id"] for s in await sessions(api, user.token)}
    theirs = {s["id"] for s in await sessions(api, other.json["token"])}
    assert len(mine) == len(theirs) == 1 and not mine & theirs


@gen_test
async def test_last_use_moves_at_most_once_a_minute(api, user, clock):
    first = (await sessions(api, user.token))[0]
    assert first["last_used_at"] == first["created_at"]
    clock.advance(30)
    assert (await sessions(api, user.token))[0]["last_used_at"] == first["created_at"]  # under a minute: kept
    clock.advance(31)
    moved = (await sessions(api, user.token))[0]["last_used_at"]
    assert moved > first["created_at"]
    clock.advance(59)
    assert (await sessions(api, user.token))[0]["last_used_at"] == moved


@gen_test
async def test_the_most_recently_used_session_comes_first(api, user, clock):
    second = await login(api, ANDROID)  # made after the user's first session
    clock.advance(120)
    assert await signed_in(api, user.token)
    clock.advance(30)
    assert await signed_in(api, second["token"])
    clock.advance(10)  # the user's last use is 40 s old: listing does not move it
    listed = await sessions(api, user.token)
    assert [s["current"] for s in listed] == [False, True]
    assert listed[0]["last_used_at"] > listed[1]["last_used_at"]


# -- signing out devices ----------------------------------------------------------------------------


@gen_test
async def test_ending_one_session_kills_its_token_h5_ticket_and_cookie_only(api, user):
    other = await login(api, ANDROID)
    cookie = await open_h5(api, other["h5_url"])
    fresh = await login(api, ANDROID)  # its ticket still unused
    assert (await home(api, cookie)).code == 200
    by_token = {s["current"]: s["id"] for s in await sessions(api, other["token"])}
    target = by_token[True]
    fresh_id = next(s["id"] for s in await sessions(api, fresh["token"]) if s["current"])
    for session_id in (target, fresh_id):
        response = await api.delete(f"/users/me/sessions/{session_id}", token=user.token)
        assert response.code == 204 and response.body == b""
    assert not await signed_in(api, other["token"]) and not await signed_in(api, fresh["token"])
    assert (await home(api, cookie)).code == 401  # its H5 cookie died with it
    assert (await api.get(ticket_path(fresh))).code == 401  # its unused H5 ticket died with it
    assert await signed_in(api, user.token)
    assert target not in {s["id"] for s in await sessions(api, user.token)}
    again = await api.delete(f"/users/me/sessions/{target}", token=user.token)
    assert again.code == 404 and again.error == "not_found"  # ended: no longer a live session


@gen_test
async def test_someone_elses_session_and_a_made_up_one_get_the_same_404(api, user, outbox):
    other = await api.register(outbox, phone=NEW_PHONE)
    theirs = (await sessions(api, other.json["token"]))[0]["id"]
    someone_elses = await api.delete(f"/users/me/sessions/{theirs}", token=user.token)
    made_up = await api.delete(f"/users/me/sessions/{tokens.new_public_id()}", token=user.token)
    malformed = await api.delete("/users/me/sessions/no*such", token=user.token)
    for response in (someone_elses, made_up, malformed):
        assert response.code == 404 and response.error == "not_found"
    assert someone_elses.json["error"]["message"] == made_up.json["error"]["message"]
    assert await signed_in(api, other.json["token"])
    assert (await api.delete(f"/users/me/sessions/{theirs}")).code == 401  # no token


@gen_test
async def test_ending_the_current_session_is_a_logout(api, user):
    current = (await sessions(api, user.token))[0]["id"]
    assert (await api.delete(f"/users/me/sessions/{current}", token=user.token)).code == 204
    assert not await signed_in(api, user.token)


@gen_test
async def test_signing_out_every_other_device_keeps_this_one(api, user, outbox):
    others = [await login(api, ANDROID) for _ in range(3)]
    cookies = [await open_h5(api, other["h5_url"]) for other in others[:2]]
    mine = await login(api, IPHONE)
    stranger = await api.register(outbox, phone=NEW_PHONE)
    response = await api.delete("/users/me/sessions", token=mine["token"])
    assert response.code == 204 and response.body == b""
    for token in [user.token] + [other["token"] for other in others]:
        assert not await signed_in(api, token)
    for cookie in cookies:
        assert (await home(api, cookie)).code == 401
    assert await signed_in(api, mine["token"]) and await signed_in(api, stranger.json["token"])
    assert [s["current"] for s in await sessions(api, mine["token"])] == [True]
    h5 = await open_h5(api, mine["h5_url"])  # this device's H5 still opens
    assert (await home(api, h5)).code == 200


# -- password change --------------------------------------------------------------------------------


@gen_test
async def test_changing_the_password_ends_every_other_session(api, user):
    other = await login(api, ANDROID)
    cookie = await open_h5(api, other["h5_url"])
    mine = await login(api, IPHONE)
    changed = await api.post(
        "/users/password", {"old_password": PASSWORD, "password": NEW_PASSWORD}, token=mine["token"]
    )
    assert changed.code == 204 and changed.body == b""
    assert not await signed_in(api, user.token) and not await signed_in(api, other["token"])
    assert (await home(api, cookie)).code == 401
    assert await signed_in(api, mine["token"])
    assert (await api.post("/users/login", {"phone": PHONE, "password": PASSWORD})).code == 401
    await login(api, password=NEW_PASSWORD)


@pytest.mark.settings(login_phone_failures=3)
@gen_test
async def test_a_wrong_old_password_is_a_failed_login_for_the_limits(api, user, app):
    before = password_hash(app)
    for _ in range(3):
        wrong = await api.post(
            "/users/password", {"old_password": "not it at all", "password": NEW_PASSWORD}, token=user.token
        )
        assert wrong.code == 401 and wrong.error == "invalid_credentials"
        assert wrong.json["error"]["field"] == "old_password"
    limited = await api.post("/users/password", {"old_password": PASSWORD, "password": NEW_PASSWORD}, token=user.token)
    assert limited.code == 429 and int(limited.headers["Retry-After"]) > 0
    # One limiter: this client's logins to the phone are refused too, and nothing changed.
    assert (await api.post("/users/login", {"phone": PHONE, "password": PASSWORD})).code == 429
    assert password_hash(app) == before and await signed_in(api, user.token)


@pytest.mark.settings(login_phone_failures=3, login_slowdown_after=3)
@gen_test
async def test_a_good_change_does_not_count_as_a_failure(api, user, clock):
    for password, new in ((PASSWORD, NEW_PASSWORD), (NEW_PASSWORD, PASSWORD)) * 3:
        changed = await api.post("/users/password", {"old_password": password, "password": new}, token=user.token)
        assert changed.code == 204, changed.body


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"old_password": PASSWORD, "password": "short"}, 422, "weak_password", "password"),
        ({"old_password": PASSWORD, "password": "password123"}, 422, "weak_password", "password"),
        ({"password": NEW_PASSWORD}, 422, "invalid_field", "old_password"),
        ({"old_password": PASSWORD, "password": 12345678}, 422, "invalid_field", "password"),
    ],
)
@gen_test
async def test_bad_password_changes_are_4xx_and_change_nothing(api, user, app, body, status, code, field):
    before = password_hash(app)
    response = await api.post("/users/password", body, token=user.token)
    assert response.code == status and response.error == code and response.json["error"]["field"] == field
    assert password_hash(app) == before
    assert (await api.post("/users/password", {"old_password": PASSWORD, "password": NEW_PASSWORD})).code == 401


# -- phone change -----------------------------------------------------------------------------------


async def phone_code(api, outbox, phone: str = NEW_PHONE) -> str:
    sent = await api.post("/users/code", {"phone": phone, "purpose": "phone"})
    assert sent.code == 200 and sent.json == {"expires_in": 300, "resend_after": 60}
    return await outbox.code("+86" + phone)


@gen_test
async def test_moving_to_a_new_phone_with_its_code_and_the_password(api, user, outbox):
    other = await login(api, ANDROID)
    code = await phone_code(api, outbox)
    moved = await api.post("/users/phone", {"phone": NEW_PHONE, "code": code, "password": PASSWORD}, token=user.token)
    assert moved.code == 200, moved.body
    assert moved.json["user"]["phone"] == NEW_E164 and moved.json["user"]["id"] == user.id
    assert set(moved.json["user"]) == {"id", "phone", "created_at", "last_login_at", "image_count"}
    notice = await outbox.last(E164)  # the old phone is told, through the same outbox as codes
    assert notice["code"] is None and "moved" in notice["text"] and notice["purpose"] == "phone_notice"
    assert (await api.get("/users/me", token=user.token)).json["user"]["phone"] == NEW_E164
    assert await signed_in(api, other["token"])  # sessions stay
    assert (await api.post("/users/login", {"phone": PHONE, "password": PASSWORD})).code == 401
    await login(api, phone=NEW_PHONE)
    reused = await api.post("/users/phone", {"phone": PHONE, "code": code, "password": PASSWORD}, token=user.token)
    assert reused.code == 400 and reused.error == "invalid_code"  # a code for another phone


@gen_test
async def test_a_phone_code_for_a_registered_number_answers_alike_and_sends_no_code(api, user, outbox, app, clock):
    stranger = await api.register(outbox, phone=NEW_PHONE)
    assert stranger.code == 201
    clock.advance(61)
    taken = await api.post("/users/code", {"phone": NEW_PHONE, "purpose": "phone"})
    free = await api.post("/users/code", {"phone": "18866667777", "purpose": "phone"})
    assert (taken.code, taken.json) == (free.code, free.json) == (200, {"expires_in": 300, "resend_after": 60})
    text = await outbox.last(NEW_E164)
    assert text["code"] is None and "already has a demo account" in text["text"]
    # No code went out, so none can be guessed into a change; the answer is the one of any wrong code.
    response = await api.post(
        "/users/phone", {"phone": NEW_PHONE, "code": "123456", "password": PASSWORD}, token=user.token
    )
    assert response.code == 400 and response.error == "invalid_code"


@gen_test
async def test_a_phone_registered_after_its_code_was_sent_is_taken_after_the_code_check(api, user, outbox, app, clock):
    code = await phone_code(api, outbox)
    clock.advance(61)  # the register flow asks a code of its own for the number
    stranger = await api.register(outbox, phone=NEW_PHONE)  # the number's holder registers meanwhile
    assert stranger.code == 201
    response = await api.post(
        "/users/phone", {"phone": NEW_PHONE, "code": code, "password": PASSWORD}, token=user.token
    )
    assert response.code == 409 and response.error == "phone_taken" and response.json["error"]["field"] == "phone"
    assert (await api.get("/users/me", token=user.token)).json["user"]["phone"] == E164
    assert await outbox.after_delivery(app) and not [m for m in outbox.messages() if m["purpose"] == "phone_notice"]


@gen_test
async def test_a_wrong_password_or_code_moves_nothing(api, user, outbox, app, clock):
    code = await phone_code(api, outbox)
    wrong_code = await api.post(
        "/users/phone",
        {"phone": NEW_PHONE, "code": "000000" if code != "000000" else "1" * 6, "password": PASSWORD},
        token=user.token,
    )
    assert wrong_code.code == 400 and wrong_code.error == "invalid_code"
    wrong_password = await api.post(
        "/users/phone", {"phone": NEW_PHONE, "code": code, "password": "not it at all"}, token=user.token
    )
    assert wrong_password.code == 401 and wrong_password.error == "invalid_credentials"
    own = await api.post("/users/phone", {"phone": E164, "code": code, "password": PASSWORD}, token=user.token)
    assert own.code == 422 and own.error == "invalid_phone"
    assert (await api.get("/users/me", token=user.token)).json["user"]["phone"] == E164
    # The wrong password spent the code: a change needs a new one.
    spent = await api.post("/users/phone", {"phone": NEW_PHONE, "code": code, "password": PASSWORD}, token=user.token)
    assert spent.code == 400 and spent.error == "invalid_code"
    clock.advance(61)
    code = await phone_code(api, outbox)
    assert (
        await api.post("/users/phone", {"phone": NEW_PHONE, "code": code, "password": PASSWORD}, token=user.token)
    ).code == 200


@pytest.mark.settings(sms_test_numbers="+8618866668888:123456")
@gen_test
async def test_a_test_number_left_behind_gets_no_notice(api, outbox, app):
    registered = await api.post("/users/code", {"phone": PHONE})
    assert registered.code == 200
    token = (await api.post("/users/regist", {"phone": PHONE, "password": PASSWORD, "code": "123456"})).json["token"]
    code = await phone_code(api, outbox)
    assert (
        await api.post("/users/phone", {"phone": NEW_PHONE, "code": code, "password": PASSWORD}, token=token)
    ).code == 200
    assert not [m for m in await outbox.after_delivery(app) if m["phone"] == E164]
    query = select(SmsCode).where(SmsCode.phone == E164).order_by(SmsCode.id)
    notices = app.services.db.run_sync(lambda s: s.scalars(query).all())
    assert [n.purpose for n in notices] == ["regist", "phone_notice"]


# -- races: real parallel requests, never a half state -------------------------------------------------


RACING = {"cpu_workers": 2, "login_phone_failures": 100, "login_slowdown_after": 100}


@pytest.mark.settings(**RACING)
@gen_test(timeout=120)
async def test_two_password_changes_at_once_one_wins_whole(api, user, app):
    for round_ in range(3):
        old = PASSWORD if round_ % 2 == 0 else NEW_PASSWORD
        first, second = await login(api, IPHONE, password=old), await login(api, ANDROID, password=old)
        candidates = {first["token"]: f"first choice {round_}", second["token"]: f"second choice {round_}"}
        answers = await asyncio.gather(
            *(
                api.post("/users/password", {"old_password": old, "password": new}, token=token)
                for token, new in candidates.items()
            )
        )
        assert sorted(a.code for a in answers) == [204, 401], [a.body for a in answers]
        loser = next(a for a in answers if a.code == 401)
        assert loser.error in ("invalid_credentials", "unauthorized")
        winner = next(token for token, a in zip(candidates, answers, strict=True) if a.code == 204)
        # The winner's password is the password, the winner's session is the only one left.
        assert [await signed_in(api, token) for token in candidates] == [t == winner for t in candidates]
        assert [s["current"] for s in await sessions(api, winner)] == [True]
        assert (await api.post("/users/login", {"phone": PHONE, "password": old})).code == 401
        assert (await api.post("/users/login", {"phone": PHONE, "password": candidates[winner]})).code == 200
        # The next round changes from the winner's password back to a known one.
        back = NEW_PASSWORD if round_ % 2 == 0 else PASSWORD
        changed = await api.post(
            "/users/password", {"old_password": candidates[winner], "password": back}, token=winner
        )
        assert changed.code == 204


@pytest.mark.settings(**RACING)
@gen_test(timeout=120)
async def test_two_changes_from_one_session_at_once_one_wins(api, user, app):
    """No sign-out decides here (each keeps the caller's session): the password checked must still be
    the password when it is replaced."""
    current = PASSWORD
    for round_ in range(3):
        candidates = [f"round {round_} choice {n}" for n in range(3)]
        answers = await asyncio.gather(
            *(
                api.post("/users/password", {"old_password": current, "password": new}, token=user.token)
                for new in candidates
            )
        )
        assert sorted(a.code for a in answers) == [204, 401, 401], [a.body for a in answers]
        assert all(a.error == "invalid_credentials" for a in answers if a.code == 401)
        current = next(new for new, a in zip(candidates, answers, strict=True) if a.code == 204)
        for new in candidates:
            login = await api.post("/users/login", {"phone": PHONE, "password": new})
            assert login.code == (200 if new == current else 401)


@pytest.mark.settings(**RACING)
@gen_test(timeout=120)
async def test_signing_out_others_racing_a_password_change_leaves_one_side_whole(api, user, app):
    current = PASSWORD
    for round_ in range(4):
        new = f"the password of round {round_}"
        signer, changer = await login(api, IPHONE, password=current), await login(api, ANDROID, password=current)
        before = password_hash(app)
        sign_out, change = await asyncio.gather(
            api.delete("/users/me/sessions", token=signer["token"]),
            api.post("/users/password", {"old_password": current, "password": new}, token=changer["token"]),
        )
        # Whoever came first signed the other out: never both sides done, never a session of both.
        assert len(live_sessions(app)) == 1
        if sign_out.code == 204:  # the change found its session ended: no new password
            assert (change.code, change.error) == (401, "unauthorized")
            assert password_hash(app) == before and await signed_in(api, signer["token"])
        else:  # the sign-out's own session was one of the others the change ended
            assert (sign_out.code, sign_out.error, change.code) == (401, "unauthorized", 204)
            assert password_hash(app) != before and await signed_in(api, changer["token"])
            current = new
        assert not await signed_in(api, signer["token"] if change.code == 204 else changer["token"])
        assert (await api.post("/users/login", {"phone": PHONE, "password": current})).code == 200


@pytest.mark.settings(**RACING)
@gen_test(timeout=120)
async def test_signing_out_others_racing_logins_leaves_no_half_signed_in_device(api, user, app):
    results = await asyncio.gather(
        *(api.post("/users/login", {"phone": PHONE, "password": PASSWORD}, headers=ANDROID) for _ in range(6)),
        api.delete("/users/me/sessions", token=user.token),
        *(api.post("/users/login", {"phone": PHONE, "password": PASSWORD}, headers=ANDROID) for _ in range(6)),
    )
    logins, sign_out = results[:6] + results[7:], results[6]
    assert sign_out.code == 204 and all(r.code == 200 for r in logins)
    listed = {s["id"] for s in await sessions(api, user.token)}
    survivors = 0
    for login_ in logins:
        works = await signed_in(api, login_.json["token"])
        # A login is signed out whole or not at all: its token and its H5 ticket go together.
        assert ((await api.get(ticket_path(login_.json))).code == 302) == works
        survivors += works
    assert len(listed) == 1 + survivors and await signed_in(api, user.token)
