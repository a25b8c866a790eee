"""Record: every key's outcome, as the run goes (crash-safe) and at the end (atomic files).

- :mod:`._ledger`: :class:`Ledger`, each report row's outcome in numpy columns.
- :mod:`._outcomes`: the outcome rules (what a key that may have been applied says).
- :mod:`._rows`: :class:`RowWriter`, report rows as spreadsheet-safe CSV text.
- :mod:`._journal`: :class:`Journal`, ``<report>.journal``, appended as answers come.
- :mod:`._previous`, :mod:`._resume`: an earlier run's rows, for ``--resume``.
- :mod:`._final`: the report and failed-rows files, written atomically in input order.
- :mod:`._files`, :mod:`._lock`: paths checked before a run; one run per report.

What the run stage may use:
"""

from batchjob.record._files import (
    ReportPaths,
    check_paths,
    check_writable,
    remove_stale_temp_files,
)
from batchjob.record._final import write_bytes_atomically, write_final
from batchjob.record._journal import BlockRecorder, Journal, Recorder
from batchjob.record._ledger import OUTCOME_CODES, Ledger
from batchjob.record._lock import ReportLock
from batchjob.record._outcomes import mark_invalid, set_outcome
from batchjob.record._resume import resume_previous
from batchjob.record._rows import RowWriter

__all__ = [
    "OUTCOME_CODES",
    "BlockRecorder",
    "Journal",
    "Ledger",
    "Recorder",
    "ReportLock",
    "ReportPaths",
    "RowWriter",
    "check_paths",
    "check_writable",
    "mark_invalid",
    "remove_stale_temp_files",
    "resume_previous",
    "set_outcome",
    "write_bytes_atomically",
    "write_final",
]
