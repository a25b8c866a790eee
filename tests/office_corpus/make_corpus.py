"""Regenerate the office-suite corpus of issue 9 with LibreOffice itself (not openpyxl).

    sudo apt-get install -y libreoffice-calc-nogui python3-uno     # Debian/Ubuntu
    /usr/bin/python3 tests/office_corpus/make_corpus.py            # the system python: it has uno

It needs LibreOffice and its Python bridge (``import uno``), so CI does not run it: the files it
writes are committed next to it and the tests read those. It starts its own headless soffice with
a fresh profile under /tmp (so it never collides with another run or a desktop session), builds
the workbook through the UNO API as a user would (typed input, number formats, a merged cell,
hidden rows, an autofilter, title rows), lets LibreOffice save it as .xlsx, .xls and .ods, and
exports CSVs from it. Then it opens every saved workbook again in LibreOffice and writes:

- ``<file>.<Sheet>.shown.csv``: LibreOffice's own CSV export of that sheet with "Save cell
  contents as shown" (filter option token 9 = true), UTF-8, comma: what a person sees;
- ``expected.json``: for every file and row, the row number as the sheet shows it, the event and
  key as shown, the cell kind the row was built to hold, and what LibreOffice reports about the
  reopened file (cell type, number format, hidden, filtered, merged), so differences between
  what was meant and what the format kept are recorded, not assumed.

The output is deterministic apart from LibreOffice's own timestamps inside the files.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uno  # type: ignore[import-not-found]  # LibreOffice's bridge: python3-uno

HERE = Path(__file__).resolve().parent
SOFFICE = "/usr/bin/soffice"

EVENT_A = "07216444-4e3b-41ea-a3b8-5a418fce41f4"
EVENT_B = "3f1c9a52-8d7e-4b6a-9c2e-1d5f7a8b9c0d"
EVENT_C = "b2e4f6a8-1c3d-4e5f-8a9b-0c1d2e3f4a5b"

# CSV filter option tokens (LibreOffice help, "CSV Filter Options"): 1 field separator,
# 2 text delimiter, 3 character set (76 = UTF-8, 1 = Windows-1252, 65535 = UTF-16),
# 4 first line, 5 column formats, 6 language, 7 quote all text, 8 numbers as numbers,
# 9 save cell contents as shown, 10 export formulas, 11 trim spaces, 12 sheet (-1 = each sheet
# to its own file "<base>-<Sheet>.csv").
SHOWN_ALL_SHEETS = "44,34,76,1,,1033,false,true,true,false,false,-1"
CP1252_SEMICOLON = "59,34,1,1,,1033,false,true,true,false,false"
UTF16_TAB = "9,34,65535,1,,1033,false,true,true,false,false"
CSV_FILTER = "Text - txt - csv (StarCalc)"

DATE_SERIAL = (dt.date(2026, 11, 20) - dt.date(1899, 12, 30)).days


@dataclass(frozen=True)
class Cell:
    """How a cell is filled: typed like a user (``typed``), or a value/string and a format."""

    typed: str | None = None  # passed to setFormula: the input line, as if typed
    value: float | None = None
    text: str | None = None  # setString: always a text cell
    fmt: str | None = None  # number format code (en-US)


@dataclass(frozen=True)
class Row:
    kind: str
    event: Cell | None = None
    key: Cell | None = None
    door: str = ""
    note: str = ""
    hide: bool = False  # hidden by the user (after the filter was applied)
    merge_event_rows: int = 0  # merge the event cell down over this many rows
    what: str = ""  # a word for the README/manifest


def _ev(uuid: str) -> Cell:
    return Cell(text=uuid)


TEXT = "@"

# Row 1 and 2 are titles, row 3 the header, data from row 4 (rows as the sheet shows them).
SCANS: list[Row] = [
    Row("title", Cell(text="Door scans, Harbor City summit"), what="title row"),
    Row("title", Cell(text="Exported 2026-11-20 by the events team"), what="second title row"),
    Row("header", Cell(text="event_id"), Cell(text="order_ticket_key"), "Door", "Note"),
    Row("number", _ev(EVENT_A), Cell(typed="123456"), "North", what="integer, General"),
    Row("number", _ev(EVENT_A), Cell(value=float(2**53 - 1)), "North", what="2^53-1, General"),
    Row(
        "number",
        _ev(EVENT_A),
        Cell(typed="9007199254740993"),
        "North",
        what="2^53+1 typed, General (not a double)",
    ),
    Row("number", _ev(EVENT_A), Cell(typed="1234567890123456"), "North", what="16 digits"),
    Row("number", _ev(EVENT_A), Cell(typed="12345678901234567"), "North", what="17 digits"),
    Row("number", _ev(EVENT_A), Cell(typed="12345678901234567890"), "North", what="20 digits"),
    Row(
        "number-formatted",
        _ev(EVENT_A),
        Cell(value=123, fmt="000000"),
        "North",
        what="123 with format 000000",
    ),
    Row(
        "number",
        _ev(EVENT_A),
        Cell(typed="0025418658"),
        "North",
        what="0025418658 typed into a General cell",
    ),
    Row(
        "text",
        _ev(EVENT_A),
        Cell(text="000123", fmt=TEXT),
        "North",
        what="Text-formatted cell, leading zeros",
    ),
    Row("text", _ev(EVENT_A), Cell(text="a1b2c3d4e5f6"), "North", what="plain text key"),
    Row(
        "date",
        _ev(EVENT_B),
        Cell(value=DATE_SERIAL, fmt="YYYY-MM-DD"),
        "North",
        what="date shown 2026-11-20",
    ),
    Row(
        "date",
        _ev(EVENT_B),
        Cell(value=DATE_SERIAL, fmt="MM/DD/YY"),
        "North",
        what="the same date shown 11/20/26",
    ),
    Row("time", _ev(EVENT_B), Cell(value=0.5 + 1 / 48, fmt="HH:MM"), "North", what="12:30"),
    Row("bool", _ev(EVENT_B), Cell(value=1, fmt="BOOLEAN"), "North", what="TRUE"),
    Row("bool", _ev(EVENT_B), Cell(value=0, fmt="BOOLEAN"), "North", what="FALSE"),
    Row("percent", _ev(EVENT_B), Cell(value=0.5, fmt="0%"), "North", what="50%"),
    Row("currency", _ev(EVENT_B), Cell(value=100, fmt="[$$-409]#,##0"), "North", what="$100"),
    Row(
        "scientific", _ev(EVENT_B), Cell(typed="1e5"), "North", what="1e5 typed into a General cell"
    ),
    Row(
        "scientific",
        _ev(EVENT_B),
        Cell(value=100000, fmt="0.00E+00"),
        "North",
        what="100000 with a scientific format",
    ),
    Row(
        "scientific",
        _ev(EVENT_B),
        Cell(typed="1E+309"),
        "North",
        what="1E+309 typed (beyond a double)",
    ),
    Row("error", _ev(EVENT_B), Cell(typed="=NA()"), "North", what="#N/A"),
    Row("error", _ev(EVENT_B), Cell(typed="=1/0"), "North", what="#DIV/0!"),
    Row("formula", _ev(EVENT_C), Cell(typed="=1+2"), "North", what="=1+2"),
    Row(
        "formula-text",
        _ev(EVENT_C),
        Cell(typed='="a1b2c3"&"d4e5f6"'),
        "North",
        what="formula giving text",
    ),
    Row(
        "merged",
        _ev(EVENT_C),
        Cell(text="m00000000001"),
        "North",
        merge_event_rows=3,
        what="event cell merged over this row and the next two",
    ),
    Row("merged", None, Cell(text="m00000000002"), "North", what="under the merged event"),
    Row("merged", None, Cell(text="m00000000003"), "North", what="under the merged event"),
    Row(
        "hidden",
        _ev(EVENT_C),
        Cell(text="h00000000001"),
        "North",
        hide=True,
        what="row hidden by the user",
    ),
    Row(
        "hidden",
        _ev(EVENT_C),
        Cell(text="h00000000002"),
        "North",
        hide=True,
        what="row hidden by the user",
    ),
    Row(
        "filtered",
        _ev(EVENT_C),
        Cell(text="f00000000001"),
        "South",
        what="filtered out by the autofilter (Door is not South)",
    ),
    Row(
        "filtered",
        _ev(EVENT_C),
        Cell(text="f00000000002"),
        "South",
        what="filtered out by the autofilter (Door is not South)",
    ),
    Row("blank", what="an empty row"),
    Row("note", note="Scanner 3 offline 14:00-14:20", what="only a note, no event or key"),
    Row(
        "newline",
        _ev(EVENT_C),
        Cell(text="abc123\ndef456"),
        "North",
        what="key with an embedded newline",
    ),
    Row(
        "non-cp1252",
        _ev(EVENT_C),
        Cell(text="Łb2c3d4e5f6"),
        "North",
        what="Ł is not in cp1252 (becomes ? in the cp1252 CSV)",
    ),
    Row("euro", _ev(EVENT_C), Cell(text="€1b2c3d4e5f6"), "North", what="€ is in cp1252 (0x80)"),
    Row(
        "text",
        _ev(EVENT_C),
        Cell(text=" 0000a1b2c3d4 "),
        "North",
        what="text key with surrounding spaces",
    ),
]
FILTER_COLUMN = 2  # "Door", column C: the autofilter keeps Door <> "South"
HEADER_ROW = 3

EXTRA: list[Row] = [
    Row("header", Cell(text="Event ID"), Cell(text="Ticket Key")),
    Row("text", _ev(EVENT_A), Cell(text="0000c0ffee00", fmt=TEXT)),
    Row("number", _ev(EVENT_A), Cell(typed="654321")),
    Row("text", _ev(EVENT_B), Cell(text="ffeeddccbbaa")),
]

# A plain CSV of text keys, then opened in LibreOffice and saved as .xlsx.
ROUNDTRIP_KEYS = [
    "000123",
    "0025418658",
    "123456",
    "12345678901234567890",
    "1e5",
    "1E+309",
    "=1+2",
    "2026-11-20",
    "11/20/26",
    "12:30",
    "TRUE",
    "50%",
    "$100",
    "#N/A",
    "a1b2c3d4e5f6",
    "00012e3",
]


# --- LibreOffice over UNO ----------------------------------------------------------------------


def _prop(name: str, value: Any) -> Any:
    pv = uno.createUnoStruct("com.sun.star.beans.PropertyValue")
    pv.Name = name
    pv.Value = value
    return pv


def _url(path: Path) -> str:
    return path.resolve().as_uri()


@contextlib.contextmanager
def libreoffice() -> Iterator[Any]:
    """A headless soffice with a fresh profile; yields its Desktop."""
    profile = Path(tempfile.mkdtemp(prefix="lo-profile-corpus-"))
    pipe = f"corpus{os.getpid()}"
    proc = subprocess.Popen(  # noqa: S603
        [
            SOFFICE,
            f"-env:UserInstallation={_url(profile)}",
            "--headless",
            "--invisible",
            "--nologo",
            "--norestore",
            "--nodefault",
            f"--accept=pipe,name={pipe};urp;StarOffice.ComponentContext",
        ],
        env={**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, so it can be ended as a whole
    )
    desktop = None
    try:
        local = uno.getComponentContext()
        resolver = local.ServiceManager.createInstanceWithContext(
            "com.sun.star.bridge.UnoUrlResolver", local
        )
        ctx = None
        for _ in range(120):
            try:
                ctx = resolver.resolve(f"uno:pipe,name={pipe};urp;StarOffice.ComponentContext")
                break
            except Exception:  # NoConnectException until soffice listens
                time.sleep(0.5)
        if ctx is None:
            raise RuntimeError("soffice did not start listening")
        _no_thumbnails(ctx)
        desktop = ctx.ServiceManager.createInstanceWithContext("com.sun.star.frame.Desktop", ctx)
        yield desktop
    finally:
        if desktop is not None:
            with contextlib.suppress(Exception):  # terminate() drops the connection it uses
                desktop.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this function started, nothing else
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def _no_thumbnails(ctx: Any) -> None:
    """Keep .ods small: no Thumbnails/thumbnail.png (a setting of this throw-away profile)."""
    provider = ctx.ServiceManager.createInstanceWithContext(
        "com.sun.star.configuration.ConfigurationProvider", ctx
    )
    access = provider.createInstanceWithArguments(
        "com.sun.star.configuration.ConfigurationUpdateAccess",
        (_prop("nodepath", "/org.openoffice.Office.Common/Save/Document"),),
    )
    access.setPropertyValue("GenerateThumbnail", False)
    access.commitChanges()


def lo_version() -> str:
    out = subprocess.run(  # noqa: S603
        [SOFFICE, "--version"], capture_output=True, text=True, check=True
    ).stdout
    return out.strip()


def _format_key(doc: Any, code: str) -> int:
    locale = uno.createUnoStruct("com.sun.star.lang.Locale")
    locale.Language, locale.Country = "en", "US"
    formats = doc.NumberFormats
    key = int(formats.queryKey(code, locale, False))
    if key == -1:
        key = int(formats.addNew(code, locale))
    return key


def _fill(doc: Any, sheet: Any, col: int, row: int, spec: Cell) -> None:
    cell = sheet.getCellByPosition(col, row)
    if spec.fmt is not None:
        cell.NumberFormat = _format_key(doc, spec.fmt)
    if spec.typed is not None:
        cell.setFormula(spec.typed)
    elif spec.value is not None:
        cell.setValue(spec.value)
    elif spec.text is not None:
        cell.setString(spec.text)


def _fill_sheet(doc: Any, sheet: Any, rows: list[Row]) -> None:
    for index, row in enumerate(rows):
        if row.event is not None:
            _fill(doc, sheet, 0, index, row.event)
        if row.key is not None:
            _fill(doc, sheet, 1, index, row.key)
        if row.door:
            sheet.getCellByPosition(2, index).setString(row.door)
        if row.note:
            sheet.getCellByPosition(3, index).setString(row.note)
    for index, row in enumerate(rows):
        if row.merge_event_rows > 1:
            sheet.getCellRangeByPosition(0, index, 0, index + row.merge_event_rows - 1).merge(True)
    columns = sheet.Columns
    for col, width in enumerate((9000, 6500, 2500, 6000)):  # 1/100 mm: wide enough to show all
        columns.getByIndex(col).Width = width


def build_workbook(desktop: Any) -> Any:
    hidden = (_prop("Hidden", True),)
    doc = desktop.loadComponentFromURL("private:factory/scalc", "_blank", 0, hidden)
    sheets = doc.Sheets
    scans = sheets.getByIndex(0)
    scans.Name = "Scans"
    while sheets.Count > 1:
        sheets.removeByName(sheets.getByIndex(1).Name)
    sheets.insertNewByName("Extra", 1)
    _fill_sheet(doc, scans, SCANS)
    _fill_sheet(doc, sheets.getByName("Extra"), EXTRA)

    # The autofilter: the sheet's own (unnamed) database range, as Data > AutoFilter makes it.
    last = len(SCANS) - 1
    area = scans.getCellRangeByPosition(0, HEADER_ROW - 1, 3, last).RangeAddress
    unnamed = doc.getPropertyValue("UnnamedDatabaseRanges")
    unnamed.setByTable(area)
    dbrange = unnamed.getByTable(0)
    dbrange.AutoFilter = True
    descriptor = dbrange.getFilterDescriptor()
    descriptor.ContainsHeader = True
    condition = uno.createUnoStruct("com.sun.star.sheet.TableFilterField2")
    condition.Field = FILTER_COLUMN
    condition.Operator = uno.getConstantByName("com.sun.star.sheet.FilterOperator2.NOT_EQUAL")
    condition.IsNumeric = False
    condition.StringValue = "South"
    descriptor.setFilterFields2((condition,))
    dbrange.refresh()
    # Rows hidden by hand after filtering (filtering again would show them).
    for index, row in enumerate(SCANS):
        if row.hide:
            scans.Rows.getByIndex(index).IsVisible = False
    doc.CurrentController.setActiveSheet(scans)
    return doc


def store(doc: Any, path: Path, filter_name: str, options: str | None = None) -> None:
    props = [_prop("FilterName", filter_name), _prop("Overwrite", True)]
    if options is not None:
        props.append(_prop("FilterOptions", options))
    doc.storeToURL(_url(path), tuple(props))


def load(
    desktop: Any, path: Path, filter_name: str | None = None, options: str | None = None
) -> Any:
    props = [_prop("Hidden", True)]
    if filter_name is not None:
        props.append(_prop("FilterName", filter_name))
    if options is not None:
        props.append(_prop("FilterOptions", options))
    return desktop.loadComponentFromURL(_url(path), "_blank", 0, tuple(props))


def export_shown(doc: Any, path: Path) -> list[Path]:
    """LibreOffice's "as shown" CSV of every sheet, renamed <file>.<Sheet>.shown.csv."""
    tmp = Path(tempfile.mkdtemp(prefix="corpus-shown-"))
    try:
        store(doc, tmp / "x.csv", CSV_FILTER, SHOWN_ALL_SHEETS)
        written = []
        for index in range(doc.Sheets.Count):
            name = doc.Sheets.getByIndex(index).Name
            target = path.with_name(f"{path.name}.{name}.shown.csv")
            shutil.move(tmp / f"x-{name}.csv", target)
            written.append(target)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- what LibreOffice reports about a (reopened) workbook -------------------------------------

_CELL_TYPES = {"EMPTY": "empty", "VALUE": "number", "TEXT": "text", "FORMULA": "formula"}


def _merged_area(sheet: Any, col: int, row: int) -> str | None:
    cursor = sheet.createCursorByRange(sheet.getCellByPosition(col, row))
    cursor.collapseToMergedArea()
    a = cursor.RangeAddress
    if (a.StartColumn, a.StartRow, a.EndColumn, a.EndRow) == (col, row, col, row):
        return None
    return f"{chr(65 + a.StartColumn)}{a.StartRow + 1}:{chr(65 + a.EndColumn)}{a.EndRow + 1}"


def _cell_report(doc: Any, sheet: Any, col: int, row: int) -> dict[str, Any]:
    """The cell as LibreOffice holds it: type, number format, value or formula, merge."""
    cell = sheet.getCellByPosition(col, row)
    kind = _CELL_TYPES[cell.Type.value]
    report: dict[str, Any] = {"type": kind}
    fmt = str(doc.NumberFormats.getByKey(int(cell.NumberFormat)).FormatString)
    if kind != "empty":
        report["format"] = fmt
    if kind == "number":
        report["value"] = cell.getValue()
    if kind == "formula":
        report["formula"] = cell.getFormula()
        error = int(cell.getError())
        if error:
            report["error"] = error  # LibreOffice's error code (532 #DIV/0!, 32767 #N/A)
        else:
            report["result"] = "number" if int(cell.FormulaResultType2) == 1 else "text"
    area = _merged_area(sheet, col, row)
    if area is not None:
        report["merged"] = area
    return report


def _shown(sheet: Any, col: int, row: int) -> str:
    return str(sheet.getCellByPosition(col, row).getString())


def describe_sheet(doc: Any, sheet: Any, rows: list[Row]) -> list[dict[str, Any]]:
    """One entry a row: what is shown, what kind it was built as, what LibreOffice kept."""
    described = []
    merged_event = ""
    for index, spec in enumerate(rows):
        record = sheet.Rows.getByIndex(index)
        event_cell = _cell_report(doc, sheet, 0, index)
        event = _shown(sheet, 0, index)
        entry: dict[str, Any] = {"row": index + 1, "kind": spec.kind}
        if "merged" in event_cell:
            if event:
                merged_event = event
            else:  # a covered cell: the user sees the merged cell's value
                event = merged_event
                entry["event_covered_by_merge"] = True
        entry["event"] = event
        entry["key"] = _shown(sheet, 1, index)
        door, note = _shown(sheet, 2, index), _shown(sheet, 3, index)
        if door:
            entry["door"] = door
        if note:
            entry["note"] = note
        entry["hidden"] = not bool(record.IsVisible)
        entry["filtered"] = bool(record.IsFiltered)
        entry["key_cell"] = _cell_report(doc, sheet, 1, index)
        if event_cell["type"] != "text" or set(event_cell) - {"type", "format"}:
            entry["event_cell"] = event_cell
        described.append(entry)
    return described


def describe_workbook(doc: Any) -> dict[str, Any]:
    sheets = doc.Sheets
    filt = doc.getPropertyValue("UnnamedDatabaseRanges")
    autofilter = None
    if filt.hasByTable(0):
        db = filt.getByTable(0)
        fields = db.getFilterDescriptor().getFilterFields2()
        autofilter = {
            "rows": [db.DataArea.StartRow + 1, db.DataArea.EndRow + 1],
            "buttons": bool(db.AutoFilter),
            "conditions": [
                {"column": int(f.Field), "operator2": int(f.Operator), "value": f.StringValue}
                for f in fields
            ],
        }
    return {
        "autofilter": autofilter,
        "sheets": {
            "Scans": describe_sheet(doc, sheets.getByName("Scans"), SCANS),
            "Extra": describe_sheet(doc, sheets.getByName("Extra"), EXTRA),
        },
    }


def meant(rows: list[Row]) -> list[dict[str, Any]]:
    """What each row of the Scans sheet was built to be (the same for every format)."""
    out = []
    for index, spec in enumerate(rows):
        entry: dict[str, Any] = {"row": index + 1, "kind": spec.kind}
        if spec.what:
            entry["what"] = spec.what
        if spec.hide:
            entry["hidden_by_user"] = True
        if spec.door == "South":
            entry["filtered_out"] = True
        out.append(entry)
    return out


# --- CSVs --------------------------------------------------------------------------------------


def describe_csv(path: Path, encoding: str, delimiter: str, rows: list[Row]) -> dict[str, Any]:
    """Each CSV record, numbered as a spreadsheet would number it, with the kind of its row."""
    text = path.read_bytes().decode(encoding)
    records = list(csv.reader(text.splitlines(keepends=True), delimiter=delimiter))
    out = []
    for number, record in enumerate(records, start=1):
        cells = [*record, "", "", "", ""]
        entry: dict[str, Any] = {
            "row": number,
            "kind": rows[number - 1].kind if number <= len(rows) else "?",
            "event": cells[0],
            "key": cells[1],
        }
        if cells[3]:
            entry["note"] = cells[3]
        out.append(entry)
    return {
        "encoding": encoding,
        "delimiter": delimiter,
        "every_row_exported": len(records) == len(rows),  # hidden and filtered rows too?
        "records": out,
    }


def write_roundtrip_source(path: Path) -> None:
    lines = ["event_id,order_ticket_key\r\n"]
    lines += [f"{EVENT_A},{key}\r\n" for key in ROUNDTRIP_KEYS]
    path.write_bytes("".join(lines).encode("utf-8"))


def describe_roundtrip(doc: Any) -> list[dict[str, Any]]:
    sheet = doc.Sheets.getByIndex(0)
    return [
        {
            "row": index + 1,
            "kind": "csv-text",
            "text_in_csv": typed,
            "event": _shown(sheet, 0, index),
            "key": _shown(sheet, 1, index),
            "key_cell": _cell_report(doc, sheet, 1, index),
        }
        for index, typed in enumerate(ROUNDTRIP_KEYS, start=1)
    ]


def _dump(value: Any, indent: str = "") -> str:
    """JSON with one line per row (a dict holding "row"), so diffs and reading stay easy."""
    if isinstance(value, dict) and "row" not in value:
        inner = indent + "  "
        items = [f"{inner}{json.dumps(k)}: {_dump(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and value and isinstance(value[0], dict):
        inner = indent + "  "
        return "[\n" + ",\n".join(inner + _dump(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value, ensure_ascii=False)


# --- main --------------------------------------------------------------------------------------


def main() -> int:
    out = HERE
    version = lo_version()
    manifest: dict[str, Any] = {
        "made_by": version,
        "script": "tests/office_corpus/make_corpus.py",
        "rows": "numbered as the spreadsheet shows them (row 1 is the first line)",
        "header_row": {"Scans": HEADER_ROW, "Extra": 1},
        "autofilter_meant": {"column": "C (Door)", "keeps": "Door <> South"},
        "scans_rows_meant": meant(SCANS),
        "files": {},
    }
    files: dict[str, Any] = manifest["files"]
    with libreoffice() as desktop:
        doc = build_workbook(desktop)
        workbooks = {
            "scans.xlsx": "Calc MS Excel 2007 XML",
            "scans.xls": "MS Excel 97",
            "scans.ods": "calc8",
        }
        for name, filter_name in workbooks.items():
            store(doc, out / name, filter_name)
        doc.CurrentController.setActiveSheet(doc.Sheets.getByName("Scans"))
        store(doc, out / "scans-cp1252-semicolon.csv", CSV_FILTER, CP1252_SEMICOLON)
        store(doc, out / "scans-utf16-tab.csv", CSV_FILTER, UTF16_TAB)
        doc.close(True)

        for name in workbooks:
            reopened = load(desktop, out / name)
            shown = export_shown(reopened, out / name)
            files[name] = {
                "shown_csv": [p.name for p in shown],
                **describe_workbook(reopened),
            }
            reopened.close(True)

        files["scans-cp1252-semicolon.csv"] = {
            "saved_from": "the Scans sheet, Save cell contents as shown, cp1252, ';'",
            **describe_csv(out / "scans-cp1252-semicolon.csv", "cp1252", ";", SCANS),
        }
        files["scans-utf16-tab.csv"] = {
            "saved_from": "the Scans sheet, Save cell contents as shown, UTF-16, tab",
            **describe_csv(out / "scans-utf16-tab.csv", "utf-16", "\t", SCANS),
        }

        source = out / "roundtrip-source.csv"
        write_roundtrip_source(source)
        # Opened with the import filter's defaults (no options, as --convert-to does) ...
        plain = load(desktop, source, CSV_FILTER)
        store(plain, out / "roundtrip.xlsx", "Calc MS Excel 2007 XML")
        plain.close(True)
        # ... and as Excel opens a CSV: special numbers detected, formulas evaluated.
        excel_like = load(
            desktop, source, CSV_FILTER, "44,34,76,1,,1033,false,true,false,false,false,0,true"
        )
        store(excel_like, out / "roundtrip-special.xlsx", "Calc MS Excel 2007 XML")
        excel_like.close(True)
        for name, how in (
            ("roundtrip.xlsx", "CSV filter defaults (no options), saved as .xlsx"),
            (
                "roundtrip-special.xlsx",
                "CSV options 44,34,76,1,,1033,false,true,false,false,false,0,true "
                "(detect special numbers, evaluate formulas), saved as .xlsx",
            ),
        ):
            reopened = load(desktop, out / name)
            shown = export_shown(reopened, out / name)
            files[name] = {
                "made_from": f"roundtrip-source.csv opened with {how}",
                "shown_csv": [p.name for p in shown],
                "sheet": reopened.Sheets.getByIndex(0).Name,
                "rows": describe_roundtrip(reopened),
            }
            reopened.close(True)

    (out / "expected.json").write_text(_dump(manifest) + "\n", encoding="utf-8")
    print(version)
    for path in sorted(out.iterdir()):
        if path.name not in {"make_corpus.py", "README.md"}:
            print(f"{path.stat().st_size:>8}  {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
