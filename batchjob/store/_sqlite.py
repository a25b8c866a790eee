"""The SQLite backend: one file, safe for several processes at once (WAL, busy waits).

Writes are short transactions taken with ``BEGIN IMMEDIATE``, so two runs never deadlock on a
lock upgrade; SQLite's busy timeout makes a writer wait its turn instead of failing with
"database is locked". ``synchronous=NORMAL`` in WAL mode survives a killed process (what the
journal it replaces promised); a power loss may lose the last transactions, which a resumed
run sends again harmlessly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from batchjob._errors import StoreError
from batchjob._portable import CLOEXEC, NOFOLLOW, NONBLOCK, is_regular, owned_by_me
from batchjob.store._base import Chunk, RawRun, RunEnd, RunStart
from batchjob.store._chunks import ChunkStore
from batchjob.store._schema import MIGRATIONS, SCHEMA_VERSION

_T = TypeVar("_T")
#: How long a writer waits for another process's transaction before the store is "busy".
_BUSY_SECONDS = 60.0
_SIDE_FILES = ("-wal", "-shm", "-journal")
_RUN_COLUMNS = (
    "runs.seq, runs.run_id, apis.base_url, runs.action, runs.started_at, runs.ended_at, "
    "runs.exit_code, runs.stop_reason, runs.report, runs.requests, runs.record, runs.host, "
    "runs.pid"
)


def open_sqlite(path: Path) -> ChunkStore:
    return ChunkStore(SqliteBackend(path))


class SqliteBackend:
    """Runs, chunks and folds in one SQLite file (see :class:`batchjob.store.Backend`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)
        self._lock = threading.RLock()
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
        self._apis: dict[str, int] = {}

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; the busy timeout waits for other writers."""
        db = self._db
        with self._lock:  # the run's writer thread and the loop share the connection
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"{self.location}: cannot write the run store: {exc}") from None
            try:
                yield db
                db.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(
                        f"{self.location}: cannot write the run store: {exc}"
                    ) from None
                raise

    def _read(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._lock:
            try:
                return work(self._db)
            except sqlite3.Error as exc:
                raise StoreError(f"{self.location}: cannot read the run store: {exc}") from None

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

    def _api(self, db: sqlite3.Connection, base_url: str, create: bool) -> int | None:
        api = self._apis.get(base_url)
        if api is None:
            row = db.execute("SELECT api FROM apis WHERE base_url = ?", (base_url,)).fetchone()
            if row is None:
                if not create:
                    return None
                db.execute(
                    "INSERT INTO apis (api, base_url) SELECT coalesce(max(api), 0) + 1, ? "
                    "FROM apis",
                    (base_url,),
                )
                row = db.execute("SELECT api FROM apis WHERE base_url = ?", (base_url,)).fetchone()
            api = self._apis[base_url] = int(row[0])
        return api

    # --- runs ----------------------------------------------------------------------------------

    def begin_run(self, start: RunStart) -> int:
        with self._write() as db:
            api = self._api(db, start.base_url, create=True)
            seq = int(db.execute("SELECT coalesce(max(seq), 0) + 1 FROM runs").fetchone()[0])
            db.execute(
                "INSERT INTO runs (seq, run_id, api, action, started_at, report, host, pid) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    seq,
                    start.run_id,
                    api,
                    start.action,
                    start.started_at,
                    start.report,
                    start.host,
                    start.pid,
                ),
            )
            db.executemany(
                "INSERT INTO run_files (run, file, path) VALUES (?, ?, ?)",
                [(seq, i, path) for i, path in enumerate(start.files)],
            )
        return seq

    def end_run(self, seq: int, end: RunEnd) -> None:
        record = json.dumps(end.record, ensure_ascii=True, allow_nan=False) if end.record else None
        with self._write() as db:
            db.execute(
                "UPDATE runs SET ended_at = ?, exit_code = ?, stop_reason = ?, requests = ?, "
                "record = ? WHERE seq = ?",
                (end.ended_at, end.exit_code, end.stop_reason, end.requests, record, seq),
            )

    def add_chunks(
        self,
        seq: int,
        chunks: Sequence[tuple[str, bytes]],
        errors: Sequence[tuple[int, str, str]] = (),
    ) -> None:
        with self._write() as db:
            if errors:
                db.executemany(
                    "INSERT OR REPLACE INTO run_errors (run, code, error_key, error_message) "
                    "VALUES (?, ?, ?, ?)",
                    [(seq, code, key, message) for code, key, message in errors],
                )
            start = int(
                db.execute(
                    "SELECT coalesce(max(number), -1) + 1 FROM chunks WHERE run = ?", (seq,)
                ).fetchone()[0]
            )
            db.executemany(
                "INSERT INTO chunks (run, number, kind, data) VALUES (?, ?, ?, ?)",
                [(seq, start + i, kind, data) for i, (kind, data) in enumerate(chunks)],
            )

    def find_runs(
        self,
        *,
        seq: int | None = None,
        run_id: str | None = None,
        prefix: str | None = None,
        report: str | None = None,
        limit: int = 1,
    ) -> list[RawRun]:
        where, args = "1 = 1", list[Any]()
        if seq is not None:
            where, args = "runs.seq = ?", [seq]
        elif run_id is not None:
            where, args = "runs.run_id = ?", [run_id]
        elif prefix is not None:
            escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where, args = "runs.run_id LIKE ? ESCAPE '\\'", [escaped + "%"]
        elif report is not None:
            where, args = "runs.report = ?", [report]

        def work(db: sqlite3.Connection) -> list[RawRun]:
            found = db.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs JOIN apis ON apis.api = runs.api "
                f"WHERE {where} ORDER BY runs.seq DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
            return [_raw_run(row) for row in found]

        return self._read(work)

    def later_runs(self, seq: int) -> list[int]:
        def work(db: sqlite3.Connection) -> list[int]:
            found = db.execute(
                "SELECT later.seq FROM runs AS later JOIN runs AS this ON this.seq = ? "
                "WHERE later.api = this.api AND later.seq > this.seq ORDER BY later.seq",
                (seq,),
            ).fetchall()
            return [int(row[0]) for row in found]

        return self._read(work)

    def run_chunks(self, seq: int, kinds: Sequence[str]) -> list[Chunk]:
        marks = ",".join("?" * len(kinds))

        def work(db: sqlite3.Connection) -> list[Chunk]:
            found = db.execute(
                f"SELECT run, number, kind, data FROM chunks WHERE run = ? AND kind IN ({marks}) "
                "ORDER BY number",
                (seq, *kinds),
            ).fetchall()
            return [Chunk(int(r), int(n), str(k), bytes(d)) for r, n, k, d in found]

        return self._read(work)

    def run_files(self, seq: int) -> list[str]:
        def work(db: sqlite3.Connection) -> list[str]:
            found = db.execute(
                "SELECT path FROM run_files WHERE run = ? ORDER BY file", (seq,)
            ).fetchall()
            return [str(row[0]) for row in found]

        return self._read(work)

    def run_errors(self, seq: int) -> list[tuple[int, str, str]]:
        def work(db: sqlite3.Connection) -> list[tuple[int, str, str]]:
            found = db.execute(
                "SELECT code, error_key, error_message FROM run_errors WHERE run = ?", (seq,)
            ).fetchall()
            return [(int(c), str(k), str(m)) for c, k, m in found]

        return self._read(work)

    # --- the latest outcome of each identity ---------------------------------------------------

    def folded(self, base_url: str) -> tuple[int, bytes | None, list[Chunk]]:
        def work(db: sqlite3.Connection) -> tuple[int, bytes | None, list[Chunk]]:
            db.execute("BEGIN")  # one snapshot: the fold and the chunks after it agree
            try:
                api = self._api(db, base_url, create=False)
                if api is None:
                    return 0, None, []
                row = db.execute(
                    "SELECT generation, data FROM folds WHERE api = ?", (api,)
                ).fetchone()
                found = db.execute(
                    "SELECT chunks.run, chunks.number, chunks.kind, chunks.data FROM chunks "
                    "JOIN runs ON runs.seq = chunks.run WHERE chunks.kind = 'ids' "
                    "AND chunks.folded = 0 AND runs.api = ? ORDER BY chunks.run, chunks.number",
                    (api,),
                ).fetchall()
            finally:
                db.execute("COMMIT")
            chunks = [Chunk(int(r), int(n), str(k), bytes(d)) for r, n, k, d in found]
            if row is None:
                return 0, None, chunks
            return int(row[0]), bytes(row[1]), chunks

        return self._read(work)

    def fold(self, base_url: str, generation: int, data: bytes, chunks: Sequence[Chunk]) -> bool:
        with self._write() as db:
            api = self._api(db, base_url, create=True)
            row = db.execute("SELECT generation FROM folds WHERE api = ?", (api,)).fetchone()
            if (int(row[0]) if row is not None else 0) != generation:
                return False
            db.execute(
                "INSERT INTO folds (api, generation, data) VALUES (?, ?, ?) "
                "ON CONFLICT (api) DO UPDATE SET generation = excluded.generation, "
                "data = excluded.data",
                (api, generation + 1, data),
            )
            db.executemany(
                "UPDATE chunks SET folded = 1 WHERE run = ? AND number = ?",
                [(c.seq, c.number) for c in chunks],
            )
        return True

    def drop_chunks(self, seq: int) -> int:
        """Delete a run's plan and rows chunks, and its identity chunks once folded."""
        with self._write() as db:
            dropped = db.execute(
                "DELETE FROM chunks WHERE run = ? AND (kind <> 'ids' OR folded = 1)", (seq,)
            ).rowcount
        with contextlib.suppress(sqlite3.Error), self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # give the space back
        return int(dropped)

    # --- runs on one API key --------------------------------------------------------------

    def lease(self, name: str, holder: str, seconds: float, dead: str = "") -> tuple[bool, str]:
        with self._write() as db:
            now = time.time()
            row = db.execute("SELECT holder, until FROM leases WHERE name = ?", (name,)).fetchone()
            taken = row is not None and row[0] not in (holder, dead) and float(row[1]) > now
            if taken:
                return False, str(row[0])
            db.execute(
                "INSERT INTO leases (name, holder, until) VALUES (?, ?, ?) ON CONFLICT (name) "
                "DO UPDATE SET holder = excluded.holder, until = excluded.until",
                (name, holder, now + seconds),
            )
        return True, holder

    def release(self, name: str, holder: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    def spend(self, name: str, day: str, want: int, limit: int) -> int:
        with self._write() as db:
            row = db.execute(
                "SELECT spent FROM budgets WHERE name = ? AND day = ?", (name, day)
            ).fetchone()
            spent = int(row[0]) if row is not None else 0
            granted = max(0, min(want, limit - spent))
            if granted:
                db.execute(
                    "INSERT INTO budgets (name, day, spent) VALUES (?, ?, ?) ON CONFLICT "
                    "(name, day) DO UPDATE SET spent = excluded.spent",
                    (name, day, spent + granted),
                )
        return granted

    def unspend(self, name: str, day: str, count: int) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE budgets SET spent = max(0, spent - ?) WHERE name = ? AND day = ?",
                (count, name, day),
            )


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


def _raw_run(row: tuple[Any, ...]) -> RawRun:
    return RawRun(
        seq=int(row[0]),
        run_id=str(row[1]),
        base_url=str(row[2]),
        action=str(row[3]),
        started_at=str(row[4]),
        ended_at=row[5],
        exit_code=row[6],
        stop_reason=row[7],
        report=str(row[8]),
        requests=int(row[9] or 0),
        record=row[10],
        host=str(row[11] or ""),
        pid=int(row[12] or 0),
    )


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
