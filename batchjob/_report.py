"""Writing the outcome of every key: the ledger, the journal and the final report.

* :class:`Ledger` holds each report row's outcome in numpy columns while the run goes on.
* :class:`Journal` appends each request's outcomes to ``<report>.journal`` and flushes at once,
  so a run killed at any moment loses at most the requests in flight; ``--resume`` reads it.
* :func:`write_final` writes the report and the failed-rows file in input order, streaming, each
  to a temporary file that is fsynced and renamed over the target: a reader never sees half a
  report, and a crash leaves the journal to resume from.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import fcntl
import io
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa

from batchjob._cells import escape_cell, unescape_cell
from batchjob._groups import Positions
from batchjob._logging import MAX_REPORT_TEXT, Redactor
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
    """Each report row's outcome, as compact columns indexed by plan position.

    Every error text is cleaned once, as it first comes (``redactor``, see Redactor.clean): a
    safety net, so no secret, control character or endless text reaches a row whatever path
    a message took.
    """

    def __init__(self, size: int, redactor: Redactor | None = None) -> None:
        self._redactor = redactor or Redactor()
        self.outcome = np.zeros(size, dtype=np.int8)
        self.http_status = np.zeros(size, dtype=np.int16)
        self.error = np.zeros(size, dtype=np.int32)
        self.attempts = np.zeros(size, dtype=np.int32)
        # Attempts after which the server may have applied the key (no answer, a 5xx): a key
        # that ends other than undone says so, however its group was split afterwards.
        self.uncertain = np.zeros(size, dtype=np.int32)
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
            clean = self._redactor.clean
            self._errors.append((clean(error_key, 200), clean(error_message, MAX_REPORT_TEXT)))
        self.outcome[positions] = _CODE[outcome]
        self.http_status[positions] = http_status
        self.error[positions] = code
        self.finished_at[positions] = finished_at

    def unset(self) -> Positions:
        return np.flatnonzero(self.outcome == 0).astype(np.int64)

    def count(self, outcome: Outcome, positions: Positions | None = None) -> int:
        codes = self.outcome if positions is None else self.outcome[positions]
        return int(np.count_nonzero(codes == _CODE[outcome]))

    def errors(self) -> Sequence[tuple[str, str]]:
        """Every (error_key, error_message) so far, by code; only ever grows. Not a copy."""
        return self._errors


def _format_times(seconds: npt.NDArray[np.float64]) -> list[str]:
    """ISO 8601 UTC to the second; "" for no time (NaN).

    A run's outcomes share few distinct seconds, so each is formatted once: formatting every
    row cost about a microsecond each, a second for a 1,000,000-row report.
    """
    whole = np.floor(seconds)
    codes, distinct = pd.factorize(whole, use_na_sentinel=False)
    stamps = np.datetime_as_string(np.asarray(distinct).astype("datetime64[s]"), unit="s")
    texts = np.asarray([s + "Z" if s != "NaT" else "" for s in stamps.tolist()], dtype=object)
    return texts[codes].tolist()  # type: ignore[no-any-return]


def _csv_field(value: str) -> str:
    """``value`` exactly as csv.writer writes it as one field of a row (quoted if it must be)."""
    buffer = io.StringIO()
    csv.writer(buffer).writerow([value, ""])
    return buffer.getvalue()[:-3]  # the row ends with the empty field's "," and "\r\n"


def _csv_cells(values: Sequence[str]) -> npt.NDArray[np.object_]:
    return np.asarray([_csv_field(escape_cell(v)) for v in values], dtype=object)


# Keys that csv.writer writes as they are, and none starting like a formula: the common case,
# checked for a whole block at once.
_CSV_PLAIN = re.compile(r'[^,"\r\n]*')
_FORMULA_START = re.compile(r"^'*[=+\-@\t]", re.MULTILINE)


def _key_cells(keys: list[str]) -> list[str]:
    if _CSV_PLAIN.fullmatch("".join(keys)) and not _FORMULA_START.search("\n".join(keys)):
        return keys
    return [_csv_field(escape_cell(k)) for k in keys]


class RowWriter:
    """Writes report rows for plan positions: CSV text, spreadsheet-escaped, REPORT_COLUMNS order.

    Built once per run, and fast: every journal block and a 1,000,000-row report both go
    through it. Values with few distinct texts (events, files, errors,
    statuses) are escaped and CSV-quoted once each; keys are checked a block at a time; each
    row is then one f-string, about four times cheaper than csv.writer, and byte for byte what
    csv.writer would write.
    """

    def __init__(self, rows: pd.DataFrame, keys: Any, ledger: Ledger) -> None:
        self._keys = keys  # one-chunk pyarrow StringArray, see Plan.keys
        self._ledger = ledger
        self._event_codes = rows["event_id"].cat.codes.to_numpy()
        self._events = _csv_cells([str(c) for c in rows["event_id"].cat.categories])
        self._file_codes = rows["source_file"].cat.codes.to_numpy()
        self._files = _csv_cells([str(c) for c in rows["source_file"].cat.categories])
        self._source_rows = rows["source_row"].to_numpy()
        self._outcomes = np.asarray([o or "" for o in OUTCOME_CODES], dtype=object)
        self._error_keys = np.empty(0, dtype=object)
        self._error_messages = np.empty(0, dtype=object)
        self._stamp: tuple[int, str] = (-1, "")

    def _errors(self) -> tuple[npt.NDArray[np.object_], npt.NDArray[np.object_]]:
        errors = self._ledger.errors()
        known = len(self._error_keys)
        if len(errors) != known:
            # The ledger only ever adds errors: escape just the new ones.
            new = errors[known:]
            self._error_keys = np.concatenate([self._error_keys, _csv_cells([k for k, _ in new])])
            self._error_messages = np.concatenate(
                [self._error_messages, _csv_cells([m for _, m in new])]
            )
        return self._error_keys, self._error_messages

    def _times(self, seconds: npt.NDArray[np.float64]) -> list[str]:
        first = seconds[0]
        if len(seconds) > 256 or math.isnan(first):
            return _format_times(seconds)
        # A small journal block: answers of the last 20 ms, nearly always in one second.
        whole = int(first)
        if not (np.floor(seconds) == whole).all():
            return _format_times(seconds)
        if self._stamp[0] != whole:
            self._stamp = (whole, _format_times(seconds[:1])[0])
        return [self._stamp[1]] * len(seconds)

    def write(self, fh: IO[str], positions: Positions, keys: list[str] | None = None) -> None:
        """Rows for ``positions``; ``keys`` may pass their keys when the caller has them."""
        if len(positions) == 0:
            return
        ledger = self._ledger
        error_keys, error_messages = self._errors()
        error = ledger.error[positions]
        if keys is None:
            keys = self._keys.take(pa.array(positions)).to_pylist()
        fh.write(
            "".join(
                [
                    f"{e},{k},{o},{s},{ek},{em},{a},{f},{r},{t}\r\n"
                    for e, k, o, s, ek, em, a, f, r, t in zip(
                        self._events[self._event_codes[positions]].tolist(),
                        _key_cells(keys),
                        self._outcomes[ledger.outcome[positions]].tolist(),
                        [str(s) if s else "" for s in ledger.http_status[positions].tolist()],
                        error_keys[error].tolist(),
                        error_messages[error].tolist(),
                        ledger.attempts[positions].tolist(),
                        self._files[self._file_codes[positions]].tolist(),
                        self._source_rows[positions].tolist(),
                        self._times(ledger.finished_at[positions]),
                        strict=True,
                    )
                ]
            )
        )


# --- the journal ----------------------------------------------------------------------------


class Journal:
    """Append-only CSV of outcomes as they happen; the same columns as the report.

    Outcomes are written at most every ``interval`` seconds (20 ms), as one block with one
    write and one flush: at the API's 4 requests a second every answer is written on its own
    at once, while at thousands a second (a local sandbox, a raised limit) a block holds many
    answers and costs a fraction of a write per request. A kill -9 loses at most the requests
    in flight and the answers of the last ``interval``; ``--resume`` sends those keys again,
    which is harmless (undo is idempotent).
    """

    interval = 0.02

    def __init__(self, path: Path, writer: RowWriter) -> None:
        self.path = path
        self._writer = writer
        if path.exists():
            _cut_partial_line(path)
        new = not path.exists() or path.stat().st_size == 0
        self._fh: IO[str] = path.open("a", newline="", encoding="utf-8", errors="backslashreplace")
        self._pending: list[Positions] = []
        self._pending_keys: list[str] | None = []
        self._scheduled = False
        self._flushed_at = -math.inf
        # A write that failed in a loop callback (disk full) would only be logged by asyncio.
        # Kept here instead: the run stops on it (exit 3), and the ledger, which holds every
        # outcome, goes on to the final report if the disk lets it.
        self.failed: Exception | None = None
        if new:
            self._fh.write(",".join(REPORT_COLUMNS) + "\n")
            self._fh.flush()

    def append(self, positions: Positions, keys: list[str] | None = None) -> None:
        if self.failed is not None or len(positions) == 0:
            return
        self._pending.append(positions)
        if keys is None:
            self._pending_keys = None
        elif self._pending_keys is not None:
            self._pending_keys.extend(keys)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._flush_soon()
            return
        self._scheduled = True
        wait = self._flushed_at + self.interval - loop.time()
        if wait > 0:
            loop.call_later(wait, self._flush_soon)
        else:
            loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        try:
            self.flush()
        except Exception as exc:  # asyncio would only log it: kept, so that the run stops
            self.failed = exc

    def flush(self) -> None:
        """Write what is pending: one write per turn, so a crash cuts at most the last block."""
        self._scheduled = False
        if not self._pending or self.failed is not None:
            return
        pending, keys = self._pending, self._pending_keys
        self._pending, self._pending_keys = [], []
        positions = pending[0] if len(pending) == 1 else np.concatenate(pending)
        buffer = io.StringIO()
        self._writer.write(buffer, positions, keys)
        self._fh.write(buffer.getvalue())
        # Flushed to the OS: survives kill -9. fsync (power loss) is for the final report.
        self._fh.flush()
        with contextlib.suppress(RuntimeError):
            self._flushed_at = asyncio.get_running_loop().time()

    def close(self) -> None:
        """Write what is pending and close. A failure is kept in ``failed``, not raised: the
        ledger still holds every outcome, and the final report is worth trying to write."""
        try:
            if self.failed is None:
                self.flush()
        except Exception as exc:  # kept for the runner: the final report comes next
            self.failed = exc
        finally:
            with contextlib.suppress(OSError):
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
    """An earlier run's rows from its report and journal, for --resume.

    Text columns as written (event_id and key unescaped), one row per (event, key) among rows
    that were not ``invalid``; a pair ever recorded ``undone`` keeps that row.
    """
    frames = []
    for path in (paths.report, paths.journal):
        if path.exists() and path.stat().st_size:
            lines = _complete_lines(path)
            if not lines.getbuffer().nbytes:
                continue  # a crash cut even the header: nothing was recorded
            try:
                frame = pd.read_csv(lines, dtype=str, keep_default_na=False, on_bad_lines="skip")
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
    previous = previous[previous["outcome"] != Outcome.INVALID.value]
    for column in ("event_id", "order_ticket_key"):
        previous[column] = previous[column].map(unescape_cell)
    # Undone is final (a later record of the same key can only come from a stale copy).
    previous = previous.sort_values(
        "outcome", key=lambda o: o == Outcome.UNDONE.value, kind="stable"
    )
    return previous.drop_duplicates(["event_id", "order_ticket_key"], keep="last")


# --- the final files ------------------------------------------------------------------------


def _chunks(positions: Positions, size: int = 200_000) -> Iterator[Positions]:
    for start in range(0, len(positions), size):
        yield positions[start : start + size]


def _write_atomically(path: Path, writer: RowWriter, positions: Positions) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", newline="", encoding="utf-8", errors="backslashreplace") as fh:
            csv.writer(fh).writerow(REPORT_COLUMNS)
            for part in _chunks(positions):
                writer.write(fh, part)
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


def write_final(paths: ReportPaths, writer: RowWriter, ledger: Ledger) -> int:
    """Write failed-rows then report, both in input order. Returns the failed-rows count."""
    retry_codes = [_CODE[o] for o in RETRYABLE_OUTCOMES]
    failed = np.flatnonzero(np.isin(ledger.outcome, retry_codes)).astype(np.int64)
    _write_atomically(paths.failed_rows, writer, failed)
    _write_atomically(paths.report, writer, np.arange(len(ledger), dtype=np.int64))
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
