"""The store as the run's journal: every outcome recorded as it comes, off the event loop.

It takes the journal's place when a run has a store (one record of progress, not two that
could disagree). Blocks are cut as the journal's are (at most every 20 ms, see
:class:`~batchjob.record.BlockRecorder`), on the loop, as column snapshots; one writer thread
turns them into chunks and writes them in order, so a slow or remote database never stalls the
requests. A kill -9 loses at most the requests in flight and the blocks not yet written, which
``--resume`` sends again harmlessly (undo is idempotent).

When the store fails (a dropped connection, a locked or full disk), the blocks wait in memory
and the writer tries again with backoff; if the store stays down for ``outage_limit`` seconds,
``failed`` is set and the run stops (exit 3). The ledger keeps every outcome either way: the
report is written from it.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Any

import backoff
import numpy as np
import pyarrow as pa

from batchjob._errors import StoreError
from batchjob._model import Outcome
from batchjob.plan import Plan, Positions
from batchjob.record import OUTCOME_CODES, BlockRecorder, Ledger
from batchjob.run._incremental import Identities, retry_worthy
from batchjob.store import IDS_SCHEMA, PLAN_IDS_SCHEMA, PLAN_SCHEMA, ROWS_SCHEMA, Store

_NAMES = pa.array([o.value if o is not None else "" for o in OUTCOME_CODES], pa.string())
_CODE = {o: i for i, o in enumerate(OUTCOME_CODES) if o is not None}
#: Outcomes that say what the API did (or did not get to do) with a key this run decided:
#: they become the identity's latest word. Skipped, invalid and planned rows do not.
_DECIDES = np.zeros(len(OUTCOME_CODES), dtype=np.bool_)
for _outcome in (Outcome.UNDONE, Outcome.CHECKED_IN, Outcome.FAILED, Outcome.NOT_ATTEMPTED):
    _DECIDES[_CODE[_outcome]] = True


@dataclass
class _Block:
    rows: pa.Table
    ids: pa.Table
    errors: list[tuple[int, str, str]]


class StoreJournal(BlockRecorder):
    """Records a run's report rows and identities in the store (see the module's note)."""

    #: Seconds the store may fail, block after block, before the run stops (exit 3).
    outage_limit = 60.0

    def __init__(
        self,
        store: Store,
        run_id: str,
        plan: Plan,
        ledger: Ledger,
        identities: Identities,
        action: str,
        *,
        log: Any = None,
    ) -> None:
        super().__init__()
        self._store = store
        self._run_id = run_id
        self._plan = plan
        self._ledger = ledger
        self._ids = identities
        self._action = action
        self._log = log
        self._errors_sent = 0
        self.path = store.location
        self._queue: collections.deque[_Block | None] = collections.deque()
        self._ready = threading.Condition()
        self._writer = threading.Thread(
            target=self._write_all, name="batchjob-store-writer", daemon=True
        )
        self._writer.start()
        self._plan_recorded = False

    @staticmethod
    def files(plan: Plan) -> list[str]:
        return [str(c) for c in plan.rows["source_file"].cat.categories]

    def _write(self, positions: Positions, keys: list[str] | None) -> None:
        del keys  # taken from the plan in the writer thread
        self._put(self._snapshot(positions))

    def _closed(self) -> None:
        self._put(None)
        # Bounded: a store that hangs (not fails) must not hold the run's end forever.
        self._writer.join(timeout=self.outage_limit + 30)
        if self._writer.is_alive() and self.failed is None:
            self.failed = StoreError(
                f"{self.path}: the run store did not take the last outcomes in time"
            )

    def _put(self, block: _Block | None) -> None:
        with self._ready:
            self._queue.append(block)
            self._ready.notify()

    # --- on the loop: a block's columns, copied ------------------------------------------------

    def _snapshot(self, positions: Positions) -> _Block:
        ledger = self._ledger
        errors = ledger.errors()
        new_errors = [
            (code, key, message)
            for code, (key, message) in enumerate(errors[self._errors_sent :], self._errors_sent)
        ]
        self._errors_sent = len(errors)
        outcome = ledger.outcome[positions]
        rows = pa.table(
            {
                "position": pa.array(positions, pa.int64()),
                "outcome": _NAMES.take(pa.array(outcome)),
                "http_status": pa.array(ledger.http_status[positions].astype(np.int32)),
                "error": pa.array(ledger.error[positions].astype(np.int32)),
                "attempts": pa.array(ledger.attempts[positions].astype(np.int32)),
                "finished_at": pa.array(ledger.finished_at[positions], pa.float64()),
            },
            schema=ROWS_SCHEMA,
        )
        # Rows a --resume carried over are this run's too: the run that reports a key undone
        # is the one a revert finds it in.
        decided = positions[_DECIDES[outcome]]
        texts, owners = self._ids.of(decided)
        owner_outcome = ledger.outcome[owners]
        unfinished = (owner_outcome == _CODE[Outcome.NOT_ATTEMPTED]) | (
            (owner_outcome == _CODE[Outcome.FAILED]) & retry_worthy(ledger.http_status[owners])
        )
        ids = pa.table(
            {
                "identity": texts.cast(pa.string()),
                "position": pa.array(owners, pa.int64()),
                "outcome": _NAMES.take(pa.array(owner_outcome)),
                "pending": pa.array(np.where(unfinished, self._action, ""), pa.string()),
                "sent": pa.array((ledger.attempts[owners] > 0) | (ledger.uncertain[owners] > 0)),
                "finished_at": pa.array(ledger.finished_at[owners], pa.float64()),
            },
            schema=IDS_SCHEMA,
        )
        return _Block(rows, ids, new_errors)

    # --- in the writer thread ------------------------------------------------------------------

    def _write_all(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                block = self._queue[0]
            if block is None:
                return
            if self.failed is None:
                try:
                    self._record_plan()
                    self._retrying(lambda: self._record(block))  # noqa: B023 (called at once)
                except Exception as exc:  # the loop reads it: the run stops (exit 3)
                    self.failed = exc
            with self._ready:
                self._queue.popleft()

    def _record(self, block: _Block) -> None:
        self._store.record(self._run_id, block.rows, block.ids, block.errors)

    def _record_plan(self) -> None:
        """The run's plan, so that it can be resumed without its input files: written by the
        writer before the first outcomes, not on the loop before the first request."""
        if self._plan_recorded:
            return
        plan, identities = plan_tables(self._plan, self._ids)
        self._retrying(lambda: self._store.add_plan(self._run_id, plan, identities))
        self._plan_recorded = True

    def _retrying(self, write: Any) -> None:
        """``write()``, again with backoff while the store fails, for ``outage_limit`` seconds."""
        started = time.monotonic()

        def note(details: Any) -> None:
            if self._log is not None:
                self._log.warning(
                    "store.retrying",
                    error=str(details["exception"]),
                    down_for=round(time.monotonic() - started, 1),
                )

        backoff.on_exception(
            backoff.expo,
            StoreError,
            factor=0.2,  # 0.2 s, 0.4 s, ... : a dropped connection is back at once
            max_time=self.outage_limit,
            max_value=5.0,
            on_backoff=note,
            logger=None,
        )(write)()


def plan_tables(plan: Plan, ids: Identities) -> tuple[pa.Table, pa.Table | None]:
    """The plan as the store keeps it; its identities too when they are not event and key."""
    rows = plan.rows
    size = len(rows)
    events = pa.array([str(c) for c in rows["event_id"].cat.categories], pa.string())
    table = pa.table(
        {
            "position": pa.array(np.arange(size, dtype=np.int64)),
            "event_id": events.take(pa.array(rows["event_id"].cat.codes.to_numpy())),
            "order_ticket_key": plan.keys.cast(pa.string()),
            "file": pa.array(rows["source_file"].cat.codes.to_numpy().astype(np.int32)),
            "source_row": pa.array(rows["source_row"].to_numpy().astype(np.int64)),
        },
        schema=PLAN_SCHEMA,
    )
    if ids.default:
        return table, None
    identities = pa.table(
        {"identity": ids.texts.cast(pa.string()), "position": pa.array(ids.positions)},
        schema=PLAN_IDS_SCHEMA,
    )
    return table, identities
