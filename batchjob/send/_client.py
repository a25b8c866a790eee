"""One request, paced, budgeted and retried (with backoff), and the record of its tries."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol

import backoff

from batchjob._config import display_url
from batchjob._errors import TokenError
from batchjob._logging import MAX_REPORT_TEXT, Redactor, null_logger
from batchjob._model import Action
from batchjob._tokens import TokenSource
from batchjob.send._messages import (
    TICKET_PATHS,
    TOKEN_FAILED,
    Reply,
    Verdict,
    parse_error_body,
    parse_retry_after,
    undo_body,
)
from batchjob.send._pacing import AdaptivePacer
from batchjob.send._transport import MAX_BODY, Transport, TransportError

#: A few, not one: with short-lived tokens a slow request can outlive a fresh one too.
MAX_REFRESHES_PER_REQUEST = 3
#: A run stops when every answer for this many times ``retry_max_time`` was throttling.
THROTTLED_STRETCH = 5.0


class NotSent(Exception):
    """The gate allows no more requests: budget spent, or the run is stopping."""

    def __init__(self, reason: str, reply: Reply | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply  # the last answer, when the request had one


class Allowance(Protocol):
    """Requests granted from outside the run (a daily budget shared by runs on one API key)."""

    def take(self) -> str: ...  # "" when one more request may go, else why not


class RequestGate:
    """Counts requests sent and lets none through once the budget is spent or it is closed.

    Every attempt passes here just before it is sent, so a stopping run sends nothing new: not
    a first try waiting for its slot, not a retry waiting out its backoff.
    """

    def __init__(self, limit: int | None = None, allowance: Allowance | None = None) -> None:
        self.limit = limit
        self.allowance = allowance
        self.spent = 0
        self.closed = ""

    def close(self, reason: str) -> None:
        self.closed = self.closed or reason

    def spend(self) -> None:
        if self.closed:
            raise NotSent(self.closed)
        if self.limit is not None and self.spent >= self.limit:
            raise NotSent(budget_message(self.limit))
        if self.allowance is not None:
            refused = self.allowance.take()
            if refused:
                self.close(refused)
                raise NotSent(refused)
        self.spent += 1


def budget_message(limit: int) -> str:
    return f"request budget spent (max_requests = {limit}); left for the next run"


@dataclass(frozen=True)
class RetryPolicy:
    max_tries: int = 6
    max_time: float = 120.0
    base: float = 0.5
    cap: float = 30.0
    max_retry_after: float = 300.0  # a larger Retry-After is not waited for within a run
    #: Seconds in which every answer, run-wide, was throttling, after which the run stops;
    #: None: THROTTLED_STRETCH times max_time (10 minutes by default).
    max_throttled: float | None = None
    #: Seconds with no HTTP answer, run-wide, before a request that cannot even connect stops
    #: the run as "cannot be reached". Until then it keeps trying (past max_tries and, up to
    #: this long, past max_time): a few seconds of refused connections are a blip, not a
    #: broken night.
    unreachable_after: float = 60.0

    def gives_up_at(self, unreached: bool) -> float:
        """Seconds of its retry budget after which a request gives up."""
        return max(self.max_time, self.unreachable_after) if unreached else self.max_time

    @property
    def throttled_limit(self) -> float:
        if self.max_throttled is not None:
            return self.max_throttled
        return THROTTLED_STRETCH * self.max_time


@dataclass(frozen=True)
class CallResult:
    """The final answer to a request after retries, and how many attempts it took."""

    reply: Reply
    attempts: int
    not_sent: str = ""  # why the gate stopped the request before it got an answer


class _Retryable(Exception):
    """An answer worth another try: raised for backoff, which counts the tries."""

    def __init__(self, reply: Reply, call: Call) -> None:
        super().__init__(reply.status)
        self.reply = reply
        self.call = call


def retry_waits(
    policy: RetryPolicy, rng: random.Random
) -> Callable[[], Generator[float, BaseException | None, None]]:
    """A backoff wait generator: full-jitter exponential, or the server's Retry-After, cut to
    the request's time left (time spent on throttled tries does not count)."""

    def waits() -> Generator[float, BaseException | None, None]:
        attempt = 0
        exc = yield 0.0  # backoff primes the generator; this value is discarded
        while True:
            reply = getattr(exc, "reply", None)
            if reply is not None and reply.retry_after is not None:
                wait = min(reply.retry_after, policy.max_retry_after)
            else:
                wait = rng.uniform(0.0, min(policy.cap, policy.base * 2.0 ** min(attempt, 64)))
            call = getattr(exc, "call", None)
            if call is not None:
                # A Retry-After longer than the time left is cut to it: one more try at the
                # end of the budget beats failing at once every key of a maintenance window.
                limit = policy.gives_up_at(call.unreached)
                wait = max(0.0, min(wait, limit - call.budget_elapsed()))
            attempt += 1
            exc = yield wait

    return waits


@dataclass
class Call:
    """One request and its tries so far: the runner keeps it to count attempts on cancel."""

    method: str = "POST"
    url: str = ""
    body: bytes | None = None
    expected: int = 204
    attempts: int = 0
    refreshes: int = 0
    started: float = 0.0
    # Attempts whose answer leaves open whether the server applied them: no answer, a 5xx, an
    # unexpected 2xx/3xx, or (in_flight) one cut short. A 4xx is a refusal: not applied.
    uncertain: int = 0
    in_flight: bool = False
    throttled_time: float = 0.0  # seconds spent on throttled tries: not the retry budget's
    # HTTP answers (run-wide) counted when this request's current stretch without an answer
    # began with a try that made no connection; None: none since its last answer. See
    # ApiClient._unreachable.
    silent_since: int | None = None
    unreached: bool = False  # the last try made no connection at all (refused, DNS, TLS)
    counted_tries: int = 0  # tries that count against RetryPolicy.max_tries

    def budget_elapsed(self) -> float:
        """Seconds of the retry budget (``RetryPolicy.max_time``) this request has used."""
        return time.monotonic() - self.started - self.throttled_time


def leaves_open(status: int, expected: int) -> bool:
    """Whether an attempt answered ``status`` may have been applied all the same."""
    return status == 0 or status >= 500 or (status < 400 and status != expected)


class ApiClient:
    """Sends the two requests batchjob needs, paced, budgeted and retried.

    Every text that comes from the server (error keys and messages, a network error's text)
    leaves here cleaned by ``redactor`` (see :meth:`Redactor.clean`), which learns each token
    this client sends and every secret its token source knows (``tokens.secrets()``, if any).

    Throttling (429 ``throttled``, or a 403 about the rate) is never a request's failure: the
    pacer slows down, the request waits its slot (and any Retry-After) and goes again, and
    neither the try nor its time counts against ``policy.max_tries``/``max_time``. If every
    answer, run-wide, has been throttling for ``policy.throttled_limit`` seconds, the request
    ends ``not_sent`` and the gate closes: the run stops, its keys left for the next one.
    """

    def __init__(
        self,
        transport: Transport,
        base_url: str,
        tokens: TokenSource,
        pacer: AdaptivePacer,
        gate: RequestGate,
        policy: RetryPolicy,
        *,
        log: Any = None,
        rng: random.Random | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        self._transport = transport
        self._base = base_url.rstrip("/")
        self._tokens = tokens
        self._pacer = pacer
        self._gate = gate
        self._policy = policy
        self._log = log if log is not None else null_logger()
        self._rng = rng or random.Random()
        self.redactor = redactor if redactor is not None else Redactor()
        self._last_token = ""
        self._learn_secrets()
        self._throttled_since: float | None = None  # the first throttling since another answer
        self.answers = 0  # HTTP answers (any status), run-wide
        self._unreached = 0  # tries that made no connection, run-wide, since the last answer
        self._answered_at = time.monotonic()  # the last HTTP answer, run-wide (or the start)
        self._no_answer_cause = ""  # why the last of them made none
        # backoff counts the tries of _until_not_throttled: throttled tries happen inside one
        # of them, so they never use up max_tries, and max_time is checked in _out_of_time
        # without the time they took.
        self._retrying = backoff.on_exception(
            retry_waits(policy, self._rng),
            _Retryable,
            giveup=self._gives_up,
            jitter=None,
            logger=None,
        )(self._until_not_throttled)

    async def get_event(self, event_id: str, call: Call | None = None) -> CallResult:
        """GET the event. Pass ``call`` to read its attempts even if cancelled."""
        url = f"{self._base}/events/{event_id}"
        if call is None:
            call = Call()
        call.method, call.url, call.body, call.expected = "GET", url, None, 200
        return await self._send(call)

    async def undo_check_in(
        self, event_id: str, keys: list[str], call: Call | None = None
    ) -> CallResult:
        """Undo check-ins for ``keys``. Pass ``call`` to read its attempts even if cancelled."""
        return await self.post_tickets(Action.UNDO, event_id, keys, call)

    async def post_tickets(
        self, action: Action, event_id: str, keys: list[str], call: Call | None = None
    ) -> CallResult:
        """Send ``action`` for ``keys`` (same body either way; 204 is success). Pass ``call``
        to read its attempts even if cancelled."""
        body = undo_body(keys)
        url = f"{self._base}/events/{event_id}/{TICKET_PATHS[action]}"
        if call is None:
            call = Call("POST", url, body)
        else:
            call.method, call.url, call.body = "POST", url, body
        return await self._send(call)

    async def _send(self, call: Call) -> CallResult:
        call.started = time.monotonic()
        try:
            reply = await self._retrying(call)
        except _Retryable as exc:
            reply = exc.reply
            unreachable = self._unreachable(call)
            if unreachable:
                self._gate.close(unreachable)
                return CallResult(reply, call.attempts, not_sent=unreachable)
        except NotSent as stop:
            reply = stop.reply or Reply(0, "not_sent", stop.reason)
            return CallResult(reply, call.attempts, not_sent=stop.reason)
        except TokenError as exc:
            # No usable token (refresh refused, file unreadable): as final as a 401.
            message = self.redactor.clean(str(exc), MAX_REPORT_TEXT)
            return CallResult(Reply(401, TOKEN_FAILED, message), call.attempts)
        return CallResult(reply, call.attempts)

    def _gives_up(self, exc: Exception) -> bool:
        """backoff's giveup: tries and time, not counting throttled tries; a request that
        cannot connect keeps trying until the silence is long enough to be an outage."""
        call = getattr(exc, "call", None)
        if call is None:
            return True
        policy = self._policy
        if call.budget_elapsed() >= policy.gives_up_at(call.unreached):
            return True
        return not call.unreached and call.counted_tries >= policy.max_tries

    async def _until_not_throttled(self, call: Call) -> Reply:
        """Tries until an answer other than throttling; raises _Retryable to be retried."""
        policy = self._policy
        while True:
            began = time.monotonic()
            reply = await self._attempt(call)
            if reply.verdict is not Verdict.RETRY:
                return reply
            if not reply.throttled:
                call.counted_tries += 1
                raise _Retryable(reply, call)
            stop = self._throttled_too_long()
            if stop:
                self._gate.close(stop)
                raise NotSent(stop, reply)
            # The pacer has slowed down: its next slot is the wait, plus any Retry-After.
            if reply.retry_after is not None:
                # Never past the moment the run would stop for throttling anyway.
                wait = min(reply.retry_after, policy.max_retry_after, self._throttled_left())
                await asyncio.sleep(wait)
            call.throttled_time += time.monotonic() - began

    async def _attempt(self, call: Call) -> Reply:
        """One try (two after a 401 that a token refresh may cure)."""
        while True:
            sent_at = await self._pacer.acquire()
            # A token first: a TokenError must not count as a request sent.
            token = await self._tokens.token()
            if token != self._last_token:
                self._last_token = token
                self._learn_secrets(token)
            # After the wait for a slot: the run may have stopped in the meantime.
            self._gate.spend()
            call.attempts += 1
            call.in_flight = True
            answers_before = self.answers
            reply = await self._once(call, token)
            call.in_flight = False
            self._count_answer(call, reply, answers_before)
            # A try that made no connection (refused, DNS, TLS) sent nothing: not uncertain.
            if leaves_open(reply.status, call.expected) and not call.unreached:
                call.uncertain += 1
            throttled = reply.throttled
            if not throttled:
                self._throttled_since = None
            elif self._throttled_since is None:
                self._throttled_since = time.monotonic()
            self._pacer.on_answer(sent_at, throttled=throttled)
            self._log.debug(
                "request.answer",
                method=call.method,
                status=reply.status,
                error_key=reply.error_key,
                attempt=call.attempts,
            )
            if reply.verdict is Verdict.AUTH and call.refreshes < MAX_REFRESHES_PER_REQUEST:
                # The token may simply have expired mid-run (or while this request waited).
                # A source that cannot refresh, or hands back the same token, ends it here.
                call.refreshes += 1
                fresh = await self._tokens.refresh(token)
                if fresh is not None and fresh != token:
                    continue
            return reply

    def _count_answer(self, call: Call, reply: Reply, answers_before: int) -> None:
        if reply.status != 0:
            self.answers += 1
            self._answered_at = time.monotonic()
            self._unreached = 0
            call.silent_since = None
        elif call.unreached:
            self._unreached += 1
            if call.silent_since is None:
                call.silent_since = answers_before
        # A connection made, then dropped or left unanswered, counts neither way: such a
        # request is retried and reported as before, and it proves no HTTP answer came.

    def _unreachable(self, call: Call) -> str:
        """Why the run must stop, if the API cannot be reached: this request spent its whole
        retry budget without an HTTP answer, its last try made no connection (refused, DNS,
        TLS, connect timeout), and no request, run-wide, got an HTTP answer meanwhile.

        One request that cannot connect while others are answered is that request's failure
        (its keys ``failed``, as before); a silence that spans a whole retry budget is the
        network's or the URL's, and every other key would go the same way. Counted from the
        first such try, so it also holds at the very start of a run.
        """
        if not call.unreached or call.silent_since != self.answers:
            return ""
        if time.monotonic() - self._answered_at < self._policy.unreachable_after:
            return ""  # a blip that outlasted this request's budget, not yet an outage
        cause = self._no_answer_cause or "no answer"
        where = display_url(self._base)
        tries = self._unreached
        return (
            f"the API at {where} cannot be reached ({cause}): {tries} tries since the last "
            "HTTP answer, run-wide, made no connection; check the network, DNS, proxy and "
            "--base-url; left for the next run"
        )

    def _throttled_left(self) -> float:
        """Seconds until every answer will have been throttling for ``throttled_limit``."""
        since = self._throttled_since
        if since is None:
            return self._policy.throttled_limit
        return max(0.0, since + self._policy.throttled_limit - time.monotonic())

    def _throttled_too_long(self) -> str:
        """Why the run must stop, if every answer for ``throttled_limit`` was throttling."""
        limit = self._policy.throttled_limit
        if self._throttled_since is None or self._throttled_left() > 0:
            return ""
        return (
            f"every answer for {limit:g} s was 429 throttled: another app may be using up the "
            "API key's rate limit; left for the next run"
        )

    def _learn_secrets(self, token: str = "") -> None:
        """Tell the redactor the token about to be sent, and what the source knows (a
        refreshed token comes with a new refresh token)."""
        self.redactor.add(token)
        secrets = getattr(self._tokens, "secrets", None)
        if callable(secrets):
            for secret in secrets():
                if isinstance(secret, str):
                    self.redactor.add(secret)

    async def _once(self, call: Call, token: str) -> Reply:
        headers = {"Authorization": f"Bearer {token}"}
        call.unreached = False
        if call.body is not None:
            headers["Content-Type"] = "application/json"
        try:
            raw = await self._transport.request(
                call.method, call.url, headers=headers, body=call.body
            )
        except TransportError as exc:
            # The text may quote what the server sent, a header echoing the token included.
            call.unreached = getattr(exc, "unreachable", False)
            if call.unreached:
                self._no_answer_cause = self.redactor.clean(f"{exc.cause}: {exc}", 300)
            return Reply(0, "network", self.redactor.clean(str(exc)), expected=call.expected)
        if raw.status == call.expected:
            return Reply(raw.status, body=raw.body, expected=call.expected)
        cut = len(raw.body) >= MAX_BODY  # the transport read no more: the rest was never seen
        error_key, message = parse_error_body(raw.body, self.redactor, cut=cut)
        if not error_key and not message and 200 <= raw.status < 400:
            message = f"unexpected HTTP {raw.status} (expected {call.expected})"
        retry_after = parse_retry_after(
            next((v for k, v in raw.headers.items() if k.lower() == "retry-after"), None)
        )
        return Reply(raw.status, error_key, message, retry_after, raw.body, call.expected)
