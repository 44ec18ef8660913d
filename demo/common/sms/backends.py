"""SMS delivery backends, chosen by ``sms_backend``: ``console``, ``file:<path>``, ``http``.

A backend has one coroutine, ``send(message)``; it raises ``SmsFailed`` when the text did not go out.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from string import Template
from typing import Protocol

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from demo.common.infra.offload import Offloader

log = logging.getLogger("demo.sms")


@dataclass(frozen=True)
class SmsMessage:
    phone: str
    purpose: str
    code: str | None  # None when the text carries no code (e.g. "already registered")
    text: str
    sent_at: str


class SmsFailed(Exception):
    """The text could not be handed to the provider."""


class SmsBackend(Protocol):
    async def send(self, message: SmsMessage) -> None: ...


class ConsoleBackend:
    """Development: the text goes to the log (logger ``demo.sms``)."""

    async def send(self, message: SmsMessage) -> None:
        log.info("SMS to %s: %s", message.phone, message.text)


class FileBackend:
    """Appends one JSON object per line; tests read it as the outbox."""

    def __init__(self, path: str, offloader: Offloader) -> None:
        self.path = path
        self.offloader = offloader
        self._lock = threading.Lock()

    async def send(self, message: SmsMessage) -> None:
        await self.offloader.cpu(self._append, json.dumps(asdict(message), ensure_ascii=False) + "\n")

    def _append(self, line: str) -> None:
        with self._lock, open(self.path, "a", encoding="utf-8") as outbox:
            outbox.write(line)
            outbox.flush()
            os.fsync(outbox.fileno())


class HttpGatewayBackend:
    """A provider's HTTP API: URL, headers and body template from config; any failure is SmsFailed."""

    def __init__(self, url: str, body_template: str, headers: str, timeout: float) -> None:
        if not url:
            raise ValueError("sms_backend=http needs sms_gateway_url")
        self.url = url
        self.body = Template(body_template)
        self.headers = dict(
            (part.split(":", 1)[0].strip(), part.split(":", 1)[1].strip()) for part in headers.split(";") if ":" in part
        )
        self.timeout = timeout

    async def send(self, message: SmsMessage) -> None:
        body = self.body.safe_substitute(
            phone=json.dumps(message.phone),
            text=json.dumps(message.text, ensure_ascii=False),
            code=json.dumps(message.code),
        )
        try:
            await AsyncHTTPClient().fetch(
                self.url,
                method="POST",
                body=body.encode(),
                headers=self.headers,
                connect_timeout=self.timeout,
                request_timeout=self.timeout,
            )
        except (HTTPClientError, OSError) as error:  # non-2xx, timeout, refused, DNS
            raise SmsFailed(f"gateway: {error}") from error


def parse_backend(spec: str) -> tuple[str, str]:
    """``sms_backend`` -> (kind, outbox path): ("console", ""), ("file", path) or ("http", "")."""
    if spec in ("console", "http"):
        return spec, ""
    if spec.startswith("file:") and len(spec) > 5:
        return "file", spec[5:]
    raise ValueError(f"unknown sms_backend {spec!r} (console, file:<path> or http)")


def make_backend(
    spec: str,
    offloader: Offloader,
    *,
    gateway_url: str = "",
    gateway_body: str = "",
    gateway_headers: str = "",
    gateway_timeout: float = 5.0,
) -> SmsBackend:
    kind, path = parse_backend(spec)
    if kind == "console":
        return ConsoleBackend()
    if kind == "file":
        return FileBackend(path, offloader)
    return HttpGatewayBackend(gateway_url, gateway_body, gateway_headers, gateway_timeout)


def parse_test_numbers(spec: str) -> dict[str, str]:
    """``"+8618800000000:123456,..."`` -> {phone: code}. Phones must already be E.164."""
    numbers: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        phone, _, code = item.partition(":")
        if not (phone.startswith("+") and code.isdigit() and len(code) == 6):
            raise ValueError(f"bad sms_test_numbers entry {item!r} (want +E164:123456)")
        numbers[phone] = code
    return numbers
