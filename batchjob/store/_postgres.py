"""The PostgreSQL backend: one database for runs on several machines (``--state postgresql://``).

The same tables as SQLite (:data:`~batchjob.store._schema.MIGRATIONS`, through
:func:`postgres_statement`) and the same primitives (:class:`~batchjob.store.Backend`); every
answer is worked out by :class:`~batchjob.store._chunks.ChunkStore`, so the two backends cannot
disagree. What differs is how it talks to the server:

- **Driver.** psycopg 3, imported only when a ``postgresql://`` state is used (the extra
  ``batchjob[postgresql]``). A block of outcomes is one row of BYTEA, so a million outcomes
  cost a handful of inserts, not a million (no COPY needed).
- **Transactions.** Every call is one explicit transaction, committed or rolled back before it
  returns. Blocks are committed without waiting for the server's disk
  (``synchronous_commit = off``, as SQLite's ``synchronous=NORMAL``): they survive batchjob
  being killed, and a server crash may lose the last ones, which a resumed run sends again.
- **Concurrency.** Migrations run under ``pg_advisory_xact_lock``; ``begin_run`` takes
  ``runs`` in SHARE ROW EXCLUSIVE mode so seqs grow in start order; a lease or a budget is
  one row read ``FOR UPDATE``. Lease times are the server's clock, the same for every machine.
- **Connection loss.** A call that finds its connection gone connects again and runs once
  more (every call is safe to repeat); a server that cannot be reached is a StoreError within
  ``connect_timeout`` (10 s unless the URL sets it). The run's writer retries with backoff.
- **Secrets.** ``location`` and every message show the URL without its password.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

from batchjob._errors import StoreError
from batchjob.store._base import Chunk, RawRun, RunEnd, RunStart
from batchjob.store._chunks import ChunkStore
from batchjob.store._location import display_state
from batchjob.store._schema import MIGRATIONS, SCHEMA_VERSION, postgres_statement

if TYPE_CHECKING:
    from types import ModuleType
    from typing import TypeAlias

    import psycopg

    _Cursor: TypeAlias = psycopg.Cursor[tuple[Any, ...]]
    _Connection: TypeAlias = psycopg.Connection[tuple[Any, ...]]

_T = TypeVar("_T")
#: The key of the advisory lock migrations take (any constant: "batchjob" in ASCII).
_MIGRATION_LOCK: Final = 0x626174636A6F62
#: Settings every connection gets unless the URL says otherwise.
_CONNECTION_DEFAULTS: Final = {
    "connect_timeout": "10",  # an unreachable server fails in bounded time
    "application_name": "batchjob",
    "client_encoding": "UTF8",
    # A server that vanished mid-call is noticed in about a minute, not hours.
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "60000",  # ms: data unacknowledged this long means the link is gone
    # No call waits without bound: a lock held elsewhere, a frozen client, a huge statement.
    "options": "-c statement_timeout=60000 -c lock_timeout=30000 "
    "-c idle_in_transaction_session_timeout=120000",
}
_RUN_COLUMNS: Final = (
    "runs.seq, runs.run_id, apis.base_url, runs.action, runs.started_at, runs.ended_at, "
    "runs.exit_code, runs.stop_reason, runs.report, runs.requests, runs.record, runs.host, "
    "runs.pid"
)


def open_postgres(url: str) -> ChunkStore:
    return ChunkStore(PostgresBackend(url))


def _driver() -> ModuleType:
    """psycopg, or a StoreError saying how to install it."""
    try:
        import psycopg
    except ImportError as exc:
        raise StoreError(
            "state: a postgresql:// store needs the PostgreSQL driver (psycopg 3), which is "
            f"not installed ({exc}): pip install 'batchjob[postgresql]'"
        ) from None
    return psycopg


class PostgresBackend:
    """Runs, chunks and folds in a PostgreSQL database (see :class:`batchjob.store.Backend`)."""

    def __init__(self, url: str) -> None:
        self._pg = _driver()
        self.location = display_state(url)
        self._params = self._conninfo(url)
        self._password = str(self._params.get("password") or "")
        self._lock = threading.RLock()  # the loop and the run's writer thread, in turn
        self._conn: _Connection | None = None
        self._apis: dict[str, int] = {}
        try:
            self._call("open", self._migrate, retry=False)
        except BaseException:
            self.close()
            raise

    # --- plumbing ------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    def _conninfo(self, url: str) -> dict[str, Any]:
        try:
            params: dict[str, Any] = self._pg.conninfo.conninfo_to_dict(url)
        except self._pg.Error as exc:
            raise StoreError(
                f"state {self.location}: not a PostgreSQL URL libpq can read ({type(exc).__name__})"
            ) from None
        for name, value in _CONNECTION_DEFAULTS.items():
            params.setdefault(name, value)
        return params

    def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self.close()
        try:
            conn = cast("_Connection", self._pg.connect(autocommit=False, **self._params))
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SET synchronous_commit = off")
        except self._pg.Error as exc:
            raise StoreError(self._message("cannot connect to the run store", exc)) from None
        self._conn = conn
        return conn

    def _call(self, doing: str, work: Callable[[_Cursor], _T], retry: bool = True) -> _T:
        """``work`` in one transaction, committed when it returns, rolled back when it raises.
        A connection found lost is opened again and ``work`` runs once more."""
        with self._lock:
            for attempt in (1, 2):
                conn = self._connection()
                try:
                    with conn.transaction(), conn.cursor() as cur:
                        return work(cur)
                except self._pg.Error as exc:
                    lost = conn.closed or conn.broken
                    self._settle(conn)
                    if lost and retry and attempt == 1:
                        continue
                    what = "lost the connection to" if lost else f"cannot {doing}"
                    raise StoreError(self._message(f"{what} the run store", exc)) from None
                except BaseException:
                    self._settle(conn)
                    raise
            raise AssertionError("unreachable")  # pragma: no cover

    def _settle(self, conn: _Connection) -> None:
        """After a failure: no transaction left open, and a lost connection dropped."""
        if conn.closed or conn.broken:
            self.close()
            return
        if conn.info.transaction_status != self._pg.pq.TransactionStatus.IDLE:
            try:
                conn.rollback()
            except Exception:
                self.close()

    def _message(self, what: str, exc: BaseException) -> str:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if self._password:
            text = text.replace(self._password, "(not shown)")
        return f"{self.location}: {what}: {text}"

    def _migrate(self, cur: _Cursor) -> None:
        # One opener migrates; the others wait here, then find the version it wrote.
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        version = _version(cur, self.location)
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.location}: the run store has schema version {version}, newer than "
                f"this batchjob knows ({SCHEMA_VERSION}): upgrade batchjob"
            )
        for step in MIGRATIONS[version:]:
            for statement in step:
                cur.execute(postgres_statement(statement))
        if version < SCHEMA_VERSION:
            cur.execute(
                "INSERT INTO meta (name, value) VALUES ('schema_version', %s) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )

    def _api(self, cur: _Cursor, base_url: str, create: bool) -> int | None:
        api = self._apis.get(base_url)
        if api is None:
            row = cur.execute("SELECT api FROM apis WHERE base_url = %s", (base_url,)).fetchone()
            if row is None:
                if not create:
                    return None
                cur.execute("LOCK TABLE apis IN SHARE ROW EXCLUSIVE MODE")
                cur.execute(
                    "INSERT INTO apis (api, base_url) SELECT coalesce(max(api), 0) + 1, %s "
                    "FROM apis ON CONFLICT (base_url) DO NOTHING",
                    (base_url,),
                )
                row = cur.execute(
                    "SELECT api FROM apis WHERE base_url = %s", (base_url,)
                ).fetchone()
            assert row is not None
            api = self._apis[base_url] = int(row[0])
        return api

    # --- runs ----------------------------------------------------------------------------------

    def begin_run(self, start: RunStart) -> int:
        def work(cur: _Cursor) -> int:
            cur.execute("SET LOCAL synchronous_commit = on")
            api = self._api(cur, start.base_url, create=True)
            cur.execute("LOCK TABLE runs IN SHARE ROW EXCLUSIVE MODE")
            row = cur.execute("SELECT coalesce(max(seq), 0) + 1 FROM runs").fetchone()
            assert row is not None
            seq = int(row[0])
            cur.execute(
                "INSERT INTO runs (seq, run_id, api, action, started_at, report, host, pid) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (seq, start.run_id, api, start.action, start.started_at, start.report,
                 start.host, start.pid),
            )  # fmt: skip
            cur.executemany(
                "INSERT INTO run_files (run, file, path) VALUES (%s, %s, %s)",
                [(seq, i, path) for i, path in enumerate(start.files)],
            )
            return seq

        return self._call("record the run's start in", work)

    def end_run(self, seq: int, end: RunEnd) -> None:
        record = json.dumps(end.record, ensure_ascii=True, allow_nan=False) if end.record else None

        def work(cur: _Cursor) -> None:
            cur.execute("SET LOCAL synchronous_commit = on")
            cur.execute(
                "UPDATE runs SET ended_at = %s, exit_code = %s, stop_reason = %s, "
                "requests = %s, record = %s WHERE seq = %s",
                (end.ended_at, end.exit_code, end.stop_reason, end.requests, record, seq),
            )

        self._call("record the run's end in", work)

    def add_chunks(
        self,
        seq: int,
        chunks: Sequence[tuple[str, bytes]],
        errors: Sequence[tuple[int, str, str]] = (),
    ) -> None:
        def work(cur: _Cursor) -> None:
            if errors:
                cur.executemany(
                    "INSERT INTO run_errors (run, code, error_key, error_message) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (run, code) DO UPDATE SET "
                    "error_key = excluded.error_key, error_message = excluded.error_message",
                    [(seq, code, key, message) for code, key, message in errors],
                )
            # One writer per run (its writer thread): the next number is the run's own.
            row = cur.execute(
                "SELECT coalesce(max(number), -1) + 1 FROM chunks WHERE run = %s", (seq,)
            ).fetchone()
            assert row is not None
            start = int(row[0])
            cur.executemany(
                "INSERT INTO chunks (run, number, kind, data) VALUES (%s, %s, %s, %s)",
                [(seq, start + i, kind, data) for i, (kind, data) in enumerate(chunks)],
            )

        self._call("write", work)

    def find_runs(
        self,
        *,
        seq: int | None = None,
        run_id: str | None = None,
        prefix: str | None = None,
        report: str | None = None,
        limit: int = 1,
    ) -> list[RawRun]:
        where, args = "TRUE", list[Any]()
        if seq is not None:
            where, args = "runs.seq = %s", [seq]
        elif run_id is not None:
            where, args = "runs.run_id = %s", [run_id]
        elif prefix is not None:
            escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where, args = "runs.run_id LIKE %s ESCAPE '\\'", [escaped + "%"]
        elif report is not None:
            where, args = "runs.report = %s", [report]

        def work(cur: _Cursor) -> list[RawRun]:
            found = cur.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs JOIN apis ON apis.api = runs.api "
                f"WHERE {where} ORDER BY runs.seq DESC LIMIT %s",
                (*args, limit),
            ).fetchall()
            return [_raw_run(row) for row in found]

        return self._call("read", work)

    def later_runs(self, seq: int) -> list[int]:
        def work(cur: _Cursor) -> list[int]:
            found = cur.execute(
                "SELECT later.seq FROM runs AS later JOIN runs AS this ON this.seq = %s "
                "WHERE later.api = this.api AND later.seq > this.seq ORDER BY later.seq",
                (seq,),
            ).fetchall()
            return [int(row[0]) for row in found]

        return self._call("read", work)

    def run_chunks(self, seq: int, kinds: Sequence[str]) -> list[Chunk]:
        def work(cur: _Cursor) -> list[Chunk]:
            found = cur.execute(
                "SELECT run, number, kind, data FROM chunks WHERE run = %s AND kind = ANY(%s) "
                "ORDER BY number",
                (seq, list(kinds)),
            ).fetchall()
            return [Chunk(int(r), int(n), str(k), bytes(d)) for r, n, k, d in found]

        return self._call("read", work)

    def run_files(self, seq: int) -> list[str]:
        def work(cur: _Cursor) -> list[str]:
            found = cur.execute(
                "SELECT path FROM run_files WHERE run = %s ORDER BY file", (seq,)
            ).fetchall()
            return [str(row[0]) for row in found]

        return self._call("read", work)

    def run_errors(self, seq: int) -> list[tuple[int, str, str]]:
        def work(cur: _Cursor) -> list[tuple[int, str, str]]:
            found = cur.execute(
                "SELECT code, error_key, error_message FROM run_errors WHERE run = %s", (seq,)
            ).fetchall()
            return [(int(c), str(k), str(m)) for c, k, m in found]

        return self._call("read", work)

    # --- the latest outcome of each identity ---------------------------------------------------

    def folded(self, base_url: str) -> tuple[int, bytes | None, list[Chunk]]:
        def work(cur: _Cursor) -> tuple[int, bytes | None, list[Chunk]]:
            # One snapshot: the fold and the chunks after it agree.
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            api = self._api(cur, base_url, create=False)
            if api is None:
                return 0, None, []
            row = cur.execute(
                "SELECT generation, data FROM folds WHERE api = %s", (api,)
            ).fetchone()
            found = cur.execute(
                "SELECT chunks.run, chunks.number, chunks.kind, chunks.data FROM chunks "
                "JOIN runs ON runs.seq = chunks.run WHERE chunks.kind = 'ids' "
                "AND chunks.folded = 0 AND runs.api = %s ORDER BY chunks.run, chunks.number",
                (api,),
            ).fetchall()
            chunks = [Chunk(int(r), int(n), str(k), bytes(d)) for r, n, k, d in found]
            if row is None:
                return 0, None, chunks
            return int(row[0]), bytes(row[1]), chunks

        return self._call("read", work)

    def fold(self, base_url: str, generation: int, data: bytes, chunks: Sequence[Chunk]) -> bool:
        def work(cur: _Cursor) -> bool:
            api = self._api(cur, base_url, create=True)
            cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_MIGRATION_LOCK % 2**31, api))
            row = cur.execute("SELECT generation FROM folds WHERE api = %s", (api,)).fetchone()
            if (int(row[0]) if row is not None else 0) != generation:
                return False
            cur.execute(
                "INSERT INTO folds (api, generation, data) VALUES (%s, %s, %s) "
                "ON CONFLICT (api) DO UPDATE SET generation = excluded.generation, "
                "data = excluded.data",
                (api, generation + 1, data),
            )
            cur.executemany(
                "UPDATE chunks SET folded = 1 WHERE run = %s AND number = %s",
                [(c.seq, c.number) for c in chunks],
            )
            return True

        return self._call("fold", work)

    def drop_chunks(self, seq: int) -> int:
        """Delete a run's plan and rows chunks, and its identity chunks once folded."""

        def work(cur: _Cursor) -> int:
            cur.execute(
                "DELETE FROM chunks WHERE run = %s AND (kind <> 'ids' OR folded = 1)", (seq,)
            )
            return int(cur.rowcount)

        return self._call("prune", work)

    # --- runs on one API key ---------------------------------------------------------------

    def lease(self, name: str, holder: str, seconds: float, dead: str = "") -> tuple[bool, str]:
        def work(cur: _Cursor) -> tuple[bool, str]:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (name,))
            now = cur.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()
            assert now is not None
            row = cur.execute(
                "SELECT holder, until FROM leases WHERE name = %s", (name,)
            ).fetchone()
            if row is not None and row[0] not in (holder, dead) and float(row[1]) > float(now[0]):
                return False, str(row[0])
            cur.execute(
                "INSERT INTO leases (name, holder, until) VALUES (%s, %s, %s) ON CONFLICT "
                "(name) DO UPDATE SET holder = excluded.holder, until = excluded.until",
                (name, holder, float(now[0]) + seconds),
            )
            return True, holder

        return self._call("take the key's lease in", work)

    def release(self, name: str, holder: str) -> None:
        def work(cur: _Cursor) -> None:
            cur.execute("DELETE FROM leases WHERE name = %s AND holder = %s", (name, holder))

        self._call("release the key's lease in", work)

    def spend(self, name: str, day: str, want: int, limit: int) -> int:
        def work(cur: _Cursor) -> int:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{name} {day}",))
            row = cur.execute(
                "SELECT spent FROM budgets WHERE name = %s AND day = %s", (name, day)
            ).fetchone()
            spent = int(row[0]) if row is not None else 0
            granted = max(0, min(want, limit - spent))
            if granted:
                cur.execute(
                    "INSERT INTO budgets (name, day, spent) VALUES (%s, %s, %s) ON CONFLICT "
                    "(name, day) DO UPDATE SET spent = excluded.spent",
                    (name, day, spent + granted),
                )
            return granted

        return self._call("count requests in", work)

    def unspend(self, name: str, day: str, count: int) -> None:
        def work(cur: _Cursor) -> None:
            cur.execute(
                "UPDATE budgets SET spent = greatest(0, spent - %s) WHERE name = %s AND day = %s",
                (count, name, day),
            )

        self._call("count requests in", work)


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


def _version(cur: _Cursor, location: str) -> int:
    """The store's schema version; 0 for an empty database (or schema). A database whose
    tables are not a store's is refused, never written."""
    in_schema = "relnamespace = current_schema()::regnamespace"
    found = cur.execute(
        f"SELECT count(*) FROM pg_class WHERE {in_schema} AND relname = 'meta'"
    ).fetchone()
    if not found or not found[0]:
        others = cur.execute(
            f"SELECT count(*) FROM pg_class WHERE {in_schema} AND relkind IN ('r', 'p', 'v')"
        ).fetchone()
        if others is not None and others[0]:
            raise StoreError(
                f"{location}: the database has tables, but is not a batchjob run store: give "
                "an empty database, or a schema of its own (?options=-csearch_path%3Dbatchjob)"
            )
        return 0
    value = cur.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
    try:
        return int(value[0]) if value is not None else 0
    except ValueError:
        raise StoreError(f"{location}: the run store's schema_version is not a number") from None
