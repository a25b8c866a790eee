"""The dispatcher: which request goes next, and each event's state.

An event is checked (``GET /events/{id}``) before its first undo and again when its requests
keep being refused; its keys then go out in the groups :mod:`._isolate` decides, at most
``concurrency`` requests at a time, each answer settled into the ledger.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import numpy as np

from batchjob._config import JobConfig
from batchjob._errors import ExitCode
from batchjob._logging import MAX_REPORT_TEXT
from batchjob._model import Outcome
from batchjob.plan import Plan, Positions
from batchjob.record import Ledger, Recorder, set_outcome
from batchjob.run._isolate import Group, KeyIsolator
from batchjob.run._stop import StopRequest
from batchjob.send import (
    MAX_SUCCESS_BODY,
    TOKEN_FAILED,
    AdaptivePacer,
    ApiClient,
    Call,
    CallResult,
    Reply,
    RequestGate,
    Verdict,
)

ACTIVE_STATUSES = frozenset({"ACTIVE", "COMPLETE"})
#: Refused requests in a row, with no success between, after which the event is looked at
#: again (then twice as many): an event cancelled mid-run must not cost a request per key.
RECHECK_AFTER_REFUSALS = 5


class Progress(Protocol):
    """What the run tells a progress display. All calls are cheap and synchronous."""

    def start(self, total: int) -> None: ...

    def advance(self, keys: int, rate: float) -> None: ...

    def close(self) -> None: ...


class NoProgress:
    def start(self, total: int) -> None:
        pass

    def advance(self, keys: int, rate: float) -> None:
        pass

    def close(self) -> None:
        pass


class EventState(Enum):
    """Where an event is: unchecked -> checking -> ready <-> (recheck -> rechecking); any ->
    closed (no more requests: its keys left fail with ``closed_as``); checking -> missing
    (404 before any event was found) -> closed, or the run stops if every event is missing."""

    UNCHECKED = "unchecked"
    CHECKING = "checking"
    READY = "ready"
    RECHECK = "recheck"  # its requests keep being refused: look at the event again
    RECHECKING = "rechecking"
    # Its check answered 404 before any event was found: judged once another is found (then
    # its keys fail) or at the end (every event 404: a wrong URL or account, so the run stops).
    MISSING = "missing"
    CLOSED = "closed"


@dataclass
class EventWork:
    """One event's keys and how far they are."""

    event_id: str
    positions: Positions
    state: EventState = EventState.UNCHECKED
    isolator: KeyIsolator[Reply] | None = None
    refusals: int = 0  # refused requests since the last success
    recheck_at: int = RECHECK_AFTER_REFUSALS
    closed_as: dict[str, Any] | None = None  # outcome fields for keys left when it closed


def _reply_fields(reply: Reply) -> dict[str, Any]:
    return {
        "http_status": max(reply.status, 0),
        "error_key": reply.error_key,
        "error_message": reply.error_message,
    }


class Dispatcher:
    def __init__(
        self,
        config: JobConfig,
        plan: Plan,
        ledger: Ledger,
        journal: Recorder | None,
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
        self.events: list[EventWork] = []
        self.stopped = ""
        self.exit_code: int = ExitCode.OK
        self.retries = 0
        self.action = config.action
        self.success = config.action.success  # a 204's outcome: undone, or checked_in
        self.batch_limit = config.batch_size  # lowered run-wide when the server answers 413
        self.calls: dict[asyncio.Task[Any], Call] = {}  # undo requests under way, by task
        self.events_found = 0  # event checks answered with an event (whatever its status)

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
        set_outcome(self.ledger, positions, outcome, refused=refused, **fields)
        if self.journal is not None:
            self.journal.append(positions, keys)
        self.progress.advance(len(positions), self.pacer.rate)

    def count_tries(self, positions: Positions, call: Call) -> None:
        self.retries += max(0, call.attempts - 1)
        self.ledger.attempts[positions] += call.attempts
        self.ledger.uncertain[positions] += call.uncertain + call.in_flight

    def halt(self, reason: str, exit_code: int) -> None:
        if not self.stopped:
            # It reaches the summary on stdout and every key left: no secret, one line.
            reason = self.redactor.clean(reason, MAX_REPORT_TEXT)
            self.stopped, self.exit_code = reason, exit_code
            self.gate.close(reason)
            self.log.warning("run.stopping", reason=reason)

    # --- dispatching -----------------------------------------------------------------------

    def next_request(self) -> Coroutine[Any, Any, None] | None:
        for event in self.events:
            if event.state == EventState.UNCHECKED:
                event.state = EventState.CHECKING
                return self.check_event(event)
            if event.state == EventState.RECHECK:
                event.state = EventState.RECHECKING
                return self.check_event(event, again=True)
            if event.state == EventState.READY and event.isolator is not None:
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
                    job = self.next_request()
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
                        f"internal error: cannot record outcomes: {self.journal.failed}",
                        ExitCode.STOPPED,
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
        self.halt(f"internal error: {exc!r}", ExitCode.STOPPED)

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

    async def check_event(self, event: EventWork, *, again: bool = False) -> None:
        """GET the event: once before its first undo, again if its requests keep failing.

        A missing or inactive event costs no undo request (or no more of them).
        """
        after = EventState.READY if again else EventState.UNCHECKED
        call = Call()
        try:
            answer = await self.client.get_event(event.event_id, call)
        except asyncio.CancelledError:
            event.state = after  # its keys become not_attempted at the end
            raise
        finally:
            self.retries += max(0, call.attempts - 1)
        reply = answer.reply
        if answer.not_sent:
            event.state = after
            self.halt(answer.not_sent, ExitCode.STOPPED)
            return
        verdict = reply.verdict
        if verdict is Verdict.OK:
            raw = _event_status(reply.body)
            if raw is None:
                self.log.warning("event.unreadable", event_id=event.event_id)
                self.close_event(
                    event,
                    http_status=reply.status,
                    error_key="event_unreadable",
                    error_message="the event check answered 200, but not with a readable event "
                    f"(not JSON, or over {MAX_SUCCESS_BODY // 2**20} MiB); nothing was sent",
                )
                return
            # Cleaned before anything else: a server may echo the token as the status.
            status = self.redactor.clean(raw, 100)
            self.found_an_event()
            if raw.upper() in ACTIVE_STATUSES:
                event.state = EventState.READY
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
                error_message=f"event status is {status or 'unknown'}; {self.action.value} needs "
                "ACTIVE or "
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
            event.state = EventState.READY  # could not look; carry on as before
            return
        message = (
            "event not found" if reply.status == 404 else f"event check failed: {reply.status}"
        )
        self.log.warning("event.unusable", event_id=event.event_id, status=reply.status)
        fields = {
            "http_status": max(reply.status, 0),
            "error_key": reply.error_key or ("event_not_found" if reply.status == 404 else ""),
            "error_message": f"{message}: {reply.error_message}"
            if reply.error_message
            else message,
        }
        if reply.status == 404 and not again and not self.events_found:
            # Not yet: if no event is ever found, the URL or the account is wrong, not the ids.
            event.state = EventState.MISSING
            event.closed_as = fields
            return
        self.close_event(event, **fields)

    def found_an_event(self) -> None:
        """The API knows events here: the ones it did not find are really missing."""
        self.events_found += 1
        if self.events_found == 1:
            for other in self.events:
                if other.state == EventState.MISSING:
                    assert other.closed_as is not None
                    self.close_event(other, **other.closed_as)

    def close_event(self, event: EventWork, **fields: Any) -> None:
        """No more requests for this event: its unsettled keys fail with ``fields``."""
        event.state = EventState.CLOSED
        event.closed_as = fields
        if event.isolator is None:
            self.record(event.positions, Outcome.FAILED, **fields)
        else:
            self.flush_closed(event)

    def flush_closed(self, event: EventWork) -> None:
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
            self.halt(
                "daily quota exceeded (429 quota_exceeded); resets 00:00 UTC", ExitCode.STOPPED
            )
        elif verdict is Verdict.AUTH:
            self.halt(
                reply.error_message
                if reply.error_key == TOKEN_FAILED
                else "access token rejected (401): get a new token (see README, Getting a token)",
                ExitCode.STOPPED,
            )
        elif verdict is Verdict.FORBIDDEN:
            said = f" {reply.error_key}" if reply.error_key else ""
            self.halt(
                f"forbidden (403{said}): the token lacks scope campaign_data or privilege "
                "campaign:write, or the app is deactivated",
                ExitCode.STOPPED,
            )
        else:
            return False
        return True

    async def send(self, event: EventWork, group: Group) -> None:
        assert event.isolator is not None
        isolator = event.isolator
        positions = group.positions
        call = Call()
        keys = self.plan.keys_at(positions)
        task = asyncio.current_task()
        if task is not None:
            self.calls[task] = call  # so that a stopping run can tell who is on the wire
        try:
            answer = await self.client.post_tickets(self.action, event.event_id, keys, call)
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
        event: EventWork,
        isolator: KeyIsolator[Reply],
        group: Group,
        answer: CallResult,
        keys: list[str] | None = None,
    ) -> None:
        reply = answer.reply
        verdict = reply.verdict
        log = self.log
        about = {"event_id": event.event_id, "keys": len(group.positions)}
        if answer.not_sent:
            self.halt(answer.not_sent, ExitCode.STOPPED)
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
            self.record(result.undone, self.success, sent, http_status=reply.status)
            log.info(f"chunk.{self.success.value}", **about, attempts=answer.attempts)
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
            if event.refusals >= event.recheck_at and event.state == EventState.READY:
                # Many refusals and no success: maybe the event, not the keys, is the problem.
                event.state = EventState.RECHECK
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
        missing = [e for e in self.events if e.state == EventState.MISSING]
        if missing and len(missing) == len(self.events):
            which = (
                f"event {missing[0].event_id} was not found: check that event id in the input, "
                "then --base-url"
                if len(missing) == 1
                else f"none of the {len(missing)} events was found: check --base-url"
            )
            self.halt(
                f"every event check answered 404 ({which}, and that the token is for the "
                "account that owns these events); left for the next run",
                ExitCode.STOPPED,
            )
        reason = self.stopped or "run ended before this key was sent"
        for event in self.events:
            if event.state == EventState.MISSING:
                assert event.closed_as is not None
                if self.stopped:  # no event found before the stop: the 404 proves nothing
                    fields = event.closed_as | {
                        "error_message": f"{reason}; {event.closed_as['error_message']}"
                    }
                    self.record(event.positions, Outcome.NOT_ATTEMPTED, **fields)
                else:
                    self.close_event(event, **event.closed_as)
            elif event.state in (EventState.UNCHECKED, EventState.CHECKING):
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


def _event_status(body: bytes) -> str | None:
    """The event's ``status`` as sent, "" when it has none; None when the body is no event."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # a server's body: anything goes
        return None
    return str(data.get("status", "")) if isinstance(data, dict) else None
