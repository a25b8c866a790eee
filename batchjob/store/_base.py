"""What every store backend offers: the small interface the run stage and the CLI use.

A backend keeps runs (one row each), every run's report rows, and each identity's latest
outcome per API. The run stage hands it plain columns (lists), never plan or ledger objects:
a second backend needs to know SQL, not the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd

from batchjob._model import REPORT_COLUMNS

#: Outcomes after which an identity is done: never sent again unless --again.
SUCCESS_OUTCOMES: frozenset[str] = frozenset({"undone", "checked_in"})


@dataclass(frozen=True)
class RunStart:
    run_id: str
    base_url: str
    action: str  # "undo" or "check-in"
    started_at: str  # ISO 8601 UTC
    report: str  # absolute path
    files: Sequence[str]  # source files, by the code run rows use
    host: str = ""
    pid: int = 0


@dataclass(frozen=True)
class RunEnd:
    ended_at: str
    exit_code: int
    stop_reason: str
    requests: int
    record: dict[str, Any]  # the --summary-json record


@dataclass
class RowBlock:
    """Report rows of one run, as columns of equal length."""

    position: list[int]
    event_id: list[str]
    order_ticket_key: list[str]
    outcome: list[str]
    http_status: list[int]
    error: list[int]  # code in the run's errors
    attempts: list[int]
    file: list[int]  # index in RunStart.files
    source_row: list[int]
    finished_at: list[float | None]
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # new (code, key, message)


@dataclass
class LatestBlock:
    """Identities whose latest outcome this run decides, as columns of equal length.

    ``pending`` is the action a later ``--pending`` run of which should send it, or "".
    ``sent`` is False for an identity the run never sent: it does not replace an earlier
    success (a stopped ``--again`` run must not make done work look pending).
    """

    identity: list[str]
    outcome: list[str]
    pending: list[str]
    position: list[int]
    finished_at: list[float | None]
    sent: list[bool]


@dataclass(frozen=True)
class Done:
    """Which of the identities asked about are done: their indexes in the question, and for
    each the run that did it and when (epoch seconds)."""

    index: npt.NDArray[np.int64]
    run_id: list[str]
    finished_at: npt.NDArray[np.float64]


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    base_url: str
    action: str
    started_at: str
    ended_at: str | None
    exit_code: int | None
    stop_reason: str | None
    report: str
    requests: int
    record: dict[str, Any] | None
    host: str
    pid: int
    state: str  # "finished", "running", or "died" (its process is gone)


#: Columns of the frames ``rows`` and ``pending`` return: a run's report rows as stored.
ROW_COLUMNS: tuple[str, ...] = ("position", *REPORT_COLUMNS)  # finished_at: epoch seconds


class Store(Protocol):
    """A run store. Every method raises :class:`~batchjob.StoreError` when the store fails."""

    location: str  # for messages: a path, or a URL without its password

    def close(self) -> None: ...

    # A run, as it goes.
    def begin_run(self, start: RunStart) -> None: ...
    def record(self, run_id: str, rows: RowBlock, latest: LatestBlock) -> None: ...
    def end_run(self, run_id: str, end: RunEnd) -> None: ...

    # What a run needs before it sends.
    def done(self, base_url: str, outcome: str, identities: Sequence[str]) -> Done: ...
    def pending(self, base_url: str, action: str) -> pd.DataFrame: ...
    def last_run_for_report(self, report: str) -> RunInfo | None: ...

    # History.
    def runs(self, limit: int) -> list[RunInfo]: ...
    def run(self, run_id: str) -> RunInfo | None: ...
    def rows(self, run_id: str) -> pd.DataFrame: ...
    def sent_after(self, run_id: str, base_url: str) -> set[tuple[str, str]]: ...
    def revertible(self, run_id: str) -> pd.DataFrame: ...
    def outcome_counts(self, run_id: str) -> list[tuple[str, str, int]]: ...
