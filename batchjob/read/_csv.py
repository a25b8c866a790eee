"""Reading CSV/TSV exports: encoding, delimiter and header found, then parsed by pyarrow.

pyarrow is called directly (multi-threaded, with ``newlines_in_values`` so quoted newlines are
safe across block boundaries): pandas' own ``engine="pyarrow"`` cannot set that option and
splits such records on big files. pyarrow rejects rows whose field count differs from the
header's; those files are re-read with pandas' C engine, which pads short rows. A file that
is not consistently one encoding is refused, naming its first bad row.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import mmap
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from batchjob._errors import InputError
from batchjob.read._columns import _check_event_source, _Columns, _list_names, _Matcher
from batchjob.read._findings import Findings
from batchjob.read._identity import as_arrow, find_identity, joined_arrow
from batchjob.read._normalise import CellFacts, ReadOptions, _normalise, _Part
from batchjob.read._shared import (
    _BOMS,
    _CHUNK_BYTES,
    _DELIMITERS,
    _HEADER_LINE,
    _LINE,
    _OLE2_MAGIC,
    _QUOTED,
    _ZIP_MAGIC,
    pa,
    pa_csv,
)


@dataclass(frozen=True)
class _CsvLayout:
    encoding: str
    delimiter: str
    skip: int  # records before the header (blank lines and title rows)
    columns: _Columns
    titles: bool = False  # some of the skipped records hold text

    @property
    def first_row(self) -> int:
        """The first data row's number: the header is record ``skip + 1``, as in a spreadsheet."""
        return self.skip + 2


def _read_csv(
    path: str,
    head: bytes,
    whole: bool,
    matcher: _Matcher,
    options: ReadOptions,
    findings: Findings,
) -> _Part:
    default = options.default
    encoding = _csv_encoding(path, head, whole)
    layout = _csv_layout(path, head, whole, encoding, matcher, default)
    _check_event_source(path, layout.columns, default, matcher)
    # Before any parsing: a missing identity column fails fast, whatever the file's size.
    identity = (
        find_identity(path, layout.columns.names, options.identity) if options.identity else ()
    )
    if encoding == "cp1252":
        _refuse_mixed_encodings(path, layout)
    try:
        event, key, overflow, identities = _read_csv_fast(path, layout, identity)
    except (pa.lib.ArrowException, UnicodeError):
        if encoding in ("utf-8", "utf-8-sig") and not _decodes(path, encoding):
            if encoding == "utf-8-sig":
                raise _undecodable(path, encoding) from None
            layout = _csv_layout(path, head, whole, "cp1252", matcher, default)
            _refuse_mixed_encodings(path, layout)
            if options.identity:  # the header decoded anew may spell its names otherwise
                identity = find_identity(path, layout.columns.names, options.identity)
        event, key, overflow, identities = _read_csv_tolerant(path, layout, identity)
    if layout.titles:
        findings.headers.append(f"header found on row {layout.skip + 1} of {path}")
    return _normalise(
        source=path,
        columns=layout.columns,
        event=event,
        key=key,
        first_row=layout.first_row,
        overflow=overflow,
        overflow_problem=_overflow_problem(layout),
        options=options,
        findings=findings,
        cp1252=layout.encoding == "cp1252",
        facts=CellFacts(content=lambda blank: _other_content(path, layout, blank)),
        identity=identities,
    )


def _other_content(
    path: str, layout: _CsvLayout, blank: npt.NDArray[np.bool_]
) -> npt.NDArray[np.bool_] | None:
    """Which ``blank`` rows (no key, no event) hold something in another field (a note, say):
    those are reported, not dropped. The file is read again, all columns, only when there are
    blank rows."""
    if len(layout.columns.names) <= len(_used(layout.columns)):
        return None
    try:
        frame = pd.read_csv(
            path,
            sep=layout.delimiter,
            encoding=layout.encoding,
            header=None,
            skiprows=layout.skip + 1,
            names=_synthetic_names(len(layout.columns.names)),
            dtype=str,
            na_filter=False,
            skip_blank_lines=False,
            index_col=False,
            engine="c",
        )
    except (ValueError, UnicodeError, pd.errors.ParserError):
        return None  # the read that gave the rows succeeded; this extra look is best effort
    if len(frame) != len(blank):
        return None
    others = frame.drop(columns=[frame.columns[i] for i in _used(layout.columns)])
    content: npt.NDArray[np.bool_] = (others.fillna("").apply(lambda c: c.str.strip()) != "").any(
        axis=1
    ).to_numpy(dtype=np.bool_) & blank
    return content if content.any() else None


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
    if encoding in ("utf-8", "utf-8-sig"):
        offset = _first_non_utf8(path)
        if offset is not None:
            (row,) = _record_numbers(path, [offset])
            marked = " (it starts with a UTF-8 byte order mark)" if encoding == "utf-8-sig" else ""
            return InputError(
                f"{path}: is not valid UTF-8{marked}: row {row} holds a byte that is not; save "
                "the file again as UTF-8 (Excel: 'CSV UTF-8') and rerun"
            )
    return InputError(f"{path}: cannot be decoded as {encoding}")


def _unclosed_quote(path: str) -> int | None:
    """The offset of the quote that is never closed, if any: with an odd number of '"' in
    the file, the last one opens a value (a doubled quote inside a value counts two)."""
    total = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            total += chunk.count(b'"')
    if total % 2 == 0:
        return None
    base = 0
    seen = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            here = chunk.count(b'"')
            if seen + here >= total:
                quotes = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == ord('"'))
                return base + int(quotes[total - seen - 1])
            seen += here
            base += len(chunk)
    return None


#: The header is looked for in this many records from the top (title rows may sit above it).
HEADER_SEARCH_ROWS = 20


def _csv_layout(
    path: str, head: bytes, whole: bool, encoding: str, matcher: _Matcher, default: str | None
) -> _CsvLayout:
    """Where the header is: within the first records, the first that names the key column (and
    the event column, unless --event-id is given), else the first naming the key column."""
    try:
        text = codecs.getincrementaldecoder(encoding)().decode(head, final=whole)
    except UnicodeDecodeError:
        raise _undecodable(path, encoding) from None
    position = 0
    first: list[str] | None = None
    found: list[tuple[int, str, _Columns, bool]] = []
    ambiguous: InputError | None = None
    titles = False
    for skip in range(HEADER_SEARCH_ROWS):
        match = _LINE.match(text, position)
        assert match is not None  # the pattern matches the empty string
        line, ending = match.groups()
        if line.strip(" \t,;"):
            delimiter = _detect_delimiter(line)
            reader = csv.reader(io.StringIO(line, newline=""), delimiter=delimiter)
            names = [name.strip() for name in next(reader, [])]
            first = first if first is not None else names
            try:
                columns = matcher.find(path, names)
            except InputError as exc:
                ambiguous, columns = ambiguous or exc, None
            if columns is not None:
                found.append((skip, delimiter, columns, titles))
                if columns.event is not None or default is not None:
                    break
            titles = True
        if not ending:
            break
        position = match.end()
    if found:
        chosen = found[-1] if found[-1][2].event is not None or default is not None else found[0]
        skip, delimiter, columns, titles = chosen
        return _CsvLayout(
            encoding=encoding, delimiter=delimiter, skip=skip, columns=columns, titles=titles
        )
    if ambiguous is not None:
        raise ambiguous
    if first is None:
        raise InputError(f"{path}: has no header row (the file holds only blank lines)")
    binary = " (it holds NUL bytes: is it a text file?)" if b"\x00" in head else ""
    raise InputError(
        f"{path}: no order ticket key column{binary}; its columns are: "
        f"{_list_names(first)}. {matcher.no_key_hint()}; the header must be in one of the "
        f"first {HEADER_SEARCH_ROWS} rows"
    )


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


def _read_csv_fast(
    path: str, layout: _CsvLayout, identity: Sequence[int] = ()
) -> tuple[pd.Series | None, pd.Series, None, pd.Series | None]:
    """pyarrow, all cores; raises on any row whose field count differs from the header's.

    The ``identity`` columns (indices) are parsed as well, and joined; None without them.
    """
    columns = layout.columns
    names = _synthetic_names(len(columns.names))
    types = {names[columns.key]: pa.large_string()}
    if columns.event is not None:
        # Parsing straight into a dictionary keeps the few distinct events compact from the start.
        types[names[columns.event]] = pa.dictionary(pa.int32(), pa.large_string())
    included = _used(columns)
    for at in identity:
        types.setdefault(names[at], pa.large_string())
        if at not in included:
            included.append(at)
    mapped = _map(path)
    table = pa_csv.read_csv(
        path if mapped is None else pa.BufferReader(pa.py_buffer(mapped)),
        read_options=_read_options(layout, names, use_threads=True),
        parse_options=_parse_options(layout, quoted=mapped is None or mapped.find(b'"') >= 0),
        convert_options=pa_csv.ConvertOptions(
            include_columns=[names[i] for i in included],
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
    identities = None
    if identity:
        identities = joined_arrow([table.column(names[at]) for at in identity])
    return event, key, None, identities


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
    path: str, layout: _CsvLayout, identity: Sequence[int] = ()
) -> tuple[pd.Series | None, pd.Series, npt.NDArray[np.bool_] | None, pd.Series | None]:
    """pandas' C engine: pads short rows and ignores extra fields, which we then flag.

    The ``identity`` columns (indices) are read as well, and joined; None without them.
    """
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
            usecols=sorted({*_used(columns), *identity}) if identity else _used(columns),
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
        opened = _unclosed_quote(path) if "EOF inside string" in str(exc) else None
        if opened is not None:
            # pandas numbers rows from after the header, from 0, so it named the wrong row.
            (row,) = _record_numbers(path, [opened])
            raise InputError(
                f'{path}: row {row} opens a quote (") that is never closed, so the rest of the '
                "file would be one value; close or remove that quote"
            ) from None
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
    identities = None
    if identity:
        # A short row's missing fields are empty, as for the key.
        identities = joined_arrow([as_arrow(frame[names[at]].fillna("")) for at in identity])
    return event, key, overflow, identities


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
