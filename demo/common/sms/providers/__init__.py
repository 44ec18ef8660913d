"""The SMS providers with request signing (``tencent``, ``aliyun``), on Tornado's AsyncHTTPClient.

Why not the official SDKs: tencentcloud-sdk-python sends with ``requests`` (blocking: each send would
hold an offload thread for up to the time-out), and Alibaba Cloud's dysmsapi SDK pulls in the Tea stack
(tea-openapi, tea-util, credentials, endpoint-util, with both requests and aiohttp as HTTP clients). A
send is one signed POST; the signing is ~60 lines of hmac/hashlib (``signing.py``), checked against
both providers' published worked examples.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from demo.common.sms.backends import SmsBackend, SmsFailed

if TYPE_CHECKING:
    from demo.conf.settings import Settings


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
    """``url`` as given, or ValueError: an http(s) base URL; plain http only to a loopback address
    (a stand-in on this machine) unless --debug, since the request carries the phone number and code."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"{setting}: {url!r} is not a base URL like https://sms.example.com")
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


async def post(
    provider: str, url: str, headers: dict[str, str], body: bytes, timeout: float
) -> tuple[int, dict[str, Any]]:
    """POST and the (status, JSON object) of the answer, whatever the status (providers explain a
    refusal in the JSON); SmsFailed for a time-out, a network failure or an answer that is not JSON."""
    try:
        response = await AsyncHTTPClient().fetch(
            url,
            method="POST",
            headers=headers,
            body=body,
            connect_timeout=timeout,
            request_timeout=timeout,
            raise_error=False,  # a 4xx still carries the provider's error code
        )
    except HTTPClientError as error:  # 599: time-out, or the connection dropped mid-answer
        raise SmsFailed(f"no answer within {timeout:g}s ({error})", timeout=True) from error
    except OSError as error:  # refused, DNS, TLS
        raise SmsFailed(f"cannot reach {host_of(url)}: {error}") from error
    try:
        answer = json.loads(response.body or b"")
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise SmsFailed(f"HTTP {response.code}, not a JSON answer")
    return response.code, answer
