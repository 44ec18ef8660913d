"""Languages over HTTP: a Chinese-language app sees Chinese texts, pages and error messages; others English.

The API's error messages and the H5 pages follow Accept-Language (or the language an H5 ticket
carries), the SMS texts the language of the request that asked for them; codes and fields never change.
"""

from __future__ import annotations

import json
import re
from http.cookies import SimpleCookie
from urllib.parse import urlsplit

import pytest
from sqlalchemy import select

from demo.models import H5Session, H5Ticket, SmsOutbox

gen_test = pytest.mark.gen_test(timeout=60)
ZH = {"Accept-Language": "zh-CN,zh;q=0.9"}  # an Android app (or WebView) in Chinese
EN = {"Accept-Language": "en-US,en;q=0.9"}
PHONE, E164, PASSWORD = "18866668888", "+8618866668888", "demo123456"
CJK = re.compile(r"[\u4e00-\u9fff]")


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def h5_cookie(response) -> str:
    jar = SimpleCookie()
    for header in response.headers.get_list("Set-Cookie"):
        jar.load(header)
    return jar["demo_h5"].value


def html_lang(page) -> str:
    return re.search(rb'<html lang="([^"]+)">', page.body).group(1).decode()


def outbox_rows(app) -> list[SmsOutbox]:
    return app.services.db.run_sync(lambda s: list(s.scalars(select(SmsOutbox).order_by(SmsOutbox.id))))


async def signed_in(api, outbox, headers: dict[str, str]) -> dict:
    sent = await api.post("/users/code", {"phone": PHONE}, headers=headers)
    assert sent.code == 200, sent.body
    code = await outbox.code(E164)
    registered = await api.post("/users/regist", {"phone": PHONE, "password": PASSWORD, "code": code}, headers=headers)
    assert registered.code == 201, registered.body
    return registered.json


# -- the API's error messages ---------------------------------------------------------------------------


@gen_test
async def test_a_chinese_app_gets_chinese_messages_with_the_same_codes_and_fields(api):
    body = {"password": PASSWORD, "code": "123456"}
    english = await api.post("/users/regist", body, headers=EN)
    chinese = await api.post("/users/regist", body, headers=ZH)
    assert english.code == chinese.code == 422
    assert english.json["error"] == {"code": "invalid_field", "message": "'phone' is required.", "field": "phone"}
    assert chinese.json["error"] == {"code": "invalid_field", "message": "缺少 'phone'。", "field": "phone"}
    assert chinese.header("Content-Language") == "zh-CN" and english.header("Content-Language") == "en"
    assert chinese.all("Vary") == ["Accept-Language"] and chinese.header("Cache-Control") == "no-store"


@gen_test
async def test_domain_errors_and_tornados_own_answers_are_translated(api, user):
    wrong = await api.post("/users/login", {"phone": PHONE, "password": "wrong-password"}, headers=ZH)
    assert wrong.code == 401 and wrong.json["error"] == {"code": "invalid_credentials", "message": "手机号或密码错误。"}
    purpose = await api.post("/users/code", {"phone": PHONE, "purpose": "nope"}, headers=ZH)
    assert purpose.json["error"]["field"] == "purpose"
    assert purpose.json["error"]["message"].startswith("purpose 必须是以下之一：'regist', 'reset'")
    unknown = await api.get("/no/such/thing", headers=ZH)
    assert unknown.code == 404 and unknown.json["error"] == {"code": "not_found", "message": "没有这个资源。"}
    method = await api.request("PUT", "/users/login", body=b"", headers=ZH)
    assert method.code == 405 and method.json["error"] == {"code": "method_not_allowed", "message": "不支持该请求方法"}
    signed_out = await api.get("/users/me", headers=ZH)
    assert signed_out.json["error"] == {"code": "unauthorized", "message": "请重新登录：令牌缺失、已过期或已被撤销。"}


@gen_test
async def test_other_and_unknown_languages_get_english_and_q_values_decide(api):
    body = {"phone": PHONE, "password": PASSWORD, "code": "000000"}
    for header in ("fr-FR,fr;q=0.9", "zh-TW", "*", "", "zh-CN;q=0, en;q=0.1"):
        answer = await api.post("/users/regist", body, headers={"Accept-Language": header})
        assert answer.json["error"]["message"] == "The code is wrong, expired or already used.", header
        assert answer.header("Content-Language") == "en", header
    for header in ("en;q=0.5, zh-CN", "fr, zh;q=0.8, en;q=0.7", "zh-Hans-CN;q=1, en-CN;q=0.9"):
        answer = await api.post("/users/regist", body, headers={"Accept-Language": header})
        assert answer.json["error"]["message"] == "验证码错误、已过期或已被使用。", header


@pytest.mark.settings(default_language="zh-CN")
@gen_test
async def test_a_chinese_deployment_answers_chinese_to_clients_that_name_no_supported_language(api):
    for headers in ({}, {"Accept-Language": "fr"}):
        answer = await api.post("/users/regist", {"phone": PHONE}, headers=headers)
        assert answer.json["error"]["message"] == "缺少 'password'。"
    answer = await api.post("/users/regist", {"phone": PHONE}, headers=EN)
    assert answer.json["error"]["message"] == "'password' is required."


@gen_test
async def test_a_success_is_not_marked_with_a_language(api):
    answer = await api.get("/healthz", headers=ZH)
    assert answer.code == 200 and answer.header("Content-Language") is None and answer.header("Vary") is None


# -- SMS texts ------------------------------------------------------------------------------------------


@gen_test
async def test_texts_are_in_the_language_of_the_request_and_the_outbox_row_says_which(app, api, outbox):
    await api.post("/users/code", {"phone": PHONE}, headers=ZH)
    chinese = await outbox.last(E164)
    assert chinese["text"] == f"你的 demo 验证码是 {chinese['code']}，5 分钟内有效。"
    app.services.clock.advance(61)  # past sms_resend_after
    await api.post("/users/code", {"phone": PHONE}, headers={"Accept-Language": "fr"})
    english = await outbox.last(E164)
    assert english["text"] == f"Your demo verification code is {english['code']}. It expires in 5 minutes."
    assert [row.lang for row in outbox_rows(app)] == ["zh-CN", "en"]


@gen_test
async def test_an_already_registered_notice_is_in_chinese_too(app, api, outbox, user):
    app.services.clock.advance(61)  # past sms_resend_after of the registration's code
    await api.post("/users/code", {"phone": PHONE}, headers=ZH)
    notice = await outbox.last(E164)
    assert notice["code"] is None and notice["text"] == "此号码已注册 demo 账号。请直接登录，或重置密码。"
    assert outbox_rows(app)[-1].lang == "zh-CN"


@pytest.mark.settings(sms_android_app_hash="FA+9qCX9VSu", sms_otp_origin="Example.com")
@gen_test
async def test_texts_with_a_code_end_with_the_autofill_lines_and_notices_do_not(app, api, outbox):
    await api.post("/users/code", {"phone": PHONE}, headers=ZH)
    sent = await outbox.last(E164)
    code = sent["code"]
    assert sent["text"] == f"你的 demo 验证码是 {code}，5 分钟内有效。\nFA+9qCX9VSu\n@example.com #{code}"
    registered = await api.post("/users/regist", {"phone": PHONE, "password": PASSWORD, "code": code})
    assert registered.code == 201
    app.services.clock.advance(61)
    await api.post("/users/code", {"phone": PHONE}, headers=EN)  # registered: a notice, no code
    notice = await outbox.last(E164)
    assert notice["text"] == "This number already has a demo account. Sign in, or reset your password."
    app.services.clock.advance(61)
    await api.post("/users/code", {"phone": PHONE, "purpose": "login"}, headers=EN)
    login = await outbox.last(E164)
    assert login["text"].endswith(f"Never share it.\nFA+9qCX9VSu\n@example.com #{login['code']}")


# -- H5 pages -------------------------------------------------------------------------------------------


@gen_test
async def test_a_chinese_app_opens_chinese_pages_whatever_the_webview_says(app, api, outbox):
    session = await signed_in(api, outbox, ZH)
    # The WebView's own header says English: the ticket carries the app's language.
    exchanged = await api.get(path_of(session["h5_url"]), headers=EN)
    assert exchanged.code == 302
    page = await api.get("/h5/home", headers={"Cookie": f"demo_h5={h5_cookie(exchanged)}", **EN})
    assert page.code == 200 and html_lang(page) == "zh-CN" and page.header("Content-Language") == "zh-CN"
    assert "我的主页" in page.body.decode() and "My home" not in page.body.decode()
    assert 'data-msg-network="网络错误，请重试。"' in page.body.decode()  # the upload script's words
    assert page.header("Vary") is None and page.header("Cache-Control") == "no-store"  # not the header's choice
    langs = app.services.db.run_sync(
        lambda s: ({t.lang for t in s.scalars(select(H5Ticket))}, {h.lang for h in s.scalars(select(H5Session))})
    )
    assert langs == ({"zh-CN"}, {"zh-CN"})


@gen_test
async def test_an_english_app_opens_english_pages_in_a_chinese_webview(api, outbox):
    session = await signed_in(api, outbox, ZH)
    ticket = await api.post("/h5/ticket", token=session["token"], headers=EN)
    exchanged = await api.get(path_of(ticket.json["h5_url"]), headers=ZH)
    cookie = f"demo_h5={h5_cookie(exchanged)}"
    page = await api.get("/h5/home", headers={"Cookie": cookie, **ZH})
    assert html_lang(page) == "en" and "My home" in page.body.decode() and not CJK.search(page.body.decode())
    # Its error pages too, once the session is known: the session's language.
    xsrf = re.search(rb'name="_xsrf" value="([^"]+)"', page.body).group(1).decode()
    refused = await api.post("/h5/switch", body=f"_xsrf={xsrf}", headers={"Cookie": cookie, **ZH})
    assert refused.code == 400 and html_lang(refused) == "en" and "Request refused" in refused.body.decode()


@gen_test
async def test_error_pages_without_a_session_follow_the_webview(api, outbox):
    session = await signed_in(api, outbox, EN)
    used = path_of(session["h5_url"])
    assert (await api.get(used, headers=EN)).code == 302
    again = await api.get(used, headers=ZH)  # spent: no session to take a language from
    assert again.code == 401 and html_lang(again) == "zh-CN" and again.header("Content-Language") == "zh-CN"
    assert "请从 App 中打开此页面" in again.body.decode() and again.all("Vary") == ["Accept-Language"]
    missing = await api.get("/h5/nowhere", headers=ZH)
    assert (
        missing.code == 404
        and "页面不存在" in missing.body.decode()
        and 'data-code="not_found"' in missing.body.decode()
    )
    english = await api.get("/h5/nowhere", headers={"Accept-Language": "de"})
    assert html_lang(english) == "en" and "Page not found" in english.body.decode()


@gen_test
async def test_the_switch_question_is_in_the_language_of_the_link(api, outbox):
    mine = await signed_in(api, outbox, EN)
    exchanged = await api.get(path_of(mine["h5_url"]), headers=EN)
    cookie = h5_cookie(exchanged)
    other_code = await api.post("/users/code", {"phone": "18866669999"}, headers=ZH)
    assert other_code.code == 200
    code = await outbox.code("+8618866669999")
    other = await api.post("/users/regist", {"phone": "18866669999", "password": PASSWORD, "code": code}, headers=ZH)
    question = await api.get(path_of(other.json["h5_url"]), headers={"Cookie": f"demo_h5={cookie}", **EN})
    assert question.code == 200 and html_lang(question) == "zh-CN"
    text = question.body.decode()
    assert "此链接属于其他账号" in text and "继续以 188****8888 登录" in text and "切换到 188****9999" in text
    assert '<strong id="link-phone">188****9999</strong>' in text  # the numbers keep their elements


def test_error_bodies_are_json_in_the_contracts_shape():
    """The translated message is a plain string in the same object (the shape tests elsewhere hold)."""
    body = {"error": {"code": "invalid_field", "message": "缺少 'phone'。", "field": "phone"}}
    assert json.loads(json.dumps(body, ensure_ascii=False)) == body
