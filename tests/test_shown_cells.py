"""Issue 9 beyond the corpus: the number-format classifier, text with a spreadsheet's marks,
key_pattern, hidden rows (skipped, merged, exit code), title rows, and what the summary says."""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import openpyxl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchjob import ConfigError, JobConfig, Outcome, load_config, run_job
from batchjob._cli import main
from batchjob.plan import build_plan
from batchjob.read import HIDDEN_PROBLEM, read_inputs
from batchjob.read._formats import (
    EXACT_LIMIT,
    GENERAL,
    Cause,
    Format,
    Kind,
    built_in,
    classify,
    shown_number,
)
from batchjob.sandbox import Sandbox, World
from tests.support import read_report, run, ticket_rows

EVENT = "07216444-4e3b-41ea-a3b8-5a418fce41f4"


# --- the number-format classifier --------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("General", Kind.GENERAL),
        ("@", Kind.GENERAL),
        ("[$-409]@", Kind.GENERAL),
        ("[$-409]000000", Kind.ZEROS),
        ("00000;[Red]-00000", Kind.ZEROS),
        ("0", Kind.ZEROS),
        ("yyyy-mm-dd", Kind.DATE),
        ("[$-409]mm/dd/yy", Kind.DATE),
        ("d-mmm", Kind.DATE),
        ("[$-409]hh:mm", Kind.TIME),
        ("mm:ss", Kind.TIME),
        ("h:mm AM/PM", Kind.TIME),
        ("0%", Kind.PERCENT),
        ("[$-409]0.00%", Kind.PERCENT),
        ("[$$-409]#,##0", Kind.CURRENCY),
        ('"$"#,##0.00', Kind.CURRENCY),
        ("[$€-407]0", Kind.CURRENCY),
        ("0.00E+00", Kind.SCIENTIFIC),
        ("##0.0E+0", Kind.SCIENTIFIC),
        ('"TRUE";"TRUE";"FALSE"', Kind.BOOLEAN),
        ("#,##0", Kind.OTHER),
        ("0.00", Kind.OTHER),
        ('0" pcs"', Kind.OTHER),
        ("# ?/?", Kind.OTHER),
        # Where the first section is not the whole story (from the adversary review):
        ('[>=1000]0;"X"0', Kind.OTHER),  # 126 shows X126
        ('0;-0;"-"', Kind.OTHER),  # 0 shows -
        ("*X0", Kind.OTHER),  # a fill: XXXX127
        ("[DBNum1]0", Kind.OTHER),  # digits in another script
        ("0;0;0;@", Kind.ZEROS),
    ],
)
def test_format_codes_are_classified_by_what_they_show(code: str, kind: Kind) -> None:
    assert classify(code).kind is kind


def test_built_in_format_ids() -> None:
    assert built_in(0) == GENERAL
    assert built_in(49) == GENERAL  # @
    assert built_in(1) == Format(Kind.ZEROS, 1)
    assert built_in(14).kind is Kind.DATE
    assert built_in(20).kind is Kind.TIME
    assert built_in(9).kind is Kind.PERCENT
    assert built_in(11).kind is Kind.SCIENTIFIC
    assert built_in(999).kind is Kind.OTHER  # unknown: refused, never guessed


@given(st.integers(min_value=1, max_value=20), st.integers(min_value=0, max_value=EXACT_LIMIT - 1))
def test_a_zeros_format_shows_the_integer_padded_and_nothing_else(width: int, value: int) -> None:
    form = classify("[$-409]" + "0" * width)
    assert form == Format(Kind.ZEROS, width)
    cause, text = shown_number(float(value), form)
    assert cause is Cause.OK
    assert text == str(value).zfill(width)
    assert int(text) == value


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_general_accepts_a_number_only_when_its_text_is_the_exact_integer(value: float) -> None:
    cause, text = shown_number(value, GENERAL)
    exact = math.isfinite(value) and value.is_integer() and 0 <= value < EXACT_LIMIT
    assert (cause is Cause.OK) == exact
    if exact:
        assert int(text) == value and text == str(int(value))


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        ("0.00E+00", Cause.SCIENTIFIC),
        ("yyyy-mm-dd", Cause.DATE),
        ("hh:mm", Cause.TIME),
        ("0%", Cause.PERCENT),
        ("[$$-409]#,##0", Cause.CURRENCY),
        ("#,##0", Cause.FORMAT),
    ],
)
def test_other_formats_refuse_even_a_small_integer(code: str, cause: Cause) -> None:
    assert shown_number(123.0, classify(code))[0] is cause


# --- CSV text carrying a spreadsheet's marks ---------------------------------------------------


def _csv(path: Path, keys: list[str], encoding: str = "utf-8") -> Path:
    body = "".join(f"{EVENT},{key}\n" for key in keys)
    path.write_bytes(f"event_id,order_ticket_key\n{body}".encode(encoding))
    return path


def test_csv_keys_with_marks_of_a_conversion_are_invalid_with_cause(tmp_path: Path) -> None:
    keys = ["1.23456789012346E+019", "1.00E+05", "#N/A", "#DIV/0!", "00012e3", "1e5", "k-1"]
    frame = read_inputs([_csv(tmp_path / "a.csv", keys)]).frame
    problems = frame["problem"].tolist()
    assert "scientific notation" in problems[0]
    assert "scientific notation" in problems[1]
    assert "error value" in problems[2]
    assert "error value" in problems[3]
    # No sign in the exponent: a plain key that happens to look like a number.
    assert problems[4:] == ["", "", ""]
    assert "format the column as Text and export again" in problems[0]


def test_a_question_mark_in_a_cp1252_file_is_a_lost_character(tmp_path: Path) -> None:
    path = _csv(tmp_path / "a.csv", ["?b2c3d4e5f6", "€1b2c3d4e5f6"], encoding="cp1252")
    frame = read_inputs([path]).frame
    assert "outside Windows-1252" in frame["problem"][0]
    assert frame["problem"][1] == ""
    # In UTF-8 a '?' is just a character.
    utf8 = read_inputs([_csv(tmp_path / "b.csv", ["?b2c3d4e5f6"])]).frame
    assert utf8["problem"][0] == ""


# --- key_pattern -------------------------------------------------------------------------------


def test_keys_not_matching_key_pattern_are_invalid(tmp_path: Path) -> None:
    path = _csv(tmp_path / "a.csv", ["a1b2c3d4e5f6", "A1B2C3D4E5F6", "a1b2c3d4e5f6x", "123"])
    frame = read_inputs([path], key_pattern="[0-9a-f]{12}").frame
    problems = frame["problem"].tolist()
    assert problems[0] == ""
    assert all("does not match key_pattern" in p for p in problems[1:])


def test_a_catastrophic_pattern_runs_in_linear_time(tmp_path: Path) -> None:
    # (a+)+$ backtracks exponentially in Python's re; RE2 does not backtrack at all.
    path = _csv(tmp_path / "a.csv", ["a" * 200 + "!"] * 1000)
    frame = read_inputs([path], key_pattern="(a+)+").frame
    assert frame["problem"].str.contains("key_pattern").all()


@pytest.mark.parametrize("pattern", ["[0-9", "(?P<x>a)(?P=x)", "", "a)|(b"])
def test_a_bad_key_pattern_is_a_config_error_naming_it(pattern: str) -> None:
    with pytest.raises(ConfigError, match="key_pattern"):
        JobConfig(key_pattern=pattern)


def test_key_pattern_from_the_environment_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHJOB_KEY_PATTERN", "[0-9")
    with pytest.raises(ConfigError, match=r"key_pattern.*BATCHJOB_KEY_PATTERN"):
        load_config(cli={})
    monkeypatch.setenv("BATCHJOB_KEY_PATTERN", "[0-9a-f]{12}")
    assert load_config(cli={}).key_pattern == "[0-9a-f]{12}"


# --- hidden rows, title rows, note rows, merges (a workbook written as Excel spells it) --------


def _workbook(path: Path) -> Path:
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "Scans"
    sheet.append(["Door scans"])  # a title row
    sheet.append(["Ticket key list"])  # a title row that looks like a header
    sheet.append(["Event ID", "Ticket Key", "Note"])
    sheet.append([EVENT, "k1", ""])  # row 4
    sheet.append([EVENT, "k2", ""])  # row 5: hidden
    sheet.append([EVENT, "k1", ""])  # row 6: hidden, repeats row 4
    sheet.append(["", "", "scanner offline"])  # row 7: a note only
    sheet.append([EVENT, 123, ""])  # row 8: number, format 000000
    sheet.append([EVENT, "k3", ""])  # row 9: the event cell is merged A9:A10
    sheet.append(["", "k4", ""])  # row 10
    sheet["B8"].number_format = "000000"
    sheet.merge_cells("A9:A10")
    for row in (5, 6):
        sheet.row_dimensions[row].hidden = True
    book.save(path)
    return path


def test_hidden_rows_are_skipped_a_hidden_repeat_merges_and_the_rest_is_told(
    tmp_path: Path,
) -> None:
    path = _workbook(tmp_path / "scans.xlsx")
    inputs = read_inputs([path])
    rows = dict(
        zip(inputs.frame["source_row"].tolist(), inputs.frame["problem"].tolist(), strict=True)
    )
    keys = dict(
        zip(inputs.frame["source_row"].tolist(), inputs.frame["order_ticket_key"], strict=True)
    )
    assert rows[5] == rows[6] == HIDDEN_PROBLEM
    assert rows[7] == "row has content but no key and no event"
    assert keys[8] == "000123" and rows[8] == ""
    assert rows[10] == ""  # the merged event cell covers it
    assert inputs.seen.headers == (f"header found on row 3 of {path}#Scans",)

    plan = build_plan(inputs)
    assert len(plan.skipped) == 1  # row 6 merged into row 4 as a duplicate
    assert plan.duplicates == 1

    sent = read_inputs([path], include_hidden_rows=True)
    assert HIDDEN_PROBLEM not in set(sent.frame["problem"])


async def test_a_dry_run_reports_skipped_rows_exits_0_and_shows_the_spreadsheet_section(
    tmp_path: Path,
) -> None:
    path = tmp_path / "scans.xlsx"
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["Event ID", "Ticket Key"])
    sheet.append([EVENT, "k1"])
    sheet.append([EVENT, "k2"])
    sheet.row_dimensions[3].hidden = True
    book.save(path)
    result = await run_job(JobConfig(inputs=(path,), report=tmp_path / "r.csv", dry_run=True))
    report = read_report(result.report)
    assert report["outcome"].tolist() == ["planned", Outcome.SKIPPED.value]
    assert report["error_key"].tolist()[1] == "row_hidden"
    assert result.exit_code == 0
    assert result.failed_rows_count == 0
    summary = result.summary()
    assert "spreadsheet:" in summary
    assert "1 rows hidden or filtered out (skipped, not sent)" in summary


def test_include_hidden_rows_flag_sends_them(tmp_path: Path) -> None:
    path = tmp_path / "scans.xlsx"
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["Event ID", "Ticket Key"])
    sheet.append([EVENT, "k1"])
    sheet.row_dimensions[2].hidden = True
    book.save(path)
    report = tmp_path / "r.csv"
    args = ["run", str(path), "--report", str(report), "--dry-run", "--no-progress"]
    assert main([*args, "--include-hidden-rows"]) == 0
    assert read_report(report)["outcome"].tolist() == ["planned"]


# --- title rows in a CSV -----------------------------------------------------------------------


def test_csv_header_below_title_rows_is_found_and_told(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text(
        f"Door scans;;\nTicket key list;;\nevent_id;order_ticket_key;note\n{EVENT};k1;\n",
        encoding="utf-8",
    )
    inputs = read_inputs([path])
    assert inputs.frame["order_ticket_key"].tolist() == ["k1"]
    assert inputs.frame["source_row"].tolist() == [4]
    assert inputs.seen.headers == (f"header found on row 3 of {path}",)


def test_a_header_too_far_down_says_where_it_must_be(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("title\n" * 25 + f"event_id,order_ticket_key\n{EVENT},k1\n", encoding="utf-8")
    with pytest.raises(Exception, match="first 20 rows"):
        read_inputs([path])


# --- an adversary's workbooks ------------------------------------------------------------------


def _rewrite_sheet(path: Path, change: Callable[[bytes], bytes]) -> Path:
    """The same workbook with its first sheet's XML changed (as another writer might spell it)."""
    out = path.with_name("rewritten.xlsx")
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(out, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "xl/worksheets/sheet1.xml":
                data = change(data)
            target.writestr(item, data)
    return out


def _zeros_workbook(path: Path) -> Path:
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["Event ID", "Ticket Key"])
    sheet.append([EVENT, 123])
    sheet.append([EVENT, 456])
    sheet["B2"].number_format = "000000"
    sheet.row_dimensions[3].hidden = True
    book.save(path)
    return path


def test_cell_attributes_in_another_order_are_still_read(tmp_path: Path) -> None:
    path = _zeros_workbook(tmp_path / "a.xlsx")

    def reorder(data: bytes) -> bytes:
        # <c r="B2" s="1" t="n"> -> <c s="1" t="n" r="B2">
        return re.sub(rb'<c r="([A-Z]+[0-9]+)"([^>]*?)(/?)>', rb'<c\2 r="\1"\3>', data)

    rewritten = _rewrite_sheet(path, reorder)
    assert b'<c r="' not in zipfile.ZipFile(rewritten).read("xl/worksheets/sheet1.xml")
    frame = read_inputs([rewritten]).frame
    assert frame["order_ticket_key"].tolist()[0] == "000123"
    assert frame["problem"].tolist() == ["", HIDDEN_PROBLEM]


def test_hidden_true_and_single_quotes_are_hidden_too(tmp_path: Path) -> None:
    path = _zeros_workbook(tmp_path / "a.xlsx")
    rewritten = _rewrite_sheet(path, lambda d: d.replace(b'hidden="1"', b"hidden='true'"))
    assert read_inputs([rewritten]).frame["problem"].tolist() == ["", HIDDEN_PROBLEM]


def test_a_title_row_spelled_like_the_key_header_is_not_the_header(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text(f"Ticket Key\n\nevent_id,ticket_key\n{EVENT},k1\n", encoding="utf-8")
    inputs = read_inputs([path])
    assert inputs.frame["order_ticket_key"].tolist() == ["k1"]
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["Ticket Key"])
    sheet.append(["Event ID", "Ticket Key"])
    sheet.append([EVENT, "k1"])
    book.save(tmp_path / "a.xlsx")
    assert read_inputs([tmp_path / "a.xlsx"]).frame["order_ticket_key"].tolist() == ["k1"]


def test_a_huge_style_table_makes_formats_unknown_not_slow(tmp_path: Path) -> None:
    path = _zeros_workbook(tmp_path / "a.xlsx")
    out = tmp_path / "styles.xlsx"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "xl/styles.xml":
                extra = b'<xf numFmtId="0" fontId="0" fillId="0" borderId="0"/>' * 70_000
                data = data.replace(b"</cellXfs>", extra + b"</cellXfs>")
            target.writestr(item, data)
    frame = read_inputs([out]).frame
    # Formats unknown: the integer, as in a file that does not say (and counted as such).
    assert frame["order_ticket_key"].tolist()[0] == "123"


async def test_a_run_whose_only_unsent_rows_are_hidden_exits_0(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    rows = ticket_rows(world)[:3]
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["Event ID", "Ticket Key"])
    for event, key in rows:
        sheet.append([event, key])
    sheet.row_dimensions[3].hidden = True  # the second key
    book.save(tmp_path / "in.xlsx")

    result = await run(sandbox, [tmp_path / "in.xlsx"], tmp_path)

    report = read_report(result.report)
    assert report["outcome"].tolist() == ["undone", "skipped", "undone"]
    assert result.exit_code == 0
    assert result.failed_rows_count == 0
    sent = {k for r in sandbox.requests if r.method == "POST" for k in r.keys}
    assert rows[1][1] not in sent


def test_a_hidden_row_is_told_once_as_hidden_whatever_else_it_holds(tmp_path: Path) -> None:
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["Event ID", "Ticket Key"])
    sheet.append([EVENT, 0.5])  # a refused cell...
    sheet.row_dimensions[2].hidden = True  # ...in a hidden row
    book.save(tmp_path / "a.xlsx")
    inputs = read_inputs([tmp_path / "a.xlsx"])
    assert inputs.frame["problem"].tolist() == [HIDDEN_PROBLEM]
    assert [f.what for f in inputs.seen.findings] == [
        "rows hidden or filtered out (skipped, not sent)"
    ]
    shown = read_inputs([tmp_path / "a.xlsx"], include_hidden_rows=True)
    assert "floating point" in shown.frame["problem"][0]


# --- from the adversary review: merged key cells, title rows, hidden sheets -----------------


def _dry_run(path: Path, tmp_path: Path, *extra: str) -> list[tuple[str, str]]:
    report = tmp_path / "r.csv"
    main(["run", str(path), "--report", str(report), "--dry-run", "--no-progress", *extra])
    frame = read_report(report)
    return list(zip(frame.order_ticket_key, frame.outcome, strict=True))


def test_rows_covered_by_a_merged_key_cell_show_its_formatted_text(tmp_path: Path) -> None:
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["event_id", "order_ticket_key"])
    for _ in range(3):
        sheet.append([EVENT, None])
    sheet["B2"] = 123
    sheet["B2"].number_format = "000000"  # shows 000123
    sheet.merge_cells("B2:B4")
    path = tmp_path / "merged.xlsx"
    book.save(path)
    # The covered rows show 000123 too (a repeat of row 2), never a bare 123.
    assert _dry_run(path, tmp_path) == [("000123", "planned")]


def test_with_event_id_a_title_row_naming_the_key_column_is_not_the_header(
    tmp_path: Path,
) -> None:
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["Ticket Key"])  # a title
    sheet.append([])
    sheet.append(["Attendee", "Ticket Key"])  # the header
    sheet.append(["Alice Smith", "a1b2c3d4e5f6"])
    path = tmp_path / "titled.xlsx"
    book.save(path)
    assert _dry_run(path, tmp_path, "--event-id", EVENT) == [("a1b2c3d4e5f6", "planned")]


def test_the_rows_of_a_hidden_sheet_are_skipped_like_hidden_rows(tmp_path: Path) -> None:
    book = openpyxl.Workbook()
    shown = book.active
    assert shown is not None
    shown.append(["event_id", "order_ticket_key"])
    shown.append([EVENT, "visible0001"])
    hidden = book.create_sheet("Old")
    hidden.append(["event_id", "order_ticket_key"])
    hidden.append([EVENT, "secret00001"])
    hidden.sheet_state = "hidden"
    path = tmp_path / "sheets.xlsx"
    book.save(path)
    assert _dry_run(path, tmp_path) == [("visible0001", "planned"), ("secret00001", "skipped")]


def test_a_conditional_format_s_number_format_does_not_replace_the_cell_s(
    tmp_path: Path,
) -> None:
    """Conditional formats (<dxf>) carry a <numFmt> of their own that may reuse an id."""
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["event_id", "order_ticket_key"])
    sheet.append([EVENT, 123])
    sheet["B2"].number_format = '"ABC"0'  # shows ABC123: not a key
    plain = tmp_path / "plain.xlsx"
    book.save(plain)
    path = tmp_path / "dxf.xlsx"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "xl/styles.xml":
                ident = re.search(rb'numFmtId="(\d+)" formatCode="&quot;ABC', data)
                assert ident is not None
                dxf = b'<dxfs count="1"><dxf><numFmt numFmtId="%s" formatCode="0"/></dxf></dxfs>'
                data = data.replace(b"</styleSheet>", dxf % ident[1] + b"</styleSheet>")
            target.writestr(item, data)
    assert _dry_run(path, tmp_path)[0][1] == "invalid"
