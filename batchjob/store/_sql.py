"""The Backend primitives in SQL that SQLite and PostgreSQL both read, written once.

A backend says how to run one transaction (:meth:`SqlBackend._transaction`) and the few
things the two databases do differently (:meth:`_lock`, :meth:`_serialize`, :meth:`_now`,
:meth:`_durable`); the statements are the same, with ``?`` for parameters.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from batchjob.store._base import Chunk, RawRun, RunEnd, RunStart

_T = TypeVar("_T")

_RUN_COLUMNS = (
    "runs.seq, runs.run_id, apis.base_url, runs.action, runs.started_at, runs.ended_at, "
    "runs.exit_code, runs.stop_reason, runs.report, runs.requests, runs.record, runs.host, "
    "runs.pid"
)


class Db(Protocol):
    """One transaction's handle: statements with ``?`` parameters."""

    def execute(self, sql: str, params: Any = ..., /) -> Any: ...  # a cursor
    def executemany(self, sql: str, rows: Any, /) -> Any: ...


class SqlBackend:
    """Runs, chunks, folds, leases and budgets (see :class:`batchjob.store.Backend`)."""

    location: str

    def __init__(self) -> None:
        self._apis: dict[str, int] = {}

    # --- what a database does its own way ---------------------------------------------------

    def _transaction(
        self, doing: str, work: Callable[[Db], _T], *, write: bool, snapshot: bool = False
    ) -> _T:
        raise NotImplementedError

    def _lock(self, db: Db, table: str) -> None:
        """Hold ``table`` against other writers until the transaction ends."""

    def _serialize(self, db: Db, key: str) -> None:
        """Run one transaction at a time for ``key`` (a lease, a day's budget, a fold)."""

    def _durable(self, db: Db) -> None:
        """This transaction waits for the disk (a run's start and end)."""

    def _now(self, db: Db) -> float:
        raise NotImplementedError

    def _pruned(self) -> None:
        """After chunks were dropped: give the space back if the database needs telling."""

    # --- runs ----------------------------------------------------------------------------------

    def _api(self, db: Db, base_url: str, create: bool) -> int | None:
        api = self._apis.get(base_url)
        if api is None:
            row = db.execute("SELECT api FROM apis WHERE base_url = ?", (base_url,)).fetchone()
            if row is None:
                if not create:
                    return None
                self._lock(db, "apis")
                db.execute(
                    # WHERE: SQLite reads "FROM apis ON CONFLICT" as a join otherwise.
                    "INSERT INTO apis (api, base_url) SELECT coalesce(max(api), 0) + 1, ? "
                    "FROM apis WHERE 1 = 1 ON CONFLICT (base_url) DO NOTHING",
                    (base_url,),
                )
                row = db.execute("SELECT api FROM apis WHERE base_url = ?", (base_url,)).fetchone()
            api = self._apis[base_url] = int(row[0])
        return api

    def begin_run(self, start: RunStart) -> int:
        def work(db: Db) -> int:
            self._durable(db)
            api = self._api(db, start.base_url, create=True)
            self._lock(db, "runs")  # seqs unique and in start order
            seq = int(db.execute("SELECT coalesce(max(seq), 0) + 1 FROM runs").fetchone()[0])
            db.execute(
                "INSERT INTO runs (seq, run_id, api, action, started_at, report, host, pid) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, start.run_id, api, start.action, start.started_at, start.report,
                 start.host, start.pid),
            )  # fmt: skip
            db.executemany(
                "INSERT INTO run_files (run, file, path) VALUES (?, ?, ?)",
                [(seq, i, path) for i, path in enumerate(start.files)],
            )
            return seq

        return self._transaction("record the run's start in", work, write=True)

    def end_run(self, seq: int, end: RunEnd) -> None:
        record = json.dumps(end.record, ensure_ascii=True, allow_nan=False) if end.record else None

        def work(db: Db) -> None:
            self._durable(db)
            db.execute(
                "UPDATE runs SET ended_at = ?, exit_code = ?, stop_reason = ?, requests = ?, "
                "record = ? WHERE seq = ?",
                (end.ended_at, end.exit_code, end.stop_reason, end.requests, record, seq),
            )

        self._transaction("record the run's end in", work, write=True)

    def add_chunks(
        self,
        seq: int,
        chunks: Sequence[tuple[str, bytes]],
        errors: Sequence[tuple[int, str, str]] = (),
    ) -> None:
        def work(db: Db) -> None:
            if errors:
                db.executemany(
                    "INSERT INTO run_errors (run, code, error_key, error_message) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (run, code) DO UPDATE SET "
                    "error_key = excluded.error_key, error_message = excluded.error_message",
                    [(seq, code, key, message) for code, key, message in errors],
                )
            # One writer per run (its writer thread): the next number is the run's own.
            start = int(
                db.execute(
                    "SELECT coalesce(max(number), -1) + 1 FROM chunks WHERE run = ?", (seq,)
                ).fetchone()[0]
            )
            db.executemany(
                "INSERT INTO chunks (run, number, kind, data) VALUES (?, ?, ?, ?)",
                [(seq, start + i, kind, data) for i, (kind, data) in enumerate(chunks)],
            )

        self._transaction("write", work, write=True)

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

        def work(db: Db) -> list[RawRun]:
            found = db.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs JOIN apis ON apis.api = runs.api "
                f"WHERE {where} ORDER BY runs.seq DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
            return [_raw_run(row) for row in found]

        return self._transaction("read", work, write=False)

    def later_runs(self, seq: int) -> list[int]:
        def work(db: Db) -> list[int]:
            found = db.execute(
                "SELECT later.seq FROM runs AS later JOIN runs AS this ON this.seq = ? "
                "WHERE later.api = this.api AND later.seq > this.seq ORDER BY later.seq",
                (seq,),
            ).fetchall()
            return [int(row[0]) for row in found]

        return self._transaction("read", work, write=False)

    def run_chunks(self, seq: int, kinds: Sequence[str]) -> list[Chunk]:
        marks = ",".join("?" * len(kinds))

        def work(db: Db) -> list[Chunk]:
            found = db.execute(
                f"SELECT run, number, kind, data FROM chunks WHERE run = ? AND kind IN ({marks}) "
                "ORDER BY number",
                (seq, *kinds),
            ).fetchall()
            return [Chunk(int(r), int(n), str(k), bytes(d)) for r, n, k, d in found]

        return self._transaction("read", work, write=False)

    def run_files(self, seq: int) -> list[str]:
        def work(db: Db) -> list[str]:
            found = db.execute(
                "SELECT path FROM run_files WHERE run = ? ORDER BY file", (seq,)
            ).fetchall()
            return [str(row[0]) for row in found]

        return self._transaction("read", work, write=False)

    def run_errors(self, seq: int) -> list[tuple[int, str, str]]:
        def work(db: Db) -> list[tuple[int, str, str]]:
            found = db.execute(
                "SELECT code, error_key, error_message FROM run_errors WHERE run = ?", (seq,)
            ).fetchall()
            return [(int(c), str(k), str(m)) for c, k, m in found]

        return self._transaction("read", work, write=False)

    # --- the latest outcome of each identity ---------------------------------------------------

    def folded(self, base_url: str) -> tuple[int, bytes | None, list[Chunk]]:
        def work(db: Db) -> tuple[int, bytes | None, list[Chunk]]:
            api = self._api(db, base_url, create=False)
            if api is None:
                return 0, None, []
            row = db.execute("SELECT generation, data FROM folds WHERE api = ?", (api,)).fetchone()
            found = db.execute(
                "SELECT chunks.run, chunks.number, chunks.kind, chunks.data FROM chunks "
                "JOIN runs ON runs.seq = chunks.run WHERE chunks.kind = 'ids' "
                "AND chunks.folded = 0 AND runs.api = ? ORDER BY chunks.run, chunks.number",
                (api,),
            ).fetchall()
            chunks = [Chunk(int(r), int(n), str(k), bytes(d)) for r, n, k, d in found]
            if row is None:
                return 0, None, chunks
            return int(row[0]), bytes(row[1]), chunks

        # One snapshot: the fold and the chunks after it agree.
        return self._transaction("read", work, write=False, snapshot=True)

    def fold(self, base_url: str, generation: int, data: bytes, chunks: Sequence[Chunk]) -> bool:
        def work(db: Db) -> bool:
            api = self._api(db, base_url, create=True)
            self._serialize(db, f"fold {api}")
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

        return self._transaction("fold", work, write=True)

    def drop_chunks(self, seq: int) -> int:
        """Delete a run's plan and rows chunks, and its identity chunks once folded."""

        def work(db: Db) -> int:
            cursor = db.execute(
                "DELETE FROM chunks WHERE run = ? AND (kind <> 'ids' OR folded = 1)", (seq,)
            )
            return int(cursor.rowcount)

        dropped = self._transaction("prune", work, write=True)
        self._pruned()
        return dropped

    # --- runs on one API key ---------------------------------------------------------------

    def lease(self, name: str, holder: str, seconds: float, dead: str = "") -> tuple[bool, str]:
        def work(db: Db) -> tuple[bool, str]:
            self._serialize(db, f"lease {name}")
            now = self._now(db)
            row = db.execute("SELECT holder, until FROM leases WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] not in (holder, dead) and float(row[1]) > now:
                return False, str(row[0])
            db.execute(
                "INSERT INTO leases (name, holder, until) VALUES (?, ?, ?) ON CONFLICT (name) "
                "DO UPDATE SET holder = excluded.holder, until = excluded.until",
                (name, holder, now + seconds),
            )
            return True, holder

        return self._transaction("take the key's lease in", work, write=True)

    def release(self, name: str, holder: str) -> None:
        def work(db: Db) -> None:
            db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

        self._transaction("release the key's lease in", work, write=True)

    def spend(self, name: str, day: str, want: int, limit: int) -> int:
        def work(db: Db) -> int:
            self._serialize(db, f"budget {name} {day}")
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

        return self._transaction("count requests in", work, write=True)

    def unspend(self, name: str, day: str, count: int) -> None:
        def work(db: Db) -> None:
            db.execute(
                "UPDATE budgets SET spent = CASE WHEN spent > ? THEN spent - ? ELSE 0 END "
                "WHERE name = ? AND day = ?",
                (count, count, name, day),
            )

        self._transaction("count requests in", work, write=True)


def _raw_run(row: Sequence[Any]) -> RawRun:
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
