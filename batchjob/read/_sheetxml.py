"""What calamine cannot tell about an .xlsx/.xlsm sheet, read from its XML: each key and event
cell's type, formula and number format, which rows are hidden, and the merged ranges.

Only the columns in use are scanned, one regex each over the sheet's bytes (unpacked with the
same bounded reader as the pre-scan, so a part's declared size is never trusted).
"""

from __future__ import annotations

import html
import re
import zipfile
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from batchjob.read._formats import GENERAL, Format, built_in, classify
from batchjob.read._limits import MAX_UNPACKED_BYTES, _column_letters, _unpack, _xlsx_sheet_names

#: Excel holds at most 64,000 cell formats; a longer table is an attack, and its cells' formats
#: are taken as unknown (the rule for .xls) rather than parsed.
MAX_STYLES: Final = 65_536
_NUM_FMT: Final = re.compile(rb"<(?:\w+:)?numFmt\b([^>]*)>")
_CELL_XFS: Final = re.compile(rb"<(?:\w+:)?cellXfs\b[^>]*>(.*?)</(?:\w+:)?cellXfs>", re.S)
_XF: Final = re.compile(rb"<(?:\w+:)?xf\b([^>]*)>")
_ATTRIBUTE: Final = re.compile(rb"""([\w:]+)\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_HIDDEN_ROW: Final = re.compile(rb"<(?:\w+:)?row\b([^>]*\bhidden\s*=\s*[\"'](?:1|true)[\"'][^>]*)>")
_MERGE: Final = re.compile(
    rb"<(?:\w+:)?mergeCell\b[^>]*\bref\s*=\s*\"([A-Z]+)([0-9]+):([A-Z]+)([0-9]+)\""
)
_ROW_WITHOUT_NUMBER: Final = re.compile(rb"<(?:\w+:)?row(?![^>]*\br=)[\s/>]")
_CELL_WITHOUT_REF: Final = re.compile(rb"<(?:\w+:)?c(?![^>]*\br=)[\s/>]")


@dataclass(frozen=True)
class Cell:
    """One cell as the XML has it: ``t`` (b"" for a number), style index, formula, raw value."""

    type: bytes
    style: int
    formula: bool
    value: bytes


@dataclass
class Sheet:
    """One sheet's XML, scanned column by column on demand."""

    data: bytes
    formats: list[Format]
    hidden_rows: npt.NDArray[np.int64]  # 1-based
    merges: list[tuple[int, int, int, int]]  # 0-based first row, first col, last row, last col
    refs_complete: bool  # every row and cell names its place (else cells are "format unknown")
    _columns: dict[int, dict[int, Cell]] = field(default_factory=dict)

    def format_of(self, style: int) -> Format | None:
        """None when the style is out of the table (an attack, or a damaged file)."""
        return self.formats[style] if 0 <= style < len(self.formats) else None

    def column(self, col: int) -> dict[int, Cell]:
        """Cells of one column (0-based) by 1-based row number; {} when refs are incomplete."""
        if col not in self._columns:
            self._columns[col] = _scan_column(self.data, col) if self.refs_complete else {}
        return self._columns[col]


def read_sheets(path: str) -> dict[str, Sheet]:
    """Every sheet of an .xlsx/.xlsm by name; call only after the pre-scan passed."""
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        parts = {info.filename: info for info in archive.infolist()}
        names = _xlsx_sheet_names(archive)

        def read(name: str) -> bytes:
            info = parts.get(name)
            if info is None:
                return b""
            return b"".join(_unpack(path, raw, info, MAX_UNPACKED_BYTES))

        formats = _formats(read("xl/styles.xml"))
        sheets: dict[str, Sheet] = {}
        for part, sheet_name in names.items():
            data = read(part)
            sheets[sheet_name] = Sheet(
                data=data,
                formats=formats,
                hidden_rows=_hidden_rows(data),
                merges=_merges(data),
                refs_complete=not (
                    _ROW_WITHOUT_NUMBER.search(data) or _CELL_WITHOUT_REF.search(data)
                ),
            )
        return sheets


def _attributes(text: bytes) -> dict[bytes, bytes]:
    return {m[1]: m[2] or m[3] for m in _ATTRIBUTE.finditer(text)}


def _formats(styles: bytes) -> list[Format]:
    """Each cell style's number format, by the ``s`` index cells use."""
    codes: dict[int, Format] = {}
    for tag in _NUM_FMT.finditer(styles):
        found = _attributes(tag[1])
        ident, code = found.get(b"numFmtId"), found.get(b"formatCode")
        if ident is not None and ident.isdigit() and code is not None:
            codes[int(ident)] = classify(html.unescape(code.decode(errors="replace")))
    table = _CELL_XFS.search(styles)
    if table is None:
        return [GENERAL]  # no styles: every cell is General
    formats: list[Format] = []
    for tag in _XF.finditer(table[1]):
        if len(formats) >= MAX_STYLES:
            return []  # unknown for all: see MAX_STYLES
        ident = _attributes(tag[1]).get(b"numFmtId", b"0")
        number = int(ident) if ident.isdigit() else -1
        formats.append(codes.get(number) or built_in(number))
    return formats


def _hidden_rows(data: bytes) -> npt.NDArray[np.int64]:
    rows = []
    for tag in _HIDDEN_ROW.finditer(data):
        number = _attributes(tag[1]).get(b"r", b"")
        if number.isdigit():
            rows.append(int(number))
    return np.asarray(rows, dtype=np.int64)


def _merges(data: bytes) -> list[tuple[int, int, int, int]]:
    return [
        (int(m[2]) - 1, _column(m[1]), int(m[4]) - 1, _column(m[3])) for m in _MERGE.finditer(data)
    ]


def _column(letters: bytes) -> int:
    number = 0
    for ch in letters:
        number = number * 26 + ch - 64
    return number - 1


def _scan_column(data: bytes, col: int) -> dict[int, Cell]:
    letters = _column_letters(col + 1).encode()
    pattern = re.compile(
        rb"<(?:\w+:)?c\s+r=\"" + letters + rb"([0-9]+)\"([^>]*?)(/>|>(.*?)</(?:\w+:)?c>)", re.S
    )
    cells: dict[int, Cell] = {}
    for m in pattern.finditer(data):
        attributes = m[2]
        kind = b""
        style = 0
        if attributes.strip():
            found = _attributes(attributes)
            kind = found.get(b"t", b"n")
            kind = b"" if kind == b"n" else kind
            s = found.get(b"s", b"0")
            style = int(s) if s.isdigit() else -1
        body = m[4] or b""
        value = b""
        if body:
            at = body.find(b"<v>")
            if at >= 0:
                value = body[at + 3 : body.find(b"</v>", at)]
        cells[int(m[1])] = Cell(kind, style, b"<f" in body, value)
    return cells
