"""The final files: failed-rows, then the report, in input order, streaming.

Each is written to a new temporary file (``O_EXCL``), fsynced and renamed over the target: a
reader never sees half a report, and a crash leaves the journal to resume from.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from batchjob._model import REPORT_COLUMNS, RETRYABLE_OUTCOMES
from batchjob._portable import fsync_directory
from batchjob.plan import Positions
from batchjob.record._files import _NOFOLLOW, _OPEN_FLAGS, ReportPaths
from batchjob.record._ledger import _CODE, Ledger
from batchjob.record._rows import RowWriter


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


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[BinaryIO]:
    """A new temporary file beside ``path`` (never one already there, nor through a link),
    to write; then fsynced and renamed over ``path``, so a reader or a kill sees the old file
    or the new one, never half of one. On an error the temporary file goes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    fd = _create_new(tmp)
    try:
        with open(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    # The rename is durable only once the directory entry is.
    fsync_directory(path.parent)


def _write_atomically(path: Path, writer: RowWriter, positions: Positions) -> None:
    with _replacing(path) as raw:
        fh = io.TextIOWrapper(raw, encoding="utf-8", errors="backslashreplace", newline="")
        csv.writer(fh).writerow(REPORT_COLUMNS)
        for part in _chunks(positions):
            writer.write(fh, part)
        fh.flush()
        fh.detach()  # the file is _replacing's to sync and close


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (see :func:`_replacing`)."""
    with _replacing(path) as fh:
        fh.write(data)


def write_final(paths: ReportPaths, writer: RowWriter, ledger: Ledger) -> int:
    """Write failed-rows then report, both in input order. Returns the failed-rows count."""
    retry_codes = [_CODE[o] for o in RETRYABLE_OUTCOMES]
    failed = np.flatnonzero(np.isin(ledger.outcome, retry_codes)).astype(np.int64)
    _write_atomically(paths.failed_rows, writer, failed)
    _write_atomically(paths.report, writer, np.arange(len(ledger), dtype=np.int64))
    return len(failed)
