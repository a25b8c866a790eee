"""History: the runs a run store holds, for people (text) and scripts (JSON), and a run's report
written again from the store.

``batchjob runs`` is a thin shell over this module (docs/store.md, "History commands"):

- :func:`run_summary` and :func:`run_detail` turn a :class:`~batchjob.store.RunInfo` into the
  documented JSON-able dicts; :func:`runs_table` and :func:`run_text` turn those dicts into
  text. Every text that came from the store passes :func:`~batchjob._logging.printable`, so a
  control character in a file name cannot drive the terminal.
- :func:`write_run_report` writes a finished run's report CSV from its stored rows, byte for
  byte what the run wrote: the same header, spreadsheet escaping and time format, rows in
  report order; atomically, never through a link, never over a file without ``force``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import stat
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from batchjob._cells import escape_cell
from batchjob._config import load_config
from batchjob._errors import ExitCode, ReportError, StoreError, UsageError
from batchjob._logging import printable
from batchjob._model import REPORT_COLUMNS, Outcome
from batchjob._portable import BINARY, CLOEXEC, NOFOLLOW

if TYPE_CHECKING:
    import pandas as pd

    from batchjob.store import RunInfo, Store

#: Version of the JSON ``batchjob runs --json`` and ``runs show --json`` print (docs/store.md).
SCHEMA_VERSION = 1
#: Outcomes in the order counts are shown: the report's own order (Outcome).
OUTCOMES: tuple[str, ...] = tuple(o.value for o in Outcome)
#: Most characters of the input names shown in one line of ``batchjob runs``.
INPUTS_WIDTH = 40
_SIDE_FILES = ("", "-wal", "-shm", "-journal")


# --- opening the store ---------------------------------------------------------------------


def history_store(state: str) -> tuple[str, Store | None]:
    """The store ``state`` names (see :func:`batchjob.store.store_path`) for reading: its
    location, and the store opened, or None when no store file exists yet (none is created
    just to find nothing in it). Raises :class:`StoreError` for ``none``."""
    from batchjob.store import open_store, store_path

    path = store_path(state)
    if path is None:
        raise StoreError(
            "no run store: state is none (--state, BATCHJOB_STATE or the config file's state); "
            "name the store to read with --state PATH"
        )
    if not os.path.lexists(path):
        return str(path), None
    store = open_store(state)
    assert store is not None
    return store.location, store


def find_run(store: Store | None, location: str, run_ref: str) -> RunInfo:
    """The run ``run_ref`` names (its id, or a prefix of just one); StoreError otherwise."""
    if not run_ref.strip():
        raise UsageError("give a run id (or the start of one), as `batchjob runs` lists them")
    info = store.run(run_ref) if store is not None else None
    if info is None:
        raise StoreError(
            f"no run '{printable(run_ref)}' in the run store {printable(location)}: "
            "`batchjob runs` lists the runs it holds"
        )
    return info


# --- what a run says, as JSON-able dicts ---------------------------------------------------


def _zero_counts() -> dict[str, int]:
    return dict.fromkeys(OUTCOMES, 0)


def _record_counts(record: Mapping[str, Any] | None) -> dict[str, int] | None:
    counts = (record or {}).get("counts")
    if not isinstance(counts, Mapping):
        return None
    return _zero_counts() | {str(k): int(v) for k, v in counts.items()}


def _record_per_event(record: Mapping[str, Any] | None) -> dict[str, dict[str, int]] | None:
    per_event = (record or {}).get("per_event")
    if not isinstance(per_event, Mapping):
        return None
    return {
        str(event): _zero_counts() | {str(k): int(v) for k, v in counts.items()}
        for event, counts in per_event.items()
        if isinstance(counts, Mapping)
    }


def _counted(rows: Iterable[tuple[str, str, int]]) -> dict[str, dict[str, int]]:
    per_event: dict[str, dict[str, int]] = {}
    for event, outcome, n in rows:
        counts = per_event.setdefault(event, _zero_counts())
        counts[outcome] = counts.get(outcome, 0) + n
    return per_event


def _total(per_event: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    counts = _zero_counts()
    for event_counts in per_event.values():
        for outcome, n in event_counts.items():
            counts[outcome] = counts.get(outcome, 0) + n
    return counts


def _seconds_between(started: str, ended: str | None) -> float | None:
    if not ended:
        return None
    try:
        start = datetime.fromisoformat(started)
        end = datetime.fromisoformat(ended)
    except ValueError:
        return None
    return max(0.0, (end - start).total_seconds())


def _elapsed(info: RunInfo) -> float | None:
    elapsed = (info.record or {}).get("elapsed_seconds")
    if isinstance(elapsed, int | float) and not isinstance(elapsed, bool):
        return float(elapsed)
    return _seconds_between(info.started_at, info.ended_at)


def _inputs(record: Mapping[str, Any] | None) -> list[dict[str, Any]] | None:
    inputs = (record or {}).get("inputs")
    if not isinstance(inputs, list):
        return None
    return [
        {"path": item.get("path"), "size": item.get("size"), "sha256": item.get("sha256")}
        for item in inputs
        if isinstance(item, Mapping)
    ]


def run_summary(
    info: RunInfo, counts_from_rows: Callable[[str], Sequence[tuple[str, str, int]]]
) -> dict[str, Any]:
    """One run as ``batchjob runs --json`` lists it (docs/store.md). ``counts_from_rows``
    (the store's ``outcome_counts``) counts the stored rows of a run that left no record."""
    return _summary(info, counts_from_rows)[0]


def _summary(
    info: RunInfo, counts_from_rows: Callable[[str], Sequence[tuple[str, str, int]]]
) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
    counts = _record_counts(info.record)
    per_event = _record_per_event(info.record)
    source = "record"
    if counts is None or per_event is None:
        per_event = _counted(counts_from_rows(info.run_id))
        counts = _total(per_event)
        source = "rows"
    summary = {
        "run_id": info.run_id,
        "state": info.state,
        "exit_code": info.exit_code,
        "action": info.action,
        "base_url": info.base_url,
        "started_at": info.started_at,
        "ended_at": info.ended_at,
        "elapsed_seconds": _elapsed(info),
        "requests": info.requests,
        "stop_reason": info.stop_reason or None,
        "counts": counts,
        "counts_from": source,
        "inputs": _inputs(info.record),
        "report": info.report,
        "host": info.host,
        "pid": info.pid,
    }
    return summary, per_event


def run_detail(
    info: RunInfo, counts_from_rows: Callable[[str], Sequence[tuple[str, str, int]]]
) -> dict[str, Any]:
    """One run as ``batchjob runs show RUN --json`` prints it: :func:`run_summary`'s fields,
    ``per_event``, the failed-rows file and the whole stored record (docs/store.md)."""
    summary, per_event = _summary(info, counts_from_rows)
    record = info.record or None
    failed_count = (record or {}).get("failed_rows_count")
    return summary | {
        "per_event": per_event,
        "failed_rows": (record or {}).get("failed_rows"),
        "failed_rows_count": failed_count if isinstance(failed_count, int) else None,
        "record": record,
    }


def runs_document(location: str, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "store": location, "runs": summaries}


def run_document(location: str, detail: dict[str, Any]) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "store": location, "run": detail}


def to_json(document: Mapping[str, Any]) -> str:
    """ASCII JSON: every control or bidi character is a ``\\u`` escape, safe on a terminal."""
    return json.dumps(document, indent=2, ensure_ascii=True, allow_nan=False)


# --- the same, as text -----------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    """``0.4s``, ``41s``, ``12m05s``, ``3h07m``; ``-`` for none."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def counts_text(counts: Mapping[str, int]) -> str:
    """``undone 950, failed 3, skipped 47``: the outcomes that happened, in report order."""
    known = [o for o in OUTCOMES if counts.get(o)]
    others = sorted(o for o in counts if o not in OUTCOMES and counts[o])
    return ", ".join(f"{printable(o)} {counts[o]}" for o in (*known, *others)) or "no rows"


def result_text(summary: Mapping[str, Any]) -> str:
    """``exit 1`` for a finished run; ``running`` or ``died`` for one that is not."""
    if summary["state"] != "finished":
        return str(summary["state"])
    code = summary["exit_code"]
    return f"exit {code}" if code is not None else "finished"


def _names(inputs: list[Mapping[str, Any]] | None) -> str:
    if not inputs:
        return "-"
    names = ", ".join(
        printable(os.path.basename(str(item.get("path") or "")) or str(item.get("path")))
        for item in inputs
    )
    if len(names) > INPUTS_WIDTH:
        names = names[: INPUTS_WIDTH - 3] + "..."
    return names


def _counts_cell(summary: Mapping[str, Any]) -> str:
    text = counts_text(summary["counts"])
    if summary["counts_from"] == "rows":
        text += " so far" if summary["state"] != "finished" else " (rows recorded)"
    return text


_TABLE_HEADER = ("RUN", "STARTED", "TOOK", "ACTION", "RESULT", "COUNTS", "INPUTS")


def runs_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """One line per run, newest first as given, in columns as wide as their widest cell: no
    terminal width is assumed (a long line wraps or is cut by the terminal, not by us)."""
    lines = [_TABLE_HEADER] + [
        (
            printable(s["run_id"]),
            printable(s["started_at"]),
            duration(s["elapsed_seconds"]) if s["state"] == "finished" else "-",
            printable(s["action"]),
            result_text(s),
            _counts_cell(s),
            _names(s["inputs"]),
        )
        for s in summaries
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(_TABLE_HEADER) - 1)]
    padded = [
        [*(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True)), line[-1]]
        for line in lines
    ]
    return "\n".join("  ".join(cells).rstrip() for cells in padded)


def run_text(detail: Mapping[str, Any]) -> str:
    """Every field of one run, one per line, then its counts by event."""
    p = printable
    if detail["state"] == "finished":
        code = detail["exit_code"]
        state = f"finished, exit {code}" if code is not None else "finished"
    else:
        state = f"{detail['state']} (no end recorded)"
    ended = detail["ended_at"]
    took = duration(detail["elapsed_seconds"])
    fields: list[tuple[str, str]] = [
        ("run", p(detail["run_id"])),
        ("state", state),
        ("action", p(detail["action"])),
        ("api", p(detail["base_url"])),
        ("started", p(detail["started_at"])),
        ("ended", f"{p(ended)} (took {took})" if ended else "-"),
        ("requests", str(detail["requests"])),
        ("stopped", p(detail["stop_reason"]) if detail["stop_reason"] else "-"),
        ("host", f"{p(detail['host']) or '?'} (pid {detail['pid']})"),
    ]
    inputs = detail["inputs"]
    if inputs is None:
        fields.append(("inputs", "- (not recorded: the run left no record)"))
    elif not inputs:
        fields.append(("inputs", "- (none: keys from the run store only)"))
    for n, item in enumerate(inputs or ()):
        size = item.get("size")
        digest = item.get("sha256")
        about = [f"{size} bytes" if size is not None else "not a regular file"]
        if digest:
            about.append(f"sha256 {p(str(digest))[:12]}")
        path = p(str(item.get("path")))
        fields.append(("inputs" if n == 0 else "", f"{path} ({', '.join(about)})"))
    fields.append(("report", p(detail["report"])))
    if detail["failed_rows"]:
        count = detail["failed_rows_count"]
        rows = f" ({count} rows)" if count is not None else ""
        fields.append(("failed rows", f"{p(str(detail['failed_rows']))}{rows}"))
    outcomes = counts_text(detail["counts"])
    if detail["counts_from"] == "rows":
        outcomes += " (counted from the rows the store holds)"
    fields.append(("outcomes", outcomes))
    width = max(len(label) for label, _ in fields) + 2
    lines = [f"{label + ':' if label else '':<{width}}{value}".rstrip() for label, value in fields]
    per_event = detail["per_event"]
    if per_event:
        lines.append("per event:")
        lines += [f"  {p(event)}: {counts_text(counts)}" for event, counts in per_event.items()]
    return "\n".join(lines)


# --- a run's report, again -------------------------------------------------------------------


def _utc_texts(seconds: Sequence[float]) -> list[str]:
    """ISO 8601 UTC to the second, as the report writes it; "" for no time (NaN)."""
    known: dict[int, str] = {}
    texts = []
    for value in seconds:
        if value is None or math.isnan(value):
            texts.append("")
            continue
        whole = math.floor(value)
        text = known.get(whole)
        if text is None:
            text = known[whole] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(whole))
        texts.append(text)
    return texts


def _escaped(values: Iterable[Any]) -> list[str]:
    seen: dict[str, str] = {}
    out = []
    for value in values:
        text = str(value)
        cell = seen.get(text)
        if cell is None:
            cell = seen[text] = escape_cell(text)
        out.append(cell)
    return out


def report_bytes(rows: pd.DataFrame) -> bytes:
    """The report CSV of ``rows`` (the store's ROW_COLUMNS frame, in report order), byte for
    byte what the run wrote: REPORT_COLUMNS header, spreadsheet-escaped text cells, CRLF rows,
    UTF-8; an http status 0 and a missing time are empty cells."""
    buffer = io.BytesIO()
    fh = io.TextIOWrapper(buffer, encoding="utf-8", errors="backslashreplace", newline="")
    writer = csv.writer(fh)
    writer.writerow(REPORT_COLUMNS)
    columns = {
        "event_id": _escaped(rows["event_id"]),
        "order_ticket_key": _escaped(rows["order_ticket_key"]),
        "outcome": [str(o) for o in rows["outcome"]],
        "http_status": [str(int(s)) if s else "" for s in rows["http_status"]],
        "error_key": _escaped(rows["error_key"]),
        "error_message": _escaped(rows["error_message"]),
        "attempts": [int(a) for a in rows["attempts"]],
        "source_file": _escaped(rows["source_file"]),
        "source_row": [int(r) for r in rows["source_row"]],
        "finished_at": _utc_texts(rows["finished_at"].astype(float).tolist()),
    }
    writer.writerows(zip(*(columns[name] for name in REPORT_COLUMNS), strict=True))
    fh.flush()
    data = buffer.getvalue()
    fh.detach()
    return data


def _check_target(out: Path, force: bool, location: str) -> None:
    """Refuse ``out`` if it is a link, not a regular file, the run store, or (without
    ``force``) any file at all."""
    shown = printable(str(out))
    try:
        info = os.lstat(out)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ReportError(f"{shown}: cannot use it: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise ReportError(
            f"{shown} is a symbolic link: batchjob replaces files rather than writing through "
            "links; give the path of a real file"
        )
    if stat.S_ISDIR(info.st_mode):
        raise ReportError(f"{shown} is a directory; give a file path")
    if not stat.S_ISREG(info.st_mode):
        raise ReportError(f"{shown} is not a regular file; give another path")
    for suffix in _SIDE_FILES:
        with contextlib.suppress(OSError):
            if os.path.samefile(out, f"{location}{suffix}"):
                raise ReportError(f"{shown} is the run store itself; give another path")
    if not force:
        raise ReportError(
            f"{shown} already exists; pass --force to replace it, or give another path"
        )


def _claim(out: Path) -> int:
    """Create ``out`` empty, exclusively (never through a link): no other file of that name
    appears between the check and the rename. Returns its inode."""
    shown = printable(str(out))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC | BINARY
    try:
        fd = os.open(out, flags, 0o666)
    except FileExistsError:
        raise ReportError(
            f"{shown} already exists; pass --force to replace it, or give another path"
        ) from None
    except OSError as exc:
        raise ReportError(f"{shown}: cannot create it: {exc.strerror}") from None
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def write_run_report(store: Store, run_ref: str, out: Path, *, force: bool = False) -> int:
    """Write run ``run_ref``'s report to ``out`` from the store, as the run wrote it; returns
    the rows written. Raises :class:`StoreError` for a run that is unknown, unfinished or
    whose rows the store no longer holds whole, :class:`ReportError` for an unusable ``out``.
    """
    from batchjob.record import write_bytes_atomically

    info = find_run(store, store.location, run_ref)
    run = printable(info.run_id)
    shown = printable(str(out))
    if info.state != "finished":
        hint = (
            f"; continue it with batchjob run --resume --report {printable(info.report)}"
            if info.state == "died"
            else ""
        )
        raise StoreError(f"run {run} is {info.state}: it has no report yet{hint}")
    counts = _record_counts(info.record)
    if counts is None:
        why = f" ({printable(info.stop_reason)})" if info.stop_reason else ""
        raise StoreError(f"run {run} ended before it wrote a report{why}")
    _check_target(out, force, store.location)
    rows = store.rows(info.run_id)
    rows = rows[rows["outcome"] != ""]  # rows the run never decided: not in a report
    expected = sum(counts.values())
    if not len(rows):
        raise StoreError(
            f"the run store holds no report rows of run {run} (pruned, or never recorded): "
            "its report cannot be written again"
        )
    positions = rows["position"].astype("int64").tolist()
    if len(rows) != expected or positions != list(range(len(rows))):
        raise StoreError(
            f"the run store holds {len(rows)} of the {expected} report rows of run {run} "
            "(some were pruned, or never recorded): its report cannot be written again whole"
        )
    data = report_bytes(rows)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"{shown}: cannot create its folder: {exc.strerror}") from None
    claimed = None if force else _claim(out)
    try:
        write_bytes_atomically(out, data)
    except BaseException as exc:
        if claimed is not None:
            with contextlib.suppress(OSError):
                if os.lstat(out).st_ino == claimed:
                    out.unlink()  # our empty placeholder, nothing else
        if isinstance(exc, OSError):
            raise ReportError(f"{shown}: cannot write it: {exc.strerror or exc}") from None
        raise
    return len(rows)


# --- the commands ----------------------------------------------------------------------------


def run_history_command(args: argparse.Namespace, *, stdout: TextIO) -> int:
    """``batchjob runs [show RUN | report RUN --out PATH]``: returns the exit status; raises
    :class:`~batchjob.BatchjobError` (exit 2) for what the user must fix."""
    state = load_config(cli={"state": args.state}, config_file=args.config).state
    location, store = history_store(state)
    try:
        command = args.runs_command or "list"
        if command == "show":
            info = find_run(store, location, args.run_id)
            assert store is not None
            detail = run_detail(info, store.outcome_counts)
            text = to_json(run_document(location, detail)) if args.json else run_text(detail)
            stdout.write(text + "\n")
        elif command == "prune":
            if not (args.older_than >= 0 and math.isfinite(args.older_than)):
                raise UsageError(f"--older-than must be 0 or more days, not {args.older_than}")
            if store is None:
                stdout.write(f"no runs recorded in {printable(location)}\n")
            else:
                cutoff = datetime.now(UTC) - timedelta(days=args.older_than)
                pruned = store.prune(cutoff.strftime("%Y-%m-%dT%H:%M:%SZ"))
                stdout.write(f"pruned {len(pruned)} runs' report rows and plans\n")
        elif command == "report":
            if store is None:
                find_run(store, location, args.run_id)  # raises: no run in no store
            assert store is not None
            count = write_run_report(store, args.run_id, args.out, force=args.force)
            stdout.write(f"wrote {printable(str(args.out))} ({count} rows)\n")
        else:
            if args.limit < 1:
                raise UsageError(f"--limit must be 1 or more, not {args.limit}")
            infos = store.runs(min(args.limit, 2**62)) if store is not None else []
            counter = store.outcome_counts if store is not None else _no_rows
            summaries = [run_summary(info, counter) for info in infos]
            if args.json:
                stdout.write(to_json(runs_document(location, summaries)) + "\n")
            elif not summaries:
                stdout.write(f"no runs recorded in {printable(location)}\n")
            else:
                stdout.write(runs_table(summaries) + "\n")
        stdout.flush()
        return ExitCode.OK
    finally:
        if store is not None:
            store.close()


def _no_rows(run_id: str) -> list[tuple[str, str, int]]:
    del run_id
    return []
