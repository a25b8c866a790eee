"""Paths checked before a run, and opening files batchjob writes in place.

batchjob writes no file through a link it did not create: the lock file and the journal are
opened without following a symbolic link and refused if they have other hard links or are
not regular files; outputs may not be an input or each other, however spelled; temporary
files a kill left behind are removed once their writer is gone.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from batchjob._errors import ReportError
from batchjob._portable import BINARY, CLOEXEC, NOFOLLOW, NONBLOCK

# Flags a system lacks are 0 (see batchjob._portable).
_NOFOLLOW: int = NOFOLLOW
_NONBLOCK: int = NONBLOCK  # a FIFO put in a file's place must not block
_OPEN_FLAGS: int = CLOEXEC | BINARY


@dataclass(frozen=True)
class ReportPaths:
    report: Path
    failed_rows: Path
    summary: Path | None = None  # --summary-json, replaced atomically like the report

    @property
    def journal(self) -> Path:
        return self.report.with_name(self.report.name + ".journal")

    @property
    def lock(self) -> Path:
        return self.report.with_name(self.report.name + ".lock")


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


def check_paths(
    paths: ReportPaths, inputs: Sequence[Path], keep: Sequence[tuple[str, Path]] = ()
) -> None:
    """Refuse, before any file is touched, a run that would write over one of its inputs,
    over another file of its own, over a file it must ``keep`` (``(what, path)``: the token
    file, the config file), or through a link. Raises :class:`ReportError` (exit 2)."""
    # The files written, with the option that names each; the failed-rows file is checked
    # against the other three, as the report's journal and lock sit beside it by construction.
    outputs: tuple[tuple[str, Path, str], ...] = (
        ("the failed-rows file", paths.failed_rows, "--failed-rows"),
        ("the report", paths.report, "--report"),
        ("the report's journal", paths.journal, "--report"),
        ("the report's lock file", paths.lock, "--report"),
    )
    read = {_identity(path): f"the input file {path}" for path in reversed(inputs)}
    read |= {_identity(path): f"{what} {path}" for what, path in keep}
    for what, path, option in outputs:
        same = read.get(_identity(path))
        if same is not None:
            raise ReportError(
                f"{what} {path} is {same}: it would be overwritten; choose another {option} path"
            )
    failed = _identity(paths.failed_rows)
    for what, path, _ in outputs[1:]:
        if _identity(path) == failed:
            raise ReportError(
                f"--failed-rows {paths.failed_rows} is {what} ({path}); "
                "choose another --failed-rows path"
            )
    if paths.summary is not None:
        summary = _identity(paths.summary)
        for what, path, _ in outputs:
            if _identity(path) == summary:
                raise ReportError(
                    f"--summary-json {paths.summary} is {what} ({path}); choose another "
                    "--summary-json path"
                )
        outputs += (("the summary JSON", paths.summary, "--summary-json"),)
        same = read.get(summary)
        if same is not None:
            raise ReportError(
                f"the summary JSON {paths.summary} is {same}: it would be overwritten; choose "
                "another --summary-json path"
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
    for path in _replaced(paths):
        if path.is_dir():
            raise ReportError(f"{path} is a directory; give a file path")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReportError(f"{path}: cannot create its folder: {exc.strerror}") from None
        if not os.access(path.parent, os.W_OK):
            raise ReportError(f"{path}: its folder is not writable")
        # Found now, not after every request was sent: each file is written to a temporary
        # one beside it, whose name is longer (the report's journal name is shorter).
        longest = os.fsencode(f".{path.name}.{'9' * _PID_DIGITS}.tmp")
        limit = _name_max(path.parent)
        if len(longest) > limit:
            raise ReportError(
                f"{path}: its name is too long: batchjob writes it through a temporary file "
                f".{path.name}.<pid>.tmp, and this file system takes names of at most {limit} "
                "bytes; choose a shorter name"
            )


def _replaced(paths: ReportPaths) -> tuple[Path, ...]:
    """The files written through a temporary file and a rename."""
    extra = (paths.summary,) if paths.summary is not None else ()
    return (paths.report, paths.failed_rows, *extra)


#: Digits of the largest process id (Linux allows up to 4,194,304).
_PID_DIGITS = 7


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # not POSIX, or it will not say
        return 255


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
    for target in dict.fromkeys(_replaced(paths)):
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
