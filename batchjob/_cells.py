"""Spreadsheet-safe text cells (CSV/formula injection, OWASP).

A report is opened in Excel by people. A key such as ``=HYPERLINK(...)`` must show as text, not
run. We prefix such cells with one apostrophe, and undo exactly that when our own report is read
back as input, so a failed-rows rerun sends the original key.

The mapping is a bijection: a value that already starts with apostrophes followed by a trigger
character gets one more apostrophe, and reading removes one. So no key is ever changed by a round
trip, even one that really starts with an apostrophe.
"""

from __future__ import annotations

import re

# Characters that make Excel, LibreOffice or Google Sheets treat a cell as a formula.
_TRIGGERS = "=+-@\t\r"
_NEEDS_ESCAPE = re.compile(r"'*[=+\-@\t\r]")
_ESCAPED = re.compile(r"'+[=+\-@\t\r]")


def escape_cell(value: str) -> str:
    """Return ``value`` as it should be written to a CSV a person may open in a spreadsheet."""
    if value and _NEEDS_ESCAPE.match(value):
        return "'" + value
    return value


def unescape_cell(value: str) -> str:
    """Invert :func:`escape_cell` for a cell read from a report this tool wrote."""
    if value.startswith("'") and _ESCAPED.match(value):
        return value[1:]
    return value


__all__ = ["escape_cell", "unescape_cell"]
