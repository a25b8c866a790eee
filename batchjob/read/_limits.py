"""Workbooks that attack the reader: refused before calamine opens them.

calamine allocates a sheet's whole area from where its cells claim to be, so one cell at
``XFD1048576`` in a 5 KB file asks for 512 GiB, and a zip bomb unpacks to gigabytes. Every part
of an archive is unpacked here with a running count of what it really produces, and each
sheet's cell positions are scanned without building the cells (.xlsx/.xlsm XML, .xlsb
records, .ods repeats, .xls BIFF records): a workbook past the limits stops with exit 2,
naming the file and sheet.
"""

from __future__ import annotations

import codecs
import html
import io
import re
import struct
import xml.parsers.expat
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from batchjob._errors import InputError
from batchjob.read._keybytes import Rows
from batchjob.read._shared import _OLE2_MAGIC

#: A workbook's parts may unpack to at most this many bytes, all together (a zip bomb stops here).
MAX_UNPACKED_BYTES: Final = 1 << 30
#: A sheet may span at most this many cells, from A1 to its last row and column (calamine and
#: pandas hold every cell of that rectangle, empty or not: ~100 bytes each).
MAX_SHEET_CELLS: Final = 1 << 24
#: The widest sheet each format can hold (XFD; IV for .xls). pandas costs ~50 us and ~3 KB per
#: column on top of the cells, so a 5 KB file with one cell at BGQCV16 (16M cells, a million
#: columns) took a minute and 3 GB; at XFD1024, the widest sheet within the cell limit, ~5 s.
MAX_COLUMNS: Final = 16_384
MAX_XLS_COLUMNS: Final = 256
MAX_XLS_ROWS: Final = 65_536
#: A declared count of shared strings may exceed the strings really there by this much (calamine
#: reserves room for the declared count up front: 4,294,967,295 of them is 103 GB).
_COUNT_SLACK: Final = 1 << 16

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
_SST_TAG = re.compile(rb"<(?:[\w.-]+:)?sst(?=[\s/>])")
_SI_TAG = re.compile(rb"<(?:[\w.-]+:)?si(?=[\s/>])")
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


def _check_extent(path: str, sheet: str, extent: _Extent, max_columns: int = MAX_COLUMNS) -> None:
    corner = f"{_column_letters(extent.columns)}{extent.rows}"
    if extent.columns > max_columns:
        raise InputError(
            f"{path}: sheet {sheet!r} has cells as far as {corner} ({extent.columns:,} "
            f"columns), wider than the {max_columns:,} (column {_column_letters(max_columns)}) "
            "such a workbook can have; the workbook is damaged or built to attack readers: "
            "copy the data to a new workbook, or export it as CSV"
        )
    if extent.cells <= MAX_SHEET_CELLS:
        return
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
            _check_zip_workbook(path, archive, raw)
    except zipfile.BadZipFile as exc:
        raise InputError(f"{path}: cannot be read as a {suffix} workbook: {exc}") from exc


def _check_zip_workbook(path: str, archive: zipfile.ZipFile, raw: Any) -> None:
    members = archive.infolist()
    if len(members) > _MAX_PARTS:
        raise InputError(
            f"{path}: has {len(members):,} parts, more than the {_MAX_PARTS:,} batchjob reads "
            "from a workbook; export the data as CSV instead"
        )
    declared = sum(member.file_size for member in members)
    if declared > MAX_UNPACKED_BYTES:
        raise _too_big(path, f"declares {declared:,} bytes unpacked")
    names = _xlsx_sheet_names(archive)
    # The engine finds the format from the content, not the file's name (an .xlsx renamed .ods
    # is read as .xlsx), so every format's check runs on whatever parts that format would read.
    binary_sheets = _xlsb_sheet_parts(archive)
    left = MAX_UNPACKED_BYTES
    for member in members:
        scanners = _member_scanners(member.filename, binary_sheets)
        sheet = names.get(member.filename, member.filename)
        produced = 0
        found: list[tuple[str | None, _Extent]] = []
        try:
            for chunk in _unpack(path, raw, member, left):
                produced += len(chunk)
                for scan in scanners:
                    scan.feed(chunk)
            for scan in scanners:
                found.extend(scan.close())
        except _SheetTooBig as exc:
            found = [(exc.sheet, exc.extent)]
        except _Refused as exc:
            where = f"part {member.filename!r}" if exc.whole_part else f"sheet {sheet!r}"
            raise InputError(f"{path}: {where} {exc}") from None
        left -= produced
        for name, extent in found:
            _check_extent(path, name or sheet, extent)


class _Refused(Exception):
    """A part the engine would misread or die on; the text follows "<file>: sheet <name>" (or
    "<file>: part <name>" for a part that is no sheet)."""

    def __init__(self, text: str, *, whole_part: bool = False) -> None:
        super().__init__(text)
        self.whole_part = whole_part


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


class _TagScanner(_Scanner):
    """A scanner of XML fed in blocks: each block is cut after its last complete tag, and the
    rest carried to the next (no tag holds a '<', so tags never straddle the cut)."""

    carry = b""

    def feed(self, data: bytes) -> None:
        data = self.carry + data
        cut = data.rfind(b"<")
        if cut < 0:
            self.carry = b""
            return
        self.carry = data[cut:]
        if len(self.carry) > _ZIP_READ:
            raise ValueError("a tag longer than 1 MiB")
        self._scan(data, cut)

    def _scan(self, data: bytes, end: int) -> None:
        raise NotImplementedError


def _member_scanners(name: str, binary_sheets: set[str]) -> list[_Scanner]:
    # Every part, whatever its name: a sheet can be any part the workbook points to, and no
    # other part holds <c> or <row> tags by chance.
    scanners: list[_Scanner] = [_XlsxScanner()]
    folded = name.replace("\\", "/").lower()  # the engine finds parts ignoring case
    if folded == "content.xml":
        scanners.append(_OdsScanner())
    if folded.rpartition("/")[2] == "sharedstrings.xml":
        scanners.append(_SharedStringsScanner())
    if name in binary_sheets:
        scanners.append(_XlsbScanner())
    return scanners


def _xlsb_sheet_parts(archive: zipfile.ZipFile) -> set[str]:
    """Every part the binary workbook's relationships point to: its sheets are among them.

    (Other parts may be XML or images, which are no record streams: those are skipped.)
    """
    folded = {name.replace("\\", "/").lower(): name for name in archive.namelist()}
    if "xl/workbook.bin" not in folded:
        return set()  # not a binary workbook: the engine reads no record streams
    try:
        rels = archive.read(folded.get("xl/_rels/workbook.bin.rels", "xl/_rels/workbook.bin.rels"))
    except (KeyError, zipfile.BadZipFile, OSError, RuntimeError, zlib.error):
        rels = b""
    parts = {name for name in archive.namelist() if "worksheets/" in name.lower()}
    for tag in _RELATIONSHIP.finditer(rels[: 16 * _ZIP_READ]):
        target = _attribute(rels, tag.end(), b"Target")
        if target:
            text = target.decode(errors="replace")
            text = text.lstrip("/") if text.startswith("/") else "xl/" + text
            parts.add(folded.get(text.lower(), text))
    # A relationship may also point to XML (a theme): not a record stream.
    return {name for name in parts if not _starts_like_xml(archive, name)}


def _starts_like_xml(archive: zipfile.ZipFile, name: str) -> bool:
    try:
        with archive.open(name) as part:
            return part.read(4).lstrip(codecs.BOM_UTF8).startswith(b"<")
    except (KeyError, zipfile.BadZipFile, OSError, RuntimeError, zlib.error):
        return False


class _XlsxScanner(_TagScanner):
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

        def byte(offset: int, at: Rows) -> npt.NDArray[np.uint8]:
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
                match = _CELL_REF.fullmatch(reference)
                if match is None:
                    # The engine stops at such a reference (or, for one it does take, places
                    # the cell where this scan cannot follow): refused either way.
                    shown = reference[:40].decode(errors="replace")
                    raise _Refused(
                        f"has a cell at {shown!r}, which is no cell reference Excel writes; "
                        "the workbook is damaged or built to attack readers: copy the data "
                        "to a new workbook, or export it as CSV"
                    )
                letters, digits = match.groups()
                self.column = _column_number(letters) if letters else self.column + 1
                row = int(digits) if digits else max(self.row, 1)
            self.extent.reach(row, self.column)

    def close(self) -> list[tuple[str | None, _Extent]]:
        self._scan(self.carry, len(self.carry))
        return [(None, self.extent)]


def _follows(a: npt.NDArray[np.uint8], at: Rows, text: bytes) -> bool:
    """Whether ``text`` is at every one of ``at``."""
    return all(bool((a[at + i] == char).all()) for i, char in enumerate(text))


def _references(
    a: npt.NDArray[np.uint8], at: Rows, *, letters: bool
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


class _SharedStringsScanner(_TagScanner):
    """Refuses a string table declaring more strings than it holds.

    calamine reserves room for ``uniqueCount`` strings before reading one, so
    ``<sst uniqueCount="4294967295">`` with one ``<si>`` asks for 103 GB and aborts.
    """

    def __init__(self) -> None:
        self.declared: list[int] = []
        self.strings = 0
        self.carry = b""
        self.seen_table = False

    def _scan(self, data: bytes, end: int) -> None:
        if not self.seen_table:
            table = _SST_TAG.search(data, 0, end)
            if table is None:
                return
            self.seen_table = True
            for name in (b"count", b"uniqueCount"):
                value = _attribute(data, table.end(), name)
                if value is not None and value.isdigit():
                    self.declared.append(int(value))
        self.strings += len(_SI_TAG.findall(data, 0, end))

    def close(self) -> list[tuple[str | None, _Extent]]:
        self._scan(self.carry, len(self.carry))
        top = max(self.declared, default=0)
        if top > self.strings + _COUNT_SLACK:
            raise _Refused(
                f"declares {top:,} shared strings but holds {self.strings:,}: the workbook is "
                "damaged or built to attack readers; copy the data to a new workbook",
                whole_part=True,
            )
        return []


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


_CFB_END: Final = 0xFFFFFFFE
_CFB_FREE: Final = 0xFFFFFFFF
_BIFF_CELLS: Final = frozenset({0x0203, 0x0204, 0x00D6, 0x0205, 0x027E, 0x00FD, 0x0006})
_BIFF_MUL_RK: Final = 0x00BD
_BIFF_BOF: Final = 0x0809
_BIFF_SHEET: Final = 0x0085
_BIFF_SST: Final = 0x00FC
_BIFF_CONTINUE: Final = 0x003C
_BIFF_DIMENSIONS: Final = 0x0200


def _check_xls(path: str) -> None:
    """Bound an old-format workbook's sheets (rows and columns are 16-bit there, so one stray
    cell can still ask for 65,536 x 65,536 cells), and the sizes its records declare."""
    size = Path(path).stat().st_size
    if size > MAX_UNPACKED_BYTES:
        raise _too_big(path, f"holds {size:,} bytes")
    data = Path(path).read_bytes()
    _check_cfb_header(path, data)
    try:
        stream = _cfb_stream(data, ("workbook", "book"))
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
                _check_extent(path, sheet, extent, MAX_XLS_COLUMNS)
            extent, sheet = _Extent(), names.get(at, f"at byte {at}")
        elif kind == _BIFF_SST and len(data) >= 8:
            _check_xls_strings(path, stream, at, data)
        elif extent is not None and kind == _BIFF_DIMENSIONS:
            _check_xls_dimensions(path, sheet, data)
        elif extent is not None and kind in _BIFF_CELLS and len(data) >= 4:
            row, column = struct.unpack_from("<HH", data)
            extent.reach(row + 1, column + 1)
        elif extent is not None and kind == _BIFF_MUL_RK and len(data) >= 6:
            row, _ = struct.unpack_from("<HH", data)
            (last,) = struct.unpack_from("<H", data, len(data) - 2)
            extent.reach(row + 1, last + 1)
        at += 4 + size
    if extent is not None:
        _check_extent(path, sheet, extent, MAX_XLS_COLUMNS)


def _check_cfb_header(path: str, data: bytes) -> None:
    """The engine reserves room for the FAT and DIFAT sector counts the header declares (up to
    16 GB each): no count may exceed the sectors the file really has."""
    if len(data) < 512:
        return  # the engine refuses a file shorter than its header
    shift = struct.unpack_from("<H", data, 0x1E)[0]
    sector = 1 << min(shift, 16)
    sectors = max(0, len(data) - 512) // sector + 1
    (fat,) = struct.unpack_from("<I", data, 0x2C)
    (mini_fat,) = struct.unpack_from("<I", data, 0x40)
    (difat,) = struct.unpack_from("<I", data, 0x48)
    for what, count in (("FAT", fat), ("mini FAT", mini_fat), ("DIFAT", difat)):
        if count > sectors:
            raise InputError(
                f"{path}: is a damaged workbook: it declares {count:,} {what} sectors but holds "
                f"{sectors:,} sectors in all; save it again from Excel, or export it as CSV"
            )


def _check_xls_dimensions(path: str, sheet: str, data: bytes) -> None:
    """DIMENSIONS (used rows and columns): the engine reserves room for that many cells."""
    if len(data) >= 14:
        first_row, last_row, first_column, last_column = struct.unpack_from("<IIHH", data)
    elif len(data) >= 8:
        first_row, last_row, first_column, last_column = struct.unpack_from("<HHHH", data)
    else:
        return
    # The last row and column are one past the used ones; the engine counts from the first
    # (and from column 0 when the first is out of range).
    rows = max(0, last_row - first_row)
    columns = max(0, last_column - (first_column if first_column <= 0xFF else 0))
    if rows > MAX_XLS_ROWS or last_row > MAX_XLS_ROWS or columns > MAX_XLS_COLUMNS:
        raise InputError(
            f"{path}: sheet {sheet!r} declares {rows:,} rows x {columns:,} columns, more than a "
            f".xls sheet can have ({MAX_XLS_ROWS:,} x {MAX_XLS_COLUMNS:,}); the workbook is "
            "damaged or built to attack readers: save it again from Excel, or export it as CSV"
        )
    _check_extent(path, sheet, _Extent(rows, columns), MAX_XLS_COLUMNS)


def _check_xls_strings(path: str, stream: bytes, at: int, data: bytes) -> None:
    """SST: each string takes at least 3 bytes of it and its CONTINUE records."""
    total, unique = struct.unpack_from("<II", data)
    room = len(data) - 8
    at += 4 + len(data)
    while at + 4 <= len(stream):
        kind, size = struct.unpack_from("<HH", stream, at)
        if kind != _BIFF_CONTINUE:
            break
        room += size
        at += 4 + size
    if unique > room // 3 + _COUNT_SLACK:
        raise InputError(
            f"{path}: declares {unique:,} shared strings in {room:,} bytes: the workbook is "
            "damaged or built to attack readers; save it again from Excel, or export it as CSV"
        )
    del total  # a count of uses, not of strings: nothing is reserved for it


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
