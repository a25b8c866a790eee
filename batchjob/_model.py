"""Vocabulary shared by every stage: outcomes and the report's columns."""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """What happened to one (event, key) pair. Values are what the report says."""

    UNDONE = "undone"  # the API answered 204 for a request holding this key
    FAILED = "failed"  # the API refused it, or retries ran out
    INVALID = "invalid"  # the input row was unusable; nothing was sent
    NOT_ATTEMPTED = "not_attempted"  # the run stopped before sending it
    PLANNED = "planned"  # dry run


#: The report's columns, in order. Also the failed-rows file's, so it is valid input.
REPORT_COLUMNS: tuple[str, ...] = (
    "event_id",
    "order_ticket_key",
    "outcome",
    "http_status",
    "error_key",
    "error_message",
    "attempts",
    "source_file",
    "source_row",
    "finished_at",
)

#: Outcomes that go to the failed-rows file: the ones a rerun can still fix.
RETRYABLE_OUTCOMES: frozenset[Outcome] = frozenset({Outcome.FAILED, Outcome.NOT_ATTEMPTED})
