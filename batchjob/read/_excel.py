"""Reading workbooks (.xlsx, .xlsm, .xlsb, .xls, .ods) with python-calamine, every cell as text."""

from __future__ import annotations

import math
import xml.parsers.expat
import zlib

import pandas as pd

from batchjob._errors import InputError
from batchjob.read._columns import _check_event_source, _list_names, _Matcher
from batchjob.read._limits import _check_workbook_size
from batchjob.read._normalise import _normalise, _Part
from batchjob.read._shared import _BOMS, _OLE2_MAGIC, _ZIP_MAGIC


def _read_excel(
    path: str, suffix: str, head: bytes, matcher: _Matcher, default: str | None
) -> list[_Part]:
    _check_workbook_magic(path, suffix, head)
    try:
        _check_workbook_size(path, suffix, head)
    except (ValueError, zlib.error, xml.parsers.expat.ExpatError) as exc:
        raise InputError(f"{path}: cannot be read as a {suffix} workbook: {exc}") from exc
    try:
        sheets = pd.read_excel(
            path,
            sheet_name=None,
            header=None,
            dtype=object,
            na_filter=False,
            engine="calamine",
        )
    except Exception as exc:  # the engine raises many unrelated types for a damaged workbook
        raise InputError(f"{path}: cannot be read as a {suffix} workbook: {exc}") from exc
    parts: list[_Part] = []
    seen: list[str] = []
    for sheet_name, sheet in sheets.items():
        where = f"{path}#{sheet_name}"
        found = _sheet_header(sheet)
        if found is None:
            seen.append(f"sheet '{sheet_name}' is empty")
            continue
        header_index, names = found
        columns = matcher.find(where, names)
        if columns is None:
            seen.append(f"sheet '{sheet_name}' has columns: {_list_names(names)}")
            continue
        _check_event_source(where, columns, default, matcher)
        body = sheet.iloc[header_index + 1 :]
        key = pd.Series(body.iloc[:, columns.key].map(_excel_text).tolist(), dtype="str")
        event = None
        if columns.event is not None:
            event = pd.Series(
                body.iloc[:, columns.event].map(_excel_text).tolist(), dtype="category"
            )
        parts.append(
            _normalise(
                source=where,
                columns=columns,
                event=event,
                key=key,
                # The sheet's frame starts at A1 (calamine keeps leading empty rows).
                first_row=header_index + 2,
                overflow=None,
                overflow_problem="",
                default=default,
            )
        )
    if not parts:
        raise InputError(
            f"{path}: no sheet has an order ticket key column; {'; '.join(seen) or 'no sheets'}. "
            f"{matcher.no_key_hint()}"
        )
    return parts


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


def _sheet_header(sheet: pd.DataFrame) -> tuple[int, list[str]] | None:
    """The first row with any content is the header (rows above it are left empty)."""
    for index in range(len(sheet)):
        names = [_excel_text(cell).strip() for cell in sheet.iloc[index].tolist()]
        if any(names):
            return index, names
    return None


def _excel_text(value: object) -> str:
    """A cell as the text a person sees: 123456.0 stored by Excel reads back as "123456"."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
        # Excel shows 15 significant digits; more only exposes binary float noise.
        return format(value, ".15g")
    return str(value)
