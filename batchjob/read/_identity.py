"""Identity columns: more input columns whose values, with the event and key, name a row.

The config's ``[incremental] identity`` may name columns beyond the event and key (a scan
time, say), so that a new scan of a ticket is new work while the same row in a cumulative
export is not. Per row, their values as a person sees them are joined into one text, the
frame's ``identity`` column. Only read when asked for: without them no reader does any of this.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import Any, Final

import pandas as pd

from batchjob._errors import InputError
from batchjob.read._columns import _clipped_names
from batchjob.read._shared import normalise_header, pa, pa_compute

#: The frame's extra column, present only when identity columns are asked for.
IDENTITY_COLUMN: Final = "identity"
#: Joins a row's values (ASCII unit separator); one inside a value becomes a space.
IDENTITY_SEPARATOR: Final = "\x1f"
#: A value is cut to this many characters: it tells rows apart, it is never shown.
MAX_IDENTITY_CHARS: Final = 1000
# As for keys: the space, and the no-break space office suites and web pages leave.
_STRIPPED: Final = " \u00a0"
# Beyond this a float's repr is in exponent form; below it an integral one is shown as digits.
_DIGITS_LIMIT: Final = 1e16
_WHERE_NAMED: Final = "named in the config's [incremental] identity"


def check_identity_names(names: Sequence[str]) -> tuple[str, ...]:
    """The names as given; ``ValueError`` for one that is blank once folded: it would match
    every unnamed column."""
    if isinstance(names, str):  # a str is a Sequence[str] too: each letter would be a column
        raise TypeError("identity columns are a sequence of column names, not one string")
    for name in names:
        if not normalise_header(name):
            raise ValueError(f"identity column {name!r} is blank; name a column of the inputs")
    return tuple(names)


def find_identity(where: str, header: Sequence[str], wanted: Sequence[str]) -> tuple[int, ...]:
    """Each wanted column's index in ``header``, matched as the key and event aliases are."""
    folded = [normalise_header(name) for name in header]
    found: list[int] = []
    missing: list[str] = []
    for name in wanted:
        matches = [at for at, cell in enumerate(folded) if cell == normalise_header(name)]
        if len(matches) > 1:
            shown = ", ".join(f"'{header[at]}'" for at in matches)
            raise InputError(
                f"{where}: ambiguous identity column '{name}' ({_WHERE_NAMED}): columns "
                f"{shown} all match; keep one of them or rename the others"
            )
        if matches:
            found.append(matches[0])
        else:
            missing.append(name)
    if missing:
        plural = "s" if len(missing) > 1 else ""
        raise InputError(
            f"{where}: no column{plural} {', '.join(repr(name) for name in missing)} "
            f"({_WHERE_NAMED}); its columns are: {_clipped_names(header)}. Add the column to "
            "the file or drop it from identity (case, spaces, '_' and '-' are ignored)"
        )
    return tuple(found)


def cell_text(value: Any) -> str:
    """A spreadsheet value (python-calamine's) as its sheet shows it, as near as a value tells."""
    if isinstance(value, str):
        text = value.strip(_STRIPPED)
    elif isinstance(value, bool):  # before int: a bool is one
        text = "TRUE" if value else "FALSE"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        # xls gives 5 where xlsx gives 5.0: both show 5.
        integral = math.isfinite(value) and value.is_integer() and abs(value) < _DIGITS_LIMIT
        text = str(int(value)) if integral else repr(value)
    elif isinstance(value, dt.datetime):  # before date: a datetime is one
        text = value.replace(tzinfo=None, microsecond=0).isoformat()
    elif isinstance(value, dt.date):
        text = value.isoformat()
    elif isinstance(value, dt.time):
        text = value.replace(tzinfo=None, microsecond=0).isoformat()
    elif isinstance(value, dt.timedelta):
        text = _duration(value)
    else:
        text = str(value)
    return text[:MAX_IDENTITY_CHARS].replace(IDENTITY_SEPARATOR, " ")


def _duration(value: dt.timedelta) -> str:
    """As Excel's ``[h]:mm:ss`` shows it: whole hours, however many days."""
    seconds = round(value.total_seconds())
    sign = "-" if seconds < 0 else ""
    hours, rest = divmod(abs(seconds), 3600)
    return f"{sign}{hours}:{rest // 60:02d}:{rest % 60:02d}"


def joined_texts(columns: Sequence[Sequence[str]], count: int) -> pd.Series:
    """Per row, the columns' texts (from :func:`cell_text`) joined."""
    if len(columns) == 1:
        rows = list(columns[0])
    else:
        rows = [IDENTITY_SEPARATOR.join(texts) for texts in zip(*columns, strict=True)]
    assert len(rows) == count
    return pd.Series(rows, dtype="str")


def joined_arrow(columns: Sequence[Any]) -> pd.Series:
    """Per row, CSV fields (Arrow string arrays) stripped, cut and joined, all in Arrow."""
    cleaned = []
    for column in columns:
        if pa.types.is_dictionary(column.type):
            column = column.cast(pa.large_string())  # the event column, named again
        column = pa_compute.utf8_trim(column, characters=_STRIPPED)
        column = pa_compute.utf8_slice_codeunits(column, 0, MAX_IDENTITY_CHARS)  # code points
        cleaned.append(pa_compute.replace_substring(column, IDENTITY_SEPARATOR, " "))
    rows = pa_compute.binary_join_element_wise(
        *cleaned, pa.scalar(IDENTITY_SEPARATOR, pa.large_string())
    )
    if isinstance(rows, pa.ChunkedArray):
        rows = rows.combine_chunks()
    return pd.Series(pd.array(rows, dtype="str"))


def as_arrow(values: pd.Series) -> Any:
    """A column of text (pandas) as an Arrow large string array."""
    chunked = getattr(values.array, "_pa_array", None)
    if chunked is not None:
        return chunked.cast(pa.large_string())
    return pa.array(values.tolist(), type=pa.large_string())
