"""Babel's extractor for Tornado templates (babel.cfg): the msgids of ``_("...")`` in demo/templates.

Babel's Python extractor reads Python; a template is HTML with Python inside ``{{ }}`` and ``{% %}``, so
this one finds each ``_(`` call in those tags and reads its first argument, a string literal (or
adjacent literals, joined as Python joins them). A call whose argument is not a literal is an error:
its message could never be in the catalogue. Used by ``make messages`` and the catalogue tests only.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Collection, Iterator, Mapping
from typing import IO, Any

_TAG = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.DOTALL)
_CALL = re.compile(r"(?<![\w.])_\(\s*")
_LITERALS = re.compile(r"""(?:(?:"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')\s*)+""")


def extract_tornado(
    fileobj: IO[bytes], keywords: Mapping[str, Any], comment_tags: Collection[str], options: Mapping[str, Any]
) -> Iterator[tuple[int, str, str, list[str]]]:
    """Babel's extractor protocol: (line, function, message, translator comments) per ``_("...")``."""
    encoding = str(options.get("encoding", "utf-8"))
    source = fileobj.read().decode(encoding)
    for tag in _TAG.finditer(source):
        for call in _CALL.finditer(tag.group()):
            literals = _LITERALS.match(tag.group(), call.end())
            if literals is None:
                line = source.count("\n", 0, tag.start()) + 1
                raise ValueError(f"line {line}: _() of something that is not a string literal")
            message = ast.literal_eval(literals.group().strip())
            yield source.count("\n", 0, tag.start() + call.start()) + 1, "_", message, []
