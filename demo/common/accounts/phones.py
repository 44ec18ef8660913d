"""Phone numbers: parsed and normalised to E.164 with ``phonenumbers``; only mobile numbers pass."""

from __future__ import annotations

from functools import lru_cache

import phonenumbers
from phonenumbers import PhoneNumberType

from demo.common.errors import InvalidPhone
from demo.common.i18n import N_

_MOBILE_TYPES = {PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE}


def normalize_phone(raw: str, default_region: str) -> str:
    """``18866668888`` or ``+8618866668888`` -> ``+8618866668888``; anything else -> InvalidPhone."""
    if not isinstance(raw, str) or not 3 <= len(raw) <= 32:
        raise InvalidPhone(field="phone")
    try:
        number = phonenumbers.parse(raw, default_region.upper())
    except phonenumbers.NumberParseException:
        raise InvalidPhone(field="phone") from None
    if not phonenumbers.is_valid_number(number) or phonenumbers.number_type(number) not in _MOBILE_TYPES:
        raise InvalidPhone(field="phone")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


@lru_cache(maxsize=4096)
def mask_phone(e164: str) -> str:
    """``+8618866668888`` -> ``188****8888``: the national number with its middle hidden."""
    national = str(phonenumbers.parse(e164).national_number)
    if len(national) <= 7:
        return national[:2] + "*" * (len(national) - 4) + national[-2:]
    return national[:3] + "*" * (len(national) - 7) + national[-4:]


def parse_regions(spec: str, setting: str = "sms_countries") -> frozenset[str]:
    """``"CN, us"`` -> {"CN", "US"}; a code phonenumbers does not know is a ValueError naming ``setting``."""
    regions = frozenset(part.strip().upper() for part in spec.split(",") if part.strip())
    unknown = sorted(regions - phonenumbers.SUPPORTED_REGIONS)
    if unknown or not regions:
        raise ValueError(f"{setting}: not ISO 3166 region codes: {', '.join(unknown) or spec!r}")
    return regions


def require_region(e164: str, regions: frozenset[str]) -> None:
    """InvalidPhone unless ``e164`` belongs to one of ``regions``. Non-geographic numbers (satellite,
    +881; international services) have region "001", which no list can name: they are never served."""
    number = phonenumbers.parse(e164)
    region = phonenumbers.region_code_for_number(number) or phonenumbers.UNKNOWN_REGION
    if region not in regions:
        where = region if region in phonenumbers.SUPPORTED_REGIONS else "non-geographic numbers"
        raise InvalidPhone(
            N_("Texts are not offered to this country (+{calling_code}, {region})."),
            field="phone",
            params={"calling_code": number.country_code, "region": where},
        )
