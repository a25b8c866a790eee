"""Identity columns: ``read_inputs(identity_columns=...)`` gives each row the values of more
input columns, as a person sees them, in the frame's ``identity`` column (see
``batchjob.read.Inputs``). Every file is written for real in tmp_path: CSV and TSV as text,
.xlsx by openpyxl, .xls (BIFF8) and .ods by the small writers below, as an office suite lays
them out."""

from __future__ import annotations

import csv
import datetime as dt
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import openpyxl
import pandas as pd
import pytest

from batchjob._errors import InputError
from batchjob.read import FRAME_COLUMNS, HIDDEN_PROBLEM, IDENTITY_COLUMN, Inputs, read_inputs
from tests.support import compound_file, write_ods_content

EVENT = "07216444-4e3b-41ea-a3b8-5a418fce41f4"
SEP = "\x1f"
CORPUS = Path(__file__).parent / "office_corpus"

Value = str | int | float | bool | dt.date | None  # None: an empty cell
Rows = Sequence[Sequence[Value]]


# --- writers ------------------------------------------------------------------------------------


def _text_file(delimiter: str) -> Callable[..., Path]:
    def write(path: Path, sheets: Mapping[str, Rows], **_: object) -> Path:
        (rows,) = sheets.values()
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, delimiter=delimiter, lineterminator="\n")
            writer.writerows([["" if v is None else str(v) for v in row] for row in rows])
        return path

    return write


def write_xlsx(
    path: Path,
    sheets: Mapping[str, Rows],
    hidden: Sequence[int] = (),
    merge: tuple[int, int, int] | None = None,
) -> Path:
    """``hidden``: 1-based rows of the first sheet; ``merge``: (0-based column, first row, last
    row) merged in the first sheet."""
    book = openpyxl.Workbook()
    book.remove(book.active)
    for title, rows in sheets.items():
        sheet = book.create_sheet(title)
        for row in rows:
            # openpyxl refuses control characters; Excel stores them escaped, as _x001F_.
            sheet.append([v.replace(SEP, "_x001F_") if isinstance(v, str) else v for v in row])
    first = book.worksheets[0]
    for number in hidden:
        first.row_dimensions[number].hidden = True
    if merge is not None:
        col, top, bottom = merge
        first.merge_cells(start_row=top, end_row=bottom, start_column=col + 1, end_column=col + 1)
    book.save(path)
    return path


def _record(kind: int, data: bytes) -> bytes:
    return struct.pack("<HH", kind, len(data)) + data


def _biff_text(text: str) -> bytes:
    if text.isascii():
        return struct.pack("<HB", len(text), 0) + text.encode("latin-1")
    return struct.pack("<HB", len(text), 1) + text.encode("utf-16-le")


_XF_GENERAL, _XF_DATE, _XF_DATETIME = 0, 1, 2


def write_xls(
    path: Path,
    sheets: Mapping[str, Rows],
    hidden: Sequence[int] = (),
    merge: tuple[int, int, int] | None = None,
) -> Path:
    """An old-format (BIFF8) workbook as Excel lays it out: workbook globals (cell formats,
    sheets, shared strings), then each sheet's ROW and cell records, in a compound file."""
    strings: list[str] = []
    bodies: list[bytes] = []
    for index, rows in enumerate(sheets.values()):
        body = b""
        for r, row in enumerate(rows):
            flags = 0x20 if index == 0 and r + 1 in hidden else 0  # fDyZero: hidden
            body += _record(0x0208, struct.pack("<HHHHHHI", r, 0, len(row), 0xFF, 0, 0, flags))
        for r, row in enumerate(rows):
            for c, value in enumerate(row):
                body += _biff_cell(r, c, value, strings)
        if index == 0 and merge is not None:
            col, top, bottom = merge
            body += _record(0x00E5, struct.pack("<HHHHH", 1, top - 1, bottom - 1, col, col))
        bodies.append(body)
    bof = _record(0x0809, struct.pack("<HHHHII", 0x0600, 0x0005, 0, 0, 0, 0))
    eof = _record(0x000A, b"")
    # Cell formats: General, a date (built-in 14) and a date with time (built-in 22).
    xfs = b"".join(_record(0x00E0, struct.pack("<HH", 0, fmt) + bytes(16)) for fmt in (0, 14, 22))
    sst = _record(
        0x00FC,
        struct.pack("<II", len(strings), len(strings)) + b"".join(map(_biff_text, strings)),
    )
    names = [name.encode("latin-1") for name in sheets]
    entries = sum(4 + 8 + len(name) for name in names)
    at = len(bof) + len(xfs) + entries + len(sst) + len(eof)
    sheet_entries = b""
    streams = b""
    for name, body in zip(names, bodies, strict=True):
        sheet_entries += _record(0x0085, struct.pack("<IBBBB", at, 0, 0, len(name), 0) + name)
        sheet = _record(0x0809, struct.pack("<HHHHII", 0x0600, 0x0010, 0, 0, 0, 0)) + body + eof
        streams += sheet
        at += len(sheet)
    stream = bof + xfs + sheet_entries + sst + eof + streams
    stream += _record(0x003C, bytes(4096))  # past the 4096-byte mini stream cutoff
    path.write_bytes(compound_file(stream))
    return path


def _biff_cell(row: int, col: int, value: Value, strings: list[str]) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        strings.append(value)
        return _record(0x00FD, struct.pack("<HHHI", row, col, _XF_GENERAL, len(strings) - 1))
    if isinstance(value, bool):
        return _record(0x0205, struct.pack("<HHHBB", row, col, _XF_GENERAL, int(value), 0))
    if isinstance(value, dt.date):
        xf = _XF_DATETIME if isinstance(value, dt.datetime) else _XF_DATE
        moment = value if isinstance(value, dt.datetime) else dt.datetime.combine(value, dt.time())
        serial = (moment - dt.datetime(1899, 12, 30)).total_seconds() / 86400
        return _record(0x0203, struct.pack("<HHHd", row, col, xf, serial))
    return _record(0x0203, struct.pack("<HHHd", row, col, _XF_GENERAL, float(value)))


def write_ods(
    path: Path,
    sheets: Mapping[str, Rows],
    hidden: Sequence[int] = (),
    merge: tuple[int, int, int] | None = None,
) -> Path:
    """An OpenDocument spreadsheet as LibreOffice lays it out (a merge's lower cells are
    covered cells). XML 1.0 cannot hold a control character such as "\\x1f"."""
    tables = ""
    for index, (name, rows) in enumerate(sheets.items()):
        tables += f"<table:table table:name={quoteattr(name)}>"
        for r, row in enumerate(rows, start=1):
            shown = ' table:visibility="collapse"' if index == 0 and r in hidden else ""
            tables += f"<table:table-row{shown}>"
            for c, value in enumerate(row):
                spans = ""
                if index == 0 and merge is not None and merge[0] == c:
                    if r == merge[1]:
                        spans = f' table:number-rows-spanned="{merge[2] - merge[1] + 1}"'
                    elif merge[1] < r <= merge[2]:
                        tables += "<table:covered-table-cell/>"
                        continue
                tables += _ods_cell(value, spans)
            tables += "</table:table-row>"
        tables += "</table:table>"
    content = (
        '<?xml version="1.0" encoding="UTF-8"?><office:document-content '
        'xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" '
        'xmlns:table="urn:oasis:names:tc:opendocument:xmlns:table:1.0" '
        'xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0">'
        f"<office:body><office:spreadsheet>{tables}</office:spreadsheet></office:body>"
        "</office:document-content>"
    )
    return write_ods_content(path, content)


def _ods_cell(value: Value, spans: str) -> str:
    if value is None:
        return f"<table:table-cell{spans}/>"
    if isinstance(value, str):
        kind, shown = 'office:value-type="string"', value
    elif isinstance(value, bool):
        kind = f'office:value-type="boolean" office:boolean-value="{str(value).lower()}"'
        shown = str(value).upper()
    elif isinstance(value, dt.date):
        kind, shown = f'office:value-type="date" office:date-value="{value.isoformat()}"', ""
    else:
        kind, shown = f'office:value-type="float" office:value="{value!r}"', str(value)
    return f"<table:table-cell {kind}{spans}><text:p>{escape(shown)}</text:p></table:table-cell>"


WRITERS: dict[str, Callable[..., Path]] = {
    "csv": _text_file(","),
    "tsv": _text_file("\t"),
    "xlsx": write_xlsx,
    "xls": write_xls,
    "ods": write_ods,
}
SPREADSHEETS = ("xlsx", "xls", "ods")


def write(tmp_path: Path, kind: str, rows: Rows, *, name: str = "in", **extra: object) -> Path:
    return WRITERS[kind](tmp_path / f"{name}.{kind}", {"Scans": rows}, **extra)


def identities(inputs: Inputs) -> list[tuple[int, list[str]]]:
    """Each frame row's source row and identity values."""
    frame = inputs.frame
    return [
        (int(row), str(identity).split(SEP))
        for row, identity in zip(frame["source_row"], frame["identity"], strict=True)
    ]


# --- values line up with the frame's rows -------------------------------------------------------

HEADER: list[Value] = ["Scan Time", "event_id", "order_ticket_key", "Door", "Note"]
ROWS: list[list[Value]] = [
    HEADER,
    ["2026-11-20 10:00", EVENT, "K1", " North\u00a0", ""],  # row 2
    ["2026-11-21 11:00", "not-a-uuid", "K2", "South", ""],  # 3: invalid event
    ["2026-11-21 12:00", EVENT, "", "West", ""],  # 4: no key: invalid, kept
    ["", "", "", "", ""],  # 5: blank: dropped
    ["", "", "", "", "a note"],  # 6: no key and no event but a note: kept
    ["2026-11-22 09:30", EVENT, "K1", "North", ""],  # 7: K1 scanned again
    ["2026-11-23 08:00", EVENT, "K3", "East", ""],  # 8: hidden in spreadsheets
]
EXPECTED = [
    (2, ["North", "2026-11-20 10:00"]),
    (3, ["South", "2026-11-21 11:00"]),
    (4, ["West", "2026-11-21 12:00"]),
    (6, ["", ""]),
    (7, ["North", "2026-11-22 09:30"]),
    (8, ["East", "2026-11-23 08:00"]),
]


@pytest.mark.parametrize("kind", WRITERS)
def test_identity_values_line_up_with_every_row_of_the_frame(tmp_path: Path, kind: str) -> None:
    path = write(tmp_path, kind, ROWS, hidden=[8] if kind in SPREADSHEETS else [])

    inputs = read_inputs([path], identity_columns=["DOOR", "scan_time"])

    frame = inputs.frame
    assert list(frame.columns) == [*FRAME_COLUMNS, "identity"]
    assert identities(inputs) == EXPECTED  # in the order named, not the file's
    assert inputs.blank_rows == 1
    problems = frame["problem"].astype(str).tolist()
    assert problems[0] == ""
    assert problems[1] and problems[2] and problems[3]  # invalid rows have one too
    if kind in SPREADSHEETS:
        assert problems[5] == HIDDEN_PROBLEM
    assert frame["identity"].isna().sum() == 0
    assert str(frame["identity"].dtype) == "str"


@pytest.mark.parametrize("kind", WRITERS)
def test_without_identity_columns_the_frame_is_as_before(tmp_path: Path, kind: str) -> None:
    path = write(tmp_path, kind, ROWS)

    plain = read_inputs([path])
    with_identity = read_inputs([path], identity_columns=["Note"])

    assert list(plain.frame.columns) == list(FRAME_COLUMNS)
    assert "identity" not in plain.frame.columns
    pd.testing.assert_frame_equal(plain.frame, with_identity.frame.drop(columns="identity"))
    assert plain.seen == with_identity.seen
    assert read_inputs([path], identity_columns=()).frame.equals(plain.frame)


@pytest.mark.parametrize("kind", WRITERS)
@pytest.mark.parametrize(
    ("names", "values"),
    [
        (["door", "note"], ["North", "n1"]),
        (["NOTE", "Door"], ["n1", "North"]),
        ([" Door ", "n-o_t e", "SCANTIME"], ["North", "n1", "t"]),
        (["Door"], ["North"]),
    ],
)
def test_header_names_match_as_column_aliases_do_in_the_order_named(
    tmp_path: Path, kind: str, names: list[str], values: list[str]
) -> None:
    path = write(tmp_path, kind, [HEADER, ["t", EVENT, "K1", "North", "n1"]])

    assert identities(read_inputs([path], identity_columns=names)) == [(2, values)]


@pytest.mark.parametrize("kind", WRITERS)
def test_a_missing_identity_column_is_an_input_error_naming_file_and_column(
    tmp_path: Path, kind: str
) -> None:
    path = write(tmp_path, kind, [HEADER, ["t", EVENT, "K1", "North", ""]])
    where = f"{path}#Scans" if kind in SPREADSHEETS else str(path)

    with pytest.raises(InputError) as caught:
        read_inputs([path], identity_columns=["Door", "Scan Date"])

    message = str(caught.value)
    assert message.startswith(f"{where}: no column 'Scan Date' ")
    assert "[incremental] identity" in message
    assert "its columns are: Scan Time, event_id, order_ticket_key, Door, Note" in message


@pytest.mark.parametrize("kind", SPREADSHEETS)
def test_a_sheet_without_an_identity_column_is_named(tmp_path: Path, kind: str) -> None:
    path = WRITERS[kind](
        tmp_path / f"in.{kind}",
        {
            "Scans": [HEADER, ["t", EVENT, "K1", "North", ""]],
            "Late": [["event_id", "order_ticket_key"], [EVENT, "K2"]],
        },
    )

    with pytest.raises(InputError, match=r"no column 'Door' \(named in the config") as caught:
        read_inputs([path], identity_columns=["Door"])
    assert str(caught.value).startswith(f"{path}#Late: ")


def test_a_sheet_of_the_office_corpus_without_the_column_is_named() -> None:
    """A workbook LibreOffice wrote: its sheet Extra has no Door column."""
    path = CORPUS / "scans.xlsx"
    with pytest.raises(InputError) as caught:
        read_inputs([path], identity_columns=["door"])
    assert str(caught.value).startswith(f"{path}#Extra: no column 'door' ")
    assert "its columns are: Event ID, Ticket Key." in str(caught.value)


def test_a_huge_header_is_listed_clipped(tmp_path: Path) -> None:
    header = ["event_id", "order_ticket_key", "x" * 5_000, *(f"c{i}" for i in range(500))]
    path = write(tmp_path, "csv", [header, [EVENT, "K1", *[""] * 501]])

    with pytest.raises(InputError) as caught:
        read_inputs([path], identity_columns=["Door"])

    message = str(caught.value)
    assert len(message) < 1_000
    assert "xxx…, c0, c1" in message and "(473 more)" in message


@pytest.mark.parametrize("kind", WRITERS)
def test_a_header_matching_twice_is_ambiguous(tmp_path: Path, kind: str) -> None:
    path = write(tmp_path, kind, [[*HEADER, "DOOR"], ["t", EVENT, "K1", "North", "", "n"]])

    with pytest.raises(InputError, match=r"ambiguous identity column 'door'.*'Door', 'DOOR'"):
        read_inputs([path], identity_columns=["door"])


def test_an_identity_column_name_must_name_something() -> None:
    with pytest.raises(ValueError, match="is blank"):
        read_inputs([], identity_columns=[" _ "])
    with pytest.raises(TypeError, match="not one string"):
        read_inputs([], identity_columns="scan_time")


# --- what a value is ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["csv", "tsv", "xlsx", "xls"])
def test_a_unit_separator_inside_a_value_becomes_a_space(tmp_path: Path, kind: str) -> None:
    path = write(tmp_path, kind, [HEADER, ["t", EVENT, "K1", f"Gate{SEP}7", f"a{SEP}{SEP}b"]])

    inputs = read_inputs([path], identity_columns=["Door", "Note"])

    assert inputs.frame["identity"].tolist() == [f"Gate 7{SEP}a  b"]


@pytest.mark.parametrize("kind", WRITERS)
def test_values_longer_than_1000_characters_are_cut(tmp_path: Path, kind: str) -> None:
    long = "é" * 1_500
    path = write(tmp_path, kind, [HEADER, ["t", EVENT, "K1", long, "n"]])

    inputs = read_inputs([path], identity_columns=["Door", "Note"])

    assert inputs.frame["identity"].tolist() == ["é" * 1_000 + SEP + "n"]


@pytest.mark.parametrize("kind", SPREADSHEETS)
def test_spreadsheet_values_show_as_text(tmp_path: Path, kind: str) -> None:
    values: list[Value] = [
        5,
        5.0,
        0.1,
        -2.5,
        123456789012.0,
        dt.datetime(2026, 11, 20, 12, 30, 15),
        dt.date(2026, 11, 20),
        True,
        False,
        None,
        "  text ",
    ]
    rows: list[list[Value]] = [["event_id", "order_ticket_key", "Value"]]
    rows += [[EVENT, f"K{i}", value] for i, value in enumerate(values)]
    path = write(tmp_path, kind, rows)

    inputs = read_inputs([path], identity_columns=["value"])

    assert inputs.frame["identity"].tolist() == [
        "5",
        "5",
        "0.1",
        "-2.5",
        "123456789012",
        "2026-11-20T12:30:15",
        "2026-11-20",
        "TRUE",
        "FALSE",
        "",
        "text",
    ]


@pytest.mark.parametrize("kind", SPREADSHEETS)
def test_cells_covered_by_a_merge_show_its_first_cell(tmp_path: Path, kind: str) -> None:
    rows: list[list[Value]] = [
        ["event_id", "order_ticket_key", "Door"],
        [EVENT, "K1", "North"],
        [EVENT, "K2", None],  # covered by the merge of rows 2-3
        [EVENT, "K3", "South"],
    ]
    path = write(tmp_path, kind, rows, merge=(2, 2, 3))

    inputs = read_inputs([path], identity_columns=["Door"])

    assert inputs.frame["identity"].tolist() == ["North", "North", "South"]


def test_csv_rows_of_another_length_give_the_same_values(tmp_path: Path) -> None:
    """A short or long row sends the file to pandas' reader, not pyarrow's: same values."""
    even = "Door,event_id,order_ticket_key,Note\nNorth,{0},K1,n1\n South ,{0},K2,\n"
    ragged = even + "East,{0}\nWest,{0},K4,n4,extra\n"
    first = write_text(tmp_path / "even.csv", even.format(EVENT))
    second = write_text(tmp_path / "ragged.csv", ragged.format(EVENT))

    inputs = read_inputs([first, second], identity_columns=["Note", "Door"])

    assert identities(inputs) == [
        (2, ["n1", "North"]),
        (3, ["", "South"]),
        (2, ["n1", "North"]),
        (3, ["", "South"]),
        (4, ["", "East"]),
        (5, ["n4", "West"]),  # invalid (too many fields), but it has a value
    ]
    assert inputs.frame["problem"].astype(str).tolist()[-1].startswith("the row has more fields")


def test_a_windows_1252_csv_gives_its_text(tmp_path: Path) -> None:
    text = f"event_id;order_ticket_key;Door\n{EVENT};K1;Zoë’s gate\n"
    path = tmp_path / "a.csv"
    path.write_bytes(text.encode("cp1252"))

    inputs = read_inputs([path], identity_columns=["door"])

    assert inputs.frame["identity"].tolist() == ["Zoë’s gate"]


def test_a_csv_header_below_title_rows_and_quoted_line_breaks(tmp_path: Path) -> None:
    text = (
        f'Scans export\n\nevent_id,order_ticket_key,Note\n{EVENT},K1,"two\nlines"\n{EVENT},K2,x\n'
    )
    path = write_text(tmp_path / "a.csv", text)

    assert identities(read_inputs([path], identity_columns=["note"])) == [
        (4, ["two\nlines"]),
        (5, ["x"]),  # rows are records: a quoted line break is inside one
    ]


def test_files_of_every_kind_line_up_in_one_frame(tmp_path: Path) -> None:
    paths = [write(tmp_path, kind, ROWS, name=f"in-{kind}") for kind in WRITERS]

    inputs = read_inputs(paths, identity_columns=["Door", "Scan Time"])

    assert identities(inputs) == EXPECTED * len(paths)
    sources = inputs.frame["source_file"].astype(str).tolist()
    assert sources[:: len(EXPECTED)] == [
        str(path) + ("#Scans" if path.suffix[1:] in SPREADSHEETS else "") for path in paths
    ]


def test_the_event_or_key_column_named_again_is_read_as_any_other(tmp_path: Path) -> None:
    """The caller names only extra columns; naming the key or event anyway does no harm."""
    path = write(tmp_path, "csv", ROWS[:3])

    inputs = read_inputs([path], identity_columns=["event_id", "order_ticket_key"])

    assert identities(inputs) == [(2, [EVENT, "K1"]), (3, ["not-a-uuid", "K2"])]


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


def test_no_files_give_an_empty_identity_column() -> None:
    frame = read_inputs([], identity_columns=["Door"]).frame
    assert list(frame.columns) == [*FRAME_COLUMNS, IDENTITY_COLUMN]
    assert len(frame) == 0
