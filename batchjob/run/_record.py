"""The run's record: its id, and ``--summary-json`` (the schema is docs/summary-json.md).

The record is what a scheduler or a person needs to know about one run without parsing the
report: when, against what, with which settings and inputs, how it ended and why.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batchjob._config import JobConfig, display_url
from batchjob._logging import Redactor
from batchjob.record import write_bytes_atomically
from batchjob.run._result import RunResult
from batchjob.store import display_state

#: Bumped when a field changes meaning or goes away; new fields keep the version.
SCHEMA_VERSION = 1
#: Longest text kept in the record (a path, a stop reason); longer ends ``...[truncated]``.
_MAX_TEXT = 4096
#: Settings recorded, besides action and base_url (own fields). No secret is a setting:
#: tokens and the client secret come from the environment or the token file only.
_SETTINGS = (
    "rate",
    "batch_size",
    "concurrency",
    "max_requests",
    "retry_max_tries",
    "retry_max_time",
    "retry_base",
    "retry_cap",
    "connect_timeout",
    "request_timeout",
    "grace_period",
    "dry_run",
    "resume",
    "again",
    "pending",
    "revert",
    "state",
    "event_id",
    "token_url",
    "token_file",
    "client_id",
    "config_file",
    "log_level",
    "log_format",
)


def new_run_id(now: datetime) -> str:
    """``YYYYMMDD-HHMMSS-xxxx`` (UTC): sorts by start time; 4 random hex digits tell apart
    runs started in the same second."""
    return f"{now.astimezone(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def utc_iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe_inputs(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Each input's path, size and SHA-256 (read again after it was parsed); size and hash
    are None for an input that is not a regular file (a pipe cannot be read twice)."""
    described: list[dict[str, Any]] = []
    for path in paths:
        if not stat.S_ISREG(os.stat(path).st_mode):
            described.append({"path": str(path), "size": None, "sha256": None})
            continue
        with path.open("rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
            size = os.fstat(fh.fileno()).st_size
        described.append({"path": str(path), "size": size, "sha256": digest})
    return described


def _settings(config: JobConfig) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for name in _SETTINGS:
        value = getattr(config, name)
        settings[name] = str(value) if isinstance(value, Path) else value
    if isinstance(settings["token_url"], str):
        settings["token_url"] = display_url(settings["token_url"])
    settings["state"] = display_state(config.state)  # a database URL may hold a password
    settings["identity"] = list(config.identity)
    settings["columns"] = {
        "event_id": list(config.columns.event_id),
        "order_ticket_key": list(config.columns.order_ticket_key),
    }
    return settings


def build_record(
    config: JobConfig,
    result: RunResult,
    inputs: list[dict[str, Any]],
    redactor: Redactor,
) -> dict[str, Any]:
    """The run's record as plain JSON values, every text cleaned by ``redactor``."""
    record = {
        "schema_version": SCHEMA_VERSION,
        "run_id": result.run_id,
        "started_at": result.started_at,
        "ended_at": result.ended_at,
        "elapsed_seconds": round(result.elapsed, 3),
        "action": result.action,
        "base_url": display_url(config.base_url),
        "dry_run": config.dry_run,
        "exit_code": int(result.exit_code),
        "stop_reason": result.stopped or None,
        "counts": dict(result.counts),
        "per_event": {e: dict(c) for e, c in result.per_event.items()},
        "requests": result.requests,
        "retries": result.retries,
        "throttled": result.throttled,
        "final_rate": round(result.rate, 3),
        "already_done": result.already_done,
        "from_earlier_runs": result.from_earlier_runs,
        "state": result.state or None,
        "duplicates": result.duplicates,
        "blank_rows": result.blank_rows,
        "inputs": inputs,
        "report": str(result.report),
        "failed_rows": str(result.failed_rows),
        "failed_rows_count": result.failed_rows_count,
        "settings": _settings(config),
    }
    cleaned: dict[str, Any] = _clean(record, redactor)
    return cleaned


def _clean(value: Any, redactor: Redactor) -> Any:
    """Every text (keys too) through the redactor: a secret never reaches the file."""
    if isinstance(value, str):
        return redactor.clean(value, _MAX_TEXT)
    if isinstance(value, dict):
        return {_clean(k, redactor): _clean(v, redactor) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v, redactor) for v in value]
    return value


def write_summary_json(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` to ``path`` atomically (a new temporary file, fsynced, renamed)."""
    text = json.dumps(record, indent=2, ensure_ascii=True, allow_nan=False) + "\n"
    write_bytes_atomically(path, text.encode("ascii"))
