"""The SMS providers with request signing (``tencent``, ``aliyun``), on Tornado's AsyncHTTPClient.

Why not the official SDKs: tencentcloud-sdk-python sends with ``requests`` (blocking: each send would
hold an offload thread for up to the time-out), and Alibaba Cloud's dysmsapi SDK pulls in the Tea stack
(tea-openapi, tea-util, credentials, endpoint-util, with both requests and aiohttp as HTTP clients). A
send is one signed POST; the signing is ~60 lines of hmac/hashlib (``signing.py``), checked against
both providers' published worked examples.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from demo.common.sms.backends import SmsBackend, SmsFailed

if TYPE_CHECKING:
    from demo.conf.settings import Settings

# The largest answer read from a provider. Their answers are a few hundred bytes; the shared client
# would take 100 MB and json.loads would then hold the event loop (an 80 MB answer: 0.43 s).
MAX_ANSWER = 64 * 1024


def make_provider(kind: str, settings: Settings, environ: Mapping[str, str]) -> SmsBackend:
    """The ``kind`` provider of ``settings``; ValueError naming what is missing or wrong."""
    from demo.common.sms.providers import aliyun, tencent

    if kind == "tencent":
        return tencent.TencentBackend.from_settings(settings, environ)
    if kind == "aliyun":
        return aliyun.AliyunBackend.from_settings(settings, environ)
    raise ValueError(f"unknown SMS provider {kind!r}")


def credential(environ: Mapping[str, str], name: str, provider: str) -> str:
    value = environ.get(name, "").strip()
    if not value:
        raise ValueError(f"sms_backend={provider} needs the environment variable {name}")
    return value


def check_endpoint(setting: str, url: str, *, debug: bool) -> str:
    """``url`` as given, or ValueError: an http(s) base URL, without user:password (a secret in a
    setting, and in every log line naming the endpoint), query or fragment; plain http only to a
    loopback address (a stand-in on this machine) unless --debug, since the request carries the phone
    number and code."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"{setting}: {url!r} is not a base URL like https://sms.example.com")
    if "@" in parts.netloc or "?" in url or "#" in url:
        raise ValueError(
            f"{setting}: a base URL has no user:password@, ?query or #fragment (like https://sms.example.com)"
        )
    if parts.scheme == "http" and not debug and not _loopback(parts.hostname):
        raise ValueError(f"{setting}: {url!r} is plain http to another machine; use https")
    return url.rstrip("/")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_of(url: str) -> str:
    """The Host header the client sends for ``url`` (and so the one to sign): its netloc."""
    return urlsplit(url).netloc


class ProviderClient:
    """The providers' own HTTP client: answers capped at ``MAX_ANSWER``, closed at shutdown
    (``close``). Made on first use, on the running loop (an AsyncHTTPClient belongs to one loop)."""

    def __init__(self, max_body_size: int = MAX_ANSWER) -> None:
        self.max_body_size = max_body_size
        self._client: AsyncHTTPClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> AsyncHTTPClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = AsyncHTTPClient(force_instance=True, max_body_size=self.max_body_size)
            self._loop = loop
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = self._loop = None


async def post(
    client: ProviderClient, url: str, headers: dict[str, str], body: bytes, timeout: float
) -> tuple[int, dict[str, Any]]:
    """POST and the (status, JSON object) of the answer, whatever the status (providers explain a
    refusal in the JSON); SmsFailed for a time-out, a network failure, an answer over
    ``client.max_body_size`` or one that is not JSON."""
    started = time.monotonic()
    try:
        response = await client.get().fetch(
            url,
            method="POST",
            headers=headers,
            body=body,
            connect_timeout=timeout,
            request_timeout=timeout,
            raise_error=False,  # a 4xx still carries the provider's error code
        )
    except HTTPClientError as error:  # 599: a time-out, the connection dropped, or we closed it (too long)
        # Told apart by the time spent, not by the error's class: that lives in tornado.simple_httpclient,
        # an implementation the rules need not know.
        if time.monotonic() - started >= timeout - 0.01:  # the loop may fire a timer a hair early
            raise SmsFailed(f"no answer within {timeout:g}s ({error})", timeout=True) from error
        raise SmsFailed(
            f"no whole answer from {host_of(url)}: the connection closed, or the answer is over "
            f"{client.max_body_size // 1024} KiB ({error})"
        ) from error
    except OSError as error:  # refused, DNS, TLS
        raise SmsFailed(f"cannot reach {host_of(url)}: {error}") from error
    try:
        answer = json.loads(response.body or b"")
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise SmsFailed(f"HTTP {response.code}, not a JSON answer")
    return response.code, answer
