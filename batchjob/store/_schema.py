"""The store's tables, and the migrations that bring an older store up to date.

One list of steps, plain SQL that SQLite and PostgreSQL both read (a backend adapts the few
types that differ): step ``n`` takes a store from schema version ``n`` to ``n + 1``. A store
records its version in ``meta``; a store newer than this batchjob is refused (its tables may
mean something this version does not know). docs/store.md describes every table.
"""

from __future__ import annotations

import re
from typing import Final

#: Runs are rows; what a run read and decided are column chunks (Arrow IPC streams, see
#: _columns.py): appending a block of a million outcomes is one insert, not a million.
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
    """CREATE TABLE chunks (
        run INTEGER NOT NULL,
        number INTEGER NOT NULL,
        kind TEXT NOT NULL,
        folded INTEGER NOT NULL DEFAULT 0,
        data BLOB NOT NULL,
        PRIMARY KEY (run, number)
    )""",
    """CREATE TABLE folds (
        api INTEGER PRIMARY KEY,
        generation INTEGER NOT NULL,
        data BLOB NOT NULL
    )""",
)

#: v2: who runs a run (a run whose process is gone is shown as "died", not "running"); the
#: identity chunks not yet folded found without reading every chunk; and what runs on one API
#: key share: one lease (the run that may send) and the requests spent each UTC day.
_V2: Final = (
    "ALTER TABLE runs ADD COLUMN host TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE runs ADD COLUMN pid INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX chunks_to_fold ON chunks (kind, folded)",
    """CREATE TABLE leases (
        name TEXT PRIMARY KEY, holder TEXT NOT NULL, until REAL NOT NULL
    )""",
    """CREATE TABLE budgets (
        name TEXT NOT NULL, day TEXT NOT NULL, spent INTEGER NOT NULL,
        PRIMARY KEY (name, day)
    )""",
)

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (_V1, _V2)
SCHEMA_VERSION: Final = len(MIGRATIONS)


#: SQLite's REAL is 8 bytes; PostgreSQL's is 4 (an epoch second would lose its minutes), and
#: PostgreSQL calls a byte string BYTEA.
_PG_TYPES: Final = (
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
)


def postgres_statement(statement: str) -> str:
    """``statement`` of :data:`MIGRATIONS` as PostgreSQL reads it: the same tables and
    columns, with PostgreSQL's name for each type where SQLite's means something else."""
    for pattern, replacement in _PG_TYPES:
        statement = pattern.sub(replacement, statement)
    return statement
