"""``run_job``: inputs -> plan -> requests -> report. The one function an orchestrator calls.

Invariant: every row of the plan ends in the report exactly once. Every path that takes keys
out of the planner (an answer, a give-up, a stop, a cancellation) writes them to the ledger;
before the report is written, any row still without an outcome (a bug) is reported as
``not_attempted`` rather than dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from batchjob._config import JobConfig
from batchjob._errors import ExitCode, InputError, ReportError, TokenError
from batchjob._logging import Redactor, null_logger
from batchjob._model import Outcome
from batchjob._tokens import TokenSource, lock_path_for
from batchjob.plan import Plan, Positions, build_plan
from batchjob.read import read_inputs
from batchjob.record import (
    Journal,
    Ledger,
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
from batchjob.run._record import (
    build_record,
    describe_inputs,
    new_run_id,
    utc_iso,
    write_summary_json,
)
from batchjob.run._result import RunResult
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
    log = log or null_logger()
    progress = progress or NoProgress()
    stop = stop or StopRequest()
    report = config.report_path()
    paths = ReportPaths(report, config.failed_rows_path(report), config.summary_json)
    check_paths(paths, config.inputs, _files_to_keep(config))

    # The heavy parts run in a thread: a host's event loop (an orchestrator's, a notebook's)
    # must not stall for the seconds a million rows take.
    inputs = await asyncio.to_thread(
        read_inputs,
        config.inputs,
        aliases=config.columns,
        default_event_id=config.event_id,
        key_pattern=config.key_pattern,
        include_hidden_rows=config.include_hidden_rows,
    )
    plan = await asyncio.to_thread(build_plan, inputs)
    described = (
        await asyncio.to_thread(_describe_inputs, config) if config.summary_json is not None else []
    )
    log.info(
        "plan.ready",
        rows=len(plan.rows),
        keys=plan.key_count,
        events=len(plan.events),
        invalid=len(plan.invalid),
        skipped=len(plan.skipped),
        duplicates=plan.duplicates,
    )
    if plan.seen:
        log.info("input.spreadsheet", seen=" | ".join(plan.seen.lines()))
    if not config.dry_run and tokens is None:
        raise TokenError("no access token: set CC_ACCESS_TOKEN or a token file")

    lock = ReportLock(paths.lock)
    lock.acquire()
    try:
        if not config.resume and (paths.report.exists() or paths.journal.exists()):
            found = paths.report if paths.report.exists() else paths.journal
            raise ReportError(
                f"{found} already exists (an earlier run's report); pass --resume to continue "
                "that run, or choose another --report path"
            )
        check_writable(paths)
        for stale in remove_stale_temp_files(paths):
            log.info("report.stale_temp_removed", path=str(stale))
        ledger = Ledger(len(plan.rows), redactor)
        writer = RowWriter(plan.rows, plan.keys, ledger)
        ledger.set(plan.invalid, Outcome.INVALID, error_key="invalid_input")
        mark_invalid(plan, ledger)
        skip = (
            await asyncio.to_thread(resume_previous, config, paths, plan, ledger, log)
            if config.resume
            else 0
        )

        pending_events = {
            event_id: positions[ledger.outcome[positions] == 0]
            for event_id, positions in plan.events.items()
        }
        pending_events = {e: p for e, p in pending_events.items() if len(p)}
        total = sum(len(p) for p in pending_events.values())

        gate = RequestGate(config.max_requests)
        pacer = AdaptivePacer(
            config.rate,
            on_change=lambda old, new, why: log.info(
                "rate.changed", old=round(old, 3), new=round(new, 3), reason=why
            ),
        )
        run: Dispatcher | None = None
        if config.dry_run:
            for positions in pending_events.values():
                ledger.set(positions, Outcome.PLANNED)
        else:
            assert tokens is not None
            journal = Journal(paths.journal, writer)
            try:
                journal.append(np.sort(np.concatenate([plan.invalid, plan.skipped])))
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
            finally:
                journal.close()
                if journal.failed is not None:
                    log.error("journal.write_failed", error=str(journal.failed))

        unset = ledger.unset()
        if len(unset):
            log.error("ledger.unset_rows", rows=len(unset))
            set_outcome(
                ledger, unset, Outcome.NOT_ATTEMPTED, error_message="internal error: no outcome"
            )
        failed_count = await asyncio.to_thread(write_final, paths, writer, ledger)
        if not config.dry_run:
            Journal.remove(paths.journal)
    finally:
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
    )
    if config.summary_json is not None:
        result = _write_summary(
            config.summary_json, build_record(config, result, described, redactor), result, log
        )
    log.info(
        "run.finished",
        exit_code=int(result.exit_code),
        requests=result.requests,
        retries=result.retries,
        throttled=result.throttled,
        elapsed=round(result.elapsed, 3),
        resumed_undone=skip,
        action=config.action.value,
        run_id=run_id,
        **counts,
    )
    return result


async def send_all(
    config: JobConfig,
    plan: Plan,
    ledger: Ledger,
    journal: Journal,
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
