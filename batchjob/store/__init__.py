"""Store: every run, its report rows, and each identity's latest outcome, kept between runs.

- :mod:`._base`: :class:`Store` (what the run stage uses) and :class:`Backend` (what a
  database offers it).
- :mod:`._chunks`: :class:`ChunkStore`, the one Store, over any backend; :mod:`._columns`,
  the column chunks it keeps and how the latest outcome of each identity is worked out.
- :mod:`._schema`: tables and migrations (one list, versioned).
- :mod:`._sqlite`: the SQLite backend (the default: one file, several processes at once).
- :mod:`._postgres`: the PostgreSQL backend (``--state postgresql://...``: runs on several
  machines; needs ``batchjob[postgresql]``).
- :mod:`._location`: ``--state``: the default file, a path, a URL, or none;
  :func:`display_state` shows any of them without a password.

What the run stage and the CLI may use:
"""

from batchjob.store._base import (
    ROW_COLUMNS,
    SUCCESS_OUTCOMES,
    Backend,
    Done,
    RunEnd,
    RunInfo,
    RunStart,
    Store,
)
from batchjob.store._columns import IDS_SCHEMA, PLAN_IDS_SCHEMA, PLAN_SCHEMA, ROWS_SCHEMA
from batchjob.store._location import (
    DEFAULT,
    NONE,
    default_path,
    display_state,
    is_postgres,
    open_store,
    state_secrets,
    store_path,
)
from batchjob.store._schema import SCHEMA_VERSION

__all__ = [
    "DEFAULT",
    "IDS_SCHEMA",
    "NONE",
    "PLAN_IDS_SCHEMA",
    "PLAN_SCHEMA",
    "ROWS_SCHEMA",
    "ROW_COLUMNS",
    "SCHEMA_VERSION",
    "SUCCESS_OUTCOMES",
    "Backend",
    "Done",
    "RunEnd",
    "RunInfo",
    "RunStart",
    "Store",
    "default_path",
    "display_state",
    "is_postgres",
    "open_store",
    "state_secrets",
    "store_path",
]
