"""Reading exports the way users hand them to us: real files on disk, many shapes and encodings."""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import mmap
import re
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import openpyxl
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import batchjob.read._csv as csv_reader
import batchjob.read._limits as workbook_limits
from batchjob._cells import escape_cell
from batchjob._errors import InputError
from batchjob._model import REPORT_COLUMNS, ColumnAliases
from batchjob.read import Inputs, read_inputs
from batchjob.read._normalise import _ERROR as CSV_ERROR
from batchjob.read._normalise import _SCIENTIFIC as CSV_SCIENTIFIC
from tests.support import write_ods_content

EVENT = "e3a7c9b2-1111-4222-8333-444455556666"
OTHER_EVENT = "0f0e0d0c-0b0a-4909-8807-060504030201"
COLUMNS = ["event_id", "order_ticket_key", "source_file", "source_row", "problem"]


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def write_xlsx(path: Path, sheets: dict[str, Sequence[Sequence[object]]]) -> Path:
    book = openpyxl.Workbook()
    book.remove(book.active)
    for title, rows in sheets.items():
        sheet = book.create_sheet(title)
        for row in rows:
            sheet.append(list(row))
    book.save(path)
    return path


def column(result: Inputs, name: str) -> list[Any]:
    return list(result.frame[name].tolist())


def keys(result: Inputs) -> list[str]:
    return [str(key) for key in column(result, "order_ticket_key")]


def problems(result: Inputs) -> list[str]:
    return [str(problem) for problem in column(result, "problem")]


# --- columns -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event_header", "key_header"),
    [
        ("event_id", "order_ticket_key"),
        ("Event ID", "Order Ticket Key"),
        ("EVENT-ID", "Ticket Key"),
        ("EventId", "ticketkey"),
        ("  event id ", "TICKET_KEY"),
        ("Event_Id", "Order-Ticket-Key"),
    ],
)
def test_columns_are_found_whatever_their_case_spaces_underscores_or_dashes(
    tmp_path: Path, event_header: str, key_header: str
) -> None:
    path = write(tmp_path / "a.csv", f"{event_header},{key_header}\n{EVENT},K1\n")

    result = read_inputs([path])

    assert column(result, "event_id") == [EVENT]
    assert keys(result) == ["K1"]
    assert problems(result) == [""]


def test_configured_aliases_add_to_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", f"Evento;Código\n{EVENT};K1\n")
    defaults = ColumnAliases()
    aliases = ColumnAliases(
        event_id=(*defaults.event_id, "Evento"),
        order_ticket_key=(*defaults.order_ticket_key, "codigo", "Código"),
    )

    assert keys(read_inputs([path], aliases=aliases)) == ["K1"]
    with pytest.raises(InputError, match="no order ticket key column"):
        read_inputs([path])


def test_extra_columns_are_ignored_in_any_order(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.csv",
        f"Name,Order Ticket Key,Email,Event ID,Notes\nAda,K1,ada@example.com,{EVENT},vip\n",
    )

    result = read_inputs([path])

    assert list(result.frame.columns) == COLUMNS
    assert column(result, "event_id") == [EVENT]
    assert keys(result) == ["K1"]


def test_two_columns_for_the_same_thing_are_ambiguous(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", f"Event ID,Ticket Key,order_ticket_key\n{EVENT},K1,K2\n")

    with pytest.raises(InputError) as caught:
        read_inputs([path])

    message = str(caught.value)
    assert message.startswith(str(path))
    assert "'Ticket Key'" in message
    assert "'order_ticket_key'" in message


def test_a_file_without_a_key_column_names_its_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "Name,Email,Ticket\nAda,ada@example.com,K1\n")

    with pytest.raises(InputError) as caught:
        read_inputs([path])

    assert str(caught.value).startswith(
        f"{path}: no order ticket key column; its columns are: Name, Email, Ticket"
    )


# --- CSV dialects and encodings ----------------------------------------------------------------


@pytest.mark.parametrize("delimiter", [",", ";", "\t"])
def test_the_delimiter_is_detected_from_the_header(tmp_path: Path, delimiter: str) -> None:
    # The name holds the other candidates unquoted, so a wrong guess would split it.
    others = "".join(d for d in ",;" if d != delimiter)
    rows = [
        ["Name", "Event ID", "Order Ticket Key"],
        [f"Smith{others} John", EVENT, "K1"],
        ["Doe", OTHER_EVENT, "K2"],
    ]
    path = write(tmp_path / "a.txt", "\n".join(delimiter.join(row) for row in rows) + "\n")

    result = read_inputs([path])

    assert keys(result) == ["K1", "K2"]
    assert column(result, "event_id") == [EVENT, OTHER_EVENT]


def test_a_tsv_file_is_read(tmp_path: Path) -> None:
    path = write(tmp_path / "a.tsv", f"Event ID\tTicket Key\n{EVENT}\tK1\n")

    assert keys(read_inputs([path])) == ["K1"]


def _utf16_be_with_bom(text: str) -> bytes:
    return codecs.BOM_UTF16_BE + text.encode("utf-16-be")


@pytest.mark.parametrize(
    "encode",
    [
        lambda text: text.encode("utf-8"),
        lambda text: text.encode("utf-8-sig"),
        lambda text: text.encode("utf-16"),  # little-endian with a BOM on this platform
        _utf16_be_with_bom,
        lambda text: text.encode("cp1252"),
    ],
    ids=["utf-8", "utf-8-bom", "utf-16-le-bom", "utf-16-be-bom", "cp1252"],
)
def test_encodings_are_detected(tmp_path: Path, encode: Callable[[str], bytes]) -> None:
    text = f"Prénom,Event ID,Order Ticket Key\nJosé,{EVENT},clé-1\nRenée,{EVENT},K2\n"
    path = tmp_path / "a.csv"
    path.write_bytes(encode(text))

    result = read_inputs([path])

    assert keys(result) == ["clé-1", "K2"]
    assert column(result, "event_id") == [EVENT, EVENT]
    assert column(result, "source_row") == [2, 3]


def test_non_ascii_header_names_are_decoded_in_messages(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "Prénom;Société\nJosé;Café\n", encoding="cp1252")

    with pytest.raises(InputError, match="its columns are: Prénom, Société"):
        read_inputs([path])


def test_cp1252_is_detected_from_bytes_far_into_the_file(tmp_path: Path) -> None:
    # The first 300 KB are plain ASCII; only a late key shows the file is not UTF-8.
    filler = "".join(f"{EVENT},K{i}\n" for i in range(8000))
    path = write(tmp_path / "a.csv", f"Event ID,Ticket Key\n{filler}{EVENT},clé\n", "cp1252")

    result = read_inputs([path])

    assert keys(result)[-1] == "clé"
    assert len(result.frame) == 8001


def test_cp1252_far_into_the_file_is_detected_in_the_event_column_too(tmp_path: Path) -> None:
    filler = "".join(f"{EVENT},K{i}\n" for i in range(8000))
    path = write(tmp_path / "a.csv", f"Event ID,Ticket Key\n{filler}évènement,K\n", "cp1252")

    result = read_inputs([path])

    assert problems(result)[-1] == "column 'Event ID': 'évènement' is not a UUID"


@pytest.mark.parametrize(
    ("prefix", "late_bytes", "expected"),
    [
        (b"", b"\x81", "neither UTF-8 nor Windows-1252"),
        (codecs.BOM_UTF8, b"\xe9", "starts with a UTF-8 byte order mark\\): row 8002 holds"),
    ],
)
def test_undecodable_bytes_far_into_the_file_are_an_input_error(
    tmp_path: Path, prefix: bytes, late_bytes: bytes, expected: str
) -> None:
    filler = "".join(f"{EVENT},K{i}\n" for i in range(8000)).encode()
    path = tmp_path / "a.csv"
    path.write_bytes(
        prefix + b"Event ID,Ticket Key\n" + filler + EVENT.encode() + b",K" + late_bytes
    )

    with pytest.raises(InputError, match=expected) as caught:
        read_inputs([path])
    assert str(caught.value).startswith(f"{path}: ")


@pytest.mark.parametrize("row", [2, 5])
def test_a_file_with_a_utf8_bom_and_a_bad_byte_early_names_its_row(
    tmp_path: Path, row: int
) -> None:
    """Within the first 256 KiB the message had no row."""
    lines = [f"{EVENT},K{i}".encode() for i in range(5)]
    lines[row - 2] = EVENT.encode() + b",K\xff1"
    path = tmp_path / "a.csv"
    path.write_bytes(codecs.BOM_UTF8 + b"Event ID,Ticket Key\n" + b"\n".join(lines) + b"\n")

    with pytest.raises(InputError) as caught:
        read_inputs([path])
    assert str(caught.value).startswith(
        f"{path}: is not valid UTF-8 (it starts with a UTF-8 byte order mark): row {row} holds "
    )


@pytest.mark.parametrize("blank_lines", [0, 2])
def test_an_unclosed_quote_names_the_row_that_opens_it(tmp_path: Path, blank_lines: int) -> None:
    """pandas said "EOF inside string starting at row 1" for row 2."""
    path = tmp_path / "a.csv"
    path.write_text(
        "\n" * blank_lines
        + f'Event ID,Ticket Key,Name\n{EVENT},"K""1",a\n{EVENT},"K2,b\n{EVENT},K3,c\n'
    )

    with pytest.raises(InputError) as caught:
        read_inputs([path])
    assert str(caught.value).startswith(
        f'{path}: row {3 + blank_lines} opens a quote (") that is never closed'
    )


def test_bytes_that_are_neither_utf8_nor_cp1252_are_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_bytes(b"Event ID,Ticket Key\n\x81\x8d,K1\n")

    with pytest.raises(InputError, match="cannot be decoded") as caught:
        read_inputs([path])
    assert str(caught.value).startswith(str(path))


def test_quoted_newlines_and_blank_lines_keep_spreadsheet_row_numbers(tmp_path: Path) -> None:
    text = (
        "Name,Event ID,Order Ticket Key\n"  # row 1
        f'"Ada\nLovelace",{EVENT},K1\n'  # row 2, two physical lines
        "\n"  # row 3, blank
        ",,\n"  # row 4, blank
        f"Bob,{EVENT},K2\n"  # row 5
        'only a name,"",""\n'  # row 6, content but no key and no event: invalid (issue 9)
        f'"Multi\r\nline\r\nnote",{EVENT},"K3"\n'  # row 7
        f"Eve,{EVENT},K4"  # row 8, no final newline
    )
    path = write(tmp_path / "a.csv", text)

    result = read_inputs([path])

    assert keys(result) == ["K1", "K2", "", "K3", "K4"]
    assert column(result, "source_row") == [2, 5, 6, 7, 8]
    assert column(result, "problem")[2] == "row has content but no key and no event"
    assert result.blank_rows == 2


def test_blank_lines_above_the_header_shift_row_numbers(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", f"\n,,\nEvent ID,Ticket Key\n{EVENT},K1\n")

    result = read_inputs([path])

    assert keys(result) == ["K1"]
    assert column(result, "source_row") == [4]


def test_quoted_newlines_survive_in_a_file_larger_than_the_parsers_blocks(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Event ID", "Order Ticket Key", "Note"])
        for i in range(60_000):
            writer.writerow([EVENT, f"K{i}", "line one\nline two\nline three" if i % 3 else "-"])

    result = read_inputs([path])

    assert keys(result) == [f"K{i}" for i in range(60_000)]
    assert column(result, "source_row")[-1] == 60_001


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_a_large_file_without_quotes_reads_the_same_as_one_with_them(
    tmp_path: Path, newline: str
) -> None:
    # Without a quote anywhere the file is split into blocks at any newline; one quoted cell at
    # the very end makes the reader follow quotes instead. Both must read the same rows.
    lines = [f"{EVENT},K{i},note {i}" for i in range(60_000)]
    plain = write(tmp_path / "plain.csv", newline.join(["Event ID,Ticket Key,Note", *lines, ""]))
    quoted = write(
        tmp_path / "quoted.csv", newline.join(["Event ID,Ticket Key,Note", *lines, '"x"', ""])
    )

    fast, slow = read_inputs([plain]), read_inputs([quoted])

    assert keys(fast) == [f"K{i}" for i in range(60_000)]
    assert column(fast, "source_row") == list(range(2, 60_002))
    assert keys(slow)[:-1] == keys(fast)
    assert problems(fast) == [""] * 60_000


def test_a_file_that_cannot_be_memory_mapped_is_read_as_a_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise OSError("mmap not supported")

    monkeypatch.setattr(mmap, "mmap", refuse)
    path = write(tmp_path / "a.csv", f'Event ID,Ticket Key,Note\n{EVENT},K1,"a\nb"\n{EVENT},K2,c\n')

    result = read_inputs([path])

    assert keys(result) == ["K1", "K2"]
    assert column(result, "source_row") == [2, 3]


@pytest.mark.parametrize("padded", [" K5", "K5 ", "K5\u00a0", " \u00a0K5 "])
def test_one_padded_key_among_many_clean_ones_is_stripped(tmp_path: Path, padded: str) -> None:
    rows = [f"{EVENT},K{i}" for i in range(5)] + [f"{EVENT},{padded}"]
    path = write(tmp_path / "a.csv", "\n".join(["Event ID,Ticket Key", *rows, ""]))

    assert keys(read_inputs([path])) == [f"K{i}" for i in range(5)] + ["K5"]


@pytest.mark.parametrize("padded", ["K5\t", "\u3000K5"])
def test_a_key_padded_with_other_whitespace_is_invalid_and_unchanged(
    tmp_path: Path, padded: str
) -> None:
    rows = [f"{EVENT},K{i}" for i in range(5)] + [f"{EVENT},{padded}"]
    path = write(tmp_path / "a.csv", "\n".join(["Event ID,Ticket Key", *rows, ""]))

    result = read_inputs([path])

    assert keys(result) == [f"K{i}" for i in range(5)] + [padded]
    assert problems(result)[:5] == [""] * 5
    assert problems(result)[5] in (CONTROL, INVISIBLE)


def test_rows_with_missing_or_extra_fields(tmp_path: Path) -> None:
    text = (
        "Event ID,Order Ticket Key,Name\n"
        f"{EVENT},K1,Ada\n"  # row 2
        f"{EVENT},K2\n"  # row 3: short, the missing name does not matter
        f"{EVENT}\n"  # row 4: short, no key
        "   \n"  # row 5: whitespace only, blank
        f"{EVENT},K5,Smith, John\n"  # row 6: an unquoted comma adds a field
        f"{EVENT},K6,Eve\n"  # row 7
    )
    path = write(tmp_path / "a.csv", text)

    result = read_inputs([path])

    assert keys(result) == ["K1", "K2", "", "K5", "K6"]
    assert column(result, "source_row") == [2, 3, 4, 6, 7]
    assert problems(result)[:3] == ["", "", "column 'Order Ticket Key' is empty"]
    assert "more fields than the header" in problems(result)[3]
    assert problems(result)[4] == ""
    assert result.blank_rows == 1


def test_both_csv_readers_give_the_same_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (
        "\nNote;Event ID;Order Ticket Key\n"
        f'"a\nb";{EVENT.upper()};000123\n'
        "\n"
        f";{EVENT}; NA \n"
        ";not-a-uuid;K3\n"
        f";{EVENT};\n"
        ";;\n"
    )
    path = write(tmp_path / "a.csv", text)
    fast = read_inputs([path])

    def fail(*_: object) -> None:
        raise pa.ArrowInvalid("forced")

    monkeypatch.setattr(csv_reader, "_read_csv_fast", fail)
    tolerant = read_inputs([path])

    pd.testing.assert_frame_equal(fast.frame, tolerant.frame)
    assert fast.blank_rows == tolerant.blank_rows == 2
    assert keys(fast) == ["000123", "NA", "K3", ""]


# --- cell values -------------------------------------------------------------------------------


def test_keys_are_kept_as_text(tmp_path: Path) -> None:
    raw = ["000123", "NA", "null", "NaN", "None", "#N/A", "1e5", "TRUE", "  padded  "]
    body = "".join(f"{EVENT},{key}\n" for key in raw)
    path = write(tmp_path / "a.csv", f"Event ID,Order Ticket Key\n{body}")

    result = read_inputs([path])

    assert keys(result) == [key.strip() for key in raw]
    # "#N/A" or "1.5E+19" is kept as text, but a spreadsheet wrote it: not a key (issue 9).
    assert [bool(p) for p in problems(result)] == [marked(key.strip()) for key in raw]


def test_event_ids_are_normalised_or_explained(tmp_path: Path) -> None:
    text = (
        "Event ID,Order Ticket Key\n"
        f"  {EVENT.upper()}  ,K1\n"
        "abc-123,K2\n"
        f"{{{EVENT}}},K3\n"
        f"{EVENT.replace('-', '')},K4\n"
        ",K5\n"
        f"{EVENT},\n"
        f"{EVENT},   \n"
    )
    path = write(tmp_path / "a.csv", text)

    result = read_inputs([path])

    assert column(result, "event_id") == [
        EVENT,
        "abc-123",
        f"{{{EVENT}}}",
        EVENT.replace("-", ""),
        "",
        EVENT,
        EVENT,
    ]
    assert problems(result) == [
        "",
        "column 'Event ID': 'abc-123' is not a UUID",
        f"column 'Event ID': '{{{EVENT}}}' is not a UUID",
        f"column 'Event ID': '{EVENT.replace('-', '')}' is not a UUID",
        "column 'Event ID' is empty",
        "column 'Order Ticket Key' is empty",
        "column 'Order Ticket Key' is empty",
    ]


def test_a_row_with_neither_event_nor_key_but_other_cells_is_invalid(tmp_path: Path) -> None:
    # Issue 9: such a row is reported (a note, a name without its key), not counted as blank.
    text = f"Name,Event ID,Order Ticket Key\nAda,,\nBob,{EVENT},K2\nCy, , \n, , \n"
    path = write(tmp_path / "a.csv", text)

    result = read_inputs([path])

    assert keys(result) == ["", "K2", ""]
    assert column(result, "source_row") == [2, 3, 4]
    assert problems(result)[0] == problems(result)[2] == "row has content but no key and no event"
    assert result.blank_rows == 1


def test_default_event_id_fills_a_missing_column(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "Name,Ticket Key\nAda,K1\nBob,\nCy,K3\n")

    result = read_inputs([path], default_event_id=f" {EVENT.upper()} ")

    assert column(result, "event_id") == [EVENT, EVENT, EVENT]
    assert keys(result) == ["K1", "", "K3"]
    # Without an event column the key is all we use; a row with other content but no key is
    # reported, not dropped as blank (issue 9).
    assert problems(result) == ["", "row has content but no key and no event", ""]
    assert result.blank_rows == 0


@pytest.mark.parametrize("header", ["Ticket Key", "Ticket Key,Name"])
def test_a_file_with_no_event_column_and_no_default_is_refused_whole(
    tmp_path: Path, header: str
) -> None:
    """Not one problem per row: nothing in such a file could ever be sent."""
    path = write(tmp_path / "a.csv", f"{header}\nK1\nK2\n")

    with pytest.raises(InputError) as caught:
        read_inputs([path])

    message = str(caught.value)
    assert message.startswith(f"{path}: no event id column and no --event-id")
    assert f"its columns are: {header.replace(',', ', ')}" in message


def test_a_default_event_id_for_a_file_with_an_event_column_is_refused(tmp_path: Path) -> None:
    """Neither silently wins: the run cannot tell which event the user meant."""
    path = write(tmp_path / "a.csv", f"Event ID,Ticket Key\n,K1\n{OTHER_EVENT},K2\n")
    book = write_xlsx(tmp_path / "b.xlsx", {"Scans": [["Ticket Key", "Event"], ["K1", EVENT]]})
    aliases = ColumnAliases(event_id=("event_id", "event"))

    with pytest.raises(InputError, match=r"has an event id column \('Event ID'\)") as caught:
        read_inputs([path], default_event_id=EVENT)
    assert str(caught.value).startswith(f"{path}: ")
    with pytest.raises(InputError, match=rf"^{book}#Scans: has an event id column \('Event'\)"):
        read_inputs([book], aliases=aliases, default_event_id=EVENT)


def test_empty_event_cells_are_invalid_rows(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", f"Event ID,Ticket Key\n,K1\n{OTHER_EVENT},K2\nbad,K3\n")

    result = read_inputs([path])

    assert column(result, "event_id") == ["", OTHER_EVENT, "bad"]
    assert problems(result) == [
        "column 'Event ID' is empty",
        "",
        "column 'Event ID': 'bad' is not a UUID",
    ]


def test_a_default_event_id_that_is_not_a_uuid_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "Ticket Key\nK1\n")

    with pytest.raises(ValueError, match="not a UUID"):
        read_inputs([path], default_event_id="event-42")


def write_report(path: Path, rows: Sequence[tuple[str, str]]) -> Path:
    """A file shaped like this tool's report, cells escaped the way the report writer does."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=REPORT_COLUMNS, restval="")
        writer.writeheader()
        for number, (event, key) in enumerate(rows, 2):
            writer.writerow(
                {
                    "event_id": escape_cell(event),
                    "order_ticket_key": escape_cell(key),
                    "outcome": "failed",
                    "source_file": "=in.csv",
                    "source_row": str(number),
                }
            )
    return path


def test_reports_written_by_this_tool_are_unescaped(tmp_path: Path) -> None:
    originals = ["=1+2", "'=x", "-5", "'plain", "@sum", "K6", "+44 20"]
    report = write_report(tmp_path / "report.csv", [(EVENT, key) for key in originals])

    result = read_inputs([report])

    assert keys(result) == originals
    assert [bool(p) for p in problems(result)] == [k.startswith("'") for k in originals]


APOSTROPHE = (
    "column 'order_ticket_key': the key starts with an apostrophe, which spreadsheets take for "
    "a text marker and drop; remove it if it is not part of the key"
)


def test_a_spreadsheet_text_marker_is_removed_in_any_file(tmp_path: Path) -> None:
    """The apostrophe before a formula character is what a report adds (and what a spreadsheet
    hides), so it comes off in any file: a trimmed failed-rows file gives back its keys. A key
    still starting with one is invalid: a spreadsheet's Save As would have dropped it."""
    cells = ["'=1+2", "''=x", "'-5", "'@a", "'plain", "k'", "'"]
    body = "".join(f"{EVENT},{key}\n" for key in cells)
    path = write(tmp_path / "trimmed.csv", f"event_id,order_ticket_key\n{body}")

    result = read_inputs([path])

    assert keys(result) == ["=1+2", "'=x", "-5", "@a", "'plain", "k'", "'"]
    assert problems(result) == ["", APOSTROPHE, "", "", APOSTROPHE, "", APOSTROPHE]


def test_an_escaped_event_id_in_a_report_is_unescaped(tmp_path: Path) -> None:
    path = write_report(tmp_path / "failed.csv", [("-bad", "K1")])

    result = read_inputs([path])

    assert column(result, "event_id") == ["-bad"]
    assert problems(result) == ["column 'event_id': '-bad' is not a UUID"]


# --- Excel -------------------------------------------------------------------------------------


def test_excel_cells_come_back_as_the_text_a_person_sees(tmp_path: Path) -> None:
    path = write_xlsx(
        tmp_path / "a.xlsx",
        {
            "Tickets": [
                ["Event ID", "Order Ticket Key", "Name"],
                [EVENT, 123456, "int"],
                [EVENT, 123456.0, "integral float"],
                [EVENT, "000123", "leading zeros stored as text"],
                [EVENT, 1.5, "fraction"],
                [EVENT, 1 / 3, "more digits than Excel shows"],
                [EVENT, True, "bool"],
                [EVENT, dt.datetime(2024, 5, 6, 7, 8, 9), "date"],
                [EVENT.upper(), " K8 ", "padded"],
            ]
        },
    )

    result = read_inputs([path])

    assert keys(result) == [
        "123456",
        "123456",
        "000123",
        "1.5",
        "0.333333333333333",
        "True",
        "2024-05-06 07:08:09",
        "K8",
    ]
    assert column(result, "event_id") == [EVENT] * 8
    assert column(result, "source_row") == list(range(2, 10))


def test_every_sheet_with_a_key_column_is_read_in_workbook_order(tmp_path: Path) -> None:
    path = write_xlsx(
        tmp_path / "a.xlsx",
        {
            "First": [["Ticket Key", "Event ID"], ["K1", EVENT], [None, None], ["K3", EVENT]],
            "Notes": [["Just", "some"], ["notes", "here"]],
            "Second": [[], [], [None, "Event ID", "Order Ticket Key"], [None, OTHER_EVENT, "K9"]],
        },
    )

    result = read_inputs([path])

    assert keys(result) == ["K1", "K3", "K9"]
    assert column(result, "source_file") == [f"{path}#First", f"{path}#First", f"{path}#Second"]
    assert column(result, "source_row") == [2, 4, 4]
    assert column(result, "event_id") == [EVENT, EVENT, OTHER_EVENT]
    assert result.blank_rows == 1
    assert result.files == (str(path),)


def test_a_workbook_with_no_key_column_lists_each_sheets_columns(tmp_path: Path) -> None:
    path = write_xlsx(tmp_path / "a.xlsx", {"People": [["Name", "Email"]], "Other": [["Ticket"]]})

    with pytest.raises(InputError) as caught:
        read_inputs([path])

    message = str(caught.value)
    assert message.startswith(f"{path}: no sheet has an order ticket key column")
    assert "sheet 'People' has columns: Name, Email" in message
    assert "sheet 'Other' has columns: Ticket" in message


def test_an_ambiguous_sheet_names_the_sheet(tmp_path: Path) -> None:
    path = write_xlsx(tmp_path / "a.xlsx", {"S1": [["Event ID", "event_id", "Ticket Key"]]})

    with pytest.raises(InputError, match="ambiguous event id") as caught:
        read_inputs([path])
    assert str(caught.value).startswith(f"{path}#S1: ")


# --- whole files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["Event ID,Ticket Key\n", "Event ID,Ticket Key", "\ufeffTicket Key\r\n"]
)
def test_a_header_only_csv_gives_no_rows(tmp_path: Path, text: str) -> None:
    default = None if text.startswith("Event") else EVENT
    result = read_inputs([write(tmp_path / "a.csv", text)], default_event_id=default)

    assert len(result.frame) == 0
    assert list(result.frame.columns) == COLUMNS
    assert result.blank_rows == 0


def test_a_header_only_workbook_gives_no_rows(tmp_path: Path) -> None:
    path = write_xlsx(tmp_path / "a.xlsx", {"S": [["Event ID", "Ticket Key"]]})

    assert len(read_inputs([path]).frame) == 0


def test_files_are_concatenated_in_the_given_order(tmp_path: Path) -> None:
    first = write(tmp_path / "b.csv", f"Event ID,Ticket Key\n{EVENT},K1\n{EVENT},K2\n")
    second = write_xlsx(tmp_path / "a.xlsx", {"S": [["Ticket Key", "Event ID"], ["K3", EVENT]]})
    third = write(tmp_path / "c.csv", f"Ticket Key;Event ID\nK4;{OTHER_EVENT}\n")

    result = read_inputs([str(first), second, third])

    assert keys(result) == ["K1", "K2", "K3", "K4"]
    assert column(result, "source_file") == [str(first), str(first), f"{second}#S", str(third)]
    assert column(result, "source_row") == [2, 3, 2, 2]
    assert result.files == (str(first), str(second), str(third))
    assert list(result.frame.index) == [0, 1, 2, 3]


def test_the_frame_uses_compact_dtypes(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", f"Event ID,Ticket Key\n{EVENT},K1\nbad,\n")

    frame = read_inputs([path]).frame

    assert list(frame.columns) == COLUMNS
    assert isinstance(frame["event_id"].dtype, pd.CategoricalDtype)
    assert isinstance(frame["source_file"].dtype, pd.CategoricalDtype)
    assert isinstance(frame["problem"].dtype, pd.CategoricalDtype)
    assert pd.api.types.is_string_dtype(frame["order_ticket_key"].dtype)
    assert pd.api.types.is_integer_dtype(frame["source_row"].dtype)


def test_no_paths_give_an_empty_frame() -> None:
    result = read_inputs([])

    assert list(result.frame.columns) == COLUMNS
    assert len(result.frame) == 0
    assert result.files == ()


def _zip_bytes(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("xl/workbook.xml", "<workbook/>")


@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [
        ("missing.csv", None, "does not exist"),
        ("empty.csv", lambda p: p.write_bytes(b""), "empty (0 bytes)"),
        ("folder.csv", lambda p: p.mkdir(), "is a directory"),
        ("fake.xlsx", lambda p: p.write_text("Event ID,Ticket Key\n"), "looks like text"),
        ("garbage.xlsx", lambda p: p.write_bytes(bytes(range(256)) * 4), "is not a .xlsx workbook"),
        ("broken.xlsx", _zip_bytes, "cannot be read as a .xlsx workbook"),
        ("workbook.csv", _zip_bytes, "zip archive"),
        ("binary.csv", lambda p: p.write_bytes(b"Ticket\x00Key\nk\n"), "binary data"),
        ("text.csv", lambda p: p.write_bytes(b"\n\x00\x01\x02"), "binary data"),
        ("only-blank.csv", lambda p: p.write_text("\n\n ,\n"), "no header row"),
        ("notes.pdf", lambda p: p.write_text("x"), "unsupported file type '.pdf'"),
        ("noext", lambda p: p.write_text("x"), "unsupported file type (none)"),
    ],
)
def test_unusable_files_are_input_errors_naming_the_file(
    tmp_path: Path, name: str, make: Callable[[Path], object] | None, expected: str
) -> None:
    path = tmp_path / name
    if make is not None:
        make(path)

    with pytest.raises(InputError) as caught:
        read_inputs([path])

    assert str(caught.value).startswith(f"{path}: ")
    assert expected in str(caught.value)


def test_unknown_extension_lists_the_supported_ones(tmp_path: Path) -> None:
    path = write(tmp_path / "a.json", "{}")

    with pytest.raises(InputError, match=r"supported: .*\.csv.*\.xlsx"):
        read_inputs([path])


# --- properties --------------------------------------------------------------------------------

# No controls, invisible characters or separators but the space: those make a key invalid.
_printable_keys = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cc", "Cs", "Cf", "Zl", "Zp", "Zs"), whitelist_characters=" "
    ),
    min_size=1,
    max_size=30,
).filter(lambda key: key.strip() != "" and not key.strip().startswith("'"))


@settings(max_examples=60, deadline=None)
@given(st.lists(_printable_keys, min_size=1, max_size=15))
@example(["#N/A", "1E+5", "k1"])
def test_any_printable_key_written_by_the_csv_module_reads_back(raw: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "keys.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["Event ID", "Order Ticket Key", "Name"])
            writer.writerows([EVENT, key, "x"] for key in raw)

        result = read_inputs([path])

    assert keys(result) == [key.strip() for key in raw]
    # "#N/A" or "1.5E+19" is kept as text, but a spreadsheet wrote it: not a key (issue 9).
    assert [bool(p) for p in problems(result)] == [marked(key.strip()) for key in raw]
    assert column(result, "source_row") == list(range(2, len(raw) + 2))


@settings(max_examples=60, deadline=None)
@given(st.lists(_printable_keys.map(str.strip), min_size=1, max_size=15))
@example(["#N/A", "1E+5", "k1"])
def test_any_key_survives_a_round_trip_through_a_report(originals: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = write_report(Path(folder) / "failed.csv", [(EVENT, key) for key in originals])

        result = read_inputs([path])

    assert keys(result) == originals
    assert [bool(p) for p in problems(result)] == [marked(key) for key in originals]


def marked(key: str) -> bool:
    """Whether ``key`` carries the marks of a spreadsheet's conversion (an error value,
    scientific notation): such text is never a key (issue 9), whatever file it is in."""
    return any(re.fullmatch(p, key) for p in (CSV_SCIENTIFIC, CSV_ERROR))


# Keys as a report holds them (stripped, no control characters), made of what spreadsheets and
# the escaping care about: formula characters, apostrophes, spaces.
_hostile_keys = (
    st.text(
        alphabet=st.sampled_from(["=", "+", "-", "@", "'", " ", "a", "1", "é", '"', ",", "|"]),
        min_size=1,
        max_size=8,
    )
    .map(str.strip)
    .filter(bool)
)
_kept_columns = st.lists(
    st.sampled_from([c for c in REPORT_COLUMNS if c != "order_ticket_key"]), unique=True
).flatmap(lambda kept: st.permutations(["order_ticket_key", *kept]))


@settings(max_examples=80, deadline=None)
@given(
    st.lists(_hostile_keys, min_size=1, max_size=12),
    _kept_columns,
    st.booleans(),
)
def test_any_key_round_trips_through_a_failed_rows_file_trimmed_to_any_columns(
    originals: list[str], kept: list[str], through_a_spreadsheet: bool
) -> None:
    """Escape, keep any columns in any order, read back: the original key, never another.

    ``through_a_spreadsheet``: the file was opened in a spreadsheet and saved again, which
    takes a leading apostrophe for a text marker and drops it. A failed-rows file only holds
    keys that were valid, and a valid key never starts with an apostrophe.
    """
    if through_a_spreadsheet:
        originals = [key for key in originals if not key.startswith("'")] or ["=1"]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trimmed.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(kept)
            for number, key in enumerate(originals, 2):
                full = {c: "x" for c in REPORT_COLUMNS} | {
                    "event_id": EVENT,
                    "order_ticket_key": key,
                    "outcome": "failed",
                    "source_row": str(number),
                }
                cells = [escape_cell(full[c]) for c in kept]
                if through_a_spreadsheet:
                    cells = [c[1:] if c.startswith("'") else c for c in cells]
                writer.writerow(cells)

        default = None if "event_id" in kept else EVENT
        result = read_inputs([path], default_event_id=default)

    assert keys(result) == originals
    # A key starting with an apostrophe could not survive a spreadsheet: invalid, never sent.
    assert [p != "" for p in problems(result)] == [k.startswith("'") for k in originals]


# --- keys that cannot be sent -------------------------------------------------------------------

CONTROL = (
    "column 'Ticket Key': the key holds a control character (such as NUL, a tab or a line break)"
)
TOO_LONG = "column 'Ticket Key': the key is longer than 256 characters"


@pytest.mark.parametrize("position", [2, 8002])
def test_a_control_character_in_a_key_makes_its_row_invalid_wherever_it_is(
    tmp_path: Path, position: int
) -> None:
    """Row 2 (inside the first 256 KiB the encoding is guessed from) or row 8002: the same."""
    bad = ["nul\x00key", "soh\x01", "del\x7fkey", "c1\u0085key", "tab\tinside", "line\nbreak"]
    rows = [f"{EVENT},K{i}" for i in range(8010)]
    for offset, key in enumerate(bad):
        rows[position - 2 + offset] = f'{EVENT},"{key}"'
    path = tmp_path / "a.csv"
    path.write_bytes(("Event ID,Ticket Key\n" + "\n".join(rows) + "\n").encode())

    result = read_inputs([path])

    found = problems(result)
    rows_with = [i + 2 for i, problem in enumerate(found) if problem]
    assert rows_with == list(range(position, position + len(bad)))
    assert {found[i - 2] for i in rows_with} == {CONTROL}
    assert keys(result)[position - 2 : position - 2 + len(bad)] == bad


INVISIBLE = (
    "column 'Ticket Key': the key holds an invisible character or an unusual space (such as a "
    "zero-width space, a direction mark, a line separator or a no-break space inside it), so it "
    "is not the key it shows"
)
#: Keys that str.strip() used to change silently (and merge with "K1"): now invalid, unchanged.
EDGE_KEYS = {
    "K1\x1f": CONTROL, "K1\x85": CONTROL, "\tK1": CONTROL, "K1\v": CONTROL, "\fK1": CONTROL,
    "K1\x1c": CONTROL, "K1\u2028": INVISIBLE, "\u2029K1": INVISIBLE, "K1\u3000": INVISIBLE,
    "\u200bK1": INVISIBLE, "K1\u200b": INVISIBLE, "\u202eK1": INVISIBLE, "\ufeffK1": INVISIBLE,
    "K\u00a01": INVISIBLE, "K\u20601": INVISIBLE, "K\u00ad1": INVISIBLE,
}  # fmt: skip


@pytest.mark.parametrize("workbook", [False, True], ids=["csv", "xlsx"])
def test_whitespace_like_characters_at_a_keys_ends_make_it_invalid_not_stripped(
    tmp_path: Path, workbook: bool
) -> None:
    edge = dict(EDGE_KEYS)
    if workbook:  # openpyxl refuses to write most C0 controls
        edge = {k: v for k, v in edge.items() if not re.search("[\x00-\x08\x0b\x0c\x0e-\x1f]", k)}
    originals = ["K1", *edge, " K1 ", "\u00a0K1\u00a0", "Zoë-é"]
    if workbook:
        path = write_xlsx(tmp_path / "a.xlsx", {"S": [["Ticket Key"], *[[k] for k in originals]]})
    else:
        path = tmp_path / "a.csv"
        lines = ['"' + key + '"' for key in originals]
        path.write_bytes(("Ticket Key\n" + "\n".join(lines) + "\n").encode())

    result = read_inputs([path], default_event_id=EVENT)

    # Only the plain and the no-break space are stripped; nothing else about a key changes.
    assert keys(result) == ["K1", *edge, "K1", "K1", "Zoë-é"]
    assert problems(result) == ["", *edge.values(), "", "", ""]


@pytest.mark.parametrize("tolerant", [False, True], ids=["pyarrow", "pandas"])
def test_keys_longer_than_the_limit_are_invalid(tmp_path: Path, tolerant: bool) -> None:
    keys_in = ["k" * 256, "k" * 257, "é" * 256, "é" * 257, "x" * 5_000_000, "short"]
    ragged = ",extra" if tolerant else ""  # a row with an extra field takes the pandas reader
    path = write(
        tmp_path / "a.csv",
        "Event ID,Ticket Key\n"
        + "".join(f"{EVENT},{k}\n" for k in keys_in)
        + f"{EVENT},z{ragged}\n",
    )

    result = read_inputs([path])

    assert keys(result)[:6] == keys_in
    assert problems(result)[:6] == ["", TOO_LONG, "", TOO_LONG, TOO_LONG, ""]


def test_key_checks_hold_for_workbooks_too(tmp_path: Path) -> None:
    path = write_xlsx(
        tmp_path / "a.xlsx",
        {"S": [["Ticket Key", "Event ID"], ["ok", EVENT], ["k" * 300, EVENT], ["'=x", EVENT]]},
    )

    result = read_inputs([path])

    assert keys(result) == ["ok", "k" * 300, "=x"]
    assert problems(result) == ["", TOO_LONG, ""]


# --- encodings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "bad_row", "utf8_row"),
    [
        ([b"k1,Zo\xc3\xab", b"k2,Ren\xe9e"], 3, 2),  # UTF-8 first, then Windows-1252
        ([b"k1,Ren\xe9e", b"k2,Zo\xc3\xab"], 2, 3),  # Windows-1252 first, then UTF-8
        ([b"Zo\xc3\xab,x", b"k2,Ren\xe9e"], 3, 2),  # UTF-8 in the key, 1252 in another column
        ([b"k1,Zo\xc3\xab", *[b"k,x"] * 9000, b"k2,Ren\xe9e"], 9003, 2),  # past 256 KiB
        ([*[b"k,x"] * 9000, b'"Zo\xc3\xab\n",Ren\xe9e'], 9002, 9002),  # one quoted multi-line row
        ([b"k1,Zo\xc3\xab" + b"x" * 300_000, b"k2,Ren\xe9"], 3, 2),  # a huge field; 1252 last
    ],
    ids=["utf8-then-1252", "1252-then-utf8", "key-and-other-column", "late", "same-row", "huge"],
)
def test_a_file_mixing_utf8_and_windows_1252_is_refused_naming_rows(
    tmp_path: Path, rows: list[bytes], bad_row: int, utf8_row: int
) -> None:
    """Read whole as Windows-1252, "Zoë" would silently become "ZoÃ«"."""
    path = tmp_path / "a.csv"
    last = b"" if rows[-1].endswith(b"\xe9") else b"\n"  # the bad byte is the file's last
    path.write_bytes(b"Ticket Key,Name\n" + b"\n".join(rows) + last)

    with pytest.raises(InputError) as caught:
        read_inputs([path], default_event_id=EVENT)

    message = str(caught.value)
    assert message.startswith(f"{path}: mixes two encodings: row {bad_row} is not UTF-8")
    assert f"while row {utf8_row} is UTF-8" in message


# --- workbooks built to hurt the reader (each one small; the engine is never reached) -----------


def _rewrite(path: Path, part: str, change: Callable[[bytes], bytes]) -> Path:
    """``path`` with one part's bytes changed, everything else as it was."""
    with zipfile.ZipFile(path) as source:
        parts = [(info, source.read(info.filename)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for info, data in parts:
            target.writestr(info.filename, change(data) if info.filename == part else data)
    return path


def _sheet_book(tmp_path: Path) -> Path:
    return write_xlsx(tmp_path / "book.xlsx", {"Keys": [["Event ID", "Ticket Key"], [EVENT, "K1"]]})


def test_a_workbook_that_unpacks_past_the_limit_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A zip bomb: 40 MB of spaces inside the sheet pack into a few dozen KB."""
    path = _rewrite(
        _sheet_book(tmp_path),
        "xl/worksheets/sheet1.xml",
        lambda xml: xml.replace(b"<sheetData>", b"<sheetData>" + b" " * 40_000_000),
    )
    assert path.stat().st_size < 100_000
    monkeypatch.setattr(workbook_limits, "MAX_UNPACKED_BYTES", 16 * 2**20)

    with pytest.raises(InputError, match="zip bomb") as caught:
        read_inputs([path])
    assert str(caught.value).startswith(f"{path}: declares 40,0")


def test_a_workbook_with_too_many_parts_names_the_part_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _sheet_book(tmp_path)
    with zipfile.ZipFile(path, "a") as archive:
        for i in range(30):
            archive.writestr(f"xl/media/x{i}.bin", b"")
    monkeypatch.setattr(workbook_limits, "_MAX_PARTS", 20)

    with pytest.raises(InputError) as caught:
        read_inputs([path])
    assert str(caught.value).startswith(f"{path}: has 3")
    assert "parts, more than the 20 batchjob reads from a workbook" in str(caught.value)


def test_a_workbook_part_that_unpacks_past_its_declared_size_is_refused(tmp_path: Path) -> None:
    path = _sheet_book(tmp_path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("xl/worksheets/sheet1.xml")
    # The central directory entry's uncompressed size (offset 24) now claims 10 bytes.
    at = data.find(b"xl/worksheets/sheet1.xml", data.find(b"PK\x01\x02")) - 46
    assert data[at : at + 4] == b"PK\x01\x02"
    data[at + 24 : at + 28] = (10).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    assert info.file_size > 10

    with pytest.raises(InputError, match="more than the 10 bytes it declares") as caught:
        read_inputs([path])
    assert str(caught.value).startswith(f"{path}: part 'xl/worksheets/sheet1.xml'")


def _ods(path: Path, rows: int, columns: int) -> Path:
    table = "urn:oasis:names:tc:opendocument:xmlns:table:1.0"
    content = (
        '<?xml version="1.0" encoding="UTF-8"?><office:document-content '
        'xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" '
        f'xmlns:table="{table}" xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0">'
        '<office:body><office:spreadsheet><table:table table:name="Door 1">'
        '<table:table-row><table:table-cell office:value-type="string"><text:p>Ticket Key'
        "</text:p></table:table-cell></table:table-row>"
        '<table:table-row><table:table-cell office:value-type="string"><text:p>K1</text:p>'
        "</table:table-cell></table:table-row>"
        f'<table:table-row table:number-rows-repeated="{rows}">'
        f'<table:table-cell table:number-columns-repeated="{columns}" '
        'office:value-type="string"><text:p>x</text:p></table:table-cell></table:table-row>'
        # LibreOffice fills every sheet out to its edge with empty cells: not counted.
        '<table:table-row table:number-rows-repeated="1048000">'
        '<table:table-cell table:number-columns-repeated="1024"/></table:table-row>'
        "</table:table></office:spreadsheet></office:body></office:document-content>"
    )
    return write_ods_content(path, content)


def test_an_ods_whose_repeats_span_too_many_cells_is_refused_naming_the_sheet(
    tmp_path: Path,
) -> None:
    """One repeated cell, 1 KB on disk, 20,000 x 1,000 cells once read."""
    path = _ods(tmp_path / "repeats.ods", 20_000, 1_000)
    assert path.stat().st_size < 2_000

    with pytest.raises(InputError, match=r"sheet 'Door 1' has cells as far as ALL20002") as caught:
        read_inputs([path], default_event_id=EVENT)
    assert str(caught.value).startswith(f"{path}: ")


def test_an_ods_with_modest_repeats_and_empty_edges_is_read(tmp_path: Path) -> None:
    path = _ods(tmp_path / "ok.ods", 3, 2)

    assert keys(read_inputs([path], default_event_id=EVENT)) == ["K1", "x", "x", "x"]


def _xlsb_record(kind: int, payload: bytes) -> bytes:
    return bytes([kind]) + bytes([len(payload)]) + payload


def test_an_xlsb_sheet_reaching_too_far_is_refused(tmp_path: Path) -> None:
    row = _xlsb_record(0, (1_048_575).to_bytes(4, "little") + bytes(4))
    cell = _xlsb_record(2, (16_383).to_bytes(4, "little") + bytes(8))  # BrtCellRk
    path = tmp_path / "far.xlsb"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("xl/workbook.bin", b"")
        archive.writestr("xl/worksheets/sheet1.bin", row + cell)

    with pytest.raises(InputError, match=r"as far as XFD1048576") as caught:
        read_inputs([path], default_event_id=EVENT)
    assert str(caught.value).startswith(f"{path}: sheet 'xl/worksheets/sheet1.bin'")
