"""H5 pages (views/h5_*): tickets, the exchange, cookie sessions, the home page, XSRF, HTML errors."""
from __future__ import annotations

import io
import re
from http.cookies import SimpleCookie
from urllib.parse import urlsplit

import pytest
from PIL import Image as PILImage
from sqlalchemy import event, select

from demo.common.db import Cursor
from demo.models import H5Session, H5Ticket, User

gen_test = pytest.mark.gen_test(timeout=60)
PHONE, E164, PASSWORD = "18866668888", "+8618866668888", "demo123456"


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


async def home(api, cookie: str, extra: str = ""):
    return await api.get("/h5/home", headers={"Cookie": f"demo_h5={cookie}{extra}"})


def xsrf_from(page) -> tuple[str, str]:
    """(form token, _xsrf cookie) from a rendered page."""
    token = re.search(rb'name="_xsrf" value="([^"]+)"', page.body).group(1).decode()
    return token, cookies_of(page)["_xsrf"]["_xsrf"].value


def is_html_page(response, status: int) -> bool:
    return response.code == status and response.headers["Content-Type"].startswith("text/html") \
        and b"<!doctype html>" in response.body


# -- tickets -----------------------------------------------------------------------------------------


@gen_test
async def test_session_bodies_carry_an_absolute_h5_url(api, user, base_url):
    assert user.body["h5_url"].startswith(base_url + "/h5/home?ticket=")
    login = await api.post("/users/login", {"phone": PHONE, "password": PASSWORD},
                           headers={"X-Forwarded-Proto": "https", "Host": "api.example.com"})
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
    assert response.headers["Referrer-Policy"] == "no-referrer"
    morsel = cookies_of(response)["demo_h5"]["demo_h5"]
    assert morsel["httponly"] and morsel["samesite"] == "Lax" and morsel["path"] == "/h5"
    assert not morsel["secure"]  # plain HTTP here
    ticket_row, session_row = app.services.db.run_sync(
        lambda s: (s.scalars(select(H5Ticket)).one(), s.scalars(select(H5Session)).one()))
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
    visits, last = app.services.db.run_sync(lambda s: s.execute(select(User.h5_visit_count, User.h5_last_visit_at)).one())
    assert visits == 2 and last is not None


@gen_test
async def test_one_database_update_per_view(api, user, app, monkeypatch):
    cookie = await open_h5(api, user.body["h5_url"])
    statements: list[str] = []

    def record(conn, cursor, statement, *args):
        statements.append(statement.split(None, 1)[0].upper())

    direct_run = Cursor._run

    def record_direct(cursor, compiled, values):
        statements.append(compiled.sql.split(None, 1)[0].upper())
        direct_run(cursor, compiled, values)

    monkeypatch.setattr(Cursor, "_run", record_direct)
    event.listen(app.services.db.engine, "before_cursor_execute", record)
    try:
        assert (await home(api, cookie)).code == 200
    finally:
        event.remove(app.services.db.engine, "before_cursor_execute", record)
    assert statements == ["SELECT", "UPDATE"]


@gen_test
async def test_home_page_lists_own_images(api, user, outbox, clock):
    buffer = io.BytesIO()
    PILImage.new("RGB", (400, 200), (0, 120, 200)).save(buffer, "PNG")
    uploaded = await api.post("/images", body=buffer.getvalue(), token=user.token,
                              headers={"Content-Type": "image/png"})
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
    reset = await api.post("/users/password/reset", {"phone": PHONE, "code": await outbox.code(E164), "password": "new secret 42"})
    assert reset.code == 204
    assert is_html_page(await home(api, cookie), 401)


@pytest.mark.settings(h5_session_ttl=600)
@gen_test
async def test_h5_session_expires(api, user, clock):
    cookie = await open_h5(api, user.body["h5_url"])
    clock.advance(601)
    assert is_html_page(await home(api, cookie), 401)


# -- forms and XSRF ----------------------------------------------------------------------------------


@gen_test
async def test_logout_needs_the_xsrf_token(api, user):
    cookie = await open_h5(api, user.body["h5_url"])
    page = await home(api, cookie)
    token, xsrf_cookie = xsrf_from(page)
    refused = await api.post("/h5/logout", body="", headers={"Cookie": f"demo_h5={cookie}"})
    assert is_html_page(refused, 403)
    forged = await api.post("/h5/logout", body="_xsrf=forged", headers={
        "Cookie": f"demo_h5={cookie}; _xsrf={xsrf_cookie}", "Content-Type": "application/x-www-form-urlencoded"})
    assert is_html_page(forged, 403)
    assert (await home(api, cookie)).code == 200  # still signed in
    done = await api.post("/h5/logout", body=f"_xsrf={token}", headers={
        "Cookie": f"demo_h5={cookie}; _xsrf={xsrf_cookie}", "Content-Type": "application/x-www-form-urlencoded"})
    assert done.code == 302 and done.headers["Location"] == "/h5/home"
    assert is_html_page(await home(api, cookie), 401)
    assert (await api.get("/users/me", token=user.token)).code == 200  # the app session lives on


@gen_test
async def test_page_upload_needs_cookie_and_xsrf_while_bearer_api_is_exempt(api, user):
    cookie = await open_h5(api, user.body["h5_url"])
    token, xsrf_cookie = xsrf_from(await home(api, cookie))
    buffer = io.BytesIO()
    PILImage.new("RGB", (64, 64), (250, 200, 0)).save(buffer, "JPEG")
    boundary = "demo-boundary-1"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + buffer.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    form = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    no_xsrf = await api.post("/h5/images", body=body, headers={**form, "Cookie": f"demo_h5={cookie}; _xsrf={xsrf_cookie}"})
    assert is_html_page(no_xsrf, 403)
    no_cookie = await api.post("/h5/images", body=body, headers={**form, "Cookie": f"_xsrf={xsrf_cookie}",
                                                               "X-XSRFToken": token})
    assert is_html_page(no_cookie, 401)
    ok = await api.post("/h5/images", body=body, headers={**form, "Cookie": f"demo_h5={cookie}; _xsrf={xsrf_cookie}",
                                                        "X-XSRFToken": token})
    assert ok.code == 201 and ok.json["image"]["format"] == "jpeg"
    assert (await api.post("/images", body=buffer.getvalue(), token=user.token,
                           headers={"Content-Type": "image/jpeg"})).code == 201  # no XSRF for Bearer calls
    listing = await api.get("/h5/images", headers={"Cookie": f"demo_h5={cookie}"})
    assert listing.code == 405


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
    assert (await api.get("/users/nope")).headers["Content-Type"].startswith("application/json")  # elsewhere JSON
