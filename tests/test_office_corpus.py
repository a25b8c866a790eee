"""What the user sees is what is sent (issue 9): every file of the LibreOffice corpus, row by row.

Each row LibreOffice reports (tests/office_corpus/expected.json, which agrees with the
``.shown.csv`` exports) is either planned with exactly the text the sheet shows, or reported
invalid with its cause, or skipped because it is hidden. Nothing else: no row planned with text
the user never saw, no row lost.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from batchjob.plan import build_plan
from batchjob.read import HIDDEN_PROBLEM, read_inputs

CORPUS = Path(__file__).parent / "office_corpus"
EXPECTED: dict[str, Any] = json.loads((CORPUS / "expected.json").read_text(encoding="utf-8"))
FILES: dict[str, Any] = EXPECTED["files"]


def _truth(name: str) -> list[tuple[str, int, dict[str, Any]]]:
    """(source, row, observed) for every row below the header of every sheet of one file."""
    info = FILES[name]
    path = str(CORPUS / name)
    if "records" in info:
        return [
            (path, record["row"], record)
            for record in info["records"]
            if record["row"] > EXPECTED["header_row"]["Scans"]
        ]
    if "rows" in info:
        return [(f"{path}#{info['sheet']}", row["row"], row) for row in info["rows"]]
    found = []
    for sheet, rows in info["sheets"].items():
        header = EXPECTED["header_row"][sheet]
        found += [(f"{path}#{sheet}", row["row"], row) for row in rows if row["row"] > header]
    return found


def _shown_csv_agrees(name: str) -> None:
    """The manifest says what the sheet's own "as shown" CSV export says (merges aside)."""
    info = FILES[name]
    for sheet, rows in info.get("sheets", {}).items():
        export = CORPUS / f"{name}.{sheet}.shown.csv"
        with export.open(encoding="utf-8", newline="") as handle:
            lines = list(csv.reader(handle))
        for row in rows:
            shown = lines[row["row"] - 1]
            assert (shown[1] if len(shown) > 1 else "") == row["key"]
            if not row.get("event_covered_by_merge"):
                assert (shown[0] if shown else "") == row["event"]


@pytest.mark.parametrize("name", sorted(FILES))
def test_every_row_is_planned_as_shown_or_refused_with_its_cause(name: str) -> None:
    _shown_csv_agrees(name)
    inputs = read_inputs([CORPUS / name])
    frame = inputs.frame
    read = {
        (str(source), int(row)): (key, event, problem)
        for source, row, key, event, problem in zip(
            frame["source_file"],
            frame["source_row"],
            frame["order_ticket_key"],
            frame["event_id"],
            frame["problem"],
            strict=True,
        )
    }
    planned = 0
    for source, row, seen in _truth(name):
        where = f"{source} row {row}"
        if (
            not seen["key"]
            and not seen["event"]
            and not seen.get("note", "")
            and not seen.get("door", "")
        ):
            assert (source, row) not in read, f"{where}: a blank row is not reported"
            continue
        assert (source, row) in read, f"{where}: lost"
        key, event, problem = read[(source, row)]
        hidden = seen.get("hidden") or seen.get("filtered")
        if hidden:
            assert problem == HIDDEN_PROBLEM, f"{where}: hidden, but {problem!r}"
        elif problem:
            assert problem != HIDDEN_PROBLEM, f"{where}: skipped, but not hidden"
        else:
            planned += 1
            assert key == seen["key"].strip(" "), f"{where}: planned {key!r}, shown {seen['key']!r}"
            assert event == seen["event"].strip().lower(), f"{where}: event {event!r}"
    assert planned, "the corpus has usable rows"


@pytest.mark.parametrize("name", ["scans.xlsx", "roundtrip.xlsx", "roundtrip-special.xlsx"])
def test_number_cells_are_refused_unless_they_show_a_key(name: str) -> None:
    """Where batchjob reads the formats, every refused number cell names its cause and cure."""
    inputs = read_inputs([CORPUS / name])
    problems = [p for p in inputs.frame["problem"].tolist() if p and p != HIDDEN_PROBLEM]
    refused = [p for p in problems if "format the column as Text and export again" in p]
    assert refused
    assert any(f.what.startswith("cells refused") for f in inputs.seen.findings)


def test_scans_xlsx_causes_row_by_row() -> None:
    frame = read_inputs([CORPUS / "scans.xlsx"]).frame
    by_row = {
        int(row): (key, problem)
        for row, key, problem, source in zip(
            frame["source_row"],
            frame["order_ticket_key"],
            frame["problem"],
            frame["source_file"],
            strict=True,
        )
        if str(source).endswith("#Scans")
    }
    expected = {
        4: "",
        8: "scientific notation",
        9: "scientific notation",
        10: "",
        12: "",
        14: "a date",
        15: "a date",
        16: "a time",
        17: "boolean",
        19: "percentage",
        20: "currency",
        22: "scientific notation",
        24: "error value",
        25: "error value",
        26: "formula",
        29: "",  # covered by the merged event cell: takes its value
        30: "",
        31: HIDDEN_PROBLEM,
        33: HIDDEN_PROBLEM,
        36: "no key and no event",
        37: "control character",
    }
    for row, cause in expected.items():
        problem = by_row[row][1]
        assert (cause in problem) if cause else problem == "", (row, problem)
    assert by_row[10][0] == "000123"  # format 000000: the shown text, leading zeros and all
    assert by_row[24][0] == "#N/A"


def test_dry_run_plan_skips_hidden_rows_and_merges_a_hidden_repeat(tmp_path: Path) -> None:
    plan = build_plan(read_inputs([CORPUS / "scans.xlsx"]))
    assert len(plan.skipped) == 4
    assert plan.seen.headers == (f"header found on row 3 of {CORPUS / 'scans.xlsx'}#Scans",)
    sent = read_inputs([CORPUS / "scans.xlsx"], include_hidden_rows=True)
    assert HIDDEN_PROBLEM not in set(sent.frame["problem"])


def test_keys_from_number_cells_are_told_with_places_and_cure() -> None:
    """roundtrip.xlsx: a CSV of text keys opened and saved by an office suite; the keys that
    became numbers (000123 -> 123) are sent as shown, but the summary says so."""
    seen = read_inputs([CORPUS / "roundtrip.xlsx"]).seen
    (numbers,) = [f for f in seen.findings if f.what.startswith("keys or events read from number")]
    assert numbers.count >= 4
    assert numbers.places[0] == f"{CORPUS / 'roundtrip.xlsx'}#roundtrip-source row 2"
    assert "format the column as Text" in numbers.cure
    assert numbers.line().startswith(f"{numbers.count} keys or events read from number cells")
