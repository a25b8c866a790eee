"""Store: every run, its report rows, and each identity's latest outcome, kept between runs.

- :mod:`._base`: the :class:`Store` interface every backend offers, and the blocks it takes.
- :mod:`._schema`: tables and migrations (one list, versioned).
- :mod:`._sqlite`: the SQLite backend (the default: one file, several processes at once).
- :mod:`._location`: ``--state``: the default file, a path, or none.

What the run stage and the CLI may use:
"""

from batchjob.store._base import (
    ROW_COLUMNS,
    SUCCESS_OUTCOMES,
    Done,
    LatestBlock,
    RowBlock,
    RunEnd,
    RunInfo,
    RunStart,
    Store,
)
from batchjob.store._location import DEFAULT, NONE, default_path, open_store, store_path
from batchjob.store._schema import SCHEMA_VERSION

__all__ = [
    "DEFAULT",
    "NONE",
    "ROW_COLUMNS",
    "SCHEMA_VERSION",
    "SUCCESS_OUTCOMES",
    "Done",
    "LatestBlock",
    "RowBlock",
    "RunEnd",
    "RunInfo",
    "RunStart",
    "Store",
    "default_path",
    "open_store",
    "store_path",
]
