"""What calamine cannot tell about an .ods sheet, read from its ``content.xml``: each key and
event cell's value type, formula, error and shown text, hidden and filtered rows, and merges.

An .ods cell keeps the text it shows (``<text:p>000123</text:p>``) beside its value
(``office:value="123"``), so a number cell is a key exactly when that text is digits naming the
very integer it holds: no number style needs reading. The part is unpacked with the pre-scan's
bounded reader and parsed by expat as a stream.
"""

from __future__ import annotations

import xml.parsers.expat
import zipfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from batchjob.read._formats import EXACT_LIMIT, Cause
from batchjob.read._limits import MAX_UNPACKED_BYTES, _unpack

_TABLE: Final = "urn:oasis:names:tc:opendocument:xmlns:table:1.0 "
_OFFICE: Final = "urn:oasis:names:tc:opendocument:xmlns:office:1.0 "
_TEXT: Final = "urn:oasis:names:tc:opendocument:xmlns:text:1.0 "
_CALCEXT: Final = "urn:org:documentfoundation:names:experimental:calc:xmlns:calcext:1.0 "
#: More rows than any sheet holds: a repeat beyond is padding, counted no further.
_MAX_REPEAT: Final = 1 << 21
_BY_TYPE: Final = {
    "percentage": Cause.PERCENT,
    "currency": Cause.CURRENCY,
    "date": Cause.DATE,
    "time": Cause.TIME,
    "boolean": Cause.BOOLEAN,
}


@dataclass
class OdsCell:
    value_type: str
    value: str
    formula: bool
    error: bool
    shown: str = ""

    def judged(self) -> tuple[Cause, str]:
        """This cell's cause and the text it shows."""
        if self.error:
            return Cause.ERROR, self.shown
        if self.formula:
            return Cause.FORMULA, self.shown
        if self.value_type in _BY_TYPE:
            return _BY_TYPE[self.value_type], self.shown
        if self.value_type != "float":
            return Cause.OK, self.shown
        return _float_cause(self.value, self.shown), self.shown


def _float_cause(value: str, shown: str) -> Cause:
    try:
        number = float(value)
    except ValueError:
        return Cause.DISAGREE
    if shown.isascii() and shown.isdigit():
        exact = number.is_integer() and 0 <= number < EXACT_LIMIT
        if not exact:
            return Cause.FLOAT
        return Cause.OK if int(shown) == int(number) else Cause.DISAGREE
    if "E" in shown.upper() and any(ch.isdigit() for ch in shown):
        return Cause.SCIENTIFIC
    if not (number.is_integer() and abs(number) < EXACT_LIMIT):
        return Cause.FLOAT
    return Cause.FORMAT


@dataclass
class OdsSheet:
    cells: dict[int, dict[int, OdsCell]] = field(default_factory=dict)  # column -> row -> cell
    hidden: list[tuple[int, int]] = field(default_factory=list)  # 1-based first row, count
    merges: list[tuple[int, int, int, int]] = field(default_factory=list)  # 0-based

    def hidden_rows(self, first_row: int, count: int) -> npt.NDArray[np.bool_] | None:
        if not self.hidden:
            return None
        mask = np.zeros(count, dtype=np.bool_)
        for start, repeat in self.hidden:
            lo, hi = max(start - first_row, 0), min(start + repeat - first_row, count)
            if lo < hi:
                mask[lo:hi] = True
        return mask if mask.any() else None


def read_ods(
    path: str,
    wanted: Mapping[str, Collection[int]],
    spans: Mapping[str, Collection[int]] | None = None,
) -> dict[str, OdsSheet]:
    """The wanted columns (0-based) of each named sheet; call only after the pre-scan passed.

    ``spans`` names more columns of a sheet whose merges alone are wanted, not their cells.
    """
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        info = next((i for i in archive.infolist() if i.filename.lower() == "content.xml"), None)
        if info is None:
            return {}
        walker = _Walker(wanted, spans or {})
        parser = xml.parsers.expat.ParserCreate(namespace_separator=" ")
        parser.StartElementHandler = walker.start
        parser.EndElementHandler = walker.end
        parser.CharacterDataHandler = walker.text
        for chunk in _unpack(path, raw, info, MAX_UNPACKED_BYTES):
            parser.Parse(chunk, False)
        parser.Parse(b"", True)
        return walker.sheets


class _Walker:
    def __init__(
        self, wanted: Mapping[str, Collection[int]], spans: Mapping[str, Collection[int]]
    ) -> None:
        self._wanted = wanted
        self._spans = spans
        self.sheets: dict[str, OdsSheet] = {}
        self._sheet: OdsSheet | None = None
        self._columns: Collection[int] = ()
        self._merges_only: Collection[int] = ()
        self._row = 0  # 1-based number of the current row
        self._repeat = 1
        self._col = 0
        self._cell: OdsCell | None = None
        self._in_row: list[tuple[int, OdsCell]] = []
        self._text: list[str] | None = None

    def start(self, name: str, attrs: dict[str, str]) -> None:
        if name == _TABLE + "table":
            table = attrs.get(_TABLE + "name", "")
            self._columns = self._wanted.get(table, ())
            self._merges_only = self._spans.get(table, ())
            self._sheet = OdsSheet() if table in self._wanted else None
            if self._sheet is not None:
                self.sheets[table] = self._sheet
            self._row = 0
        elif self._sheet is None:
            return
        elif name == _TABLE + "table-row":
            self._row += 1
            self._repeat = min(
                int(attrs.get(_TABLE + "number-rows-repeated", "1") or 1), _MAX_REPEAT
            )
            self._col = 0
            self._in_row = []
            if attrs.get(_TABLE + "visibility", "visible") in ("collapse", "filter"):
                self._sheet.hidden.append((self._row, self._repeat))
        elif name in (_TABLE + "table-cell", _TABLE + "covered-table-cell"):
            span = int(attrs.get(_TABLE + "number-columns-repeated", "1") or 1)
            col = self._col
            self._col += span
            read = any(col <= c < col + span for c in self._columns)
            if not read and not (
                self._merges_only and any(col <= c < col + span for c in self._merges_only)
            ):
                return
            rows_spanned = int(attrs.get(_TABLE + "number-rows-spanned", "1") or 1)
            if rows_spanned > 1:
                cols_spanned = int(attrs.get(_TABLE + "number-columns-spanned", "1") or 1)
                self._sheet.merges.append(
                    (self._row - 1, col, self._row + rows_spanned - 2, col + cols_spanned - 1)
                )
            if not read:
                return
            value_type = attrs.get(_OFFICE + "value-type", "")
            error = attrs.get(_CALCEXT + "value-type") == "error"
            formula = _TABLE + "formula" in attrs
            if value_type in ("", "string") and not error and not formula:
                return  # text or empty: calamine's value stands
            cell = OdsCell(value_type, attrs.get(_OFFICE + "value", ""), formula, error)
            for c in self._columns:
                if col <= c < col + span:
                    self._in_row.append((c, cell))
            self._cell = cell
            self._text = []
        elif name == _TEXT + "p" and self._cell is not None and self._text:
            self._text.append("\n")  # a second paragraph: a line break in the shown text

    def text(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)

    def end(self, name: str) -> None:
        if self._sheet is None:
            return
        if name in (_TABLE + "table-cell", _TABLE + "covered-table-cell"):
            if self._cell is not None and self._text is not None:
                self._cell.shown = "".join(self._text)
            self._cell, self._text = None, None
        elif name == _TABLE + "table-row":
            for c, cell in self._in_row:
                column = self._sheet.cells.setdefault(c, {})
                for row in range(self._row, self._row + self._repeat):
                    column[row] = cell
            self._row += self._repeat - 1
        elif name == _TABLE + "table":
            self._sheet = None
