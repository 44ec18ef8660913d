"""Local stand-ins for the SMS providers we cannot run: Tencent Cloud SMS and Alibaba Cloud SMS.

Each is a small Tornado server on a free loopback port, on the test's event loop. It checks a request
as the provider does, from the bytes it received and its own copy of the secret (this module rebuilds
the canonical request itself, never with demo's signing code, so a mistake there cannot hide here):
the Authorization header's form, the key id, the timestamp's age, the signed headers (Host among them,
and it must be the stand-in's own), the body's hash and the signature. A refusal answers the
provider's error JSON; an accepted text is recorded. A test can make it refuse (``fail``: the error
code to answer), refuse the number (``reject_number``), hang (``hang``: seconds before answering) or
bloat its answer (``bloat``: bytes of padding in an accepted text's answer).

``ProviderStandIns.settings()`` gives the demo settings that point at both; the ``sms_providers``
fixture (tests/conftest.py) starts them and puts their credentials in the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError
from tornado.testing import bind_unused_port
from tornado.web import Application, RequestHandler

TENCENT_ID, TENCENT_KEY = "AKIDstandin0000000000000000000000", "tencent-stand-in-secret-key-0000"
ALIYUN_ID, ALIYUN_SECRET = "LTAIstandin00000000000", "aliyun-stand-in-access-key-secret"
TENCENT_APP_ID, SIGN_NAME = "1400000001", "Demo"
# One template per key in the default language (en), and Chinese ones for the codes of registration.
TENCENT_TEMPLATES = (
    "regist=1001, reset=1002, login=1003, phone=1004, delete=1005, regist_notice=1006, phone_taken=1007,"
    " phone_notice=1008, regist.zh-CN=2001"
)
ALIYUN_TEMPLATES = ",".join(item.replace("=", "=SMS_") for item in TENCENT_TEMPLATES.replace(" ", "").split(","))
ENVIRON = {
    "TENCENTCLOUD_SECRET_ID": TENCENT_ID,
    "TENCENTCLOUD_SECRET_KEY": TENCENT_KEY,
    "ALIBABA_CLOUD_ACCESS_KEY_ID": ALIYUN_ID,
    "ALIBABA_CLOUD_ACCESS_KEY_SECRET": ALIYUN_SECRET,
}


@dataclass
class StandIn:
    """One provider's stand-in: what it accepted and refused, and how it is told to misbehave."""

    name: str
    port: int = 0
    accepted: list[dict[str, Any]] = field(default_factory=list)  # phone, template, params, sign_name, id
    refused: list[str] = field(default_factory=list)  # the error codes it answered
    fail: str | None = None  # answer every request with this error code
    reject_number: str | None = None  # answer the number's status with this code (Tencent) / Code (Aliyun)
    hang: float = 0.0  # seconds to wait before answering
    bloat: int = 0  # bytes of padding in the answer to an accepted text
    max_skew: float = 300.0  # seconds a request's time may be off
    release: asyncio.Event = field(default_factory=asyncio.Event)  # ends every hang at once (teardown)
    nonces: set[str] = field(default_factory=set)  # Aliyun's: each may sign one request only

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def codes(self, phone: str) -> list[str]:
        """The codes this stand-in accepted for ``phone`` (E.164), oldest first."""
        return [m["code"] for m in self.accepted if m["phone"] == phone and m["code"]]

    async def wait_hang(self) -> None:
        if self.hang:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), self.hang)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


# -- Tencent Cloud: API 3.0, TC3-HMAC-SHA256 -----------------------------------------------------------

_TC3 = re.compile(
    r"TC3-HMAC-SHA256 Credential=(?P<id>[^/]+)/(?P<day>\d{4}-\d{2}-\d{2})/(?P<service>[a-z]+)/tc3_request,"
    r" SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=(?P<signature>[0-9a-f]{64})"
)


class TencentHandler(RequestHandler):
    """POST / as sms.tencentcloudapi.com answers it: HTTP 200, ``Response.Error`` for a refusal."""

    def initialize(self, state: StandIn) -> None:
        self.state = state

    def refuse(self, code: str, message: str) -> None:
        self.state.refused.append(code)
        self.finish({"Response": {"Error": {"Code": code, "Message": message}, "RequestId": str(uuid.uuid4())}})

    async def post(self) -> None:
        state, request = self.state, self.request
        match = _TC3.fullmatch(request.headers.get("Authorization", ""))
        if not match:
            return self.refuse("AuthFailure.InvalidAuthorization", "Authorization header is malformed")
        if match["id"] != TENCENT_ID:
            return self.refuse("AuthFailure.SecretIdNotFound", "The SecretId is not found")
        try:
            timestamp = int(request.headers.get("X-TC-Timestamp", ""))
        except ValueError:
            return self.refuse("AuthFailure.InvalidAuthorization", "X-TC-Timestamp is not a number")
        if abs(time.time() - timestamp) > state.max_skew:
            return self.refuse("AuthFailure.SignatureExpire", "Signature expired, the timestamp is out of range")
        day = dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d")
        signed = match["signed"].split(";")
        if match["day"] != day or match["service"] != "sms" or not {"content-type", "host"} <= set(signed):
            return self.refuse("AuthFailure.SignatureFailure", "The credential scope or signed headers are wrong")
        if request.headers.get("Host") != state.host:
            return self.refuse("AuthFailure.SignatureFailure", "The request was signed for another host")
        if any(name not in request.headers for name in signed) or signed != sorted(signed):
            return self.refuse("AuthFailure.SignatureFailure", "A signed header is missing or out of order")
        lines = "".join(f"{name}:{request.headers[name].strip().lower()}\n" for name in signed)
        canonical = f"POST\n/\n{request.query}\n{lines}\n{match['signed']}\n{_sha256(request.body)}"
        to_sign = f"TC3-HMAC-SHA256\n{timestamp}\n{day}/sms/tc3_request\n{_sha256(canonical.encode())}"
        key = _hmac(_hmac(_hmac(f"TC3{TENCENT_KEY}".encode(), day), "sms"), "tc3_request")
        expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, match["signature"]):
            return self.refuse("AuthFailure.SignatureFailure", "The provided credentials could not be validated")
        if request.headers.get("X-TC-Action") != "SendSms" or request.headers.get("X-TC-Version") != "2021-01-11":
            return self.refuse("InvalidAction", "The action or version is not supported")
        if not request.headers.get("X-TC-Region", "").strip():  # SendSms 2021-01-11 requires Region
            return self.refuse("MissingParameter", "The request is missing a required parameter `Region`.")
        await state.wait_hang()
        if state.fail:
            return self.refuse(state.fail, "stand-in told to fail")
        body = json.loads(request.body)
        if body.get("SmsSdkAppId") != TENCENT_APP_ID:
            return self.refuse("FailedOperation.SmsSdkAppIdVerifyFail", "SmsSdkAppId verification failed")
        [phone] = body["PhoneNumberSet"]
        serial = f"2433:{uuid.uuid4().int % 10**20}"
        status = {"SerialNo": serial, "PhoneNumber": phone, "Fee": 1, "SessionContext": "", "IsoCode": "CN"}
        if state.reject_number:
            state.refused.append(state.reject_number)
            status |= {"SerialNo": "", "Fee": 0, "Code": state.reject_number, "Message": "refused by the stand-in"}
        else:
            params = body.get("TemplateParamSet") or []
            state.accepted.append(
                {
                    "phone": phone,
                    "template": body["TemplateId"],
                    "params": params,
                    "code": params[0] if params else None,
                    "sign_name": body["SignName"],
                    "id": serial,
                }
            )
            status |= {"Code": "Ok", "Message": "send success"}
        answer = json.dumps({"Response": {"SendStatusSet": [status], "RequestId": str(uuid.uuid4())}}).encode()
        if state.bloat:
            await self.bloated(answer, state.bloat)
        else:
            self.finish(answer)

    async def bloated(self, answer: bytes, size: int) -> None:
        """``answer`` with ``size`` bytes of padding, streamed a megabyte at a time (so the stand-in
        itself never holds the loop) until the client hangs up."""
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        chunk = b"x" * min(size, 1 << 20)
        try:
            self.write(answer[:-1] + b', "Padding": "')
            for _ in range(size // len(chunk)):
                self.write(chunk)
                await self.flush()
            await self.finish(b'"}')
        except StreamClosedError:
            pass  # the client stopped reading, as it should


# -- Alibaba Cloud: dysmsapi SendSms, signature V3 (ACS3-HMAC-SHA256) -----------------------------------

_ACS3 = re.compile(
    r"ACS3-HMAC-SHA256 Credential=(?P<id>[^,]+),SignedHeaders=(?P<signed>[a-z0-9;-]+),"
    r"Signature=(?P<signature>[0-9a-f]{64})"
)


def _acs3_encode(value: str) -> str:
    return quote(value, safe="-_.~")


class AliyunHandler(RequestHandler):
    """POST /?... as dysmsapi.aliyuncs.com answers it: a JSON ``Code`` ("OK" or why not)."""

    def initialize(self, state: StandIn) -> None:
        self.state = state
        self.nonces = state.nonces

    def refuse(self, status: int, code: str, message: str) -> None:
        self.state.refused.append(code)
        self.set_status(status)
        self.finish({"RequestId": str(uuid.uuid4()), "Code": code, "Message": message})

    async def post(self) -> None:
        state, request = self.state, self.request
        match = _ACS3.fullmatch(request.headers.get("Authorization", ""))
        if not match:
            return self.refuse(400, "IncompleteSignature", "The request signature does not conform to standards")
        if match["id"] != ALIYUN_ID:
            return self.refuse(404, "InvalidAccessKeyId.NotFound", "Specified access key is not found")
        try:
            date = dt.datetime.strptime(request.headers.get("x-acs-date", ""), "%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            return self.refuse(400, "InvalidTimeStamp.Format", "x-acs-date is not yyyy-MM-ddTHH:mm:ssZ")
        if abs(time.time() - date.replace(tzinfo=dt.UTC).timestamp()) > state.max_skew:
            return self.refuse(400, "InvalidTimeStamp.Expired", "Specified time stamp or date value is expired")
        nonce = request.headers.get("x-acs-signature-nonce", "")
        if not nonce or nonce in self.nonces:
            return self.refuse(400, "SignatureNonceUsed", "Specified signature nonce was used already")
        signed = match["signed"].split(";")
        must_sign = {"host"} | {name.lower() for name in request.headers if name.lower().startswith("x-acs-")}
        if "Content-Type" in request.headers:
            must_sign.add("content-type")
        if not must_sign <= set(signed) or signed != sorted(signed) or any(n not in request.headers for n in signed):
            return self.refuse(400, "IncompleteSignature", "A header is not signed, or a signed one is missing")
        if request.headers.get("Host") != state.host:
            return self.refuse(400, "SignatureDoesNotMatch", "The request was signed for another host")
        if request.headers.get("x-acs-content-sha256") != _sha256(request.body):
            return self.refuse(400, "SignatureDoesNotMatch", "x-acs-content-sha256 is not the body's hash")
        query = {name: values[-1].decode() for name, values in request.query_arguments.items()}
        canonical_query = "&".join(f"{_acs3_encode(k)}={_acs3_encode(v)}" for k, v in sorted(query.items()))
        lines = "".join(f"{name}:{request.headers[name].strip()}\n" for name in signed)
        canonical = (
            f"{request.method}\n{request.path}\n{canonical_query}\n{lines}\n{match['signed']}\n{_sha256(request.body)}"
        )
        to_sign = f"ACS3-HMAC-SHA256\n{_sha256(canonical.encode())}"
        expected = hmac.new(ALIYUN_SECRET.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, match["signature"]):
            return self.refuse(400, "SignatureDoesNotMatch", "Specified signature is not matched with our calculation")
        self.nonces.add(nonce)
        if request.headers.get("x-acs-action") != "SendSms" or request.headers.get("x-acs-version") != "2017-05-25":
            return self.refuse(400, "InvalidAction.NotFound", "The specified action is not found")
        await state.wait_hang()
        if state.fail:
            return self.refuse(200, state.fail, "stand-in told to fail")
        if state.reject_number:
            return self.refuse(200, state.reject_number, "refused by the stand-in")
        params = json.loads(query.get("TemplateParam", "{}"))
        biz_id = f"{uuid.uuid4().int % 10**15}^0"
        state.accepted.append(
            {
                "phone": "+" + query["PhoneNumbers"],
                "template": query["TemplateCode"],
                "params": params,
                "code": params.get("code"),
                "sign_name": query["SignName"],
                "id": biz_id,
            }
        )
        self.finish({"Code": "OK", "Message": "OK", "BizId": biz_id, "RequestId": str(uuid.uuid4())})


@dataclass
class ProviderStandIns:
    """Both stand-ins, listening; ``stop`` ends them."""

    tencent: StandIn
    aliyun: StandIn
    servers: list[HTTPServer]

    @classmethod
    def start(cls) -> ProviderStandIns:
        """Bind both on free loopback ports of the current IOLoop (they serve once it runs)."""
        stand_ins, servers = [], []
        for name, handler in (("tencent", TencentHandler), ("aliyun", AliyunHandler)):
            state = StandIn(name, max_skew=300.0 if name == "tencent" else 900.0)  # each provider's own window
            sock, state.port = bind_unused_port()
            server = HTTPServer(Application([("/", handler, {"state": state})]))
            server.add_sockets([sock])
            stand_ins.append(state)
            servers.append(server)
        return cls(stand_ins[0], stand_ins[1], servers)

    def settings(self, backend: str = "tencent,aliyun", **overrides: Any) -> dict[str, Any]:
        """Demo settings sending through ``backend`` to these stand-ins (time-outs short for tests)."""
        return {
            "sms_backend": backend,
            "sms_gateway_timeout": 1.0,
            "sms_tencent_app_id": TENCENT_APP_ID,
            "sms_tencent_sign_name": SIGN_NAME,
            "sms_tencent_endpoint": self.tencent.url,
            "sms_tencent_templates": TENCENT_TEMPLATES,
            "sms_aliyun_sign_name": SIGN_NAME,
            "sms_aliyun_endpoint": self.aliyun.url,
            "sms_aliyun_templates": ALIYUN_TEMPLATES,
            **overrides,
        }

    async def stop(self) -> None:
        for state in (self.tencent, self.aliyun):
            state.release.set()
        for server in self.servers:
            server.stop()
            await server.close_all_connections()
