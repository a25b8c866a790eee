"""One run per report: an exclusive lock on ``<report>.lock``, freed by the OS on any exit."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from batchjob._errors import ReportError
from batchjob._portable import try_lock
from batchjob.record._files import (
    _open_in_place,
    _same_file,
    _small_text,
)


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
                locked = try_lock(fd)
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                holder = _small_text(fd)
                os.close(fd)
                holder = holder if holder.isascii() and holder.isdigit() else "unknown"
                raise ReportError(
                    f"{report}: another batchjob run (pid {holder}) is using this "
                    "report; wait for it to finish or choose another --report path"
                )
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
