"""Number formats and cell kinds: what a spreadsheet shows for a number, and when that is a key.

A key typed into a spreadsheet often becomes a number, a date or a boolean. A number cell is
accepted only where the text the sheet shows is an exact, unambiguous key: an integer below
2^53 in General format, or in a format made only of zeros (``000000``: the shown text, leading
zeros and all, is the key). Every other cell is refused with a :class:`Cause`.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Final


class Kind(IntEnum):
    """What a number format shows."""

    GENERAL = 0  # General, Text (@) or unknown to the file: the number as is
    ZEROS = 1  # only zeros: the integer padded to that width
    DATE = 2
    TIME = 3
    PERCENT = 4
    CURRENCY = 5
    SCIENTIFIC = 6
    BOOLEAN = 7
    OTHER = 8  # decimals, thousands separators, fractions, literal text: not a key


@dataclass(frozen=True)
class Format:
    kind: Kind
    width: int = 0  # for ZEROS: how many digits the format shows at least


GENERAL: Final = Format(Kind.GENERAL)

# Built-in format ids (ECMA-376 18.8.30); ids not listed are locale-specific and unknown.
_BUILT_IN: Final[dict[int, Format]] = {
    0: GENERAL,
    1: Format(Kind.ZEROS, 1),
    2: Format(Kind.OTHER),
    3: Format(Kind.OTHER),
    4: Format(Kind.OTHER),
    5: Format(Kind.CURRENCY),
    6: Format(Kind.CURRENCY),
    7: Format(Kind.CURRENCY),
    8: Format(Kind.CURRENCY),
    9: Format(Kind.PERCENT),
    10: Format(Kind.PERCENT),
    11: Format(Kind.SCIENTIFIC),
    12: Format(Kind.OTHER),
    13: Format(Kind.OTHER),
    **{i: Format(Kind.DATE) for i in (14, 15, 16, 17, 22, *range(27, 37), *range(50, 59))},
    **{i: Format(Kind.TIME) for i in (18, 19, 20, 21, 45, 46, 47)},
    **{i: Format(Kind.CURRENCY) for i in range(37, 45)},
    48: Format(Kind.SCIENTIFIC),
    49: GENERAL,  # @ Text: a number in it shows as General
}

_QUOTED: Final = re.compile(r'"[^"]*"|\\.|_.|\*.')
_CURRENCY_TAG: Final = re.compile(r"\[\$([^\]-]*)(?:-[0-9A-Fa-f]*)?\]")
_BRACKETS: Final = re.compile(r"\[[^\]]*\]")
_LITERAL: Final = re.compile(r'"([^"]*)"|\\(.)')
_CURRENCY_SIGNS: Final = frozenset("$€£¥¤₹₽₩")


def built_in(number_format_id: int) -> Format:
    """A built-in format id's kind; OTHER for ids this table does not know."""
    return _BUILT_IN.get(number_format_id, Format(Kind.OTHER))


def classify(code: str) -> Format:
    """What a number format code shows (only its first section, the one for positive numbers)."""
    if code.strip().casefold() in ("general", "@", ""):
        return GENERAL
    if '"TRUE"' in code.upper() and '"FALSE"' in code.upper():
        return Format(Kind.BOOLEAN)
    if _shown_another_way(code):
        return Format(Kind.OTHER)
    currency = any(sign for sign in _CURRENCY_TAG.findall(code))
    section = _first_section(code)
    bare = _BRACKETS.sub("", _QUOTED.sub("", section))
    literals = "".join(a + b for a, b in _LITERAL.findall(section))
    folded = bare.casefold()
    if folded.strip() in ("general", "@") and not literals:
        return GENERAL
    if "e+" in folded or "e-" in folded:
        return Format(Kind.SCIENTIFIC)
    if any(ch in folded for ch in "ymdhs") or re.search(r"\[(h|m|s)+\]", section, re.I):
        # A lone "m" is a month unless hours or seconds make it minutes.
        minutes = "h" in folded or "s" in folded
        has_date = any(ch in folded for ch in "yd") or ("m" in folded and not minutes)
        return Format(Kind.DATE if has_date else Kind.TIME)
    if "%" in bare:
        return Format(Kind.PERCENT)
    if currency or any(ch in _CURRENCY_SIGNS for ch in bare + literals):
        return Format(Kind.CURRENCY)
    if bare and set(bare) == {"0"} and not literals:
        return Format(Kind.ZEROS, len(bare))
    return Format(Kind.OTHER)


def _first_section(code: str) -> str:
    """The code up to its first unquoted ``;``."""
    return _sections(code)[0]


def _sections(code: str) -> list[str]:
    """The code's sections (positive; negative; zero; text), split at unquoted ``;``."""
    sections: list[str] = []
    quoted = False
    escaped = False
    start = 0
    for at, ch in enumerate(code):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            sections.append(code[start:at])
            start = at + 1
    return [*sections, code[start:]]


#: What makes the first section not the whole story: a condition (``[>=1000]``) picks another
#: section; a fill (``*X``) repeats a character; ``[DBNum1]``/``[NatNum1]`` draw the digits in
#: another script.
_NOT_PLAIN: Final = re.compile(r"\[[<>=]|\[(?:dbnum|natnum)|\*", re.IGNORECASE)
_LITERAL_TEXT: Final = re.compile(r'"[^"]*"|\\.')


def _shown_another_way(code: str) -> bool:
    """Whether some number would show otherwise than the first section says: a condition, a
    fill, another script, or a zero section unlike the first (``0;-0;"-"`` shows 0 as -)."""
    unquoted = _LITERAL_TEXT.sub("", code)  # fills (*X) stay: they are what is looked for
    if _NOT_PLAIN.search(unquoted):
        return True
    sections = _sections(code)
    return len(sections) >= 3 and sections[2].strip() != sections[0].strip()


class Cause(IntEnum):
    """Why a cell is not a key. 0 is a usable cell."""

    OK = 0
    FLOAT = 1
    SCIENTIFIC = 2
    DATE = 3
    TIME = 4
    BOOLEAN = 5
    PERCENT = 6
    CURRENCY = 7
    FORMAT = 8
    ERROR = 9
    FORMULA = 10
    CP1252 = 11
    DISAGREE = 12


CURE: Final = "format the column as Text and export again"

#: Each cause's text (after "column 'X': "); the cell's shown text or value follows in brackets.
CAUSE_TEXT: Final[dict[Cause, str]] = {
    Cause.FLOAT: "digits lost to floating point: the spreadsheet stored this key as a number "
    "too long to hold exactly",
    Cause.SCIENTIFIC: "the spreadsheet stored this key as a number in scientific notation, "
    "which has lost digits",
    Cause.DATE: "the spreadsheet turned this key into a date",
    Cause.TIME: "the spreadsheet turned this key into a time",
    Cause.BOOLEAN: "the spreadsheet turned this key into a boolean (TRUE/FALSE)",
    Cause.PERCENT: "the spreadsheet turned this key into a percentage",
    Cause.CURRENCY: "the spreadsheet turned this key into a currency amount",
    Cause.FORMAT: "the spreadsheet shows this number in a format that is not a key "
    "(decimals, separators or text around it)",
    Cause.ERROR: "the cell holds an error value, not a key",
    Cause.FORMULA: "the cell holds a formula: its result is not a key",
    Cause.CP1252: "characters outside Windows-1252 were replaced by ? when the file was saved",
    Cause.DISAGREE: "the workbook's cell data and its values disagree, so what it shows is unknown",
}

#: Below this, every integer is a double exactly; from it on, neighbours collapse.
EXACT_LIMIT: Final = 2**53


def shown_number(value: float | int, form: Format) -> tuple[Cause, str]:
    """The text a number cell shows in ``form`` when that text is a key, else the cause."""
    kind = form.kind
    if kind in _KIND_CAUSE:
        return _KIND_CAUSE[kind], _plain(value)
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return Cause.FLOAT, _plain(value)
    number = int(value)
    if not 0 <= number < EXACT_LIMIT:
        return (Cause.FLOAT if number >= 0 else Cause.FORMAT), _plain(value)
    text = str(number)
    if kind is Kind.ZEROS:
        return Cause.OK, text.zfill(form.width)
    return Cause.OK, text


_KIND_CAUSE: Final[dict[Kind, Cause]] = {
    Kind.DATE: Cause.DATE,
    Kind.TIME: Cause.TIME,
    Kind.PERCENT: Cause.PERCENT,
    Kind.CURRENCY: Cause.CURRENCY,
    Kind.SCIENTIFIC: Cause.SCIENTIFIC,
    Kind.BOOLEAN: Cause.BOOLEAN,
    Kind.OTHER: Cause.FORMAT,
}


def _plain(value: object) -> str:
    if isinstance(value, float):
        return format(value, ".15g") if math.isfinite(value) else str(value)
    return str(value)


def value_cause(value: object) -> Cause:
    """For a value whose format is unknown (.xls, .xlsb, .ods): refuse what is surely no key."""
    if isinstance(value, bool):
        return Cause.BOOLEAN
    if isinstance(value, dt.datetime | dt.date):
        return Cause.DATE
    if isinstance(value, dt.time | dt.timedelta):
        return Cause.TIME
    if isinstance(value, int | float):
        return shown_number(value, GENERAL)[0]
    return Cause.OK
