"""The catalogues under demo/locale, checked against the code: the template has every msgid the code and
templates mark (and no other), each language translates every one of them, with the same placeholders,
and the committed .mo files are their .po files compiled (the server reads only the .mo files).

A failure here means: run ``make messages``, translate what it reports as untranslated or fuzzy, run it
again and commit demo/locale.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po

from demo.common.i18n import DOMAIN, LOCALE_DIR, catalogue_tags, folder_of
from demo.locale.extract import extract_tornado

ROOT = LOCALE_DIR.parent.parent
POT = LOCALE_DIR / f"{DOMAIN}.pot"
LANGUAGES = [tag for tag in catalogue_tags() if tag != "en"]
PLACEHOLDER = re.compile(r"\{[^{}]*\}|%\(\w+\)[sd]|%[sd]")


def po_path(tag: str) -> Path:
    return LOCALE_DIR / folder_of(tag) / "LC_MESSAGES" / f"{DOMAIN}.po"


def read(path: Path) -> Catalog:
    with path.open("rb") as file:
        return read_po(file)


def msgids(catalog: Catalog) -> set[str]:
    return {str(message.id) for message in catalog if message.id}


def extracted() -> set[str]:
    """What ``make messages`` extracts now, with the same mapping (babel.cfg) and keywords."""
    with (ROOT / "babel.cfg").open() as cfg:
        method_map, options_map = parse_mapping_cfg(cfg)
    keywords = {"_": None, "N_": None, "gettext": None}
    found = extract_from_dir(str(ROOT), method_map, options_map, keywords=keywords)
    return {message for _, _, message, _, _ in found if isinstance(message, str)}


def test_there_is_a_catalogue_besides_the_source_language():
    assert "zh-CN" in LANGUAGES and POT.is_file()


def test_the_template_holds_exactly_what_the_code_marks():
    """The .pot is current: a message added, changed or removed in the code or the templates without
    ``make messages`` fails here."""
    now, committed = extracted(), msgids(read(POT))
    assert now - committed == set(), "marked in the code but missing from demo.pot: run make messages"
    assert committed - now == set(), "in demo.pot but no longer in the code: run make messages"
    # The extraction reads all three places the words come from.
    assert {"Not found.", "My home", "Your demo verification code is {code}. It expires in {minutes} minutes."} <= now


@pytest.mark.parametrize("tag", LANGUAGES)
def test_every_message_is_translated(tag):
    """Each catalogue has every msgid of the template, each with a translation that is neither empty nor
    fuzzy (a fuzzy one is a guess by make messages, and gettext would not use it anyway)."""
    catalog = read(po_path(tag))
    live = [message for message in catalog if message.id]
    assert msgids(catalog) == msgids(read(POT)), "the catalogue is behind demo.pot: run make messages"
    untranslated = [message.id for message in live if not message.string]
    fuzzy = [message.id for message in live if message.fuzzy]
    assert not untranslated, f"{tag}: untranslated {untranslated}"
    assert not fuzzy, f"{tag}: fuzzy (check, then drop the flag) {fuzzy}"


@pytest.mark.parametrize("tag", LANGUAGES)
def test_translations_keep_the_placeholders(tag):
    """A placeholder lost, renamed or added in a translation would fail when the text is filled in."""
    wrong = [
        (message.id, message.string)
        for message in read(po_path(tag))
        if message.id
        and sorted(PLACEHOLDER.findall(str(message.id))) != sorted(PLACEHOLDER.findall(str(message.string)))
    ]
    assert not wrong, wrong


@pytest.mark.parametrize("tag", LANGUAGES)
def test_the_committed_mo_is_its_po_compiled(tag):
    """``pip install`` and ``make run`` compile nothing: the .mo must be what make messages makes of the .po."""
    compiled = io.BytesIO()
    write_mo(compiled, read(po_path(tag)))
    assert compiled.getvalue() == po_path(tag).with_suffix(".mo").read_bytes(), "run make messages"


def test_the_template_extractor_reads_tornado_tags():
    template = b"""<h1>{{ _("Hello") }}</h1>
<p>{% raw xhtml_escape(_('It\\'s {name}')).format(name=x) %}</p>
{{ _("one" "line") }} {{ gettext_like("no") }} {{ not_(x) }}"""
    found = list(extract_tornado(io.BytesIO(template), {}, [], {}))
    assert found == [(1, "_", "Hello", []), (2, "_", "It's {name}", []), (3, "_", "oneline", [])]
    with pytest.raises(ValueError, match="line 1"):
        list(extract_tornado(io.BytesIO(b"{{ _(title) }}"), {}, [], {}))


def test_make_messages_runs_and_leaves_the_committed_catalogues_as_they_are(tmp_path: Path):
    """The README's ``make messages``, run on a copy of the tree (with this venv): it succeeds, and on
    a tree whose catalogues are current it changes no message and no translation."""
    copy, started = tmp_path / "tree", time.time()
    shutil.copytree(ROOT / "demo", copy / "demo", ignore=shutil.ignore_patterns("__pycache__", "data", "log"))
    for name in ("Makefile", "babel.cfg"):
        shutil.copy(ROOT / name, copy / name)
    (copy / ".venv").symlink_to(Path(sys.executable).parent.parent)
    done = subprocess.run(
        ["make", "-o", ".venv/.installed-stamp", "messages"], cwd=copy, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    made = copy / "demo" / "locale"
    assert msgids(read(made / POT.name)) == msgids(read(POT))
    for tag in LANGUAGES:
        ours = {str(m.id): m.string for m in read(po_path(tag)) if m.id}
        theirs = read(made / folder_of(tag) / "LC_MESSAGES" / f"{DOMAIN}.po")
        assert {str(m.id): m.string for m in theirs if m.id} == ours
        assert not [m.id for m in theirs if m.id and m.fuzzy]
        assert (made / folder_of(tag) / "LC_MESSAGES" / f"{DOMAIN}.mo").stat().st_mtime >= started  # compiled
