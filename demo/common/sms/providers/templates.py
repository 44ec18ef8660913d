"""Which registered template carries a text, per provider: ``sms_<provider>_templates`` settings.

Providers send only texts made from templates registered (and approved) with them in advance, so a
text is sent as a template id plus its parameters, never as our own wording. A template is named by
a key (what the text is for) and a language (BCP 47, e.g. ``zh-CN``):

    sms_tencent_templates = "regist.zh-CN=1234567, regist.en=1234568, regist_notice=1234570, ..."

A key without ``.<language>`` is the default language's. A text in a language with no template of
its key falls back to the default language's; every key must have that one (checked when the
settings load, so a missing template stops the start instead of failing texts later).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# What each text is for, by the outbox row's purpose and whether it carries a code: the codes, then the
# notices that carry none (a registered number asked to register, or to have an account moved to it;
# the old number of an account that moved away).
CODE_KEYS = ("regist", "reset", "login", "phone", "delete")
NOTICE_KEYS = ("regist_notice", "phone_taken", "phone_notice")
KEYS = CODE_KEYS + NOTICE_KEYS
_LANG = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*")  # a BCP 47 tag, loosely: language[-region...]


def template_key(purpose: str, has_code: bool) -> str:
    """The template key of an outbox row: its purpose, or the notice sent instead of a code."""
    if has_code or purpose.endswith("_notice"):
        return purpose
    return {"regist": "regist_notice", "phone": "phone_taken"}.get(purpose, f"{purpose}_notice")


@dataclass(frozen=True)
class Templates:
    """Template ids by (key, lower-cased language) and the default language."""

    ids: dict[tuple[str, str], str]
    default_language: str

    @classmethod
    def parse(cls, setting: str, spec: str, default_language: str, keys: tuple[str, ...] = KEYS) -> Templates:
        """ValueError naming ``setting`` for a bad entry, or a key of ``keys`` with no template in the
        default language."""
        default = default_language.lower()
        ids: dict[tuple[str, str], str] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, equals, template = (part.strip() for part in item.partition("="))
            key, dot, lang = name.partition(".")
            if not (equals and template) or key not in KEYS or (dot and not _LANG.fullmatch(lang)):
                raise ValueError(
                    f"{setting}: bad entry {item!r} (want key[.language]=template id; keys: {', '.join(KEYS)})"
                )
            ids[(key, (lang or default).lower())] = template
        missing = [key for key in keys if (key, default) not in ids]
        if missing:
            raise ValueError(
                f"{setting}: no template for {', '.join(missing)} in the default language {default_language!r}"
            )
        return cls(ids, default)

    def pick(self, key: str, lang: str | None) -> str:
        """The template id of ``key`` in ``lang``, else in the default language (KeyError: none)."""
        found = self.ids.get((key, (lang or self.default_language).lower()))
        return found if found is not None else self.ids[(key, self.default_language)]
