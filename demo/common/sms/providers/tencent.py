"""Tencent Cloud SMS: ``SendSms`` of API 3.0 (version 2021-01-11), signed with TC3-HMAC-SHA256.

Errors: the whole request in ``Response.Error`` (HTTP 200 all the same), a number's own outcome in
``Response.SendStatusSet[].Code`` ("Ok" when taken; its ``SerialNo`` is the message id).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from demo.common.sms.backends import SmsFailed, SmsMessage, text_language
from demo.common.sms.providers import ProviderClient, check_endpoint, credential, host_of, post
from demo.common.sms.providers.signing import tc3_authorization
from demo.common.sms.providers.templates import KEYS, Templates, template_key

if TYPE_CHECKING:
    from demo.conf.settings import Settings

VERSION = "2021-01-11"
SERVICE = "sms"  # the credential scope's service: the first label of sms.tencentcloudapi.com
CONTENT_TYPE = "application/json; charset=utf-8"
# A number's codes that no other provider or later try would change: the number itself is refused.
REJECTED = frozenset(
    {
        "InvalidParameterValue.IncorrectPhoneNumber",
        "FailedOperation.PhoneNumberInBlacklist",
        "FailedOperation.PhoneNumberParseFail",
        "UnsupportedOperation.UnsupportedRegion",
    }
)
# The number's own limits, set in the SMS console (SendSms 2021-01-11 error codes,
# https://cloud.tencent.com/document/api/382/55981 and the SMS error code list
# https://cloud.tencent.com/document/api/382/59177): "单个手机号30秒内/1小时内/日下发短信条数超过设定的上限"
# and "单个手机号下发相同内容超过设定的上限". Final for the text: failing over or retrying would text the
# number past a limit set to protect it. Not LimitExceeded.DeliveryFrequencyLimit, AppDailyLimit,
# DailyLimit: the application's own volume, which another provider may rightly carry.
LIMITED = frozenset(
    {
        "LimitExceeded.PhoneNumberThirtySecondLimit",
        "LimitExceeded.PhoneNumberOneHourLimit",
        "LimitExceeded.PhoneNumberDailyLimit",
        "LimitExceeded.PhoneNumberSameContentDailyLimit",
    }
)


@dataclass(frozen=True, kw_only=True)
class TencentBackend:
    secret_id: str
    secret_key: str = field(repr=False)  # never in a log line or a traceback
    endpoint: str
    region: str
    app_id: str
    sign_name: str
    templates: Templates
    minutes: int  # a code's lifetime in minutes, the templates' second parameter
    timeout: float
    now: Callable[[], float] = time.time  # the signing time (tests sign in the past)
    client: ProviderClient = field(default_factory=ProviderClient, repr=False, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings, environ: Mapping[str, str]) -> TencentBackend:
        for name in ("sms_tencent_app_id", "sms_tencent_sign_name", "sms_tencent_region"):
            if not getattr(settings, name).strip():
                raise ValueError(f"sms_backend=tencent needs {name}")
        keys = KEYS if settings.sms_login else tuple(k for k in KEYS if k != "login")
        return cls(
            secret_id=credential(environ, "TENCENTCLOUD_SECRET_ID", "tencent"),
            secret_key=credential(environ, "TENCENTCLOUD_SECRET_KEY", "tencent"),
            endpoint=check_endpoint("sms_tencent_endpoint", settings.sms_tencent_endpoint, debug=settings.debug),
            region=settings.sms_tencent_region.strip(),
            app_id=settings.sms_tencent_app_id.strip(),
            sign_name=settings.sms_tencent_sign_name.strip(),
            templates=Templates.parse(
                "sms_tencent_templates", settings.sms_tencent_templates, text_language(None, settings), keys
            ),
            minutes=max(1, settings.sms_code_ttl // 60),
            timeout=settings.sms_gateway_timeout,
        )

    def request(self, message: SmsMessage) -> tuple[dict[str, str], bytes]:
        """The headers and body of the SendSms call for ``message``, signed now."""
        params = [message.code, str(self.minutes)] if message.code else []
        body = json.dumps(
            {
                "PhoneNumberSet": [message.phone],
                "SmsSdkAppId": self.app_id,
                "SignName": self.sign_name,
                "TemplateId": self.templates.pick(template_key(message.purpose, bool(message.code)), message.lang),
                "TemplateParamSet": params,
            },
            ensure_ascii=False,
        ).encode("utf-8")
        timestamp = int(self.now())
        signed = {"Content-Type": CONTENT_TYPE, "Host": host_of(self.endpoint), "X-TC-Action": "SendSms"}
        authorization = tc3_authorization(self.secret_id, self.secret_key, SERVICE, signed, body, timestamp)
        headers = signed | {
            "X-TC-Version": VERSION,
            "X-TC-Timestamp": str(timestamp),
            "X-TC-Region": self.region,
            "Authorization": authorization,
        }
        return headers, body

    def close(self) -> None:
        self.client.close()

    async def send(self, message: SmsMessage) -> str | None:
        headers, body = self.request(message)
        status, answer = await post(self.client, self.endpoint + "/", headers, body, self.timeout)
        response = answer.get("Response")
        if not isinstance(response, dict):
            raise SmsFailed(f"HTTP {status}, no Response in the answer")
        error = response.get("Error")
        if isinstance(error, dict):
            raise SmsFailed(f"{error.get('Code')}: {error.get('Message')}")
        statuses = response.get("SendStatusSet") or [{}]
        outcome = statuses[0] if isinstance(statuses[0], dict) else {}
        code = outcome.get("Code")
        if code != "Ok":
            raise SmsFailed(f"{code}: {outcome.get('Message')}", rejected=code in REJECTED, limited=code in LIMITED)
        serial = outcome.get("SerialNo")
        return str(serial) if serial else None
