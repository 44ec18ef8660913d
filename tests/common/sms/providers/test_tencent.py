"""sms/providers/tencent.py against its stand-in (tests/sms_standins.py), which checks signatures as
Tencent Cloud does."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time

import pytest
from tornado.httpclient import AsyncHTTPClient

from demo.common.sms.backends import SmsFailed, SmsMessage
from demo.common.sms.providers.tencent import TencentBackend
from demo.conf import settings as config

gen_test = pytest.mark.gen_test(timeout=30)
CODE = SmsMessage("+8618866668888", "regist", "123456", "Your code is 123456", "2026-11-30T00:00:00Z", "en")


def backend(sms_providers, **overrides) -> TencentBackend:
    settings = config.defaults(**sms_providers.settings("tencent", **overrides))
    return TencentBackend.from_settings(settings, os.environ)


async def post(built: TencentBackend, headers: dict[str, str], body: bytes) -> dict:
    response = await AsyncHTTPClient().fetch(built.endpoint + "/", method="POST", headers=headers, body=body)
    return json.loads(response.body)["Response"]


@gen_test
async def test_a_code_goes_out_signed_with_its_template_and_parameters(sms_providers):
    serial = await backend(sms_providers).send(CODE)
    [sent] = sms_providers.tencent.accepted
    assert sent == {
        "phone": "+8618866668888",
        "template": "1001",
        "params": ["123456", "5"],  # the code and the minutes it lives (sms_code_ttl 300 s)
        "code": "123456",
        "sign_name": "Demo",
        "id": serial,
    }
    assert serial and sms_providers.tencent.refused == []


@gen_test
async def test_the_language_picks_the_template_and_a_notice_has_no_parameters(sms_providers):
    built = backend(sms_providers)
    await built.send(SmsMessage("+8618866668888", "regist", "123456", "t", "", "zh-CN"))
    await built.send(SmsMessage("+8618866668888", "reset", "654321", "t", "", "zh-CN"))  # no zh-CN: the default's
    await built.send(SmsMessage("+8618866668888", "phone", None, "t", "", "en"))
    assert [(m["template"], m["params"]) for m in sms_providers.tencent.accepted] == [
        ("2001", ["123456", "5"]),
        ("1002", ["654321", "5"]),
        ("1007", []),
    ]


@gen_test
async def test_the_stand_in_refuses_a_tampered_signature_a_changed_body_and_another_host(sms_providers):
    built = backend(sms_providers)
    headers, body = built.request(CODE)
    good = headers["Authorization"]
    bad_signature = good[:-1] + ("0" if good[-1] != "0" else "1")
    assert (await post(built, headers | {"Authorization": bad_signature}, body))["Error"]["Code"] == (
        "AuthFailure.SignatureFailure"
    )
    changed = body.replace(b"+8618866668888", b"+8613900000000")
    assert (await post(built, headers, changed))["Error"]["Code"] == "AuthFailure.SignatureFailure"
    assert (await post(built, headers | {"Host": "sms.tencentcloudapi.com"}, body))["Error"]["Code"] == (
        "AuthFailure.SignatureFailure"
    )
    assert sms_providers.tencent.accepted == []
    assert "SendStatusSet" in await post(built, headers, body)  # the untouched request is taken


@gen_test
async def test_a_wrong_key_is_refused(sms_providers, monkeypatch):
    monkeypatch.setenv("TENCENTCLOUD_SECRET_KEY", "not-the-key")
    with pytest.raises(SmsFailed, match="AuthFailure.SignatureFailure"):
        await backend(sms_providers).send(CODE)
    assert sms_providers.tencent.accepted == []


@gen_test
async def test_a_stale_timestamp_is_refused(sms_providers):
    stale = dataclasses.replace(backend(sms_providers), now=lambda: time.time() - 301)  # Tencent allows 5 min
    with pytest.raises(SmsFailed, match="AuthFailure.SignatureExpire"):
        await stale.send(CODE)
    assert sms_providers.tencent.accepted == []
    await dataclasses.replace(stale, now=lambda: time.time() - 240).send(CODE)
    assert len(sms_providers.tencent.accepted) == 1


@gen_test
async def test_an_error_a_refused_number_and_a_time_out(sms_providers):
    built = backend(sms_providers, sms_gateway_timeout=0.3)
    sms_providers.tencent.fail = "InternalError.Timeout"
    with pytest.raises(SmsFailed, match="InternalError.Timeout") as failed:
        await built.send(CODE)
    assert not (failed.value.rejected or failed.value.timeout)
    sms_providers.tencent.fail = None
    sms_providers.tencent.reject_number = "InvalidParameterValue.IncorrectPhoneNumber"
    with pytest.raises(SmsFailed) as refused:
        await built.send(CODE)
    assert refused.value.rejected
    for code in (
        "LimitExceeded.PhoneNumberThirtySecondLimit",
        "LimitExceeded.PhoneNumberOneHourLimit",
        "LimitExceeded.PhoneNumberDailyLimit",
        "LimitExceeded.PhoneNumberSameContentDailyLimit",
    ):
        sms_providers.tencent.reject_number = code  # the provider's own limit for the number: final too
        with pytest.raises(SmsFailed, match=code) as limited:
            await built.send(CODE)
        assert limited.value.limited and limited.value.final and not limited.value.rejected
    sms_providers.tencent.reject_number = "LimitExceeded.AppDailyLimit"  # the application's volume: not final
    with pytest.raises(SmsFailed) as busy:
        await built.send(CODE)
    assert not busy.value.final
    sms_providers.tencent.reject_number = None
    sms_providers.tencent.hang = 5
    with pytest.raises(SmsFailed, match="no answer within 0.3s") as silent:
        await built.send(CODE)
    assert silent.value.timeout


@gen_test
async def test_the_region_is_sent_and_the_stand_in_requires_it(sms_providers):
    built = backend(sms_providers, sms_tencent_region="ap-singapore")
    headers, body = built.request(CODE)
    assert headers["X-TC-Region"] == "ap-singapore"
    without = {name: value for name, value in headers.items() if name != "X-TC-Region"}
    assert (await post(built, without, body))["Error"]["Code"] == "MissingParameter"
    assert sms_providers.tencent.accepted == []
    assert "SendStatusSet" in await post(built, headers, body)


@gen_test
async def test_a_huge_answer_is_a_failed_send_not_a_stall(sms_providers):
    sms_providers.tencent.bloat = 50_000_000  # 50 MB where a few hundred bytes are due
    built = backend(sms_providers)
    gaps: list[float] = []
    done = False

    async def ticker() -> None:  # how long the loop goes without running this
        last = time.monotonic()
        while not done:
            await asyncio.sleep(0.005)
            gaps.append(time.monotonic() - last)
            last = time.monotonic()

    ticking = asyncio.ensure_future(ticker())
    started = time.monotonic()
    with pytest.raises(SmsFailed, match="over 64 KiB") as failed:
        await built.send(CODE)
    elapsed = time.monotonic() - started
    done = True
    await ticking
    assert not (failed.value.timeout or failed.value.final)  # the next provider gets the text
    assert elapsed < 0.5 and max(gaps) < 0.1, (elapsed, max(gaps))
    sms_providers.tencent.bloat = 1000  # a little padding is fine
    assert await built.send(CODE)
    built.close()
    built.close()  # twice is harmless (the sender closes at every stop)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sms_tencent_endpoint": "https://user:pw@sms.example.com"}, "no user:password@"),
        ({"sms_tencent_endpoint": "https://@sms.example.com"}, "no user:password@"),
        ({"sms_tencent_endpoint": "https://sms.example.com/?a=1"}, r"\?query"),
        ({"sms_tencent_endpoint": "https://sms.example.com?"}, r"\?query"),
        ({"sms_tencent_endpoint": "https://sms.example.com#top"}, "#fragment"),
        ({"sms_tencent_app_id": ""}, "needs sms_tencent_app_id"),
        ({"sms_tencent_sign_name": " "}, "needs sms_tencent_sign_name"),
        ({"sms_tencent_templates": "regist=1"}, "sms_tencent_templates: no template for reset, login"),
        ({"sms_tencent_endpoint": "http://sms.example.com"}, "plain http to another machine"),
        ({"sms_tencent_endpoint": "sms.example.com"}, "not a base URL"),
        ({"sms_tencent_endpoint": "https://sms.example.com/v1"}, "not a base URL"),
    ],
)
def test_settings_that_cannot_work_are_named(sms_providers, overrides, message):
    with pytest.raises(ValueError, match=message):
        backend(sms_providers, **overrides)


def test_plain_http_is_for_loopback_or_debug_and_credentials_come_from_the_environment(sms_providers, monkeypatch):
    assert backend(sms_providers, sms_tencent_endpoint="http://[::1]:9/").endpoint == "http://[::1]:9"
    assert backend(sms_providers, sms_tencent_endpoint="http://sms.example.com", debug=True)
    monkeypatch.delenv("TENCENTCLOUD_SECRET_KEY")
    with pytest.raises(ValueError, match="needs the environment variable TENCENTCLOUD_SECRET_KEY"):
        backend(sms_providers)
