"""What calamine cannot tell about an .xls (BIFF8) sheet, read from its records: each key and
event cell's kind (number, boolean, error, formula) and number format, and hidden rows.

The records are walked as the pre-scan walks them (see :func:`._limits._check_xls`): FORMAT and
XF in the workbook globals give each cell's format; ROW's ``fDyZero`` flag marks a hidden row.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from batchjob.read._formats import GENERAL, Format, built_in, classify
from batchjob.read._limits import _biff_sheet_name, _cfb_stream

_BOF: Final = 0x0809
_EOF: Final = 0x000A
_SHEET: Final = 0x0085
_FORMAT: Final = 0x041E
_XF: Final = 0x00E0
_ROW: Final = 0x0208
_NUMBER: Final = 0x0203
_RK: Final = 0x027E
_MULRK: Final = 0x00BD
_BOOLERR: Final = 0x0205
_FORMULA: Final = 0x0006
_HIDDEN: Final = 0x20  # ROW grbit fDyZero
_ERRORS: Final = {
    0x00: "#NULL!",
    0x07: "#DIV/0!",
    0x0F: "#VALUE!",
    0x17: "#REF!",
    0x1D: "#NAME?",
    0x24: "#NUM!",
    0x2A: "#N/A",
}


@dataclass(frozen=True)
class XlsCell:
    kind: str  # "number", "boolean", "error", "formula"
    xf: int
    error: str = ""  # the error's text, for an error cell or a formula whose result is one


@dataclass
class XlsSheet:
    formats: list[Format]
    cells: dict[int, dict[int, XlsCell]] = field(default_factory=dict)  # column -> row -> cell
    hidden: list[int] = field(default_factory=list)  # 1-based

    def format_of(self, xf: int) -> Format | None:
        return self.formats[xf] if 0 <= xf < len(self.formats) else None

    def hidden_rows(self, first_row: int, count: int) -> npt.NDArray[np.bool_] | None:
        if not self.hidden:
            return None
        at = np.asarray(self.hidden, dtype=np.int64) - first_row
        mask = np.zeros(count, dtype=np.bool_)
        mask[at[(at >= 0) & (at < count)]] = True
        return mask if mask.any() else None


def read_xls(path: str, wanted: Mapping[str, Collection[int]]) -> dict[str, XlsSheet]:
    """The wanted columns (0-based) of each named sheet; call only after the pre-scan passed."""
    try:
        stream = _cfb_stream(Path(path).read_bytes(), ("workbook", "book"))
    except (ValueError, IndexError, struct.error):
        return {}
    if stream is None:
        return {}
    names: dict[int, str] = {}
    codes: dict[int, Format] = {}
    xfs: list[int] = []
    sheets: dict[str, XlsSheet] = {}
    sheet: XlsSheet | None = None
    columns: Collection[int] = ()
    formats: list[Format] = []
    at = 0
    while at + 4 <= len(stream):
        kind, size = struct.unpack_from("<HH", stream, at)
        data = stream[at + 4 : at + 4 + size]
        if kind == _BOF:
            name = names.get(at)
            if name is not None and not formats:
                formats = [codes.get(i) or built_in(i) for i in xfs] or [GENERAL]
            sheet = XlsSheet(formats) if name in wanted else None
            columns = wanted.get(name, ()) if name is not None else ()
            if sheet is not None and name is not None:
                sheets[name] = sheet
        elif kind == _SHEET and len(data) >= 8:
            names[struct.unpack_from("<I", data)[0]] = _biff_sheet_name(data)
        elif kind == _FORMAT and len(data) >= 5:
            ident, code = _format_record(data)
            codes[ident] = classify(code)
        elif kind == _XF and len(data) >= 4:
            xfs.append(struct.unpack_from("<H", data, 2)[0])
        elif sheet is not None:
            _sheet_record(sheet, columns, kind, data)
        at += 4 + size
    return sheets


def _format_record(data: bytes) -> tuple[int, str]:
    ident, length, flags = struct.unpack_from("<HHB", data)
    wide = flags & 1
    raw = data[5 : 5 + length * (2 if wide else 1)]
    return ident, raw.decode("utf-16-le" if wide else "latin-1", errors="replace")


def _sheet_record(sheet: XlsSheet, columns: Collection[int], kind: int, data: bytes) -> None:
    if kind == _ROW and len(data) >= 16:
        if struct.unpack_from("<I", data, 12)[0] & _HIDDEN:
            sheet.hidden.append(struct.unpack_from("<H", data)[0] + 1)
        return
    if len(data) < 6:
        return
    row, col, xf = struct.unpack_from("<HHH", data)
    if kind == _MULRK:
        for index in range((len(data) - 6) // 6):
            c = col + index
            if c in columns:
                (cell_xf,) = struct.unpack_from("<H", data, 4 + index * 6)
                _put(sheet, c, row, XlsCell("number", cell_xf))
        return
    if col not in columns:
        return
    if kind in (_NUMBER, _RK):
        _put(sheet, col, row, XlsCell("number", xf))
    elif kind == _BOOLERR and len(data) >= 8:
        if data[7]:
            _put(sheet, col, row, XlsCell("error", xf, _ERRORS.get(data[6], "#ERROR")))
        else:
            _put(sheet, col, row, XlsCell("boolean", xf))
    elif kind == _FORMULA and len(data) >= 14:
        error = ""
        if data[12:14] == b"\xff\xff" and data[6] == 2:
            error = _ERRORS.get(data[8], "#ERROR")
        _put(sheet, col, row, XlsCell("formula", xf, error))


def _put(sheet: XlsSheet, col: int, row: int, cell: XlsCell) -> None:
    sheet.cells.setdefault(col, {})[row + 1] = cell
