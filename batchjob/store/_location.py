"""Where the run store is: ``--state PATH|none``, env ``BATCHJOB_STATE``, config ``state``.

The default is one file per user, so every command (a run, ``runs``, ``revert``) finds the
same history without being told: ``$XDG_STATE_HOME/batchjob/state.sqlite3`` (``~/.local/state``
when unset), or ``%LOCALAPPDATA%\\batchjob\\state.sqlite3`` on Windows.
"""

from __future__ import annotations

import os
from pathlib import Path

from batchjob._errors import StoreError
from batchjob.store._base import Store

#: The settings' words for "the default file" and "no store".
DEFAULT = "default"
NONE = "none"


def default_path() -> Path:
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "batchjob" / "state.sqlite3"
    base = os.environ.get("XDG_STATE_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".local" / "state"
    return root / "batchjob" / "state.sqlite3"


def store_path(state: str) -> Path | None:
    """The SQLite file ``state`` names; None for no store."""
    if state.strip().lower() == NONE:
        return None
    if state == DEFAULT:
        return default_path()
    if "://" in state:
        scheme = state.split("://", 1)[0].lower()
        raise StoreError(
            f"state: {scheme}:// stores are not supported by this batchjob; "
            "give the path of an SQLite file, or none"
        )
    return Path(state).expanduser()


def open_store(state: str) -> Store | None:
    """The store ``state`` names, opened (created and migrated as needed); None for none."""
    path = store_path(state)
    if path is None:
        return None
    from batchjob.store._sqlite import open_sqlite

    return open_sqlite(path)
