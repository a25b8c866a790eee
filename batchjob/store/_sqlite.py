"""The SQLite backend: one file, safe for several processes at once (WAL, busy waits).

Writes are short transactions taken with ``BEGIN IMMEDIATE``, so two runs never deadlock on a
lock upgrade; SQLite's busy timeout makes a writer wait its turn instead of failing with
"database is locked". ``synchronous=NORMAL`` in WAL mode survives a killed process (what the
journal it replaces promised); a power loss may lose the last transactions, which a resumed
run sends again harmlessly.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

from batchjob._errors import StoreError
from batchjob._portable import CLOEXEC, NOFOLLOW, NONBLOCK, is_regular, owned_by_me
from batchjob.store._chunks import ChunkStore
from batchjob.store._schema import MIGRATIONS, SCHEMA_VERSION
from batchjob.store._sql import Db, SqlBackend

_T = TypeVar("_T")
#: How long a writer waits for another process's transaction before the store is "busy".
_BUSY_SECONDS = 60.0
_SIDE_FILES = ("-wal", "-shm", "-journal")


def open_sqlite(path: Path) -> ChunkStore:
    return ChunkStore(SqliteBackend(path))


class SqliteBackend(SqlBackend):
    """Runs, chunks and folds in one SQLite file (see :class:`batchjob.store.Backend`)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.location = str(path)
        self._lock_db = threading.RLock()  # the run's writer thread and the loop, in turn
        _prepare_file(path)
        try:
            self._db = sqlite3.connect(
                f"file:{quote(str(path.absolute()))}?mode=rw",
                uri=True,
                timeout=_BUSY_SECONDS,
                isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE
                check_same_thread=False,  # used by one thread at a time: the loop or a writer
            )
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot open the run store: {exc}") from None
        try:
            self._db.execute(f"PRAGMA busy_timeout = {int(_BUSY_SECONDS * 1000)}")
            self._db.execute("PRAGMA trusted_schema = OFF")
            # Before anything is written (WAL mode is written into the file): another app's
            # database, or a store with objects of someone else's, is left as it is.
            _version(self._db)
            mode = _wal(self._db)
            if str(mode).lower() != "wal":
                raise StoreError(f"{path}: the run store cannot use WAL mode (got {mode})")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"{path}: not a usable run store: {exc}") from None
        except StoreError as exc:
            self._db.close()
            text = str(exc)
            raise StoreError(text if text.startswith(str(path)) else f"{path}: {text}") from None
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    def _transaction(
        self, doing: str, work: Callable[[Db], _T], *, write: bool, snapshot: bool = False
    ) -> _T:
        """One transaction: ``BEGIN IMMEDIATE`` for a write, so two runs never deadlock on
        a lock upgrade and the busy timeout makes a writer wait its turn."""
        db = self._db
        begin = "BEGIN IMMEDIATE" if write else "BEGIN" if snapshot else ""
        with self._lock_db:
            try:
                if begin:
                    db.execute(begin)
                try:
                    result = work(db)
                    if begin:
                        db.execute("COMMIT")
                    return result
                except BaseException:
                    if begin:
                        with contextlib.suppress(sqlite3.Error):
                            db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StoreError(f"{self.location}: cannot {doing} the run store: {exc}") from None

    def _now(self, db: Db) -> float:
        return time.time()

    def _pruned(self) -> None:
        with contextlib.suppress(sqlite3.Error), self._lock_db:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # give the space back

    def _migrate(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait, then see it done
        try:
            version = _version(db)
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: the run store has schema version {version}, newer than this "
                    f"batchjob knows ({SCHEMA_VERSION}): upgrade batchjob"
                )
            for step in MIGRATIONS[version:]:
                for statement in step:
                    db.execute(statement)
            if version < SCHEMA_VERSION:
                db.execute(
                    "INSERT INTO meta (name, value) VALUES ('schema_version', ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    (str(SCHEMA_VERSION),),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def _wal(db: sqlite3.Connection) -> str:
    """Switch to WAL mode. The switch needs the file to itself, and SQLite does not wait for
    it as it waits for a write: two processes opening a new store at once would see "database
    is locked". So it is tried again, as long as the busy timeout."""
    deadline = time.monotonic() + _BUSY_SECONDS
    while True:
        try:
            return str(db.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _version(db: sqlite3.Connection) -> int:
    """The store's schema version (0: an empty file); a StoreError for a file that is not
    a store of ours, or holds objects we did not make (a trigger would run on our writes)."""
    objects = db.execute("SELECT type, name FROM sqlite_master").fetchall()
    names = {str(name) for _, name in objects}
    if "meta" not in names:
        if objects:
            raise StoreError("the file is an SQLite database, but not a batchjob run store")
        return 0
    ours = _SCHEMA_OBJECTS
    foreign = sorted(
        f"{kind} {name}"
        for kind, name in objects
        if name not in ours and not str(name).startswith("sqlite_autoindex_")
    )
    if foreign:
        raise StoreError(
            f"the run store holds objects batchjob did not make ({', '.join(foreign[:3])}): "
            "it will not write to it"
        )
    row = db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
    try:
        return int(row[0]) if row is not None else 0
    except ValueError:
        raise StoreError(f"the run store's schema_version is not a number: {row[0]!r}") from None


#: Every table and index a store of any schema version holds.
_SCHEMA_OBJECTS = frozenset(
    re.findall(r"CREATE (?:TABLE|INDEX) (\w+)", " ".join(" ".join(m) for m in MIGRATIONS))
)


def _prepare_file(path: Path) -> None:
    """Create the store (0600, in a 0700 folder) or check the one there: never a link, never
    someone else's file, for the database and the files SQLite keeps beside it."""
    folder = path.parent
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{path}: cannot create the run store's folder: {exc.strerror}") from None
    for suffix in ("", *_SIDE_FILES):
        side = Path(f"{path}{suffix}")
        try:
            info = os.lstat(side)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StoreError(f"{side}: cannot use it for the run store: {exc.strerror}") from None
        problem = _file_problem(info)
        if problem:
            raise StoreError(f"{side} {problem}: batchjob will not use it as its run store")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW | NONBLOCK | CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"{path}: cannot open the run store: {exc.strerror}") from None
    try:
        problem = _file_problem(os.fstat(fd))
        if problem:
            raise StoreError(f"{path} {problem}: batchjob will not use it as its run store")
    finally:
        os.close(fd)


def _file_problem(info: os.stat_result) -> str:
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if not is_regular(info):
        return "is not a regular file"
    if info.st_nlink > 1:
        return "has other hard links"
    if os.name == "posix" and info.st_mode & 0o022:
        return "can be written by other users (chmod go-w it)"
    if not owned_by_me(info):
        return "belongs to another user"
    return ""
