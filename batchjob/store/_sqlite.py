"""The SQLite store: one file, safe for several processes at once (WAL, busy waits).

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
import socket
import sqlite3
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from batchjob._errors import StoreError
from batchjob._portable import CLOEXEC, NOFOLLOW, NONBLOCK, is_regular, owned_by_me
from batchjob.store._base import (
    ROW_COLUMNS,
    Done,
    LatestBlock,
    RowBlock,
    RunEnd,
    RunInfo,
    RunStart,
)
from batchjob.store._schema import MIGRATIONS, SCHEMA_VERSION

_T = TypeVar("_T")
#: Tables whose primary key is the row: stored once, not beside a rowid (a third smaller).
_COMPACT = ("run_rows", "latest")
#: How long a writer waits for another process's transaction before the store is "busy".
_BUSY_SECONDS = 60.0
#: Asked about fewer identities than this, the store is searched for each; more, and every
#: done identity of the API is read once and matched in memory (a nightly cumulative export).
_LOOKUP_ONE_BY_ONE = 20_000
_SIDE_FILES = ("-wal", "-shm", "-journal")
_RUN_COLUMNS = (
    "runs.run_id, apis.base_url, runs.action, runs.started_at, runs.ended_at, runs.exit_code, "
    "runs.stop_reason, runs.report, runs.requests, runs.record, runs.host, runs.pid"
)


class SqliteStore:
    """A run store in one SQLite file (see :class:`batchjob.store.Store`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)
        _prepare_file(path)
        try:
            self._db = sqlite3.connect(
                f"file:{quote(str(path.absolute()))}?mode=rw",
                uri=True,
                timeout=_BUSY_SECONDS,
                isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE
                check_same_thread=False,  # used from the loop and from worker threads, in turn
            )
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot open the run store: {exc}") from None
        try:
            self._db.execute(f"PRAGMA busy_timeout = {int(_BUSY_SECONDS * 1000)}")
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{path}: the run store cannot use WAL mode (got {mode})")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"{path}: not a usable run store: {exc}") from None
        except BaseException:
            self._db.close()
            raise
        self._seqs: dict[str, int] = {}
        self._apis: dict[str, int] = {}

    # --- plumbing ----------------------------------------------------------------------------

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; the busy timeout waits for other writers."""
        db = self._db
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
                raise StoreError(f"{self.location}: cannot write the run store: {exc}") from None
            raise

    def _read(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
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
                    db.execute(_dialect(statement))
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
                    "INSERT INTO apis (api, base_url) "
                    "SELECT coalesce(max(api), 0) + 1, ? FROM apis",
                    (base_url,),
                )
                row = db.execute("SELECT api FROM apis WHERE base_url = ?", (base_url,)).fetchone()
            api = self._apis[base_url] = int(row[0])
        return api

    def _seq(self, db: sqlite3.Connection, run_id: str) -> int:
        seq = self._seqs.get(run_id)
        if seq is None:
            row = db.execute("SELECT seq FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise StoreError(f"{self.location}: no run {run_id!r} in the run store")
            seq = self._seqs[run_id] = int(row[0])
        return seq

    # --- a run, as it goes -------------------------------------------------------------------

    def begin_run(self, start: RunStart) -> None:
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
        self._seqs[start.run_id] = seq

    def record(self, run_id: str, rows: RowBlock, latest: LatestBlock) -> None:
        with self._write() as db:
            seq = self._seq(db, run_id)
            api = int(db.execute("SELECT api FROM runs WHERE seq = ?", (seq,)).fetchone()[0])
            if rows.errors:
                db.executemany(
                    "INSERT OR REPLACE INTO run_errors (run, code, error_key, error_message) "
                    "VALUES (?, ?, ?, ?)",
                    [(seq, code, key, message) for code, key, message in rows.errors],
                )
            if rows.position:
                db.executemany(
                    "INSERT OR REPLACE INTO run_rows (run, position, event_id, order_ticket_key, "
                    "outcome, http_status, error, attempts, file, source_row, finished_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    zip(
                        [seq] * len(rows.position),
                        rows.position,
                        rows.event_id,
                        rows.order_ticket_key,
                        rows.outcome,
                        rows.http_status,
                        rows.error,
                        rows.attempts,
                        rows.file,
                        rows.source_row,
                        rows.finished_at,
                        strict=True,
                    ),
                )
            _upsert_latest(db, api, seq, latest)

    def end_run(self, run_id: str, end: RunEnd) -> None:
        record = json.dumps(end.record, ensure_ascii=True, allow_nan=False)
        with self._write() as db:
            db.execute(
                "UPDATE runs SET ended_at = ?, exit_code = ?, stop_reason = ?, requests = ?, "
                "record = ? WHERE seq = ?",
                (
                    end.ended_at,
                    end.exit_code,
                    end.stop_reason,
                    end.requests,
                    record,
                    self._seq(db, run_id),
                ),
            )

    # --- what a run needs before it sends ----------------------------------------------------

    def done(self, base_url: str, outcome: str, identities: Sequence[str]) -> Done:
        def work(db: sqlite3.Connection) -> Done:
            api = self._api(db, base_url, create=False)
            if api is None or not len(identities):
                return Done(np.empty(0, np.int64), [], np.empty(0, np.float64))
            if len(identities) < _LOOKUP_ONE_BY_ONE:
                found = _lookup_each(db, api, outcome, identities)
            else:
                found = db.execute(
                    "SELECT identity, run, finished_at FROM latest WHERE api = ? AND outcome = ?",
                    (api, outcome),
                ).fetchall()
            return _match(db, identities, found)

        return self._read(work)

    def pending(self, base_url: str, action: str) -> pd.DataFrame:
        def work(db: sqlite3.Connection) -> pd.DataFrame:
            api = self._api(db, base_url, create=False)
            if api is None:
                return pd.DataFrame(columns=[*ROW_COLUMNS, "identity"])
            found = db.execute(
                f"SELECT {_ROW_SELECT}, latest.identity FROM latest "
                "JOIN run_rows ON run_rows.run = latest.run "
                "AND run_rows.position = latest.position "
                f"{_ROW_JOINS} WHERE latest.api = ? AND latest.pending = ? "
                "ORDER BY latest.run, latest.position",
                (api, action),
            ).fetchall()
            return _frame(found, [*ROW_COLUMNS, "identity"])

        return self._read(work)

    def last_run_for_report(self, report: str) -> RunInfo | None:
        def work(db: sqlite3.Connection) -> RunInfo | None:
            row = db.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs JOIN apis ON apis.api = runs.api "
                "WHERE runs.report = ? ORDER BY runs.seq DESC LIMIT 1",
                (report,),
            ).fetchone()
            return None if row is None else _run_info(row)

        return self._read(work)

    # --- history -----------------------------------------------------------------------------

    def runs(self, limit: int) -> list[RunInfo]:
        def work(db: sqlite3.Connection) -> list[RunInfo]:
            found = db.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs JOIN apis ON apis.api = runs.api "
                "ORDER BY runs.seq DESC LIMIT ?",
                (limit,),
            ).fetchall()
            return [_run_info(row) for row in found]

        return self._read(work)

    def run(self, run_id: str) -> RunInfo | None:
        """The run whose id is ``run_id``, or starts with it if just one does."""

        def work(db: sqlite3.Connection) -> RunInfo | None:
            pattern = run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            found = db.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs JOIN apis ON apis.api = runs.api "
                "WHERE runs.run_id = ? OR runs.run_id LIKE ? ESCAPE '\\' "
                "ORDER BY runs.run_id = ? DESC, runs.seq DESC LIMIT 2",
                (run_id, pattern, run_id),
            ).fetchall()
            if not found:
                return None
            if found[0][0] != run_id and len(found) > 1:
                raise StoreError(
                    f"{run_id!r} names more than one run (for example {found[0][0]} and "
                    f"{found[1][0]}): give more of the run id"
                )
            return _run_info(found[0])

        return self._read(work)

    def rows(self, run_id: str) -> pd.DataFrame:
        def work(db: sqlite3.Connection) -> pd.DataFrame:
            seq = self._seq(db, run_id)
            found = db.execute(
                f"SELECT {_ROW_SELECT} FROM run_rows {_ROW_JOINS} "
                "WHERE run_rows.run = ? ORDER BY run_rows.position",
                (seq,),
            ).fetchall()
            return _frame(found, list(ROW_COLUMNS))

        return self._read(work)

    def sent_after(self, run_id: str, base_url: str) -> set[tuple[str, str]]:
        """(event, key) pairs that runs after ``run_id`` against ``base_url`` sent (or may
        have: any try at all), or reported done."""

        def work(db: sqlite3.Connection) -> set[tuple[str, str]]:
            seq = self._seq(db, run_id)
            api = self._api(db, base_url, create=False)
            found = db.execute(
                "SELECT run_rows.event_id, run_rows.order_ticket_key FROM run_rows "
                "JOIN runs ON runs.seq = run_rows.run "
                "WHERE runs.seq > ? AND runs.api = ? "
                "AND (run_rows.attempts > 0 OR run_rows.outcome IN ('undone', 'checked_in'))",
                (seq, api),
            ).fetchall()
            return {(str(e), str(k)) for e, k in found}

        return self._read(work)

    def revertible(self, run_id: str) -> pd.DataFrame:
        """Rows ``run_id`` undid whose identity's latest word is still that run's."""

        def work(db: sqlite3.Connection) -> pd.DataFrame:
            seq = self._seq(db, run_id)
            found = db.execute(
                f"SELECT {_ROW_SELECT}, latest.identity FROM run_rows "
                "JOIN latest ON latest.run = run_rows.run AND latest.position = run_rows.position "
                f"{_ROW_JOINS} WHERE run_rows.run = ? AND run_rows.outcome = 'undone' "
                "AND latest.outcome = 'undone' ORDER BY run_rows.position",
                (seq,),
            ).fetchall()
            return _frame(found, [*ROW_COLUMNS, "identity"])

        return self._read(work)

    def outcome_counts(self, run_id: str) -> list[tuple[str, str, int]]:
        """(event id, outcome, rows) of the report rows the store holds for ``run_id``: what
        ``batchjob runs`` shows for a run that left no record (running, died)."""

        def work(db: sqlite3.Connection) -> list[tuple[str, str, int]]:
            found = db.execute(
                "SELECT event_id, outcome, count(*) FROM run_rows WHERE run = ? "
                "GROUP BY event_id, outcome ORDER BY min(position), outcome",
                (self._seq(db, run_id),),
            ).fetchall()
            return [(str(event), str(outcome), int(rows)) for event, outcome, rows in found]

        return self._read(work)


_ROW_SELECT = (
    "run_rows.position, run_rows.event_id, run_rows.order_ticket_key, run_rows.outcome, "
    "run_rows.http_status, coalesce(run_errors.error_key, ''), "
    "coalesce(run_errors.error_message, ''), run_rows.attempts, coalesce(run_files.path, ''), "
    "run_rows.source_row, run_rows.finished_at"
)
_ROW_JOINS = (
    "LEFT JOIN run_errors ON run_errors.run = run_rows.run AND run_errors.code = run_rows.error "
    "LEFT JOIN run_files ON run_files.run = run_rows.run AND run_files.file = run_rows.file"
)


def _dialect(statement: str) -> str:
    for table in _COMPACT:
        if statement.startswith(f"CREATE TABLE {table} "):
            return statement + " WITHOUT ROWID"
    return statement


def _version(db: sqlite3.Connection) -> int:
    has_meta = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if has_meta is None:
        others = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if others:
            raise StoreError("the file is an SQLite database, but not a batchjob run store")
        return 0
    row = db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
    return int(row[0]) if row is not None else 0


def _upsert_latest(db: sqlite3.Connection, api: int, seq: int, latest: LatestBlock) -> None:
    if not latest.identity:
        return
    columns = zip(
        latest.identity,
        latest.outcome,
        latest.pending,
        latest.position,
        latest.finished_at,
        latest.sent,
        strict=True,
    )
    sent: list[tuple[Any, ...]] = []
    unsent: list[tuple[Any, ...]] = []
    for identity, outcome, pending, position, finished, was_sent in columns:
        (sent if was_sent else unsent).append(
            (api, identity, outcome, pending, seq, position, finished)
        )
    insert = (
        "INSERT INTO latest (api, identity, outcome, pending, run, position, finished_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (api, identity) DO UPDATE SET "
        "outcome = excluded.outcome, pending = excluded.pending, run = excluded.run, "
        "position = excluded.position, finished_at = excluded.finished_at"
    )
    if sent:
        db.executemany(insert, sent)
    if unsent:
        # Never sent: an earlier success stays the identity's latest word.
        db.executemany(insert + " WHERE latest.outcome NOT IN ('undone', 'checked_in')", unsent)


def _lookup_each(
    db: sqlite3.Connection, api: int, outcome: str, identities: Sequence[str]
) -> list[tuple[str, int, float | None]]:
    found: list[tuple[str, int, float | None]] = []
    if isinstance(identities, pa.Array):
        identities = identities.to_pylist()
    step = 500
    for start in range(0, len(identities), step):
        chunk = list(identities[start : start + step])
        marks = ",".join("?" * len(chunk))
        found += db.execute(
            "SELECT identity, run, finished_at FROM latest "
            f"WHERE api = ? AND outcome = ? AND identity IN ({marks})",
            (api, outcome, *chunk),
        ).fetchall()
    return found


def _match(
    db: sqlite3.Connection,
    identities: Sequence[str],
    found: list[tuple[str, int, float | None]],
) -> Done:
    if not found:
        return Done(np.empty(0, np.int64), [], np.empty(0, np.float64))
    done_ids, runs, times = zip(*found, strict=True)
    asked = identities if isinstance(identities, pa.Array) else pa.array(identities, pa.string())
    where = pc.index_in(asked, value_set=pa.array(done_ids, pa.string()))
    index = np.flatnonzero(where.is_valid().to_numpy(zero_copy_only=False)).astype(np.int64)
    which = where.drop_null().to_numpy().astype(np.int64)
    seqs = np.asarray(runs, dtype=np.int64)[which]
    names = dict(
        db.execute(
            f"SELECT seq, run_id FROM runs WHERE seq IN ({','.join('?' * len(set(runs)))})",
            sorted(set(runs)),
        ).fetchall()
    )
    run_ids = pd.Series(seqs).map(names).tolist() if len(seqs) else []
    finished = np.asarray([np.nan if t is None else t for t in times], dtype=np.float64)[which]
    return Done(index, run_ids, finished)


def _frame(found: list[tuple[Any, ...]], columns: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(found, columns=columns)
    frame["finished_at"] = pd.to_numeric(frame["finished_at"], errors="coerce").astype(float)
    return frame


def _run_info(row: tuple[Any, ...]) -> RunInfo:
    run_id, base_url, action, started, ended, code, reason, report, requests, record = row[:10]
    host, pid = row[10:]
    if ended is not None:
        state = "finished"
    elif host == socket.gethostname() and pid and not _alive(int(pid)):
        state = "died"
    else:
        state = "running"
    return RunInfo(
        run_id=run_id,
        base_url=base_url,
        action=action,
        started_at=started,
        ended_at=ended,
        exit_code=code,
        stop_reason=reason,
        report=report,
        requests=int(requests or 0),
        record=json.loads(record) if record else None,
        host=host,
        pid=int(pid or 0),
        state=state,
    )


def _alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no cheap, safe check: say "running"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process: alive
    return True


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
    if not owned_by_me(info):
        return "belongs to another user"
    return ""
