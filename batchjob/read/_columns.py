"""Finding the key and event columns by header name, and the rules for an event column."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from batchjob._errors import InputError
from batchjob._model import ColumnAliases
from batchjob.read._shared import normalise_header


@dataclass(frozen=True)
class _Columns:
    """Where the columns we use are in one header, and how they are spelled there."""

    names: tuple[str, ...]
    key: int
    event: int | None

    @property
    def key_name(self) -> str:
        return self.names[self.key]

    @property
    def event_name(self) -> str | None:
        return None if self.event is None else self.names[self.event]


class _Matcher:
    def __init__(self, aliases: ColumnAliases) -> None:
        self._event = frozenset(normalise_header(a) for a in aliases.event_id)
        self._key = frozenset(normalise_header(a) for a in aliases.order_ticket_key)
        self.key_aliases = aliases.order_ticket_key
        self.event_aliases = aliases.event_id

    def find(self, where: str, names: Sequence[str]) -> _Columns | None:
        """Locate the columns in a header; None when it has no key column."""
        events = [i for i, name in enumerate(names) if normalise_header(name) in self._event]
        keys = [i for i, name in enumerate(names) if normalise_header(name) in self._key]
        both = sorted(set(events) & set(keys))
        if both:
            raise InputError(
                f"{where}: column {_quote_names(names, both)} matches both the event id and the "
                "order ticket key names; rename it or fix the configured column aliases"
            )
        for kind, found in (("order ticket key", keys), ("event id", events)):
            if len(found) > 1:
                raise InputError(
                    f"{where}: ambiguous {kind}: columns {_quote_names(names, found)} all "
                    "match; keep one of them or rename the others"
                )
        if not keys:
            return None
        return _Columns(
            names=tuple(names),
            key=keys[0],
            event=events[0] if events else None,
        )

    def no_event_hint(self) -> str:
        return (
            f"Expected a column named one of: {', '.join(self.event_aliases)} "
            "(case, spaces, '_' and '-' are ignored)"
        )

    def no_key_hint(self) -> str:
        return (
            f"Expected a column named one of: {', '.join(self.key_aliases)} "
            "(case, spaces, '_' and '-' are ignored)"
        )


def _check_event_source(
    where: str, columns: _Columns, default: str | None, matcher: _Matcher
) -> None:
    """Every row's event comes from the file's event column or from ``--event-id``: exactly one.

    Both are refused rather than one silently winning: a key sent to the wrong event is a
    request spent for nothing, and the run cannot tell which of the two the user meant.
    """
    if columns.event is None and default is None:
        raise InputError(
            f"{where}: no event id column and no --event-id; its columns are: "
            f"{_list_names(columns.names)}. {matcher.no_event_hint()}, or give --event-id UUID"
        )
    if columns.event is not None and default is not None:
        raise InputError(
            f"{where}: has an event id column ('{columns.event_name}') and --event-id was "
            "given too; --event-id is only for files without one: drop it, or read this file "
            "in a separate run"
        )


def _quote_names(names: Sequence[str], indices: Iterable[int]) -> str:
    return ", ".join(f"'{names[i]}'" for i in indices)


def _list_names(names: Sequence[str]) -> str:
    return ", ".join(name or "(unnamed)" for name in names) or "(none)"


#: A header listed in a message: at most this many names, each cut to _NAME_CHARS.
_LISTED_NAMES = 30
_NAME_CHARS = 60


def _clipped_names(names: Sequence[str]) -> str:
    """:func:`_list_names` kept short: a header can be thousands of columns, or one huge cell."""
    shown = [
        name if len(name) <= _NAME_CHARS else name[: _NAME_CHARS - 1] + "…"
        for name in names[:_LISTED_NAMES]
    ]
    more = len(names) - len(shown)
    return _list_names(shown) + (f", ... ({more} more)" if more > 0 else "")
