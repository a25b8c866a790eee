"""The store's tables, and the migrations that bring an older store up to date.

One list of steps, plain SQL that SQLite and PostgreSQL both read: step ``n`` takes a store
from schema version ``n`` to ``n + 1``. A store records its version in ``meta``; a store newer
than this batchjob is refused (its tables may mean something this version does not know).
docs/store.md describes every table.
"""

from __future__ import annotations

from typing import Final

#: Outcomes and times are text and epoch seconds, so that a person can query the store with
#: the sqlite3 shell (or psql) and read what they get.
_V1: Final = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE apis (api INTEGER PRIMARY KEY, base_url TEXT NOT NULL UNIQUE)",
    """CREATE TABLE runs (
        seq INTEGER PRIMARY KEY,
        run_id TEXT NOT NULL UNIQUE,
        api INTEGER NOT NULL REFERENCES apis (api),
        action TEXT NOT NULL,
        started_at TEXT NOT NULL,
        ended_at TEXT,
        exit_code INTEGER,
        stop_reason TEXT,
        report TEXT NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        record TEXT
    )""",
    "CREATE INDEX runs_by_report ON runs (report)",
    """CREATE TABLE run_files (
        run INTEGER NOT NULL, file INTEGER NOT NULL, path TEXT NOT NULL,
        PRIMARY KEY (run, file)
    )""",
    """CREATE TABLE run_errors (
        run INTEGER NOT NULL, code INTEGER NOT NULL,
        error_key TEXT NOT NULL, error_message TEXT NOT NULL,
        PRIMARY KEY (run, code)
    )""",
    """CREATE TABLE run_rows (
        run INTEGER NOT NULL,
        position INTEGER NOT NULL,
        event_id TEXT NOT NULL,
        order_ticket_key TEXT NOT NULL,
        outcome TEXT NOT NULL,
        http_status INTEGER NOT NULL,
        error INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        file INTEGER NOT NULL,
        source_row INTEGER NOT NULL,
        finished_at REAL,
        PRIMARY KEY (run, position)
    )""",
    """CREATE TABLE latest (
        api INTEGER NOT NULL,
        identity TEXT NOT NULL,
        outcome TEXT NOT NULL,
        pending TEXT NOT NULL,
        run INTEGER NOT NULL,
        position INTEGER NOT NULL,
        finished_at REAL,
        PRIMARY KEY (api, identity)
    )""",
)

#: v2: who runs a run (a run whose process is gone is shown as "died", not "running"), and
#: pending keys found without reading every key the API ever saw.
_V2: Final = (
    "ALTER TABLE runs ADD COLUMN host TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE runs ADD COLUMN pid INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX latest_pending ON latest (api, pending) WHERE pending <> ''",
)

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (_V1, _V2)
SCHEMA_VERSION: Final = len(MIGRATIONS)
