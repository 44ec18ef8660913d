"""SMS backends (sms/backends.py): the console, the outbox file, a provider's HTTP gateway (a local
Tornado server here), the failover list, and the parsers of their settings. The signing providers
have their own tests in providers/."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict

import pytest
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port
from tornado.web import Application, RequestHandler

from demo.common.infra.metrics import Metrics
from demo.common.infra.offload import Offloader
from demo.common.sms.backends import (
    ConsoleBackend,
    Delivery,
    Failover,
    FileBackend,
    HttpGatewayBackend,
    SmsFailed,
    SmsMessage,
    make_backend,
    parse_backend,
    parse_backends,
    parse_test_numbers,
    text_language,
)
from demo.conf import settings as config

MESSAGE = SmsMessage("+8618866668888", "register", "123456", '验证码 123456 "quoted"', "2026-01-01T00:00:00Z")
TEMPLATE = '{"to": $phone, "content": $text, "code": $code, "sign": "$sign"}'


@pytest.fixture
def offloader():
    pools = Offloader(1, 1, 1)
    yield pools
    pools.shutdown()


# -- the gateway -----------------------------------------------------------------------------------


class Gateway:
    """What the fake provider received, and how it answers."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.status = 200
        self.delay = 0.0


@asynccontextmanager
async def gateway() -> AsyncIterator[tuple[Gateway, str]]:
    state = Gateway()

    class Send(RequestHandler):
        async def post(self) -> None:
            state.received.append((self.request.method, dict(self.request.headers), self.request.body))
            if state.delay:
                await asyncio.sleep(state.delay)
            self.set_status(state.status)
            self.finish({"ok": state.status == 200})

    sock, port = bind_unused_port()
    server = HTTPServer(Application([("/send", Send)]))
    server.add_sockets([sock])
    try:
        yield state, f"http://127.0.0.1:{port}/send"
    finally:
        server.stop()
        await server.close_all_connections()


@pytest.mark.gen_test
async def test_the_gateway_gets_the_body_template_filled_with_json_values_and_the_headers():
    async with gateway() as (state, url):
        backend = HttpGatewayBackend(url, TEMPLATE, "Authorization: Bearer k:ey ; X-Tenant:demo;junk", 5)
        await backend.send(MESSAGE)
        await backend.send(SmsMessage("+8613900000000", "notice", None, "hi", "2026-01-01T00:00:00Z"))
    (method, headers, body), (_, _, second) = state.received
    assert method == "POST"
    assert headers["Authorization"] == "Bearer k:ey" and headers["X-Tenant"] == "demo" and "Junk" not in headers
    assert json.loads(body.decode("utf-8")) == {
        "to": MESSAGE.phone,
        "content": MESSAGE.text,
        "code": "123456",
        "sign": "$sign",  # an unknown placeholder is left as written
    }
    assert json.loads(second)["code"] is None  # a text without a code


@pytest.mark.parametrize("status", [400, 500, 503])
@pytest.mark.gen_test
async def test_a_gateway_refusal_is_sms_failed(status):
    async with gateway() as (state, url):
        state.status = status
        with pytest.raises(SmsFailed, match=f"gateway: HTTP {status}"):
            await HttpGatewayBackend(url, TEMPLATE, "", 5).send(MESSAGE)


@pytest.mark.gen_test
async def test_a_gateway_that_does_not_answer_in_time_is_sms_failed():
    async with gateway() as (state, url):
        state.delay = 2.0
        with pytest.raises(SmsFailed, match="gateway: .*[Tt]imeout"):
            await HttpGatewayBackend(url, TEMPLATE, "", 0.2).send(MESSAGE)


@pytest.mark.gen_test
async def test_an_unreachable_gateway_is_sms_failed():
    sock, port = bind_unused_port()
    sock.close()  # nothing listens there now
    with pytest.raises(SmsFailed, match="gateway"):
        await HttpGatewayBackend(f"http://127.0.0.1:{port}/send", TEMPLATE, "", 2).send(MESSAGE)


def test_the_gateway_needs_a_url():
    with pytest.raises(ValueError, match="sms_gateway_url"):
        HttpGatewayBackend("", TEMPLATE, "", 5)


# -- the file and the console ----------------------------------------------------------------------


@pytest.mark.gen_test
async def test_the_file_backend_appends_one_json_object_per_text(tmp_path, offloader):
    path = tmp_path / "outbox.jsonl"
    backend = FileBackend(str(path), offloader)
    other = SmsMessage("+8613900000000", "reset", "654321", "second", "2026-01-01T00:00:01Z")
    await backend.send(MESSAGE)
    await backend.send(other)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [asdict(MESSAGE), asdict(other)]
    assert "验证码" in lines[0]  # written as UTF-8, not \\u escapes


@pytest.mark.gen_test
async def test_concurrent_texts_all_land_one_per_line(tmp_path):
    pools = Offloader(1, cpu_threads=8)
    backend = FileBackend(str(tmp_path / "outbox.jsonl"), pools)
    texts = [SmsMessage(f"+86188000{n:05d}", "register", f"{n:06d}", "x" * 5000, "t") for n in range(40)]
    try:
        await asyncio.gather(*(backend.send(text) for text in texts))
    finally:
        pools.shutdown()
    written = [json.loads(line) for line in (tmp_path / "outbox.jsonl").read_text().splitlines()]
    assert sorted(m["phone"] for m in written) == sorted(t.phone for t in texts)


@pytest.mark.gen_test
async def test_the_console_backend_logs_the_text(caplog):
    caplog.set_level(logging.INFO, logger="demo.sms")
    await ConsoleBackend().send(MESSAGE)
    assert [r.getMessage() for r in caplog.records] == [f"SMS to {MESSAGE.phone}: {MESSAGE.text}"]


# -- the settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("console", [("console", "")]),
        ("http", [("http", "")]),
        ("file:/tmp/out.jsonl", [("file", "/tmp/out.jsonl")]),
        ("file:relative:with:colons", [("file", "relative:with:colons")]),
        ("tencent,aliyun", [("tencent", ""), ("aliyun", "")]),
        (" aliyun , http", [("aliyun", ""), ("http", "")]),
    ],
)
def test_parse_backends(spec, parsed):
    assert parse_backends(spec) == parsed
    assert parse_backend(spec) == parsed[0]


@pytest.mark.parametrize("spec", ["", "file:", "file", "smtp", "Console", "http:", "tencent,", "tencent,sms"])
def test_an_unknown_backend_is_refused_by_name(spec):
    with pytest.raises(ValueError, match="unknown sms_backend"):
        parse_backends(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tencent,console", "console and file:<path> stand alone"),
        ("aliyun,file:/tmp/o", "console and file:<path> stand alone"),  # (file:<path> first is one path)
        ("tencent,aliyun,tencent", "names a backend twice"),
    ],
)
def test_a_list_mixing_the_standalone_backends_or_naming_one_twice_is_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_backends(spec)


def test_make_backend_builds_the_kinds_asked_in_order(tmp_path, offloader, sms_providers):
    [(name, console)] = make_backend(config.defaults(sms_backend="console"), offloader).backends
    assert name == "console" and isinstance(console, ConsoleBackend)
    [(_, file_backend)] = make_backend(config.defaults(sms_backend=f"file:{tmp_path / 'o.jsonl'}"), offloader).backends
    assert isinstance(file_backend, FileBackend) and file_backend.path == str(tmp_path / "o.jsonl")
    gateway = {"sms_gateway_url": "http://gw/send", "sms_gateway_headers": "K: v", "sms_gateway_timeout": 3.0}
    chain = make_backend(config.defaults(**sms_providers.settings("aliyun,http,tencent", **gateway)), offloader)
    assert chain.names == ["aliyun", "http", "tencent"]
    _, http = chain.backends[1]
    assert isinstance(http, HttpGatewayBackend)
    assert (http.url, http.headers, http.timeout) == ("http://gw/send", {"K": "v"}, 3)
    with pytest.raises(ValueError, match="sms_gateway_url"):
        make_backend(config.defaults(sms_backend="http"), offloader)


def test_text_language_is_the_rows_else_the_default():
    settings = config.defaults()
    assert text_language("zh-CN", settings) == "zh-CN"
    assert text_language(None, settings) == getattr(settings, "default_language", "en")


# -- failover --------------------------------------------------------------------------------------


class Scripted:
    """A backend that answers as told: a message id, or raises."""

    def __init__(self, answer: object) -> None:
        self.answer = answer
        self.sent: list[SmsMessage] = []

    async def send(self, message: SmsMessage) -> str | None:
        self.sent.append(message)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer  # type: ignore[return-value]


def count(metrics: Metrics, provider: str, result: str) -> float:
    value = metrics.registry.get_sample_value("demo_sms_provider_sends_total", {"provider": provider, "result": result})
    return value or 0.0


@pytest.mark.gen_test
async def test_failover_hands_the_text_to_the_next_backend_and_counts_each():
    metrics = Metrics()
    down, up, spare = Scripted(SmsFailed("InternalError")), Scripted("id-7"), Scripted("id-8")
    delivery = await Failover([("tencent", down), ("aliyun", up), ("http", spare)], metrics).send(MESSAGE)
    assert delivery == Delivery("aliyun", "id-7", "tencent: InternalError")
    assert (down.sent, up.sent, spare.sent) == ([MESSAGE], [MESSAGE], [])
    assert (count(metrics, "tencent", "error"), count(metrics, "aliyun", "ok"), count(metrics, "http", "ok")) == (
        1,
        1,
        0,
    )
    assert metrics.registry.get_sample_value("demo_sms_provider_duration_seconds_count", {"provider": "aliyun"}) == 1


@pytest.mark.gen_test
async def test_failover_fails_when_every_backend_failed_naming_each():
    metrics = Metrics()
    chain = Failover(
        [("tencent", Scripted(SmsFailed("no answer", timeout=True))), ("aliyun", Scripted(RuntimeError("bug")))],
        metrics,
    )
    with pytest.raises(SmsFailed, match=r"^tencent: no answer; aliyun: RuntimeError: bug$") as failed:
        await chain.send(MESSAGE)
    assert not (failed.value.timeout or failed.value.rejected)  # not all of them timed out
    assert (count(metrics, "tencent", "timeout"), count(metrics, "aliyun", "error")) == (1, 1)
    with pytest.raises(SmsFailed) as silent:
        await Failover([("tencent", Scripted(SmsFailed("x", timeout=True)))]).send(MESSAGE)
    assert silent.value.timeout


@pytest.mark.gen_test
async def test_a_number_refused_by_one_provider_is_not_offered_to_the_next():
    metrics = Metrics()
    spare = Scripted("id")
    chain = Failover([("tencent", Scripted(SmsFailed("bad number", rejected=True))), ("aliyun", spare)], metrics)
    with pytest.raises(SmsFailed, match="tencent: bad number") as refused:
        await chain.send(MESSAGE)
    assert refused.value.rejected and spare.sent == []
    assert count(metrics, "tencent", "rejected") == 1


@pytest.mark.gen_test
async def test_a_number_over_a_providers_limit_is_not_offered_to_the_next(caplog):
    metrics = Metrics()
    spare = Scripted("id")
    limit = SmsFailed("LimitExceeded.PhoneNumberDailyLimit: over", limited=True)
    chain = Failover([("tencent", Scripted(limit)), ("aliyun", spare)], metrics)
    with caplog.at_level(logging.WARNING, logger="demo.sms"), pytest.raises(SmsFailed) as limited:
        await chain.send(MESSAGE)
    assert limited.value.limited and limited.value.final and not limited.value.rejected
    assert str(limited.value) == "tencent: LimitExceeded.PhoneNumberDailyLimit: over"
    assert spare.sent == []  # the next provider would text the number past the limit
    assert (count(metrics, "tencent", "limited"), count(metrics, "tencent", "error")) == (1, 0)
    assert any("is over its limit for the number" in r.getMessage() for r in caplog.records)


@pytest.mark.gen_test
async def test_a_crash_in_a_provider_is_logged_once_with_its_traceback(caplog):
    class Odd:
        async def send(self, message: SmsMessage) -> str:
            return {}[0]  # a KeyError: 0, as an answer of an unexpected shape would raise

    spare = Scripted("id-9")
    with caplog.at_level(logging.WARNING, logger="demo.sms"):
        delivery = await Failover([("tencent", Odd()), ("aliyun", spare)]).send(MESSAGE)
    assert delivery == Delivery("aliyun", "id-9", "tencent: KeyError: 0")
    [crash] = [r for r in caplog.records if r.exc_info]
    assert crash.getMessage() == "SMS provider tencent crashed" and crash.exc_info[0] is KeyError
    assert "return {}[0]" in caplog.text  # the traceback names the line


@pytest.mark.gen_test
async def test_close_closes_each_backend_that_has_a_client():
    class Closable(Scripted):
        closed = 0

        def close(self) -> None:
            self.closed += 1

    first, plain = Closable("id"), Scripted("id")
    Failover([("tencent", first), ("http", plain)]).close()
    assert first.closed == 1


def test_parse_test_numbers():
    assert parse_test_numbers("") == {}
    assert parse_test_numbers(" +8618800000000:123456 , +15550000000:000001,") == {
        "+8618800000000": "123456",
        "+15550000000": "000001",
    }


@pytest.mark.parametrize(
    "spec", ["8618800000000:123456", "+8618800000000:12345", "+8618800000000:1234567", "+8618800000000:12a456", "+86"]
)
def test_a_bad_test_number_is_named(spec):
    with pytest.raises(ValueError, match="bad sms_test_numbers entry"):
        parse_test_numbers(f"+15550000000:000001,{spec}")
