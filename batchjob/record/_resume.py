"""``--resume``: keys an earlier run already undid are carried over and not sent again."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from batchjob._config import JobConfig
from batchjob._errors import ReportError
from batchjob._logging import clip
from batchjob._model import Action
from batchjob.plan import Plan
from batchjob.record._files import ReportPaths
from batchjob.record._ledger import Ledger
from batchjob.record._previous import read_previous, record_place


def resume_previous(
    config: JobConfig,
    paths: ReportPaths,
    plan: Plan,
    ledger: Ledger,
    log: Any,
    stored: tuple[pd.DataFrame, Callable[[Any], str]] | None = None,
) -> Any:
    """Carry over keys an earlier run already undid; they are not sent again. Returns their
    plan positions.

    The earlier run's rows come from the run store (``stored``: its rows, and how to name
    one in a message) or else from the report and its journal. The resumed report replaces
    the earlier one, so it must hold every key the earlier one held: inputs that leave some
    out are refused rather than losing their record.
    """
    place: Callable[[Any], str] = record_place
    if stored is not None:
        previous, place = stored
    elif not (paths.report.exists() or paths.journal.exists()):
        # Allowed, so a scheduler can always pass --resume; but say so, in case of a typo.
        log.warning("resume.nothing_to_resume", report=str(paths.report))
        return np.empty(0, np.int64)
    else:
        previous = read_previous(paths)
    rows = plan.rows[["event_id", "order_ticket_key"]].astype(str)
    rows["position"] = np.arange(len(rows))
    rows = rows[(plan.rows["problem"] == "").to_numpy()]
    merged = rows.merge(previous, on=["event_id", "order_ticket_key"], how="right")
    missing = merged[merged["position"].isna()]
    if len(missing):
        first = missing.iloc[0]
        raise ReportError(
            f"{place(first)}: key {clip(str(first['order_ticket_key']), 80)!r} of event "
            f"{clip(str(first['event_id']), 80)!r} is not in these inputs ({len(missing)} keys of "
            "the earlier run are not); resume with the inputs of the run that wrote it, or "
            "choose another --report path"
        )
    success = config.action.success
    other = next(a for a in Action if a is not config.action)
    if (merged["outcome"] == other.success.value).any():
        # Carrying "undone" keys into a check-in run would report keys never checked in.
        raise ReportError(
            f"{paths.report} is the report of an --action {other.value} run (it says "
            f"{other.success.value!r}); resume it with --action {other.value}, or choose "
            "another --report path"
        )
    merged = merged[merged["outcome"] == success.value]
    positions = merged["position"].to_numpy().astype(np.int64)
    finished = (
        _parse_times(merged["finished_at"])
        if "finished_at" in merged
        else np.full(len(merged), math.nan)
    )
    ledger.set(positions, success, http_status=204)
    ledger.finished_at[positions] = finished
    if "attempts" in merged:
        ledger.attempts[positions] = (
            merged["attempts"].astype(str).str.strip().replace("", "0").astype(np.int64).to_numpy()
        )
    log.info("resume.loaded", already_undone=len(positions))
    return positions


def _parse_times(values: Any) -> Any:
    if pd.api.types.is_numeric_dtype(values):  # from the store: epoch seconds already
        return np.asarray(values, dtype=np.float64)
    parsed = pd.to_datetime(values, utc=True, errors="coerce", format="%Y-%m-%dT%H:%M:%SZ")
    # Unit-free: pandas 3 parses to microseconds, pandas 2 to nanoseconds.
    seconds = (parsed - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)
    return np.asarray(seconds, dtype=np.float64)
