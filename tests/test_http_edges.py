"""The HTTP edges, straight to the app's own server (demo.main.make_server, no nginx): content types,
forwarded headers, malformed and oversized input, and what the answers tell about the server."""
from __future__ import annotations

import asyncio
import json
import logging
import socket
from urllib.parse import urlsplit

import pytest

from conftest import sent_phone

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


async def raw_exchange(port: int, request: bytes, body_pump: bytes = b"", pump_times: int = 0) -> tuple[int, dict, bytes]:
    """Send ``request`` (then ``body_pump`` up to ``pump_times`` times) over a bare socket, on a thread;
    the answer's status, headers (lower-case names) and body. A server that answers early and closes
    resets the connection: what arrived before the reset is the answer."""
    raw = await asyncio.get_running_loop().run_in_executor(None, _exchange, port, request, body_pump, pump_times)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
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
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "text/plain; charset=utf-8"])
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
    status, _, answer = await raw_exchange(port_of(api), (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
    assert status == 415 and json.loads(answer)["error"]["code"] == "unsupported_media_type"
    assert outbox.messages() == []


@gen_test
async def test_json_calls_accept_application_json_with_parameters(api, outbox):
    response = await api.post("/users/code", body=json.dumps({"phone": PHONE}),
                              headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert response.code == 200, response.body
    assert outbox.code(sent_phone(PHONE))


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
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\nxx\r\n--{boundary}--\r\n")
    response = await api.post("/images", body=body, token=user.token,
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.code == 422 and response.error == "invalid_field" and response.json["error"]["field"] == "image"
    assert errors_logged(caplog) == []


@pytest.mark.settings(max_upload_bytes=100_000)
@gen_test
async def test_an_oversized_chunked_upload_is_json_413(api, user):
    """One chunk declared far over the limit: the upload's own 413, not Tornado's bare 400."""
    head = (f"POST /images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {user.token}\r\n"
            f"Content-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n{1024 * 1024:x}\r\n").encode()
    status, headers, body = await raw_exchange(port_of(api), head, b"\0" * 65536, pump_times=16)
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large"
    assert headers["x-content-type-options"] == "nosniff" and headers["x-request-id"]
