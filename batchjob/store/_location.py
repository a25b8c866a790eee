"""Where the run store is: ``--state PATH|URL|none``, env ``BATCHJOB_STATE``, config ``state``.

The default is one file per user, so every command (a run, ``runs``, ``revert``) finds the
same history without being told: ``$XDG_STATE_HOME/batchjob/state.sqlite3`` (``~/.local/state``
when unset), or ``%LOCALAPPDATA%\\batchjob\\state.sqlite3`` on Windows. A
``postgresql://`` (or ``postgres://``) URL names a database on a PostgreSQL server instead,
for runs on several machines; messages show it with :func:`display_state` (no password).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import quote, quote_plus

from batchjob._errors import StoreError
from batchjob.store._base import Store

#: The settings' words for "the default file" and "no store".
DEFAULT = "default"
NONE = "none"
#: URL schemes of a PostgreSQL store (libpq reads both).
POSTGRES_SCHEMES = ("postgresql", "postgres")
_HIDDEN = "(not shown)"
#: ``password=...`` in a URL's query (libpq reads it there too).
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def is_postgres(state: str) -> bool:
    """Whether ``state`` names a PostgreSQL store (a ``postgresql://`` URL)."""
    return _scheme(state) in POSTGRES_SCHEMES


def display_state(state: str) -> str:
    """``state`` fit for a message, a log or a run's recorded settings: a URL without its
    password (``postgresql://user:(not shown)@host:5432/db``); a path or a word as it is."""
    if _scheme(state) is None:
        return state
    scheme, rest = state.split("://", 1)
    # The user info ends at the last "@" before the path or query: a password is hidden
    # even when it holds an "@" or ":" a URL should have escaped.
    authority_end = len(rest)
    for mark in "?#":
        found = rest.find(mark)
        if found != -1:
            authority_end = min(authority_end, found)
    at = rest.rfind("@", 0, authority_end)
    if at != -1:
        user, colon, _ = rest[:at].partition(":")
        rest = f"{user}:{_HIDDEN}@{rest[at + 1 :]}" if colon else rest
    rest = _QUERY_PASSWORD.sub(lambda found: found.group(1) + _HIDDEN, rest)
    shown = f"{scheme}://{rest}"
    for secret in state_secrets(state):  # what libpq would read, however the URL spells it
        for form in {secret, quote(secret, safe=""), quote_plus(secret), quote(secret)}:
            shown = shown.replace(form, _HIDDEN)
    return shown


def state_secrets(state: str) -> list[str]:
    """The passwords a state URL holds, as libpq reads them (for the log's redactor too)."""
    if _scheme(state) is None:
        return []
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(state)
        found = [parts.password or "", *parse_qs(parts.query).get("password", [])]
        return [s for s in found if s]
    try:
        params = conninfo_to_dict(state.strip())
    except Exception:
        return []
    return [str(params[k]) for k in ("password", "sslpassword") if params.get(k)]


def _scheme(state: str) -> str | None:
    """The scheme of a URL ``state`` (lower case), or None for a path or a word."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", state.strip())
    return match.group(1).lower() if match else None


def default_path() -> Path:
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "batchjob" / "state.sqlite3"
    base = os.environ.get("XDG_STATE_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".local" / "state"
    return root / "batchjob" / "state.sqlite3"


def store_path(state: str) -> Path | None:
    """The SQLite file ``state`` names; None for no store, or a PostgreSQL URL."""
    if state.strip().lower() == NONE or is_postgres(state):
        return None
    if state == DEFAULT:
        return default_path()
    if "://" in state:
        scheme = state.split("://", 1)[0].lower()
        raise StoreError(
            f"state: {scheme}:// stores are not supported by this batchjob; "
            "give a postgresql:// URL, the path of an SQLite file, or none"
        )
    return Path(state).expanduser()


def open_store(state: str) -> Store | None:
    """The store ``state`` names, opened (created and migrated as needed); None for none."""
    if is_postgres(state):
        from batchjob.store._postgres import open_postgres

        return open_postgres(state.strip())
    path = store_path(state)
    if path is None:
        return None
    from batchjob.store._sqlite import open_sqlite

    return open_sqlite(path)
