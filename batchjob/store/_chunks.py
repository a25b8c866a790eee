"""ChunkStore: the run store's logic, the same over every backend (docs/store.md).

Skips, carry-over, resume, revert and history are worked out here from runs and column
chunks; a backend only keeps them. So SQLite and PostgreSQL cannot disagree about what a
store means.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from batchjob._errors import StoreError
from batchjob.store._base import (
    ROW_COLUMNS,
    SUCCESS_OUTCOMES,
    Backend,
    Done,
    RawRun,
    RunEnd,
    RunInfo,
    RunStart,
)
from batchjob.store._columns import (
    FOLD_SCHEMA,
    IDS,
    PLAN,
    PLAN_IDS,
    PLAN_IDS_SCHEMA,
    PLAN_SCHEMA,
    ROWS,
    ROWS_SCHEMA,
    concat,
    decode,
    encode,
    latest,
)

#: A plan is kept in chunks of at most this many rows (a database value has a size limit).
_PLAN_CHUNK_ROWS = 200_000


class ChunkStore:
    """The :class:`~batchjob.store.Store` every command uses, over a :class:`Backend`."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self.location = backend.location
        self._seqs: dict[str, int] = {}

    def close(self) -> None:
        self._backend.close()

    # --- a run, as it goes -------------------------------------------------------------------

    def begin_run(self, start: RunStart) -> None:
        self._seqs[start.run_id] = self._backend.begin_run(start)

    def add_plan(self, run_id: str, plan: pa.Table, identities: pa.Table | None) -> None:
        seq = self._seq(run_id)
        chunks = [
            (PLAN, encode(plan.slice(at, _PLAN_CHUNK_ROWS)))
            for at in range(0, max(plan.num_rows, 1), _PLAN_CHUNK_ROWS)
        ]
        if identities is not None:
            chunks += [
                (PLAN_IDS, encode(identities.slice(at, _PLAN_CHUNK_ROWS)))
                for at in range(0, max(identities.num_rows, 1), _PLAN_CHUNK_ROWS)
            ]
        self._backend.add_chunks(seq, chunks)

    def record(
        self, run_id: str, rows: pa.Table, ids: pa.Table, errors: Sequence[tuple[int, str, str]]
    ) -> None:
        chunks = [(ROWS, encode(rows))]
        if ids.num_rows:
            chunks.append((IDS, encode(ids)))
        self._backend.add_chunks(self._seq(run_id), chunks, errors)

    def end_run(self, run_id: str, end: RunEnd) -> None:
        self._backend.end_run(self._seq(run_id), end)
        info = self.run(run_id)
        if info is not None:
            # Best effort: folding only makes the next lookups faster.
            with contextlib.suppress(StoreError):
                self.fold(info.base_url)

    def fold(self, base_url: str) -> None:
        """Fold the identity chunks added since the last fold into one table for the API."""
        generation, base, chunks = self._backend.folded(base_url)
        if not chunks:
            return
        table = latest(self._decode_fold(base), chunks)
        self._backend.fold(base_url, generation, encode(table), chunks)

    # --- what a run needs before it sends ----------------------------------------------------

    def done(self, base_url: str, outcome: str, identities: Sequence[str]) -> Done:
        table = self._latest(base_url)
        table = table.filter(pc.equal(table["outcome"], outcome))
        empty = Done(np.empty(0, np.int64), [], np.empty(0, np.float64))
        if not table.num_rows or not len(identities):
            return empty
        asked = (
            identities if isinstance(identities, pa.Array) else pa.array(identities, pa.string())
        )
        where = pc.index_in(asked.cast(pa.string()), value_set=table["identity"])
        index = np.flatnonzero(where.is_valid().to_numpy(zero_copy_only=False)).astype(np.int64)
        if not len(index):
            return empty
        which = where.drop_null().to_numpy().astype(np.int64)
        seqs = table["run"].to_numpy()[which]
        names = self._run_ids(np.unique(seqs).tolist())
        run_ids = pd.Series(seqs).map(names).tolist()
        finished = table["finished_at"].to_numpy(zero_copy_only=False)[which]
        return Done(index, run_ids, np.asarray(finished, dtype=np.float64))

    def pending(self, base_url: str, action: str) -> pd.DataFrame:
        table = self._latest(base_url)
        table = table.filter(pc.equal(table["pending"], action))
        frames = []
        for seq, group in table.to_pandas().groupby("run", sort=True):
            plan = self._plan_rows(int(seq), group["position"].to_numpy())
            plan["identity"] = (
                group.set_index("position").loc[plan["position"], "identity"].to_numpy()
            )
            plan["outcome"] = (
                group.set_index("position").loc[plan["position"], "outcome"].to_numpy()
            )
            frames.append(plan)
        return _with_row_columns(frames)

    def last_run_for_report(self, report: str) -> RunInfo | None:
        found = self._backend.find_runs(report=report, limit=1)
        return _info(found[0]) if found else None

    # --- history -----------------------------------------------------------------------------

    def runs(self, limit: int) -> list[RunInfo]:
        return [_info(raw) for raw in self._backend.find_runs(limit=limit)]

    def run(self, run_id: str) -> RunInfo | None:
        """The run whose id is ``run_id``, or starts with it if just one does."""
        exact = self._backend.find_runs(run_id=run_id, limit=1)
        if exact:
            return _info(exact[0])
        found = self._backend.find_runs(prefix=run_id, limit=2)
        if len(found) > 1:
            raise StoreError(
                f"{run_id!r} names more than one run (for example {found[0].run_id} and "
                f"{found[1].run_id}): give more of the run id"
            )
        return _info(found[0]) if found else None

    def rows(self, run_id: str) -> pd.DataFrame:
        """The run's report rows (ROW_COLUMNS), one per plan row, in plan order; a row the run
        never decided (it was killed) has outcome ""."""
        seq = self._seq(run_id)
        plan = self._plan_rows(seq, None)
        outcomes = concat(
            [decode(c.data, ROWS_SCHEMA) for c in self._backend.run_chunks(seq, [ROWS])],
            ROWS_SCHEMA,
        ).to_pandas()
        outcomes = outcomes.drop_duplicates("position", keep="last").set_index("position")
        frame = plan.join(outcomes, on="position")
        frame["outcome"] = frame["outcome"].fillna("").astype(str)
        for column in ("http_status", "error", "attempts"):
            frame[column] = frame[column].fillna(0).astype(np.int64)
        errors = {code: (key, message) for code, key, message in self._backend.run_errors(seq)}
        codes = frame["error"].tolist()
        frame["error_key"] = [errors.get(c, ("", ""))[0] for c in codes]
        frame["error_message"] = [errors.get(c, ("", ""))[1] for c in codes]
        return _with_row_columns([frame])

    def sent_after(self, run_id: str, base_url: str) -> set[tuple[str, str]]:
        """(event, key) pairs that runs after ``run_id`` against ``base_url`` sent (or may
        have: any try at all), or reported done."""
        del base_url  # later_runs() keeps to the run's own API
        pairs: set[tuple[str, str]] = set()
        for seq in self._backend.later_runs(self._seq(run_id)):
            rows = concat(
                [decode(c.data, ROWS_SCHEMA) for c in self._backend.run_chunks(seq, [ROWS])],
                ROWS_SCHEMA,
            ).to_pandas()
            touched = rows[(rows["attempts"] > 0) | rows["outcome"].isin(list(SUCCESS_OUTCOMES))]
            if len(touched):
                plan = self._plan_rows(seq, touched["position"].unique())
                pairs |= set(zip(plan["event_id"], plan["order_ticket_key"], strict=True))
        return pairs

    def revertible(self, run_id: str) -> pd.DataFrame:
        """Rows ``run_id`` undid whose identity's latest word is still that run's."""
        info = self.run(run_id)
        if info is None:
            raise StoreError(f"{self.location}: no run {run_id!r} in the run store")
        seq = self._seq(run_id)
        table = self._latest(info.base_url).to_pandas()
        mine = table[(table["run"] == seq) & (table["outcome"] == "undone")]
        rows = self.rows(run_id)
        rows = rows[rows["outcome"] == "undone"].drop(columns=["identity"])
        merged = rows.merge(mine[["position", "identity"]], on="position", how="inner")
        return merged.drop_duplicates("position").reset_index(drop=True)

    def outcome_counts(self, run_id: str) -> list[tuple[str, str, int]]:
        """(event id, outcome, rows) of the report rows the store holds for ``run_id``: what
        ``batchjob runs`` shows for a run that left no record (running, died)."""
        rows = self.rows(run_id)
        rows = rows[rows["outcome"] != ""]
        counts = rows.groupby(["event_id", "outcome"], sort=False).size()
        return [
            (str(e), str(o), int(n))
            for (e, o), n in zip(counts.index.tolist(), counts.tolist(), strict=True)
        ]

    def prune(self, before: str) -> list[str]:
        """Drop the report rows and plans of the finished runs that started before ``before``
        (ISO 8601 UTC), after folding their identities in: skips stay as they were, and a run
        that still owns pending keys is kept whole; pruned runs stay listed, but cannot be
        reported again, resumed or reverted. Returns the runs pruned."""
        pruned: list[str] = []
        carrying: dict[str, set[int]] = {}  # by API: runs that still own pending keys
        for info in self.runs(1_000_000_000):
            if info.started_at > before or info.state != "finished":
                continue
            if info.base_url not in carrying:
                self.fold(info.base_url)
                table = self._latest(info.base_url)
                owners = table.filter(pc.not_equal(table["pending"], ""))["run"]
                carrying[info.base_url] = set(owners.to_pylist())
            seq = self._seq(info.run_id)
            if seq in carrying[info.base_url]:
                continue  # --pending needs its plan (where each pending key came from)
            if self._backend.drop_chunks(seq):
                pruned.append(info.run_id)
        return pruned

    # --- runs on one API key ------------------------------------------------------------------

    def lease(self, name: str, holder: str, seconds: float, dead: str = "") -> tuple[bool, str]:
        return self._backend.lease(name, holder, seconds, dead)

    def release(self, name: str, holder: str) -> None:
        self._backend.release(name, holder)

    def spend(self, name: str, day: str, want: int, limit: int) -> int:
        return self._backend.spend(name, day, want, limit)

    def unspend(self, name: str, day: str, count: int) -> None:
        self._backend.unspend(name, day, count)

    # --- helpers -----------------------------------------------------------------------------

    def _seq(self, run_id: str) -> int:
        seq = self._seqs.get(run_id)
        if seq is None:
            found = self._backend.find_runs(run_id=run_id, limit=1)
            if not found:
                raise StoreError(f"{self.location}: no run {run_id!r} in the run store")
            seq = self._seqs[run_id] = found[0].seq
        return seq

    def _run_ids(self, seqs: list[int]) -> dict[int, str]:
        names: dict[int, str] = {}
        for seq in seqs:
            found = self._backend.find_runs(seq=seq, limit=1)
            if found:
                names[seq] = found[0].run_id
        return names

    def latest(self, base_url: str) -> pa.Table:
        """Every identity's latest entry for the API (FOLD_SCHEMA), as skips and carry-over
        see them."""
        return self._latest(base_url)

    def _latest(self, base_url: str) -> pa.Table:
        _, base, chunks = self._backend.folded(base_url)
        return latest(self._decode_fold(base), chunks)

    def _decode_fold(self, base: bytes | None) -> pa.Table | None:
        if base is None:
            return None
        try:
            return decode(base, FOLD_SCHEMA)
        except StoreError as exc:
            raise StoreError(f"{self.location}: {exc}") from None

    def _plan_rows(self, seq: int, positions: Any) -> pd.DataFrame:
        """The run's plan rows (all, or those at ``positions``), with their source file."""
        try:
            plan = concat(
                [decode(c.data, PLAN_SCHEMA) for c in self._backend.run_chunks(seq, [PLAN])],
                PLAN_SCHEMA,
            )
        except StoreError as exc:
            raise StoreError(f"{self.location}: {exc}") from None
        if positions is not None:
            plan = plan.filter(pc.is_in(plan["position"], pa.array(positions, pa.int64())))
        frame = plan.to_pandas()
        files = self._backend.run_files(seq)
        frame["source_file"] = [files[f] if 0 <= f < len(files) else "" for f in frame["file"]]
        kept: pd.DataFrame = frame.drop(columns=["file"])
        return kept

    def plan_identities(self, run_id: str) -> pd.DataFrame:
        """(identity, position) of a run whose identities are not just event and key."""
        seq = self._seq(run_id)
        chunks = self._backend.run_chunks(seq, [PLAN_IDS])
        table = concat([decode(c.data, PLAN_IDS_SCHEMA) for c in chunks], PLAN_IDS_SCHEMA)
        frame: pd.DataFrame = table.to_pandas()
        return frame


def _with_row_columns(frames: list[pd.DataFrame]) -> pd.DataFrame:
    columns = [*ROW_COLUMNS, "identity"]
    if not frames:
        return pd.DataFrame(columns=columns)
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    defaults: dict[str, Any] = {
        "outcome": "",
        "http_status": 0,
        "error_key": "",
        "error_message": "",
        "attempts": 0,
        "finished_at": np.nan,
        "identity": "",
    }
    for column, value in defaults.items():
        if column not in frame:
            frame[column] = value
    frame["finished_at"] = frame["finished_at"].astype(float)
    return frame[[c for c in columns]].reset_index(drop=True)


def _info(raw: RawRun) -> RunInfo:
    if raw.ended_at is not None:
        state = "finished"
    elif raw.host == socket.gethostname() and raw.pid and not _alive(raw.pid):
        state = "died"
    else:
        state = "running"
    return RunInfo(
        run_id=raw.run_id,
        base_url=raw.base_url,
        action=raw.action,
        started_at=raw.started_at,
        ended_at=raw.ended_at,
        exit_code=raw.exit_code,
        stop_reason=raw.stop_reason,
        report=raw.report,
        requests=raw.requests,
        record=json.loads(raw.record) if raw.record else None,
        host=raw.host,
        pid=raw.pid,
        state=state,
    )


def _alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no cheap, safe check: say "running"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process: alive
    return True
