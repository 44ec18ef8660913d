"""sms/providers/signing.py against the providers' published worked examples, byte for byte."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterator

import pytest

from demo.common.sms.providers.signing import (
    acs3_authorization,
    acs3_canonical_request,
    acs3_encode,
    acs3_query,
    sha256_hex,
    tc3_authorization,
    tc3_canonical_request,
    tc3_string_to_sign,
)

# Tencent Cloud API 3.0, "Signature v3" (签名方法 v3), the same page in every product's API docs, e.g.
# https://www.tencentcloud.com/document/api/614/42761 (source: tencentyun/qcloud-documents): CVM
# DescribeInstances at 1551113065, with the page's example keys.
TC_PAYLOAD = b'{"Limit": 1, "Filters": [{"Values": ["\\u672a\\u547d\\u540d"], "Name": "instance-name"}]}'
TC_HEADERS = {"Content-Type": "application/json; charset=utf-8", "Host": "cvm.tencentcloudapi.com"}
TC_CANONICAL = (
    "POST\n/\n\ncontent-type:application/json; charset=utf-8\nhost:cvm.tencentcloudapi.com\n\ncontent-type;host\n"
    "35e9c5b0e3ae67532d3c9f17ead6c90222632e5b1ff7f6e89887f1398934f064"
)
TC_STRING_TO_SIGN = (
    "TC3-HMAC-SHA256\n1551113065\n2019-02-25/cvm/tc3_request\n"
    "5ffe6a04c0664d6b969fab9a13bdab201d63ee709638e2749d62a09ca18d7031"
)
TC_AUTHORIZATION = (
    "TC3-HMAC-SHA256 Credential=AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE/2019-02-25/cvm/tc3_request,"
    " SignedHeaders=content-type;host, Signature=72e494ea809ad7a8c8f7a4507b9bddcbaa8e581f516e8da2f66e2c5a96525168"
)

# Alibaba Cloud, "V3 request structure and signature" (V3版本请求体&签名机制),
# https://www.alibabacloud.com/help/en/sdk/product-overview/v3-request-structure-and-signature : ECS
# RunInstances with the page's example key, date and nonce, empty body.
ALI_QUERY = {"ImageId": "win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd", "RegionId": "cn-shanghai"}
ALI_HEADERS = {
    "host": "ecs.cn-shanghai.aliyuncs.com",
    "x-acs-action": "RunInstances",
    "x-acs-content-sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "x-acs-date": "2023-10-26T10:22:32Z",
    "x-acs-signature-nonce": "3156853299f313e23d1673dc12e1703d",
    "x-acs-version": "2014-05-26",
}
ALI_AUTHORIZATION = (
    "ACS3-HMAC-SHA256 Credential=YourAccessKeyId,SignedHeaders=host;x-acs-action;x-acs-content-sha256;x-acs-date;"
    "x-acs-signature-nonce;x-acs-version,Signature=06563a9e1b43f5dfe96b81484da74bceab24a1d853912eee15083a6f0f3283c0"
)


def test_tencent_canonical_request_and_string_to_sign_are_the_published_ones():
    canonical, signed = tc3_canonical_request(TC_HEADERS, TC_PAYLOAD)
    assert (canonical, signed) == (TC_CANONICAL, "content-type;host")
    assert tc3_string_to_sign(canonical, 1551113065, "cvm") == (TC_STRING_TO_SIGN, "2019-02-25/cvm/tc3_request")


def test_tencent_authorization_is_the_published_one():
    authorization = tc3_authorization(
        "AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE",
        "Gu5t9xGARNpq86cd98joQYCN3EXAMPLE",
        "cvm",
        TC_HEADERS,
        TC_PAYLOAD,
        1551113065,
    )
    assert authorization == TC_AUTHORIZATION


@pytest.fixture
def in_shanghai() -> Iterator[None]:
    """The process's local time zone is UTC+8 for the test (a UTC machine would hide a local-time bug)."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Shanghai"
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


def test_tencent_scope_date_is_utc_not_local(in_shanghai):
    # 1551113065 is 2019-02-26 00:44 in UTC+8: the page's own warning; the scope must say the 25th.
    assert dt.datetime.fromtimestamp(1551113065).day == 26  # the local date here is the 26th
    _, scope = tc3_string_to_sign("x", 1551113065, "sms")
    assert scope == "2019-02-25/sms/tc3_request"


def test_tencent_signature_changes_with_the_key_the_body_and_a_signed_header():
    base = tc3_authorization("id", "key", "sms", TC_HEADERS, TC_PAYLOAD, 1551113065)
    assert tc3_authorization("id", "key2", "sms", TC_HEADERS, TC_PAYLOAD, 1551113065) != base
    assert tc3_authorization("id", "key", "sms", TC_HEADERS, TC_PAYLOAD + b" ", 1551113065) != base
    other_host = TC_HEADERS | {"Host": "sms.tencentcloudapi.com"}
    assert tc3_authorization("id", "key", "sms", other_host, TC_PAYLOAD, 1551113065) != base


def test_alibaba_canonical_request_hash_and_authorization_are_the_published_ones():
    query = acs3_query(ALI_QUERY)
    assert query == "ImageId=win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd&RegionId=cn-shanghai"
    canonical, _ = acs3_canonical_request("POST", query, ALI_HEADERS, sha256_hex(b""))
    # the page's HashedCanonicalRequest
    assert sha256_hex(canonical.encode()) == "7ea06492da5221eba5297e897ce16e55f964061054b7695beedaac1145b1e259"
    assert acs3_authorization(
        "YourAccessKeyId", "YourAccessKeySecret", "POST", query, ALI_HEADERS, sha256_hex(b"")
    ) == (ALI_AUTHORIZATION)


def test_alibaba_encoding_is_rfc3986_as_the_page_lists_it():
    assert acs3_encode("a b*c~d/é") == "a%20b%2Ac~d%2F%C3%A9"
    assert acs3_query({"b": "2", "A": '{"code":"1"}', "a": ""}) == "A=%7B%22code%22%3A%221%22%7D&a=&b=2"
