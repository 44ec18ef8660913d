"""Alibaba Cloud SMS (dysmsapi): ``SendSms`` of version 2017-05-25, an RPC-style call signed with the
V3 signature (ACS3-HMAC-SHA256): parameters in the query, an empty body.

Why the number and the code travel in the query (so a proxy's access log could keep them), not in a
signed form body: the V3 signature page ("V3 request structure and signature") puts in an
``application/x-www-form-urlencoded`` body only the parameters an API declares ``"in": "formData"``;
SendSms 2017-05-25 declares PhoneNumbers, SignName, TemplateCode and TemplateParam ``"in": "query"``
(the official SDK sends them there), and nothing documents that the gateway reads query parameters
from the body. Moving them would rest on a stand-in we wrote ourselves agreeing with us. The endpoint
is https-only (``check_endpoint``), so only the two ends (and a TLS-terminating proxy of our own) see
the URL; keep such a proxy's access log off for this host.

The answer's ``Code`` is "OK" when the text was taken (its ``BizId`` is the message id); otherwise
``Code`` and ``Message`` say why, with HTTP 200 or 4xx.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from demo.common.sms.backends import SmsFailed, SmsMessage, text_language
from demo.common.sms.providers import ProviderClient, check_endpoint, credential, host_of, post
from demo.common.sms.providers.signing import acs3_authorization, acs3_query, sha256_hex
from demo.common.sms.providers.templates import KEYS, Templates, template_key

if TYPE_CHECKING:
    from demo.conf.settings import Settings

VERSION = "2017-05-25"
EMPTY_BODY_HASH = sha256_hex(b"")
FORM = "application/x-www-form-urlencoded"  # what Tornado would add to a POST anyway: sent, so signed
# Codes that no other provider or later try would change: the number itself is refused.
REJECTED = frozenset({"isv.MOBILE_NUMBER_ILLEGAL"})
# The number's own limit (SMS error codes, https://www.alibabacloud.com/help/en/sms/developer-reference/error-codes):
# isv.BUSINESS_LIMIT_CONTROL, "触发业务流控", is the per-number flow control (by default a number gets
# 1 code a minute, 5 an hour, 10 a day per signature). Final for the text: failing over or retrying
# would text the number past a limit set to protect it. Not isv.DAY_LIMIT_CONTROL: despite its name it
# is the account's daily volume cap set in the console ("已经达到您在控制台设置的短信日发送量限额值"),
# not a number's, and another provider may rightly carry that text.
LIMITED = frozenset({"isv.BUSINESS_LIMIT_CONTROL"})


@dataclass(frozen=True, kw_only=True)
class AliyunBackend:
    key_id: str
    secret: str = field(repr=False)  # never in a log line or a traceback
    endpoint: str
    sign_name: str
    templates: Templates
    minutes: int
    timeout: float
    now: Callable[[], float] = time.time
    nonce: Callable[[], str] = lambda: secrets.token_hex(16)
    client: ProviderClient = field(default_factory=ProviderClient, repr=False, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings, environ: Mapping[str, str]) -> AliyunBackend:
        if not settings.sms_aliyun_sign_name.strip():
            raise ValueError("sms_backend=aliyun needs sms_aliyun_sign_name")
        keys = KEYS if settings.sms_login else tuple(k for k in KEYS if k != "login")
        return cls(
            key_id=credential(environ, "ALIBABA_CLOUD_ACCESS_KEY_ID", "aliyun"),
            secret=credential(environ, "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "aliyun"),
            endpoint=check_endpoint("sms_aliyun_endpoint", settings.sms_aliyun_endpoint, debug=settings.debug),
            sign_name=settings.sms_aliyun_sign_name.strip(),
            templates=Templates.parse(
                "sms_aliyun_templates", settings.sms_aliyun_templates, text_language(None, settings), keys
            ),
            minutes=max(1, settings.sms_code_ttl // 60),
            timeout=settings.sms_gateway_timeout,
        )

    def request(self, message: SmsMessage) -> tuple[str, dict[str, str]]:
        """The query and headers of the SendSms call for ``message``, signed now."""
        params = {
            # Country code and number without "+": what Alibaba Cloud takes for mainland and other numbers.
            "PhoneNumbers": message.phone.removeprefix("+"),
            "SignName": self.sign_name,
            "TemplateCode": self.templates.pick(template_key(message.purpose, bool(message.code)), message.lang),
        }
        if message.code:
            params["TemplateParam"] = json.dumps({"code": message.code, "minutes": str(self.minutes)})
        query = acs3_query(params)
        date = dt.datetime.fromtimestamp(int(self.now()), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        signed = {
            "host": host_of(self.endpoint),
            "content-type": FORM,
            "x-acs-action": "SendSms",
            "x-acs-version": VERSION,
            "x-acs-date": date,
            "x-acs-signature-nonce": self.nonce(),
            "x-acs-content-sha256": EMPTY_BODY_HASH,
        }
        authorization = acs3_authorization(self.key_id, self.secret, "POST", query, signed, EMPTY_BODY_HASH)
        return query, signed | {"Authorization": authorization}

    def close(self) -> None:
        self.client.close()

    async def send(self, message: SmsMessage) -> str | None:
        query, headers = self.request(message)
        status, answer = await post(self.client, f"{self.endpoint}/?{query}", headers, b"", self.timeout)
        code = answer.get("Code")
        if code != "OK":
            raise SmsFailed(
                f"{code}: {answer.get('Message')} (HTTP {status})", rejected=code in REJECTED, limited=code in LIMITED
            )
        biz_id = answer.get("BizId")
        return str(biz_id) if biz_id else None
