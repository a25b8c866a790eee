"""Talking to the API: one request, its retries, and what its answer means.

The transport is a seam: :class:`AiohttpTransport` is the real one; tests may pass any object
with the same ``request`` coroutine. Classification of answers is a pure function, so the rules
("never resend a 400 unchanged", "quota_exceeded stops the run") are tested without a network.
"""

from __future__ import annotations

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

from batchjob._pacing import AdaptivePacer
from batchjob._tokens import TokenError


class Verdict(Enum):
    """What an answer means for the keys in the request and for the run."""

    OK = "ok"  # 2xx: every key in the request is undone
    KEY_FAULT = "key_fault"  # 400/404/409/422: some key in the request is at fault
    TOO_LARGE = "too_large"  # 413: send fewer keys per request
    RETRY = "retry"  # transient: network, timeout, 5xx, 429 throttled
    QUOTA = "quota"  # 429 quota_exceeded: nothing more today
    AUTH = "auth"  # 401: token invalid or expired
    FORBIDDEN = "forbidden"  # 403: scope, privilege or app deactivated
    REFUSED = "refused"  # any other answer: not retried, keys failed


#: A few, not one: with short-lived tokens a slow request can outlive a fresh one too.
MAX_REFRESHES_PER_REQUEST = 3
TOKEN_FAILED = "token_unavailable"  # noqa: S105 - error_key of a synthetic 401 when no token can be had
RETRY_STATUSES = frozenset({500, 502, 503, 504})
KEY_FAULT_STATUSES = frozenset({400, 404, 409, 422})


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
        return Verdict.FORBIDDEN
    if status == 413:
        return Verdict.TOO_LARGE
    if status in KEY_FAULT_STATUSES:
        return Verdict.KEY_FAULT
    return Verdict.REFUSED


def parse_error_body(body: bytes) -> tuple[str, str]:
    """``(error_key, error_message)`` from any error body the platform sends.

    Usually ``[{"error_key", "error_message"}]``; sometimes one such object; the OAuth server
    uses ``{"error", "error_description"}``; proxies send HTML or nothing.
    """
    key, message = _parse_error_body(body)
    return _printable(key), _printable(message)


def _printable(text: str) -> str:
    # JSON may carry a lone surrogate ("\ud800"), which no UTF-8 report can hold.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _parse_error_body(body: bytes) -> tuple[str, str]:
    if not body:
        return "", ""
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        text = body[:200].decode("utf-8", "replace").strip()
        return "", " ".join(text.split())
    if isinstance(data, list) and data and isinstance(data[0], dict):
        keys = [str(d.get("error_key", "")) for d in data if isinstance(d, dict)]
        messages = [str(d.get("error_message", "")) for d in data if isinstance(d, dict)]
        return keys[0], "; ".join(m for m in messages if m)
    if isinstance(data, dict):
        key = data.get("error_key", data.get("error", ""))
        message = data.get("error_message", data.get("error_description", ""))
        return str(key), str(message)
    return "", ""


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
    """The real transport: one aiohttp session for the run."""

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
                payload = await resp.read()
                return RawResponse(resp.status, dict(resp.headers), payload)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # aiohttp's messages name the URL at most; the type is what a reader needs.
            raise TransportError(type(exc).__name__ + (f": {exc}" if str(exc) else "")) from None


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

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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


@dataclass(frozen=True)
class Answer:
    """The final answer to a request after retries, and how many attempts it took."""

    reply: Reply
    attempts: int
    not_sent: str = ""  # why the gate stopped the request before it got an answer


class _Retryable(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply
        self.retry_after = reply.retry_after


def retry_waits(
    policy: RetryPolicy, rng: random.Random
) -> Callable[[], Generator[float, BaseException | None, None]]:
    """A backoff wait generator: full-jitter exponential, or the server's Retry-After."""

    def waits() -> Generator[float, BaseException | None, None]:
        attempt = 0
        exc = yield 0.0  # backoff primes the generator; this value is discarded
        while True:
            retry_after = getattr(exc, "retry_after", None)
            if retry_after is not None:
                wait = min(float(retry_after), policy.max_retry_after)
            else:
                wait = rng.uniform(0.0, min(policy.cap, policy.base * 2.0**attempt))
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


def leaves_open(status: int, expected: int) -> bool:
    """Whether an attempt answered ``status`` may have been applied all the same."""
    return status == 0 or status >= 500 or (status < 400 and status != expected)


class ApiClient:
    """Sends the two requests batchjob needs, paced, budgeted and retried."""

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
    ) -> None:
        self._transport = transport
        self._base = base_url.rstrip("/")
        self._tokens = tokens
        self._pacer = pacer
        self._gate = gate
        self._policy = policy
        self._on_attempt = on_attempt
        self._rng = rng or random.Random()
        self._retrying = backoff.on_exception(
            retry_waits(policy, self._rng),
            _Retryable,
            max_tries=policy.max_tries,
            max_time=policy.max_time,
            jitter=None,
        )(self._attempt)

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
            return Answer(Reply(0, "not_sent", stop.reason), call.attempts, not_sent=stop.reason)
        except TokenError as exc:
            # No usable token (refresh refused, file unreadable): as final as a 401.
            return Answer(Reply(401, TOKEN_FAILED, str(exc)), call.attempts)
        return Answer(reply, call.attempts)

    async def _attempt(self, call: Call) -> Reply:
        """One try (two after a 401 that a token refresh may cure). Raises to be retried."""
        while True:
            sent_at = await self._pacer.acquire()
            # A token first: a TokenError must not count as a request sent.
            token = await self._tokens.token()
            # After the wait for a slot: the run may have stopped in the meantime.
            self._gate.spend()
            call.attempts += 1
            call.in_flight = True
            reply = await self._once(call, token)
            call.in_flight = False
            if leaves_open(reply.status, call.expected):
                call.uncertain += 1
            verdict = reply.verdict
            self._pacer.on_answer(
                sent_at, throttled=reply.status == 429 and verdict is Verdict.RETRY
            )
            if self._on_attempt is not None:
                self._on_attempt(reply, call.attempts)
            if verdict is Verdict.AUTH and call.refreshes < MAX_REFRESHES_PER_REQUEST:
                # The token may simply have expired mid-run (or while this request waited).
                # A source that cannot refresh, or hands back the same token, ends it here.
                call.refreshes += 1
                fresh = await self._tokens.refresh(token)
                if fresh is not None and fresh != token:
                    continue
            if verdict is not Verdict.RETRY:
                return reply
            # A Retry-After longer than the time left is cut to it by backoff: one more try
            # at the end of the budget beats failing at once every key of a maintenance window.
            raise _Retryable(reply)

    async def _once(self, call: Call, token: str) -> Reply:
        headers = {"Authorization": f"Bearer {token}"}
        if call.body is not None:
            headers["Content-Type"] = "application/json"
        try:
            raw = await self._transport.request(
                call.method, call.url, headers=headers, body=call.body
            )
        except TransportError as exc:
            return Reply(0, "network", str(exc), expected=call.expected)
        if raw.status == call.expected:
            return Reply(raw.status, body=raw.body, expected=call.expected)
        error_key, message = parse_error_body(raw.body)
        if not error_key and not message and 200 <= raw.status < 400:
            message = f"unexpected HTTP {raw.status} (expected {call.expected})"
        retry_after = parse_retry_after(
            next((v for k, v in raw.headers.items() if k.lower() == "retry-after"), None)
        )
        return Reply(raw.status, error_key, message, retry_after, raw.body, call.expected)
