"""The run: inputs → plan → requests → report. The one function an orchestrator calls.

Data flows one way: :mod:`._inputs` reads, :mod:`._plan` groups, :mod:`._groups` decides each
request, :mod:`._api` sends it (paced by :mod:`._pacing`), :mod:`._report` records it.

Invariant: every row of the plan ends in the report exactly once. Every path that takes keys
out of the planner (an answer, a give-up, a stop, a cancellation) writes them to the ledger;
before the report is written, any row still without an outcome (a bug) is reported as
``not_attempted`` rather than dropped.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from batchjob._api import (
    TOKEN_FAILED,
    AiohttpTransport,
    Answer,
    ApiClient,
    Call,
    Reply,
    RequestGate,
    RetryPolicy,
    TokenSource,
    Transport,
    Verdict,
    make_session,
)
from batchjob._config import JobConfig
from batchjob._groups import Group, KeyIsolator, Positions
from batchjob._inputs import read_inputs
from batchjob._logging import MAX_REPORT_TEXT, Redactor, null_logger, printable
from batchjob._model import Outcome
from batchjob._pacing import AdaptivePacer
from batchjob._plan import Plan, build_plan
from batchjob._report import (
    Journal,
    Ledger,
    ReportError,
    ReportLock,
    ReportPaths,
    RowWriter,
    check_paths,
    check_writable,
    read_previous,
    record_place,
    remove_stale_temp_files,
    write_final,
)

ACTIVE_STATUSES = frozenset({"ACTIVE", "COMPLETE"})
#: Refused requests in a row, with no success between, after which the event is looked at
#: again (then twice as many): an event cancelled mid-run must not cost a request per key.
RECHECK_AFTER_REFUSALS = 5

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3
EXIT_SIGHUP = 129
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class Progress(Protocol):
    """What the run tells a progress display. All calls are cheap and synchronous."""

    def start(self, total: int) -> None: ...

    def advance(self, keys: int, rate: float) -> None: ...

    def close(self) -> None: ...


class _NoProgress:
    def start(self, total: int) -> None:
        pass

    def advance(self, keys: int, rate: float) -> None:
        pass

    def close(self) -> None:
        pass


class StopRequest:
    """Set from a signal handler (or by an orchestrator) to stop the run gracefully.

    :meth:`hurry` (a second Ctrl-C) cuts the grace period short: requests in flight are
    cancelled, and their keys reported as sent without an answer.
    """

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.hurried = asyncio.Event()
        self.reason = ""
        self.exit_code = EXIT_SIGINT

    def request(self, reason: str, exit_code: int) -> None:
        if not self.event.is_set():
            self.reason, self.exit_code = reason, exit_code
            self.event.set()

    def hurry(self) -> None:
        """Stop now: waiting for answers in flight is not worth it any more."""
        self.hurried.set()

    def signal(self, reason: str, exit_code: int, *, may_hurry: bool = True) -> None:
        """A signal: the first stops gracefully, a later one (``may_hurry``) hurries."""
        if self.event.is_set():
            if may_hurry:
                self.hurry()
        else:
            self.request(reason, exit_code)


@dataclass(frozen=True)
class RunResult:
    report: Path
    failed_rows: Path
    exit_code: int
    counts: dict[str, int]  # report rows by outcome
    per_event: dict[str, dict[str, int]]
    requests: int  # HTTP requests sent (every attempt, including event checks and retries)
    retries: int
    throttled: int
    elapsed: float
    rate: float  # the pacer's rate at the end
    stopped: str = ""  # why the run stopped early, if it did
    duplicates: int = 0
    blank_rows: int = 0
    failed_rows_count: int = 0

    def summary(self) -> str:
        lines = [f"report:      {self.report}"]
        lines.append(f"failed rows: {self.failed_rows} ({self.failed_rows_count} rows)")
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items() if v)
        lines.append(f"outcomes:    {counts or 'no rows'}")
        for event_id, c in self.per_event.items():
            lines.append(f"  {event_id}: " + ", ".join(f"{k} {v}" for k, v in c.items() if v))
        lines.append(
            f"requests:    {self.requests} sent, {self.retries} retries, "
            f"{self.throttled} throttled (429); rate now {self.rate:.2f}/s"
        )
        if self.duplicates or self.blank_rows:
            lines.append(
                f"input:       {self.duplicates} duplicate rows merged, "
                f"{self.blank_rows} blank rows skipped"
            )
        lines.append(f"elapsed:     {self.elapsed:.1f}s")
        if self.stopped:
            lines.append(f"stopped:     {printable(self.stopped)}")
        return "\n".join(lines)


@dataclass
class _Event:
    event_id: str
    positions: Positions
    # unchecked → checking → ready ⇄ (recheck → rechecking) ; any → closed
    state: str = "unchecked"
    isolator: KeyIsolator[Reply] | None = None
    refusals: int = 0  # refused requests since the last success
    recheck_at: int = RECHECK_AFTER_REFUSALS
    closed_as: dict[str, Any] | None = None  # outcome fields for keys left when it closed


def _now() -> float:
    return time.time()


def _reply_fields(reply: Reply) -> dict[str, Any]:
    return {
        "http_status": max(reply.status, 0),
        "error_key": reply.error_key,
        "error_message": reply.error_message,
    }


class _Run:
    def __init__(
        self,
        config: JobConfig,
        plan: Plan,
        ledger: Ledger,
        journal: Journal | None,
        client: ApiClient,
        pacer: AdaptivePacer,
        gate: RequestGate,
        stop: StopRequest,
        log: Any,
        progress: Progress,
    ) -> None:
        self.redactor = client.redactor  # knows every secret of the run
        self.config = config
        self.plan = plan
        self.ledger = ledger
        self.journal = journal
        self.client = client
        self.pacer = pacer
        self.gate = gate
        self.stop = stop
        self.log = log
        self.progress = progress
        self.events: list[_Event] = []
        self.stopped = ""
        self.exit_code = EXIT_OK
        self.retries = 0
        self.batch_limit = config.batch_size  # lowered run-wide when the server answers 413
        self.calls: dict[asyncio.Task[Any], Call] = {}  # undo requests under way, by task

    # --- bookkeeping -----------------------------------------------------------------------

    def record(
        self,
        positions: Positions,
        outcome: Outcome,
        keys: list[str] | None = None,
        *,
        refused: bool = False,
        **fields: Any,
    ) -> None:
        """Set an outcome; ``refused``: the server itself refused these keys (a 4xx)."""
        if len(positions) == 0:
            return
        set_outcome(self.ledger, positions, outcome, hedge=not refused, **fields)
        if self.journal is not None:
            self.journal.append(positions, keys)
        self.progress.advance(len(positions), self.pacer.rate)

    def count_tries(self, positions: Positions, call: Call) -> None:
        self.ledger.attempts[positions] += call.attempts
        self.ledger.uncertain[positions] += call.uncertain + call.in_flight

    def halt(self, reason: str, exit_code: int) -> None:
        if not self.stopped:
            # It reaches the summary on stdout and every key left: no secret, one line.
            reason = self.redactor.clean(reason, MAX_REPORT_TEXT)
            self.stopped, self.exit_code = reason, exit_code
            self.gate.close(reason)
            self.log.warning("run.stopping", reason=reason)

    def on_attempt(self, reply: Reply, attempt: int) -> None:
        if attempt > 1:
            self.retries += 1
        self.log.debug(
            "request.answer", status=reply.status, error_key=reply.error_key, attempt=attempt
        )

    # --- dispatching -----------------------------------------------------------------------

    def next_job(self) -> Coroutine[Any, Any, None] | None:
        for event in self.events:
            if event.state == "unchecked":
                event.state = "checking"
                return self.check_event(event)
            if event.state == "recheck":
                event.state = "rechecking"
                return self.check_event(event, again=True)
            if event.state == "ready" and event.isolator is not None:
                group = event.isolator.next_group()
                if group is not None:
                    return self.send(event, group)
        return None

    async def dispatch(self) -> None:
        tasks: set[asyncio.Task[None]] = set()
        finished: list[asyncio.Task[None]] = []
        wake = asyncio.Event()

        def on_done(task: asyncio.Task[None]) -> None:
            finished.append(task)
            wake.set()

        # One wake-up event for "a job finished" and "a signal came": waiting on it costs
        # the same however many requests are in flight (asyncio.wait on the set would not).
        stop_wait = asyncio.ensure_future(self.stop.event.wait())
        stop_wait.add_done_callback(lambda _: wake.set())
        hurry_wait = asyncio.ensure_future(self.stop.hurried.wait())
        drained = False
        try:
            while True:
                if self.stop.event.is_set() and not drained:
                    # A signal: whatever else stopped the run, in-flight requests get the
                    # grace period and no more; a second signal (hurry) ends it at once.
                    self.halt(self.stop.reason, self.stop.exit_code)
                    drained = True
                    await self.drain(tasks, grace=self.config.grace_period, wake=hurry_wait)
                    tasks = set()
                while not self.stopped and len(tasks) < self.config.concurrency:
                    job = self.next_job()
                    if job is None:
                        break
                    task = asyncio.ensure_future(job)
                    task.add_done_callback(on_done)
                    tasks.add(task)
                if not tasks:
                    break
                if not finished:
                    wake.clear()
                    await wake.wait()
                while finished:
                    task = finished.pop()
                    tasks.discard(task)
                    self.check_crash(task)
                if self.journal is not None and self.journal.failed is not None:
                    self.halt(
                        f"internal error: cannot write the journal: {self.journal.failed}",
                        EXIT_STOPPED,
                    )
                if self.stopped and not drained and tasks:
                    # Stopped by quota, token, budget or a bug: answers on their way are
                    # worth waiting for, retries sleeping in backoff are not.
                    drained = True
                    await self.drain(tasks, grace=self.config.grace_period, wake=stop_wait)
                    tasks = set()
        finally:
            stop_wait.cancel()
            hurry_wait.cancel()
            if tasks:
                await self.drain(tasks, grace=0)

    def check_crash(self, task: asyncio.Task[None]) -> None:
        """A job that raised is a bug: stop cleanly so the report still accounts for every key."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        self.log.error("run.internal_error", error=repr(exc))
        self.halt(f"internal error: {exc!r}", EXIT_STOPPED)

    async def drain(
        self,
        tasks: set[asyncio.Task[None]],
        *,
        grace: float,
        wake: asyncio.Future[Any] | None = None,
    ) -> None:
        """Let requests in flight finish within ``grace`` seconds, then cancel the rest.

        ``wake`` (the stop signal) cuts the grace short when it fires.
        """
        pending = set(tasks)
        if wake is not None and wake.done():
            grace = 0
        if grace > 0 and pending:
            deadline = asyncio.get_running_loop().time() + grace
            while pending and (wake is None or not wake.done()):
                # A request not on the wire (sleeping out a backoff, waiting for a slot) can
                # only be refused by the closed gate: no answer to wait for, so it ends now.
                for task in pending:
                    call = self.calls.get(task)
                    if call is not None and not call.in_flight and not task.cancelling():
                        task.cancel()
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                watch = pending | ({wake} if wake is not None else set())
                # Woken now and then: a request answered 5xx goes to sleep, not to an end.
                await asyncio.wait(
                    watch, timeout=min(left, 0.1), return_when=asyncio.FIRST_COMPLETED
                )
                for task in [t for t in pending if t.done()]:
                    self.check_crash(task)
                pending = {t for t in pending if not t.done()}
        if pending and wake is not None and wake.done():
            self.cut_short(len(pending))
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def cut_short(self, requests: int) -> None:
        """Requests under way are about to be cancelled: say so in every message from now."""
        self.log.warning("run.hurrying", requests=requests)
        self.stopped += "; stopped again, so requests in flight were cancelled"

    # --- jobs ------------------------------------------------------------------------------

    def new_isolator(self, positions: Positions) -> KeyIsolator[Reply]:
        # A 404 names missing keys; any other refusal might be about the request as a whole,
        # so a key blamed only by elimination is sent alone once before it is reported.
        return KeyIsolator(positions, self.batch_limit, needs_proof=lambda r: r.status != 404)

    async def check_event(self, event: _Event, *, again: bool = False) -> None:
        """GET the event: once before its first undo, again if its requests keep failing.

        A missing or inactive event costs no undo request (or no more of them).
        """
        after = "ready" if again else "unchecked"
        try:
            answer = await self.client.get_event(event.event_id)
        except asyncio.CancelledError:
            event.state = after  # its keys become not_attempted at the end
            raise
        reply = answer.reply
        if answer.not_sent:
            event.state = after
            self.halt(answer.not_sent, EXIT_STOPPED)
            return
        verdict = reply.verdict
        if verdict is Verdict.OK:
            status = self.redactor.clean(_event_status(reply.body), 100)
            if status in ACTIVE_STATUSES:
                event.state = "ready"
                if event.isolator is None:
                    event.isolator = self.new_isolator(event.positions)
                self.log.info(
                    "event.rechecked" if again else "event.ready",
                    event_id=event.event_id,
                    status=status,
                    keys=len(event.positions),
                )
                return
            self.log.warning("event.not_active", event_id=event.event_id, status=status)
            self.close_event(
                event,
                error_key="event_not_active",
                error_message=f"event status is {status or 'unknown'}; undo needs ACTIVE or "
                + (
                    "COMPLETE (it changed during the run)"
                    if again
                    else "COMPLETE (nothing was sent)"
                ),
            )
            return
        if self.stops_run(reply):
            event.state = after
            return
        if again and reply.status != 404:
            event.state = "ready"  # could not look; carry on as before
            return
        message = (
            "event not found" if reply.status == 404 else f"event check failed: {reply.status}"
        )
        self.log.warning("event.unusable", event_id=event.event_id, status=reply.status)
        self.close_event(
            event,
            http_status=max(reply.status, 0),
            error_key=reply.error_key or ("event_not_found" if reply.status == 404 else ""),
            error_message=f"{message}: {reply.error_message}" if reply.error_message else message,
        )

    def close_event(self, event: _Event, **fields: Any) -> None:
        """No more requests for this event: its unsettled keys fail with ``fields``."""
        event.state = "closed"
        event.closed_as = fields
        if event.isolator is None:
            self.record(event.positions, Outcome.FAILED, **fields)
        else:
            self.flush_closed(event)

    def flush_closed(self, event: _Event) -> None:
        assert event.closed_as is not None
        if event.isolator is None:
            return  # closed before any undo: close_event recorded every key
        untested, suspects = event.isolator.leftovers()
        self.record(untested, Outcome.FAILED, **event.closed_as)
        for positions, _ in suspects:
            self.record(positions, Outcome.FAILED, **event.closed_as)

    def stops_run(self, reply: Reply) -> bool:
        verdict = reply.verdict
        if verdict is Verdict.QUOTA:
            self.halt("daily quota exceeded (429 quota_exceeded); resets 00:00 UTC", EXIT_STOPPED)
        elif verdict is Verdict.AUTH:
            self.halt(
                reply.error_message
                if reply.error_key == TOKEN_FAILED
                else "access token rejected (401): get a new token (see README, Getting a token)",
                EXIT_STOPPED,
            )
        elif verdict is Verdict.FORBIDDEN:
            said = f" {reply.error_key}" if reply.error_key else ""
            self.halt(
                f"forbidden (403{said}): the token lacks scope campaign_data or privilege "
                "campaign:write, or the app is deactivated",
                EXIT_STOPPED,
            )
        else:
            return False
        return True

    async def send(self, event: _Event, group: Group) -> None:
        assert event.isolator is not None
        isolator = event.isolator
        positions = group.positions
        call = Call()
        keys = self.plan.keys_at(positions)
        task = asyncio.current_task()
        if task is not None:
            self.calls[task] = call  # so that a stopping run can tell who is on the wire
        try:
            answer = await self.client.undo_check_in(event.event_id, keys, call)
        except BaseException as exc:
            # Cancelled (a stop) or a bug: the tries made still count, and one cut short on
            # the wire may have been applied; a bug's keys end "internal error" in run_job.
            self.count_tries(positions, call)
            if isinstance(exc, asyncio.CancelledError):
                self.record(
                    isolator.record_no_verdict(group.id),
                    Outcome.NOT_ATTEMPTED,
                    error_key="interrupted",
                    error_message=f"run stopped ({self.stopped or 'cancelled'}) before an "
                    "answer came",
                )
            raise
        finally:
            if task is not None:
                self.calls.pop(task, None)
        self.count_tries(positions, call)
        self.settle(event, isolator, group, answer, keys)
        if event.closed_as is not None:
            self.flush_closed(event)

    def settle(
        self,
        event: _Event,
        isolator: KeyIsolator[Reply],
        group: Group,
        answer: Answer,
        keys: list[str] | None = None,
    ) -> None:
        reply = answer.reply
        verdict = reply.verdict
        log = self.log
        about = {"event_id": event.event_id, "keys": len(group.positions)}
        if answer.not_sent:
            self.halt(answer.not_sent, EXIT_STOPPED)
            self.record(
                isolator.record_no_verdict(group.id),
                Outcome.NOT_ATTEMPTED,
                error_message=self.stopped,
            )
            return
        if verdict is Verdict.OK:
            event.refusals = 0
            result = isolator.record_ok(group.id)
            # record_ok settles exactly the keys sent: the journal can reuse their texts.
            sent = keys if result.undone is group.positions else None
            self.record(result.undone, Outcome.UNDONE, sent, http_status=reply.status)
            log.info("chunk.undone", **about, attempts=answer.attempts)
        elif verdict is Verdict.KEY_FAULT:
            result = isolator.record_refused(group.id, reply)
            log.info(
                "chunk.refused",
                **about,
                status=reply.status,
                error_key=reply.error_key,
                isolating=len(group.positions) > 1,
            )
            event.refusals += 1
            if event.refusals >= event.recheck_at and event.state == "ready":
                # Many refusals and no success: maybe the event, not the keys, is the problem.
                event.state = "recheck"
                event.recheck_at *= 2
        elif verdict is Verdict.TOO_LARGE and len(group.positions) > 1:
            isolator.record_too_large(group.id)
            # The server's size limit holds for every event: learn it once for the run.
            self.batch_limit = isolator.max_batch
            for other in self.events:
                if other.isolator is not None:
                    other.isolator.shrink_batch(self.batch_limit)
            log.warning("chunk.too_large", **about, batch_size=self.batch_limit)
            return
        elif self.stops_run(reply):
            # The last attempt was refused; one before it may have been applied unanswered.
            self.record(
                isolator.record_no_verdict(group.id),
                Outcome.NOT_ATTEMPTED,
                **_reply_fields(reply) | {"error_message": self.stopped},
            )
            return
        else:
            gave_up = "retries exhausted: " if verdict is Verdict.RETRY else ""
            fields = _reply_fields(reply)
            fields["error_message"] = gave_up + (reply.error_message or f"HTTP {reply.status}")
            self.record(isolator.record_no_verdict(group.id), Outcome.FAILED, **fields)
            log.warning("chunk.failed", **about, status=reply.status, error_key=reply.error_key)
            return
        for position, blame in result.bad:
            self.record(
                np.array([position], dtype=np.int64),
                Outcome.FAILED,
                refused=True,
                **_reply_fields(blame),
            )

    # --- closing ---------------------------------------------------------------------------

    def close_out(self) -> None:
        """Give every key the planner still holds an outcome: the run stopped before it."""
        reason = self.stopped or "run ended before this key was sent"
        for event in self.events:
            if event.state in ("unchecked", "checking"):
                self.record(event.positions, Outcome.NOT_ATTEMPTED, error_message=reason)
            elif event.closed_as is not None:
                self.flush_closed(event)
            elif event.isolator is not None:
                untested, suspects = event.isolator.leftovers()
                self.record(untested, Outcome.NOT_ATTEMPTED, error_message=reason)
                for positions, blame in suspects:
                    self.record(
                        positions,
                        Outcome.NOT_ATTEMPTED,
                        **_reply_fields(blame)
                        | {
                            "error_message": f"{reason}; this key was in a refused request "
                            "and had not been isolated yet"
                        },
                    )


def set_outcome(
    ledger: Ledger, positions: Positions, outcome: Outcome, *, hedge: bool = True, **fields: Any
) -> None:
    """Record ``outcome``; a key not undone that was ever sent without a usable answer says
    so (``hedge``), since the server may have applied it: a rerun is harmless, not needed."""
    ledger.set(positions, outcome, finished_at=_now(), **fields)
    if not hedge or outcome is Outcome.UNDONE:
        return
    counts = ledger.uncertain[positions]
    if not counts.any():
        return
    message = fields.pop("error_message", "")
    for count in np.unique(counts[counts > 0]).tolist():
        ledger.set(
            positions[counts == count],
            outcome,
            finished_at=_now(),
            error_message=(message + _maybe_applied(count)).removeprefix("; "),
            **fields,
        )


def _maybe_applied(unanswered_attempts: int) -> str:
    """Say so when a key was sent without a usable answer: the server may have applied it."""
    if unanswered_attempts <= 0:
        return ""
    times = "once" if unanswered_attempts == 1 else f"{unanswered_attempts} times"
    return (
        f"; it was sent {times} without a usable answer, so the server may have applied it "
        "(a rerun is harmless)"
    )


def _event_status(body: bytes) -> str:
    try:
        data = json.loads(body)
        return str(data.get("status", "")).upper() if isinstance(data, dict) else ""
    except (ValueError, UnicodeDecodeError, RecursionError):  # a server's body: anything goes
        return ""


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
    redactor = redactor if redactor is not None else Redactor()
    log = log or null_logger()
    progress = progress or _NoProgress()
    stop = stop or StopRequest()
    report = config.report_path()
    paths = ReportPaths(report, config.failed_rows_path(report))
    check_paths(paths, config.inputs)

    inputs = read_inputs(config.inputs, aliases=config.columns, default_event_id=config.event_id)
    plan = build_plan(inputs)
    log.info(
        "plan.ready",
        rows=len(plan.rows),
        keys=plan.key_count,
        events=len(plan.events),
        invalid=len(plan.invalid),
        duplicates=plan.duplicates,
    )
    if not config.dry_run and tokens is None:
        raise ReportError("no access token: set CC_ACCESS_TOKEN or a token file")

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
        _mark_invalid_messages(plan, ledger)
        skip = _resume(config, paths, plan, ledger, log) if config.resume else 0

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
        run: _Run | None = None
        if config.dry_run:
            for positions in pending_events.values():
                ledger.set(positions, Outcome.PLANNED)
        else:
            assert tokens is not None
            journal = Journal(paths.journal, writer)
            try:
                journal.append(plan.invalid)
                run = await _send_all(
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
        failed_count = write_final(paths, writer, ledger)
        if not config.dry_run:
            Journal.remove(paths.journal)
    finally:
        lock.release()

    counts = {o.value: ledger.count(o) for o in Outcome}
    per_event = {
        event_id: {o.value: ledger.count(o, positions) for o in Outcome}
        for event_id, positions in plan.events.items()
    }
    if run is not None and run.exit_code:
        exit_code = run.exit_code
    elif counts[Outcome.UNDONE.value] == len(plan.rows) - counts[Outcome.PLANNED.value] and (
        counts[Outcome.INVALID.value] == 0
    ):
        exit_code = EXIT_OK
    else:
        exit_code = EXIT_INCOMPLETE
    result = RunResult(
        report=paths.report,
        failed_rows=paths.failed_rows,
        exit_code=exit_code,
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
    )
    log.info(
        "run.finished",
        exit_code=exit_code,
        requests=result.requests,
        retries=result.retries,
        throttled=result.throttled,
        elapsed=round(result.elapsed, 3),
        resumed_undone=skip,
        **counts,
    )
    return result


def _mark_invalid_messages(plan: Plan, ledger: Ledger) -> None:
    invalid = plan.invalid
    if not len(invalid):
        return
    problems = plan.rows["problem"].to_numpy()[invalid]
    for problem in dict.fromkeys(problems):
        positions = invalid[problems == problem]
        ledger.set(positions, Outcome.INVALID, error_key="invalid_input", error_message=problem)


def _resume(config: JobConfig, paths: ReportPaths, plan: Plan, ledger: Ledger, log: Any) -> int:
    """Carry over keys an earlier run already undid; they are not sent again.

    The resumed report replaces the earlier one, so it must hold every key the earlier one
    held: inputs that leave some out are refused rather than losing their record.
    """
    if not (paths.report.exists() or paths.journal.exists()):
        # Allowed, so a scheduler can always pass --resume; but say so, in case of a typo.
        log.warning("resume.nothing_to_resume", report=str(paths.report))
        return 0
    previous = read_previous(paths)
    rows = plan.rows[["event_id", "order_ticket_key"]].astype(str)
    rows["position"] = np.arange(len(rows))
    rows = rows[(plan.rows["problem"] == "").to_numpy()]
    merged = rows.merge(previous, on=["event_id", "order_ticket_key"], how="right")
    missing = merged[merged["position"].isna()]
    if len(missing):
        first = missing.iloc[0]
        raise ReportError(
            f"{record_place(first)}: key {str(first['order_ticket_key'])[:80]!r} of event "
            f"{str(first['event_id'])[:80]!r} is not in these inputs ({len(missing)} keys of "
            "the earlier run are not); resume with the inputs of the run that wrote it, or "
            "choose another --report path"
        )
    merged = merged[merged["outcome"] == Outcome.UNDONE.value]
    positions = merged["position"].to_numpy().astype(np.int64)
    finished = (
        _parse_times(merged["finished_at"])
        if "finished_at" in merged
        else np.full(len(merged), math.nan)
    )
    ledger.set(positions, Outcome.UNDONE, http_status=204)
    ledger.finished_at[positions] = finished
    if "attempts" in merged:
        ledger.attempts[positions] = (
            merged["attempts"].str.strip().replace("", "0").astype(np.int64).to_numpy()
        )
    log.info("resume.loaded", already_undone=len(positions))
    return len(positions)


def _parse_times(values: Any) -> Any:
    parsed = pd.to_datetime(values, utc=True, errors="coerce", format="%Y-%m-%dT%H:%M:%SZ")
    # Unit-free: pandas 3 parses to microseconds, pandas 2 to nanoseconds.
    seconds = (parsed - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)
    return np.asarray(seconds, dtype=np.float64)


async def _send_all(
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
) -> _Run:
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
        base=config.retry_base,
        cap=config.retry_cap,
    )
    run: _Run
    client = ApiClient(
        transport,
        config.base_url,
        tokens,
        pacer,
        gate,
        policy,
        on_attempt=lambda reply, attempt: run.on_attempt(reply, attempt),
        redactor=redactor,
    )
    run = _Run(config, plan, ledger, journal, client, pacer, gate, stop, log, progress)
    run.events = [_Event(event_id, positions) for event_id, positions in pending.items()]
    progress.start(total)
    try:
        await run.dispatch()
        run.close_out()
    finally:
        progress.close()
        if session is not None:
            await session.close()
    return run


def install_signal_handlers(stop: StopRequest) -> Callable[[], None]:
    """SIGINT/SIGTERM (cron, systemd, Kubernetes) and SIGHUP (a closed terminal, an ssh drop)
    stop the run gracefully; a second SIGINT or SIGTERM hurries it. Returns an undo.

    A signal this process was started with ignored (``nohup``, ``&`` in a script) stays
    ignored. SIGHUP never hurries: one hangup can arrive twice (the kernel, then the shell).
    """
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig, code in (
        (signal.SIGINT, EXIT_SIGINT),
        (signal.SIGTERM, EXIT_SIGTERM),
        (signal.SIGHUP, EXIT_SIGHUP),
    ):
        if signal.getsignal(sig) is signal.SIG_IGN:
            continue
        loop.add_signal_handler(
            sig,
            functools.partial(
                stop.signal, f"interrupted by {sig.name}", code, may_hurry=sig != signal.SIGHUP
            ),
        )
        installed.append(sig)

    def remove() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)

    return remove
