"""SMS delivery backends, chosen by ``sms_backend``: ``console`` or ``file:<path>`` alone, or an ordered
list of providers (``tencent``, ``aliyun``, ``http``: e.g. ``tencent,aliyun``) tried in turn.

A backend has one coroutine, ``send(message)``: it returns the provider's id for the text (or None)
once the provider took it, and raises ``SmsFailed`` when it did not. ``Failover`` runs the list: an
error or a time-out of one backend moves the text to the next within the same try of the outbox. A
time-out is not a refusal: the provider may have sent the text all the same, so failing over on it can
deliver one text twice. That is the chosen side (delivery is at least once): a code never sent locks
the user out, a duplicate text does not.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from string import Template
from typing import TYPE_CHECKING, Protocol

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from demo.common.infra.offload import Offloader

if TYPE_CHECKING:
    from demo.common.infra.metrics import Metrics
    from demo.conf.settings import Settings

log = logging.getLogger("demo.sms")
PROVIDERS = ("tencent", "aliyun", "http")


@dataclass(frozen=True)
class SmsMessage:
    phone: str
    purpose: str
    code: str | None  # None when the text carries no code (e.g. "already registered")
    text: str
    sent_at: str
    lang: str | None = None  # BCP 47 tag of the text's language (the outbox fills in the default)


class SmsFailed(Exception):
    """The text could not be handed to the provider. ``timeout``: it did not answer in time;
    ``rejected``: it refused this number for good (invalid, blacklisted); ``limited``: the number hit
    the provider's own per-number limit (so many texts a minute, an hour, a day). Either of the last two
    is ``final``: no other provider nor a later try may send this text."""

    def __init__(self, message: str, *, timeout: bool = False, rejected: bool = False, limited: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.rejected = rejected
        self.limited = limited

    @property
    def final(self) -> bool:
        return self.rejected or self.limited

    @property
    def result(self) -> str:
        """The ``result`` label of the provider metrics."""
        if self.rejected or self.limited:
            return "rejected" if self.rejected else "limited"
        return "timeout" if self.timeout else "error"


@dataclass(frozen=True)
class Delivery:
    """Who took a text: the backend's name, its id for the text if it gave one, and what the backends
    before it in the list said."""

    provider: str
    message_id: str | None = None
    error: str | None = None


class SmsBackend(Protocol):
    async def send(self, message: SmsMessage) -> str | None: ...


def text_language(row_lang: str | None, settings: Settings) -> str:
    """The language of a text: its outbox row's, else (a row of a release before languages) the
    deployment's ``default_language``."""
    return row_lang or settings.default_language


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
            raise SmsFailed(f"gateway: {error}", timeout=getattr(error, "code", 0) == 599) from error


class Failover:
    """The backends of ``sms_backend`` in order: the first that takes a text ends the try.

    Each backend's outcome is counted per provider (``ok``, ``error``, ``timeout``, ``rejected``,
    ``limited``) with its latency. A refusal of the number itself (``SmsFailed.rejected``) ends the try
    at once: another provider would refuse it too, or text a number that asked for nothing. So does a
    provider's per-number limit (``SmsFailed.limited``): the next provider would text the number anyway,
    and so would every retry, which is exactly what the limit is there to stop."""

    def __init__(self, backends: Sequence[tuple[str, SmsBackend]], metrics: Metrics | None = None) -> None:
        if not backends:
            raise ValueError("sms_backend: no backend")
        self.backends = list(backends)
        self.metrics = metrics

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.backends]

    async def send(self, message: SmsMessage) -> Delivery:
        """The delivery, or SmsFailed naming every backend's failure (``rejected``/``limited`` if one
        refused the number or hit its limit for it, ``timeout`` if every one timed out)."""
        failures: list[str] = []
        timeouts = 0
        for name, backend in self.backends:
            started = time.monotonic()
            try:
                message_id = await backend.send(message)
            except SmsFailed as error:
                result = error.result
                self._count(name, result, started)
                failures.append(f"{name}: {error}")
                timeouts += error.timeout
                if error.final:
                    why = "refused the number" if error.rejected else "is over its limit for the number"
                    log.warning("SMS provider %s %s (%s); no other provider is tried", name, why, error)
                    raise SmsFailed("; ".join(failures), rejected=error.rejected, limited=error.limited) from error
                if len(self.backends) > 1:
                    log.warning("SMS provider %s failed (%s); trying the next one", name, error)
                continue
            except Exception as error:
                # A bug: last_error keeps one line, so the traceback goes to the log, once, here.
                log.exception("SMS provider %s crashed", name)
                self._count(name, "error", started)
                failures.append(f"{name}: {error.__class__.__name__}: {error}")
                continue
            self._count(name, "ok", started)
            return Delivery(name, message_id, "; ".join(failures)[:255] or None)
        raise SmsFailed("; ".join(failures), timeout=timeouts == len(self.backends))

    def close(self) -> None:
        """Release the backends' own HTTP clients (at shutdown, once no send is in flight)."""
        for _, backend in self.backends:
            close = getattr(backend, "close", None)
            if close is not None:
                close()

    def _count(self, name: str, result: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.sms_provider_sends.labels(name, result).inc()
            self.metrics.sms_provider_seconds.labels(name).observe(time.monotonic() - started)


def parse_backends(spec: str) -> list[tuple[str, str]]:
    """``sms_backend`` -> [(kind, outbox path)]: [("console", "")], [("file", path)], or providers in
    order ([("tencent", ""), ("aliyun", "")]). ValueError for an unknown, repeated or mixed entry."""
    if spec == "console":
        return [("console", "")]
    if spec.startswith("file:"):
        if len(spec) > 5:
            return [("file", spec[5:])]
        raise ValueError(f"unknown sms_backend {spec!r} (file:<path>)")
    kinds = [part.strip() for part in spec.split(",")]
    for kind in kinds:
        if kind == "console" or kind.startswith("file:"):
            raise ValueError(f"sms_backend {spec!r}: console and file:<path> stand alone, not in a list")
        if kind not in PROVIDERS:
            raise ValueError(
                f"unknown sms_backend {kind!r} in {spec!r} (console, file:<path>, or a list of tencent, aliyun, http)"
            )
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"sms_backend {spec!r} names a backend twice")
    return [(kind, "") for kind in kinds]


def parse_backend(spec: str) -> tuple[str, str]:
    """The first backend of ``sms_backend`` (kind, outbox path); see ``parse_backends``."""
    return parse_backends(spec)[0]


def make_backend(
    settings: Settings,
    offloader: Offloader,
    metrics: Metrics | None = None,
    environ: dict[str, str] | None = None,
) -> Failover:
    """The backends of ``settings.sms_backend`` in order; ValueError naming the setting (or the
    environment variable) that cannot work. Provider credentials come from ``environ`` (os.environ)."""
    from demo.common.sms.providers import make_provider  # the providers import this module

    backends: list[tuple[str, SmsBackend]] = []
    for kind, path in parse_backends(settings.sms_backend):
        backend: SmsBackend
        if kind == "console":
            backend = ConsoleBackend()
        elif kind == "file":
            backend = FileBackend(path, offloader)
        elif kind == "http":
            backend = HttpGatewayBackend(
                settings.sms_gateway_url,
                settings.sms_gateway_body,
                settings.sms_gateway_headers,
                settings.sms_gateway_timeout,
            )
        else:
            backend = make_provider(kind, settings, dict(os.environ) if environ is None else environ)
        backends.append((kind, backend))
    return Failover(backends, metrics)


def parse_test_numbers(spec: str) -> dict[str, str]:
    """``"+8618800000000:123456,..."`` -> {phone: code}. Phones must already be E.164."""
    numbers: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        phone, _, code = item.partition(":")
        if not (phone.startswith("+") and code.isdigit() and len(code) == 6):
            raise ValueError(f"bad sms_test_numbers entry {item!r} (want +E164:123456)")
        numbers[phone] = code
    return numbers
