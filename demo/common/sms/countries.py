"""The country of a phone prefix, for the SMS statistics (``demo.admin sms``) and the cost guard's
metrics: phones are E.164, so a prefix's first digits hold its calling code whole."""

from __future__ import annotations

import phonenumbers


def calling_code(prefix: str) -> int | None:
    """The calling code an E.164 prefix (``+`` and at least 3 digits, or all a shorter number has)
    starts with, or None. Calling codes are 1 to 3 digits and none is the start of another."""
    for length in (1, 2, 3):
        digits = prefix[1 : 1 + length]
        code = int(digits) if digits.isdigit() and len(digits) == length else 0
        if code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            return code
    return None


def country(code: int | None) -> str:
    """The ISO region of a calling code (codes shared by several, +1 and +7, give their main one);
    ``??`` for none."""
    return "??" if code is None else phonenumbers.region_code_for_country_code(code)
