"""The journal: ``<report>.journal``, each request's outcomes appended as they come.

A run killed at any moment (even ``kill -9``) loses at most the requests in flight and the
answers of the last 20 ms; ``--resume`` reads the journal and sends those keys again, which is
harmless (undo is idempotent). It is opened without following a link and refused if it is
not a regular file of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
from pathlib import Path
from typing import IO, Protocol

import numpy as np

from batchjob._errors import ReportError
from batchjob._model import REPORT_COLUMNS
from batchjob.plan import Positions
from batchjob.record._files import _NOFOLLOW, _NONBLOCK, _OPEN_FLAGS, _not_own_file, _open_in_place
from batchjob.record._rows import RowWriter

_HEADER = ",".join(REPORT_COLUMNS).encode()


class Recorder(Protocol):
    """Where a run's outcomes go as they come: the journal file, or the run store."""

    failed: Exception | None  # a write that failed; the run stops on it

    def append(self, positions: Positions, keys: list[str] | None = None) -> None: ...
    def close(self) -> None: ...


class BlockRecorder:
    """Outcomes recorded in blocks as they come: at most every ``interval`` seconds (20 ms),
    one block with one write. At the API's 4 requests a second every answer is written on its
    own at once, while at thousands a second (a local sandbox, a raised limit) a block holds
    many answers and costs a fraction of a write per request. A kill -9 loses at most the
    requests in flight and the answers of the last ``interval``; ``--resume`` sends those keys
    again, which is harmless (undo is idempotent). Subclasses say where a block goes.
    """

    interval = 0.02

    def __init__(self) -> None:
        self._pending: list[Positions] = []
        self._pending_keys: list[str] | None = []
        self._scheduled = False
        self._flushed_at = -math.inf
        # A write that failed in a loop callback (disk full) would only be logged by asyncio.
        # Kept here instead: the run stops on it (exit 3), and the ledger, which holds every
        # outcome, goes on to the final report if the disk lets it.
        self.failed: Exception | None = None

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
        self._write(positions, keys)
        with contextlib.suppress(RuntimeError):
            self._flushed_at = asyncio.get_running_loop().time()

    def _write(self, positions: Positions, keys: list[str] | None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Write what is pending. A failure is kept in ``failed``, not raised: the ledger
        still holds every outcome, and the final report is worth trying to write."""
        try:
            if self.failed is None:
                self.flush()
        except Exception as exc:  # kept for the runner: the final report comes next
            self.failed = exc
        finally:
            self._closed()

    def _closed(self) -> None:
        """Release what the recorder holds (after its last write)."""


class Journal(BlockRecorder):
    """``<report>.journal``: append-only CSV of outcomes, the same columns as the report; the
    record of a run without a store (see :class:`BlockRecorder`)."""

    def __init__(self, path: Path, writer: RowWriter) -> None:
        super().__init__()
        self.path = path
        self._writer = writer
        fd = _open_in_place(path, os.O_RDWR | os.O_APPEND, "the journal")
        try:
            new = _cut_partial_line(fd) == 0
            self._fh: IO[str] = open(  # noqa: SIM115 (closed in _closed())
                fd, "a", newline="", encoding="utf-8", errors="backslashreplace"
            )
        except BaseException:
            os.close(fd)
            raise
        if new:
            self._fh.write(_HEADER.decode() + "\n")
            self._fh.flush()

    def _write(self, positions: Positions, keys: list[str] | None) -> None:
        buffer = io.StringIO()
        self._writer.write(buffer, positions, keys)
        self._fh.write(buffer.getvalue())
        # Flushed to the OS: survives kill -9. fsync (power loss) is for the final report.
        self._fh.flush()

    def _closed(self) -> None:
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
