"""Talking to the API: one request, its retries, and what its answer means.

The transport is a seam: :class:`AiohttpTransport` is the real one; tests may pass any object
with the same ``request`` coroutine. Classification of answers is a pure function, so the rules
("never resend a 400 unchanged", "quota_exceeded stops the run") are tested without a network.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import re
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import aiohttp
import backoff

from batchjob._logging import MAX_REPORT_TEXT, MAX_SERVER_TEXT, Redactor
from batchjob._pacing import AdaptivePacer
from batchjob._tokens import TokenError


class Verdict(Enum):
    """What an answer means for the keys in the request and for the run."""

    OK = "ok"  # 2xx: every key in the request is undone
    KEY_FAULT = "key_fault"  # 400/404/409/422: some key in the request is at fault
    TOO_LARGE = "too_large"  # 413: send fewer keys per request
    RETRY = "retry"  # transient: network, timeout, 5xx, 429 throttled, 403 over the rate
    QUOTA = "quota"  # 429 quota_exceeded: nothing more today
    AUTH = "auth"  # 401: token invalid or expired
    FORBIDDEN = "forbidden"  # 403: scope, privilege or app deactivated
    REFUSED = "refused"  # any other answer: not retried, keys failed


#: A few, not one: with short-lived tokens a slow request can outlive a fresh one too.
MAX_REFRESHES_PER_REQUEST = 3
TOKEN_FAILED = "token_unavailable"  # noqa: S105 - error_key of a synthetic 401 when no token can be had
RETRY_STATUSES = frozenset({500, 502, 503, 504})
KEY_FAULT_STATUSES = frozenset({400, 404, 409, 422})
#: Most bytes of an answer's body read: an error body is shown cut to MAX_SERVER_TEXT
#: characters anyway, and a server may send one that never ends.
MAX_BODY = 64 * 1024
#: ... but a GET's success body (the event) must be read whole to find its status.
MAX_SUCCESS_BODY = 1024 * 1024
#: A run stops when every answer for this many times ``retry_max_time`` was throttling.
THROTTLED_STRETCH = 5.0


@dataclass(frozen=True)
class Reply:
    """An answer, or the lack of one (status 0) after a network fault or timeout."""

    status: int
    error_key: str = ""
    error_message: str = ""
    retry_after: float | None = None
    body: bytes = b""
    expected: int = 204  # the success status of the request that got this answer

    @property
    def verdict(self) -> Verdict:
        return classify(self.status, self.error_key, expected=self.expected)

    @property
    def throttled(self) -> bool:
        return is_throttling(self.status, self.error_key)


def classify(status: int, error_key: str = "", *, expected: int = 204) -> Verdict:
    """What an answer means. Only the documented success status counts as success: a 200
    from a proxy or captive portal must never get keys reported ``undone``."""
    if status == expected:
        return Verdict.OK
    if status == 0 or status in RETRY_STATUSES:
        return Verdict.RETRY
    if status == 429:
        return Verdict.QUOTA if error_key == "quota_exceeded" else Verdict.RETRY
    if status == 401:
        return Verdict.AUTH
    if status == 403:
        return Verdict.RETRY if is_throttling(status, error_key) else Verdict.FORBIDDEN
    if status == 413:
        return Verdict.TOO_LARGE
    if status in KEY_FAULT_STATUSES:
        return Verdict.KEY_FAULT
    return Verdict.REFUSED


def is_throttling(status: int, error_key: str = "") -> bool:
    """Whether an answer says "too fast": 429 but the daily quota, or a 403 from the older
    gateway whose error key speaks of the request rate or QPS. Never a key's fault, nor a stop.
    """
    if status == 429:
        return error_key != "quota_exceeded"
    if status != 403 or not error_key:
        return False
    # "rate_limit", "requestRateExceeded", "QPS.exceeded", "throttled"; not "corporate".
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", error_key).lower()
    words = [w for w in re.split(r"[^a-z0-9]+", spaced) if w]
    squashed = "".join(words)
    return (
        "qps" in squashed
        or "toomanyrequests" in squashed
        or any(w.startswith(("rate", "throttl")) for w in words)
    )


#: Most characters of a body that is not JSON (an HTML error page) shown as its message.
_NON_JSON_TEXT = 200


def parse_error_body(body: bytes, redactor: Redactor | None = None) -> tuple[str, str]:
    """``(error_key, error_message)`` from any error body the platform sends.

    Usually ``[{"error_key", "error_message"}]``; sometimes one such object; the OAuth server
    uses ``{"error", "error_description"}``; proxies send HTML or nothing. Both texts come
    back clean (see :meth:`Redactor.clean`): ``redactor``'s secrets replaced by ``***``,
    control characters escaped, at most MAX_SERVER_TEXT characters.
    """
    clean = (redactor or Redactor()).clean
    if not body:
        return "", ""
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # All of it decoded and cleaned before the cut: a cut must not leave half a secret.
        text = " ".join(body.decode("utf-8", "replace").split())
        return "", clean(text, _NON_JSON_TEXT)
    key, message = _error_fields(data)
    return clean(key, 200), clean(message, MAX_SERVER_TEXT)


def _error_fields(data: Any) -> tuple[str, str]:
    if isinstance(data, list) and data and isinstance(data[0], dict):
        keys = [_text(d.get("error_key", "")) for d in data if isinstance(d, dict)]
        messages = [_text(d.get("error_message", "")) for d in data if isinstance(d, dict)]
        return keys[0], "; ".join(m for m in messages if m)
    if isinstance(data, dict):
        key = data.get("error_key", data.get("error", ""))
        message = data.get("error_message", data.get("error_description", ""))
        return _text(key), _text(message)
    return "", ""


def _text(value: Any) -> str:
    # str() of a deeply nested list could itself recurse too deep; a server's odd value is
    # shown by its type then.
    try:
        return str(value)
    except RecursionError:
        return f"<{type(value).__name__}>"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), if usable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds)


# Printable ASCII other than the quote and the backslash: JSON strings that need no escape.
_PLAIN_JSON = re.compile(r"[ !#-\[\]-~]*")


def undo_body(keys: Sequence[str]) -> bytes:
    """The undo request's JSON body, byte for byte what ``json.dumps`` compact would give.

    Keys are nearly always plain ASCII, and joining them is several times cheaper than the
    json encoder: it shows at thousands of requests a second.
    """
    # Checked without the separators: a key holding '","' must not pass for two keys.
    if keys and _PLAIN_JSON.fullmatch("".join(keys)):
        return ('{"order_ticket_keys":["' + '","'.join(keys) + '"]}').encode()
    return json.dumps({"order_ticket_keys": list(keys)}, separators=(",", ":")).encode()


# --- transport ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


class TransportError(Exception):
    """No answer: connection refused or dropped, timeout. Never carries request headers."""


class Transport(Protocol):
    async def request(
        self, method: str, url: str, *, headers: dict[str, str], body: bytes | None
    ) -> RawResponse: ...


class AiohttpTransport:
    """The real transport: one aiohttp session for the run.

    Reads at most MAX_BODY bytes of a body (MAX_SUCCESS_BODY of a GET's 2xx): the rest is
    never read, and the connection is closed rather than reused.
    """

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def request(
        self, method: str, url: str, *, headers: dict[str, str], body: bytes | None
    ) -> RawResponse:
        try:
            # No redirects: a bearer token has no business following one, and a redirect's
            # answer is not the API's.
            async with self._session.request(
                method, url, headers=headers, data=body, allow_redirects=False
            ) as resp:
                success = method == "GET" and 200 <= resp.status < 300
                limit = MAX_SUCCESS_BODY if success else MAX_BODY
                payload = await read_at_most(resp.content, limit)
                return RawResponse(resp.status, dict(resp.headers), payload)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # aiohttp's messages name the URL at most; the type is what a reader needs. They
            # may quote what the server sent (a header): the client cleans the text.
            raise TransportError(type(exc).__name__ + (f": {exc}" if str(exc) else "")) from None


async def read_at_most(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body's first ``limit`` bytes, or all of it if shorter."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await content.read(limit - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def make_session(
    *, connect_timeout: float, request_timeout: float, concurrency: int
) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=request_timeout, sock_connect=connect_timeout)
    # A few spare connections: a dropped one should not make the next request wait.
    connector = aiohttp.TCPConnector(limit=concurrency + 2, enable_cleanup_closed=True)
    return aiohttp.ClientSession(
        timeout=timeout,
        connector=connector,
        headers={"User-Agent": "batchjob/1.0", "Accept": "application/json"},
        raise_for_status=False,
    )


# --- one request with retries ---------------------------------------------------------------


class TokenSource(Protocol):
    """Where bearer tokens come from. ``refresh`` gets a new one after a 401, if it can."""

    async def token(self) -> str: ...

    async def refresh(self, rejected: str) -> str | None:
        """A new token after ``rejected`` got a 401; None when there is no way to get one.

        May raise :class:`~batchjob._tokens.TokenError`, which stops the run.
        """
        ...


class NotSent(Exception):
    """The gate allows no more requests: budget spent, or the run is stopping."""

    def __init__(self, reason: str, reply: Reply | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply  # the last answer, when the request had one


class RequestGate:
    """Counts requests sent and lets none through once the budget is spent or it is closed.

    Every attempt passes here just before it is sent, so a stopping run sends nothing new: not
    a first try waiting for its slot, not a retry waiting out its backoff.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.spent = 0
        self.closed = ""

    def close(self, reason: str) -> None:
        self.closed = self.closed or reason

    def spend(self) -> None:
        if self.closed:
            raise NotSent(self.closed)
        if self.limit is not None and self.spent >= self.limit:
            raise NotSent(budget_message(self.limit))
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

    @property
    def throttled_limit(self) -> float:
        if self.max_throttled is not None:
            return self.max_throttled
        return THROTTLED_STRETCH * self.max_time


@dataclass(frozen=True)
class Answer:
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
                wait = rng.uniform(0.0, min(policy.cap, policy.base * 2.0**attempt))
            call = getattr(exc, "call", None)
            if call is not None:
                # A Retry-After longer than the time left is cut to it: one more try at the
                # end of the budget beats failing at once every key of a maintenance window.
                wait = max(0.0, min(wait, policy.max_time - call.budget_elapsed()))
            attempt += 1
            exc = yield wait

    return waits


AttemptListener = Callable[[Reply, int], None]


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
        on_attempt: AttemptListener | None = None,
        rng: random.Random | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        self._transport = transport
        self._base = base_url.rstrip("/")
        self._tokens = tokens
        self._pacer = pacer
        self._gate = gate
        self._policy = policy
        self._on_attempt = on_attempt
        self._rng = rng or random.Random()
        self.redactor = redactor if redactor is not None else Redactor()
        self._last_token = ""
        self._learn_secrets()
        self._throttled_since: float | None = None  # the first throttling since another answer
        # backoff counts the tries of _until_not_throttled: throttled tries happen inside one
        # of them, so they never use up max_tries, and max_time is checked in _out_of_time
        # without the time they took.
        self._retrying = backoff.on_exception(
            retry_waits(policy, self._rng),
            _Retryable,
            max_tries=policy.max_tries,
            giveup=self._out_of_time,
            jitter=None,
            logger=None,
        )(self._until_not_throttled)

    async def get_event(self, event_id: str, call: Call | None = None) -> Answer:
        url = f"{self._base}/events/{event_id}"
        return await self._send(call or Call("GET", url, None, expected=200))

    async def undo_check_in(
        self, event_id: str, keys: list[str], call: Call | None = None
    ) -> Answer:
        """Undo check-ins for ``keys``. Pass ``call`` to read its attempts even if cancelled."""
        body = undo_body(keys)
        url = f"{self._base}/events/{event_id}/undo_check_in/tickets"
        if call is None:
            call = Call("POST", url, body)
        else:
            call.method, call.url, call.body = "POST", url, body
        return await self._send(call)

    async def _send(self, call: Call) -> Answer:
        call.started = time.monotonic()
        try:
            reply = await self._retrying(call)
        except _Retryable as exc:
            reply = exc.reply
        except NotSent as stop:
            reply = stop.reply or Reply(0, "not_sent", stop.reason)
            return Answer(reply, call.attempts, not_sent=stop.reason)
        except TokenError as exc:
            # No usable token (refresh refused, file unreadable): as final as a 401.
            message = self.redactor.clean(str(exc), MAX_REPORT_TEXT)
            return Answer(Reply(401, TOKEN_FAILED, message), call.attempts)
        return Answer(reply, call.attempts)

    def _out_of_time(self, exc: Exception) -> bool:
        call = getattr(exc, "call", None)
        return call is not None and call.budget_elapsed() >= self._policy.max_time

    async def _until_not_throttled(self, call: Call) -> Reply:
        """Tries until an answer other than throttling; raises _Retryable to be retried."""
        policy = self._policy
        while True:
            began = time.monotonic()
            reply = await self._attempt(call)
            if reply.verdict is not Verdict.RETRY:
                return reply
            if not reply.throttled:
                raise _Retryable(reply, call)
            stop = self._throttled_too_long()
            if stop:
                self._gate.close(stop)
                raise NotSent(stop, reply)
            # The pacer has slowed down: its next slot is the wait, plus any Retry-After.
            if reply.retry_after is not None:
                await asyncio.sleep(min(reply.retry_after, policy.max_retry_after))
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
            reply = await self._once(call, token)
            call.in_flight = False
            if leaves_open(reply.status, call.expected):
                call.uncertain += 1
            throttled = reply.throttled
            if not throttled:
                self._throttled_since = None
            elif self._throttled_since is None:
                self._throttled_since = time.monotonic()
            self._pacer.on_answer(sent_at, throttled=throttled)
            if self._on_attempt is not None:
                self._on_attempt(reply, call.attempts)
            if reply.verdict is Verdict.AUTH and call.refreshes < MAX_REFRESHES_PER_REQUEST:
                # The token may simply have expired mid-run (or while this request waited).
                # A source that cannot refresh, or hands back the same token, ends it here.
                call.refreshes += 1
                fresh = await self._tokens.refresh(token)
                if fresh is not None and fresh != token:
                    continue
            return reply

    def _throttled_too_long(self) -> str:
        """Why the run must stop, if every answer for ``throttled_limit`` was throttling."""
        since = self._throttled_since
        limit = self._policy.throttled_limit
        if since is None or time.monotonic() - since < limit:
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
        if call.body is not None:
            headers["Content-Type"] = "application/json"
        try:
            raw = await self._transport.request(
                call.method, call.url, headers=headers, body=call.body
            )
        except TransportError as exc:
            # The text may quote what the server sent, a header echoing the token included.
            return Reply(0, "network", self.redactor.clean(str(exc)), expected=call.expected)
        if raw.status == call.expected:
            return Reply(raw.status, body=raw.body, expected=call.expected)
        error_key, message = parse_error_body(raw.body, self.redactor)
        if not error_key and not message and 200 <= raw.status < 400:
            message = f"unexpected HTTP {raw.status} (expected {call.expected})"
        retry_after = parse_retry_after(
            next((v for k, v in raw.headers.items() if k.lower() == "retry-after"), None)
        )
        return Reply(raw.status, error_key, message, retry_after, raw.body, call.expected)
