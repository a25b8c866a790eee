"""Vocabulary shared by every stage: outcomes, the report's columns, input column names and
what an event id looks like. Light on purpose: the configuration imports it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class Outcome(StrEnum):
    """What happened to one (event, key) pair. Values are what the report says."""

    UNDONE = "undone"  # the API answered 204 for a request holding this key
    CHECKED_IN = "checked_in"  # --action check-in: the API answered 204 for it
    FAILED = "failed"  # the API refused it, or retries ran out
    INVALID = "invalid"  # the input row was unusable; nothing was sent
    NOT_ATTEMPTED = "not_attempted"  # the run stopped before sending it
    PLANNED = "planned"  # dry run
    SKIPPED = "skipped"  # hidden in the spreadsheet: not sent on purpose (not retried)


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


class Action(StrEnum):
    """What a run asks the API to do with each key (``--action``)."""

    UNDO = "undo"  # POST /events/{id}/undo_check_in/tickets
    CHECK_IN = "check-in"  # POST /events/{id}/check_in/tickets (the reverse)

    @property
    def success(self) -> Outcome:
        """The outcome of a key whose request the API answered 204."""
        return Outcome.CHECKED_IN if self is Action.CHECK_IN else Outcome.UNDONE


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@dataclass(frozen=True)
class ColumnAliases:
    """Header names accepted for each column; compared after :func:`normalise_header`."""

    event_id: tuple[str, ...] = ("event_id", "eventid")
    order_ticket_key: tuple[str, ...] = (
        "order_ticket_key",
        "ticket_key",
        "orderticketkey",
        "ticketkey",
    )


def canonical_event_id(value: str) -> str | None:
    """Return ``value`` as a lower-case canonical UUID, or None when it is not one."""
    stripped = value.strip()
    return stripped.lower() if _UUID.fullmatch(stripped) else None
