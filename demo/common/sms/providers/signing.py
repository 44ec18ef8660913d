"""Request signing of the SMS providers, standard library only (hmac, hashlib): Tencent Cloud's
TC3-HMAC-SHA256 and Alibaba Cloud's V3 signature, ACS3-HMAC-SHA256.

Pure functions of their inputs (the time and the nonce are arguments), so the tests reproduce each
provider's published worked example byte for byte (tests/common/sms/providers/test_signing.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import quote

TC3 = "TC3-HMAC-SHA256"
ACS3 = "ACS3-HMAC-SHA256"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).digest()


# -- Tencent Cloud API 3.0 ---------------------------------------------------------------------------


def tc3_canonical_request(headers: Mapping[str, str], payload: bytes) -> tuple[str, str]:
    """(CanonicalRequest, SignedHeaders) of a POST to "/" with ``headers`` (the ones to sign, any case):
    names and values lower-cased and trimmed, sorted by name, as Tencent's "Signature v3" says."""
    canonical = sorted((name.strip().lower(), value.strip().lower()) for name, value in headers.items())
    signed = ";".join(name for name, _ in canonical)
    lines = "".join(f"{name}:{value}\n" for name, value in canonical)
    return f"POST\n/\n\n{lines}\n{signed}\n{sha256_hex(payload)}", signed


def tc3_string_to_sign(canonical_request: str, timestamp: int, service: str) -> tuple[str, str]:
    """(StringToSign, CredentialScope); the scope's date is the timestamp's UTC date, never local."""
    day = dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d")
    scope = f"{day}/{service}/tc3_request"
    return f"{TC3}\n{timestamp}\n{scope}\n{sha256_hex(canonical_request.encode('utf-8'))}", scope


def tc3_signature(secret_key: str, string_to_sign: str, scope: str) -> str:
    day, service, _ = scope.split("/")
    key = _hmac(_hmac(_hmac(f"TC3{secret_key}".encode(), day), service), "tc3_request")
    return hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def tc3_authorization(
    secret_id: str, secret_key: str, service: str, headers: Mapping[str, str], payload: bytes, timestamp: int
) -> str:
    """The ``Authorization`` header of a TC3-HMAC-SHA256 POST signing ``headers`` and ``payload``."""
    canonical, signed = tc3_canonical_request(headers, payload)
    to_sign, scope = tc3_string_to_sign(canonical, timestamp, service)
    signature = tc3_signature(secret_key, to_sign, scope)
    return f"{TC3} Credential={secret_id}/{scope}, SignedHeaders={signed}, Signature={signature}"


# -- Alibaba Cloud, signature V3 ----------------------------------------------------------------------


def acs3_encode(value: str) -> str:
    """RFC 3986 percent-encoding as Alibaba Cloud wants it: only A-Z a-z 0-9 - _ . ~ stay as they are
    (a space is %20, "*" is %2A, "~" stays), UTF-8."""
    return quote(value, safe="-_.~")


def acs3_query(params: Mapping[str, str]) -> str:
    """The CanonicalQueryString (also sent as the query itself): encoded pairs sorted by name."""
    return "&".join(f"{acs3_encode(k)}={acs3_encode(v)}" for k, v in sorted(params.items()))


def acs3_canonical_request(method: str, query: str, headers: Mapping[str, str], payload_hash: str) -> tuple[str, str]:
    """(CanonicalRequest, SignedHeaders) of an RPC-style call (path "/"): every header given is signed,
    names lower-cased, values trimmed (not lower-cased, unlike Tencent's), sorted by name."""
    canonical = sorted((name.strip().lower(), value.strip()) for name, value in headers.items())
    signed = ";".join(name for name, _ in canonical)
    lines = "".join(f"{name}:{value}\n" for name, value in canonical)
    return f"{method}\n/\n{query}\n{lines}\n{signed}\n{payload_hash}", signed


def acs3_signature(secret: str, canonical_request: str) -> str:
    to_sign = f"{ACS3}\n{sha256_hex(canonical_request.encode('utf-8'))}"
    return hmac.new(secret.encode("utf-8"), to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def acs3_authorization(
    key_id: str, secret: str, method: str, query: str, headers: Mapping[str, str], payload_hash: str
) -> str:
    """The ``Authorization`` header of an ACS3-HMAC-SHA256 request signing ``headers`` (host and every
    x-acs-* header, including x-acs-content-sha256 = ``payload_hash``)."""
    canonical, signed = acs3_canonical_request(method, query, headers, payload_hash)
    return f"{ACS3} Credential={key_id},SignedHeaders={signed},Signature={acs3_signature(secret, canonical)}"
