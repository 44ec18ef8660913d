"""demo/common/i18n.py: which language a client reads, and the catalogues behind it."""

from __future__ import annotations

import shutil

import pytest

from demo.common.i18n import LOCALE_DIR, Languages, match_language, parse_accept_language

SUPPORTED = ("en", "zh-CN")


def test_accept_language_is_read_by_quality_then_order():
    assert parse_accept_language("zh-CN,zh;q=0.9,en;q=0.8") == ["zh-CN", "zh", "en"]
    assert parse_accept_language("en;q=0.5, zh-CN") == ["zh-CN", "en"]
    assert parse_accept_language("fr, de ; q=0.7, en;q=0.7") == ["fr", "de", "en"]  # ties keep their order
    # Not acceptable (q=0), malformed q-values and tags are dropped, not guessed at.
    assert parse_accept_language("zh-CN;q=0, en;q=abc, x y, ;q=1, *;q=0.1, en-GB;q=1.5") == ["*"]
    assert parse_accept_language("") == []


@pytest.mark.parametrize(
    ("wanted", "served"),
    [
        ("zh-CN", "zh-CN"),
        ("ZH-cn", "zh-CN"),
        ("zh", "zh-CN"),  # Android's second choice
        ("zh-Hans-CN", "zh-CN"),  # iOS: three subtags, which Tornado's get_closest skips
        ("zh-Hans", "zh-CN"),
        ("zh-SG", "zh-CN"),
        ("zh-TW", None),  # Traditional characters: not served Simplified as if it were the same
        ("zh-Hant-HK", None),
        ("en-GB", "en"),
        ("en", "en"),
        ("fr", None),
    ],
)
def test_a_language_is_served_by_the_same_tag_or_one_of_its_language_and_script(wanted, served):
    assert match_language(wanted, SUPPORTED) == served


def test_negotiation_falls_back_to_the_default_language():
    languages = Languages()
    assert languages.supported == SUPPORTED and languages.default == "en"
    assert languages.negotiate("zh-CN,zh;q=0.9") == "zh-CN"
    assert languages.negotiate("zh-Hans-CN;q=1, en-CN;q=0.9") == "zh-CN"
    assert languages.negotiate("fr-FR, en;q=0.1") == "en"
    assert languages.negotiate("en;q=0.5, zh;q=0.6") == "zh-CN"  # q-values, not the order, decide
    assert languages.negotiate("fr, *;q=0.5, zh-CN;q=0.1") == "en"  # "anything else" before zh-CN: the default
    for unknown in (None, "", "fr", "zh-TW", "garbage;;;"):
        assert languages.negotiate(unknown) == "en", unknown
    chinese = Languages("zh-CN")
    assert chinese.default == "zh-CN" and chinese.negotiate("fr") == "zh-CN" and chinese.negotiate("en-US") == "en"


def test_a_stored_language_is_picked_as_a_supported_one():
    languages = Languages("zh-CN")
    assert languages.pick(None) == "zh-CN"  # rows written before languages were
    assert languages.pick("en") == "en" and languages.pick("zh") == "zh-CN" and languages.pick("fr") == "zh-CN"


def test_the_default_language_must_have_a_catalogue():
    for bad in ("fr", "zh", "en-US", "", "zh_CN", "e n"):
        with pytest.raises(ValueError, match="not one of the languages"):
            Languages(bad)
    assert Languages("zh-cn").default == "zh-CN"


def test_texts_are_translated_with_their_values():
    languages = Languages()
    assert languages.translate("zh-CN", "'{name}' is required.", {"name": "phone"}) == "缺少 'phone'。"
    assert languages.translate("en", "'{name}' is required.", {"name": "phone"}) == "'phone' is required."
    assert languages.translate("zh-CN", "not in any catalogue") == "not in any catalogue"
    assert languages.gettext(None, "Not found.") == "Not found."


def test_a_third_language_is_a_catalogue_not_code(tmp_path):
    """A compiled catalogue in a new folder is a supported language: no code names the languages."""
    shutil.copytree(LOCALE_DIR / "zh_CN", tmp_path / "zh_TW")
    languages = Languages(directory=tmp_path)
    assert languages.supported == ("en", "zh-TW")
    assert languages.negotiate("zh-Hant-TW, en;q=0.5") == "zh-TW" and languages.negotiate("zh-CN") == "en"
    assert languages.gettext("zh-TW", "Not found.") == "未找到。"
