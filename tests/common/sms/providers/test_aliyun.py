"""sms/providers/aliyun.py against its stand-in (tests/sms_standins.py), which checks signatures as
Alibaba Cloud does."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import pytest
from tornado.httpclient import AsyncHTTPClient

from demo.common.sms.backends import SmsFailed, SmsMessage
from demo.common.sms.providers.aliyun import AliyunBackend
from demo.conf import settings as config

gen_test = pytest.mark.gen_test(timeout=30)
CODE = SmsMessage("+8618866668888", "login", "123456", "Your code is 123456", "2026-11-30T00:00:00Z", "en")


def backend(sms_providers, **overrides) -> AliyunBackend:
    settings = config.defaults(**sms_providers.settings("aliyun", **overrides))
    return AliyunBackend.from_settings(settings, os.environ)


async def post(built: AliyunBackend, query: str, headers: dict[str, str]) -> dict:
    response = await AsyncHTTPClient().fetch(
        f"{built.endpoint}/?{query}", method="POST", headers=headers, body=b"", raise_error=False
    )
    return json.loads(response.body)


@gen_test
async def test_a_code_goes_out_signed_with_its_template_and_parameters(sms_providers):
    biz_id = await backend(sms_providers).send(CODE)
    [sent] = sms_providers.aliyun.accepted
    assert sent == {
        "phone": "+8618866668888",
        "template": "SMS_1003",
        "params": {"code": "123456", "minutes": "5"},
        "code": "123456",
        "sign_name": "Demo",
        "id": biz_id,
    }
    assert biz_id and sms_providers.aliyun.refused == []


@gen_test
async def test_the_language_picks_the_template_and_a_notice_has_no_parameters(sms_providers):
    built = backend(sms_providers)
    await built.send(SmsMessage("+85251234567", "regist", "123456", "t", "", "zh-CN"))
    await built.send(SmsMessage("+8618866668888", "phone_notice", None, "t", "", "zh-CN"))
    assert [(m["phone"], m["template"], m["params"]) for m in sms_providers.aliyun.accepted] == [
        ("+85251234567", "SMS_2001", {"code": "123456", "minutes": "5"}),
        ("+8618866668888", "SMS_1008", {}),
    ]


@gen_test
async def test_the_stand_in_refuses_a_tampered_signature_a_changed_query_another_host_and_a_replay(sms_providers):
    built = backend(sms_providers)
    query, headers = built.request(CODE)
    good = headers["Authorization"]
    bad_signature = good[:-1] + ("0" if good[-1] != "0" else "1")
    assert (await post(built, query, headers | {"Authorization": bad_signature}))["Code"] == "SignatureDoesNotMatch"
    changed = query.replace("8618866668888", "8613900000000")
    assert (await post(built, changed, headers))["Code"] == "SignatureDoesNotMatch"
    assert (await post(built, query, headers | {"Host": "dysmsapi.aliyuncs.com"}))["Code"] == "SignatureDoesNotMatch"
    unsigned = headers | {"x-acs-extra": "1"}  # every x-acs-* header must be signed
    assert (await post(built, query, unsigned))["Code"] == "IncompleteSignature"
    assert sms_providers.aliyun.accepted == []
    assert (await post(built, query, headers))["Code"] == "OK"  # the untouched request is taken, once
    assert (await post(built, query, headers))["Code"] == "SignatureNonceUsed"
    assert len(sms_providers.aliyun.accepted) == 1


@gen_test
async def test_a_wrong_secret_and_a_stale_date_are_refused(sms_providers, monkeypatch):
    stale = dataclasses.replace(backend(sms_providers), now=lambda: time.time() - 901)  # Alibaba allows 15 min
    with pytest.raises(SmsFailed, match="InvalidTimeStamp.Expired"):
        await stale.send(CODE)
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "not-the-secret")
    with pytest.raises(SmsFailed, match="SignatureDoesNotMatch"):
        await backend(sms_providers).send(CODE)
    assert sms_providers.aliyun.accepted == []


@gen_test
async def test_an_error_a_refused_number_and_a_time_out(sms_providers):
    built = backend(sms_providers, sms_gateway_timeout=0.3)
    sms_providers.aliyun.fail = "isp.SYSTEM_ERROR"
    with pytest.raises(SmsFailed, match="isp.SYSTEM_ERROR") as failed:
        await built.send(CODE)
    assert not (failed.value.final or failed.value.timeout)
    sms_providers.aliyun.fail = "isv.BUSINESS_LIMIT_CONTROL"  # the number's flow control: final
    with pytest.raises(SmsFailed, match="isv.BUSINESS_LIMIT_CONTROL") as limited:
        await built.send(CODE)
    assert limited.value.limited and not limited.value.rejected
    sms_providers.aliyun.fail = "isv.DAY_LIMIT_CONTROL"  # the account's daily cap, not the number's
    with pytest.raises(SmsFailed) as capped:
        await built.send(CODE)
    assert not capped.value.final
    sms_providers.aliyun.fail = None
    sms_providers.aliyun.reject_number = "isv.MOBILE_NUMBER_ILLEGAL"
    with pytest.raises(SmsFailed) as refused:
        await built.send(CODE)
    assert refused.value.rejected
    sms_providers.aliyun.reject_number = None
    sms_providers.aliyun.hang = 5
    with pytest.raises(SmsFailed) as silent:
        await built.send(CODE)
    assert silent.value.timeout


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sms_aliyun_sign_name": ""}, "needs sms_aliyun_sign_name"),
        ({"sms_aliyun_templates": "regist=SMS_1"}, "sms_aliyun_templates: no template for reset"),
        ({"sms_aliyun_endpoint": "http://dysmsapi.aliyuncs.com"}, "plain http to another machine"),
        (
            {"sms_aliyun_endpoint": "https://LTAI:secret@dysmsapi.aliyuncs.com"},
            "sms_aliyun_endpoint: a base URL has no",
        ),
    ],
)
def test_settings_that_cannot_work_are_named(sms_providers, overrides, message):
    with pytest.raises(ValueError, match=message):
        backend(sms_providers, **overrides)


def test_the_credentials_come_from_the_environment(sms_providers, monkeypatch):
    monkeypatch.delenv("ALIBABA_CLOUD_ACCESS_KEY_ID")
    with pytest.raises(ValueError, match="needs the environment variable ALIBABA_CLOUD_ACCESS_KEY_ID"):
        backend(sms_providers)
