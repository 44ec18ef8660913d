"""Languages: the gettext catalogues of demo/locale, which one a client reads, and texts in it.

Plain Python (stdlib ``gettext``): SMS texts are written by the rules, which know nothing of Tornado;
the web base (web/locale.py) gives the pages and error messages Tornado's locales over the same files.

Languages are BCP 47 tags ("en", "zh-CN"), as stored (sms_outbox.lang, h5_tickets.lang, ...) and
exchanged (Accept-Language, Content-Language); a catalogue's folder has gettext's spelling
(demo/locale/zh_CN). English is the language of the source, every msgid, so it needs no catalogue;
any other language is supported once its compiled catalogue is there: a third language is a .po
file (README, "Adding a language"), not code.
"""

from __future__ import annotations

import gettext
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import cachetools

from demo.common.infra.caches import Cache

LOCALE_DIR = Path(__file__).resolve().parent.parent / "locale"
DOMAIN = "demo"
SOURCE_LANGUAGE = "en"
# Chinese regions whose readers use Traditional characters when the tag names no script (CLDR's
# likely subtags): zh-TW is not served Simplified text as if it were zh-CN's.
_TRADITIONAL_REGIONS = frozenset({"tw", "hk", "mo"})
_TAG = re.compile(r"^[A-Za-z]{1,8}(-[A-Za-z0-9]{1,8})*$")


def N_(message: str) -> str:
    """Marks ``message`` for the catalogue without translating it: the text is chosen where no request
    is known (a domain error, a page title), and translated where its reader is (web/errors.py)."""
    return message


def tag_of(folder: str) -> str:
    """gettext's spelling of a language (a catalogue's folder, ``zh_CN``) -> its BCP 47 tag (``zh-CN``)."""
    return folder.replace("_", "-")


def folder_of(tag: str) -> str:
    """A BCP 47 tag (``zh-CN``) -> gettext's spelling (``zh_CN``): the folder of its catalogue."""
    return tag.replace("-", "_")


def catalogue_tags(directory: Path = LOCALE_DIR) -> list[str]:
    """The languages whose compiled catalogue is in ``directory`` (``<ll_CC>/LC_MESSAGES/demo.mo``)."""
    return sorted(tag_of(mo.parent.parent.name) for mo in directory.glob(f"*/LC_MESSAGES/{DOMAIN}.mo"))


def parse_accept_language(header: str) -> list[str]:
    """The language ranges of an Accept-Language header, most wanted first (RFC 9110 12.5.4): q-values
    honoured, ties in the header's order, ``q=0`` (not acceptable) and malformed entries dropped."""
    ranges: list[tuple[float, int, str]] = []
    for index, entry in enumerate(header.split(",")):
        name, _, params = entry.strip().partition(";")
        name, quality = name.strip(), 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = -1.0
        if (name == "*" or _TAG.match(name)) and 0 < quality <= 1:
            ranges.append((-quality, index, name))
    return [name for _, _, name in sorted(ranges)]


def _script(subtags: list[str]) -> str | None:
    """The script a (lower-cased, split) tag is written in, where it matters for matching: Chinese."""
    if len(subtags) > 1 and len(subtags[1]) == 4:
        return subtags[1]
    if subtags[0] == "zh":
        return "hant" if any(s in _TRADITIONAL_REGIONS for s in subtags[1:]) else "hans"
    return None


def match_language(wanted: str, supported: Iterable[str]) -> str | None:
    """The supported tag that serves a client asking for ``wanted``: the same tag, else one of the same
    language (and script): "zh", "zh-Hans-CN" (iOS) and "zh-SG" get zh-CN, "en-GB" gets en; None when
    there is none. Tornado's get_closest would skip "zh-Hans-CN" (three subtags) and "zh" (no region)."""
    wanted_subtags = wanted.lower().split("-")
    candidates = list(supported)
    for tag in candidates:
        if tag.lower() == wanted.lower():
            return tag
    for tag in candidates:
        subtags = tag.lower().split("-")
        if subtags[0] == wanted_subtags[0] and _script(subtags) == _script(wanted_subtags):
            return tag
    return None


class Languages:
    """The supported languages and their catalogues, loaded once per process; then a translation is
    a dict look-up, and choosing the language of an Accept-Language header one more (remembered)."""

    def __init__(self, default: str = SOURCE_LANGUAGE, directory: Path = LOCALE_DIR) -> None:
        """ValueError when ``default`` is not one of the supported languages."""
        self.directory = directory
        self.catalogues: dict[str, gettext.NullTranslations] = {SOURCE_LANGUAGE: gettext.NullTranslations()}
        for tag in catalogue_tags(directory):
            with (directory / folder_of(tag) / "LC_MESSAGES" / f"{DOMAIN}.mo").open("rb") as mo:
                self.catalogues[tag] = gettext.GNUTranslations(mo)
        self.supported = tuple(sorted(self.catalogues))
        chosen = match_language(default, self.supported) if _TAG.match(default) else None
        if chosen is None or chosen.lower() != default.lower():
            raise ValueError(f"{default!r} is not one of the languages with a catalogue: {', '.join(self.supported)}")
        self.default = chosen
        # Accept-Language headers repeat (one per app build and device language): each is parsed once.
        self._chosen: Cache[str, str] = Cache(cachetools.LRUCache(maxsize=1024))

    def pick(self, lang: str | None) -> str:
        """A stored or given language as a supported tag: itself, its closest supported one, or the
        default (None, as rows written before languages were, or a language no longer supported)."""
        if lang is None or lang in self.catalogues:
            return lang or self.default
        return match_language(lang, self.supported) or self.default

    def negotiate(self, accept_language: str | None) -> str:
        """The supported language a client with this Accept-Language header reads; the default without
        one or when it names none of them."""
        if not accept_language:
            return self.default
        chosen = self._chosen.get(accept_language)
        if chosen is None:
            chosen = self.default
            for wanted in parse_accept_language(accept_language):
                if wanted == "*":
                    break  # "any other": the default serves
                found = match_language(wanted, self.supported)
                if found is not None:
                    chosen = found
                    break
            self._chosen.put(accept_language, chosen)
        return chosen

    def gettext(self, lang: str | None, message: str) -> str:
        """``message`` (a msgid) in ``lang`` (a supported tag; None: the default); untranslated, as is."""
        return self.catalogues.get(lang or self.default, self.catalogues[SOURCE_LANGUAGE]).gettext(message)

    def translate(self, lang: str | None, message: str, params: Mapping[str, object] | None = None) -> str:
        """``message`` in ``lang`` with its ``{name}`` placeholders filled from ``params``."""
        text = self.gettext(lang, message)
        return text.format_map(params) if params else text
