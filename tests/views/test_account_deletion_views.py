"""Account deletion (DELETE /users/me, its grace period and the purge by housekeeping) and signing in
with an SMS code (POST /users/login with a ``login`` code) — on both databases, the purge on both image
stores, with real parallel requests where requests race."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import time
from typing import Any

import pytest
from sqlalchemy import String, func, or_, select

from demo.common import housekeeping
from demo.common.images.storage import object_name
from demo.models import Base, SmsOutbox, User
from tests.common.images.support import fetch, jpeg, png, second_user, stored_objects, uploaded
from tests.helpers import Response
from tests.views.test_h5_views import home, is_html_page, open_h5, path_of
from tests.views.test_users_views import ks_statistic

PHONE, E164, PASSWORD = "18866668888", "+8618866668888", "demo123456"
OTHER_E164 = "+8618866669999"
UNKNOWN, UNKNOWN_E164 = "18866660000", "+8618866660000"
GRACE = 7 * 24 * 3600
gen_test = pytest.mark.gen_test(timeout=60)


async def delete_me(api, token: str | None, body: Any, headers: dict[str, str] | None = None) -> Response:
    """DELETE /users/me with a JSON body (Tornado's client sends a body with DELETE only when told to)."""
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    response = await api.client.fetch(
        api.base_url + "/users/me",
        method="DELETE",
        body=json.dumps(body),
        headers=all_headers,
        allow_nonstandard_methods=True,
        raise_error=False,
        request_timeout=60,
    )
    return Response(response.code, response.headers, response.body or b"")


async def signed_in(api, token: str) -> bool:
    status = (await api.get("/users/me", token=token)).code
    assert status in (200, 401)
    return status == 200


async def login(api, phone: str = PHONE, password: str = PASSWORD) -> Response:
    return await api.post("/users/login", {"phone": phone, "password": password})


async def code_for(api, outbox, clock, purpose: str, phone: str = PHONE, e164: str = E164) -> str:
    """A ``purpose`` code to ``phone``, asked for once the last text to it may be followed by another."""
    clock.advance(61)
    sent = await api.post("/users/code", {"phone": phone, "purpose": purpose})
    assert sent.code == 200, sent.body
    return await outbox.code(e164)


def deletion_due_at(app, phone: str = E164) -> dt.datetime | None:
    return app.services.db.run_sync(lambda s: s.scalar(select(User.deletion_due_at).where(User.phone == phone)))


async def purge(app) -> dict[str, int]:
    return await housekeeping.run(app.services.db, app.services.images, app.services.clock.now())


# -- DELETE /users/me ---------------------------------------------------------------------------------


@gen_test
async def test_a_deletion_with_the_password_ends_every_session_ticket_and_h5_cookie_at_once(api, user, app, clock):
    tablet = (await login(api)).json
    cookie = await open_h5(api, user.body["h5_url"])  # a WebView signed in through the first session
    unused_ticket = (await api.post("/h5/ticket", token=tablet["token"])).json["h5_url"]
    assert (await home(api, cookie)).code == 200

    response = await delete_me(api, user.token, {"password": PASSWORD})
    assert response.code == 202, response.body
    final_at = clock.now() + dt.timedelta(seconds=GRACE)
    assert response.json == {"final_at": final_at.replace(microsecond=0).isoformat() + "Z"}
    assert deletion_due_at(app) == final_at

    for token in (user.token, tablet["token"]):
        assert not await signed_in(api, token)
    assert is_html_page(await home(api, cookie), 401)
    assert is_html_page(await api.get(path_of(unused_ticket)), 401)
    assert is_html_page(await api.get(path_of(tablet["h5_url"])), 401)


@gen_test
async def test_a_deletion_with_a_delete_code_sent_to_the_accounts_phone(api, user, app, outbox, clock):
    code = await code_for(api, outbox, clock, "delete")
    text = (outbox.messages()[-1])["text"]
    assert "DELETE" in text and code in text
    wrong = "000000" if code != "000000" else "111111"
    refused = await delete_me(api, user.token, {"code": wrong})
    assert refused.code == 400 and refused.error == "invalid_code" and refused.json["error"]["field"] == "code"
    assert await signed_in(api, user.token) and deletion_due_at(app) is None
    assert (await delete_me(api, user.token, {"code": code})).code == 202
    assert not await signed_in(api, user.token) and deletion_due_at(app) is not None


@gen_test
async def test_a_code_of_another_purpose_does_not_delete(api, user, app, outbox, clock):
    reset = await code_for(api, outbox, clock, "reset")
    refused = await delete_me(api, user.token, {"code": reset})
    assert refused.code == 400 and refused.error == "invalid_code"
    assert await signed_in(api, user.token) and deletion_due_at(app) is None


@pytest.mark.settings(login_phone_failures=2)
@gen_test
async def test_a_wrong_password_is_a_failed_login_and_limited_as_one(api, user, app):
    for _ in range(2):
        wrong = await delete_me(api, user.token, {"password": "not the password"})
        assert wrong.code == 401 and wrong.error == "invalid_credentials" and wrong.json["error"]["field"] == "password"
    limited = await delete_me(api, user.token, {"password": PASSWORD})
    assert limited.code == 429 and limited.error == "rate_limited" and int(limited.headers["Retry-After"]) > 0
    assert (await login(api)).code == 429  # the same limit as a login's
    assert await signed_in(api, user.token) and deletion_due_at(app) is None


@gen_test
async def test_the_body_carries_the_password_or_a_code(api, user, app):
    neither = await delete_me(api, user.token, {})
    assert neither.code == 422 and neither.error == "invalid_field" and neither.json["error"]["field"] == "password"
    both = await delete_me(api, user.token, {"password": PASSWORD, "code": "123456"})
    assert both.code == 422 and both.error == "invalid_field"
    typed = await delete_me(api, user.token, {"password": 123})
    assert typed.code == 422 and typed.json["error"]["field"] == "password"
    anonymous = await delete_me(api, None, {"password": PASSWORD})
    assert anonymous.code == 401 and anonymous.error == "unauthorized"
    assert await signed_in(api, user.token) and deletion_due_at(app) is None


@pytest.mark.settings(cpu_workers=4, login_phone_failures=100, login_slowdown_after=100)
@gen_test
async def test_parallel_deletions_on_every_session_schedule_one(api, user, app):
    tokens = [user.token] + [(await login(api)).json["token"] for _ in range(5)]
    responses = await asyncio.gather(*(delete_me(api, token, {"password": PASSWORD}) for token in tokens * 2))
    codes = sorted(r.code for r in responses)
    assert codes.count(202) == 1, [r.body for r in responses]
    assert set(codes) == {202, 401} and {r.error for r in responses if r.code == 401} == {"unauthorized"}
    for token in tokens:
        assert not await signed_in(api, token)


# -- the grace period ------------------------------------------------------------------------------------


@gen_test
async def test_a_login_in_the_grace_period_undoes_the_deletion_and_says_so(api, user, app, clock):
    assert (await delete_me(api, user.token, {"password": PASSWORD})).code == 202
    clock.advance(GRACE - 60)
    back = await login(api)
    assert back.code == 200 and back.json["deletion_cancelled"] is True
    assert back.json["user"]["id"] == user.id and deletion_due_at(app) is None
    assert await signed_in(api, back.json["token"])
    again = await login(api)
    assert again.code == 200 and again.json["deletion_cancelled"] is False
    clock.advance(120)
    assert (await purge(app))["purged_users"] == 0
    assert await signed_in(api, back.json["token"])


@gen_test
async def test_an_sms_login_in_the_grace_period_undoes_the_deletion(api, user, app, outbox, clock):
    assert (await delete_me(api, user.token, {"password": PASSWORD})).code == 202
    clock.advance(3600)
    code = await code_for(api, outbox, clock, "login")
    back = await api.post("/users/login", {"phone": PHONE, "code": code})
    assert back.code == 200 and back.json["deletion_cancelled"] is True and deletion_due_at(app) is None


@gen_test
async def test_the_phone_stays_taken_in_the_grace_period(api, user, app, outbox, clock):
    assert (await delete_me(api, user.token, {"password": PASSWORD})).code == 202
    clock.advance(61)
    asked = await api.post("/users/code", {"phone": PHONE, "purpose": "regist"})
    assert asked.code == 200
    notice = await outbox.last(E164)
    assert notice["code"] is None and "already has a demo account" in notice["text"]


@gen_test
async def test_a_login_once_the_deletion_is_final_fails_as_for_an_unknown_phone(api, user, app, outbox, clock):
    assert (await delete_me(api, user.token, {"password": PASSWORD})).code == 202
    code = await code_for(api, outbox, clock, "login")
    clock.advance(GRACE + 1)  # final, not purged yet: housekeeping has not run
    late = await login(api)
    assert late.code == 401 and late.error == "invalid_credentials"
    by_code = await api.post("/users/login", {"phone": PHONE, "code": code})
    assert by_code.code == 400 and by_code.error == "invalid_code"
    assert deletion_due_at(app) is not None  # not undone
    assert (await purge(app))["purged_users"] == 1


# -- the purge ------------------------------------------------------------------------------------------


def rows_naming(app, user_id: int, *needles: str) -> dict[str, int]:
    """Per table, the rows that name the user: by a column pointing at users.id, or by a text column
    holding one of ``needles`` (the phone, the public id) anywhere in it (rate-limit keys too)."""
    found: dict[str, int] = {}

    def count(s) -> None:
        for table in Base.metadata.sorted_tables:
            tests = []
            for column in table.columns:
                if any(fk.column.table.name == "users" for fk in column.foreign_keys) or (
                    table.name == "users" and column.name == "id"
                ):
                    tests.append(column == user_id)
                if isinstance(column.type, String):
                    tests.extend(column.contains(needle, autoescape=True) for needle in needles)
            if tests:
                n = s.scalar(select(func.count()).select_from(table).where(or_(*tests)))
                if n:
                    found[table.name] = n

    app.services.db.run_sync(count)
    return found


# No lookup cache: a purged image's URL is then gone at once (with it, within image_lookup_ttl, as for
# an image deleted through another process). A short grace period: the codes and counters the user left
# have not expired yet (the other sweeps would take them), so only the purge can remove them.
@pytest.mark.settings(image_lookup_ttl=0, account_deletion_grace=120)
@pytest.mark.usefixtures("storage")
@gen_test
async def test_the_purge_leaves_nothing_of_the_user_but_keeps_a_blob_another_user_shares(api, user, app, outbox, clock):
    other_token = await second_user(api, outbox)
    shared = jpeg((300, 200))
    mine_shared = await uploaded(api, user.token, shared)
    theirs = await uploaded(api, other_token, shared)
    mine_only = await uploaded(api, user.token, png((120, 90)))
    assert mine_shared["sha256"] == theirs["sha256"] != mine_only["sha256"]
    for image in (mine_shared, mine_only):
        assert (await fetch(api, image["thumbnails"]["160"])).code == 200
    # What else a user leaves: H5 visits, codes and their texts, login counters, a failed login.
    await open_h5(api, user.body["h5_url"])
    await code_for(api, outbox, clock, "delete")
    assert (await login(api, password="not the password")).code == 401
    user_id = app.services.db.run_sync(lambda s: s.scalar(select(User.id).where(User.phone == E164)))
    assert rows_naming(app, user_id, E164, user.id).keys() >= {"users", "auth_sessions", "images", "rate_counters"}

    assert (await delete_me(api, user.token, {"password": PASSWORD})).code == 202
    clock.advance(121)
    counts = await purge(app)
    assert counts["purged_users"] == 1 and counts["unused_blobs"] == 1

    assert rows_naming(app, user_id, E164, user.id) == {}
    assert rows_naming(app, -1, OTHER_E164)["users"] == 1  # the check finds what is there
    shared_sha, gone_sha = theirs["sha256"], mine_only["sha256"]
    assert stored_objects(app.services.settings) == sorted([object_name(shared_sha), object_name(shared_sha, 160)])
    assert not app.services.store.exists(gone_sha)
    served = await fetch(api, theirs["url"])
    assert served.code == 200 and served.body == (await fetch(api, theirs["url"])).body
    assert (await fetch(api, theirs["thumbnails"]["160"])).code == 200
    for image in (mine_shared, mine_only):
        assert (await fetch(api, image["url"])).code == 404

    # The phone is free: a new account, with nothing of the old one.
    clock.advance(61)
    again = await api.register(outbox)
    assert again.code == 201 and again.json["user"]["id"] != user.id
    profile = await api.get("/users/me", token=again.json["token"])
    assert profile.json["user"]["image_count"] == 0
    assert (await api.get("/images", token=again.json["token"])).json["images"] == []


@gen_test
async def test_the_purge_takes_only_final_deletions(api, user, app, outbox, clock):
    other_token = await second_user(api, outbox)
    assert (await delete_me(api, user.token, {"password": PASSWORD})).code == 202
    clock.advance(GRACE - 1)
    assert (await purge(app))["purged_users"] == 0 and deletion_due_at(app) is not None
    clock.advance(2)
    assert (await purge(app))["purged_users"] == 1 and deletion_due_at(app) is None
    assert await signed_in(api, other_token)
    assert (await purge(app))["purged_users"] == 0


@pytest.mark.settings(account_deletion_grace=0)
@gen_test
async def test_no_grace_period_purges_on_the_next_round(api, user, app, clock):
    response = await delete_me(api, user.token, {"password": PASSWORD})
    assert response.code == 202 and response.json["final_at"] == clock.now().replace(microsecond=0).isoformat() + "Z"
    assert (await login(api)).code == 401
    assert (await purge(app))["purged_users"] == 1


# -- logging in with an SMS code ------------------------------------------------------------------------


@gen_test
async def test_an_sms_code_logs_in_with_the_session_body_once(api, user, outbox, clock):
    code = await code_for(api, outbox, clock, "login")
    assert "sign-in code" in outbox.messages()[-1]["text"]
    response = await api.post("/users/login", {"phone": PHONE, "code": code})
    assert response.code == 200, response.body
    body = response.json
    assert set(body) == {"user", "token", "token_type", "expires_in", "h5_url", "deletion_cancelled"}
    assert body["user"]["id"] == user.id and body["token_type"] == "Bearer" and await signed_in(api, body["token"])
    assert await open_h5(api, body["h5_url"])
    spent = await api.post("/users/login", {"phone": PHONE, "code": code})
    assert spent.code == 400 and spent.error == "invalid_code" and spent.json["error"]["field"] == "code"


@pytest.mark.settings(login_phone_failures=3)
@gen_test
async def test_wrong_codes_are_failed_logins_with_the_password_logins_limits(api, user, outbox, clock):
    code = await code_for(api, outbox, clock, "login")
    wrong = "000000" if code != "000000" else "111111"
    assert (await login(api, password="not the password")).code == 401
    for _ in range(2):
        refused = await api.post("/users/login", {"phone": PHONE, "code": wrong})
        assert refused.code == 400 and refused.error == "invalid_code"
    limited = await api.post("/users/login", {"phone": PHONE, "code": code})
    assert limited.code == 429 and limited.error == "rate_limited"
    assert (await login(api)).code == 429


@gen_test
async def test_a_code_dies_after_five_wrong_tries(api, user, outbox, clock):
    code = await code_for(api, outbox, clock, "login")
    wrong = "000000" if code != "000000" else "111111"
    for _ in range(5):
        assert (await api.post("/users/login", {"phone": PHONE, "code": wrong})).code == 400
    dead = await api.post("/users/login", {"phone": PHONE, "code": code})
    assert dead.code == 400 and dead.error == "invalid_code"


@gen_test
async def test_a_phone_without_an_account_gets_no_text_and_the_same_answers(api, user, app, outbox, clock):
    clock.advance(61)
    registered = await api.post("/users/code", {"phone": PHONE, "purpose": "login"})
    unknown = await api.post("/users/code", {"phone": UNKNOWN, "purpose": "login"})
    assert (registered.code, registered.body) == (unknown.code, unknown.body) == (200, registered.body)
    code = await outbox.code(E164)
    sent = await outbox.after_delivery(app)
    assert UNKNOWN_E164 not in {m["phone"] for m in sent}
    statuses = app.services.db.run_sync(
        lambda s: s.scalars(select(SmsOutbox.status).where(SmsOutbox.phone == UNKNOWN_E164)).all()
    )
    assert statuses == ["skipped"]  # the same row as a text, so both requests cost the same
    wrong = "000000" if code != "000000" else "111111"
    answers = [
        await api.post("/users/login", {"phone": phone, "code": guess})
        for phone, guess in ((PHONE, wrong), (UNKNOWN, wrong), (UNKNOWN, code))
    ]
    assert {(r.code, r.body) for r in answers} == {(400, answers[0].body)}


# 100 codes to one prefix at once, none used: the SMS cost guard's burst cap is lifted (the breaker off).
@pytest.mark.settings(sms_ip_hourly=10_000, login_ip_failures=10_000, sms_breaker_conversion=0)
@gen_test
async def test_code_logins_answer_alike_in_time_and_status_for_registered_and_unknown_phones(api, app, outbox):
    samples = 50
    registered = [f"+86188666{n:05d}" for n in range(samples)]
    unknown = [f"+86188777{n:05d}" for n in range(samples)]
    now = app.services.clock.now()
    app.services.db.run_sync(
        lambda s: s.add_all(User(phone=phone, password_hash="x", created_at=now) for phone in registered)
    )
    for phone in registered + unknown:  # a live login code (or, for an unknown phone, its skipped row)
        assert (await api.post("/users/code", {"phone": phone, "purpose": "login"})).code == 200
    await outbox.after_delivery(app)
    times: dict[str, list[float]] = {"registered": [], "unknown": []}
    bodies = set()
    requests = [("registered", phone) for phone in registered] + [("unknown", phone) for phone in unknown]
    random.Random(17).shuffle(requests)  # drift in the machine's load hits both alike
    for kind, phone in requests:
        started = time.perf_counter()
        response = await api.post("/users/login", {"phone": phone, "code": "000000"})
        times[kind].append(time.perf_counter() - started)
        assert response.code == 400, (kind, response.body)
        bodies.add(response.body)
    assert len(bodies) == 1
    # Same distribution: with 50 + 50 samples D passes 0.5 about once in 100,000 runs.
    distance = ks_statistic(times["registered"], times["unknown"])
    assert distance < 0.5, (distance, sorted(times["registered"]), sorted(times["unknown"]))


@gen_test
async def test_parallel_logins_with_one_code_make_one_session(api, user, app, outbox, clock):
    code = await code_for(api, outbox, clock, "login")
    responses = await asyncio.gather(*(api.post("/users/login", {"phone": PHONE, "code": code}) for _ in range(10)))
    assert sorted(r.code for r in responses) == [200] + [400] * 9, [r.body for r in responses]


@gen_test
async def test_a_login_sends_the_password_or_a_code_not_both(api, user):
    both = await api.post("/users/login", {"phone": PHONE, "password": PASSWORD, "code": "123456"})
    assert both.code == 422 and both.error == "invalid_field" and both.json["error"]["field"] == "code"
    neither = await api.post("/users/login", {"phone": PHONE})
    assert neither.code == 422 and neither.json["error"]["field"] == "password"


@pytest.mark.settings(sms_login=False)
@gen_test
async def test_sms_login_can_be_turned_off(api, user, outbox):
    asked = await api.post("/users/code", {"phone": PHONE, "purpose": "login"})
    assert asked.code == 422 and asked.error == "invalid_field" and asked.json["error"]["field"] == "purpose"
    assert "'login'" not in asked.json["error"]["message"]
    by_code = await api.post("/users/login", {"phone": PHONE, "code": "123456"})
    assert by_code.code == 422 and by_code.error == "invalid_field" and by_code.json["error"]["field"] == "code"
    assert "turned off" in by_code.json["error"]["message"]
    assert (await login(api)).code == 200
