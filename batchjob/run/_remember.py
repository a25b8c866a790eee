"""The store as the run's journal: every outcome written as it comes, in the store's rows.

It takes the journal's place when a run has a store (one record of progress, not two that
could disagree): the same ``append`` as :class:`batchjob.record.Journal`, written at most every
20 ms as one transaction, so a kill -9 loses at most the requests in flight and the answers
of the last 20 ms, which ``--resume`` sends again harmlessly.
"""

from __future__ import annotations

import math

import numpy as np

from batchjob._model import Outcome
from batchjob.plan import Plan, Positions
from batchjob.record import OUTCOME_CODES, BlockRecorder, Ledger
from batchjob.run._incremental import Identities, retry_worthy
from batchjob.store import LatestBlock, RowBlock, Store

_NAMES = np.asarray([o.value if o is not None else "" for o in OUTCOME_CODES], dtype=object)
_CODE = {o: i for i, o in enumerate(OUTCOME_CODES) if o is not None}
#: Outcomes that say what the API did (or did not get to do) with a key this run decided:
#: they become the identity's latest word. Skipped, invalid and planned rows do not.
_DECIDES = np.zeros(len(OUTCOME_CODES), dtype=np.bool_)
for _outcome in (Outcome.UNDONE, Outcome.CHECKED_IN, Outcome.FAILED, Outcome.NOT_ATTEMPTED):
    _DECIDES[_CODE[_outcome]] = True


class StoreJournal(BlockRecorder):
    """Appends a run's report rows to the store as outcomes come (see the module's note)."""

    def __init__(
        self,
        store: Store,
        run_id: str,
        plan: Plan,
        ledger: Ledger,
        identities: Identities,
        action: str,
        carried_over: Positions,
    ) -> None:
        super().__init__()
        self._store = store
        self._run_id = run_id
        self._plan = plan
        self._ledger = ledger
        self._ids = identities
        self._action = action
        rows = plan.rows
        self._event_codes = rows["event_id"].cat.codes.to_numpy()
        self._events = np.asarray([str(c) for c in rows["event_id"].cat.categories], dtype=object)
        self._file_codes = rows["source_file"].cat.codes.to_numpy().astype(np.int64)
        self._source_rows = rows["source_row"].to_numpy()
        # Rows a --resume carried from the run it continues: that run's word stands.
        self._carried = np.zeros(len(rows), dtype=np.bool_)
        self._carried[carried_over] = True
        self._errors_sent = 0
        self.path = store.location

    @staticmethod
    def files(plan: Plan) -> list[str]:
        return [str(c) for c in plan.rows["source_file"].cat.categories]

    def _write(self, positions: Positions, keys: list[str] | None) -> None:
        del keys  # taken from the plan: a block is written in one go either way
        rows, latest = self._blocks(positions)
        self._store.record(self._run_id, rows, latest)

    def _blocks(self, positions: Positions) -> tuple[RowBlock, LatestBlock]:
        ledger = self._ledger
        errors = ledger.errors()
        new_errors = [
            (code, key, message)
            for code, (key, message) in enumerate(errors[self._errors_sent :], self._errors_sent)
        ]
        self._errors_sent = len(errors)
        outcome = ledger.outcome[positions]
        finished = ledger.finished_at[positions]
        times: list[float | None] = [None if math.isnan(t) else t for t in finished.tolist()]
        rows = RowBlock(
            position=positions.tolist(),
            event_id=self._events[self._event_codes[positions]].tolist(),
            order_ticket_key=self._plan.keys_at(positions),
            outcome=_NAMES[outcome].tolist(),
            http_status=ledger.http_status[positions].tolist(),
            error=ledger.error[positions].tolist(),
            attempts=ledger.attempts[positions].tolist(),
            file=self._file_codes[positions].tolist(),
            source_row=self._source_rows[positions].tolist(),
            finished_at=times,
            errors=new_errors,
        )
        decided = positions[_DECIDES[outcome] & ~self._carried[positions]]
        texts, owners = self._ids.of(decided)
        owner_outcome = ledger.outcome[owners]
        status = ledger.http_status[owners]
        unfinished = (owner_outcome == _CODE[Outcome.NOT_ATTEMPTED]) | (
            (owner_outcome == _CODE[Outcome.FAILED]) & retry_worthy(status)
        )
        owner_times = ledger.finished_at[owners]
        latest = LatestBlock(
            identity=texts.to_pylist(),
            outcome=_NAMES[owner_outcome].tolist(),
            pending=np.where(unfinished, self._action, "").tolist(),
            position=owners.tolist(),
            finished_at=[None if math.isnan(t) else t for t in owner_times.tolist()],
            sent=((ledger.attempts[owners] > 0) | (ledger.uncertain[owners] > 0)).tolist(),
        )
        return rows, latest
