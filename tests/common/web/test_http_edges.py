"""The HTTP edges, straight to the app's own server (demo.main.make_server, no nginx): content types,
forwarded headers, malformed and oversized input, and what the answers tell about the server."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from urllib.parse import urlsplit

import pytest

from tests.helpers import sent_phone

gen_test = pytest.mark.gen_test(timeout=60)
PHONE, PASSWORD = "18866668888", "demo123456"
JSON_CALLS = {
    "/users/code": {"phone": PHONE},
    "/users/regist": {"phone": PHONE, "password": PASSWORD, "code": "123456"},
    "/users/login": {"phone": PHONE, "password": PASSWORD},
    "/users/password/reset": {"phone": PHONE, "code": "123456", "password": PASSWORD},
}


def port_of(api) -> int:
    return urlsplit(api.base_url).port


async def raw_exchange(
    port: int, request: bytes, body_pump: bytes = b"", pump_times: int = 0
) -> tuple[int, dict, bytes]:
    """Send ``request`` (then ``body_pump`` up to ``pump_times`` times) over a bare socket, on a thread;
    the answer's status, headers (lower-case names) and body. A server that answers early and closes
    resets the connection: what arrived before the reset is the answer."""
    loop = asyncio.get_running_loop()
    raw = await loop.run_in_executor(None, _exchange, port, request, body_pump, pump_times)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = (line.partition(":") for line in lines[1:])
    headers = {name.strip().lower(): value.strip() for name, _, value in fields}
    assert len(body) == int(headers.get("content-length", "0")), raw
    return int(lines[0].split()[1]), headers, body


def _exchange(port: int, request: bytes, body_pump: bytes, pump_times: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        try:
            sock.sendall(request)
            for _ in range(pump_times):
                sock.sendall(body_pump)
        except OSError:  # the server answered and closed before taking all of it
            pass
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return received


def errors_logged(caplog) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


# -- JSON calls take application/json only -----------------------------------------------------------


@pytest.mark.parametrize("path", sorted(JSON_CALLS))
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "text/plain; charset=utf-8"]
)
@gen_test
async def test_json_calls_refuse_other_content_types_with_415(api, outbox, path, content_type):
    """A page on another site can post text/plain or a form without a CORS preflight: never accepted."""
    response = await api.post(path, body=json.dumps(JSON_CALLS[path]), headers={"Content-Type": content_type})
    assert response.code == 415 and response.error == "unsupported_media_type", response.body
    assert outbox.messages() == []


@pytest.mark.parametrize("path", sorted(JSON_CALLS))
@gen_test
async def test_json_calls_without_a_content_type_are_415(api, outbox, path):
    body = json.dumps(JSON_CALLS[path]).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    status, _, answer = await raw_exchange(port_of(api), head.encode() + body)
    assert status == 415 and json.loads(answer)["error"]["code"] == "unsupported_media_type"
    assert outbox.messages() == []


@gen_test
async def test_json_calls_accept_application_json_with_parameters(api, outbox):
    response = await api.post(
        "/users/code", body=json.dumps({"phone": PHONE}), headers={"Content-Type": "Application/JSON; charset=utf-8"}
    )
    assert response.code == 200, response.body
    assert await outbox.code(sent_phone(PHONE))


# -- malformed input is a 4xx, never a 500 ------------------------------------------------------------


@gen_test
async def test_deeply_nested_json_is_400_invalid_json_and_logs_no_error(api, caplog):
    for body in (b"[" * 50_000, b'{"a":' * 12_000):
        response = await api.post("/users/login", body=body, headers={"Content-Type": "application/json"})
        assert response.code == 400 and response.error == "invalid_json", body[:10]
    assert errors_logged(caplog) == []


@gen_test
async def test_multipart_boundary_over_256_characters_is_422_and_logs_no_error(api, user, caplog):
    boundary = "b" * 300
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        f"Content-Type: image/png\r\n\r\nxx\r\n--{boundary}--\r\n"
    )
    response = await api.post(
        "/images", body=body, token=user.token, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.code == 422 and response.error == "invalid_field"
    assert response.json["error"]["field"] == "image"
    assert errors_logged(caplog) == []


@pytest.mark.settings(max_upload_bytes=100_000)
@gen_test
async def test_an_oversized_chunked_upload_is_json_413(api, user):
    """One chunk declared far over the limit: the upload's own 413, not Tornado's bare 400."""
    head = (
        f"POST /images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {user.token}\r\n"
        f"Content-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n{1024 * 1024:x}\r\n"
    ).encode()
    status, headers, body = await raw_exchange(port_of(api), head, b"\0" * 65536, pump_times=16)
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large"
    assert headers["x-content-type-options"] == "nosniff" and headers["x-request-id"]


@gen_test
async def test_oversized_request_headers_get_431_in_json(api):
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    status, headers, body = await raw_exchange(port_of(api), request)
    assert status == 431 and json.loads(body)["error"]["code"] == "headers_too_large"
    assert headers["content-type"].startswith("application/json")
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-request-id"] and "server" not in headers
    assert (await api.get("/healthz")).code == 200  # the server carries on


# -- forwarded headers count from trusted proxies only -------------------------------------------------

CLAIMS = {"X-Scheme": "https", "X-Forwarded-Proto": "https"}


async def send_codes_claiming_addresses(api, count: int) -> list[int]:
    return [
        (
            await api.post(
                "/users/code",
                {"phone": f"1886666{n:04d}"},
                headers={"X-Real-IP": f"198.51.100.{n}", "X-Forwarded-For": f"203.0.113.{n}"},
            )
        ).code
        for n in range(count)
    ]


async def h5_cookie_claiming_https(api, outbox) -> tuple[str, str]:
    """Register claiming HTTPS; the session's h5_url, and the H5 cookie that URL sets."""
    await api.post("/users/code", {"phone": PHONE}, headers=CLAIMS)
    session = await api.post(
        "/users/regist",
        {"phone": PHONE, "password": PASSWORD, "code": await outbox.code(sent_phone(PHONE))},
        headers=CLAIMS,
    )
    h5_url = session.json["h5_url"]
    opened = await api.get(urlsplit(h5_url).path + "?" + urlsplit(h5_url).query, headers=CLAIMS)
    cookie = next(c for c in opened.headers.get_list("Set-Cookie") if c.startswith("demo_h5="))
    return h5_url, cookie


@pytest.mark.settings(trusted_proxies="10.9.9.9", sms_ip_hourly=3)
@gen_test
async def test_forwarded_headers_from_an_untrusted_peer_change_nothing(api, outbox):
    """Here only 10.9.9.9 is a proxy: this loopback peer's claims are ignored."""
    h5_url, cookie = await h5_cookie_claiming_https(api, outbox)
    assert h5_url.startswith("http://") and "secure" not in cookie.lower()
    # One code went to the registration: two more from this peer, whatever address each claims.
    assert await send_codes_claiming_addresses(api, 3) == [200, 200, 429]


@pytest.mark.settings(sms_ip_hourly=3)
@gen_test
async def test_forwarded_headers_from_a_trusted_proxy_are_believed(api, outbox):
    """By default loopback is the proxy (nginx on this machine): its headers say who the client is."""
    h5_url, cookie = await h5_cookie_claiming_https(api, outbox)
    assert h5_url.startswith("https://") and "secure" in cookie.lower()
    assert await send_codes_claiming_addresses(api, 3) == [200, 200, 200]


# -- answers tell nothing about the server ------------------------------------------------------------


@gen_test
async def test_no_answer_names_the_server(api, app, user, monkeypatch):
    async def explode(principal):
        raise RuntimeError("boom")

    monkeypatch.setattr(app.services.accounts, "profile", explode)
    answers = {
        200: await api.get("/healthz"),
        404: await api.get("/nowhere"),
        405: await api.request("PUT", "/users/login", body=b"{}"),
        413: await api.post("/users/login", {"phone": "x" * 70_000}),
        415: await api.post("/users/login", body=b"{}", headers={"Content-Type": "text/plain"}),
        500: await api.get("/users/me", token=user.token),
        "static 200": await api.get("/static/h5/h5.css"),
        "static 404": await api.get("/static/h5/nope.css"),
    }
    for what, answer in answers.items():
        assert answer.code == (what if isinstance(what, int) else int(what.split()[1])), what
        assert "Server" not in answer.headers, (what, answer.headers["Server"])


@gen_test
async def test_request_ids_are_random_per_request(api):
    ids = [(await api.get("/healthz")).headers["X-Request-Id"] for _ in range(50)]
    assert len(set(ids)) == 50
    assert len({rid[:24] for rid in ids}) == 50  # no per-process prefix with a counter at the end
    kept = await api.get("/healthz", headers={"X-Request-Id": "from-the-proxy-1234"})
    assert kept.headers["X-Request-Id"] == "from-the-proxy-1234"


@gen_test
async def test_a_flood_of_readiness_probes_costs_one_database_ping(api, app, monkeypatch):
    db = app.services.db
    real_ping, pings = db.ping, []

    async def counting_ping() -> None:
        pings.append(1)
        await real_ping()

    monkeypatch.setattr(db, "ping", counting_ping)
    answers = await asyncio.gather(*(api.get("/readyz") for _ in range(50)))
    assert all(a.code == 200 and a.json["checks"] == {"database": "ok", "storage": "ok"} for a in answers)
    assert len(pings) == 1
    await asyncio.sleep(app.services.readiness.ttl + 0.05)
    assert (await api.get("/readyz")).code == 200 and len(pings) == 2  # a second later: asked again


# -- static files: the contract's headers and error shape ------------------------------------------


@gen_test
async def test_static_files_carry_the_contract_headers_and_json_errors(api):
    css = await api.get("/static/h5/h5.css")
    assert css.code == 200 and css.headers["Content-Type"].startswith("text/css")
    assert css.headers["X-Content-Type-Options"] == "nosniff" and css.headers["X-Request-Id"]
    assert "no-store" not in css.headers.get("Cache-Control", "")
    errors = {
        404: await api.get("/static/h5/nope.css"),
        405: await api.post("/static/h5/h5.css", body=b""),
        403: await api.get("/static/%2e%2e/conf/settings.py"),
    }
    for status, answer in errors.items():
        assert answer.code in ((403, 404) if status == 403 else (status,)), (status, answer.body)
        assert answer.headers["Content-Type"].startswith("application/json") and "error" in answer.json
        assert answer.headers["X-Content-Type-Options"] == "nosniff" and answer.headers["X-Request-Id"]
        assert answer.headers["Cache-Control"] == "no-store"
    assert errors[405].headers["Allow"] == "GET, HEAD"
    outside = errors[403].json["error"]["message"]
    assert "%s" not in outside and "/" not in outside  # neither a log template nor a path
