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
import html
import importlib
import io
import math
import mmap
import re
import struct
import xml.parsers.expat
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from batchjob._cells import unescape_cell
from batchjob._keybytes import KeyBytes, Positions

# pyarrow ships no type information and the project's mypy config has no override for it.
pa: Any = importlib.import_module("pyarrow")
pa_csv: Any = importlib.import_module("pyarrow.csv")

FRAME_COLUMNS: Final = ("event_id", "order_ticket_key", "source_file", "source_row", "problem")

CSV_SUFFIXES: Final = frozenset({".csv", ".tsv", ".txt"})
EXCEL_SUFFIXES: Final = frozenset({".xlsx", ".xlsm", ".xlsb", ".xls", ".ods"})
_SUPPORTED: Final = ", ".join(sorted(CSV_SUFFIXES | EXCEL_SUFFIXES))

#: Keys longer than this many characters are invalid (real ticket keys are a dozen or so).
MAX_KEY_CHARS: Final = 256

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HEADER_NOISE = re.compile(r"[\s_\-]+")
_LINE = re.compile(r"([^\r\n]*)(\r\n|\r|\n|)")
_QUOTED = re.compile(r'"[^"]*"')
# The first line holding anything but separators and spaces: the header.
_HEADER_LINE = re.compile(rb"(?:[ \t,;]*(?:\r\n|\r|\n))*([^\r\n]*)")

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
    _check_event_source(path, layout.columns, default, matcher)
    if encoding == "cp1252":
        _refuse_mixed_encodings(path, layout)
    try:
        event, key, overflow = _read_csv_fast(path, layout)
    except (pa.lib.ArrowException, UnicodeError):
        if encoding in ("utf-8", "utf-8-sig") and not _decodes(path, encoding):
            if encoding == "utf-8-sig":
                raise InputError(
                    f"{path}: starts with a UTF-8 byte order mark but is not valid UTF-8"
                ) from None
            layout = _csv_layout(path, head, whole, "cp1252", matcher)
            _refuse_mixed_encodings(path, layout)
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
    if b"\x00" in _HEADER_LINE.match(head).group(1):  # type: ignore[union-attr]
        # Only the header decides: a NUL in a row makes that row invalid, wherever it is.
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


# A well-formed UTF-8 sequence of two to four bytes (RFC 3629: no overlong forms, surrogates or
# code points past U+10FFFF).
_UTF8_SEQUENCE = re.compile(
    rb"[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]{2}"
    rb"|\xed[\x80-\x9f][\x80-\xbf]|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}"
    rb"|\xf4[\x80-\x8f][\x80-\xbf]{2}"
)


def _refuse_mixed_encodings(path: str, layout: _CsvLayout) -> None:
    """Refuse a file that is not UTF-8 but holds UTF-8 text: it mixes two encodings.

    Read as Windows-1252, its UTF-8 would turn into other text ("Zoë" into "ZoÃ«") with no
    error, changing keys silently. Only files that are not UTF-8 get here, so clean UTF-8 files
    never pay for this pass.
    """
    utf8 = _first_match(path, _UTF8_SEQUENCE)
    if utf8 is None:
        return
    other = _first_non_utf8(path)
    if other is None:  # cannot happen: the caller found the file is not UTF-8
        return
    other_row, utf8_row = _record_numbers(path, (other, utf8))
    raise InputError(
        f"{path}: mixes two encodings: row {other_row} is not UTF-8 (Windows-1252?) while row "
        f"{utf8_row} is UTF-8, so some text would be misread whichever is chosen; save the "
        "file again as UTF-8 (Excel: 'CSV UTF-8') and rerun"
    )


def _first_match(path: str, pattern: re.Pattern[bytes]) -> int | None:
    """The offset of ``pattern``'s first match in the file (matches are at most 4 bytes)."""
    base = 0
    carry = b""
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            data = carry + chunk
            if not data.isascii():
                found = pattern.search(data)
                if found is not None:
                    return base + found.start()
            carry = data[-3:]
            base += len(data) - len(carry)
    return None


def _first_non_utf8(path: str) -> int | None:
    """The offset of the first byte that is not part of valid UTF-8, if any."""
    base = 0
    carry = b""
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            data = carry + chunk
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as exc:
                if exc.end < len(data):  # not merely a sequence cut at the chunk's end
                    return base + exc.start
                data, carry = data[: exc.start], data[exc.start :]
                base += len(data)
                continue
            base += len(data)
            carry = b""
    return base if carry else None


def _record_numbers(path: str, offsets: Sequence[int]) -> list[int]:
    """The record (spreadsheet row) holding each byte offset, counting as the readers do.

    A line break ends a record unless it is inside quotes, that is after an odd number of '"'
    (a doubled quote inside a value keeps the count even); CR, LF and CRLF are each one break.
    An error path, but numpy still: no field is ever too long to count past.
    """
    found: list[int] = []
    wanted = sorted(offsets)
    quotes = 0  # '"' so far
    breaks = 0  # record breaks so far
    base = 0
    previous_cr = False
    with open(path, "rb") as handle:
        while wanted and (chunk := handle.read(_CHUNK_BYTES)):
            a = np.frombuffer(chunk, dtype=np.uint8)
            outside = (quotes + np.cumsum(a == ord('"'))) % 2 == 0
            cr, lf = a == ord("\r"), a == ord("\n")
            after_cr = np.concatenate([[previous_cr], cr[:-1]])
            ends = np.cumsum((cr | (lf & ~after_cr)) & outside)
            while wanted and wanted[0] < base + len(a):
                at = wanted.pop(0) - base
                found.append(1 + breaks + (int(ends[at - 1]) if at else 0))
            quotes += int(np.count_nonzero(a == ord('"')))
            breaks += int(ends[-1])
            previous_cr = bool(cr[-1] and outside[-1])
            base += len(a)
    found.extend(1 + breaks for _ in wanted)
    return [found[sorted(offsets).index(offset)] for offset in offsets]


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
        binary = " (it holds NUL bytes: is it a text file?)" if b"\x00" in head else ""
        raise InputError(
            f"{path}: no order ticket key column{binary}; its columns are: "
            f"{_list_names(names)}. {matcher.no_key_hint()}"
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
    if layout.encoding != "cp1252" and not _ascii(mapped) and not _decodes(path, layout.encoding):
        # pyarrow checked only the columns we use: another one that is not UTF-8 means the file
        # mixes encodings (see _refuse_mixed_encodings) or is Windows-1252 after all.
        raise UnicodeError(f"{path}: not {layout.encoding} outside the columns used")
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


def _ascii(mapped: mmap.mmap | None) -> bool:
    """Whether a mapped file is all ASCII: one vectorised pass over pages the parse just read."""
    return mapped is not None and int(np.frombuffer(mapped, dtype=np.uint8).max()) < 0x80


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
        _check_workbook_size(path, suffix, head)
    except (ValueError, zlib.error, xml.parsers.expat.ExpatError) as exc:
        raise InputError(f"{path}: cannot be read as a {suffix} workbook: {exc}") from exc
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
        _check_event_source(where, columns, default, matcher)
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


# --- workbooks that attack the reader ------------------------------------------------------------

#: A workbook's parts may unpack to at most this many bytes, all together (a zip bomb stops here).
MAX_UNPACKED_BYTES: Final = 1 << 30
#: A sheet may span at most this many cells, from A1 to its last row and column (calamine and
#: pandas hold every cell of that rectangle, empty or not: ~100 bytes each).
MAX_SHEET_CELLS: Final = 1 << 24

_ZIP_READ: Final = 1 << 20
_MAX_PARTS: Final = 10_000
_LOCAL_HEADER: Final = struct.Struct("<4s22xHH")
_XML_CELL = re.compile(rb"<(?:[\w.-]+:)?(c|row)(?=[\s/>])")
# An attribute of a start tag: a name, then a value in either quote (which may hold '>').
_XML_ATTRIBUTE = re.compile(rb"""\s*([\w.:-]+)\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_XML_TAG_END = re.compile(rb"\s*/?>")
_CELL_REF = re.compile(rb"([A-Za-z]*)0*([0-9]*)")
_SHEET_ENTRY = re.compile(rb"<(?:[\w.-]+:)?sheet(?=\s)")
_RELATIONSHIP = re.compile(rb"<(?:[\w.-]+:)?Relationship(?=\s)")
_NAME_ENDS: Final = np.frombuffer(b" \t\n\r/>", dtype=np.uint8)


@dataclass
class _Extent:
    """How far a sheet's cells reach (1-based: the rectangle from A1 that holds them all)."""

    rows: int = 0
    columns: int = 0

    def reach(self, row: int, column: int) -> None:
        self.rows = max(self.rows, row)
        self.columns = max(self.columns, column)

    @property
    def cells(self) -> int:
        return self.rows * self.columns


def _column_letters(number: int) -> str:
    letters = ""
    while number > 0:
        number, rest = divmod(number - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return letters


def _check_extent(path: str, sheet: str, extent: _Extent) -> None:
    if extent.cells <= MAX_SHEET_CELLS:
        return
    corner = f"{_column_letters(extent.columns)}{extent.rows}"
    raise InputError(
        f"{path}: sheet {sheet!r} has cells as far as {corner} ({extent.rows:,} rows x "
        f"{extent.columns:,} columns = {extent.cells:,} cells from A1), more than the "
        f"{MAX_SHEET_CELLS:,} batchjob reads; delete the cells far from the data (Ctrl+End "
        "shows the last one) or copy the data to a new workbook"
    )


def _check_workbook_size(path: str, suffix: str, head: bytes) -> None:
    """Refuse a workbook whose reading would exhaust memory, before the engine sees it.

    calamine holds a sheet as one rectangle from its first to its last cell: a 5 KB file with
    one cell at XFD1048576 asks for 512 GiB and aborts the process. So every part of the
    archive is unpacked here first, counting the bytes it really yields (its declared size can
    lie), and the cells of every sheet are located without building them.
    """
    if head.startswith(_OLE2_MAGIC):
        _check_xls(path)
        return
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            _check_zip_workbook(path, suffix, archive, raw)
    except zipfile.BadZipFile as exc:
        raise InputError(f"{path}: cannot be read as a {suffix} workbook: {exc}") from exc


def _check_zip_workbook(path: str, suffix: str, archive: zipfile.ZipFile, raw: Any) -> None:
    members = archive.infolist()
    if len(members) > _MAX_PARTS:
        raise _too_big(path, f"has {len(members):,} parts")
    declared = sum(member.file_size for member in members)
    if declared > MAX_UNPACKED_BYTES:
        raise _too_big(path, f"declares {declared:,} bytes unpacked")
    names = _xlsx_sheet_names(archive) if suffix != ".ods" else {}
    binary_sheets = _xlsb_sheet_parts(archive) if suffix == ".xlsb" else set()
    left = MAX_UNPACKED_BYTES
    for member in members:
        scan = _member_scanner(suffix, member.filename, binary_sheets)
        sheet = names.get(member.filename, member.filename)
        produced = 0
        try:
            for chunk in _unpack(path, raw, member, left):
                produced += len(chunk)
                if scan is not None:
                    scan.feed(chunk)
            found = scan.close() if scan is not None else []
        except _SheetTooBig as exc:
            found = [(exc.sheet, exc.extent)]
        left -= produced
        for name, extent in found:
            _check_extent(path, name or sheet, extent)


def _too_big(path: str, what: str) -> InputError:
    return InputError(
        f"{path}: {what}, more than the {MAX_UNPACKED_BYTES:,} batchjob reads from a workbook "
        "(a zip bomb?); export the data as CSV instead"
    )


def _unpack(path: str, raw: Any, member: zipfile.ZipInfo, limit: int) -> Iterable[bytes]:
    """A member's bytes as the archive really holds them, whatever its header says."""
    if member.flag_bits & 0x1:
        raise InputError(f"{path}: is password-protected; save it again without a password")
    raw.seek(member.header_offset)
    signature, name_length, extra_length = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
    if signature != b"PK\x03\x04":
        raise InputError(f"{path}: is a damaged workbook (a part's header is missing)")
    raw.seek(name_length + extra_length, io.SEEK_CUR)
    left = member.compress_size
    if member.compress_type == zipfile.ZIP_STORED:
        inflate = None
    elif member.compress_type == zipfile.ZIP_DEFLATED:
        inflate = zlib.decompressobj(-zlib.MAX_WBITS)
    else:
        raise InputError(
            f"{path}: part {member.filename!r} uses compression method "
            f"{member.compress_type}, which batchjob does not read; save it again from Excel"
        )
    produced = 0
    while left > 0 or (inflate is not None and inflate.unconsumed_tail):
        if inflate is None or not inflate.unconsumed_tail:
            data = raw.read(min(left, _ZIP_READ))
            if not data:
                break
            left -= len(data)
        else:
            data = inflate.unconsumed_tail
        out = data if inflate is None else inflate.decompress(data, _ZIP_READ)
        produced += len(out)
        if produced > member.file_size:
            raise InputError(
                f"{path}: part {member.filename!r} unpacks to more than the {member.file_size:,} "
                "bytes it declares: the workbook is damaged or built to attack readers"
            )
        if produced > limit:
            raise _too_big(path, "unpacks to more bytes than that")
        yield out


def _xlsx_sheet_names(archive: zipfile.ZipFile) -> dict[str, str]:
    """Part name -> sheet name, from the workbook's relationships; {} when they are unreadable.

    Only for messages: every part is scanned whatever these say.
    """
    try:
        rels = archive.read("xl/_rels/workbook.xml.rels")
        book = archive.read("xl/workbook.xml")
    except (KeyError, zipfile.BadZipFile, OSError, RuntimeError, zlib.error):
        return {}
    if len(rels) > _ZIP_READ or len(book) > 16 * _ZIP_READ:
        return {}
    targets: dict[bytes, str] = {}
    for tag in _RELATIONSHIP.finditer(rels):
        ident, target = _attribute(rels, tag.end(), b"Id"), _attribute(rels, tag.end(), b"Target")
        if ident is not None and target:
            text = target.decode(errors="replace")
            targets[ident] = text.lstrip("/") if text.startswith("/") else "xl/" + text
    names: dict[str, str] = {}
    for tag in _SHEET_ENTRY.finditer(book):
        name, ident = _attribute(book, tag.end(), b"name"), _attribute(book, tag.end(), b"r:id")
        if name is not None and ident in targets:
            names[targets[ident]] = html.unescape(name.decode(errors="replace"))
    return names


class _Scanner:
    def feed(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> list[tuple[str | None, _Extent]]:
        raise NotImplementedError


def _member_scanner(suffix: str, name: str, binary_sheets: set[str]) -> _Scanner | None:
    if suffix == ".ods":
        return _OdsScanner() if name == "content.xml" else None  # the engine reads only that
    if suffix == ".xlsb":
        return _XlsbScanner() if name in binary_sheets else None
    # Every part, whatever its name: a sheet can be any part the workbook points to, and no
    # other part holds <c> or <row> tags by chance.
    return _XlsxScanner()


def _xlsb_sheet_parts(archive: zipfile.ZipFile) -> set[str]:
    """Every part the binary workbook's relationships point to: its sheets are among them.

    (Other parts may be XML or images, which are no record streams: those are skipped.)
    """
    try:
        rels = archive.read("xl/_rels/workbook.bin.rels")
    except (KeyError, zipfile.BadZipFile, OSError, RuntimeError, zlib.error):
        rels = b""
    parts = {name for name in archive.namelist() if "worksheets/" in name}
    for tag in _RELATIONSHIP.finditer(rels[: 16 * _ZIP_READ]):
        target = _attribute(rels, tag.end(), b"Target")
        if target:
            text = target.decode(errors="replace")
            parts.add(text.lstrip("/") if text.startswith("/") else "xl/" + text)
    # A relationship may also point to XML (a theme): not a record stream.
    return {name for name in parts if not _starts_like_xml(archive, name)}


def _starts_like_xml(archive: zipfile.ZipFile, name: str) -> bool:
    try:
        with archive.open(name) as part:
            return part.read(4).lstrip(codecs.BOM_UTF8).startswith(b"<")
    except (KeyError, zipfile.BadZipFile, OSError, RuntimeError, zlib.error):
        return False


class _XlsxScanner(_Scanner):
    """Where a sheet's ``<c r="...">`` cells reach, as calamine places them.

    A cell without ``r`` follows the previous one in its row; a row without ``r`` follows the
    previous row. Only ``<row>`` and ``<c>`` start tags are looked at, found by one regex
    search each, so a sheet costs a fraction of what parsing it does.
    """

    def __init__(self) -> None:
        self.extent = _Extent()
        self.row = 0  # 1-based; the current row
        self.column = 0
        self.carry = b""

    def feed(self, data: bytes) -> None:
        data = self.carry + data
        # No tag holds a '<', so tags never straddle the cut.
        cut = data.rfind(b"<")
        if cut < 0:
            self.carry = b""
            return
        self.carry = data[cut:]
        if len(self.carry) > _ZIP_READ:
            raise ValueError("a tag longer than 1 MiB")
        self._scan(data, cut)

    def _scan(self, data: bytes, end: int) -> None:
        if not self._scan_plain(data, end):
            self._scan_any(data, end)

    def _scan_plain(self, data: bytes, end: int) -> bool:
        """The usual sheet, where every tag reads ``<row r="N"`` or ``<c r="AN"``: numpy passes,
        no per-cell Python. False, having changed nothing, for any other sheet."""
        a = np.frombuffer(data, dtype=np.uint8, count=end)
        opening = np.flatnonzero(a == ord("<"))
        if not len(opening):
            return True
        colons = np.flatnonzero(a == ord(":"))
        a = np.concatenate([a, np.zeros(16, dtype=np.uint8)])  # reads past a tag stay inside

        def byte(offset: int, at: Positions) -> npt.NDArray[np.uint8]:
            found: npt.NDArray[np.uint8] = a[at + offset]
            return found

        # A namespace prefix (<x:c ...>) is legal and rare: such a sheet takes the slow scan.
        if (
            (byte(1, colons) == ord("c")) & np.isin(byte(2, colons), _NAME_ENDS)
            | (byte(1, colons) == ord("r")) & (byte(2, colons) == ord("o"))
        ).any():
            return False

        first = byte(1, opening)
        opening = opening[(first == ord("c")) | (first == ord("r"))]
        cell = (byte(1, opening) == ord("c")) & np.isin(byte(2, opening), _NAME_ENDS)
        row = (
            (byte(1, opening) == ord("r"))
            & (byte(2, opening) == ord("o"))
            & (byte(3, opening) == ord("w"))
            & np.isin(byte(4, opening), _NAME_ENDS)
        )
        cells, rows = opening[cell], opening[row]
        if not (_follows(a, cells + 2, b' r="') and _follows(a, rows + 4, b' r="')):
            return False
        columns, cell_rows = _references(a, cells + 6, letters=True)
        _, row_numbers = _references(a, rows + 8, letters=False)
        if columns is None or cell_rows is None or row_numbers is None:
            return False
        if len(cells):
            self.extent.reach(int(cell_rows.max()), int(columns.max()))
        if len(rows):
            self.extent.reach(int(row_numbers.max()), 0)
            self.row = int(row_numbers[-1])
        # The state a cell without "r" in the next chunk would continue from.
        after_row = not len(cells) or (len(rows) and rows[-1] > cells[-1])
        self.column = 0 if after_row else int(columns[-1])
        return True

    def _scan_any(self, data: bytes, end: int) -> None:
        for found in _XML_CELL.finditer(data, 0, end):
            reference = _attribute(data, found.end(), b"r")
            if found.group(1) == b"row":
                self.row = int(reference) if reference and reference.isdigit() else self.row + 1
                self.column = 0
                continue
            if reference is None:
                self.column += 1
                row = max(self.row, 1)
            else:
                letters, digits = _CELL_REF.fullmatch(reference).groups()  # type: ignore[union-attr]
                self.column = _column_number(letters) if letters else self.column + 1
                row = int(digits) if digits else max(self.row, 1)
            self.extent.reach(row, self.column)

    def close(self) -> list[tuple[str | None, _Extent]]:
        self._scan(self.carry, len(self.carry))
        return [(None, self.extent)]


def _follows(a: npt.NDArray[np.uint8], at: Positions, text: bytes) -> bool:
    """Whether ``text`` is at every one of ``at``."""
    return all(bool((a[at + i] == char).all()) for i, char in enumerate(text))


def _references(
    a: npt.NDArray[np.uint8], at: Positions, *, letters: bool
) -> tuple[npt.NDArray[np.int64] | None, npt.NDArray[np.int64] | None]:
    """Column (1-based, from up to three letters) and row of each ``"AB12"`` value at ``at``;
    None when any is unusual (more letters or digits, no closing quote): the slow scan decides.
    """
    columns = np.zeros(len(at), dtype=np.int64)
    if letters:
        active = np.ones(len(at), dtype=np.bool_)
        for _ in range(3):
            upper = a[at] & 0xDF
            letter = active & (upper >= ord("A")) & (upper <= ord("Z"))
            columns = np.where(
                letter, columns * 26 + upper.astype(np.int64) - ord("A") + 1, columns
            )
            at = at + letter
            active = letter
    rows = np.zeros(len(at), dtype=np.int64)
    digits = np.zeros(len(at), dtype=np.int64)
    active = np.ones(len(at), dtype=np.bool_)
    for _ in range(8):
        value = a[at]
        digit = active & (value >= ord("0")) & (value <= ord("9"))
        rows = np.where(digit, rows * 10 + value.astype(np.int64) - ord("0"), rows)
        at = at + digit
        digits += digit
        active = digit
    if len(at) and (not (a[at] == ord('"')).all() or not digits.all()):
        return None, None
    return columns, rows


def _attribute(data: bytes, at: int, name: bytes) -> bytes | None:
    """The value of attribute ``name`` of the start tag whose attributes begin at ``at``."""
    while True:
        found = _XML_ATTRIBUTE.match(data, at)
        if found is None:
            return None
        if found.group(1) == name:
            value = found.group(2) if found.group(2) is not None else found.group(3)
            return value.strip()
        at = found.end()


def _column_number(letters: bytes) -> int:
    number = 0
    for letter in letters.upper():
        number = number * 26 + letter - ord("A") + 1
    return number


class _OdsScanner(_Scanner):
    """Where each table's non-empty cells reach, repeats included (``content.xml``).

    LibreOffice ends every sheet with empty rows and cells repeated to the sheet's edge; the
    engine drops those, so only cells with a value count. Parsed with expat: ODS is rare and
    its repeat counts need the structure.
    """

    def __init__(self) -> None:
        self.tables: list[tuple[str | None, _Extent]] = []
        self.parser = xml.parsers.expat.ParserCreate()
        self.parser.StartElementHandler = self._start
        self.parser.EndElementHandler = self._end
        self.row = 0  # rows before the current one
        self.row_repeats = 1
        self.column = 0  # cells before the current one in its row
        self.cell_repeats = 0
        self.filled = False  # the current cell holds something
        self.row_reach = 0  # where the current row's filled cells end
        self.depth = 0  # inside a cell

    def _start(self, name: str, attributes: dict[str, str]) -> None:
        local = name.rpartition(":")[2]
        if self.depth:
            self.depth += 1
            self.filled = True  # any element inside a cell is content
            return
        if local == "table":
            self.tables.append((attributes.get("table:name"), _Extent()))
            self.row = 0
        elif local == "table-row":
            self.row_repeats = _repeats(attributes.get("table:number-rows-repeated"))
            self.column = 0
            self.row_reach = 0
        elif local in ("table-cell", "covered-table-cell"):
            self.cell_repeats = _repeats(attributes.get("table:number-columns-repeated"))
            self.filled = any(
                key.endswith(("value", "value-type", "formula")) for key in attributes
            )
            self.depth = 1

    def _end(self, name: str) -> None:
        local = name.rpartition(":")[2]
        if self.depth > 1:
            self.depth -= 1
            return
        if self.depth == 1:
            self.depth = 0
            self.column += self.cell_repeats
            if self.filled:
                self.row_reach = self.column
            return
        if local == "table-row":
            self.row += self.row_repeats
            if self.row_reach and self.tables:
                extent = self.tables[-1][1]
                extent.reach(self.row, self.row_reach)
                if extent.cells > MAX_SHEET_CELLS:
                    raise _SheetTooBig(self.tables[-1][0], extent)

    def feed(self, data: bytes) -> None:
        self.parser.Parse(data, False)

    def close(self) -> list[tuple[str | None, _Extent]]:
        self.parser.Parse(b"", True)
        return self.tables


class _SheetTooBig(Exception):
    """Stops a scan as soon as a sheet is known to be too big (a repeat can say 10^9 rows)."""

    def __init__(self, sheet: str | None, extent: _Extent) -> None:
        super().__init__(sheet)
        self.sheet = sheet
        self.extent = extent


def _repeats(value: str | None) -> int:
    if value is None:
        return 1
    try:
        return max(1, int(value))
    except ValueError:
        return 1


class _XlsbScanner(_Scanner):
    """Where a binary sheet's cells reach: BrtRowHdr sets the row, cell records the column."""

    def __init__(self) -> None:
        self.extent = _Extent()
        self.buffer = b""
        self.row = 0

    def feed(self, data: bytes) -> None:
        self.buffer += data
        at = 0
        buffer = self.buffer
        while True:
            record = _xlsb_record(buffer, at)
            if record is None:
                break
            kind, start, end = record
            if kind == 0 and end - start >= 4:  # BrtRowHdr
                (self.row,) = struct.unpack_from("<I", buffer, start)
            elif 2 <= kind <= 11 and end - start >= 4:  # cell records: the column first
                (column,) = struct.unpack_from("<I", buffer, start)
                self.extent.reach(min(self.row, 0x100000) + 1, column + 1)
                if self.extent.cells > MAX_SHEET_CELLS:
                    raise _SheetTooBig(None, self.extent)
            at = end
        self.buffer = buffer[at:]

    def close(self) -> list[tuple[str | None, _Extent]]:
        return [(None, self.extent)]


def _xlsb_record(data: bytes, at: int) -> tuple[int, int, int] | None:
    """(type, start, end) of the record at ``at`` if all of it is in ``data``."""
    kind = 0
    for shift in (0, 7):
        if at >= len(data):
            return None
        byte = data[at]
        at += 1
        kind |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    size = 0
    for shift in (0, 7, 14, 21):
        if at >= len(data):
            return None
        byte = data[at]
        at += 1
        size |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    if at + size > len(data):
        return None
    return kind, at, at + size


# --- .xls: a compound file holding a BIFF record stream ---

_CFB_END: Final = 0xFFFFFFFE
_CFB_FREE: Final = 0xFFFFFFFF
_BIFF_CELLS: Final = frozenset({0x0203, 0x0204, 0x00D6, 0x0205, 0x027E, 0x00FD, 0x0006})
_BIFF_MUL_RK: Final = 0x00BD
_BIFF_BOF: Final = 0x0809
_BIFF_SHEET: Final = 0x0085


def _check_xls(path: str) -> None:
    """Bound an old-format workbook's sheets (rows and columns are 16-bit there, so one stray
    cell can still ask for 65,536 x 65,536 cells)."""
    size = Path(path).stat().st_size
    if size > MAX_UNPACKED_BYTES:
        raise _too_big(path, f"holds {size:,} bytes")
    try:
        stream = _cfb_stream(Path(path).read_bytes(), ("workbook", "book"))
    except (ValueError, IndexError, struct.error):
        return  # not a compound file we can walk: the engine will refuse it
    if stream is None:
        return
    names: dict[int, str] = {}
    extent: _Extent | None = None
    sheet = "?"
    at = 0
    while at + 4 <= len(stream):
        kind, size = struct.unpack_from("<HH", stream, at)
        data = stream[at + 4 : at + 4 + size]
        if kind == _BIFF_SHEET and len(data) >= 8:
            (offset,) = struct.unpack_from("<I", data)
            names[offset] = _biff_sheet_name(data)
        elif kind == _BIFF_BOF:
            if extent is not None:
                _check_extent(path, sheet, extent)
            extent, sheet = _Extent(), names.get(at, f"at byte {at}")
        elif extent is not None and kind in _BIFF_CELLS and len(data) >= 4:
            row, column = struct.unpack_from("<HH", data)
            extent.reach(row + 1, column + 1)
        elif extent is not None and kind == _BIFF_MUL_RK and len(data) >= 6:
            row, _ = struct.unpack_from("<HH", data)
            (last,) = struct.unpack_from("<H", data, len(data) - 2)
            extent.reach(row + 1, last + 1)
        at += 4 + size
    if extent is not None:
        _check_extent(path, sheet, extent)


def _biff_sheet_name(data: bytes) -> str:
    length, wide = data[6], data[7] & 1 if len(data) > 7 else 0
    raw = data[8 : 8 + length * (2 if wide else 1)]
    return raw.decode("utf-16-le" if wide else "latin-1", errors="replace")


def _cfb_stream(data: bytes, wanted: tuple[str, ...]) -> bytes | None:
    """The first stream named one of ``wanted`` (case-insensitive) in a compound file."""
    sector = 1 << struct.unpack_from("<H", data, 0x1E)[0]
    mini_sector = 1 << struct.unpack_from("<H", data, 0x20)[0]
    (directory_start,) = struct.unpack_from("<I", data, 0x30)
    cutoff, mini_fat_start = struct.unpack_from("<II", data, 0x38)
    difat_start, difat_count = struct.unpack_from("<II", data, 0x44)
    if not 128 <= sector <= 1 << 16 or not 8 <= mini_sector <= sector:
        raise ValueError("bad sector size")
    sectors = max(0, (len(data) - 512) // sector)

    def at(index: int) -> bytes:
        if index >= sectors:
            raise ValueError("sector out of range")
        return data[(index + 1) * sector : (index + 2) * sector]

    fat_sectors = list(struct.unpack_from("<109I", data, 0x4C))
    index = difat_start
    for _ in range(min(difat_count, sectors)):
        if index >= _CFB_END:
            break
        words = struct.unpack(f"<{sector // 4}I", at(index))
        fat_sectors.extend(words[:-1])
        index = words[-1]
    fat = b"".join(at(i) for i in fat_sectors if i < _CFB_END)
    table = struct.unpack(f"<{len(fat) // 4}I", fat)

    def chain(start: int, links: Sequence[int], limit: int) -> list[int]:
        found: list[int] = []
        while start < _CFB_END and len(found) <= limit:
            found.append(start)
            start = links[start] if start < len(links) else _CFB_END
        return found

    directory = b"".join(at(i) for i in chain(directory_start, table, sectors))
    entries = [directory[i : i + 128] for i in range(0, len(directory) - 127, 128)]
    if not entries:
        return None
    root_start, _ = struct.unpack_from("<IQ", entries[0], 0x74)
    for entry in entries:
        length = min(struct.unpack_from("<H", entry, 0x40)[0], 64)
        name = entry[: max(0, length - 2)].decode("utf-16-le", errors="replace").lower()
        if entry[0x42] != 2 or name not in wanted:
            continue
        start, size = struct.unpack_from("<IQ", entry, 0x74)
        size &= 0xFFFFFFFF  # version 3 files leave the high half undefined
        if size >= cutoff:
            return b"".join(at(i) for i in chain(start, table, sectors))[:size]
        mini_fat = b"".join(at(i) for i in chain(mini_fat_start, table, sectors))
        mini_table = struct.unpack(f"<{len(mini_fat) // 4}I", mini_fat)
        mini_stream = b"".join(at(i) for i in chain(root_start, table, sectors))
        return b"".join(
            mini_stream[i * mini_sector : (i + 1) * mini_sector]
            for i in chain(start, mini_table, len(mini_stream) // mini_sector)
        )[:size]
    return None


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
    key, key_codes = _clean_keys(key)
    key_empty = key_codes == _KEY_EMPTY
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
    if key_empty.any():
        blank = key_empty & np.asarray(events.empty, dtype=np.bool_)[codes]
        if overflow is not None:
            blank &= ~overflow
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


# Why a key is unusable, per row: the index into _key_problem_texts. Most significant first: a
# row with several problems shows the first.
_KEY_OK: Final = 0
_KEY_EMPTY: Final = 1
_KEY_TOO_LONG: Final = 2
_KEY_CONTROL: Final = 3
_KEY_APOSTROPHE: Final = 4
_APOSTROPHE: Final = ord("'")
_CONTROL: Final = "[\x00-\x1f\x7f-\x9f]"


def _key_problem_texts(name: str) -> list[str]:
    return [
        "",
        f"column '{name}' is empty",
        f"column '{name}': the key is longer than {MAX_KEY_CHARS} characters",
        f"column '{name}': the key holds a control character (such as NUL, a tab or a line break)",
        f"column '{name}': the key starts with an apostrophe, which spreadsheets take for a "
        "text marker and drop; remove it if it is not part of the key",
    ]


def _clean_keys(key: pd.Series) -> tuple[pd.Series, npt.NDArray[np.int8]]:
    """Keys stripped and unescaped, and each one's ``_KEY_*`` code.

    Stripping a million keys costs more than the checks that usually show it changes nothing;
    on the usual file (printable ASCII, none starting with an apostrophe) every check here is
    a reduction or two over the keys' bytes, no per-key work.
    """
    found = KeyBytes.of_series(key)
    if found is None or found.may_need_strip():
        key = key.str.strip()
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
    return key, codes


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
    "MAX_KEY_CHARS",
    "MAX_SHEET_CELLS",
    "MAX_UNPACKED_BYTES",
    "ColumnAliases",
    "InputError",
    "Inputs",
    "canonical_event_id",
    "normalise_header",
    "read_inputs",
]
