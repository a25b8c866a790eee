"""Writing the outcome of every key: the ledger, the journal and the final report.

* :class:`Ledger` holds each report row's outcome in numpy columns while the run goes on.
* :class:`Journal` appends each request's outcomes to ``<report>.journal`` and flushes at once,
  so a run killed at any moment loses at most the requests in flight; ``--resume`` reads it.
* :func:`write_final` writes the report and the failed-rows file in input order, streaming, each
  to a temporary file that is fsynced and renamed over the target: a reader never sees half a
  report, and a crash leaves the journal to resume from.

batchjob writes no file through a link it did not create: the lock file and the journal are
opened without following a symbolic link and refused if they have other hard links or are not
regular files; temporary files are created new (``O_EXCL``); the report and failed-rows files
are replaced by a rename, never written in place, and refused if they are symbolic links.
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
import stat
import warnings
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


# Flags a system lacks are 0: Windows has no O_NOFOLLOW, O_NONBLOCK or O_CLOEXEC, and needs
# O_BINARY so that "\r\n" is written as it is.
_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)  # a FIFO put in a file's place must not block
_OPEN_FLAGS: int = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


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
        fd = _open_in_place(path, os.O_RDWR | os.O_APPEND, "the journal")
        try:
            new = _cut_partial_line(fd) == 0
            self._fh: IO[str] = open(  # noqa: SIM115 (closed in close())
                fd, "a", newline="", encoding="utf-8", errors="backslashreplace"
            )
        except BaseException:
            os.close(fd)
            raise
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


def _cut_partial_line(fd: int) -> int:
    """Drop a record cut short by a crash, so the next record starts on a line of its own.

    Returns the size left.
    """
    size = os.lseek(fd, 0, os.SEEK_END)
    step = 64 * 1024
    end = size
    while end > 0:
        start = max(0, end - step)
        os.lseek(fd, start, os.SEEK_SET)
        block = os.read(fd, end - start)
        newline = block.rfind(b"\n")
        if newline >= 0:
            kept = start + newline + 1
            if kept != size:
                os.ftruncate(fd, kept)
            return kept
        end = start
    if size:
        os.ftruncate(fd, 0)
    return 0


def _read_own_file(path: Path) -> bytes | None:
    """The bytes of ``path``, None if it is not there; never read through a link, never a
    FIFO (it would block) or anything else but a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if os.path.islink(path):
            raise ReportError(f"{path} is a symbolic link: batchjob does not follow it") from None
        raise ReportError(f"{path}: cannot read it to resume: {exc.strerror}") from None
    with open(fd, "rb") as fh:
        problem = _not_own_file(os.fstat(fd), in_place=False)
        if problem:
            raise ReportError(f"{path} {problem}")
        return fh.read()


def _complete_lines(path: Path) -> bytes:
    """The file up to its last newline: a kill -9 may have cut the last record anywhere."""
    data = _read_own_file(path) or b""
    end = data.rfind(b"\n") + 1
    if not end and not _HEADER.startswith(data.rstrip(b"\r")):
        # Not even a line: only a header cut short by a crash may be that, nothing else.
        raise ReportError(f"{path}: not a batchjob report or journal (no line, no header)")
    return data[:end]


_HEADER = ",".join(REPORT_COLUMNS).encode()


_OUTCOME_VALUES = frozenset(o.value for o in Outcome)


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
    previous = previous[previous["outcome"] != Outcome.INVALID.value]
    for column in ("event_id", "order_ticket_key"):
        previous[column] = previous[column].map(unescape_cell)
    # Undone is final (a later record of the same key can only come from a stale copy).
    previous = previous.sort_values(
        "outcome", key=lambda o: o == Outcome.UNDONE.value, kind="stable"
    )
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
        # _resume reads it as a number: digits (a count fits in 9) or nothing.
        attempts = frame["attempts"].fillna("").str.strip()
        bad |= ~attempts.str.fullmatch("[0-9]{0,9}").fillna(False).to_numpy(dtype=bool)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        record = frame.iloc[index]
        raise ReportError(
            f"{_place(path, data, index)}: not a record batchjob wrote (outcome "
            f"{str(record['outcome'])[:40]!r}, attempts {str(record.get('attempts', ''))[:40]!r}); "
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


# --- the final files ------------------------------------------------------------------------


def _chunks(positions: Positions, size: int = 200_000) -> Iterator[Positions]:
    for start in range(0, len(positions), size):
        yield positions[start : start + size]


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _create_new(path: Path) -> int:
    """Create ``path`` and open it for writing: a new file, never one already there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _OPEN_FLAGS
    try:
        return os.open(path, flags, 0o666)
    except FileExistsError:
        # Our pid is in the name, yet the file is not ours: a dead process that had our pid
        # left it, or someone put it (or a link) there. Removed, never written through.
        path.unlink()
        return os.open(path, flags, 0o666)


def _write_atomically(path: Path, writer: RowWriter, positions: Positions) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    fd = _create_new(tmp)
    try:
        with open(fd, "w", newline="", encoding="utf-8", errors="backslashreplace") as fh:
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


# --- paths checked before a run -------------------------------------------------------------


def _identity(path: Path) -> tuple[object, ...]:
    """What ``path`` names: the file (device, inode) when it exists, so that a hard link, a
    link or another spelling of it counts as the same; else its absolute, resolved path."""
    try:
        info = os.stat(path)
    except OSError:
        return ("path", os.path.normcase(os.path.realpath(path)))
    return ("file", info.st_dev, info.st_ino)


def _not_own_file(info: os.stat_result, *, in_place: bool) -> str:
    """Why batchjob must not write to the file ``info`` describes ("" if it may)."""
    if stat.S_ISDIR(info.st_mode):
        return "is a directory; give a file path"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file (a FIFO, socket or device); remove it or give another path"
    if in_place and info.st_nlink > 1:
        # Written in place, it would change the file's other names too.
        return (
            f"has {info.st_nlink - 1} other name(s) (hard links), so batchjob did not create "
            "it; remove it or give another --report path"
        )
    return ""


def check_paths(paths: ReportPaths, inputs: Sequence[Path]) -> None:
    """Refuse, before any file is touched, a run that would write over one of its inputs or
    over another file of its own, or through a link. Raises :class:`ReportError` (exit 2)."""
    # The files written, with the option that names each; the failed-rows file is checked
    # against the other three, as the report's journal and lock sit beside it by construction.
    outputs = (
        ("the failed-rows file", paths.failed_rows, "--failed-rows"),
        ("the report", paths.report, "--report"),
        ("the report's journal", paths.journal, "--report"),
        ("the report's lock file", paths.lock, "--report"),
    )
    read = {_identity(path): path for path in reversed(inputs)}
    for what, path, option in outputs:
        same = read.get(_identity(path))
        if same is not None:
            raise ReportError(
                f"{what} {path} is the input file {same}: it would be overwritten; "
                f"choose another {option} path"
            )
    failed = _identity(paths.failed_rows)
    for what, path, _ in outputs[1:]:
        if _identity(path) == failed:
            raise ReportError(
                f"--failed-rows {paths.failed_rows} is {what} ({path}); "
                "choose another --failed-rows path"
            )
    for _, path, _ in outputs:
        try:
            info = os.lstat(path)
        except OSError:
            continue  # not there yet (or not reachable: check_writable says why)
        in_place = path in (paths.journal, paths.lock)
        if stat.S_ISLNK(info.st_mode):
            raise ReportError(_link_message(path, in_place=in_place))
        problem = _not_own_file(info, in_place=in_place)
        if problem:
            raise ReportError(f"{path} {problem}")


def _link_message(path: Path, *, in_place: bool) -> str:
    if in_place:
        return (
            f"{path} is a symbolic link: batchjob never writes through a link it did not "
            "create; remove it"
        )
    # The rename would replace the link itself and leave the file it points to as it was.
    return (
        f"{path} is a symbolic link: batchjob replaces this file rather than writing through "
        "the link; give the path of a real file"
    )


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


def _writer_alive(pid: int) -> bool:
    """Whether process ``pid`` may still be writing its temporary file."""
    if pid == os.getpid():
        # Ours are written and renamed (or removed) within one call, before this run's
        # first: a file with our pid is a dead namesake's.
        return False
    if os.name != "posix":
        return True  # os.kill(pid, 0) would end the process on Windows: keep the file
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no pid is that large
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def remove_stale_temp_files(paths: ReportPaths) -> list[Path]:
    """Delete the ``.<name>.<pid>.tmp`` files that killed runs left for this report and
    failed-rows file; returns them. Call while holding the report's lock.

    The lock alone does not prove a temporary file dead: another run (holding another
    report's lock) may have this report's path as its --failed-rows, or this failed-rows
    path too. So a file is removed only when the process named in it is gone. One left by a
    live process (or a pid reused since) stays, and is removed by a later run.
    """
    removed = []
    for target in dict.fromkeys((paths.report, paths.failed_rows)):
        prefix = f".{target.name}."
        try:
            entries = list(os.scandir(target.parent))
        except OSError:
            continue  # no folder yet: nothing left in it
        for entry in entries:
            pid = entry.name.removeprefix(prefix).removesuffix(".tmp")
            if not (
                entry.name == f"{prefix}{pid}.tmp"
                and pid.isascii()
                and pid.isdigit()
                and not entry.is_dir(follow_symlinks=False)
                and not _writer_alive(int(pid))
            ):
                continue
            with contextlib.suppress(OSError):  # best effort: gone, or not ours to remove
                os.unlink(entry.path)  # a link is removed, not what it points to
                removed.append(Path(entry.path))
    return removed


# --- one run per report ---------------------------------------------------------------------


def _open_in_place(path: Path, flags: int, what: str) -> int:
    """Open ``path`` (created if missing) to be written in place; :func:`_not_own_file`."""
    try:
        fd = os.open(path, flags | os.O_CREAT | _NOFOLLOW | _NONBLOCK | _OPEN_FLAGS, 0o666)
    except OSError as exc:
        if os.path.islink(path):
            raise ReportError(_link_message(path, in_place=True)) from None
        raise ReportError(f"{path}: cannot open {what}: {exc.strerror}") from None
    problem = _not_own_file(os.fstat(fd), in_place=True)
    if problem:
        os.close(fd)
        raise ReportError(f"{path} {problem}")
    return fd


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` (itself, not a link's target) is still the file open as ``fd``."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _small_text(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 64).decode("ascii", errors="replace").strip()


class ReportLock:
    """An exclusive lock on ``<report>.lock`` held for the run; the OS frees it on any exit.

    The file holds the pid of the run holding it. A file that holds anything else was not
    made by batchjob: it is refused, never emptied.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        report = self.path.with_suffix("")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReportError(f"{report}: cannot write beside the report: {exc.strerror}") from None
        for _ in range(10):
            fd = _open_in_place(self.path, os.O_RDWR, "the lock file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _small_text(fd)
                os.close(fd)
                holder = holder if holder.isascii() and holder.isdigit() else "unknown"
                raise ReportError(
                    f"{report}: another batchjob run (pid {holder}) is using this "
                    "report; wait for it to finish or choose another --report path"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(self.path, fd):
                break
            # The run that held it removed it as it ended: lock the file now there.
            os.close(fd)
        else:
            raise ReportError(f"{self.path}: cannot lock it: it keeps being replaced")
        try:
            held = _small_text(fd)
            pid_or_nothing = not held or (held.isascii() and held.isdigit())
            if os.fstat(fd).st_size > 32 or not pid_or_nothing:
                raise ReportError(
                    f"{self.path} is not a batchjob lock file (it holds other text); "
                    "batchjob will not empty it: move it away or choose another --report path"
                )
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, str(os.getpid()).encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            # Only our own file: if it was replaced meanwhile, the new one is not ours.
            with contextlib.suppress(OSError):
                if _same_file(self.path, self._fd):
                    self.path.unlink()
            os.close(self._fd)
            self._fd = None
