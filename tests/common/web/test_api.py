"""JSON fields (common/web/api.py ``text_field``), without HTTP; the JSON body's edges are in test_http_edges.py."""

from __future__ import annotations

import json

import pytest

from demo.common.errors import InvalidField
from demo.common.web.api import text_field


def test_a_present_string_is_returned_as_sent():
    assert text_field({"phone": " 188 "}, "phone") == " 188 "  # never stripped here


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "'phone' is required."),
        ({"phone": None}, "'phone' must be a string."),
        ({"phone": 18866668888}, "'phone' must be a string."),
        ({"phone": "1" * 33}, "'phone' is too long."),
        (json.loads('{"phone": "\\ud800"}'), "'phone' is not valid Unicode text."),
    ],
)
def test_a_bad_field_is_invalid_field_naming_it(body, message):
    with pytest.raises(InvalidField) as refused:
        text_field(body, "phone", max_length=32)
    assert refused.value.message == message and refused.value.field == "phone"


def test_a_field_with_a_default_is_optional_but_not_nullable():
    assert text_field({}, "purpose", default="regist") == "regist"
    assert text_field({"purpose": "reset"}, "purpose", default="regist") == "reset"
    with pytest.raises(InvalidField, match="must be a string"):
        text_field({"purpose": None}, "purpose", default="regist")
