"""sms/providers/templates.py: the template settings and which template carries a text."""

from __future__ import annotations

import pytest

from demo.common.sms.providers.templates import KEYS, Templates, template_key

ALL = ",".join(f"{key}={n}" for n, key in enumerate(KEYS))


def test_a_template_is_picked_by_key_and_language_else_the_default_language():
    templates = Templates.parse("s", f"{ALL}, regist.zh-CN=900, regist.EN-gb=901", "en")
    assert templates.pick("regist", "zh-CN") == "900"
    assert templates.pick("regist", "zh-cn") == "900"  # tags compare without case
    assert templates.pick("regist", "en-GB") == "901"
    assert templates.pick("regist", "fr") == "0"  # no French one: the default language's
    assert templates.pick("regist", None) == "0"
    assert templates.pick("reset", "zh-CN") == "1"


def test_a_bare_key_is_the_default_languages_and_an_explicit_one_counts_too():
    spec = ",".join(f"{key}.zh-CN={n}" for n, key in enumerate(KEYS))
    assert Templates.parse("s", spec, "zh-CN").pick("delete", "en") == str(KEYS.index("delete"))


def test_a_key_without_a_default_language_template_is_named_at_parse_time():
    spec = ",".join(f"{key}={n}" for n, key in enumerate(KEYS) if key not in ("login", "phone_notice"))
    with pytest.raises(ValueError, match=r"sms_x_templates: no template for login, phone_notice in .*'en'"):
        Templates.parse("sms_x_templates", spec + ",login.zh-CN=5", "en")
    # without SMS login, its template is not needed
    keys = tuple(k for k in KEYS if k != "login")
    with pytest.raises(ValueError, match="phone_notice"):
        Templates.parse("s", spec, "en", keys)
    assert Templates.parse("s", spec + ",phone_notice=7", "en", keys).pick("phone_notice", None) == "7"


@pytest.mark.parametrize("entry", ["regist", "regist=", "=1", "signup=1", "regist.=1", "regist.e n=1", "regist.1=2"])
def test_a_bad_entry_is_named(entry):
    with pytest.raises(ValueError, match=f"s: bad entry {entry!r}"):
        Templates.parse("s", f"{ALL},{entry}", "en")


@pytest.mark.parametrize(
    ("purpose", "has_code", "key"),
    [
        ("regist", True, "regist"),
        ("regist", False, "regist_notice"),  # a registered number asked to register
        ("phone", True, "phone"),
        ("phone", False, "phone_taken"),  # a registered number asked to have an account moved to it
        ("phone_notice", False, "phone_notice"),  # the old number of an account that moved away
        ("delete", True, "delete"),
    ],
)
def test_template_key(purpose, has_code, key):
    assert template_key(purpose, has_code) == key
