"""H5 pages (views/h5_*): tickets, the exchange, cookie sessions, the home page, XSRF, HTML errors."""

from __future__ import annotations

import hashlib
import io
import json
import re
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from PIL import Image as PILImage
from sqlalchemy import event, select
from tornado.template import Loader

from demo.common.errors import Unavailable
from demo.common.infra.db import SqlCursor
from demo.common.web.pages import H5PageHandler
from demo.models import H5Session, H5Ticket, User

gen_test = pytest.mark.gen_test(timeout=60)
PHONE, E164, PASSWORD = "18866668888", "+8618866668888", "demo123456"
ROOT = Path(__file__).resolve().parents[2]


def cookies_of(response) -> dict[str, SimpleCookie]:
    jar: dict[str, SimpleCookie] = {}
    for header in response.headers.get_list("Set-Cookie"):
        cookie = SimpleCookie()
        cookie.load(header)
        for name in cookie:
            jar[name] = cookie
    return jar


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + ("?" + parts.query if parts.query else "")


async def open_h5(api, h5_url: str, headers: dict | None = None) -> str:
    """Follow the h5_url like a WebView: returns the H5 cookie value."""
    exchanged = await api.get(path_of(h5_url), headers=headers)
    assert exchanged.code == 302, exchanged.body
    return cookies_of(exchanged)["demo_h5"]["demo_h5"].value


async def home(api, cookie: str, headers: dict | None = None):
    return await api.get("/h5/home", headers={"Cookie": f"demo_h5={cookie}", **(headers or {})})


def xsrf_from(page) -> str:
    """The form token of a rendered page."""
    return re.search(rb'name="_xsrf" value="([^"]+)"', page.body).group(1).decode()


def set_by(page) -> str:
    """The cookies a page set, as a browser sends them back after ``demo_h5`` ("; name=value"...)."""
    return "".join(f"; {name}={morsel.value}" for jar in cookies_of(page).values() for name, morsel in jar.items())


def is_html_page(response, status: int) -> bool:
    return (
        response.code == status
        and response.headers["Content-Type"].startswith("text/html")
        and b"<!doctype html>" in response.body
    )


def is_json_error(response, status: int, code: str) -> bool:
    """The page upload's errors: the contract's JSON error, as its 201 is JSON (the page's XHR reads both)."""
    return (
        response.code == status
        and response.headers["Content-Type"].startswith("application/json")
        and json.loads(response.body)["error"]["code"] == code
    )


# -- tickets -----------------------------------------------------------------------------------------


@gen_test
async def test_session_bodies_carry_an_absolute_h5_url(api, user, base_url):
    assert user.body["h5_url"].startswith(base_url + "/h5/home?ticket=")
    login = await api.post(
        "/users/login",
        {"phone": PHONE, "password": PASSWORD},
        headers={"X-Forwarded-Proto": "https", "Host": "api.example.com"},
    )
    assert login.json["h5_url"].startswith("https://api.example.com/h5/home?ticket=")
    ticket = login.json["h5_url"].split("ticket=")[1]
    assert len(ticket) >= 43  # 256 random bits, URL-safe


@pytest.mark.settings(public_url="https://app.example.com")
@gen_test
async def test_public_url_wins_when_configured(api, user):
    assert user.body["h5_url"].startswith("https://app.example.com/h5/home?ticket=")


@gen_test
async def test_ticket_endpoint_issues_a_fresh_url(api, user):
    response = await api.post("/h5/ticket", token=user.token)
    assert response.code == 200 and response.json["expires_in"] == 120
    assert await open_h5(api, response.json["h5_url"])
    unauthenticated = await api.post("/h5/ticket")
    assert unauthenticated.code == 401 and unauthenticated.error == "unauthorized"  # an API call: JSON


@gen_test
async def test_exchange_sets_the_cookie_and_hides_the_ticket(api, user, app):
    response = await api.get(path_of(user.body["h5_url"]))
    assert response.code == 302 and response.headers["Location"] == "/h5/home"
    assert response.headers["Referrer-Policy"] == "same-origin"  # never to another site
    morsel = cookies_of(response)["demo_h5"]["demo_h5"]
    assert morsel["httponly"] and morsel["samesite"] == "Lax" and morsel["path"] == "/h5"
    assert not morsel["secure"]  # plain HTTP here
    ticket_row, session_row = app.services.db.run_sync(
        lambda s: (s.scalars(select(H5Ticket)).one(), s.scalars(select(H5Session)).one())
    )
    assert ticket_row.used_at is not None and session_row.ticket_id == ticket_row.id  # the exchange is recorded


@gen_test
async def test_cookie_is_secure_when_the_client_came_over_https(api, user):
    response = await api.get(path_of(user.body["h5_url"]), headers={"X-Forwarded-Proto": "https"})
    assert cookies_of(response)["demo_h5"]["demo_h5"]["secure"]


@gen_test
async def test_a_ticket_works_once(api, user):
    assert await open_h5(api, user.body["h5_url"])
    again = await api.get(path_of(user.body["h5_url"]))
    assert is_html_page(again, 401) and b"Open this page from the app" in again.body
    assert "demo_h5" not in cookies_of(again)


@gen_test
async def test_a_ticket_expires_after_120_seconds(api, user, clock):
    fresh = (await api.post("/h5/ticket", token=user.token)).json["h5_url"]
    clock.advance(119)
    assert await open_h5(api, user.body["h5_url"])
    clock.advance(2)
    late = await api.get(path_of(fresh))
    assert is_html_page(late, 401)


@gen_test
async def test_a_ticket_dies_with_its_app_session(api, user):
    assert (await api.post("/users/logout", token=user.token)).code == 204
    assert is_html_page(await api.get(path_of(user.body["h5_url"])), 401)


@pytest.mark.parametrize("ticket", ["", "short", "x" * 43, "../../etc/passwd"])
@gen_test
async def test_garbage_tickets_get_the_401_page(api, ticket):
    assert is_html_page(await api.get(f"/h5/home?ticket={ticket}"), 401)


# -- the home page -------------------------------------------------------------------------------


@gen_test
async def test_home_page_shows_the_user_and_counts_visits(api, user, app):
    cookie = await open_h5(api, user.body["h5_url"])
    first = await home(api, cookie)
    assert is_html_page(first, 200)
    assert b"188****8888" in first.body and E164.encode() not in first.body
    assert b'id="visits">1<' in first.body and b"No images yet." in first.body
    csp = first.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert first.headers["Cache-Control"] == "no-store"
    assert b"viewport" in first.body and b"/static/h5/h5.css?v=" in first.body
    second = await home(api, cookie)
    assert b'id="visits">2<' in second.body
    visits, last = app.services.db.run_sync(
        lambda s: s.execute(select(User.h5_visit_count, User.h5_last_visit_at)).one()
    )
    assert visits == 2 and last is not None


@gen_test
async def test_one_database_update_per_view(api, user, app, monkeypatch):
    cookie = await open_h5(api, user.body["h5_url"])
    statements: list[str] = []

    def record(conn, cursor, statement, *args):
        statements.append(statement.split(None, 1)[0].upper())

    direct_run = SqlCursor.run

    def record_direct(cursor, sql, params):
        statements.append(sql.for_dialect(cursor.dialect).split(None, 1)[0].upper())
        return direct_run(cursor, sql, params)

    monkeypatch.setattr(SqlCursor, "run", record_direct)
    event.listen(app.services.db.engine, "before_cursor_execute", record)
    try:
        assert (await home(api, cookie)).code == 200
    finally:
        event.remove(app.services.db.engine, "before_cursor_execute", record)
    assert statements == ["SELECT", "UPDATE"]


@pytest.mark.usefixtures("storage")  # stores an image: on both stores
@gen_test
async def test_home_page_lists_own_images(api, user, outbox, clock):
    buffer = io.BytesIO()
    PILImage.new("RGB", (400, 200), (0, 120, 200)).save(buffer, "PNG")
    uploaded = await api.post(
        "/images", body=buffer.getvalue(), token=user.token, headers={"Content-Type": "image/png"}
    )
    assert uploaded.code == 201
    # Someone else's image is not shown.
    clock.advance(61)
    other = await api.register(outbox, phone="18866669999")
    await api.post("/images", body=buffer.getvalue(), token=other.json["token"], headers={"Content-Type": "image/png"})
    page = await home(api, await open_h5(api, user.body["h5_url"]))
    image_id = uploaded.json["image"]["id"]
    assert page.body.count(b'<li><a href="') == 1
    assert f"/images/{image_id}.png?w=320".encode() in page.body and b'loading="lazy"' in page.body


@pytest.mark.parametrize("cookie", ["", "nope", "A" * 43])
@gen_test
async def test_without_a_valid_cookie_the_401_page(api, cookie):
    response = await api.get("/h5/home", headers={"Cookie": f"demo_h5={cookie}"} if cookie else {})
    assert is_html_page(response, 401)


@gen_test
async def test_app_logout_ends_the_h5_session(api, user):
    cookie = await open_h5(api, user.body["h5_url"])
    assert (await home(api, cookie)).code == 200
    await api.post("/users/logout", token=user.token)
    assert is_html_page(await home(api, cookie), 401)


@gen_test
async def test_password_reset_ends_the_h5_session(api, user, outbox, clock):
    cookie = await open_h5(api, user.body["h5_url"])
    clock.advance(61)
    await api.post("/users/code", {"phone": PHONE, "purpose": "reset"})
    reset = await api.post(
        "/users/password/reset", {"phone": PHONE, "code": await outbox.code(E164), "password": "new secret 42"}
    )
    assert reset.code == 204
    assert is_html_page(await home(api, cookie), 401)


@pytest.mark.settings(h5_session_ttl=600)
@gen_test
async def test_h5_session_expires(api, user, clock):
    cookie = await open_h5(api, user.body["h5_url"])
    clock.advance(601)
    assert is_html_page(await home(api, cookie), 401)


# -- forms and XSRF ----------------------------------------------------------------------------------

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
# What an attacker who can plant cookies (a sibling subdomain, a plain-HTTP response) sends along:
# a well-formed Tornado token as both the _xsrf cookie and the form field.
PLANTED = "2|deadbeef|" + "ab" * 16 + "|1700000000"


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (64, 64), (250, 200, 0)).save(buffer, "JPEG")
    return buffer.getvalue()


def jpeg_form() -> tuple[bytes, dict[str, str]]:
    """A multipart body holding a small JPEG, as the page's upload form sends it, and its headers."""
    boundary = "demo-boundary-1"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + jpeg_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


async def logout(api, cookie: str, token: str | None, headers: dict | None = None, cookies: str = ""):
    body = f"_xsrf={quote(token)}" if token is not None else ""
    return await api.post(
        "/h5/logout", body=body, headers={**FORM, "Cookie": f"demo_h5={cookie}{cookies}", **(headers or {})}
    )


@gen_test
async def test_logout_needs_the_xsrf_token(api, user):
    cookie = await open_h5(api, user.body["h5_url"])
    page = await home(api, cookie)
    token, jar = xsrf_from(page), set_by(page)
    assert is_html_page(await logout(api, cookie, None, cookies=jar), 403)
    assert is_html_page(await logout(api, cookie, "forged", cookies=jar), 403)
    assert (await home(api, cookie)).code == 200  # still signed in
    done = await logout(api, cookie, token, cookies=jar)
    assert done.code == 302 and done.headers["Location"] == "/h5/home?signed_out=1"
    assert is_html_page(await home(api, cookie), 401)
    assert (await api.get("/users/me", token=user.token)).code == 200  # the app session lives on


@gen_test
async def test_logout_lands_on_the_signed_out_page_not_the_401_page(api, user):
    cookie = await open_h5(api, user.body["h5_url"])
    page = await home(api, cookie)
    done = await logout(api, cookie, xsrf_from(page), cookies=set_by(page))
    assert "demo_h5" in cookies_of(done)  # cleared: the browser follows the redirect without it
    landed = await api.get(done.headers["Location"])
    assert is_html_page(landed, 200) and b"<h1>You have signed out</h1>" in landed.body
    assert b"401" not in landed.body and b"Open this page from the app" not in landed.body
    assert is_html_page(await home(api, cookie), 401)  # the session did end
    # The flag shows nothing to a live session: its home page.
    again = await open_h5(api, (await api.post("/h5/ticket", token=user.token)).json["h5_url"])
    live = await api.get("/h5/home?signed_out=1", headers={"Cookie": f"demo_h5={again}"})
    assert live.code == 200 and b'id="phone"' in live.body


@gen_test
async def test_the_h5_and_the_app_logout_are_two_metric_series(api, user):
    """The metrics label is the route's name, not the class name (both classes were LogoutHandler)."""
    cookie = await open_h5(api, user.body["h5_url"])
    page = await home(api, cookie)
    assert (await logout(api, cookie, xsrf_from(page), cookies=set_by(page))).code == 302
    assert (await api.post("/users/logout", token=user.token)).code == 204
    text = (await api.get("/metrics")).body.decode()
    assert 'demo_requests_total{method="POST",route="h5.logout",status="302"} 1.0' in text
    assert 'demo_requests_total{method="POST",route="users.logout",status="204"} 1.0' in text
    assert "LogoutHandler" not in text


@gen_test
async def test_the_form_token_is_bound_to_the_session_and_no_xsrf_cookie_is_set(api, user):
    cookie = await open_h5(api, user.body["h5_url"])
    first, second = await home(api, cookie), await home(api, cookie)
    assert "_xsrf" not in cookies_of(first)  # nothing to plant a twin of
    tokens = {xsrf_from(first), xsrf_from(second)}
    assert len(tokens) == 2  # masked afresh on every page (BREACH), yet both are this session's
    for token in tokens:
        assert (
            await api.post("/h5/images", body=b"", headers={"Cookie": f"demo_h5={cookie}", "X-XSRFToken": token})
        ).code != 403


@gen_test
async def test_a_planted_xsrf_cookie_and_field_neither_log_out_nor_upload(api, user):
    cookie = await open_h5(api, user.body["h5_url"])
    planted = await logout(api, cookie, PLANTED, cookies=f"; _xsrf={PLANTED}")
    assert is_html_page(planted, 403)
    body, form = jpeg_form()
    upload = await api.post(
        "/h5/images",
        body=body,
        headers={**form, "Cookie": f"demo_h5={cookie}; _xsrf={PLANTED}", "X-XSRFToken": PLANTED},
    )
    assert is_json_error(upload, 403, "forbidden")
    assert (await home(api, cookie)).code == 200  # still signed in
    assert (await api.get("/images", token=user.token)).json["images"] == []  # nothing uploaded


@gen_test
async def test_a_token_of_another_session_is_refused(api, user):
    victim = await open_h5(api, user.body["h5_url"])
    attacker = await open_h5(api, (await api.post("/h5/ticket", token=user.token)).json["h5_url"])
    page = await home(api, attacker)
    # With whatever cookie the page set too: a double-submit check would take the pair.
    assert is_html_page(await logout(api, victim, xsrf_from(page), cookies=set_by(page)), 403)
    assert (await home(api, victim)).code == 200
    assert (await logout(api, attacker, xsrf_from(page), cookies=set_by(page))).code == 302  # good in its own


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "http://localhost.evil.example", "Sec-Fetch-Site": "same-site"},
    ],
)
@gen_test
async def test_cross_site_posts_are_refused_even_with_a_good_token(api, user, headers):
    cookie = await open_h5(api, user.body["h5_url"])
    page = await home(api, cookie)
    token, jar = xsrf_from(page), set_by(page)
    assert is_html_page(await logout(api, cookie, token, headers, cookies=jar), 403)
    body, form = jpeg_form()
    upload = await api.post(
        "/h5/images", body=body, headers={**form, **headers, "Cookie": f"demo_h5={cookie}{jar}", "X-XSRFToken": token}
    )
    assert is_json_error(upload, 403, "forbidden")
    assert (await home(api, cookie)).code == 200
    assert (await logout(api, cookie, token, cookies=jar)).code == 302  # the same post from our own page passes


@pytest.mark.settings(public_url="https://app.example.com")
@pytest.mark.parametrize("origin", ["own", "https://app.example.com"])
@gen_test
async def test_same_origin_posts_pass(api, user, base_url, origin):
    cookie = await open_h5(api, user.body["h5_url"])
    page = await home(api, cookie)
    headers = {"Origin": base_url if origin == "own" else origin, "Sec-Fetch-Site": "same-origin"}
    assert (await logout(api, cookie, xsrf_from(page), headers, cookies=set_by(page))).code == 302


@pytest.mark.usefixtures("storage")  # stores an image: on both stores
@gen_test
async def test_page_upload_needs_cookie_and_xsrf_while_bearer_api_is_exempt(api, user):
    cookie = await open_h5(api, user.body["h5_url"])
    page = await home(api, cookie)
    token, jar = xsrf_from(page), set_by(page)
    body, form = jpeg_form()
    no_xsrf = await api.post("/h5/images", body=body, headers={**form, "Cookie": f"demo_h5={cookie}{jar}"})
    assert is_json_error(no_xsrf, 403, "forbidden")
    no_cookie = await api.post("/h5/images", body=body, headers={**form, "Cookie": jar[2:], "X-XSRFToken": token})
    assert is_json_error(no_cookie, 401, "unauthorized")
    ok = await api.post(
        "/h5/images", body=body, headers={**form, "Cookie": f"demo_h5={cookie}{jar}", "X-XSRFToken": token}
    )
    assert ok.code == 201 and ok.json["image"]["format"] == "jpeg"
    served = await api.get(path_of(ok.json["image"]["url"]))
    assert served.code == 200 and hashlib.sha256(served.body).hexdigest() == ok.json["image"]["sha256"]
    assert (
        await api.post("/images", body=jpeg_bytes(), token=user.token, headers={"Content-Type": "image/jpeg"})
    ).code == 201  # no XSRF for Bearer calls
    listing = await api.get("/h5/images", headers={"Cookie": f"demo_h5={cookie}"})
    assert is_json_error(listing, 405, "method_not_allowed") and listing.headers["Allow"] == "POST"


@pytest.mark.settings(max_upload_bytes=64 * 1024, image_quota_count=1)
@pytest.mark.usefixtures("storage")  # stores an image: on both stores
@gen_test
async def test_page_upload_errors_are_json_like_its_success(api, user):
    """The page's XHR reads one form: the image object on 201, the contract's error object otherwise,
    with the status and code the /images upload answers (the page shows a message per code)."""
    cookie = await open_h5(api, user.body["h5_url"])
    page = await home(api, cookie)
    headers = {"Cookie": f"demo_h5={cookie}{set_by(page)}", "X-XSRFToken": xsrf_from(page)}
    body, form = jpeg_form()

    async def post(data: bytes, content_type: str):
        return await api.post("/h5/images", body=data, headers={**headers, "Content-Type": content_type})

    assert is_json_error(await post(b"<html></html>", "text/html"), 415, "unsupported_media_type")
    assert is_json_error(await post(b"\xff\xd8\xff" + bytes(70 * 1024), "image/jpeg"), 413, "too_large")
    assert is_json_error(await post(b"\xff\xd8\xff" + bytes(100), "image/jpeg"), 422, "invalid_image")
    ok = await post(body, form["Content-Type"])
    assert ok.code == 201 and ok.headers["Content-Type"].startswith("application/json")
    assert is_json_error(await post(body, form["Content-Type"]), 403, "quota_exceeded")
    assert len((await api.get("/images", token=user.token)).json["images"]) == 1


@gen_test
async def test_no_cookie_lacks_secure_when_the_client_came_over_https(api, user, outbox):
    https = {"X-Scheme": "https"}
    exchanged = await api.get(path_of(user.body["h5_url"]), headers=https)
    cookie = cookies_of(exchanged)["demo_h5"]["demo_h5"].value
    other = await api.register(outbox, phone="18866669999")
    answers = [
        exchanged,
        await home(api, cookie, headers=https),
        await api.get(path_of(other.json["h5_url"]), headers={**https, "Cookie": f"demo_h5={cookie}"}),
    ]
    offer = answers[-1]
    switched = await api.post(
        "/h5/switch",
        body=f"_xsrf={quote(xsrf_from(offer))}&ticket={offer_ticket(offer)}",
        headers={**FORM, **https, "Cookie": f"demo_h5={cookie}"},
    )
    assert switched.code == 302
    new_cookie = cookies_of(switched)["demo_h5"]["demo_h5"].value
    page = await home(api, new_cookie, headers=https)
    answers += [switched, page, await logout(api, new_cookie, xsrf_from(page), https)]
    assert [a.code for a in answers] == [302, 200, 200, 302, 200, 302]
    set_cookies = [header for a in answers for header in a.headers.get_list("Set-Cookie")]
    assert len(set_cookies) == 3  # exchange, switch, logout's clearing
    assert all(morsel["secure"] for header in set_cookies for morsel in SimpleCookie(header).values())


# -- another user's link -----------------------------------------------------------------------------


def offer_ticket(page) -> str:
    return re.search(rb'name="ticket" value="([^"]+)"', page.body).group(1).decode()


async def two_users(api, user, outbox) -> tuple[str, str]:
    """(the victim's live H5 cookie, an h5_url of another user: the attacker's link)."""
    victim = await open_h5(api, user.body["h5_url"])
    attacker = await api.register(outbox, phone="18866669999")
    assert attacker.code == 201
    return victim, attacker.json["h5_url"]


@gen_test
async def test_another_users_link_does_not_replace_a_live_session(api, user, outbox):
    victim, link = await two_users(api, user, outbox)
    offer = await api.get(path_of(link), headers={"Cookie": f"demo_h5={victim}"})
    assert is_html_page(offer, 200) and "demo_h5" not in cookies_of(offer)
    assert b'id="link-phone">188****9999<' in offer.body and b'id="current-phone">188****8888<' in offer.body
    assert b"you stay" in offer.body and b'action="/h5/switch"' in offer.body
    page = await home(api, victim)
    assert b'id="phone">188****8888<' in page.body  # still the victim's own session
    # The link is spent: nobody can use it later, with or without a cookie.
    assert is_html_page(await api.get(path_of(link)), 401)
    body, form = jpeg_form()
    assert (
        await api.post(
            "/h5/images", body=body, headers={**form, "Cookie": f"demo_h5={victim}", "X-XSRFToken": xsrf_from(page)}
        )
    ).code == 201
    assert len((await api.get("/images", token=user.token)).json["images"]) == 1  # the upload is the victim's


@gen_test
async def test_switching_takes_the_choice_pages_xsrf_protected_form(api, user, outbox):
    victim, link = await two_users(api, user, outbox)
    offer = await api.get(path_of(link), headers={"Cookie": f"demo_h5={victim}"})
    ticket, token = offer_ticket(offer), xsrf_from(offer)

    async def switch(fields: str, cookie: str = victim):
        return await api.post("/h5/switch", body=fields, headers={**FORM, "Cookie": f"demo_h5={cookie}"})

    assert is_html_page(await switch(f"ticket={ticket}"), 403)  # a forged post: no token
    switched = await switch(f"_xsrf={quote(token)}&ticket={ticket}")
    assert switched.code == 302 and switched.headers["Location"] == "/h5/home"
    now = cookies_of(switched)["demo_h5"]["demo_h5"].value
    assert b'id="phone">188****9999<' in (await home(api, now)).body
    assert is_html_page(await home(api, victim), 401)  # the session left behind has ended
    assert is_html_page(await switch(f"_xsrf={quote(xsrf_from(await home(api, now)))}&ticket={ticket}", now), 401)


@gen_test
async def test_a_choice_page_whose_offer_expired_keeps_the_session(api, user, outbox, clock):
    victim, link = await two_users(api, user, outbox)
    offer = await api.get(path_of(link), headers={"Cookie": f"demo_h5={victim}"})
    clock.advance(121)
    late = await api.post(
        "/h5/switch",
        body=f"_xsrf={quote(xsrf_from(offer))}&ticket={offer_ticket(offer)}",
        headers={**FORM, "Cookie": f"demo_h5={victim}"},
    )
    assert is_html_page(late, 401) and "demo_h5" not in cookies_of(late)
    assert (await home(api, victim)).code == 200


@gen_test
async def test_the_same_users_link_replaces_the_session(api, user):
    first = await open_h5(api, user.body["h5_url"])
    link = (await api.post("/h5/ticket", token=user.token)).json["h5_url"]
    replaced = await api.get(path_of(link), headers={"Cookie": f"demo_h5={first}"})
    assert replaced.code == 302 and replaced.headers["Location"] == "/h5/home"
    second = cookies_of(replaced)["demo_h5"]["demo_h5"].value
    assert second != first and (await home(api, second)).code == 200
    assert is_html_page(await home(api, first), 401)  # the browser no longer holds it: it ends


@gen_test
async def test_a_dead_session_does_not_stand_in_the_way_of_a_link(api, user, outbox):
    victim, link = await two_users(api, user, outbox)
    assert (await logout(api, victim, xsrf_from(await home(api, victim)))).code == 302
    opened = await api.get(path_of(link), headers={"Cookie": f"demo_h5={victim}"})
    assert opened.code == 302 and "demo_h5" in cookies_of(opened)


# -- errors are HTML under /h5/ ------------------------------------------------------------------------


@gen_test
async def test_h5_errors_are_html_pages(api, app, user, monkeypatch):
    missing = await api.get("/h5/no/such/page")
    assert is_html_page(missing, 404) and b"Page not found" in missing.body
    cookie = await open_h5(api, user.body["h5_url"])

    async def explode(cookie):
        raise RuntimeError("internal detail that must not leak")

    monkeypatch.setattr(app.services.h5, "visit_home", explode)
    broken = await home(api, cookie)
    assert is_html_page(broken, 500) and b"Something went wrong" in broken.body
    assert b"internal detail" not in broken.body and b"Traceback" not in broken.body

    async def database_down(cookie):
        raise Unavailable()

    monkeypatch.setattr(app.services.h5, "visit_home", database_down)
    down = await home(api, cookie)  # the same words as nginx's page when no process answers
    assert is_html_page(down, 503) and H5PageHandler.ERROR_TITLES[503][0].encode() in down.body
    assert (await api.get("/users/nope")).headers["Content-Type"].startswith("application/json")  # elsewhere JSON


def visible_text(page: bytes) -> str:
    """What a reader sees: the page without its tags (and so without attributes such as data-status)."""
    return re.sub(r"<[^>]*>", " ", page.decode())


@gen_test
async def test_error_pages_say_it_in_words_and_keep_the_status_out_of_sight(api):
    for path, status in (("/h5/home", 401), ("/h5/no/such/page", 404)):
        page = await api.get(path)
        assert is_html_page(page, status) and f'data-status="{status}"'.encode() in page.body
        headline = re.search(rb"<h1>(.+?)</h1>", page.body).group(1).decode()
        assert not any(character.isdigit() for character in headline), headline
        assert str(status) not in visible_text(page.body)


def test_nginx_s_unavailable_page_is_the_h5_error_page_rendered():
    """nginx sends demo/static/h5/unavailable.html while no process answers (demo/conf/nginx/demo.conf).
    It must be h5/error.html rendered for 503 with its stylesheet's plain URL, so it looks like every
    other H5 page, and say what the app's own 503 page says. After a change of the templates or of
    those words, this test writes the new rendering to test-artefacts/h5/unavailable.html: check it,
    and copy it over the shipped file."""
    shipped = (ROOT / "demo" / "static" / "h5" / "unavailable.html").read_bytes()
    title, text = H5PageHandler.ERROR_TITLES[503]
    rendered = (
        Loader(str(ROOT / "demo" / "templates"))
        .load("h5/error.html")
        .generate(
            static_url=lambda path: f"/static/{path}", lang="en", status=503, code="unavailable", title=title, text=text
        )
    )
    if rendered != shipped:
        fresh = ROOT / "test-artefacts" / "h5" / "unavailable.html"
        fresh.parent.mkdir(parents=True, exist_ok=True)
        fresh.write_bytes(rendered)
        pytest.fail(f"demo/static/h5/unavailable.html is not h5/error.html rendered: see {fresh}")
    assert b'<link rel="stylesheet" href="/static/h5/h5.css">' in shipped
