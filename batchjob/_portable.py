"""What differs between POSIX and Windows, in one place.

Flags a system lacks are 0 (Windows has no O_NOFOLLOW, O_NONBLOCK or O_CLOEXEC, and needs
O_BINARY so that "\\r\\n" is written as it is). File locks are portalocker's: flock on POSIX,
msvcrt on Windows; batchjob opens the lock file itself (never through a link, never
truncating what it did not create) and hands portalocker the descriptor.
"""

from __future__ import annotations

import os
import stat

import portalocker

NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)  # a FIFO put in a file's place must not block
CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)
BINARY: int = getattr(os, "O_BINARY", 0)


def try_lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` at once, or say it is held: False."""
    try:
        portalocker.lock(fd, portalocker.LOCK_EX | portalocker.LOCK_NB)
    except portalocker.exceptions.LockException:
        return False
    return True


def unlock(fd: int) -> None:
    portalocker.unlock(fd)


def fsync_directory(path: os.PathLike[str] | str) -> None:
    """Make a rename in ``path`` durable. Windows cannot open a folder: its renames are
    already atomic, and it offers no way to sync a directory entry, so nothing is done."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_at(fd: int, data: bytes, offset: int) -> None:
    """All of ``data`` at ``offset`` (pwrite where the system has it)."""
    view = memoryview(data)
    pwrite = getattr(os, "pwrite", None)
    if pwrite is None:
        os.lseek(fd, offset, os.SEEK_SET)
    while view:
        written = pwrite(fd, view, offset) if pwrite is not None else os.write(fd, view)
        view, offset = view[written:], offset + written


def owned_by_me(info: os.stat_result) -> bool:
    """Whether a file is this user's (always, where the system has no user ids: Windows)."""
    getuid = getattr(os, "getuid", None)
    return getuid is None or info.st_uid == getuid()


def is_regular(info: os.stat_result) -> bool:
    return stat.S_ISREG(info.st_mode)
