"""Reading workbooks (.xlsx, .xlsm, .xlsb, .xls, .ods) with python-calamine, each key and event
cell as the sheet shows it.

calamine gives values fast but no number formats, hidden rows, error cells or formulas; those
are read from the file itself for the key and event columns only: the sheet XML of .xlsx/.xlsm
(:mod:`._sheetxml`), the BIFF records of .xls (:mod:`._xlsbiff`), content.xml of .ods
(:mod:`._odsxml`). In .xlsb a number's format is unknown: a number cell is taken only when it
is an integer below 2^53 (shown as that integer in General format), and counted as such.
"""

from __future__ import annotations

import datetime as dt
import math
import xml.parsers.expat
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt
import pandas as pd
import python_calamine

from batchjob._errors import InputError
from batchjob.read._columns import _check_event_source, _Columns, _list_names, _Matcher
from batchjob.read._findings import Findings
from batchjob.read._formats import EXACT_LIMIT, Cause, shown_number, value_cause
from batchjob.read._identity import cell_text, find_identity, joined_texts
from batchjob.read._limits import _check_workbook_size
from batchjob.read._normalise import CellFacts, ReadOptions, _normalise, _Part
from batchjob.read._odsxml import OdsSheet, read_ods
from batchjob.read._shared import _BOMS, _OLE2_MAGIC, _ZIP_MAGIC
from batchjob.read._sheetxml import Cell, Sheet, read_sheets
from batchjob.read._xlsbiff import XlsCell, XlsSheet, read_xls

#: The header is looked for in this many rows from the top (title rows may sit above it).
HEADER_SEARCH_ROWS: Final = 20
_XML_SUFFIXES: Final = frozenset({".xlsx", ".xlsm"})
_TEXT_TYPES: Final = frozenset({b"s", b"inlineStr", b"str"})
_Merge = tuple[tuple[int, int], tuple[int, int]]


def _read_excel(
    path: str,
    suffix: str,
    head: bytes,
    matcher: _Matcher,
    options: ReadOptions,
    findings: Findings,
) -> list[_Part]:
    _check_workbook_magic(path, suffix, head)
    try:
        _check_workbook_size(path, suffix, head)
    except (ValueError, zlib.error, xml.parsers.expat.ExpatError) as exc:
        raise InputError(f"{path}: cannot be read as a {suffix} workbook: {exc}") from exc
    try:
        book = python_calamine.CalamineWorkbook.from_path(path)
        sheets = [book.get_sheet_by_name(name) for name in book.sheet_names]
        visible = {
            meta.name: meta.visible == python_calamine.SheetVisibleEnum.Visible
            for meta in book.sheets_metadata
        }
        grids = [sheet.to_python(skip_empty_area=False) for sheet in sheets]
        kind = _zip_kind(path) if head.startswith(_ZIP_MAGIC) else ""
        sheet_xml = read_sheets(path) if kind == "xlsx" and suffix in _XML_SUFFIXES else {}
    except InputError:
        raise
    except Exception as exc:  # the engine raises many unrelated types for a damaged workbook
        raise InputError(f"{path}: cannot be read as a {suffix} workbook: {exc}") from exc
    found_sheets: list[tuple[str, list[list[Any]], int, _Columns, tuple[int, ...], Any]] = []
    seen: list[str] = []
    for sheet, grid in zip(sheets, grids, strict=True):
        where = f"{path}#{sheet.name}"
        found = _sheet_header(where, grid, matcher, options.default)
        if found is None:
            seen.append(f"sheet '{sheet.name}' is empty")
            continue
        header, names, columns = found
        if columns is None:
            seen.append(
                f"sheet '{sheet.name}' has columns: {_list_names(names)} (the header must be in "
                f"one of the first {HEADER_SEARCH_ROWS} rows)"
            )
            continue
        _check_event_source(where, columns, options.default, matcher)
        identity = find_identity(where, names, options.identity) if options.identity else ()
        if header:
            findings.headers.append(f"header found on row {header + 1} of {where}")
        found_sheets.append((where, grid, header, columns, identity, sheet))
    ods: dict[str, OdsSheet] = {}
    xls: dict[str, XlsSheet] = {}
    wanted = {
        s.name: [c.key, *([] if c.event is None else [c.event])] for *_, c, _i, s in found_sheets
    }
    try:
        if kind == "ods" and found_sheets:
            # Only the merges of identity columns: calamine gives no .ods merges, and their
            # cells' values are calamine's.
            spans = {s.name: i for *_, i, s in found_sheets if i}
            ods = read_ods(path, wanted, spans)
        elif head.startswith(_OLE2_MAGIC) and found_sheets:
            xls = read_xls(path, wanted)
    except (ValueError, xml.parsers.expat.ExpatError) as exc:
        raise InputError(f"{path}: cannot be read as a {suffix} workbook: {exc}") from exc
    parts = [
        _read_sheet(
            where,
            grid,
            header,
            columns,
            sheet,
            _Extra(sheet_xml.get(sheet.name), ods.get(sheet.name), xls.get(sheet.name)),
            options,
            findings,
            visible=visible.get(sheet.name, True),
            identity=identity,
        )
        for where, grid, header, columns, identity, sheet in found_sheets
    ]
    if not parts:
        raise InputError(
            f"{path}: no sheet has an order ticket key column; {'; '.join(seen) or 'no sheets'}. "
            f"{matcher.no_key_hint()}"
        )
    return parts


def _read_sheet(
    where: str,
    grid: list[list[Any]],
    header: int,
    columns: _Columns,
    sheet: Any,
    extra: _Extra,
    options: ReadOptions,
    findings: Findings,
    *,
    visible: bool = True,
    identity: Sequence[int] = (),
) -> _Part:
    body = grid[header + 1 :]
    first_row = header + 2  # 1-based; the grid starts at A1 (skip_empty_area=False)
    xml, ods, xls = extra
    merges: list[_Merge] = list(sheet.merged_cell_ranges or [])
    if not merges and (xml or ods) is not None:
        found = xml.merges if xml is not None else ods.merges if ods is not None else []
        merges = [((r0, c0), (r1, c1)) for r0, c0, r1, c1 in found]
    reader = _CellReader(where, extra, first_row, findings)
    key_text, key_cause = reader.read(_column(body, columns.key), columns.key)
    _fill_merges(key_text, key_cause, columns.key, header + 1, merges)
    event = event_cause = None
    if columns.event is not None:
        event_text, event_cause = reader.read(_column(body, columns.event), columns.event)
        _fill_merges(event_text, event_cause, columns.event, header + 1, merges)
        event = pd.Series(event_text, dtype="category")
    hidden = None
    for found_in in (ods, xls):
        if found_in is not None:
            hidden = found_in.hidden_rows(first_row, len(body))
    if not visible:
        # A hidden sheet is not what the user sees: each of its rows is a hidden row.
        hidden = np.ones(len(body), dtype=np.bool_)
    elif xml is not None and len(xml.hidden_rows):
        hidden = np.zeros(len(body), dtype=np.bool_)
        at = xml.hidden_rows - first_row
        hidden[at[(at >= 0) & (at < len(body))]] = True
    return _normalise(
        source=where,
        columns=columns,
        event=event,
        key=pd.Series(key_text, dtype="str"),
        first_row=first_row,
        overflow=None,
        overflow_problem="",
        options=options,
        findings=findings,
        facts=CellFacts(
            key_cause, event_cause, hidden, lambda blank: _other_content(body, columns, blank)
        ),
        identity=_identities(body, identity, header + 1, merges) if identity else None,
    )


def _identities(
    body: list[list[Any]], identity: Sequence[int], top: int, merges: Sequence[_Merge]
) -> pd.Series:
    """The identity columns' values, joined per row: from calamine's values, with no look at
    the file's formats (a date shows as ISO 8601, whatever its sheet's format)."""
    columns: list[list[str]] = []
    for col in identity:
        texts = [cell_text(value) for value in _column(body, col)]
        # As for keys: cells covered by a merge show its first cell.
        for (r0, c0), (r1, _c1) in merges:
            if c0 == col and r1 > r0:
                first = r0 - top
                text = texts[first] if 0 <= first < len(texts) else ""
                for at in range(max(first + 1, 0), min(r1 - top + 1, len(texts))):
                    texts[at] = text
        columns.append(texts)
    return joined_texts(columns, len(body))


def _other_content(
    body: list[list[Any]], columns: _Columns, blank: npt.NDArray[np.bool_]
) -> npt.NDArray[np.bool_]:
    """Which ``blank`` rows (no key, no event) hold something in another cell (a note, say)."""
    used = {columns.key, columns.event}
    found = np.zeros(len(blank), dtype=np.bool_)
    for at in np.flatnonzero(blank).tolist():
        found[at] = any(cell != "" for col, cell in enumerate(body[at]) if col not in used)
    return found


def _column(body: list[list[Any]], col: int) -> list[Any]:
    return [row[col] if col < len(row) else "" for row in body]


def _fill_merges(
    texts: list[str], causes: npt.NDArray[np.int8], col: int, top: int, merges: Sequence[_Merge]
) -> None:
    """Cells covered by a merge show the merge's first cell: they take its shown text and its
    verdict (a format, a formula), judged once where the cell really is."""
    for (r0, c0), (r1, _c1) in merges:
        if c0 == col and r1 > r0:
            first = r0 - top
            text = texts[first] if 0 <= first < len(texts) else ""
            cause = causes[first] if 0 <= first < len(texts) else 0
            for at in range(max(first + 1, 0), min(r1 - top + 1, len(texts))):
                texts[at], causes[at] = text, cause


class _CellReader:
    """Each cell's shown text and :class:`Cause`, from the XML where there is one."""

    def __init__(self, where: str, extra: _Extra, first_row: int, findings: Findings) -> None:
        self._where = where
        self._xml = extra.xml
        self._ods = extra.ods
        self._xls = extra.xls
        self._first_row = first_row
        self._findings = findings

    def read(self, values: list[Any], col: int) -> tuple[list[str], npt.NDArray[np.int8]]:
        xml = self._xml
        needed = xml is not None and (
            not xml.plain or not all(isinstance(value, str) for value in values)
        )
        cells = xml.column(col) if xml is not None and needed else {}
        texts: list[str] = []
        causes = np.zeros(len(values), dtype=np.int8)
        numbers: list[int] = []
        unknown: list[int] = []
        first = self._first_row
        general = xml.general if xml is not None else frozenset()
        ods = self._ods.cells.get(col, {}) if self._ods is not None else {}
        xls = self._xls.cells.get(col, {}) if self._xls is not None else {}
        for at, value in enumerate(values):
            if xls and self._xls is not None:
                biff = xls.get(first + at)
                if biff is not None:
                    cause, text = _xls_cell(biff, value, self._xls)
                    if cause == Cause.OK:
                        numbers.append(at)
                    causes[at] = cause
                    texts.append(text)
                    continue
            if ods:
                shown = ods.get(first + at)
                if shown is not None:
                    cause, text = shown.judged()
                    if cause == Cause.OK and shown.value_type == "float":
                        numbers.append(at)
                    causes[at] = cause
                    texts.append(text)
                    continue
            cell = cells.get(first + at) if cells else None
            if (
                cell is not None
                and type(value) is float
                and not cell.type
                and not cell.formula
                and cell.style in general
                and value.is_integer()
                and 0 <= value < EXACT_LIMIT
            ):
                # The usual number cell: an integer in General format (the full rule below).
                texts.append(str(int(value)))
                numbers.append(at)
                continue
            if cell is not None and not cell.type and value == "" and not cell.formula:
                cell = None  # an empty cell (or one covered by a merge): calamine's value
            if cell is None and isinstance(value, str):
                texts.append(value)
                continue
            if cell is not None and self._xml is not None:
                cause, text = _xml_cell(cell, value, self._xml)
            else:
                cause, text = value_cause(value), _excel_text(value)
                if not cause and value != "":
                    unknown.append(at)
            if cause == Cause.OK and cell is not None and cell.type == b"" and value != "":
                numbers.append(at)
            causes[at] = cause
            texts.append(text)
        rows = np.arange(first, first + len(values))
        # Sent as shown, but a number cell may have lost leading zeros before it was saved.
        cure = "if a key had leading zeros, format the column as Text and export again"
        self._findings.add(
            "keys or events read from number cells (sent as shown)",
            self._where,
            rows[numbers],
            cure,
        )
        self._findings.add(
            "keys or events read from number cells whose format the file does not say "
            "(accepted: integers below 2^53)",
            self._where,
            rows[unknown],
            cure,
        )
        return texts, causes


def _xml_cell(cell: Cell, value: Any, xml: Sheet) -> tuple[Cause, str]:
    """A cell's cause and text from its XML type, formula and style, checked against calamine."""
    kind = cell.type
    if kind == b"e":
        return Cause.ERROR, cell.value.decode(errors="replace")
    if cell.formula:
        return Cause.FORMULA, _excel_text(value)
    if kind == b"b":
        return Cause.BOOLEAN, _excel_text(value)
    if kind == b"d":
        return Cause.DATE, _excel_text(value)
    if kind in _TEXT_TYPES:
        if not isinstance(value, str):
            return Cause.DISAGREE, _excel_text(value)
        return Cause.OK, value
    if isinstance(value, dt.datetime | dt.date):
        return Cause.DATE, _excel_text(value)
    if isinstance(value, dt.time | dt.timedelta):
        return Cause.TIME, _excel_text(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return (Cause.DISAGREE, _excel_text(value)) if value != "" else (Cause.OK, "")
    form = xml.format_of(cell.style)
    if form is None:
        return value_cause(value), _excel_text(value)
    return shown_number(value, form)


class _Extra(NamedTuple):
    """What the file says beyond calamine's values, by format (None: not read)."""

    xml: Sheet | None
    ods: OdsSheet | None
    xls: XlsSheet | None


def _xls_cell(cell: XlsCell, value: Any, xls: XlsSheet) -> tuple[Cause, str]:
    """A BIFF cell's cause and text from its record kind and format."""
    if cell.error:
        return Cause.ERROR, cell.error
    if cell.kind == "formula":
        return Cause.FORMULA, _excel_text(value)
    if cell.kind == "boolean":
        return Cause.BOOLEAN, _excel_text(value)
    if isinstance(value, dt.datetime | dt.date):
        return Cause.DATE, _excel_text(value)
    if isinstance(value, dt.time | dt.timedelta):
        return Cause.TIME, _excel_text(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return Cause.DISAGREE, _excel_text(value)
    form = xls.format_of(cell.xf)
    if form is None:
        return value_cause(value), _excel_text(value)
    return shown_number(value, form)


def _zip_kind(path: str) -> str:
    """ "xlsx" for XML sheets, "ods" for OpenDocument, "" otherwise (an .xlsb has binary sheets),
    by content: the engine too ignores the name."""
    with zipfile.ZipFile(path) as archive:
        names = {name.lower() for name in archive.namelist()}
    if "xl/workbook.xml" in names:
        return "xlsx"
    return "ods" if "content.xml" in names else ""


def _check_workbook_magic(path: str, suffix: str, head: bytes) -> None:
    is_zip = head.startswith(_ZIP_MAGIC)
    is_ole = head.startswith(_OLE2_MAGIC)
    if (suffix == ".xls" and (is_ole or is_zip)) or (suffix != ".xls" and is_zip):
        return
    if is_ole:
        raise InputError(
            f"{path}: is not a {suffix} workbook: it is password-protected or an old .xls file; "
            "save it again as an unprotected .xlsx"
        )
    if _looks_like_text(head):
        raise InputError(
            f"{path}: is not a {suffix} workbook: it looks like text "
            "(a CSV or HTML export with the wrong extension?); rename it to .csv if it is CSV"
        )
    raise InputError(f"{path}: is not a {suffix} workbook (its content is not a spreadsheet)")


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return any(head.startswith(bom) for bom, _ in _BOMS)
    sample = head[:4096].decode("utf-8", errors="replace")
    return all(ch >= " " or ch in "\t\r\n" for ch in sample)


def _sheet_header(
    where: str, grid: list[list[Any]], matcher: _Matcher, default: str | None
) -> tuple[int, list[str], _Columns | None] | None:
    """The header: within the first rows, the first naming the key column (and the event column,
    unless --event-id is given), else the first naming the key column. A title row such as
    "Ticket key list" names no event column, so the real header below it wins. None for an
    empty sheet; no columns when no row in reach names the key column (the first row's names).
    """
    first: tuple[int, list[str]] | None = None
    key_only: tuple[int, list[str], _Columns] | None = None
    ambiguous: InputError | None = None
    for index, row in enumerate(grid[:HEADER_SEARCH_ROWS]):
        names = [_excel_text(cell).strip() for cell in row]
        if not any(names):
            continue
        if first is None:
            first = index, names
        try:
            columns = matcher.find(where, names)
        except InputError as exc:
            ambiguous = ambiguous or exc  # a title row, or the header: told if no other is
            columns = None
        if columns is None:
            continue
        if columns.event is not None:
            return index, names, columns
        # With --event-id a title row ("Ticket Key") names the key column as well as the
        # header does: the header is the row that names more cells.
        if key_only is None or (
            default is not None and sum(map(bool, names)) > sum(map(bool, key_only[1]))
        ):
            key_only = index, names, columns
    if key_only is not None:
        return key_only
    if ambiguous is not None:
        raise ambiguous
    if first is None:
        return None
    return first[0], first[1], None


def _excel_text(value: object) -> str:
    """A cell as text: 123456.0 stored by Excel reads back as "123456"."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 2**53:
            return str(int(value))
        # Excel shows 15 significant digits; more only exposes binary float noise.
        return format(value, ".15g")
    return str(value)
