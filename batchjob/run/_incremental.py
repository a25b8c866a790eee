"""Incremental runs: what earlier runs did decides what this one sends.

A row's identity is its event and key (and the ``[incremental] identity`` columns, if the
config names some), joined by the unit separator. An identity the store says this action
already did is not sent again (outcome ``skipped``); ``--pending`` adds what earlier runs left
unfinished; ``revert`` takes the keys a run undid. docs/store.md says why each rule is so.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from batchjob._config import JobConfig, display_url
from batchjob._errors import StoreError, UsageError
from batchjob._model import Action, Outcome
from batchjob.plan import Plan, Positions
from batchjob.read import HIDDEN_PROBLEM, Inputs
from batchjob.record import Ledger
from batchjob.store import ROW_COLUMNS, Store

#: Joins the parts of an identity; the reader never lets it into a usable key or value.
SEP = "\x1f"
#: Plan-row columns that say where a row came from, when the store added rows.
CARRIED = "carried"
FULL_IDENTITY = "full_identity"
_SEP = pa.scalar(SEP, pa.large_string())


def api_of(config: JobConfig) -> str:
    """The API a store's outcomes belong to: its base URL as messages show it."""
    return display_url(config.base_url).rstrip("/")


@dataclass(frozen=True)
class Identities:
    """Each usable plan row's identities (several when rows that differ only in identity
    columns were merged into one request), as CSR: ``texts[offsets[p]:offsets[p + 1]]``."""

    texts: Any  # pyarrow StringArray, ordered by plan position
    positions: Positions  # the plan row of each text
    offsets: npt.NDArray[np.int64]
    default: bool = True  # each row's one identity is its event and key

    def of(self, positions: Positions) -> tuple[Any, Positions]:
        """The texts of ``positions``' identities, and the plan row of each."""
        starts, ends = self.offsets[positions], self.offsets[positions + 1]
        lengths = ends - starts
        if not len(lengths) or lengths.sum() == 0:
            return self.texts.slice(0, 0), np.empty(0, np.int64)
        if (lengths == 1).all():
            index = starts
        else:
            # Concatenated ranges starts[i]..ends[i], without a Python loop.
            total = int(lengths.sum())
            shift = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
            index = np.arange(total, dtype=np.int64) + shift
        return self.texts.take(pa.array(index)), self.positions[index]


def _event_texts(rows: pd.DataFrame, positions: Positions) -> Any:
    events = rows["event_id"]
    names = pa.array([str(c) for c in events.cat.categories], pa.string())
    return names.take(pa.array(events.cat.codes.to_numpy()[positions]))


def plan_identities(plan: Plan, frame: pd.DataFrame | None) -> Identities:
    """Each usable plan row's identities. ``frame``: the input rows with their whole identity
    (identity columns, or rows from the store), or None when every identity is event and key."""
    usable = np.sort(np.concatenate([*plan.events.values(), np.empty(0, np.int64)]))
    if frame is None:
        # The common case, a million rows in a fraction of a second: one identity per row.
        keys = plan.keys.take(pa.array(usable)).cast(pa.large_string())
        events = _event_texts(plan.rows, usable).cast(pa.large_string())
        texts = pc.binary_join_element_wise(events, keys, _SEP).cast(pa.string())
        return _csr(texts, usable.astype(np.int64), len(plan.rows))
    # Every usable input row's identity, mapped to the plan row its (event, key) merged into.
    placed = pd.DataFrame(
        {
            "event_id": plan.rows["event_id"].astype(str).to_numpy()[usable],
            "order_ticket_key": plan.rows["order_ticket_key"].astype(str).to_numpy()[usable],
            "position": usable,
        }
    )
    good = frame[(frame["problem"] == "").to_numpy()]
    pairs = pd.DataFrame(
        {
            "event_id": good["event_id"].astype(str).to_numpy(),
            "order_ticket_key": good["order_ticket_key"].astype(str).to_numpy(),
            FULL_IDENTITY: good[FULL_IDENTITY].astype(str).to_numpy(),
        }
    )
    merged = pairs.merge(placed, on=["event_id", "order_ticket_key"], how="inner")
    merged = merged.drop_duplicates(FULL_IDENTITY).sort_values("position", kind="stable")
    texts = pa.array(merged[FULL_IDENTITY].tolist(), pa.string())
    positions = merged["position"].to_numpy().astype(np.int64)
    return _csr(texts, positions, len(plan.rows), default=False)


def _csr(texts: Any, positions: Positions, size: int, *, default: bool = True) -> Identities:
    offsets = np.searchsorted(positions, np.arange(size + 1), side="left").astype(np.int64)
    return Identities(texts, positions, offsets, default)


def add_identity_column(inputs: Inputs, extra_columns: bool) -> pd.DataFrame:
    """The input frame with each row's whole identity, for rows merged with stored ones."""
    frame = inputs.frame
    events = frame["event_id"].astype(str).to_numpy()
    keys = frame["order_ticket_key"].astype(str).to_numpy()
    parts = [pa.array(events, pa.string()), pa.array(keys, pa.string())]
    if extra_columns:
        parts.append(pa.array(frame["identity"].astype(str).to_numpy(), pa.string()))
    full = pc.binary_join_element_wise(*parts, pa.scalar(SEP, pa.string()))
    frame = frame.drop(columns=["identity"], errors="ignore").copy()
    frame[FULL_IDENTITY] = full.to_numpy(zero_copy_only=False)
    frame[CARRIED] = False
    return frame


def with_stored_rows(frame: pd.DataFrame, stored: pd.DataFrame) -> pd.DataFrame:
    """``frame`` followed by rows the store holds (pending keys, a run to revert): input rows
    come first, so a key that is in both is reported where the input has it."""
    if not len(stored):
        return frame
    extra = pd.DataFrame(
        {
            "event_id": stored["event_id"].astype(str),
            "order_ticket_key": stored["order_ticket_key"].astype(str),
            "source_file": stored["source_file"].astype(str),
            "source_row": stored["source_row"].astype(np.int32),
            "problem": stored["problem"].astype(str) if "problem" in stored else "",
            FULL_IDENTITY: stored["identity"].astype(str),
            CARRIED: True,
        }
    )
    joined: dict[str, Any] = {}
    for column in frame.columns:
        if isinstance(frame[column].dtype, pd.CategoricalDtype):
            values = [*frame[column].astype(str).tolist(), *extra[column].astype(str).tolist()]
            # Categories in the order first seen: events stay in input order.
            joined[column] = pd.Categorical(values, categories=list(dict.fromkeys(values)))
        else:
            joined[column] = pd.concat(
                [frame[column], extra[column].astype(frame[column].dtype)], ignore_index=True
            )
    return pd.DataFrame(joined)


def skip_done(store: Store, config: JobConfig, plan: Plan, ids: Identities, ledger: Ledger) -> int:
    """Report ``skipped`` every row whose identities this action already did; the message
    names the run and the time. Rows with an outcome already (invalid, resumed) stay."""
    success = config.action.success
    done = store.done(api_of(config), success.value, ids.texts)
    if not len(done.index):
        return 0
    size = len(plan.rows)
    total = np.bincount(ids.positions, minlength=size)
    hit = ids.positions[done.index]
    found = np.bincount(hit, minlength=size)
    skip = (total > 0) & (found == total) & (ledger.outcome == 0)
    if not skip.any():
        return 0
    # Each skipped row's message: the (last) run that did one of its identities.
    frame = pd.DataFrame(
        {"position": hit, "run_id": done.run_id, "finished_at": np.floor(done.finished_at)}
    )
    frame = frame[skip[hit]].drop_duplicates("position", keep="last")
    verb = "undone" if config.action == Action.UNDO else "checked in"
    for (run_id, stamp), group in frame.groupby(["run_id", "finished_at"], dropna=False):
        when = "" if pd.isna(stamp) else f" at {_iso(float(stamp))}"
        ledger.set(
            group["position"].to_numpy().astype(np.int64),
            Outcome.SKIPPED,
            error_key="already_done",
            error_message=f"{verb} by run {run_id}{when}; --again sends it anyway",
        )
    return int(skip.sum())


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def carried_count(plan: Plan) -> int:
    """Rows of this run that came from the store (pending keys, a reverted run's keys)."""
    if CARRIED not in plan.rows:
        return 0
    return int(plan.rows[CARRIED].to_numpy().sum())


def retry_worthy(status: npt.NDArray[np.int16]) -> Any:
    """Failed keys a later run should try again: no answer, a server error, a throttle."""
    return (status == 0) | (status >= 500) | (status == 429) | (status == 408)


def empty_inputs() -> Inputs:
    """No input file: a run of keys from the store only (``--pending``, revert)."""
    text = pd.Index([], dtype="str")
    frame = pd.DataFrame(
        {
            "event_id": pd.Categorical([], categories=text),
            "order_ticket_key": pd.Series([], dtype="str"),
            "source_file": pd.Categorical([], categories=text),
            "source_row": np.zeros(0, dtype=np.int32),
            "problem": pd.Categorical([], categories=text),
        }
    )
    return Inputs(frame=frame, blank_rows=0, files=())


def revertible(store: Store, run_ref: str, config: JobConfig) -> pd.DataFrame:
    """The rows ``revert`` checks in: those the run undid that no later run has touched
    (sent again, or tried to) against the same API."""
    info = store.run(run_ref)
    if info is None:
        raise StoreError(f"no run {run_ref!r} in the run store {store.location}")
    if info.action != Action.UNDO.value:
        raise UsageError(f"run {info.run_id} checked keys in; only an undo run can be reverted")
    if info.state == "running" and info.host == socket.gethostname():
        raise UsageError(f"run {info.run_id} is still running: revert it once it has ended")
    if info.base_url != api_of(config):
        raise UsageError(
            f"run {info.run_id} was against {info.base_url}, not {api_of(config)}: revert it "
            "against the API it undid the keys on (--base-url)"
        )
    rows = store.revertible(info.run_id)
    if not len(rows):
        return pd.DataFrame(columns=[*ROW_COLUMNS, "identity"])
    later = store.sent_after(info.run_id, info.base_url)
    if later:
        pairs = list(zip(rows["event_id"], rows["order_ticket_key"], strict=True))
        rows = rows[[pair not in later for pair in pairs]]
    return rows.reset_index(drop=True)


def run_rows_to_resume(store: Store, run_id: str) -> pd.DataFrame:
    """A run's plan rows as input rows (``--resume RUN`` with no input file): each with its
    identity, and the problem that made it invalid or hidden, so it is reported so again."""
    rows = store.rows(run_id)
    rows = rows.drop(columns=["identity"])
    stored_ids = store.plan_identities(run_id)
    if len(stored_ids):
        rows = rows.merge(stored_ids, on="position", how="left")
    else:
        rows["identity"] = None
    default = rows["event_id"].astype(str) + SEP + rows["order_ticket_key"].astype(str)
    rows["identity"] = rows["identity"].fillna(default)
    invalid = (rows["outcome"] == Outcome.INVALID.value).to_numpy()
    hidden = (rows["error_key"] == "row_hidden").to_numpy()
    rows["problem"] = np.where(invalid, rows["error_message"], np.where(hidden, HIDDEN_PROBLEM, ""))
    return rows.sort_values("position", kind="stable").reset_index(drop=True)
