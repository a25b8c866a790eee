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
  ``runs`` in SHARE ROW EXCLUSIVE mode so seqs grow in start order; a lease, a day's budget or
  a fold is serialised by an advisory lock. Lease times are the server's clock, the same for
  every machine.
- **Connection loss.** A call that finds its connection gone connects again and runs once
  more (every call is safe to repeat); a server that cannot be reached is a StoreError within
  ``connect_timeout`` (10 s unless the URL sets it). The run's writer retries with backoff.
- **Secrets.** ``location`` and every message show the URL without its password.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

from batchjob._errors import StoreError
from batchjob.store._chunks import ChunkStore
from batchjob.store._location import display_state
from batchjob.store._schema import MIGRATIONS, SCHEMA_VERSION, postgres_statement
from batchjob.store._sql import Db, SqlBackend

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


class PostgresBackend(SqlBackend):
    """Runs, chunks and folds in a PostgreSQL database (see :class:`batchjob.store.Backend`)."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self._pg = _driver()
        self.location = display_state(url)
        self._params = self._conninfo(url)
        self._password = str(self._params.get("password") or "")
        self._guard = threading.RLock()  # the loop and the run's writer thread, in turn
        self._conn: _Connection | None = None
        try:
            self._call("open", self._migrate, retry=False)
        except BaseException:
            self.close()
            raise

    # --- plumbing ------------------------------------------------------------------------------

    def close(self) -> None:
        with self._guard:
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
        with self._guard:
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

    # --- what PostgreSQL does its own way (the statements are in _sql.py) ---------------------

    def _transaction(
        self, doing: str, work: Callable[[Db], _T], *, write: bool, snapshot: bool = False
    ) -> _T:
        def run(cur: _Cursor) -> _T:
            if snapshot:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            return work(_Qmarks(cur))

        return self._call(doing, run)

    def _lock(self, db: Db, table: str) -> None:
        db.execute(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")

    def _serialize(self, db: Db, key: str) -> None:
        db.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (key,))

    def _durable(self, db: Db) -> None:
        db.execute("SET LOCAL synchronous_commit = on")

    def _now(self, db: Db) -> float:
        return float(db.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()[0])


class _Qmarks:
    """A cursor that takes the ``?`` parameters SQLite and _sql.py use (psycopg takes %s)."""

    def __init__(self, cur: _Cursor) -> None:
        self._cur = cur

    def execute(self, sql: str, params: Any = (), /) -> Any:
        return self._cur.execute(_pg_sql(sql), params)

    def executemany(self, sql: str, rows: Any, /) -> Any:
        self._cur.executemany(_pg_sql(sql), rows)
        return self._cur


def _pg_sql(sql: str) -> Any:
    # Statements are ours (constants, no "?" or "%" in a literal but LIKE's escape, "\\").
    return sql.replace("%", "%%").replace("?", "%s")


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
