"""``read_inputs``: every input file, by type, into one frame of ``FRAME_COLUMNS`` (and
``identity`` when identity columns are asked for)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from batchjob._errors import InputError
from batchjob._model import ColumnAliases, canonical_event_id
from batchjob.read._columns import _Matcher
from batchjob.read._csv import _read_csv
from batchjob.read._excel import _read_excel
from batchjob.read._findings import Findings
from batchjob.read._identity import check_identity_names
from batchjob.read._normalise import ReadOptions, _assemble, _Part
from batchjob.read._shared import _SNIFF_BYTES, _SUPPORTED, CSV_SUFFIXES, EXCEL_SUFFIXES, Inputs


def read_inputs(
    paths: Sequence[str | Path],
    *,
    aliases: ColumnAliases = ColumnAliases(),
    default_event_id: str | None = None,
    key_pattern: str | None = None,
    include_hidden_rows: bool = False,
    identity_columns: Sequence[str] = (),
) -> Inputs:
    """Read every file into one frame of ``FRAME_COLUMNS``, in input order.

    ``identity_columns`` names input columns beyond the event and key (the config's
    ``[incremental] identity``, matched as column aliases are). When given, the frame has one
    more column, ``identity`` (see :class:`Inputs`), and every file (every sheet read) must
    have them all.

    Raises :class:`InputError` for a file that cannot be used at all, and ``ValueError`` when
    ``default_event_id`` is given but is not a UUID, or an identity column's name is blank.
    """
    default = None
    if default_event_id is not None:
        default = canonical_event_id(default_event_id)
        if default is None:
            raise ValueError(
                f"--event-id {default_event_id!r} is not a UUID "
                "(expected 8-4-4-4-12 hex digits, e.g. 123e4567-e89b-12d3-a456-426614174000)"
            )
    identity = check_identity_names(identity_columns)
    matcher = _Matcher(aliases)
    options = ReadOptions(default, key_pattern, include_hidden_rows, identity)
    findings = Findings()
    parts: list[_Part] = []
    for path in paths:
        parts.extend(_read_file(str(path), matcher, options, findings))
    return Inputs(
        frame=_assemble(parts, identity=bool(identity)),
        blank_rows=sum(part.blank_rows for part in parts),
        files=tuple(str(path) for path in paths),
        seen=findings.frozen(),
    )


def _read_file(
    path: str, matcher: _Matcher, options: ReadOptions, findings: Findings
) -> list[_Part]:
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
            return [_read_csv(path, head, whole, matcher, options, findings)]
        return _read_excel(path, suffix, head, matcher, options, findings)
    except OSError as exc:
        raise InputError(f"{path}: cannot be read: {exc.strerror or exc}") from exc
