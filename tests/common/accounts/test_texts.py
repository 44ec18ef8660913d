"""demo/common/accounts/texts.py: the autofill lines of texts with a code, and their settings."""

from __future__ import annotations

import pytest

from demo.common.accounts import texts

HASH = "FA+9qCX9VSu"  # the form of Google's example


def test_the_origin_line_is_last_and_the_app_hash_line_before_it():
    words = "Your demo verification code is 123456. It expires in 5 minutes."
    both = texts.with_autofill(words, "123456", app_hash=HASH, origin="example.com")
    assert both == f"{words}\nFA+9qCX9VSu\n@example.com #123456"
    assert texts.with_autofill(words, "123456", app_hash="", origin="example.com") == f"{words}\n@example.com #123456"
    assert texts.with_autofill(words, "123456", app_hash=HASH, origin="") == f"{words}\nFA+9qCX9VSu"
    assert texts.with_autofill(words, "123456", app_hash="", origin="") == words


def parse_origin_bound(message: str) -> tuple[str, str] | None:
    """The spec's parser (wicg.github.io/sms-one-time-codes, "parse an origin-bound one-time code
    message"), written from its steps: (host, code) of the last line, or None."""
    line = message.replace("\r\n", "\n").replace("\r", "\n").split("\n")[-1]

    def token(position: int, marker: str) -> tuple[str, int] | None:
        if position >= len(line) or line[position] != marker:
            return None
        end = position + 1
        while end < len(line) and line[end] not in " \t\n\f\r":
            end += 1
        return (line[position + 1 : end], end) if end > position + 1 else None

    host = token(0, "@")
    if host is None or host[1] >= len(line) or line[host[1]] != " ":
        return None
    code = token(host[1] + 1, "#")
    return None if code is None else (host[0], code[0])


def test_a_text_with_both_lines_parses_as_an_origin_bound_code():
    text = texts.with_autofill(
        "您的 demo 验证码是 042137，5 分钟内有效。", "042137", app_hash=HASH, origin="example.com"
    )
    assert parse_origin_bound(text) == ("example.com", "042137")
    assert parse_origin_bound(texts.with_autofill("x", "1", app_hash=HASH, origin="")) is None  # off: nothing read
    assert HASH in text.split("\n")  # the SMS Retriever API looks for the hash anywhere in the text


@pytest.mark.parametrize("value", ["", "FA+9qCX9VSu", "abcdefghijk", "0123456789/"])
def test_good_app_hashes(value):
    assert texts.android_app_hash(value) == value


@pytest.mark.parametrize("value", ["FA+9qCX9VS", "FA+9qCX9VSuu", "FA+9qCX9VS=", "FA-9qCX9VSu", " FA+9qCX9VSu"])
def test_bad_app_hashes_are_refused(value):
    with pytest.raises(ValueError, match="not an app hash"):
        texts.android_app_hash(value)


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("", ""),
        ("example.com", "example.com"),
        ("Login.Example.COM", "login.example.com"),
        ("xn--fsq.example", "xn--fsq.example"),
    ],
)
def test_good_origins_are_written_in_lower_case(value, written):
    assert texts.otp_origin(value) == written


@pytest.mark.parametrize(
    "value",
    [
        "https://example.com",
        "example.com:443",
        "example.com/login",
        "example",
        "-example.com",
        "exa mple.com",
        "192.168.1.1",
        "例子.example",
        "example..com",
        "a" * 64 + ".com",
        "@example.com",
    ],
)
def test_bad_origins_are_refused(value):
    with pytest.raises(ValueError, match="not a host name"):
        texts.otp_origin(value)
