"""Constants every reader shares: the frame's columns, the accepted file types, the key
length limit, and the byte patterns used to recognise files.
"""

from __future__ import annotations

import codecs
import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Final

import pandas as pd

from batchjob.read._findings import ReadSummary

pa: Any = importlib.import_module("pyarrow")
pa_csv: Any = importlib.import_module("pyarrow.csv")
pa_compute: Any = importlib.import_module("pyarrow.compute")

#: The frame's columns; with identity columns asked for, ``identity`` follows (see Inputs).
FRAME_COLUMNS: Final = ("event_id", "order_ticket_key", "source_file", "source_row", "problem")

CSV_SUFFIXES: Final = frozenset({".csv", ".tsv", ".txt"})
EXCEL_SUFFIXES: Final = frozenset({".xlsx", ".xlsm", ".xlsb", ".xls", ".ods"})
_SUPPORTED: Final = ", ".join(sorted(CSV_SUFFIXES | EXCEL_SUFFIXES))

#: Keys longer than this many characters are invalid (real ticket keys are a dozen or so).
MAX_KEY_CHARS: Final = 256

_HEADER_NOISE = re.compile(r"[\s_\-]+")
_LINE = re.compile(r"([^\r\n]*)(\r\n|\r|\n|)")
_QUOTED = re.compile(r'"[^"]*"')
# The first line holding anything but separators and spaces: the header.
_HEADER_LINE = re.compile(rb"(?:[ \t,;]*(?:\r\n|\r|\n))*([^\r\n]*)")

_SNIFF_BYTES: Final = 256 * 1024
_CHUNK_BYTES: Final = 4 * 1024 * 1024
_DELIMITERS: Final = (",", ";", "\t")
# UTF-32 first: its little-endian BOM starts with the UTF-16 one.
_BOMS: Final = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_ZIP_MAGIC: Final = (b"PK\x03\x04", b"PK\x05\x06")
_OLE2_MAGIC: Final = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_SHOWN_VALUE_LIMIT: Final = 60


@dataclass(frozen=True)
class Inputs:
    """All rows of all input files; see :func:`read_inputs`.

    ``frame`` holds ``FRAME_COLUMNS``, one row per input row (blank rows dropped). When
    ``read_inputs`` was given identity columns it holds one more, ``identity`` (pandas ``str``
    dtype, never missing): per row, those columns' values in the order named, each as a person
    sees it (trimmed of spaces; spreadsheet numbers, dates and booleans as text: ``5``,
    ``0.1``, ``2026-11-20T12:30:00``, ``2026-11-20``, ``TRUE``; empty cells ``""``) and cut to
    1,000 characters, joined with the ASCII unit separator U+001F (``IDENTITY_SEPARATOR``; one
    inside a value becomes a space). Every row has one, invalid and hidden rows included.
    """

    frame: pd.DataFrame
    blank_rows: int
    files: tuple[str, ...]
    seen: ReadSummary = field(
        default_factory=ReadSummary
    )  # what the reader saw in sheets, to tell the user


def normalise_header(name: str) -> str:
    """Fold a header cell so "Event ID", "event-id" and "EventId" compare equal."""
    return _HEADER_NOISE.sub("", name.casefold())
