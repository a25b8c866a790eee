"""``run_job``: inputs -> plan -> requests -> report. The one function an orchestrator calls.

Invariant: every row of the plan ends in the report exactly once. Every path that takes keys
out of the planner (an answer, a give-up, a stop, a cancellation) writes them to the ledger;
before the report is written, any row still without an outcome (a bug) is reported as
``not_attempted`` rather than dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from batchjob._config import JobConfig, identity_extra
from batchjob._errors import ExitCode, InputError, ReportError, StoreError, TokenError, UsageError
from batchjob._logging import Redactor, null_logger
from batchjob._model import Outcome
from batchjob._tokens import TokenSource, lock_path_for
from batchjob.plan import Plan, Positions, build_plan
from batchjob.read import Inputs, read_inputs
from batchjob.record import (
    Journal,
    Ledger,
    Recorder,
    ReportLock,
    ReportPaths,
    RowWriter,
    check_paths,
    check_writable,
    mark_invalid,
    remove_stale_temp_files,
    resume_previous,
    set_outcome,
    write_final,
)
from batchjob.run._dispatch import Dispatcher, EventWork, NoProgress, Progress
from batchjob.run._incremental import (
    SEP,
    add_identity_column,
    api_of,
    carried_count,
    empty_inputs,
    plan_identities,
    revertible,
    run_rows_to_resume,
    skip_done,
    with_stored_rows,
)
from batchjob.run._record import (
    build_record,
    describe_inputs,
    new_run_id,
    utc_iso,
    write_summary_json,
)
from batchjob.run._remember import StoreJournal
from batchjob.run._result import RunResult
from batchjob.run._share import Allowances, DailyBudget, KeyLease, key_name
from batchjob.run._stop import StopRequest
from batchjob.send import (
    AdaptivePacer,
    AiohttpTransport,
    ApiClient,
    RequestGate,
    RetryPolicy,
    Transport,
    make_session,
)
from batchjob.store import ROW_COLUMNS, RunEnd, RunInfo, RunStart, Store, open_store, state_secrets


async def run_job(
    config: JobConfig,
    *,
    tokens: TokenSource | None = None,
    transport: Transport | None = None,
    log: Any = None,
    progress: Progress | None = None,
    stop: StopRequest | None = None,
    redactor: Redactor | None = None,
) -> RunResult:
    """Run one batch job as configured and return what happened.

    Raises :class:`~batchjob.InputError`, :class:`~batchjob.ConfigError` or
    :class:`~batchjob.ReportError` before anything is sent when the inputs or the report path
    cannot be used.

    ``redactor`` (the one ``log`` uses, if any) learns every token sent and the secrets of
    ``tokens``; no file written and no text returned holds one, whether it is passed or not.
    """
    started = time.monotonic()
    started_at = datetime.now(UTC)
    run_id = new_run_id(started_at)
    redactor = redactor if redactor is not None else Redactor()
    for secret in state_secrets(config.state):  # a database's password: never in a log line
        redactor.add(secret)
    log = log or null_logger()
    progress = progress or NoProgress()
    stop = stop or StopRequest()
    if not (config.inputs or config.pending or config.revert or config.resume_run):
        raise UsageError("no input files: name at least one, or pass --pending")
    if not config.dry_run and tokens is None:
        raise TokenError("no access token: set CC_ACCESS_TOKEN or a token file")

    store = await asyncio.to_thread(open_store, config.state)
    try:
        resuming = None
        if config.resume_run is not None:
            assert store is not None  # JobConfig refuses --resume RUN without a store
            resuming = await asyncio.to_thread(store.run, config.resume_run)
            if resuming is None:
                raise StoreError(f"no run {config.resume_run!r} in the run store {store.location}")
            if config.report is None:  # where that run wrote it (a path on its machine)
                config = dataclasses.replace(config, report=Path(resuming.report))
        report = config.report_path()
        paths = ReportPaths(report, config.failed_rows_path(report), config.summary_json)
        check_paths(paths, config.inputs, _files_to_keep(config))
        return await _run_with_store(
            config,
            store,
            tokens=tokens,
            transport=transport,
            log=log,
            progress=progress,
            stop=stop,
            redactor=redactor,
            paths=paths,
            run_id=run_id,
            started=started,
            started_at=started_at,
            resuming=resuming,
        )
    finally:
        if store is not None:
            store.close()


async def _run_with_store(
    config: JobConfig,
    store: Store | None,
    *,
    tokens: TokenSource | None,
    transport: Transport | None,
    log: Any,
    progress: Progress,
    stop: StopRequest,
    redactor: Redactor,
    paths: ReportPaths,
    run_id: str,
    started: float,
    started_at: datetime,
    resuming: RunInfo | None = None,
) -> RunResult:
    # The heavy parts run in a thread: a host's event loop (an orchestrator's, a notebook's)
    # must not stall for the seconds a million rows take.
    extra = identity_extra(config.identity)
    inputs = await asyncio.to_thread(_read, config, extra)
    earlier = resuming
    if earlier is None and store is not None and config.resume:
        earlier = await asyncio.to_thread(store.last_run_for_report, _report_key(paths.report))
    if earlier is not None:
        _check_resumable(config, earlier, log)
    stored = await asyncio.to_thread(_stored_rows, config, store, earlier, inputs)
    frame = None
    if store is not None and (extra or len(stored)):
        frame = await asyncio.to_thread(add_identity_column, inputs, bool(extra))
        frame = with_stored_rows(frame, stored)
        inputs = dataclasses.replace(inputs, frame=frame)
    plan = await asyncio.to_thread(build_plan, inputs)
    ids = await asyncio.to_thread(plan_identities, plan, frame) if store is not None else None
    described = (
        await asyncio.to_thread(_describe_inputs, config)
        if config.summary_json is not None or store is not None
        else []
    )
    carried = carried_count(plan)
    log.info(
        "plan.ready",
        rows=len(plan.rows),
        keys=plan.key_count,
        events=len(plan.events),
        invalid=len(plan.invalid),
        skipped=len(plan.skipped),
        duplicates=plan.duplicates,
        from_earlier_runs=carried,
    )
    if plan.seen:
        log.info("input.spreadsheet", seen=" | ".join(plan.seen.lines()))

    lock = ReportLock(paths.lock)
    lock.acquire()
    lease: KeyLease | None = None
    try:
        if earlier is None and store is not None and not config.resume:
            earlier = await asyncio.to_thread(store.last_run_for_report, _report_key(paths.report))
        if not config.resume:
            _refuse_existing(paths, earlier)
        check_writable(paths)
        for stale in remove_stale_temp_files(paths):
            log.info("report.stale_temp_removed", path=str(stale))
        ledger = Ledger(len(plan.rows), redactor)
        writer = RowWriter(plan.rows, plan.keys, ledger)
        ledger.set(plan.invalid, Outcome.INVALID, error_key="invalid_input")
        mark_invalid(plan, ledger)
        resumed: Positions = np.empty(0, np.int64)
        if config.resume:
            from_store = _resume_source(config, store, earlier) if earlier is not None else None
            resumed = await asyncio.to_thread(
                resume_previous, config, paths, plan, ledger, log, from_store
            )
        already_done = 0
        if store is not None and ids is not None and not config.again:
            already_done = await asyncio.to_thread(skip_done, store, config, plan, ids, ledger)
            if already_done:
                log.info("incremental.skipped", rows=already_done)

        pending_events = {
            event_id: positions[ledger.outcome[positions] == 0]
            for event_id, positions in plan.events.items()
        }
        pending_events = {e: p for e, p in pending_events.items() if len(p)}
        total = sum(len(p) for p in pending_events.values())

        budget = None
        if store is not None and not config.dry_run and total:
            name = key_name(config)
            # Reserved a few at a time: a killed run loses at most these for the day.
            budget = DailyBudget(store, name, config.daily_budget, chunk=int(config.rate * 2))
            lease = KeyLease(store, name, run_id, config.lease_timeout, log)
        gate = RequestGate(config.max_requests, Allowances(lease, budget))
        if lease is not None:
            # Before the run is recorded: runs on one key are recorded in the order they send,
            # which is the order "later runs win" in the store.
            refused = await lease.acquire(stop)
            if refused and not stop.event.is_set():  # a stop says so itself
                gate.close(refused)
        pacer = AdaptivePacer(
            config.rate,
            on_change=lambda old, new, why: log.info(
                "rate.changed", old=round(old, 3), new=round(new, 3), reason=why
            ),
        )
        run: Dispatcher | None = None
        recorded = False
        if config.dry_run:
            for positions in pending_events.values():
                ledger.set(positions, Outcome.PLANNED)
        else:
            assert tokens is not None
            journal: Recorder
            if store is not None and ids is not None:
                await asyncio.to_thread(
                    store.begin_run,
                    RunStart(
                        run_id=run_id,
                        base_url=api_of(config),
                        action=config.action.value,
                        started_at=utc_iso(started_at),
                        report=_report_key(paths.report),
                        files=StoreJournal.files(plan),
                        host=socket.gethostname(),
                        pid=os.getpid(),
                    ),
                )
                recorded = True
                journal = StoreJournal(
                    store, run_id, plan, ledger, ids, config.action.value, log=log
                )
                decided = np.flatnonzero(ledger.outcome != 0).astype(np.int64)
            else:
                journal = Journal(paths.journal, writer)
                decided = np.sort(np.concatenate([plan.invalid, plan.skipped]))
            try:
                journal.append(decided)
                run = await send_all(
                    config,
                    plan,
                    ledger,
                    journal,
                    pending_events,
                    tokens,
                    transport,
                    pacer,
                    gate,
                    stop,
                    log,
                    progress,
                    total,
                    redactor,
                )
            except BaseException as exc:
                if recorded and store is not None:
                    # Cancelled by a host, or a bug: the record says the run ended, and how.
                    _end_abruptly(store, run_id, exc)
                raise
            finally:
                journal.close()
                if journal.failed is not None:
                    log.error("journal.write_failed", error=str(journal.failed))
                if budget is not None:
                    await asyncio.to_thread(budget.give_back)

        unset = ledger.unset()
        if len(unset):
            log.error("ledger.unset_rows", rows=len(unset))
            set_outcome(
                ledger, unset, Outcome.NOT_ATTEMPTED, error_message="internal error: no outcome"
            )
        failed_count = await asyncio.to_thread(write_final, paths, writer, ledger)
        if not config.dry_run and not recorded:
            Journal.remove(paths.journal)
    finally:
        if lease is not None:
            await lease.release()
        lock.release()

    counts = {o.value: ledger.count(o) for o in Outcome}
    per_event = {
        event_id: {o.value: ledger.count(o, positions) for o in Outcome}
        for event_id, positions in plan.events.items()
    }
    done = counts[config.action.success.value]  # undone, or checked_in
    if run is not None and run.exit_code:
        exit_code = run.exit_code
    elif (
        done
        == len(plan.rows)
        - sum(
            counts[o.value]
            for o in (Outcome.PLANNED, Outcome.SKIPPED)  # skipped: not sent on purpose
        )
        and not counts[Outcome.INVALID]
    ):
        exit_code = ExitCode.OK
    else:
        exit_code = ExitCode.INCOMPLETE
    result = RunResult(
        report=paths.report,
        failed_rows=paths.failed_rows,
        exit_code=int(exit_code),  # a plain number in logs and JSON, like the process exit
        counts=counts,
        per_event=per_event,
        requests=gate.spent,
        retries=run.retries if run else 0,
        throttled=pacer.throttled_count,
        elapsed=time.monotonic() - started,
        rate=pacer.rate,
        stopped=run.stopped if run else "",
        duplicates=plan.duplicates,
        blank_rows=plan.blank_rows,
        failed_rows_count=failed_count,
        action=config.action.value,
        run_id=run_id,
        started_at=utc_iso(started_at),
        ended_at=utc_iso(datetime.now(UTC)),
        seen=plan.seen,
        already_done=already_done,
        from_earlier_runs=carried,
        state=store.location if store is not None else "",
        recorded=recorded,
    )
    record = build_record(config, result, described, redactor)
    if config.summary_json is not None:
        result = _write_summary(config.summary_json, record, result, log)
        record = build_record(config, result, described, redactor)
    if recorded and store is not None:
        result = await _end_run(store, run_id, result, record, log)
    log.info(
        "run.finished",
        exit_code=int(result.exit_code),
        requests=result.requests,
        retries=result.retries,
        throttled=result.throttled,
        elapsed=round(result.elapsed, 3),
        resumed_undone=len(resumed),
        already_done=already_done,
        from_earlier_runs=carried,
        action=config.action.value,
        run_id=run_id,
        **counts,
    )
    return result


def _read(config: JobConfig, extra: tuple[str, ...]) -> Inputs:
    if not config.inputs:
        return empty_inputs()
    return read_inputs(
        config.inputs,
        aliases=config.columns,
        default_event_id=config.event_id,
        key_pattern=config.key_pattern,
        include_hidden_rows=config.include_hidden_rows,
        identity_columns=extra,
    )


def _stored_rows(
    config: JobConfig, store: Store | None, earlier: RunInfo | None, inputs: Inputs
) -> pd.DataFrame:
    """Rows this run takes from the store, besides its inputs: the rows of the run it resumes
    (all of them without inputs; those the inputs lack with them, such as keys that run took
    from the store), a reverted run's keys, and pending keys."""
    columns = [*ROW_COLUMNS, "identity"]
    if store is None:
        return pd.DataFrame(columns=columns)
    parts = []
    if earlier is not None and config.resume:
        rows = run_rows_to_resume(store, earlier.run_id)
        if not len(rows) and not config.inputs:
            raise StoreError(
                f"the run store holds no plan of run {earlier.run_id} (it stopped before "
                "recording it): resume it with its input files"
            )
        if config.inputs:
            rows = rows[rows["problem"] == ""]  # the inputs say again which rows are unusable
        parts.append(rows)
    if config.revert is not None:
        parts.append(revertible(store, config.revert, config))
    if config.pending:
        parts.append(store.pending(api_of(config), config.action.value))
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=columns)
    stored = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    pairs = stored["event_id"].astype(str) + SEP + stored["order_ticket_key"].astype(str)
    # A key the inputs hold is reported where they have it; a key two sources hold, once.
    keep = ~pairs.duplicated().to_numpy()
    if config.inputs and len(inputs.frame):
        frame = inputs.frame
        given = frame["event_id"].astype(str) + SEP + frame["order_ticket_key"].astype(str)
        keep &= ~pairs.isin(given).to_numpy()  # pandas' hash table: no Python set of rows
    return stored[keep].reset_index(drop=True)


def _report_key(report: Path) -> str:
    """How the store names a report: its absolute path (links are refused anyway)."""
    return os.path.abspath(report)


def _refuse_existing(paths: ReportPaths, earlier: RunInfo | None) -> None:
    if paths.report.exists() or paths.journal.exists():
        found = paths.report if paths.report.exists() else paths.journal
        raise ReportError(
            f"{found} already exists (an earlier run's report); pass --resume to continue "
            "that run, or choose another --report path"
        )
    if earlier is not None and (earlier.state != "finished" or not earlier.record):
        how = "ended early" if earlier.state == "finished" else f"is {earlier.state}"
        raise ReportError(
            f"run {earlier.run_id} wrote to {paths.report} and did not finish (it {how}); "
            "pass --resume to continue that run, or choose another --report path"
        )


def _check_resumable(config: JobConfig, earlier: RunInfo, log: Any) -> None:
    if earlier.base_url != api_of(config):
        raise ReportError(
            f"run {earlier.run_id} (report {earlier.report}) was against {earlier.base_url}, "
            f"not {api_of(config)}: resume it against the API it started with"
        )
    if earlier.action != config.action.value:
        raise ReportError(
            f"run {earlier.run_id} was an --action {earlier.action} run: resume it with "
            f"--action {earlier.action}"
        )
    if earlier.state == "running" and earlier.host != socket.gethostname():
        # Another machine (or a container's new hostname): the store cannot tell whether it
        # is still running. Two runs of it would take turns on the key's lease, and undo is
        # idempotent, so this is said, not refused.
        log.warning("resume.maybe_running", run_id=earlier.run_id, host=earlier.host)


def _resume_source(
    config: JobConfig, store: Store | None, earlier: RunInfo
) -> tuple[pd.DataFrame, Callable[[Any], str]]:
    """The rows of the run to continue that it finished, from the store. A row is carried
    over only while the store still says it is done (a revert or a later check-in since may
    have changed it): the report must say what is true now."""
    assert store is not None
    rows = run_rows_to_resume(store, earlier.run_id)
    rows = rows[~rows["outcome"].isin([Outcome.INVALID.value, Outcome.SKIPPED.value, ""])]
    success = rows["outcome"] == config.action.success.value
    if success.any():
        done = store.done(api_of(config), config.action.success.value, rows["identity"].tolist())
        still = np.zeros(len(rows), dtype=np.bool_)
        still[done.index] = True
        # Every identity of a position must still be done (rows repeat per identity).
        gone = set(rows["position"][success.to_numpy() & ~still])
        rows = rows[~(success & rows["position"].isin(gone))]
    rows = rows.drop_duplicates("position").drop(columns=["position", "identity", "problem"])

    def place(row: Any) -> str:
        where = f"row {row['source_row']} of {row['source_file']}"
        return f"run {earlier.run_id} in the run store, {where}"

    return rows, place


def _end_abruptly(store: Store, run_id: str, exc: BaseException) -> None:
    end = RunEnd(
        ended_at=utc_iso(datetime.now(UTC)),
        exit_code=int(ExitCode.STOPPED),
        stop_reason=f"ended by {type(exc).__name__} before its report was written",
        requests=0,
        record={},
    )
    with contextlib.suppress(StoreError):
        store.end_run(run_id, end)


async def _end_run(
    store: Store, run_id: str, result: RunResult, record: dict[str, Any], log: Any
) -> RunResult:
    """Close the run's record; if the store fails now, the run says so (exit 3)."""
    end = RunEnd(
        ended_at=result.ended_at,
        exit_code=int(result.exit_code),
        stop_reason=result.stopped,
        requests=result.requests,
        record=record,
    )
    try:
        await asyncio.to_thread(store.end_run, run_id, end)
    except StoreError as exc:
        log.error("store.write_failed", error=str(exc))
        stopped = f"{result.stopped}; {exc}" if result.stopped else str(exc)
        code = result.exit_code if result.exit_code > ExitCode.INCOMPLETE else ExitCode.STOPPED
        return dataclasses.replace(result, stopped=stopped, exit_code=int(code))
    return result


async def send_all(
    config: JobConfig,
    plan: Plan,
    ledger: Ledger,
    journal: Recorder,
    pending: dict[str, Positions],
    tokens: TokenSource,
    transport: Transport | None,
    pacer: AdaptivePacer,
    gate: RequestGate,
    stop: StopRequest,
    log: Any,
    progress: Progress,
    total: int,
    redactor: Redactor,
) -> Dispatcher:
    session = None
    if transport is None:
        session = make_session(
            connect_timeout=config.connect_timeout,
            request_timeout=config.request_timeout,
            concurrency=config.concurrency,
        )
        transport = AiohttpTransport(session)
    policy = RetryPolicy(
        max_tries=config.retry_max_tries,
        max_time=config.retry_max_time,
        unreachable_after=config.unreachable_after,
        base=config.retry_base,
        cap=config.retry_cap,
    )
    client = ApiClient(
        transport,
        config.base_url,
        tokens,
        pacer,
        gate,
        policy,
        log=log,
        redactor=redactor,
    )
    run = Dispatcher(config, plan, ledger, journal, client, pacer, gate, stop, log, progress)
    run.events = [EventWork(event_id, positions) for event_id, positions in pending.items()]
    progress.start(total)
    try:
        await run.dispatch()
        run.close_out()
    finally:
        progress.close()
        if session is not None:
            await session.close()
    return run


def _describe_inputs(config: JobConfig) -> list[dict[str, Any]]:
    try:
        return describe_inputs(config.inputs)
    except OSError as exc:
        raise InputError(f"cannot read an input again to record its SHA-256: {exc}") from None


def _write_summary(path: Path, record: dict[str, Any], result: RunResult, log: Any) -> RunResult:
    """Write the record; if that fails, the run did not end as a scheduler will read it, so
    it says so: exit 3 rather than 0 or 1 (the report is written all the same)."""
    try:
        write_summary_json(path, record)
    except OSError as exc:
        log.error("summary_json.write_failed", path=str(path), error=str(exc))
        reason = f"cannot write the summary JSON {path}: {exc.strerror or exc}"
        stopped = f"{result.stopped}; {reason}" if result.stopped else reason
        code = result.exit_code if result.exit_code > ExitCode.INCOMPLETE else ExitCode.STOPPED
        return dataclasses.replace(result, stopped=stopped, exit_code=code)
    log.info("summary_json.written", path=str(path))
    return result


def _files_to_keep(config: JobConfig) -> list[tuple[str, Path]]:
    """Files a run reads that an output path must never replace: losing the token file loses
    the refresh token, which only a person with a browser can get again."""
    keep = []
    if config.token_file is not None:
        keep += [
            ("the token file", config.token_file),
            ("the token file's lock", lock_path_for(config.token_file)),
        ]
    if config.config_file is not None:
        keep.append(("the config file", config.config_file))
    return keep
