"""Reading input files (CSV/TSV and Excel/ODS exports) into one normalised frame.

Every row a person put in a file comes back exactly once, either usable or with a one-line
``problem`` naming the column as the file spells it, so a report can account for all of them.
Only truly blank rows are dropped, and they are counted.

CSV is parsed by pyarrow (multi-threaded, with ``newlines_in_values`` so quoted newlines are safe
across block boundaries). pandas' own ``engine="pyarrow"`` cannot set that option and splits such
records on big files, so pyarrow is called directly. pyarrow rejects rows whose field count differs
from the header's; those files are re-read with pandas' C engine, which pads short rows.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import importlib
import io
import math
import mmap
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from batchjob._cells import unescape_cell
from batchjob._keybytes import KeyBytes

# pyarrow ships no type information and the project's mypy config has no override for it.
pa: Any = importlib.import_module("pyarrow")
pa_csv: Any = importlib.import_module("pyarrow.csv")

FRAME_COLUMNS: Final = ("event_id", "order_ticket_key", "source_file", "source_row", "problem")

CSV_SUFFIXES: Final = frozenset({".csv", ".tsv", ".txt"})
EXCEL_SUFFIXES: Final = frozenset({".xlsx", ".xlsm", ".xlsb", ".xls", ".ods"})
_SUPPORTED: Final = ", ".join(sorted(CSV_SUFFIXES | EXCEL_SUFFIXES))

# A header holding all of these was written by this tool (report or failed-rows file), so its
# cells went through escape_cell and must be unescaped to get the original keys back.
_REPORT_MARKERS: Final = frozenset(
    {"event_id", "order_ticket_key", "outcome", "source_file", "source_row"}
)

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HEADER_NOISE = re.compile(r"[\s_\-]+")
_LINE = re.compile(r"([^\r\n]*)(\r\n|\r|\n|)")
_QUOTED = re.compile(r'"[^"]*"')

_SNIFF_BYTES: Final = 256 * 1024
_CHUNK_BYTES: Final = 4 * 1024 * 1024
_DELIMITERS: Final = (",", ";", "\t")
# UTF-32 first: its little-endian BOM starts with the UTF-16 one.
_BOMS: Final = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_ZIP_MAGIC: Final = (b"PK\x03\x04", b"PK\x05\x06")
_OLE2_MAGIC: Final = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_SHOWN_VALUE_LIMIT: Final = 60


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


class InputError(Exception):
    """A file cannot be used at all. The message starts with the file (and sheet)."""


@dataclass(frozen=True)
class Inputs:
    """All rows of all input files; see :func:`read_inputs`."""

    frame: pd.DataFrame
    blank_rows: int
    files: tuple[str, ...]


def normalise_header(name: str) -> str:
    """Fold a header cell so "Event ID", "event-id" and "EventId" compare equal."""
    return _HEADER_NOISE.sub("", name.casefold())


def canonical_event_id(value: str) -> str | None:
    """Return ``value`` as a lower-case canonical UUID, or None when it is not one."""
    stripped = value.strip()
    return stripped.lower() if _UUID.fullmatch(stripped) else None


def read_inputs(
    paths: Sequence[str | Path],
    *,
    aliases: ColumnAliases = ColumnAliases(),
    default_event_id: str | None = None,
) -> Inputs:
    """Read every file into one frame of ``FRAME_COLUMNS``, in input order.

    Raises :class:`InputError` for a file that cannot be used at all, and ``ValueError`` when
    ``default_event_id`` is given but is not a UUID.
    """
    default = None
    if default_event_id is not None:
        default = canonical_event_id(default_event_id)
        if default is None:
            raise ValueError(
                f"--event-id {default_event_id!r} is not a UUID "
                "(expected 8-4-4-4-12 hex digits, e.g. 123e4567-e89b-12d3-a456-426614174000)"
            )
    matcher = _Matcher(aliases)
    parts: list[_Part] = []
    for path in paths:
        parts.extend(_read_file(str(path), matcher, default))
    return Inputs(
        frame=_assemble(parts),
        blank_rows=sum(part.blank_rows for part in parts),
        files=tuple(str(path) for path in paths),
    )


# --- columns -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Columns:
    """Where the columns we use are in one header, and how they are spelled there."""

    names: tuple[str, ...]
    key: int
    event: int | None
    report: bool

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
            report=set(names) >= _REPORT_MARKERS,
        )

    def no_key_hint(self) -> str:
        return (
            f"Expected a column named one of: {', '.join(self.key_aliases)} "
            "(case, spaces, '_' and '-' are ignored)"
        )


def _quote_names(names: Sequence[str], indices: Iterable[int]) -> str:
    return ", ".join(f"'{names[i]}'" for i in indices)


def _list_names(names: Sequence[str]) -> str:
    return ", ".join(name or "(unnamed)" for name in names) or "(none)"


# --- files -------------------------------------------------------------------------------------


def _read_file(path: str, matcher: _Matcher, default: str | None) -> list[_Part]:
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in CSV_SUFFIXES and suffix not in EXCEL_SUFFIXES:
        shown = f"'{file.suffix}'" if file.suffix else "(none)"
        raise InputError(f"{path}: unsupported file type {shown}; supported: {_SUPPORTED}")
    try:
        if not file.exists():
            raise InputError(f"{path}: file does not exist")
        if file.is_dir():
            raise InputError(f"{path}: is a directory, not a file")
        if file.stat().st_size == 0:
            raise InputError(f"{path}: file is empty (0 bytes)")
        with file.open("rb") as handle:
            head = handle.read(_SNIFF_BYTES)
            whole = len(head) < _SNIFF_BYTES or not handle.read(1)
        if suffix in CSV_SUFFIXES:
            return [_read_csv(path, head, whole, matcher, default)]
        return _read_excel(path, suffix, head, matcher, default)
    except OSError as exc:
        raise InputError(f"{path}: cannot be read: {exc.strerror or exc}") from exc


# --- CSV ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CsvLayout:
    encoding: str
    delimiter: str
    skip: int  # records before the header (blank lines)
    columns: _Columns

    @property
    def first_row(self) -> int:
        """The first data row's number: the header is record ``skip + 1``, as in a spreadsheet."""
        return self.skip + 2


def _read_csv(path: str, head: bytes, whole: bool, matcher: _Matcher, default: str | None) -> _Part:
    encoding = _csv_encoding(path, head, whole)
    layout = _csv_layout(path, head, whole, encoding, matcher)
    try:
        event, key, overflow = _read_csv_fast(path, layout)
    except (pa.lib.ArrowException, UnicodeError):
        if encoding in ("utf-8", "utf-8-sig") and not _decodes(path, encoding):
            if encoding == "utf-8-sig":
                raise InputError(
                    f"{path}: starts with a UTF-8 byte order mark but is not valid UTF-8"
                ) from None
            layout = _csv_layout(path, head, whole, "cp1252", matcher)
        event, key, overflow = _read_csv_tolerant(path, layout)
    return _normalise(
        source=path,
        columns=layout.columns,
        event=event,
        key=key,
        first_row=layout.first_row,
        overflow=overflow,
        overflow_problem=_overflow_problem(layout),
        default=default,
    )


def _csv_encoding(path: str, head: bytes, whole: bool) -> str:
    """The encoding as far as the first bytes tell.

    Only the start is checked here: reading a big file once more just to validate it costs about
    a quarter of the time of parsing it. pyarrow checks that the columns we use are UTF-8; when
    they are not, :func:`_read_csv` checks the whole file and falls back to Windows-1252. Bytes
    that are not UTF-8 in an unused column past the start do not matter: the ASCII around them
    decodes the same either way.
    """
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding
    if head.startswith(_ZIP_MAGIC):
        raise InputError(
            f"{path}: is a zip archive (probably an Excel workbook), not CSV text; "
            "if it is a workbook, give it an .xlsx extension"
        )
    if head.startswith(_OLE2_MAGIC):
        raise InputError(
            f"{path}: is an old-format Excel workbook, not CSV text; give it an .xls extension"
        )
    if b"\x00" in head:
        raise InputError(
            f"{path}: contains binary data (NUL bytes), not CSV text "
            "(UTF-16 text needs a byte order mark)"
        )
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=whole)
    except UnicodeDecodeError:
        return "cp1252"
    return "utf-8"


def _decodes(path: str, encoding: str) -> bool:
    """Whether the whole file decodes, streaming so a big file never sits in memory."""
    decoder = codecs.getincrementaldecoder(encoding)()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK_BYTES):
                # ASCII decodes the same in every encoding we try, so only a chunk that is not
                # pure ASCII, or that completes a sequence split at the last chunk's end, is
                # worth decoding.
                if not chunk.isascii() or decoder.getstate()[0]:
                    decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _undecodable(path: str, encoding: str) -> InputError:
    if encoding == "cp1252":
        return InputError(f"{path}: cannot be decoded: it is neither UTF-8 nor Windows-1252 text")
    return InputError(f"{path}: cannot be decoded as {encoding}")


def _csv_layout(
    path: str, head: bytes, whole: bool, encoding: str, matcher: _Matcher
) -> _CsvLayout:
    try:
        text = codecs.getincrementaldecoder(encoding)().decode(head, final=whole)
    except UnicodeDecodeError:
        raise _undecodable(path, encoding) from None
    skip = 0
    position = 0
    while True:
        match = _LINE.match(text, position)
        assert match is not None  # the pattern matches the empty string
        line, ending = match.groups()
        if line.strip(" \t,;"):
            break
        if not ending:
            raise InputError(f"{path}: has no header row (the file holds only blank lines)")
        skip += 1
        position = match.end()
    delimiter = _detect_delimiter(line)
    reader = csv.reader(io.StringIO(text[position:], newline=""), delimiter=delimiter)
    names = [name.strip() for name in next(reader)]
    columns = matcher.find(path, names)
    if columns is None:
        raise InputError(
            f"{path}: no order ticket key column; its columns are: {_list_names(names)}. "
            f"{matcher.no_key_hint()}"
        )
    return _CsvLayout(encoding=encoding, delimiter=delimiter, skip=skip, columns=columns)


def _detect_delimiter(header_line: str) -> str:
    """The candidate that splits the header most; a one-column file has none, so comma."""
    unquoted = _QUOTED.sub("", header_line)
    counts = {delimiter: unquoted.count(delimiter) for delimiter in _DELIMITERS}
    best = max(_DELIMITERS, key=lambda delimiter: counts[delimiter])
    return best if counts[best] else ","


def _overflow_problem(layout: _CsvLayout) -> str:
    shown = "tab" if layout.delimiter == "\t" else f"'{layout.delimiter}'"
    return (
        f"the row has more fields than the header's {len(layout.columns.names)}; "
        f"is a {shown} inside a value missing its quotes?"
    )


def _synthetic_names(count: int) -> list[str]:
    # Header cells can be blank or repeated; readers need unique names to address columns.
    return [f"c{i}" for i in range(count)]


def _used(columns: _Columns) -> list[int]:
    return [i for i in (columns.event, columns.key) if i is not None]


def _read_csv_fast(path: str, layout: _CsvLayout) -> tuple[pd.Series | None, pd.Series, None]:
    """pyarrow, all cores; raises on any row whose field count differs from the header's."""
    columns = layout.columns
    names = _synthetic_names(len(columns.names))
    types = {names[columns.key]: pa.large_string()}
    if columns.event is not None:
        # Parsing straight into a dictionary keeps the few distinct events compact from the start.
        types[names[columns.event]] = pa.dictionary(pa.int32(), pa.large_string())
    mapped = _map(path)
    table = pa_csv.read_csv(
        path if mapped is None else pa.BufferReader(pa.py_buffer(mapped)),
        read_options=_read_options(layout, names, use_threads=True),
        parse_options=_parse_options(layout, quoted=mapped is None or mapped.find(b'"') >= 0),
        convert_options=pa_csv.ConvertOptions(
            include_columns=[names[i] for i in _used(columns)],
            column_types=types,
            null_values=[],
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )
    # One chunk: the planner reads the keys' bytes, and takes keys by position, from it.
    key = pd.Series(pd.array(table.column(names[columns.key]).combine_chunks(), dtype="str"))
    event = None
    if columns.event is not None:
        event = pd.Series(_categorical_of(table.column(names[columns.event])), copy=False)
    return event, key, None


def _categorical_of(column: Any) -> pd.Categorical[str]:
    """A dictionary-encoded Arrow column as a Categorical, without pandas' slower conversion."""
    unified = column.unify_dictionaries()
    chunks = unified.chunks
    indices = pa.concat_arrays([c.indices for c in chunks]) if chunks else pa.array([], pa.int32())
    values = chunks[0].dictionary.to_pylist() if chunks else []
    return pd.Categorical.from_codes(
        indices.to_numpy(zero_copy_only=False),
        categories=pd.Index(values, dtype="str"),
        validate=False,
    )


def _read_options(layout: _CsvLayout, names: list[str], *, use_threads: bool) -> Any:
    # utf-8 with a BOM is still utf8 to pyarrow, which skips the mark itself.
    encoding = "utf8" if layout.encoding in ("utf-8", "utf-8-sig") else layout.encoding
    return pa_csv.ReadOptions(
        use_threads=use_threads,
        skip_rows=layout.skip,
        column_names=names,
        skip_rows_after_names=1,
        encoding=encoding,
    )


def _map(path: str) -> mmap.mmap | None:
    """The file mapped into memory: searched for quotes, then parsed, with no copy or re-read.

    A newline can only be inside a value that is quoted. Without a '"' byte in the file (in any
    encoding we read, '"' holds one), pyarrow may split it into blocks at any newline, which
    parses a large file about a quarter faster than following quotes from block to block;
    finding that there are none costs a tenth of that. None where the file cannot be mapped
    (some special file systems): then it is read as a stream, assuming quotes.
    """
    with open(path, "rb") as handle:
        try:
            return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return None


def _parse_options(
    layout: _CsvLayout, handler: Callable[[Any], str] | None = None, *, quoted: bool = True
) -> Any:
    return pa_csv.ParseOptions(
        delimiter=layout.delimiter,
        newlines_in_values=quoted,
        ignore_empty_lines=False,
        invalid_row_handler=handler,
    )


def _read_csv_tolerant(
    path: str, layout: _CsvLayout
) -> tuple[pd.Series | None, pd.Series, npt.NDArray[np.bool_] | None]:
    """pandas' C engine: pads short rows and ignores extra fields, which we then flag."""
    columns = layout.columns
    names = _synthetic_names(len(columns.names))
    try:
        frame = pd.read_csv(
            path,
            sep=layout.delimiter,
            encoding=layout.encoding,
            header=None,
            skiprows=layout.skip + 1,
            names=names,
            usecols=_used(columns),
            dtype=str,
            na_filter=False,
            skip_blank_lines=False,
            index_col=False,
            engine="c",
        )
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame({name: pd.Series(dtype="str") for name in names})
    except UnicodeDecodeError:
        raise _undecodable(path, layout.encoding) from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise InputError(f"{path}: is not valid CSV: {exc}") from exc
    key = frame[names[columns.key]].fillna("")
    event = None
    if columns.event is not None:
        event = frame[names[columns.event]].fillna("").astype("category")
    overflow = None
    rows = _overflowing_rows(path, layout, names)
    if rows:
        numbers = np.arange(layout.first_row, layout.first_row + len(frame), dtype=np.int64)
        overflow = np.isin(numbers, np.asarray(rows, dtype=np.int64))
    return event, key, overflow


def _overflowing_rows(path: str, layout: _CsvLayout, names: list[str]) -> list[int]:
    """Record numbers of rows with more fields than the header (the C engine drops the extras).

    Single-threaded so pyarrow knows each row's number, which counts records from the start of
    the file just as our ``source_row`` does.
    """
    found: list[int] = []

    def note(row: Any) -> str:
        if row.actual_columns > row.expected_columns and row.number is not None:
            found.append(int(row.number))
        return "skip"

    key = names[layout.columns.key]
    # The C engine read the file, so a failure here is a pyarrow limit (e.g. a huge quoted
    # field); the rows found before it are still right.
    with contextlib.suppress(pa.lib.ArrowException, UnicodeError):
        pa_csv.read_csv(
            path,
            read_options=_read_options(layout, names, use_threads=False),
            parse_options=_parse_options(layout, note),
            convert_options=pa_csv.ConvertOptions(
                include_columns=[key], column_types={key: pa.large_binary()}
            ),
        )
    return found


# --- Excel -------------------------------------------------------------------------------------


def _read_excel(
    path: str, suffix: str, head: bytes, matcher: _Matcher, default: str | None
) -> list[_Part]:
    _check_workbook_magic(path, suffix, head)
    try:
        sheets = pd.read_excel(
            path,
            sheet_name=None,
            header=None,
            dtype=object,
            na_filter=False,
            engine="calamine",
        )
    except Exception as exc:  # the engine raises many unrelated types for a damaged workbook
        raise InputError(f"{path}: cannot be read as a {suffix} workbook: {exc}") from exc
    parts: list[_Part] = []
    seen: list[str] = []
    for sheet_name, sheet in sheets.items():
        where = f"{path}#{sheet_name}"
        found = _sheet_header(sheet)
        if found is None:
            seen.append(f"sheet '{sheet_name}' is empty")
            continue
        header_index, names = found
        columns = matcher.find(where, names)
        if columns is None:
            seen.append(f"sheet '{sheet_name}' has columns: {_list_names(names)}")
            continue
        body = sheet.iloc[header_index + 1 :]
        key = pd.Series(body.iloc[:, columns.key].map(_excel_text).tolist(), dtype="str")
        event = None
        if columns.event is not None:
            event = pd.Series(
                body.iloc[:, columns.event].map(_excel_text).tolist(), dtype="category"
            )
        parts.append(
            _normalise(
                source=where,
                columns=columns,
                event=event,
                key=key,
                # The sheet's frame starts at A1 (calamine keeps leading empty rows).
                first_row=header_index + 2,
                overflow=None,
                overflow_problem="",
                default=default,
            )
        )
    if not parts:
        raise InputError(
            f"{path}: no sheet has an order ticket key column; {'; '.join(seen) or 'no sheets'}. "
            f"{matcher.no_key_hint()}"
        )
    return parts


def _check_workbook_magic(path: str, suffix: str, head: bytes) -> None:
    is_zip = head.startswith(_ZIP_MAGIC)
    is_ole = head.startswith(_OLE2_MAGIC)
    if (suffix == ".xls" and (is_ole or is_zip)) or (suffix != ".xls" and is_zip):
        return
    if is_ole:
        raise InputError(
            f"{path}: is not a {suffix} workbook: it is password-protected or an old .xls file; "
            "save it again as an unprotected .xlsx"
        )
    if _looks_like_text(head):
        raise InputError(
            f"{path}: is not a {suffix} workbook: it looks like text "
            "(a CSV or HTML export with the wrong extension?); rename it to .csv if it is CSV"
        )
    raise InputError(f"{path}: is not a {suffix} workbook (its content is not a spreadsheet)")


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return any(head.startswith(bom) for bom, _ in _BOMS)
    sample = head[:4096].decode("utf-8", errors="replace")
    return all(ch >= " " or ch in "\t\r\n" for ch in sample)


def _sheet_header(sheet: pd.DataFrame) -> tuple[int, list[str]] | None:
    """The first row with any content is the header (rows above it are left empty)."""
    for index in range(len(sheet)):
        names = [_excel_text(cell).strip() for cell in sheet.iloc[index].tolist()]
        if any(names):
            return index, names
    return None


def _excel_text(value: object) -> str:
    """A cell as the text a person sees: 123456.0 stored by Excel reads back as "123456"."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
        # Excel shows 15 significant digits; more only exposes binary float noise.
        return format(value, ".15g")
    return str(value)


# --- normalising -------------------------------------------------------------------------------


_Codes = npt.NDArray[np.signedinteger[Any]]


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


def _normalise(
    *,
    source: str,
    columns: _Columns,
    event: pd.Series | None,
    key: pd.Series,
    first_row: int,
    overflow: npt.NDArray[np.bool_] | None,
    overflow_problem: str,
    default: str | None,
) -> _Part:
    """Strip keys, validate events and explain unusable rows; drop and count blank ones."""
    count = len(key)
    key, key_empty = _clean_keys(key, report=columns.report)
    if overflow is not None and not overflow.any():
        overflow = None

    # Everything about events is decided once per distinct value, then spread by code.
    events = _EventTable(columns, default)
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
    if key_empty.any():
        blank = key_empty & np.asarray(events.empty, dtype=np.bool_)[codes]
        if overflow is not None:
            blank &= ~overflow
    event_codes = _spread(events.value_index, codes)
    problem_codes, problem_values = _problems(
        codes,
        events,
        key_empty,
        overflow,
        key_problem=f"column '{columns.key_name}' is empty",
        overflow_problem=overflow_problem,
    )
    event_values = events.values
    rows = np.arange(first_row, first_row + count, dtype=np.int32)

    blank_rows = 0 if blank is None else int(blank.sum())
    if blank is not None and blank_rows:
        keep = ~blank
        key = key[keep].reset_index(drop=True)
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
    )


def _clean_keys(key: pd.Series, *, report: bool) -> tuple[pd.Series, npt.NDArray[np.bool_]]:
    """Keys stripped (and unescaped, from a report), and which of them are empty.

    Stripping a million keys costs more than the checks that usually show it changes nothing.
    """
    found = KeyBytes.of_series(key)
    if found is None or found.may_need_strip():
        key = key.str.strip()
        found = None
    if report:
        key = _unescape_keys(key)
        found = None
    found = found or KeyBytes.of_series(key)
    if found is not None:
        return key, found.empty()
    return key, (key == "").to_numpy(dtype=np.bool_)


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
    key_empty: npt.NDArray[np.bool_],
    overflow: npt.NDArray[np.bool_] | None,
    *,
    key_problem: str,
    overflow_problem: str,
) -> tuple[_Codes, list[str]]:
    """Per-row problem codes and their texts."""
    event_problem = np.asarray(events.problem_index, dtype=np.int32)
    any_key_empty = bool(key_empty.any())
    if overflow is None and not any_key_empty and not event_problem.any():
        # The usual clean file: skip all per-row work (np.zeros costs nothing until touched).
        return np.zeros(len(codes), dtype=np.int8), [""]
    # Four combined codes per event problem: plain, empty key, overflow, both.
    combined = event_problem[codes] * 4
    if any_key_empty:
        combined += key_empty * 2
    if overflow is not None:
        combined += overflow
    texts: list[str] = []
    at: dict[str, int] = {}
    lookup = [0] * (len(events.problems) * 4)
    for code in np.flatnonzero(np.bincount(combined)).tolist():
        problem, empty_key, overflowing = code // 4, (code // 2) % 2, code % 2
        if overflowing:
            # Values are shifted across columns in such a row, so other complaints mislead.
            text = overflow_problem
        else:
            parts = [events.problems[problem]] if problem else []
            if empty_key:
                parts.append(key_problem)
            text = "; ".join(parts)
        lookup[code] = at.setdefault(text, len(at))
        if len(at) > len(texts):
            texts.append(text)
    return _small_codes(lookup)[combined], texts


def _unescape_keys(key: pd.Series) -> pd.Series:
    escaped = key.str.startswith("'").to_numpy(dtype=np.bool_)
    if not escaped.any():
        return key
    key = key.copy()
    key[escaped] = [unescape_cell(value) for value in key[escaped].tolist()]
    return key


class _EventTable:
    """Per distinct raw event cell: its normalised value, problem, and whether it is empty."""

    def __init__(self, columns: _Columns, default: str | None) -> None:
        self._columns = columns
        self._default = default
        self.values: list[str] = []
        self.value_index: list[int] = []
        self.problems: list[str] = [""]
        self.problem_index: list[int] = []
        self.empty: list[bool] = []
        self._value_at: dict[str, int] = {}
        self._problem_at: dict[str, int] = {"": 0}

    def add(self, raw: str) -> None:
        name = self._columns.event_name
        text = raw.strip()
        if self._columns.report:
            text = unescape_cell(text)
        if not text:
            problem = "" if self._default else f"column '{name}' is empty"
            self._append(self._default or "", problem, empty=True)
            return
        canonical = canonical_event_id(text)
        if canonical is not None:
            self._append(canonical, "", empty=False)
        else:
            self._append(text, f"column '{name}': {_show(text)} is not a UUID", empty=False)

    def add_missing_column(self) -> None:
        problem = (
            ""
            if self._default
            else "no event id: the file has no event id column and no --event-id was given"
        )
        # "Empty" so that a row with no key either is blank: nothing in it is used.
        self._append(self._default or "", problem, empty=True)

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


# --- assembling --------------------------------------------------------------------------------


def _assemble(parts: Sequence[_Part]) -> pd.DataFrame:
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
    return pd.DataFrame(
        {
            "event_id": _categorical(event_codes, events),
            "order_ticket_key": key,
            "source_file": _categorical(source_codes, sources),
            "source_row": rows,
            "problem": _categorical(problem_codes, problems),
        },
        columns=list(FRAME_COLUMNS),
        copy=False,
    )


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


__all__ = [
    "CSV_SUFFIXES",
    "EXCEL_SUFFIXES",
    "FRAME_COLUMNS",
    "ColumnAliases",
    "InputError",
    "Inputs",
    "canonical_event_id",
    "normalise_header",
    "read_inputs",
]
