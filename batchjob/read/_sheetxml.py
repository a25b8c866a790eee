"""What calamine cannot tell about an .xlsx/.xlsm sheet, read from its XML: each key and event
cell's type, formula and number format, which rows are hidden, and the merged ranges.

Only the columns in use are scanned, one regex each over the sheet's bytes (unpacked with the
same bounded reader as the pre-scan, so a part's declared size is never trusted).
"""

from __future__ import annotations

import functools
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
_NUM_FMTS: Final = re.compile(rb"<(?:\w+:)?numFmts\b[^>]*>(.*?)</(?:\w+:)?numFmts>", re.S)
_CELL_XFS: Final = re.compile(rb"<(?:\w+:)?cellXfs\b[^>]*>(.*?)</(?:\w+:)?cellXfs>", re.S)
_XF: Final = re.compile(rb"<(?:\w+:)?xf\b([^>]*)>")
_ATTRIBUTE: Final = re.compile(rb"""([\w:]+)\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_HIDDEN_ROW: Final = re.compile(rb"<(?:\w+:)?row\b([^>]*\bhidden\s*=\s*[\"'](?:1|true)[\"'][^>]*)>")
_MERGE: Final = re.compile(
    rb"<(?:\w+:)?mergeCell\b[^>]*\bref\s*=\s*\"([A-Z]+)([0-9]+):([A-Z]+)([0-9]+)\""
)
_HIDDEN_MARKS: Final = (b'hidden="1"', b'hidden="true"', b"hidden='1'", b"hidden='true'")


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
    _columns: dict[int, dict[int, Cell]] = field(default_factory=dict)

    def format_of(self, style: int) -> Format | None:
        """None when the style is out of the table (an attack, or a damaged file)."""
        return self.formats[style] if 0 <= style < len(self.formats) else None

    def column(self, col: int) -> dict[int, Cell]:
        """One column's (0-based) cells that are not plain text, by 1-based row.

        Cells whose tag starts with its place (``<c r="B5"``, as Excel and LibreOffice write
        them) are found by a fast scan; a sheet with any other spelling takes a slower one. A
        cell naming no place at all is left to calamine's value and the "format unknown" rule.
        """
        if col not in self._columns:
            if not _place_first(self.data):
                self._columns[col] = _scan_any_order(self.data, col)
            else:
                self._columns[col] = _scan_column(self.data, col)
        return self._columns[col]

    @property
    def general(self) -> frozenset[int]:
        """Styles whose number format is General: the usual number cell's, given a fast path."""
        return frozenset(at for at, form in enumerate(self.formats) if form == GENERAL)

    @functools.cached_property
    def plain(self) -> bool:
        """No formula and no error cell: only a cell calamine gives as a number needs a look."""
        data = self.data
        if b't="e"' in data or b"t='e'" in data:
            return False
        prefixed = _prefixed(data)
        return not (_has_tag(data, b"<f") or (prefixed and _has_tag(data, b":f")))


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
            )
        return sheets


def _attributes(text: bytes) -> dict[bytes, bytes]:
    return {m[1]: m[2] or m[3] for m in _ATTRIBUTE.finditer(text)}


def _formats(styles: bytes) -> list[Format]:
    """Each cell style's number format, by the ``s`` index cells use."""
    codes: dict[int, Format] = {}
    # Only the <numFmts> table: a conditional format's <dxf> carries a <numFmt> of its own,
    # which may reuse an id and must not replace the cells' format.
    block = _NUM_FMTS.search(styles)
    for tag in _NUM_FMT.finditer(block[1] if block is not None else b""):
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
    rows: list[int] = []
    if b"hidden" not in data or not any(mark in data for mark in _HIDDEN_MARKS):
        return np.asarray(rows, dtype=np.int64)
    for tag in _HIDDEN_ROW.finditer(data):
        number = _attributes(tag[1]).get(b"r", b"")
        if number.isdigit():
            rows.append(int(number))
    return np.asarray(rows, dtype=np.int64)


def _merges(data: bytes) -> list[tuple[int, int, int, int]]:
    if b"mergeCell" not in data:
        return []
    return [
        (int(m[2]) - 1, _column(m[1]), int(m[4]) - 1, _column(m[3])) for m in _MERGE.finditer(data)
    ]


def _column(letters: bytes) -> int:
    number = 0
    for ch in letters:
        number = number * 26 + ch - 64
    return number - 1


_TEXT: Final = frozenset({b"s", b"inlineStr"})
_ANY_CELL: Final = re.compile(rb"<(?:\w+:)?c\s([^>]*?)(/?)>(<(?:\w+:)?f[\s>/])?")
_PLACE: Final = re.compile(rb"([A-Z]+)([0-9]+)")


def _place_first(data: bytes) -> bool:
    """Whether every cell tag is spelled ``<c r="``: counted at C speed, not parsed."""
    if _prefixed(data):
        return False  # namespace-prefixed tags: <x:c ...>
    return data.count(b"<c ") == data.count(b'<c r="')


def _prefixed(data: bytes) -> bool:
    """Whether the sheet's tags carry a namespace prefix (``<x:worksheet>``): its root says."""
    return b":worksheet" in data[:4096]


def _has_tag(data: bytes, start: bytes) -> bool:
    """Whether a tag named by ``start`` (``<f``) is in the data, not merely one starting so
    (``<filterColumn``): each occurrence's next byte is checked."""
    at = data.find(start)
    while at >= 0:
        if data[at + len(start) : at + len(start) + 1] in (b" ", b">", b"/", b"\t", b"\n", b"\r"):
            return True
        at = data.find(start, at + 1)
    return False


def _scan_any_order(data: bytes, col: int) -> dict[int, Cell]:
    """:func:`_scan_column` for cells whose attributes come in any order (slower: each cell's
    attributes are parsed). Error cells' values are not read: they show as empty."""
    letters = _column_letters(col + 1).encode()
    cells: dict[int, Cell] = {}
    for attributes, empty, formula in _ANY_CELL.findall(data):
        found = _attributes(attributes)
        place = _PLACE.fullmatch(found.get(b"r", b""))
        if place is None or place[1] != letters or empty:
            continue
        t, style = found.get(b"t", b"n"), found.get(b"s", b"0")
        kind = b"" if t == b"n" else t
        if formula or kind not in _TEXT:
            cells[int(place[2])] = Cell(
                kind, int(style) if style.isdigit() else -1, bool(formula), b""
            )
    return cells


def _scan_column(data: bytes, col: int) -> dict[int, Cell]:
    """The cells of one column that are not plain text, by row: one regex pass, the attributes
    parsed once per distinct spelling (a column's cells share a handful)."""
    letters = _column_letters(col + 1).encode()
    place = rb"<(?:\w+:)?c\s+r=\"" + letters + rb"([0-9]+)\""
    # Text cells (t="s", t="inlineStr") are skipped by the pattern itself: half the work when
    # half the keys are text.
    pattern = re.compile(
        place + rb"(?![^>]*\bt=[\"'](?:s|inlineStr)[\"'])([^>]*?)(/?)>(<(?:\w+:)?f[\s>/])?"
    )
    kinds: dict[bytes, tuple[bytes, int]] = {}
    cells: dict[int, Cell] = {}
    for row, attributes, empty, formula in pattern.findall(data):
        if empty:
            continue  # <c .../>: no value (or covered by a merge): calamine's value stands
        kind = kinds.get(attributes)
        if kind is None:
            found = _attributes(attributes)
            t, style = found.get(b"t", b"n"), found.get(b"s", b"0")
            kind = kinds[attributes] = (
                b"" if t == b"n" else t,
                int(style) if style.isdigit() else -1,
            )
        if formula or kind[0] not in _TEXT:
            cells[int(row)] = Cell(kind[0], kind[1], bool(formula), b"")
    if any(cell.type == b"e" for cell in cells.values()):
        error = re.compile(
            place + rb"[^>]*\bt=[\"']e[\"'][^>]*>(?:(?!</(?:\w+:)?c>).)*?<(?:\w+:)?v>([^<]*)<", re.S
        )
        for row, value in error.findall(data):
            known = cells.get(int(row))
            if known is not None:
                cells[int(row)] = Cell(known.type, known.style, known.formula, value)
    return cells
