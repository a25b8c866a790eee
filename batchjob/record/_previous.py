"""An earlier run's rows, read back from its report and journal for ``--resume``.

Only lines batchjob wrote are accepted: a line it did not write is refused with its file and
line, never skipped.
"""

from __future__ import annotations

import csv
import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from batchjob._cells import unescape_cell
from batchjob._errors import ReportError
from batchjob._logging import clip
from batchjob._model import REPORT_COLUMNS, Outcome
from batchjob.record._files import ReportPaths
from batchjob.record._journal import _complete_lines

_OUTCOME_VALUES = frozenset(o.value for o in Outcome)
_SUCCESS_VALUES = [Outcome.UNDONE.value, Outcome.CHECKED_IN.value]


def read_previous(paths: ReportPaths) -> pd.DataFrame:
    """An earlier run's rows from its report and journal, for --resume.

    Text columns as written (event_id and key unescaped), one row per (event, key) among rows
    that were not ``invalid``; a pair ever recorded ``undone`` keeps that row. Each row says
    where it came from (``record_file``, ``record_index``: see :func:`record_place`). A record
    batchjob cannot have written is refused, naming its file and line.
    """
    frames = []
    for path in (paths.report, paths.journal):
        data = _complete_lines(path)
        if not data:
            continue  # not there, empty, or a crash cut even the header: nothing recorded
        frame = _read_records(path, data)
        frame["record_file"] = str(path)
        frame["record_index"] = np.arange(len(frame))
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=[*REPORT_COLUMNS, "record_file", "record_index"])
    previous = pd.concat(frames, ignore_index=True)
    previous = previous[~previous["outcome"].isin([Outcome.INVALID.value, Outcome.SKIPPED.value])]
    for column in ("event_id", "order_ticket_key"):
        previous[column] = previous[column].map(unescape_cell)
    # Undone is final (a later record of the same key can only come from a stale copy).
    previous = previous.sort_values("outcome", key=lambda o: o.isin(_SUCCESS_VALUES), kind="stable")
    return previous.drop_duplicates(["event_id", "order_ticket_key"], keep="last")


def _read_records(path: Path, data: bytes) -> pd.DataFrame:
    """One report or journal as text columns; a malformed record is a ReportError."""
    try:
        with warnings.catch_warnings():
            # A first row with a field too many: pandas would drop it with only a warning.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, index_col=False)
    except (ValueError, pd.errors.ParserWarning) as exc:  # UnicodeDecodeError is a ValueError
        line = _first_bad_line(data)
        if line is None:
            raise ReportError(f"{path}: cannot read it to resume: {exc}") from None
        raise ReportError(
            f"{path}, line {line}: not a record batchjob wrote (not one CSV row of the "
            "header's columns in UTF-8); fix or delete that line to resume"
        ) from None
    missing = {"event_id", "order_ticket_key", "outcome"} - set(frame.columns)
    if missing:
        raise ReportError(f"{path}: not a batchjob report (no column {', '.join(sorted(missing))})")
    bad = ~frame["outcome"].isin(_OUTCOME_VALUES).to_numpy()
    if "attempts" in frame:
        # resume_previous reads it as a number: digits (a count fits in 9) or nothing.
        attempts = frame["attempts"].fillna("").str.strip()
        bad |= ~attempts.str.fullmatch("[0-9]{0,9}").fillna(False).to_numpy(dtype=bool)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        record = frame.iloc[index]
        raise ReportError(
            f"{_place(path, data, index)}: not a record batchjob wrote (outcome "
            f"{clip(str(record['outcome']), 40)!r}, "
            f"attempts {clip(str(record.get('attempts', '')), 40)!r}); "
            "fix or delete that line to resume"
        )
    return frame


def _csv_records(data: bytes) -> Iterator[tuple[int, list[str]]]:
    """(first line, fields) of each record, blank lines skipped as pandas does; lines counted
    as an editor shows them (\r\n, \n or \r ends one)."""
    reader = csv.reader(io.StringIO(data.decode("utf-8", errors="replace"), newline=""))
    line = 1
    for fields in reader:
        if fields:
            yield line, fields
        line = reader.line_num + 1


def _first_bad_line(data: bytes) -> int | None:
    """The line of the first record that is not valid UTF-8 CSV with the header's width."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return data.count(b"\n", 0, exc.start) + 1
    records = _csv_records(data)
    width = None
    try:
        for line, fields in records:
            if width is None:
                width = len(fields)
            elif len(fields) != width:
                return line
    except csv.Error:
        return None
    return None


def _place(path: Path, data: bytes, index: int) -> str:
    """Where data row ``index`` is: "<file>, line N" (row 0 is the first after the header)."""
    try:
        for number, (line, _) in enumerate(_csv_records(data)):
            if number == index + 1:
                return f"{path}, line {line}"
    except csv.Error:
        pass
    return f"{path}, record {index + 1}"


def record_place(record: pd.Series[Any]) -> str:
    """Where a row of :func:`read_previous` was read: "<file>, line N"."""
    path = Path(str(record["record_file"]))
    return _place(path, _complete_lines(path), int(record["record_index"]))
