"""Tornado's locales over the process's catalogues (common/i18n.py): the pages' ``locale`` and ``_``.

Made once per application from the catalogues ``Languages`` already loaded, so a page's translation is
a dict look-up and no module-wide state of ``tornado.locale`` is touched (its ``load_gettext_translations``
would read the same files into globals that every application of the process shares).
"""

from __future__ import annotations

import tornado.locale

from demo.common.i18n import Languages, folder_of


def tornado_locales(languages: Languages) -> dict[str, tornado.locale.Locale]:
    """Supported tag -> Tornado's gettext locale of its catalogue (the source language's translates
    nothing)."""
    return {
        tag: tornado.locale.GettextLocale(folder_of(tag), catalogue) for tag, catalogue in languages.catalogues.items()
    }
