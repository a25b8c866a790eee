"""The outcome rules: what a key's row says, in one place.

A key that was sent without a usable answer (no answer, a 5xx, an unexpected status, cut
short) may have been applied by the server: unless it ends ``undone``, its message says so,
since a rerun is then harmless but not needed. A key the server refused (a 4xx) was not
applied and says nothing of the kind.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from batchjob._model import Outcome
from batchjob.plan import Plan, Positions
from batchjob.read import HIDDEN_PROBLEM
from batchjob.record._ledger import Ledger


def _now() -> float:
    return time.time()


def set_outcome(
    ledger: Ledger, positions: Positions, outcome: Outcome, *, refused: bool = False, **fields: Any
) -> None:
    """Record ``outcome``; a key not undone that was ever sent without a usable answer says
    so, since the server may have applied it (a rerun is harmless, not needed). ``refused``: the
    server itself refused these keys (a 4xx), so it applied nothing and nothing is said."""
    ledger.set(positions, outcome, finished_at=_now(), **fields)
    if refused or outcome in (Outcome.UNDONE, Outcome.CHECKED_IN):
        return
    counts = ledger.uncertain[positions]
    if not counts.any():
        return
    message = fields.pop("error_message", "")
    for count in np.unique(counts[counts > 0]).tolist():
        ledger.set(
            positions[counts == count],
            outcome,
            finished_at=_now(),
            error_message=(message + _maybe_applied(count)).removeprefix("; "),
            **fields,
        )


def _maybe_applied(unanswered_attempts: int) -> str:
    """Say so when a key was sent without a usable answer: the server may have applied it."""
    if unanswered_attempts <= 0:
        return ""
    times = "once" if unanswered_attempts == 1 else f"{unanswered_attempts} times"
    return (
        f"; it was sent {times} without a usable answer, so the server may have applied it "
        "(a rerun is harmless)"
    )


def mark_invalid(plan: Plan, ledger: Ledger) -> None:
    """Invalid rows with their problem, and rows hidden in a spreadsheet as skipped."""
    skipped = plan.skipped
    if len(skipped):
        ledger.set(skipped, Outcome.SKIPPED, error_key="row_hidden", error_message=HIDDEN_PROBLEM)
    invalid = plan.invalid
    if not len(invalid):
        return
    problems = plan.rows["problem"].to_numpy()[invalid]
    for problem in dict.fromkeys(problems):
        positions = invalid[problems == problem]
        ledger.set(positions, Outcome.INVALID, error_key="invalid_input", error_message=problem)
