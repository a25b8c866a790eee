"""The store's two interfaces: :class:`Store`, what the run stage and the CLI use, and
:class:`Backend`, the few primitives a database offers it (docs/store.md says why).

A run's plan, report rows and identities are kept as column chunks (Arrow IPC streams), added
as the run goes; a backend stores runs, chunks and a per-API folded view of the latest
outcomes, and knows SQL, not the pipeline. :class:`batchjob.store._chunks.ChunkStore` is the
one implementation of :class:`Store`, over any backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa

from batchjob._model import REPORT_COLUMNS, Action

#: Each action's success, by the action's name: after it an identity is done for that action
#: (never sent again unless --again).
SUCCESS_OF: dict[str, str] = {action.value: action.success.value for action in Action}
SUCCESS_OUTCOMES: frozenset[str] = frozenset(SUCCESS_OF.values())


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

    # A run, as it goes: its plan first (so it can resume anywhere), then blocks of outcomes
    # (report rows, and the identities they decide), then its end and its record.
    def begin_run(self, start: RunStart) -> None: ...
    def add_plan(self, run_id: str, plan: pa.Table, identities: pa.Table | None) -> None: ...
    def record(
        self, run_id: str, rows: pa.Table, ids: pa.Table, errors: Sequence[tuple[int, str, str]]
    ) -> None: ...
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
    def prune(self, before: str) -> list[str]: ...
    def plan_identities(self, run_id: str) -> pd.DataFrame: ...
    def outcome_counts(self, run_id: str) -> list[tuple[str, str, int]]: ...

    # What runs on one API key share (see Backend).
    def lease(self, name: str, holder: str, seconds: float, dead: str = "") -> tuple[bool, str]: ...
    def release(self, name: str, holder: str) -> None: ...
    def spend(self, name: str, day: str, want: int, limit: int) -> int: ...
    def unspend(self, name: str, day: str, count: int) -> None: ...


@dataclass(frozen=True)
class RawRun:
    """A run as a backend keeps it (the ``runs`` table's row, the API's URL joined)."""

    seq: int
    run_id: str
    base_url: str
    action: str
    started_at: str
    ended_at: str | None
    exit_code: int | None
    stop_reason: str | None
    report: str
    requests: int
    record: str | None  # JSON text
    host: str
    pid: int


@dataclass(frozen=True)
class Chunk:
    seq: int  # the run's
    number: int  # the chunk's, in the order the run added it
    kind: str
    data: bytes


class Backend(Protocol):
    """What a database offers :class:`ChunkStore`: short transactions over a few tables.

    Every method raises :class:`~batchjob.StoreError` when the database fails; a failed
    write leaves nothing half done (one transaction per call).
    """

    location: str

    def close(self) -> None: ...
    def begin_run(self, start: RunStart) -> int: ...  # the run's seq: increasing with starts
    def end_run(self, seq: int, end: RunEnd) -> None: ...
    def add_chunks(
        self,
        seq: int,
        chunks: Sequence[tuple[str, bytes]],
        errors: Sequence[tuple[int, str, str]] = (),
    ) -> None: ...  # (kind, data) each, numbered on from the run's last: one transaction
    def find_runs(
        self,
        *,
        seq: int | None = None,
        run_id: str | None = None,
        prefix: str | None = None,
        report: str | None = None,
        limit: int = 1,
    ) -> list[RawRun]: ...  # newest first
    def later_runs(self, seq: int) -> list[int]: ...  # same API, started after
    def drop_chunks(self, seq: int) -> int: ...  # plan and rows; identities once folded
    def run_chunks(self, seq: int, kinds: Sequence[str]) -> list[Chunk]: ...
    def run_files(self, seq: int) -> list[str]: ...
    def run_errors(self, seq: int) -> list[tuple[int, str, str]]: ...
    # The latest outcome of every identity of an API: a folded base and the chunks since.
    def folded(self, base_url: str) -> tuple[int, bytes | None, list[Chunk]]: ...
    def fold(
        self, base_url: str, generation: int, data: bytes, chunks: Sequence[Chunk]
    ) -> bool: ...  # False: another process folded first (nothing written)

    # Runs on one API key: a lease lets one of them send at a time, and a daily count keeps
    # them together under the key's daily limit. Times are the database's clock.
    def lease(self, name: str, holder: str, seconds: float, dead: str = "") -> tuple[bool, str]:
        """Take or renew lease ``name`` for ``seconds``: (True, holder) if ``holder`` has it
        now, else (False, the run that does). ``dead``: a holder known to be dead, whose
        lease is taken at once."""
        ...

    def release(self, name: str, holder: str) -> None: ...
    def spend(self, name: str, day: str, want: int, limit: int) -> int:
        """Count up to ``want`` more requests against ``limit`` for ``day``: how many."""
        ...

    def unspend(self, name: str, day: str, count: int) -> None: ...
