"""Each report row's outcome, kept in numpy columns while the run goes on.

Positions are plan rows (:data:`batchjob.plan.Positions`). Code 0 means "no outcome yet", which
the final report never contains: before it is written, any row still without an outcome (a
bug) is reported ``not_attempted`` rather than dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from batchjob._logging import MAX_ERROR_KEY, MAX_REPORT_TEXT, Redactor
from batchjob._model import Outcome
from batchjob.plan import Positions

#: Ledger codes: 0 means "no outcome yet", which the final report never contains.
OUTCOME_CODES: tuple[Outcome | None, ...] = (None, *Outcome)
_CODE = {outcome: code for code, outcome in enumerate(OUTCOME_CODES) if outcome is not None}


class Ledger:
    """Each report row's outcome, as compact columns indexed by plan position.

    Every error text is cleaned once, as it first comes (``redactor``, see Redactor.clean): a
    safety net, so no secret, control character or endless text reaches a row whatever path
    a message took.
    """

    def __init__(self, size: int, redactor: Redactor | None = None) -> None:
        self._redactor = redactor or Redactor()
        self.outcome = np.zeros(size, dtype=np.int8)
        self.http_status = np.zeros(size, dtype=np.int16)
        self.error = np.zeros(size, dtype=np.int32)
        self.attempts = np.zeros(size, dtype=np.int32)
        # Attempts after which the server may have applied the key (no answer, a 5xx): a key
        # that ends other than undone says so, however its group was split afterwards.
        self.uncertain = np.zeros(size, dtype=np.int32)
        self.finished_at = np.full(size, np.nan, dtype=np.float64)
        self._errors: list[tuple[str, str]] = [("", "")]
        self._error_codes: dict[tuple[str, str], int] = {("", ""): 0}

    def __len__(self) -> int:
        return len(self.outcome)

    def set(
        self,
        positions: Positions,
        outcome: Outcome,
        *,
        http_status: int = 0,
        error_key: str = "",
        error_message: str = "",
        finished_at: float = math.nan,
    ) -> None:
        error = (error_key, error_message)
        code = self._error_codes.get(error)
        if code is None:
            code = self._error_codes[error] = len(self._errors)
            clean = self._redactor.clean
            self._errors.append(
                (clean(error_key, MAX_ERROR_KEY), clean(error_message, MAX_REPORT_TEXT))
            )
        self.outcome[positions] = _CODE[outcome]
        self.http_status[positions] = http_status
        self.error[positions] = code
        self.finished_at[positions] = finished_at

    def unset(self) -> Positions:
        return np.flatnonzero(self.outcome == 0).astype(np.int64)

    def count(self, outcome: Outcome, positions: Positions | None = None) -> int:
        codes = self.outcome if positions is None else self.outcome[positions]
        return int(np.count_nonzero(codes == _CODE[outcome]))

    def errors(self) -> Sequence[tuple[str, str]]:
        """Every (error_key, error_message) so far, by code; only ever grows. Not a copy."""
        return self._errors
