"""Writing the outcome of every key: the ledger, the journal and the final report.

* :class:`Ledger` holds each report row's outcome in numpy columns while the run goes on.
* :class:`Journal` appends each request's outcomes to ``<report>.journal`` and flushes at once,
  so a run killed at any moment loses at most the requests in flight; ``--resume`` reads it.
* :func:`write_final` writes the report and the failed-rows file in input order, streaming, each
  to a temporary file that is fsynced and renamed over the target: a reader never sees half a
  report, and a crash leaves the journal to resume from.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from batchjob._cells import escape_cell, unescape_cell
from batchjob._groups import Positions
from batchjob._model import REPORT_COLUMNS, RETRYABLE_OUTCOMES, Outcome

#: Ledger codes: 0 means "no outcome yet", which the final report never contains.
OUTCOME_CODES: tuple[Outcome | None, ...] = (None, *Outcome)
_CODE = {outcome: code for code, outcome in enumerate(OUTCOME_CODES) if outcome is not None}


class ReportError(Exception):
    """The report path cannot be used (exists without --resume, locked, unwritable). Exit 2."""


@dataclass(frozen=True)
class ReportPaths:
    report: Path
    failed_rows: Path

    @property
    def journal(self) -> Path:
        return self.report.with_name(self.report.name + ".journal")

    @property
    def lock(self) -> Path:
        return self.report.with_name(self.report.name + ".lock")


class Ledger:
    """Each report row's outcome, as compact columns indexed by plan position."""

    def __init__(self, size: int) -> None:
        self.outcome = np.zeros(size, dtype=np.int8)
        self.http_status = np.zeros(size, dtype=np.int16)
        self.error = np.zeros(size, dtype=np.int32)
        self.attempts = np.zeros(size, dtype=np.int32)
        self.finished_at = np.full(size, np.nan, dtype=np.float64)
        self._errors: list[tuple[str, str]] = [("", "")]
        self._error_codes: dict[tuple[str, str], int] = {("", ""): 0}

    def __len__(self) -> int:
        return len(self.outcome)

    def set(
        self,
        positions: Positions,
        outcome: Outcome,
        *,
        http_status: int = 0,
        error_key: str = "",
        error_message: str = "",
        finished_at: float = math.nan,
    ) -> None:
        error = (error_key, error_message)
        code = self._error_codes.get(error)
        if code is None:
            code = self._error_codes[error] = len(self._errors)
            self._errors.append(error)
        self.outcome[positions] = _CODE[outcome]
        self.http_status[positions] = http_status
        self.error[positions] = code
        self.finished_at[positions] = finished_at

    def unset(self) -> Positions:
        return np.flatnonzero(self.outcome == 0).astype(np.int64)

    def count(self, outcome: Outcome, positions: Positions | None = None) -> int:
        codes = self.outcome if positions is None else self.outcome[positions]
        return int(np.count_nonzero(codes == _CODE[outcome]))

    def frame(self, rows: pd.DataFrame, positions: Positions | slice) -> pd.DataFrame:
        """Report rows for ``positions``, as text, spreadsheet-escaped, in REPORT_COLUMNS order."""
        part = rows.iloc[positions]
        outcome = np.asarray([o or "" for o in OUTCOME_CODES], dtype=object)[
            self.outcome[positions]
        ]
        status = self.http_status[positions]
        errors = self.error[positions]
        keys = np.asarray([k for k, _ in self._errors], dtype=object)[errors]
        messages = np.asarray([m for _, m in self._errors], dtype=object)[errors]
        finished = pd.to_datetime(self.finished_at[positions], unit="s", utc=True)
        return pd.DataFrame(
            {
                "event_id": _escape(part["event_id"]),
                "order_ticket_key": _escape(part["order_ticket_key"]),
                "outcome": outcome,
                "http_status": np.where(status > 0, status.astype(str), ""),
                "error_key": _escape(pd.Series(keys)),
                "error_message": _escape(pd.Series(messages)),
                "attempts": self.attempts[positions],
                "source_file": _escape(part["source_file"]),
                "source_row": part["source_row"].to_numpy(),
                "finished_at": finished.strftime("%Y-%m-%dT%H:%M:%SZ").fillna("").to_numpy(),
            },
            columns=list(REPORT_COLUMNS),
        )


def _escape(values: pd.Series[Any]) -> Any:
    """Formula-like cells escaped, as a plain array (so DataFrame columns never re-align)."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        # escape_cell is one-to-one, so escaping the few categories is enough.
        renamed = values.cat.rename_categories([escape_cell(str(c)) for c in values.cat.categories])
        return renamed.to_numpy()
    text = values.astype(str)
    risky = text.str.match(r"'*[=+\-@\t\r]").fillna(False).to_numpy(dtype=bool)
    out = text.to_numpy(dtype=object)
    if risky.any():
        out = out.copy()
        out[risky] = ["'" + v for v in out[risky]]
    return out


# --- the journal ----------------------------------------------------------------------------


class Journal:
    """Append-only CSV of outcomes as they happen; the same columns as the report."""

    def __init__(self, path: Path) -> None:
        self.path = path
        new = not path.exists() or path.stat().st_size == 0
        if not new:
            _cut_partial_line(path)
        self._fh: IO[str] = path.open("a", newline="", encoding="utf-8")
        if new:
            self._fh.write(",".join(REPORT_COLUMNS) + "\n")
            self._flush()

    def append(self, ledger: Ledger, rows: pd.DataFrame, positions: Positions) -> None:
        if len(positions) == 0:
            return
        buffer = io.StringIO()
        ledger.frame(rows, positions).to_csv(buffer, header=False, index=False)
        self._fh.write(buffer.getvalue())
        self._flush()

    def _flush(self) -> None:
        # Flushed to the OS: survives kill -9. fsync (power loss) is for the final report.
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    @staticmethod
    def remove(path: Path) -> None:
        """Delete a journal once the final report holds all it had."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _cut_partial_line(path: Path) -> None:
    """Drop a record cut short by a crash, so the next record starts on a line of its own."""
    with path.open("rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        step = 64 * 1024
        end = size
        while end > 0:
            start = max(0, end - step)
            fh.seek(start)
            block = fh.read(end - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                fh.truncate(start + newline + 1)
                return
            end = start
        fh.truncate(0)


def _complete_lines(path: Path) -> io.BytesIO:
    """The file up to its last newline: a kill -9 may have cut the last record anywhere."""
    data = path.read_bytes()
    return io.BytesIO(data[: data.rfind(b"\n") + 1])


def read_previous(paths: ReportPaths) -> pd.DataFrame:
    """Rows already ``undone`` in an earlier run's report and journal, for --resume.

    Columns: event_id, order_ticket_key, http_status, attempts, finished_at (text), one row per
    pair (the latest record wins).
    """
    frames = []
    for path in (paths.report, paths.journal):
        if path.exists() and path.stat().st_size:
            try:
                frame = pd.read_csv(
                    _complete_lines(path), dtype=str, keep_default_na=False, on_bad_lines="skip"
                )
            except (OSError, ValueError, pd.errors.ParserError) as exc:
                raise ReportError(f"{path}: cannot read it to resume: {exc}") from None
            missing = {"event_id", "order_ticket_key", "outcome"} - set(frame.columns)
            if missing:
                raise ReportError(
                    f"{path}: not a batchjob report (no column {', '.join(sorted(missing))})"
                )
            frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=list(REPORT_COLUMNS))
    previous = pd.concat(frames, ignore_index=True)
    previous = previous[previous["outcome"] == Outcome.UNDONE.value]
    for column in ("event_id", "order_ticket_key"):
        previous[column] = previous[column].map(unescape_cell)
    return previous.drop_duplicates(["event_id", "order_ticket_key"], keep="last")


# --- the final files ------------------------------------------------------------------------


def _chunks(positions: Positions, size: int = 200_000) -> Iterator[Positions]:
    for start in range(0, len(positions), size):
        yield positions[start : start + size]


def _write_atomically(path: Path, ledger: Ledger, rows: pd.DataFrame, positions: Positions) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(REPORT_COLUMNS)
            for part in _chunks(positions):
                ledger.frame(rows, part).to_csv(fh, header=False, index=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    # The rename is durable only once the directory entry is.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_final(paths: ReportPaths, ledger: Ledger, rows: pd.DataFrame) -> int:
    """Write failed-rows then report, both in input order. Returns the failed-rows count."""
    retry_codes = [_CODE[o] for o in RETRYABLE_OUTCOMES]
    failed = np.flatnonzero(np.isin(ledger.outcome, retry_codes)).astype(np.int64)
    _write_atomically(paths.failed_rows, ledger, rows, failed)
    _write_atomically(paths.report, ledger, rows, np.arange(len(ledger), dtype=np.int64))
    return len(failed)


# --- one run per report ---------------------------------------------------------------------


def check_writable(paths: ReportPaths) -> None:
    """Fail before anything is sent if the report or failed-rows file could not be written."""
    for path in (paths.report, paths.failed_rows):
        if path.is_dir():
            raise ReportError(f"{path} is a directory; give a file path")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReportError(f"{path}: cannot create its folder: {exc.strerror}") from None
        if not os.access(path.parent, os.W_OK):
            raise ReportError(f"{path}: its folder is not writable")


class ReportLock:
    """An exclusive lock on ``<report>.lock`` held for the run; the OS frees it on any exit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = self.path.open("a+", encoding="utf-8")
        except OSError as exc:
            raise ReportError(
                f"{self.path.with_suffix('')}: cannot write beside the report: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise ReportError(
                f"{self.path.with_suffix('')}: another batchjob run (pid {holder}) is using this "
                "report; wait for it to finish or choose another --report path"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._fh.close()
            self._fh = None
