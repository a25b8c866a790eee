"""Hostile and broken input, through the command line so exit codes and messages are real.

Every file either works or stops the run with exit 2 and a message naming it; nothing prints a
traceback. File cases call ``batchjob._cli.main`` in-process with ``--dry-run`` (the same code
``python -m batchjob`` runs, minus the interpreter start-up); an exception escaping ``main``
is turned into what Python would print, a traceback and exit 1, so the assertions read the same.
Cases that need the API run the real child process against a loopback sandbox.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import struct
import traceback
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import openpyxl
import pytest
from aiohttp import web

from batchjob import JobConfig, run_job
from batchjob._cells import unescape_cell
from batchjob._cli import main
from batchjob._errors import InputError
from batchjob.read._limits import _check_workbook_size
from batchjob.sandbox import EventState, Sandbox, SandboxSettings, World
from tests.chaos_support import (
    TRIGGERS,
    Finished,
    cells,
    cli,
    cli_env,
    keys_sent,
    no_traceback,
)
from tests.support import compound_file, read_report, token_for, write_csv

EVENT = "07216444-4e3b-41ea-a3b8-5a418fce41f4"
SECRET = "tok-VERY-secret-0123456789"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No batchjob or Constant Contact settings leak in from the developer's shell."""
    import os

    for name in list(os.environ):
        if name.startswith(("BATCHJOB_", "CC_")):
            monkeypatch.delenv(name)
    yield


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> Finished:
    """``batchjob run ARGS`` in-process; an escaping exception is a traceback and exit 1."""
    try:
        code = main(["run", *args, "--log-format", "json"])
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 2
    except Exception:
        captured = capsys.readouterr()
        return Finished(1, captured.out, captured.err + traceback.format_exc())
    captured = capsys.readouterr()
    return Finished(code, captured.out, captured.err)


def dry_run(capsys: pytest.CaptureFixture[str], path: Path, report: Path) -> Finished:
    return run_main(capsys, str(path), "--report", str(report), "--dry-run")


def assert_refused(done: Finished, *words: str) -> None:
    assert done.code == 2, f"exit {done.code}\n{done.err}"
    assert no_traceback(done.err), done.err
    for word in words:
        assert word in done.err, f"{word!r} not in: {done.err}"


# --- files: each works or exits 2 naming itself -------------------------------------------------

TEXT = f"Event ID,Order Ticket Key,Name\r\n{EVENT},clé-1,Zoë Ünal\r\n{EVENT},€uro-2,Renée\r\n"
TEXT_KEYS = ["clé-1", "€uro-2"]


def xlsx_bytes(tmp_path: Path) -> bytes:
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["Event ID", "Order Ticket Key"])
    sheet.append([EVENT, "x1"])
    book.save(tmp_path / "scratch.xlsx")
    return (tmp_path / "scratch.xlsx").read_bytes()


Builder = Callable[[Path], Path]


def text_file(name: str, data: str | bytes) -> Builder:
    def build(tmp_path: Path) -> Path:
        path = tmp_path / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        return path

    return build


def directory(name: str) -> Builder:
    def build(tmp_path: Path) -> Path:
        path = tmp_path / name
        path.mkdir()
        return path

    return build


def workbook_named(name: str, cut: int | None = None) -> Builder:
    def build(tmp_path: Path) -> Path:
        data = xlsx_bytes(tmp_path)
        path = tmp_path / name
        path.write_bytes(data[:cut] if cut else data)
        return path

    return build


def late_nul(tmp_path: Path) -> Path:
    rows = "".join(f"{EVENT},k{i:07d}\n" for i in range(8000))  # > 256 KiB before the NUL
    path = tmp_path / "late-nul.csv"
    path.write_bytes(f"Event ID,Order Ticket Key\n{rows}{EVENT},bad\x00key\n".encode())
    return path


#: Files that work; those with "--event-id" in their name have no event column.
WORKS: list[tuple[str, Builder, list[str]]] = [
    ("utf-8", text_file("u8.csv", TEXT), TEXT_KEYS),
    ("utf-8 BOM", text_file("bom.csv", codecs.BOM_UTF8 + TEXT.encode()), TEXT_KEYS),
    ("utf-16 BOM", text_file("u16.csv", TEXT.encode("utf-16")), TEXT_KEYS),
    ("utf-16-be BOM", text_file("u16be.csv", codecs.BOM_UTF16_BE + TEXT.encode("utf-16-be")),
     TEXT_KEYS),
    ("cp1252", text_file("win.csv", TEXT.encode("cp1252")), TEXT_KEYS),
    ("semicolons", text_file("semi.csv", TEXT.replace(",", ";")), TEXT_KEYS),
    ("tabs in .tsv", text_file("t.tsv", TEXT.replace(",", "\t")), TEXT_KEYS),
    ("tabs in .csv", text_file("t.csv", TEXT.replace(",", "\t")), TEXT_KEYS),
    ("quoted newlines and delimiters",
     text_file("q.csv", f'Name,Event ID,Order Ticket Key\n"a\nb, c",{EVENT},k1\n'
                        f'"x;\r\ny""z",{EVENT},"k,2"\n'), ["k1", "k,2"]),
    ("blank lines",
     text_file("blank.csv", f"\n\n,,\nEvent ID,Order Ticket Key\n\n{EVENT},k1\n,\n\n"
                            f"{EVENT},k2\n\n\n"), ["k1", "k2"]),
    ("LF, CR and CRLF mixed",
     text_file("eol.csv", f"Event ID,Order Ticket Key\r{EVENT},k1\n{EVENT},k2\r\n{EVENT},k3"),
     ["k1", "k2", "k3"]),
    ("header only", text_file("head.csv", "Event ID,Order Ticket Key\n"), []),
    ("key column only, event from --event-id: header only",
     text_file("keyonly.csv", "Ticket Key\n"), []),
]  # fmt: skip

REFUSED: list[tuple[str, Builder, tuple[str, ...]]] = [
    ("empty file", text_file("empty.csv", b""), ("empty",)),
    ("BOM only", text_file("bomonly.csv", codecs.BOM_UTF8), ()),
    ("blank lines only", text_file("blanks.csv", "\n\r\n  \n"), ()),
    ("utf-16 without BOM", text_file("nobom.csv", TEXT.encode("utf-16-le")), ()),
    ("neither utf-8 nor cp1252", text_file("bytes.csv", b"Order Ticket Key\nk\x81\x8d\x90\n"), ()),
    ("no key column", text_file("names.csv", "Name,Email\nAnn,a@example.com\n"), ("Email",)),
    ("two key columns", text_file("two.csv", "Ticket Key,Order Ticket Key\na,b\n"), ()),
    ("workbook named .csv", workbook_named("book.csv"), ()),
    ("CSV named .xlsx", text_file("text.xlsx", TEXT), ()),
    ("HTML named .xls", text_file("page.xls", "<html><body><table></table></body></html>"), ()),
    ("PNG named .csv", text_file("img.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64)),
     ()),
    ("random bytes named .xlsx", text_file("rnd.xlsx", bytes(range(256)) * 8), ()),
    ("truncated workbook", workbook_named("cut.xlsx", cut=600), ()),
    ("old or encrypted workbook", text_file("ole.xlsx",
     b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(600)), ()),
    ("unsupported extension", text_file("data.json", '{"keys": []}'), ("json",)),
    ("no extension", text_file("README", "Order Ticket Key\nk\n"), ()),
    ("directory named .csv", directory("folder.csv"), ("directory",)),
    ("directory", directory("folder"), ()),
    ("UTF-8 and Windows-1252 mixed", text_file("mixed.csv",
     f"Event ID,Order Ticket Key,Name\n{EVENT},k1,Zoë\n".encode() + f"{EVENT},k2,Ren".encode()
     + b"\xe9e\n"), ("mixes two encodings", "row 3 is not UTF-8", "row 2 is UTF-8")),
    ("no event column and no --event-id", text_file("keys.csv", "Order Ticket Key\nk1\n"),
     ("no event id column and no --event-id",)),
]  # fmt: skip

EITHER: list[tuple[str, Builder]] = [
    ("unclosed quote",
     text_file("open.csv", f'Event ID,Order Ticket Key\n{EVENT},"k1\n{EVENT},k2\n')),
    ("NUL byte past the first 256 KiB", late_nul),
    ("ragged rows",
     text_file("ragged.csv", f"Event ID,Order Ticket Key\n{EVENT}\n{EVENT},k,x,y\n")),
    ("header with a NUL", text_file("nulhead.csv", b"Order\x00Ticket Key\nk\n")),
    ("a 1 MB key", text_file("long.csv", f"Event ID,Order Ticket Key\n{EVENT},{'k' * 2**20}\n")),
]  # fmt: skip


@pytest.mark.parametrize(("build", "keys"), [pytest.param(b, k, id=n) for n, b, k in WORKS])
def test_readable_files_work(
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    build: Builder,
    keys: list[str],
) -> None:
    path = build(tmp_path)
    report = tmp_path / "r.csv"
    args = [str(path), "--report", str(report), "--dry-run"]
    if "--event-id" in request.node.callspec.id:
        args += ["--event-id", EVENT]
    done = run_main(capsys, *args)
    assert done.code == 0, done.err
    assert no_traceback(done.err)
    frame = read_report(report)
    assert list(frame.order_ticket_key) == keys
    assert set(frame.outcome) <= {"planned"}
    assert set(frame.event_id) <= {EVENT}


@pytest.mark.parametrize(("build", "words"), [pytest.param(b, w, id=n) for n, b, w in REFUSED])
def test_unusable_files_exit_2_naming_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, build: Builder, words: tuple[str, ...]
) -> None:
    path = build(tmp_path)
    report = tmp_path / "r.csv"
    done = dry_run(capsys, path, report)
    assert_refused(done, path.name, *words)
    assert not report.exists()


@pytest.mark.parametrize("build", [pytest.param(b, id=n) for n, b in EITHER])
def test_odd_files_either_work_or_exit_2_naming_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, build: Builder
) -> None:
    path = build(tmp_path)
    report = tmp_path / "r.csv"
    done = dry_run(capsys, path, report)
    assert no_traceback(done.err), done.err
    if done.code == 2:
        assert path.name in done.err
        assert not report.exists()
    else:
        assert done.code in (0, 1), done.err
        frame = read_report(report)
        assert set(frame.outcome) <= {"planned", "invalid"}
        assert (frame.source_file == str(path)).all()


def test_a_path_that_does_not_exist_exits_2_naming_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    good = write_csv(tmp_path / "good.csv", [(EVENT, "k")], ("Event ID", "Order Ticket Key"))
    done = run_main(capsys, str(good), str(tmp_path / "nope.csv"), "--dry-run",
                    "--report", str(tmp_path / "r.csv"))  # fmt: skip
    assert_refused(done, "nope.csv", "does not exist")
    assert not (tmp_path / "r.csv").exists()


def test_a_workbook_with_many_sheets_reads_every_sheet_with_a_key_column(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    book = openpyxl.Workbook()
    first = book.active
    assert first is not None
    first.title = "Empty"
    notes = book.create_sheet("Notes")
    notes.append(["Name", "Comment"])
    notes.append(["Ann", "no keys here"])
    expected: list[tuple[str, str]] = []
    for n in range(40):
        sheet = book.create_sheet(f"Door {n}")
        if n % 3 == 0:
            sheet.append([])  # a blank row above the header
        sheet.append(["Order Ticket Key", "Event ID"])
        for i in range(5):
            key = f"{n:02d}{i:08d}"  # leading zeros: must survive as text
            sheet.append([key, EVENT])
            expected.append((f"Door {n}", key))
    path = tmp_path / "doors.xlsx"
    book.save(path)

    done = dry_run(capsys, path, tmp_path / "r.csv")

    assert done.code == 0, done.err
    frame = read_report(tmp_path / "r.csv")
    assert list(frame.order_ticket_key) == [k for _, k in expected]
    assert list(frame.source_file) == [f"{path}#{s}" for s, _ in expected]


def test_a_50_mb_file_is_planned_in_reasonable_time(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    events = [str(uuid.UUID(int=i + 1, version=4)) for i in range(5)]
    path = tmp_path / "big.csv"
    rows, size, i = [], 0, 0
    while size < 50 * 2**20:
        line = f"{events[i % 5]},{i:012x},Attendee Number {i},person{i}@example.com\n"
        rows.append(line)
        size += len(line)
        i += 1
    rows[1000] = f"{events[0]},{0:012x},a repeat,x@example.com\n"  # one duplicate
    path.write_text("Event ID,Order Ticket Key,Name,Email\n" + "".join(rows), encoding="utf-8")
    del rows

    done = dry_run(capsys, path, tmp_path / "r.csv")

    assert done.code == 0, done.err
    assert f"planned {i - 1}" in done.out
    assert "1 duplicate rows merged" in done.out
    with (tmp_path / "r.csv").open(encoding="utf-8") as fh:
        assert sum(1 for _ in fh) == 1 + i - 1


@pytest.mark.parametrize("position", [2, 8002])
def test_a_nul_in_a_key_makes_that_row_invalid_wherever_it_is(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, position: int
) -> None:
    rows = [f"{EVENT},k{i:07d}\n" for i in range(8010)]
    rows[position - 2] = f"{EVENT},bad\x00key\n"
    path = tmp_path / "nul.csv"
    path.write_bytes(("Event ID,Order Ticket Key\n" + "".join(rows)).encode())

    done = dry_run(capsys, path, tmp_path / "r.csv")

    assert done.code == 1, done.err  # finished; one row invalid
    frame = read_report(tmp_path / "r.csv")
    invalid = frame[frame.outcome == "invalid"]
    assert list(invalid.source_row) == [str(position)]
    assert list(invalid.source_file) == [str(path)]
    assert "column 'Order Ticket Key'" in invalid.error_message.iloc[0]
    assert "control character" in invalid.error_message.iloc[0]
    assert (frame.outcome == "planned").sum() == 8009


async def test_keys_that_cannot_be_sent_are_invalid_and_never_sent(tmp_path: Path) -> None:
    """A 5 MB key, control characters, a leading apostrophe: reported, not sent."""
    bad = ["x" * 5_000_000, "k" * 257, "a\x01b", "tab\tin", "'plain"]
    good = ["good-1", "k" * 256, "é" * 256]
    world = World({EVENT: EventState("ACTIVE", dict.fromkeys(good, True))})
    inputs = write_csv(tmp_path / "in.csv", [(EVENT, k) for k in [*bad, *good]],
                       ("Event ID", "Order Ticket Key"))  # fmt: skip
    async with Sandbox(world, SandboxSettings(rate=None, daily_quota=None)) as sandbox:
        done = await cli("run", str(inputs), "--report", str(tmp_path / "r.csv"),
                         env=cli_env(sandbox))  # fmt: skip
        assert done.code == 1, done.err
        sent = keys_sent(sandbox.requests)
    assert sent == set(good)
    frame = read_report(tmp_path / "r.csv")
    assert list(frame.outcome) == ["invalid"] * len(bad) + ["undone"] * len(good)
    assert list(frame.source_row[: len(bad)]) == ["2", "3", "4", "5", "6"]
    assert all("column 'Order Ticket Key'" in m for m in frame.error_message[: len(bad)])


async def test_whole_file_mistakes_stop_the_run_before_anything_is_sent(tmp_path: Path) -> None:
    world = World({EVENT: EventState("ACTIVE", {"k1": True, "k2": True})})
    keys_only = write_csv(tmp_path / "keys.csv", [("k1",), ("k2",)], ("Order Ticket Key",))
    with_event = write_csv(tmp_path / "ev.csv", [(EVENT, "k1")], ("Event ID", "Order Ticket Key"))
    async with Sandbox(world, SandboxSettings(rate=None, daily_quota=None)) as sandbox:
        env = cli_env(sandbox)
        no_event = await cli("run", str(keys_only), "--report", str(tmp_path / "a.csv"), env=env)
        both = await cli("run", str(keys_only), str(with_event), "--event-id", EVENT,
                         "--report", str(tmp_path / "b.csv"), env=env)  # fmt: skip
        assert sandbox.counters.total == 0
        fine = await cli("run", str(keys_only), "--event-id", EVENT,
                         "--report", str(tmp_path / "c.csv"), env=env)  # fmt: skip
    assert_refused(no_event, "keys.csv", "no event id column and no --event-id")
    assert_refused(both, "ev.csv", "has an event id column ('Event ID')", "--event-id")
    assert not (tmp_path / "a.csv").exists() and not (tmp_path / "b.csv").exists()
    assert fine.code == 0, fine.err


# --- workbooks built to hurt the reader ---------------------------------------------------------
# Each is a few KB and would make calamine ask for gigabytes (the process aborts, exit 134), so
# they run in a child process: a regression fails the test instead of killing pytest.


def _far_cell_book(tmp_path: Path, change: Callable[[bytes], bytes]) -> Path:
    book = openpyxl.Workbook()
    first = book.active
    assert first is not None
    first.title = "Door 1"
    first.append(["Event ID", "Order Ticket Key"])
    first.append([EVENT, "k1"])
    second = book.create_sheet("Late & far")
    second.append(["Event ID", "Order Ticket Key"])
    second.append([EVENT, "k2"])
    second["XFD1048576"] = "far"
    path = tmp_path / "far.xlsx"
    book.save(path)
    with zipfile.ZipFile(path) as source:
        parts = [(info.filename, source.read(info.filename)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for name, data in parts:
            target.writestr(name, change(data) if name == "xl/worksheets/sheet2.xml" else data)
    return path


def _without_dimension(xml: bytes) -> bytes:
    return re.sub(rb"<dimension [^>]*/>", b"", xml)


FAR_CELL_SHEETS: dict[str, Callable[[bytes], bytes]] = {
    "declared": lambda xml: xml,
    "no dimension": _without_dimension,
    "a lying dimension": lambda xml: xml.replace(b"A1:XFD1048576", b"A1:B2"),
    "r after other attributes": lambda xml: _without_dimension(xml).replace(
        b'<c r="XFD1048576" t="inlineStr">', b"<c t=\"inlineStr\"\n r = 'XFD1048576'>"
    ),
    "a namespace prefix": lambda xml: _without_dimension(xml).replace(
        b'<c r="XFD1048576" t="inlineStr"><is><t>far</t></is></c>',
        b'<x:c xmlns:x="http://schemas.openxmlformats.org/spreadsheetml/2006/main" '
        b'r="XFD1048576" t="inlineStr"><x:is><x:t>far</x:t></x:is></x:c>',
    ),
    "cells without r": lambda xml: _without_dimension(xml).replace(
        b'<row r="1048576"><c r="XFD1048576" t="inlineStr"><is><t>far</t></is></c></row>',
        b'<row r="2000">' + b"<c><v>1</v></c>" * 9000 + b"</row>",
    ),
}


@pytest.mark.parametrize("change", [pytest.param(c, id=n) for n, c in FAR_CELL_SHEETS.items()])
async def test_a_workbook_with_a_far_away_cell_exits_2_naming_file_and_sheet(
    tmp_path: Path, change: Callable[[bytes], bytes]
) -> None:
    path = _far_cell_book(tmp_path, change)
    assert path.stat().st_size < 200_000

    done = await cli("run", str(path), "--dry-run", "--report", str(tmp_path / "r.csv"),
                     env=cli_env())  # fmt: skip

    assert_refused(done, str(path), "sheet 'Late & far' has cells as far as")
    assert not (tmp_path / "r.csv").exists()


async def test_a_far_away_cell_in_a_sheet_part_with_an_odd_name_is_found(tmp_path: Path) -> None:
    """The engine reads whatever part the workbook points to; so does the check."""
    path = _far_cell_book(tmp_path, _without_dimension)
    with zipfile.ZipFile(path) as source:
        parts = [(info.filename, source.read(info.filename)) for info in source.infolist()]
    renamed = {"xl/worksheets/sheet2.xml": "xl/media/image1.png"}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for name, data in parts:
            if name == "xl/_rels/workbook.xml.rels":
                data = data.replace(b"/xl/worksheets/sheet2.xml", b"/xl/media/image1.png")
            target.writestr(renamed.get(name, name), data)

    done = await cli("run", str(path), "--dry-run", "--report", str(tmp_path / "r.csv"),
                     env=cli_env())  # fmt: skip

    assert_refused(done, str(path), "sheet 'Late & far' has cells as far as XFD1048576")


def _record(kind: int, data: bytes) -> bytes:
    return struct.pack("<HH", kind, len(data)) + data


def _xls(
    cells: list[tuple[int, int]], *, sheet_records: bytes = b"", book_records: bytes = b""
) -> bytes:
    """A minimal old-format workbook: one sheet, a NUMBER record per cell (row, column)."""
    record = _record

    bof = record(0x0809, struct.pack("<HHHHII", 0x0600, 0x0005, 0, 0, 0, 0))
    eof = record(0x000A, b"")
    name = b"Far"
    sheet_entry_size = 4 + 8 + len(name)
    sheet_at = len(bof) + sheet_entry_size + len(book_records) + len(eof)
    globals_ = bof + record(0x0085, struct.pack("<IBBBB", sheet_at, 0, 0, len(name), 0) + name)
    globals_ += book_records + eof
    sheet = record(0x0809, struct.pack("<HHHHII", 0x0600, 0x0010, 0, 0, 0, 0)) + sheet_records
    for row, column in cells:
        sheet += record(0x0203, struct.pack("<HHHd", row, column, 0, 1.0))
    stream = globals_ + sheet + eof
    stream += record(0x003C, bytes(4096))  # past the 4096-byte mini stream cutoff
    return compound_file(stream)


async def test_an_old_format_workbook_with_a_far_away_cell_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "far.xls"
    path.write_bytes(_xls([(0, 0), (65_535, 65_535)]))

    done = await cli("run", str(path), "--dry-run", "--report", str(tmp_path / "r.csv"),
                     env=cli_env())  # fmt: skip

    assert_refused(done, str(path), "sheet 'Far' has cells as far as CRXP65536")


def _renamed(name: str, build: Callable[[Path], Path]) -> Callable[[Path], Path]:
    def rename(tmp_path: Path) -> Path:
        return build(tmp_path).rename(tmp_path / name)

    return rename


def _far_ods(tmp_path: Path) -> Path:
    """An .ods whose one repeated row reaches row 1,000,000,002."""
    table = "urn:oasis:names:tc:opendocument:xmlns:table:1.0"
    content = (
        '<?xml version="1.0" encoding="UTF-8"?><office:document-content '
        'xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" '
        f'xmlns:table="{table}" xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0">'
        '<office:body><office:spreadsheet><table:table table:name="Far">'
        '<table:table-row><table:table-cell office:value-type="string"><text:p>Ticket Key'
        "</text:p></table:table-cell></table:table-row>"
        '<table:table-row table:number-rows-repeated="1000000000">'
        '<table:table-cell office:value-type="string"><text:p>x</text:p></table:table-cell>'
        "</table:table-row></table:table></office:spreadsheet></office:body>"
        "</office:document-content>"
    )
    path = tmp_path / "far.ods"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("mimetype", "application/vnd.oasis.opendocument.spreadsheet")
        archive.writestr("content.xml", content)
    return path


#: The engine picks the format from the content, whatever the name says (exit 134 before).
LYING_SUFFIXES: dict[str, tuple[Callable[[Path], Path], str]] = {
    ".xlsx named .ods": (
        _renamed("far.ods", lambda p: _far_cell_book(p, lambda xml: xml)),
        "sheet 'Late & far' has cells as far as XFD1048576",
    ),
    ".xlsx named .xlsb": (
        _renamed("far.xlsb", lambda p: _far_cell_book(p, lambda xml: xml)),
        "sheet 'Late & far' has cells as far as XFD1048576",
    ),
    ".ods named .xlsx": (_renamed("far.xlsx", _far_ods), "sheet 'Far' has cells as far as"),
}


@pytest.mark.parametrize(
    ("build", "words"), [pytest.param(b, w, id=n) for n, (b, w) in LYING_SUFFIXES.items()]
)
async def test_a_workbook_whose_suffix_lies_is_still_checked(
    tmp_path: Path, build: Callable[[Path], Path], words: str
) -> None:
    path = build(tmp_path)
    assert path.stat().st_size < 200_000

    done = await cli("run", str(path), "--dry-run", "--report", str(tmp_path / "r.csv"),
                     env=cli_env())  # fmt: skip

    assert_refused(done, str(path), words)


def _with_part(path: Path, name: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return path


async def test_a_shared_strings_count_bomb_exits_2(tmp_path: Path) -> None:
    """uniqueCount="4294967295" with one string: the engine reserved 103 GB and aborted."""
    path = tmp_path / "book.xlsx"
    path.write_bytes(xlsx_bytes(tmp_path))
    _with_part(
        path,
        "xl/sharedStrings.xml",
        b'<?xml version="1.0"?><sst xmlns="http://schemas.openxmlformats.org/spreadsheetml/'
        b'2006/main" count="4294967295" uniqueCount="4294967295"><si><t>a</t></si></sst>',
    )

    done = await cli("run", str(path), "--dry-run", "--report", str(tmp_path / "r.csv"),
                     env=cli_env())  # fmt: skip

    assert_refused(done, str(path), "part 'xl/sharedStrings.xml' declares 4,294,967,295 shared")


async def test_an_old_format_workbook_declaring_huge_dimensions_exits_2(tmp_path: Path) -> None:
    """DIMENSIONS rows 0..2^32-1: the engine reserved petabytes and aborted."""
    path = tmp_path / "dims.xls"
    dimensions = _record(0x0200, struct.pack("<IIHHH", 0, 0xFFFFFFFF, 0, 0xFFFF, 0))
    path.write_bytes(_xls([(0, 0)], sheet_records=dimensions))

    done = await cli("run", str(path), "--dry-run", "--report", str(tmp_path / "r.csv"),
                     env=cli_env())  # fmt: skip

    assert_refused(done, str(path), "sheet 'Far' declares 4,294,967,295 rows x 65,535 columns")


def test_an_old_format_workbook_declaring_too_many_strings_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sst.xls"
    strings = _record(0x00FC, struct.pack("<IIHB", 0xFFFFFFFF, 0xFFFFFFFF, 1, 0) + b"a")
    path.write_bytes(_xls([(0, 0)], book_records=strings))

    with pytest.raises(InputError, match="declares 4,294,967,295 shared strings"):
        _check_workbook_size(str(path), ".xls", path.read_bytes()[:8])


def test_an_old_format_workbook_declaring_more_fat_sectors_than_it_has_is_refused(
    tmp_path: Path,
) -> None:
    data = bytearray(_xls([(0, 0)]))
    struct.pack_into("<I", data, 0x2C, 0xFFFFFFFF)  # the engine reserves 16 GB for these
    path = tmp_path / "fat.xls"
    path.write_bytes(bytes(data))

    with pytest.raises(InputError, match="declares 4,294,967,295 FAT sectors"):
        _check_workbook_size(str(path), ".xls", bytes(data[:8]))


@pytest.mark.parametrize("reference", ["$A$3", "&#88;FD1048576", "B-5"])
def test_a_cell_reference_excel_never_writes_exits_2_naming_file_and_sheet(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, reference: str
) -> None:
    """Was an internal error (exit 3): the scan could not parse the reference."""
    path = _far_cell_book(
        tmp_path,
        lambda xml: _without_dimension(xml).replace(b'r="XFD1048576"', f'r="{reference}"'.encode()),
    )

    done = dry_run(capsys, path, tmp_path / "r.csv")

    assert_refused(done, str(path), f"sheet 'Late & far' has a cell at {reference!r}")


@pytest.mark.parametrize(
    ("reference", "suffix", "words"),
    [
        ("BGQCV16", ".xlsx", "as far as BGQCV16 (1,048,576 columns), wider than the 16,384"),
        ("XFE3", ".xlsx", "as far as XFE3 (16,385 columns), wider than the 16,384 (column XFD)"),
        ("XFD1024", ".xls", "as far as XFD1024 (16,384 columns), wider than the 256 (column IV)"),
        ("IW1", ".xls", "as far as IW1 (257 columns), wider than the 256 (column IV)"),
    ],
)
def test_a_sheet_wider_than_its_format_allows_is_refused_unread(
    tmp_path: Path, reference: str, suffix: str, words: str
) -> None:
    """Under the cell limit but very wide: BGQCV16 took a minute and 3 GB in pandas."""
    letters = reference.rstrip("0123456789")
    row = int(reference[len(letters) :])
    column = 0
    for letter in letters:
        column = column * 26 + ord(letter) - ord("A") + 1
    if suffix == ".xls":
        path = tmp_path / "wide.xls"
        path.write_bytes(_xls([(0, 0), (row - 1, column - 1)]))
    else:
        path = _far_cell_book(
            tmp_path,
            lambda xml: _without_dimension(xml).replace(
                b'<row r="1048576"><c r="XFD1048576"',
                f'<row r="{row}"><c r="{reference}"'.encode(),
            ),
        )
    head = path.read_bytes()[:8]

    with pytest.raises(InputError, match=re.escape(words)):
        _check_workbook_size(str(path), suffix, head)


@pytest.mark.parametrize("reference", ["XFD1024", "P1048576"])
def test_the_widest_and_longest_sheets_within_the_limits_pass_the_check(
    tmp_path: Path, reference: str
) -> None:
    row = reference.lstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    path = _far_cell_book(
        tmp_path,
        lambda xml: _without_dimension(xml).replace(
            b'<row r="1048576"><c r="XFD1048576"', f'<row r="{row}"><c r="{reference}"'.encode()
        ),
    )

    _check_workbook_size(str(path), ".xlsx", path.read_bytes()[:8])


# --- report paths ---------------------------------------------------------------------------------


def test_a_report_path_that_is_a_directory_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    good = write_csv(tmp_path / "good.csv", [(EVENT, "k")], ("Event ID", "Order Ticket Key"))
    (tmp_path / "out").mkdir()
    done = run_main(capsys, str(good), "--report", str(tmp_path / "out"), "--dry-run")
    assert_refused(done, "out")
    # A dry run never replaces a report, so it cannot resume one either.
    done = run_main(capsys, str(good), "--report", str(tmp_path / "out"), "--dry-run", "--resume")
    assert_refused(done, "--resume")


def test_a_report_path_under_a_regular_file_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    good = write_csv(tmp_path / "good.csv", [(EVENT, "k")], ("Event ID", "Order Ticket Key"))
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    done = run_main(capsys, str(good), "--report", str(tmp_path / "afile" / "r.csv"), "--dry-run")
    assert_refused(done, "afile")


async def test_an_unusable_failed_rows_path_stops_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    world = World({EVENT: EventState("ACTIVE", {"k1": True, "k2": True})})
    good = write_csv(tmp_path / "good.csv", [(EVENT, "k1"), (EVENT, "k2")],
                     ("Event ID", "Order Ticket Key"))  # fmt: skip
    (tmp_path / "failed").mkdir()
    async with Sandbox(world, SandboxSettings(rate=None, daily_quota=None)) as sandbox:
        done = await cli(
            "run", str(good), "--report", str(tmp_path / "r.csv"),
            "--failed-rows", str(tmp_path / "failed"), env=cli_env(sandbox),
        )  # fmt: skip
        assert_refused(done, "failed")
        assert sandbox.counters.total == 0


# --- formula injection ----------------------------------------------------------------------------

FORMULA_KEYS = [
    "=1+2",
    "+41",
    "-7",
    "@SUM(A1:A2)",
    '=HYPERLINK("http://example.com","x")',
    "plain-1",
    "=cmd|' /C calc'!A0",
]
# A leading apostrophe before a formula character is a spreadsheet's text marker: it comes off,
# in any file. A key still starting with one could not survive a round trip through a
# spreadsheet (which drops it): invalid, reported (escaped), never sent.
MARKED = {"'=marked": "=marked"}
APOSTROPHE_KEYS = ["''+two", "'plain"]


async def test_formula_like_keys_are_escaped_in_reports_and_sent_back_as_written(
    tmp_path: Path,
) -> None:
    """Keys a spreadsheet would run are shown escaped; rerunning the failed rows sends the
    original keys. A daily quota of one request (the event check) leaves every key failed."""
    sendable = [*FORMULA_KEYS, *MARKED.values()]
    world = World({EVENT: EventState("ACTIVE", dict.fromkeys(sendable, True))})
    # A leading tab or CR is a control character: that row is invalid, never stripped and sent.
    data = [(EVENT, k) for k in [*FORMULA_KEYS, *MARKED, *APOSTROPHE_KEYS]]
    data += [(EVENT, "\t=1+2"), (EVENT, "\r-7")]
    data += [("=2+3", "plain-1"), ("@evil", "-7")]  # formula-like event ids: invalid rows
    write_csv(tmp_path / "=scans.csv", data, ("Event ID", "Order Ticket Key"))
    # A file name is a cell too (source_file); one starting with a tab.
    write_csv(tmp_path / "\tdoor 2.csv", [(EVENT, "plain-2")], ("Event ID", "Order Ticket Key"))
    world.events[EVENT].tickets["plain-2"] = True
    settings = SandboxSettings(rate=None, daily_quota=1)
    async with Sandbox(world, settings) as sandbox:
        env = cli_env(sandbox)
        first = await cli("run", "=scans.csv", "\tdoor 2.csv", "--report", "r.csv",
                          env=env, cwd=tmp_path)  # fmt: skip
        assert first.code == 3, first.err
        assert not keys_sent(sandbox.requests)  # only the event check got through

        for name in ("r.csv", "r.failed.csv"):
            for row in cells(tmp_path / name)[1:]:
                for cell in row:
                    assert not cell.startswith(TRIGGERS), f"{name}: unescaped cell {cell!r}"
        report = cells(tmp_path / "r.csv")
        keys = [row[1] for row in report[1:]]
        written = [*sendable, "'+two", "'plain"]
        assert keys[: len(written)] == [
            "'" + k if re.match(r"'*[=+\-@]", k) else k for k in written
        ]
        assert [unescape_cell(k) for k in keys[: len(written)]] == written
        assert {row[7] for row in report[1:]} == {"'=scans.csv", "'\tdoor 2.csv"}  # source_file
        invalid = [row for row in report[1:] if row[2] == "invalid"]
        assert [unescape_cell(row[1]) for row in invalid[:2]] == ["'+two", "'plain"]
        assert all("starts with an apostrophe" in row[5] for row in invalid[:2])
        assert [unescape_cell(row[1]) for row in invalid[2:4]] == ["\t=1+2", "\r-7"]
        assert all("control character" in row[5] for row in invalid[2:4])
        assert [row[0] for row in invalid[4:]] == ["'=2+3", "'@evil"]

        sandbox.reset_quota()
        sandbox.settings.daily_quota = None
        rerun = await cli("run", "r.failed.csv", "--report", "rerun.csv", env=env, cwd=tmp_path)
        assert rerun.code == 0, rerun.err
    sent = [k for r in sandbox.requests for k in r.keys]
    assert sorted(sent) == sorted([*sendable, "plain-2"])  # the originals, each once
    assert not any(world.events[EVENT].tickets.values())


#: Keys a spreadsheet would take for formulas, or whose escaping a careless reader would keep.
HOSTILE_KEYS = [
    "=1+2", "+41", "-7", "@SUM(A1)", "=", "+", "-", "@", "=-", "--", "-=1", "+'x", "@'",
    "=cmd|' /C calc'!A0", '=HYPERLINK("http://e.com","x")', "-1.5e3", "+44 20 7946 0000",
    "a'=b", "k'", '="q"', "x=y",
]  # fmt: skip


def trim(source: Path, target: Path, columns: list[str], *, spreadsheet: bool) -> Path:
    """Keep ``columns`` of a failed-rows file, as a person would in Excel or an editor.

    ``spreadsheet``: saved again by a spreadsheet, which hides a leading apostrophe as a text
    marker and writes the cell without it.
    """
    rows = cells(source)
    wanted = [rows[0].index(name) for name in columns]
    with target.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows[1:]:
            kept = [row[i] for i in wanted]
            writer.writerow([c[1:] if spreadsheet and c.startswith("'") else c for c in kept])
    return target


async def test_a_failed_rows_file_trimmed_to_two_columns_sends_the_very_same_keys(
    tmp_path: Path,
) -> None:
    assert len(HOSTILE_KEYS) == 21
    world = World({EVENT: EventState("ACTIVE", dict.fromkeys(HOSTILE_KEYS, True))})
    write_csv(tmp_path / "in.csv", [(EVENT, k) for k in HOSTILE_KEYS],
              ("Event ID", "Order Ticket Key"))  # fmt: skip
    async with Sandbox(world, SandboxSettings(rate=None, daily_quota=1)) as sandbox:
        env = cli_env(sandbox)
        first = await cli("run", "in.csv", "--report", "r.csv", env=env, cwd=tmp_path)
        assert first.code == 3, first.err  # the quota left every key in the failed-rows file
        sandbox.reset_quota()
        sandbox.settings.daily_quota = None
        for spreadsheet in (False, True):
            sandbox.requests.clear()
            trimmed = trim(tmp_path / "r.failed.csv", tmp_path / f"t{spreadsheet}.csv",
                           ["order_ticket_key", "event_id"], spreadsheet=spreadsheet)  # fmt: skip
            # --again: the first rerun undid them all, the second must send them too.
            rerun = await cli("run", trimmed.name, "--report", f"rerun{spreadsheet}.csv",
                              "--again", env=env, cwd=tmp_path)  # fmt: skip
            assert rerun.code == 0, rerun.err
            sent = [k for r in sandbox.requests for k in r.keys]
            assert sorted(sent) == sorted(HOSTILE_KEYS), f"spreadsheet={spreadsheet}"


# --- where the token may go -----------------------------------------------------------------------

INSECURE = [
    "http://api.example.com/v3",
    "http://localhost.example.com/v3",
    "http://127.0.0.1.nip.io/v3",
    "http://127.0.0.1@api.example.com/v3",
    "http://api.example.com#@127.0.0.1/v3",
    "http://0.0.0.0:8080/v3",
    "http://10.0.0.1/v3",
    "HTTP://api.example.com/v3",
    "ftp://127.0.0.1/v3",
    "https:///v3",
    "api.example.com/v3",
]


@pytest.mark.parametrize("url", INSECURE)
@pytest.mark.parametrize("where", ["env", "flag", "config", "token_url"])
def test_the_token_never_goes_in_clear_text_to_another_host(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    url: str,
    where: str,
) -> None:
    good = write_csv(tmp_path / "good.csv", [(EVENT, "k")], ("Event ID", "Order Ticket Key"))
    monkeypatch.setenv("CC_ACCESS_TOKEN", SECRET)
    args = [str(good), "--report", str(tmp_path / "r.csv")]
    if where == "env":
        monkeypatch.setenv("CC_BASE_URL", url)
    elif where == "token_url":
        monkeypatch.setenv("CC_TOKEN_URL", url)
    elif where == "flag":
        args += ["--base-url", url]
    else:
        config = tmp_path / "c.toml"
        config.write_text(f'base_url = "{url}"\n', encoding="utf-8")
        args += ["--config", str(config)]

    done = run_main(capsys, *args)

    assert_refused(done, "clear text")
    assert SECRET not in done.out + done.err
    assert not (tmp_path / "r.csv").exists()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/v3",
        "http://[::1]:9/v3",
        "http://localhost:9/v3",
        "https://api.example.com/v3",
    ],
)
def test_loopback_and_https_urls_are_accepted(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str
) -> None:
    good = write_csv(tmp_path / "good.csv", [(EVENT, "k")], ("Event ID", "Order Ticket Key"))
    monkeypatch.setenv("CC_BASE_URL", url)
    done = run_main(capsys, str(good), "--report", str(tmp_path / "r.csv"), "--dry-run")
    assert done.code == 0, done.err


@pytest.fixture
async def redirector(sandbox: Sandbox) -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """An API on 127.0.0.1 that redirects everything to another origin, which logs headers."""
    seen: list[dict[str, str]] = []

    async def elsewhere(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        return web.json_response({"status": "ACTIVE"})

    other = web.Application()
    other.router.add_route("*", "/{tail:.*}", elsewhere)
    other_runner = web.AppRunner(other)
    await other_runner.setup()
    await web.TCPSite(other_runner, "127.0.0.1", 0).start()
    other_port = other_runner.addresses[0][1]

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(f"http://localhost:{other_port}{request.path}")

    front = web.Application()
    front.router.add_route("*", "/{tail:.*}", redirect)
    front_runner = web.AppRunner(front)
    await front_runner.setup()
    await web.TCPSite(front_runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{front_runner.addresses[0][1]}/v3", seen
    finally:
        await front_runner.cleanup()
        await other_runner.cleanup()


async def test_a_redirect_never_carries_the_token_to_another_origin(
    sandbox: Sandbox, redirector: tuple[str, list[dict[str, str]]], tmp_path: Path
) -> None:
    base_url, seen = redirector
    good = write_csv(tmp_path / "good.csv", [(EVENT, "k")], ("Event ID", "Order Ticket Key"))
    config = JobConfig(inputs=(good,), report=tmp_path / "r.csv", base_url=base_url,
                       retry_base=0.005, retry_cap=0.05)  # fmt: skip
    result = await run_job(config, tokens=token_for(sandbox))
    # Redirects are not followed at all: nothing reaches the other origin, and an answer
    # from elsewhere can never get a key reported undone.
    assert not seen
    report = (tmp_path / "r.csv").read_text()
    assert ",failed,307," in report and "undone" not in report
    assert result.counts["undone"] == 0


# --- event ids in URL paths -----------------------------------------------------------------------

PATH_TRICKS = [
    "../../admin",
    f"{EVENT}/../../admin",
    "..%2F..%2Fadmin",
    f"{EVENT}?admin=1",
    f"{EVENT}#admin",
    f"{EVENT}/undo_check_in/tickets",
    f"{EVENT[:-1]}\u0661",  # an Arabic-Indic digit: a "digit", not hex
    f"{EVENT} admin",
    f"{{{EVENT}}}",
]


async def test_event_ids_are_validated_before_they_reach_a_url_path(tmp_path: Path) -> None:
    world = World({EVENT: EventState("ACTIVE", {f"k{i}": True for i in range(4)}
                   | {"../../etc/passwd": True})})  # fmt: skip
    data = [(trick, f"t{i}") for i, trick in enumerate(PATH_TRICKS)]
    data += [(EVENT.upper(), "k0"), (f"  {EVENT}  ", "k1"), (EVENT, "k2"), (EVENT, "k3")]
    data += [(EVENT, "../../etc/passwd")]  # a key goes in the JSON body, never the path
    inputs = write_csv(tmp_path / "in.csv", data, ("Event ID", "Order Ticket Key"))
    async with Sandbox(world, SandboxSettings(rate=None, daily_quota=None)) as sandbox:
        done = await cli("run", str(inputs), "--report", str(tmp_path / "r.csv"),
                         env=cli_env(sandbox))  # fmt: skip
        assert done.code == 1, done.err  # finished; some rows invalid
        paths = [r.path for r in sandbox.requests]
    frame = read_report(tmp_path / "r.csv")
    assert list(frame.outcome[: len(PATH_TRICKS)]) == ["invalid"] * len(PATH_TRICKS)
    assert set(frame.outcome[len(PATH_TRICKS) :]) == {"undone"}
    allowed = re.compile(rf"/v3/events/{EVENT}(/undo_check_in/tickets)?")
    assert paths and all(allowed.fullmatch(p) for p in paths), paths
    assert not any(world.events[EVENT].tickets.values())


@pytest.mark.parametrize("event_id", ["../../admin", "not-a-uuid"])
def test_a_bad_event_id_option_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, event_id: str
) -> None:
    keys = write_csv(tmp_path / "keys.csv", [("k1",)], ("Order Ticket Key",))
    done = run_main(capsys, str(keys), "--event-id", event_id, "--dry-run",
                    "--report", str(tmp_path / "r.csv"))  # fmt: skip
    assert_refused(done, event_id, "UUID")


def test_report_cells_read_back_by_the_csv_module_round_trip() -> None:
    """The escaping is a bijection on the values a key can take (see _cells)."""
    from batchjob._cells import escape_cell

    for value in [*FORMULA_KEYS, "", "'", "''", "'a", "a'", "'-", "-'", "\t", "\r\n=x"]:
        buffer = io.StringIO()
        csv.writer(buffer).writerow([escape_cell(value)])
        (cell,) = next(csv.reader(io.StringIO(buffer.getvalue())))
        assert unescape_cell(cell) == value
        assert not cell.startswith(TRIGGERS)
