"""One frame from every file's rows: keys cleaned, problems named, events coded.

Every row a person put in a file comes back exactly once, either usable or with a one-line
``problem`` naming the column as the file spells it, so a report can account for all of them.
Only truly blank rows are dropped, and they are counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from batchjob._cells import unescape_cell
from batchjob._model import canonical_event_id
from batchjob.read._columns import _Columns
from batchjob.read._findings import HIDDEN_PROBLEM, Findings
from batchjob.read._formats import CAUSE_TEXT, CURE, Cause
from batchjob.read._identity import IDENTITY_COLUMN
from batchjob.read._keybytes import KeyBytes
from batchjob.read._shared import _SHOWN_VALUE_LIMIT, FRAME_COLUMNS, MAX_KEY_CHARS, pa, pa_compute

_Codes = npt.NDArray[np.signedinteger[Any]]


@dataclass(frozen=True)
class ReadOptions:
    """How rows are judged, the same for every file."""

    default: str | None = None  # --event-id
    key_pattern: str | None = None  # RE2 syntax (linear time: no catastrophic backtracking)
    include_hidden_rows: bool = False
    identity: tuple[str, ...] = ()  # extra columns whose values name a row (see ._identity)


@dataclass(frozen=True)
class CellFacts:
    """What a workbook says about each row beyond its text (None: nothing to say)."""

    key_cause: npt.NDArray[np.int8] | None = None  # Cause per row
    event_cause: npt.NDArray[np.int8] | None = None
    hidden: npt.NDArray[np.bool_] | None = None
    # Which of the rows given (blank in the key and event columns) hold something elsewhere.
    content: Callable[[npt.NDArray[np.bool_]], npt.NDArray[np.bool_] | None] | None = None


NO_FACTS: Final = CellFacts()
NOTE_ROW_PROBLEM: Final = "row has content but no key and no event"


@dataclass(frozen=True)
class _Part:
    """One file or sheet, normalised, blank rows removed. Codes index the value lists."""

    source: str
    event_codes: _Codes
    event_values: list[str]
    key: pd.Series
    rows: npt.NDArray[np.int32]
    problem_codes: _Codes
    problem_values: list[str]
    blank_rows: int
    identity: pd.Series | None = None  # only when identity columns are asked for


def _normalise(
    *,
    source: str,
    columns: _Columns,
    event: pd.Series | None,
    key: pd.Series,
    first_row: int,
    overflow: npt.NDArray[np.bool_] | None,
    overflow_problem: str,
    options: ReadOptions,
    findings: Findings,
    facts: CellFacts = NO_FACTS,
    cp1252: bool = False,
    identity: pd.Series | None = None,
) -> _Part:
    """Strip keys, validate events and explain unusable rows; drop and count blank ones."""
    default = options.default
    count = len(key)
    key, key_codes, found = _clean_keys(key)
    key_empty = key_codes == _KEY_EMPTY
    key_cause = _text_causes(key, found, cp1252)
    if facts.key_cause is not None:
        key_cause = facts.key_cause if key_cause is None else np.maximum(facts.key_cause, key_cause)
    if overflow is not None and not overflow.any():
        overflow = None

    # Everything about events is decided once per distinct value, then spread by code.
    events = _EventTable(columns.event_name, default)
    codes: _Codes
    if event is None:
        codes = np.zeros(count, dtype=np.int8)
        events.add_missing_column()
    else:
        categorical = pd.Categorical(event)
        codes = categorical.codes
        for value in categorical.categories.tolist():
            events.add(str(value))

    blank: npt.NDArray[np.bool_] | None = None
    note_rows: npt.NDArray[np.bool_] | None = None
    if key_empty.any():
        blank = key_empty & np.asarray(events.empty, dtype=np.bool_)[codes]
        if overflow is not None:
            blank &= ~overflow
        if facts.event_cause is not None:
            blank &= facts.event_cause == 0
        content = facts.content(blank) if facts.content is not None and blank.any() else None
        if content is not None:
            note_rows = blank & content
            blank &= ~content
    event_codes = _spread(events.value_index, codes)
    problem_codes, problem_values = _problems(
        codes,
        events,
        key_codes,
        overflow,
        key_problems=_key_problem_texts(columns.key_name),
        overflow_problem=overflow_problem,
    )
    event_values = events.values
    rows = np.arange(first_row, first_row + count, dtype=np.int32)
    hidden: npt.NDArray[np.bool_] | None = None
    if facts.hidden is not None:
        hidden = facts.hidden if blank is None else facts.hidden & ~blank
    # A skipped row is told once, as hidden, whatever else is wrong with it.
    skipped = hidden if hidden is not None and not options.include_hidden_rows else None
    told = _Told(problem_codes, problem_values, rows, source, findings, skipped)
    if options.key_pattern is not None:
        told.set(
            _mismatch(key, options.key_pattern) & (key_codes == _KEY_OK),
            f"column '{columns.key_name}': does not match key_pattern {options.key_pattern!r}",
            "keys not matching key_pattern (invalid)",
        )
    for name, causes in ((columns.event_name, facts.event_cause), (columns.key_name, key_cause)):
        if causes is None or not causes.any():
            continue
        for cause in np.unique(causes[causes > 0]).tolist():
            text = CAUSE_TEXT[Cause(cause)]
            told.set(
                causes == cause,
                f"column '{name}': {text}; {CURE}",
                f"cells refused: {text}",
                CURE,
            )
    if note_rows is not None:
        told.set(note_rows, NOTE_ROW_PROBLEM, "rows with content but no key and no event (invalid)")
    if hidden is not None:
        what = "rows hidden or filtered out"
        if skipped is None:
            findings.add(f"{what} (sent: --include-hidden-rows)", source, rows[hidden])
        else:
            told.skip(
                HIDDEN_PROBLEM, f"{what} (skipped, not sent)", "--include-hidden-rows sends them"
            )
    problem_codes, problem_values = told.codes, told.values

    blank_rows = 0 if blank is None else int(blank.sum())
    if blank is not None and blank_rows:
        keep = ~blank
        key = key[keep].reset_index(drop=True)
        if identity is not None:
            identity = identity[keep].reset_index(drop=True)
        rows = rows[keep]
        event_codes, event_values = _compact(event_codes[keep], event_values)
        problem_codes, problem_values = _compact(problem_codes[keep], problem_values)
    return _Part(
        source=source,
        event_codes=event_codes,
        event_values=event_values,
        key=key,
        rows=rows,
        problem_codes=problem_codes,
        problem_values=problem_values,
        blank_rows=blank_rows,
        identity=identity,
    )


# Why a key is unusable, per row: the index into _key_problem_texts. Most significant first: a
# row with several problems shows the first.
_KEY_OK: Final = 0
_KEY_EMPTY: Final = 1
_KEY_TOO_LONG: Final = 2
_KEY_CONTROL: Final = 3
_KEY_INVISIBLE: Final = 4
_KEY_APOSTROPHE: Final = 5
_APOSTROPHE: Final = ord("'")
_CONTROL: Final = "[\x00-\x1f\x7f-\x9f]"
#: Only these are stripped from a key's ends: the space, and the no-break space that text copied
#: from a web page or an office suite ends with. Other whitespace is a control (tab, U+0085) or
#: invisible (U+2028): such a key is invalid, not silently changed.
_STRIPPED: Final = " \u00a0"
#: Characters that show as nothing, or as a plain space, but are not one (RE2 syntax): format
#: characters (Cf: zero width space, direction marks and overrides, byte order mark, soft
#: hyphen) and every separator but U+0020 (no-break and other spaces, line and paragraph
#: separators). A key holding one displays differently from what would be sent.
_INVISIBLE: Final = r"\p{Cf}|[^ \PZ]"


def _key_problem_texts(name: str) -> list[str]:
    return [
        "",
        f"column '{name}' is empty",
        f"column '{name}': the key is longer than {MAX_KEY_CHARS} characters",
        f"column '{name}': the key holds a control character (such as NUL, a tab or a line break)",
        f"column '{name}': the key holds an invisible character or an unusual space (such as a "
        "zero-width space, a direction mark, a line separator or a no-break space inside it), "
        "so it is not the key it shows",
        f"column '{name}': the key starts with an apostrophe, which spreadsheets take for a "
        "text marker and drop; remove it if it is not part of the key",
    ]


def _clean_keys(key: pd.Series) -> tuple[pd.Series, npt.NDArray[np.int8], KeyBytes | None]:
    """Keys stripped and unescaped, and each one's ``_KEY_*`` code.

    Stripping a million keys costs more than the checks that usually show it changes nothing;
    on the usual file (printable ASCII, none starting with an apostrophe) every check here is
    a reduction or two over the keys' bytes, no per-key work.
    """
    found = KeyBytes.of_series(key)
    if found is None or found.may_need_strip():
        # Not str.strip(): it also drops controls and Unicode separators (\x1f, \x85, U+2028),
        # silently changing a key that must be reported instead.
        key = key.str.strip(_STRIPPED)
        found = KeyBytes.of_series(key)
    marked = _starts_with_apostrophe(key, found)
    if marked.any():
        key = _unescape_keys(key, marked)
        found = KeyBytes.of_series(key)
        marked = _starts_with_apostrophe(key, found)
    codes = np.zeros(len(key), dtype=np.int8)
    # Later assignments win: least significant first.
    if marked.any():
        codes[marked] = _KEY_APOSTROPHE
    invisible = _with_invisible(key, found)
    if invisible is not None:
        codes[invisible] = _KEY_INVISIBLE
    if found is not None:
        codes[found.with_control()] = _KEY_CONTROL
        long = np.flatnonzero(found.lengths > MAX_KEY_CHARS)  # bytes >= characters
        if len(long):
            codes[long[found.char_lengths(long) > MAX_KEY_CHARS]] = _KEY_TOO_LONG
        codes[found.empty()] = _KEY_EMPTY
    else:
        codes[key.str.contains(_CONTROL, regex=True).to_numpy(dtype=np.bool_)] = _KEY_CONTROL
        codes[(key.str.len() > MAX_KEY_CHARS).to_numpy(dtype=np.bool_)] = _KEY_TOO_LONG
        codes[(key == "").to_numpy(dtype=np.bool_)] = _KEY_EMPTY
    return key, codes, found


# What an office suite leaves in text it wrote from a number or an error cell.
_SCIENTIFIC: Final = r"^[+-]?[0-9]+(\.[0-9]+)?[eE][+-][0-9]+$"
_ERROR: Final = r"^(#N/A|#DIV/0!|#VALUE!|#REF!|#NAME\?|#NUM!|#NULL!|#SPILL!|#CALC!|#GETTING_DATA)$"
# Both marks hold '#', '+' or '-', all below '0': keys of digits and letters need no pass.
_HIGHEST_MARK: Final = ord("-")


def _text_causes(
    key: pd.Series, found: KeyBytes | None, cp1252: bool
) -> npt.NDArray[np.int8] | None:
    """Keys whose text carries the marks of a spreadsheet's conversion; None for none."""
    marks = found is None or found.byte_range[0] <= _HIGHEST_MARK
    if not marks and not cp1252:
        return None
    values = _arrow(key)
    causes = np.zeros(len(key), dtype=np.int8)
    for pattern, cause in ((_SCIENTIFIC, Cause.SCIENTIFIC), (_ERROR, Cause.ERROR)):
        if not marks:
            break
        matched = pa_compute.match_substring_regex(values, pattern).fill_null(False)
        causes[matched.to_numpy(zero_copy_only=False).astype(np.bool_)] = cause
    if cp1252:
        marked = pa_compute.match_substring(values, "?").fill_null(False)
        causes[marked.to_numpy(zero_copy_only=False).astype(np.bool_)] = Cause.CP1252
    return causes if causes.any() else None


def _mismatch(key: pd.Series, pattern: str) -> npt.NDArray[np.bool_]:
    """Keys that do not fully match ``pattern`` (RE2: linear time whatever the pattern)."""
    matched = pa_compute.match_substring_regex(_arrow(key), f"^(?:{pattern})$").fill_null(False)
    found: npt.NDArray[np.bool_] = ~matched.to_numpy(zero_copy_only=False).astype(np.bool_)
    return found


def _arrow(key: pd.Series) -> Any:
    chunked = getattr(key.array, "_pa_array", None)
    return chunked if chunked is not None else pa.array(key.tolist(), type=pa.large_string())


class _Told:
    """Problem codes being overridden by what cells say; later calls win."""

    def __init__(
        self,
        codes: _Codes,
        values: list[str],
        rows: npt.NDArray[np.int32],
        source: str,
        findings: Findings,
        skipped: npt.NDArray[np.bool_] | None,
    ) -> None:
        self.codes = codes
        self.values = values
        self._rows = rows
        self._source = source
        self._findings = findings
        self._skipped = skipped

    def skip(self, text: str, what: str, cure: str) -> None:
        """The skipped rows get ``text``, over anything set before."""
        assert self._skipped is not None
        skipped, self._skipped = self._skipped, None
        self.set(skipped, text, what, cure)

    def set(self, mask: npt.NDArray[np.bool_], text: str, what: str, cure: str = "") -> None:
        if self._skipped is not None:
            mask = mask & ~self._skipped
        if not mask.any():
            return
        if text not in self.values:
            self.values = [*self.values, text]
        # A fresh wide copy: the codes may be shared, and the new index may not fit int8.
        self.codes = self.codes.astype(np.int32)
        self.codes[mask] = self.values.index(text)
        self._findings.add(what, self._source, self._rows[mask], cure)


def _with_invisible(key: pd.Series, found: KeyBytes | None) -> npt.NDArray[np.bool_] | None:
    """Which keys hold an ``_INVISIBLE`` character; None for none. All such characters are
    multi-byte in UTF-8, so the usual all-ASCII file costs a reduction it has already paid for."""
    if found is not None and found.byte_range[1] < 0x80:
        return None
    chunked = getattr(key.array, "_pa_array", None)
    values = chunked if chunked is not None else pa.array(key.tolist(), type=pa.large_string())
    matched = pa_compute.match_substring_regex(values, _INVISIBLE).fill_null(False)
    found_rows: npt.NDArray[np.bool_] = matched.to_numpy(zero_copy_only=False).astype(np.bool_)
    return found_rows


def _starts_with_apostrophe(key: pd.Series, found: KeyBytes | None) -> npt.NDArray[np.bool_]:
    if found is not None:
        return found.starts_with(_APOSTROPHE)
    return key.str.startswith("'").to_numpy(dtype=np.bool_)


def _small_codes(values: Sequence[int]) -> _Codes:
    """``values`` in the narrowest integer type that holds them, to keep per-row arrays small."""
    top = max(values, default=0)
    dtype = np.int8 if top < 2**7 else np.int16 if top < 2**15 else np.int32
    return np.asarray(values, dtype=dtype)


def _spread(per_category: Sequence[int], codes: _Codes) -> _Codes:
    """Per-row codes from per-category ones, skipping the copy when they are the same."""
    if list(per_category) == list(range(len(per_category))):
        return codes
    return _small_codes(per_category)[codes]


def _compact(codes: _Codes, values: list[str]) -> tuple[_Codes, list[str]]:
    """Drop the values no row uses any more (after blank rows were removed)."""
    used = np.flatnonzero(np.bincount(codes, minlength=len(values)))
    if len(used) == len(values):
        return codes, values
    renumber = np.zeros(len(values), dtype=np.int64)
    renumber[used] = np.arange(len(used))
    return _spread(renumber.tolist(), codes), [values[i] for i in used.tolist()]


def _problems(
    codes: _Codes,
    events: _EventTable,
    key_codes: npt.NDArray[np.int8],
    overflow: npt.NDArray[np.bool_] | None,
    *,
    key_problems: list[str],
    overflow_problem: str,
) -> tuple[_Codes, list[str]]:
    """Per-row problem codes and their texts."""
    event_problem = np.asarray(events.problem_index, dtype=np.int32)
    any_key_problem = bool(key_codes.any())
    if overflow is None and not any_key_problem and not event_problem.any():
        # The usual clean file: skip all per-row work (np.zeros costs nothing until touched).
        return np.zeros(len(codes), dtype=np.int8), [""]
    # Combined codes: event problem, then key problem, then overflow (the lowest bit).
    per_event = 2 * len(key_problems)
    combined = event_problem[codes] * per_event
    if any_key_problem:
        combined += key_codes.astype(np.int32) * 2
    if overflow is not None:
        combined += overflow
    texts: list[str] = []
    at: dict[str, int] = {}
    lookup = [0] * (len(events.problems) * per_event)
    for code in np.flatnonzero(np.bincount(combined)).tolist():
        problem, key_problem, overflowing = code // per_event, (code % per_event) // 2, code % 2
        if overflowing:
            # Values are shifted across columns in such a row, so other complaints mislead.
            text = overflow_problem
        else:
            parts = [events.problems[problem]] if problem else []
            if key_problem:
                parts.append(key_problems[key_problem])
            text = "; ".join(parts)
        lookup[code] = at.setdefault(text, len(at))
        if len(at) > len(texts):
            texts.append(text)
    return _small_codes(lookup)[combined], texts


def _unescape_keys(key: pd.Series, marked: npt.NDArray[np.bool_]) -> pd.Series:
    """Drop the apostrophe a spreadsheet-safe cell starts with (see :mod:`._cells`).

    In every file, not only in this tool's reports: a failed-rows file trimmed to a few columns
    must give back the very keys it was written from.
    """
    key = key.copy()
    key[marked] = [unescape_cell(value) for value in key[marked].tolist()]
    return key


class _EventTable:
    """Per distinct raw event cell: its normalised value, problem, and whether it is empty.

    A file has an event column or takes ``--event-id`` (see :func:`_check_event_source`), so
    ``default`` only ever stands for a missing column.
    """

    def __init__(self, name: str | None, default: str | None) -> None:
        self._name = name
        self._default = default
        self.values: list[str] = []
        self.value_index: list[int] = []
        self.problems: list[str] = [""]
        self.problem_index: list[int] = []
        self.empty: list[bool] = []
        self._value_at: dict[str, int] = {}
        self._problem_at: dict[str, int] = {"": 0}

    def add(self, raw: str) -> None:
        text = unescape_cell(raw.strip())
        if not text:
            self._append("", f"column '{self._name}' is empty", empty=True)
            return
        canonical = canonical_event_id(text)
        if canonical is not None:
            self._append(canonical, "", empty=False)
        else:
            self._append(text, f"column '{self._name}': {_show(text)} is not a UUID", empty=False)

    def add_missing_column(self) -> None:
        assert self._default is not None
        # "Empty" so that a row with no key either is blank: nothing in it is used.
        self._append(self._default, "", empty=True)

    def _append(self, value: str, problem: str, *, empty: bool) -> None:
        self.value_index.append(self._value_at.setdefault(value, len(self._value_at)))
        if len(self._value_at) > len(self.values):
            self.values.append(value)
        self.problem_index.append(self._problem_at.setdefault(problem, len(self._problem_at)))
        if len(self._problem_at) > len(self.problems):
            self.problems.append(problem)
        self.empty.append(empty)


def _show(value: str) -> str:
    if len(value) > _SHOWN_VALUE_LIMIT:
        value = value[: _SHOWN_VALUE_LIMIT - 1] + "…"
    return f"'{value}'" if value.isprintable() and "'" not in value else repr(value)


def _assemble(parts: Sequence[_Part], *, identity: bool = False) -> pd.DataFrame:
    events: dict[str, int] = {}
    problems: dict[str, int] = {}
    sources: dict[str, int] = {}
    event_codes = [_recode(part.event_codes, part.event_values, events) for part in parts]
    problem_codes = [_recode(part.problem_codes, part.problem_values, problems) for part in parts]
    source_of_part = _small_codes([sources.setdefault(part.source, len(sources)) for part in parts])
    if len(parts) == 1:
        key = parts[0].key
        rows = parts[0].rows
        # calloc'd zeros: no pass over a million rows for the one-file case.
        source_codes: list[_Codes] = [np.zeros(len(rows), dtype=np.int8)]
    elif parts:
        key = pd.concat([part.key for part in parts], ignore_index=True)
        rows = np.concatenate([part.rows for part in parts])
        source_codes = [np.repeat(source_of_part, [len(part.rows) for part in parts])]
    else:
        key = pd.Series(dtype="str")
        rows = np.zeros(0, dtype=np.int32)
        source_codes = []
    data: dict[str, Any] = {
        "event_id": _categorical(event_codes, events),
        "order_ticket_key": key,
        "source_file": _categorical(source_codes, sources),
        "source_row": rows,
        "problem": _categorical(problem_codes, problems),
    }
    names = list(FRAME_COLUMNS)
    if identity:
        data[IDENTITY_COLUMN] = _identities(parts)
        names.append(IDENTITY_COLUMN)
    return pd.DataFrame(data, columns=names, copy=False)


def _identities(parts: Sequence[_Part]) -> pd.Series:
    found = [part.identity for part in parts if part.identity is not None]
    # Every reader gives one when asked: a part without would shift every later row's.
    assert len(found) == len(parts)
    if not found:
        return pd.Series(dtype="str")
    if len(found) == 1:
        return found[0]
    return pd.concat(found, ignore_index=True)


def _recode(codes: _Codes, values: list[str], into: dict[str, int]) -> _Codes:
    return _spread([into.setdefault(value, len(into)) for value in values], codes)


def _categorical(codes: list[_Codes], values: dict[str, int]) -> pd.Categorical[str]:
    if len(codes) == 1:
        joined = codes[0]
    elif codes:
        joined = np.concatenate([part.astype(np.int32) for part in codes])
    else:
        joined = np.zeros(0, dtype=np.int8)
    index: pd.Index[str] = pd.Index(list(values), dtype="str")
    return pd.Categorical.from_codes(joined, categories=index)
