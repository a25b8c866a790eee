"""A local stand-in for Constant Contact's V3 events API, for demos, tests and benchmarks.

It answers the way ``cc-api.md`` says the real platform does, including the parts the real one
leaves undocumented, where it picks the strictest plausible answer so a client that copes with
the sandbox copes with the real thing:

- an unknown ticket key fails the whole request (404, nothing applied, no hint which key);
- an event that is not ACTIVE or COMPLETE gets 400 ``event.status.invalid``;
- the per-second limit is a token bucket with no burst allowance by default, answered with 429
  ``throttled`` and no ``Retry-After``; the daily quota with 429 ``quota_exceeded``;
- refresh tokens rotate (each works once).

Every /v3 request passes, in order: fault injection, bearer token, per-second bucket, daily
quota, then the endpoint. Faults never touch the token endpoint or ``/_sandbox``.

Speed matters more than elegance here: a benchmark drives thousands of requests per second
through one process, so the request path is dict lookups and precomputed bodies, with no
middleware and no logging unless asked for.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import os
import random
import secrets
import sys
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from itertools import repeat
from typing import Any, Final

from aiohttp import web
from aiolimiter import AsyncLimiter

_log = logging.getLogger("batchjob.sandbox")

API_PREFIX: Final = "/v3"
TOKEN_PATH: Final = "/oauth2/default/v1/token"  # noqa: S105 (a URL path, not a secret)
# CC spells it both ways in places; a world file may use either.
EVENT_STATUSES: Final = frozenset(
    {"ACTIVE", "COMPLETE", "DRAFT", "CANCELLED", "CANCELED", "DELETED", "ERROR"}
)
_WRITABLE_STATUSES: Final = frozenset({"ACTIVE", "COMPLETE"})

#: Status recorded for a request answered by closing the connection.
NO_REPLY: Final = 0

# aiolimiter compares a float level against the capacity with no tolerance, so a request that
# arrives exactly 1/rate after the previous one is refused whenever 1/rate is not exact in
# binary (rate 3, 7 or 10: about a third of evenly paced requests). One microsecond of slack
# is far below real network jitter and far above float error on a monotonic clock.
_EARLY_TOLERANCE_S: Final = 1e-6


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass
class Faults:
    """Shares (0..1) of /v3 requests that misbehave. Mutable at runtime."""

    error_500: float = 0.0  # answered 500, nothing applied
    error_503: float = 0.0  # answered 503 by "the gateway" (HTML body), nothing applied
    drop: float = 0.0  # connection closed with no reply, nothing applied
    lost_reply: float = 0.0  # undo APPLIED, then the connection closed with no reply
    slow: float = 0.0  # delayed by slow_seconds before being processed at all
    slow_seconds: float = 0.0
    throttle_storm: float = 0.0  # 429 throttled whatever the bucket says


@dataclass
class SandboxSettings:
    rate: float | None = 4.0  # requests per second; None = unlimited
    burst: float = 1.0  # bucket capacity in requests; 1.0 = no burst allowance
    daily_quota: int | None = 10_000  # accepted requests per UTC day; None = unlimited
    max_keys_per_request: int | None = None  # above it: 413
    access_token_ttl: float | None = None  # seconds from issue; None = forever
    seed: int | None = None  # seeds fault decisions
    rotate_refresh_tokens: bool = True  # False: long-lived refresh tokens (cc-api.md allows both)


def _check_share(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number between 0 and 1, got {value!r}")
    return float(value)


def _validate_faults(faults: Faults) -> None:
    for f in fields(Faults):
        value = getattr(faults, f.name)
        if f.name == "slow_seconds":
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"slow_seconds must be a number >= 0, got {value!r}")
        else:
            _check_share(f.name, value)


def _check_optional(name: str, value: object, *, minimum: float, integer: bool = False) -> None:
    if value is None:
        return
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if (
        isinstance(value, bool)
        or not isinstance(value, kinds)
        or not math.isfinite(value)  # type: ignore[arg-type]
        or value < minimum  # type: ignore[operator]
    ):
        what = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {what} >= {minimum:g}, or null; got {value!r}")


def _validate_settings(settings: SandboxSettings) -> None:
    _check_optional("rate", settings.rate, minimum=0)
    if settings.rate == 0:
        raise ValueError("rate must be > 0, or null for no limit")
    if settings.burst is None:
        raise ValueError("burst must be a number >= 1")
    _check_optional("burst", settings.burst, minimum=1)
    _check_optional("daily_quota", settings.daily_quota, minimum=0, integer=True)
    _check_optional("max_keys_per_request", settings.max_keys_per_request, minimum=1, integer=True)
    _check_optional("access_token_ttl", settings.access_token_ttl, minimum=0)
    if not isinstance(settings.rotate_refresh_tokens, bool):
        raise ValueError("rotate_refresh_tokens must be true or false")


# --------------------------------------------------------------------------------------------
# World


@dataclass
class EventState:
    status: str  # ACTIVE, COMPLETE, DRAFT, CANCELLED, DELETED, ERROR
    tickets: dict[str, bool]  # order_ticket_key -> checked in?
    name: str = ""
    # Tickets whose status is CANCELLED: check-in refuses them (400); undo leaves them be.
    cancelled: set[str] = field(default_factory=set)


_EVENT_WORDS = (
    ("Spring", "Summer", "Autumn", "Winter", "Annual", "Regional", "Founders'", "Community"),
    ("Customer", "Partner", "Donor", "Volunteer", "Member", "Developer", "Leadership", "Alumni"),
    ("Summit", "Workshop", "Breakfast", "Gala", "Meetup", "Open House", "Conference", "Forum"),
)


def _generate_key(rng: random.Random) -> str:
    """One order ticket key, in one of the shapes real exports show."""
    roll = rng.random()
    if roll < 0.75:
        return format(rng.getrandbits(48), "012x")
    if roll < 0.85:
        # Leading zeros: the classic casualty of a spreadsheet that "helpfully" makes a number.
        return f"00{rng.randrange(10**8):08d}"
    return str(rng.randrange(100_000, 10**9))


@dataclass
class World:
    """Events by id. The sandbox mutates it in place, so tests can inspect it directly."""

    events: dict[str, EventState] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> World:
        raw_events = data.get("events") if isinstance(data, Mapping) else None
        if not isinstance(raw_events, Mapping):
            raise ValueError('world: expected {"events": {"<event id>": {...}}}')
        events: dict[str, EventState] = {}
        for event_id, raw in raw_events.items():
            if not isinstance(raw, Mapping):
                raise ValueError(f"world: event {event_id!r} is not an object")
            status = raw.get("status")
            if status not in EVENT_STATUSES:
                raise ValueError(f"world: event {event_id!r} has unknown status {status!r}")
            tickets = raw.get("tickets", {})
            if not isinstance(tickets, Mapping) or not all(
                isinstance(k, str) and isinstance(v, bool) for k, v in tickets.items()
            ):
                raise ValueError(f"world: event {event_id!r} tickets must map key -> true/false")
            name = raw.get("name", "")
            if not isinstance(name, str):
                raise ValueError(f"world: event {event_id!r} name must be a string")
            cancelled = raw.get("cancelled", [])
            if not isinstance(cancelled, list) or not set(cancelled) <= set(tickets):
                raise ValueError(f"world: event {event_id!r} cancelled must list its ticket keys")
            events[str(event_id)] = EventState(
                status=status, tickets=dict(tickets), name=name, cancelled=set(cancelled)
            )
        return cls(events)

    def to_dict(self) -> dict[str, Any]:
        return {
            "events": {
                event_id: {"name": ev.name, "status": ev.status, "tickets": dict(ev.tickets)}
                | ({"cancelled": sorted(ev.cancelled)} if ev.cancelled else {})
                for event_id, ev in self.events.items()
            }
        }

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> World:
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    def to_json(self, path: str | os.PathLike[str], *, indent: int | None = 2) -> None:
        with open(path, "w", encoding="utf-8", newline="\n") as fh:
            json.dump(self.to_dict(), fh, indent=indent, ensure_ascii=False)
            fh.write("\n")

    @classmethod
    def generate(
        cls,
        n_events: int,
        tickets_per_event: int,
        *,
        seed: int | None,
        checked_in_share: float = 1.0,
        statuses: Sequence[str] | None = None,
    ) -> World:
        """A world of ``n_events`` events; ``statuses`` is cycled over them (default ACTIVE).

        Exactly ``round(checked_in_share * tickets_per_event)`` tickets per event start
        checked in, picked at random.
        """
        _check_share("checked_in_share", checked_in_share)
        status_cycle = list(statuses) if statuses else ["ACTIVE"]
        for status in status_cycle:
            if status not in EVENT_STATUSES:
                raise ValueError(f"unknown event status {status!r}")
        rng = random.Random(seed)
        n_checked = round(checked_in_share * tickets_per_event)
        events: dict[str, EventState] = {}
        for i in range(n_events):
            event_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            name = " ".join(rng.choice(words) for words in _EVENT_WORDS) + f" {2024 + i % 3}"
            keys: dict[str, None] = {}
            while len(keys) < tickets_per_event:
                keys[_generate_key(rng)] = None
            key_list = list(keys)
            checked = set(rng.sample(key_list, n_checked))
            events[event_id] = EventState(
                status=status_cycle[i % len(status_cycle)],
                tickets={k: k in checked for k in key_list},
                name=name,
            )
        return cls(events)

    def checked_in(self, event_id: str, key: str) -> bool:
        """Whether the ticket is checked in; KeyError for an unknown event or key."""
        return self.events[event_id].tickets[key]

    def checked_in_count(self, event_id: str) -> int:
        return sum(self.events[event_id].tickets.values())

    def snapshot(self) -> dict[str, dict[str, bool]]:
        """A deep copy of every ticket's state, for before/after comparisons."""
        return {event_id: dict(ev.tickets) for event_id, ev in self.events.items()}


# --------------------------------------------------------------------------------------------
# Bookkeeping


@dataclass(frozen=True, slots=True)
class RequestRecord:
    method: str
    path: str
    status: int  # NO_REPLY (0) when the connection was closed instead of answered
    event_id: str | None
    keys: tuple[str, ...]  # only for requests whose body was parsed (reached the endpoint)
    at: float  # loop.time() on arrival
    applied: bool  # the check-in change was carried out (True also for lost_reply)


@dataclass
class Counters:
    total: int = 0  # /v3 requests, whatever became of them
    by_status: Counter[int] = field(default_factory=Counter)  # NO_REPLY = 0 for no reply
    throttled: int = 0  # 429 throttled, storms included
    quota_exceeded: int = 0
    accepted: int = 0  # counted against today's quota (reset by reset_quota / UTC midnight)
    token_requests: int = 0
    dropped: int = 0  # closed with nothing applied
    lost_replies: int = 0  # applied, then closed

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["by_status"] = {str(k): v for k, v in sorted(self.by_status.items())}
        return data


class _Bucket:
    """The per-second limit: aiolimiter's leaky bucket plus the float tolerance it lacks."""

    __slots__ = ("_limiter", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        capacity = burst + rate * _EARLY_TOLERANCE_S
        # time_period scales with capacity so the drain rate stays exactly `rate`.
        self._limiter = AsyncLimiter(max_rate=capacity, time_period=capacity / rate)

    async def admit(self) -> bool:
        if not self._limiter.has_capacity():
            return False
        await self._limiter.acquire()  # returns at once: capacity was just checked
        return True


def _error(status: int, key: str, message: str) -> tuple[int, bytes]:
    return status, json.dumps([{"error_key": key, "error_message": message}]).encode()


_UNAUTHORIZED = _error(401, "unauthorized", "Unauthorized")
_THROTTLED = _error(429, "throttled", "Too Many Requests")
_QUOTA_EXCEEDED = _error(429, "quota_exceeded", "Limit Exceeded")
_SERVER_ERROR = _error(500, "server.error", "An internal error occurred")
_UNSUPPORTED_TYPE = _error(
    415, "request.unsupported_media_type", "Content-Type must be application/json"
)
_JSON_INVALID = _error(400, "json.invalid", "The request body is not valid JSON")
_KEYS_INVALID = _error(
    400, "json.invalid", "order_ticket_keys is required and must be an array of strings"
)
_EVENT_NOT_FOUND = _error(404, "event.not_found", "The requested event was not found")
_STATUS_INVALID = _error(400, "event.status.invalid", "Event must be ACTIVE or COMPLETE")
_TICKET_NOT_FOUND = _error(404, "ticket.not_found", "One or more order ticket keys were not found")
# cc-api.md: tickets with CANCELLED status cannot be checked in (400); which key, it does not say.
_TICKET_CANCELLED = _error(
    400, "ticket.status.invalid", "Tickets with CANCELLED status cannot be checked in"
)
_QUERY_INVALID = _error(400, "query.invalid", "Invalid limit or cursor")
# A 503 usually comes from a load balancer, not the application, so its body is HTML here:
# cc-api.md warns error bodies may not be JSON, and this is where a client meets one.
_UNAVAILABLE_HTML = (
    b"<html><head><title>503 Service Temporarily Unavailable</title></head>"
    b"<body><h1>503 Service Temporarily Unavailable</h1></body></html>"
)
_TOKEN_HEADERS: Final = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _json_response(
    status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    body = json.dumps({"error": error, "error_description": description}).encode()
    return _json_response(status, body, _TOKEN_HEADERS)


def _basic_auth_login(credentials: str) -> str | None:
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    login, _, _ = decoded.partition(":")
    return urllib.parse.unquote(login)


def _next_utc_midnight(now: float) -> float:
    return (math.floor(now / 86_400) + 1) * 86_400.0


# --------------------------------------------------------------------------------------------
# The server


class Sandbox:
    """The fake API. ``async with Sandbox(world) as sb:`` serves it on a free loopback port."""

    def __init__(
        self,
        world: World,
        settings: SandboxSettings | None = None,
        faults: Faults | None = None,
        *,
        access_token: str | None = None,
        refresh_token: str | None = None,
        client_id: str = "sandbox-client",
        log_requests: bool = False,
        record_requests: bool = True,
    ) -> None:
        self.world = world
        self.settings = settings if settings is not None else SandboxSettings()
        self.faults = faults if faults is not None else Faults()
        _validate_settings(self.settings)
        _validate_faults(self.faults)
        self.client_id = client_id
        self.access_token = access_token or secrets.token_urlsafe(32)
        self.refresh_token = refresh_token or secrets.token_urlsafe(32)
        # token -> time.monotonic() at issue; older tokens live on until their own expiry.
        self._access_tokens: dict[str, float] = {self.access_token: time.monotonic()}
        self._refresh_tokens: set[str] = {self.refresh_token}
        self.requests: list[RequestRecord] = []
        self.undo_counts: Counter[tuple[str, str]] = Counter()
        self.check_in_counts: Counter[tuple[str, str]] = Counter()
        self.counters = Counters()
        self._rng = random.Random(self.settings.seed)
        self._bucket: _Bucket | None = None
        self._quota_day_ends = _next_utc_midnight(time.time())
        self._log_requests = log_requests
        # A long benchmark at thousands of requests/s can turn this off to bound memory.
        self.record_requests = record_requests
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.base_url = ""
        self.token_url = ""
        self.app = self._build_app()

    # -- lifecycle ---------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(f"{API_PREFIX}/events", self._list_events)
        app.router.add_get(f"{API_PREFIX}/events/{{event_id}}", self._get_event)
        app.router.add_post(
            f"{API_PREFIX}/events/{{event_id}}/undo_check_in/tickets", self._undo_check_in
        )
        app.router.add_post(f"{API_PREFIX}/events/{{event_id}}/check_in/tickets", self._check_in)
        app.router.add_post(TOKEN_PATH, self._token)
        app.router.add_get("/_sandbox/state", self._admin_state)
        app.router.add_post("/_sandbox/faults", self._admin_faults)
        app.router.add_post("/_sandbox/settings", self._admin_settings)
        app.router.add_post("/_sandbox/reset_quota", self._admin_reset_quota)
        app.router.add_get("/_sandbox/tickets/{event_id}", self._admin_tickets)
        app.router.add_get("/_sandbox/requests", self._admin_requests)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0 = a free port); return the API base URL."""
        if self._runner is not None:
            raise RuntimeError("sandbox already started")
        self._loop = asyncio.get_running_loop()
        self._bucket = None  # aiolimiter binds to the loop that first uses it
        # A short shutdown_timeout: a "slow" request in flight must not hold up a test's exit.
        runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, backlog=1024)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        netloc = f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"
        self.base_url = f"http://{netloc}{API_PREFIX}"
        self.token_url = f"http://{netloc}{TOKEN_PATH}"
        return self.base_url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._runner is None:
            raise RuntimeError("sandbox not started")
        return int(self._runner.addresses[0][1])

    # -- runtime knobs -----------------------------------------------------------------------

    def set_rate(self, rate: float | None, burst: float = 1.0) -> None:
        """Change the per-second limit. The new bucket starts empty (full allowance)."""
        candidate = SandboxSettings(**{**asdict(self.settings), "rate": rate, "burst": burst})
        _validate_settings(candidate)
        self.settings.rate = rate
        self.settings.burst = burst
        self._bucket = None

    def reset_quota(self) -> None:
        """Start a new quota day now, as 00:00 UTC does."""
        self.counters.accepted = 0
        self._quota_day_ends = _next_utc_midnight(time.time())

    def issue_access_token(self) -> str:
        """A new valid access token (as a refresh would give), made the current one."""
        token = secrets.token_urlsafe(32)
        self._access_tokens[token] = time.monotonic()
        self.access_token = token
        return token

    def revoke_tokens(self) -> None:
        """Invalidate every access and refresh token issued so far (an app deactivated)."""
        self._access_tokens.clear()
        self._refresh_tokens.clear()

    # -- request path ------------------------------------------------------------------------

    def _now(self) -> float:
        loop = self._loop
        return loop.time() if loop is not None else time.monotonic()

    def _record(
        self,
        request: web.Request,
        status: int,
        event_id: str | None,
        keys: tuple[str, ...],
        at: float,
        applied: bool,
    ) -> None:
        counters = self.counters
        counters.total += 1
        counters.by_status[status] += 1
        if self.record_requests:
            self.requests.append(
                RequestRecord(request.method, request.path, status, event_id, keys, at, applied)
            )
        if self._log_requests:
            _log.info(
                "%s %s -> %s%s",
                request.method,
                request.path,
                status or "no reply",
                f" ({len(keys)} keys)" if keys else "",
            )

    def _answer(
        self,
        request: web.Request,
        error: tuple[int, bytes],
        event_id: str | None,
        at: float,
        keys: tuple[str, ...] = (),
    ) -> web.Response:
        status, body = error
        self._record(request, status, event_id, keys, at, False)
        return _json_response(status, body)

    async def _hang_up(self, request: web.Request) -> web.Response:
        """Close the connection without a reply.

        The body is read first so the client sees a clean close (ServerDisconnectedError)
        rather than a reset, whatever was still in flight.
        """
        if request.can_read_body:
            with contextlib.suppress(Exception):
                await request.read()
        transport = request.transport
        if transport is not None:
            transport.close()
        # aiohttp fails to write this to the closed transport and treats it as a client
        # disconnect, silently: exactly the "no reply" we want.
        return web.Response(status=204)

    async def _gate(
        self, request: web.Request, event_id: str | None, at: float
    ) -> web.StreamResponse | None:
        """Faults, token, bucket, quota: a response to send, or None to go on."""
        faults = self.faults
        if faults.slow and self._rng.random() < faults.slow:
            await asyncio.sleep(faults.slow_seconds)
        if faults.drop or faults.error_500 or faults.error_503 or faults.throttle_storm:
            roll = self._rng.random()
            if roll < faults.drop:
                self.counters.dropped += 1
                self._record(request, NO_REPLY, event_id, (), at, False)
                return await self._hang_up(request)
            roll -= faults.drop
            if roll < faults.error_500:
                return self._answer(request, _SERVER_ERROR, event_id, at)
            roll -= faults.error_500
            if roll < faults.error_503:
                self._record(request, 503, event_id, (), at, False)
                return web.Response(status=503, body=_UNAVAILABLE_HTML, content_type="text/html")
            roll -= faults.error_503
            if roll < faults.throttle_storm:
                self.counters.throttled += 1
                return self._answer(request, _THROTTLED, event_id, at)

        if not self._authorized(request.headers.get("Authorization")):
            return self._answer(request, _UNAUTHORIZED, event_id, at)

        settings = self.settings
        if settings.rate is not None:
            bucket = self._bucket
            if bucket is None or bucket.rate != settings.rate or bucket.burst != settings.burst:
                bucket = self._bucket = _Bucket(settings.rate, max(settings.burst, 1.0))
            if not await bucket.admit():
                self.counters.throttled += 1
                return self._answer(request, _THROTTLED, event_id, at)

        quota = settings.daily_quota
        if quota is not None:
            if time.time() >= self._quota_day_ends:
                self.reset_quota()
            if self.counters.accepted >= quota:
                self.counters.quota_exceeded += 1
                return self._answer(request, _QUOTA_EXCEEDED, event_id, at)
        self.counters.accepted += 1
        return None

    def _authorized(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        issued = self._access_tokens.get(token.strip())
        if issued is None:
            return False
        ttl = self.settings.access_token_ttl
        return ttl is None or time.monotonic() - issued < ttl

    # -- /v3 endpoints -----------------------------------------------------------------------

    async def _get_event(self, request: web.Request) -> web.StreamResponse:
        at = self._now()
        event_id = request.match_info["event_id"]
        refusal = await self._gate(request, event_id, at)
        if refusal is not None:
            return refusal
        event = self.world.events.get(event_id)
        if event is None:
            return self._answer(request, _EVENT_NOT_FOUND, event_id, at)
        self._record(request, 200, event_id, (), at, False)
        body = {"event_id": event_id, "name": event.name, "status": event.status}
        return _json_response(200, json.dumps(body).encode())

    async def _list_events(self, request: web.Request) -> web.StreamResponse:
        at = self._now()
        refusal = await self._gate(request, None, at)
        if refusal is not None:
            return refusal
        try:
            limit = int(request.query.get("limit", "50"))
            cursor = request.query.get("cursor")
            start = int(base64.urlsafe_b64decode(cursor.encode()).decode()) if cursor else 0
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return self._answer(request, _QUERY_INVALID, None, at)
        if not 1 <= limit <= 100 or start < 0:
            return self._answer(request, _QUERY_INVALID, None, at)
        ids = list(self.world.events)
        page = ids[start : start + limit]
        body: dict[str, Any] = {
            "events": [
                {
                    "event_id": i,
                    "name": self.world.events[i].name,
                    "status": self.world.events[i].status,
                }
                for i in page
            ]
        }
        if start + limit < len(ids):
            next_cursor = base64.urlsafe_b64encode(str(start + limit).encode()).decode()
            body["_links"] = {
                "next": {"href": f"{API_PREFIX}/events?limit={limit}&cursor={next_cursor}"}
            }
        self._record(request, 200, None, (), at, False)
        return _json_response(200, json.dumps(body).encode())

    async def _undo_check_in(self, request: web.Request) -> web.StreamResponse:
        return await self._set_checked_in(request, checked_in=False)

    async def _check_in(self, request: web.Request) -> web.StreamResponse:
        return await self._set_checked_in(request, checked_in=True)

    async def _set_checked_in(
        self, request: web.Request, *, checked_in: bool
    ) -> web.StreamResponse:
        at = self._now()
        event_id = request.match_info["event_id"]
        refusal = await self._gate(request, event_id, at)
        if refusal is not None:
            return refusal
        if request.content_type != "application/json":
            return self._answer(request, _UNSUPPORTED_TYPE, event_id, at)
        try:
            body = await request.read()
        except ConnectionError:
            # The client gave up (its timeout) before sending the whole body: nothing to do,
            # and no traceback for what a real server sees every day.
            return web.Response(status=400)
        try:
            payload = json.loads(body)
        except ValueError:
            return self._answer(request, _JSON_INVALID, event_id, at)
        raw_keys = payload.get("order_ticket_keys") if isinstance(payload, dict) else None
        # map/set instead of a generator: the per-key work runs in C, which a benchmark notices.
        if not isinstance(raw_keys, list) or not set(map(type, raw_keys)) <= {str}:
            return self._answer(request, _KEYS_INVALID, event_id, at)
        # Interned, so a long run's records share one copy of each key instead of holding
        # every parsed copy.
        keys: tuple[str, ...] = tuple(map(sys.intern, raw_keys))

        event = self.world.events.get(event_id)
        if event is None:
            return self._answer(request, _EVENT_NOT_FOUND, event_id, at, keys)
        if event.status not in _WRITABLE_STATUSES:
            return self._answer(request, _STATUS_INVALID, event_id, at, keys)
        max_keys = self.settings.max_keys_per_request
        if max_keys is not None and len(keys) > max_keys:
            too_large = _error(
                413, "request.too_large", f"At most {max_keys} order ticket keys per request"
            )
            return self._answer(request, too_large, event_id, at, keys)
        tickets = event.tickets
        if not all(map(tickets.__contains__, keys)):
            return self._answer(request, _TICKET_NOT_FOUND, event_id, at, keys)
        if checked_in and event.cancelled and not event.cancelled.isdisjoint(keys):
            return self._answer(request, _TICKET_CANCELLED, event_id, at, keys)

        unique = dict.fromkeys(keys, checked_in)
        tickets.update(unique)
        if checked_in:
            self.check_in_counts.update(zip(repeat(event_id), unique))
        else:
            self.undo_counts.update(zip(repeat(event_id), unique))
            lost = self.faults.lost_reply
            if lost and self._rng.random() < lost:
                self.counters.lost_replies += 1
                self._record(request, NO_REPLY, event_id, keys, at, True)
                return await self._hang_up(request)
        self._record(request, 204, event_id, keys, at, True)
        return web.Response(status=204)

    # -- OAuth token endpoint ----------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self.counters.token_requests += 1
        if request.content_type != "application/x-www-form-urlencoded":
            return _oauth_error(
                400, "invalid_request", "Content-Type must be application/x-www-form-urlencoded"
            )
        form = await request.post()
        client_id = form.get("client_id")
        auth_header = request.headers.get("Authorization", "")
        if not client_id and auth_header[:6].lower() == "basic ":
            client_id = _basic_auth_login(auth_header[6:])
        if form.get("grant_type") != "refresh_token":
            return _oauth_error(
                400, "unsupported_grant_type", "The authorization grant type is not supported."
            )
        if client_id != self.client_id:
            return _oauth_error(401, "invalid_client", "Client authentication failed.")
        presented = form.get("refresh_token")
        if not isinstance(presented, str) or presented not in self._refresh_tokens:
            return _oauth_error(400, "invalid_grant", "unknown, invalid, or expired refresh token")
        if self.settings.rotate_refresh_tokens:
            self._refresh_tokens.discard(presented)
            self.refresh_token = secrets.token_urlsafe(32)
            self._refresh_tokens.add(self.refresh_token)
        access_token = self.issue_access_token()
        ttl = self.settings.access_token_ttl
        body = {
            "access_token": access_token,
            "refresh_token": self.refresh_token,
            "token_type": "Bearer",
            "expires_in": math.ceil(ttl) if ttl is not None else 86_400,
            "scope": "campaign_data offline_access",
        }
        return _json_response(200, json.dumps(body).encode(), _TOKEN_HEADERS)

    # -- /_sandbox: out-of-process control (loopback only, no auth) --------------------------

    def state(self) -> dict[str, Any]:
        """What GET /_sandbox/state returns."""
        undo_values = self.undo_counts.values()
        return {
            "counters": self.counters.as_dict(),
            "requests_recorded": len(self.requests),
            "undo_counts": {
                "distinct_tickets": len(self.undo_counts),
                "total": sum(undo_values),
                "max_per_ticket": max(undo_values, default=0),
            },
            "events": {
                event_id: {
                    "name": ev.name,
                    "status": ev.status,
                    "tickets": len(ev.tickets),
                    "checked_in": sum(ev.tickets.values()),
                }
                for event_id, ev in self.world.events.items()
            },
            "settings": asdict(self.settings),
            "faults": asdict(self.faults),
        }

    async def _admin_state(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.state())

    @staticmethod
    async def _admin_body(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError as exc:
            raise ValueError("body must be a JSON object") from exc
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        return body

    async def _admin_faults(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._admin_body(request)
            known = {f.name for f in fields(Faults)}
            unknown = sorted(set(body) - known)
            if unknown:
                raise ValueError(f"unknown fault fields: {', '.join(unknown)}")
            candidate = Faults(**{**asdict(self.faults), **body})
            _validate_faults(candidate)
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        # Mutate in place: callers may hold a reference to this Faults object.
        for name, value in body.items():
            setattr(self.faults, name, float(value))
        return web.json_response(asdict(self.faults))

    async def _admin_settings(self, request: web.Request) -> web.StreamResponse:
        adjustable = {
            "rate",
            "burst",
            "daily_quota",
            "max_keys_per_request",
            "access_token_ttl",
            "rotate_refresh_tokens",
        }
        try:
            body = await self._admin_body(request)
            unknown = sorted(set(body) - adjustable)
            if unknown:
                raise ValueError(f"unknown or fixed settings: {', '.join(unknown)}")
            candidate = SandboxSettings(**{**asdict(self.settings), **body})
            _validate_settings(candidate)
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        for name, value in body.items():
            setattr(self.settings, name, value)
        return web.json_response(asdict(self.settings))

    async def _admin_reset_quota(self, request: web.Request) -> web.StreamResponse:
        self.reset_quota()
        return web.json_response(self.counters.as_dict())

    async def _admin_requests(self, request: web.Request) -> web.StreamResponse:
        """Recorded requests from index ``since`` on (at most ``limit``); keys if ``keys=1``."""
        try:
            since = int(request.query.get("since", "0"))
            limit = int(request.query.get("limit", "10000"))
        except ValueError:
            return web.json_response({"error": "since and limit must be integers"}, status=400)
        with_keys = request.query.get("keys") in {"1", "true"}
        page = self.requests[max(since, 0) : max(since, 0) + max(limit, 0)]
        records = []
        for r in page:
            item: dict[str, Any] = {
                "method": r.method,
                "path": r.path,
                "status": r.status,
                "event_id": r.event_id,
                "n_keys": len(r.keys),
                "at": r.at,
                "applied": r.applied,
            }
            if with_keys:
                item["keys"] = list(r.keys)
            records.append(item)
        return web.json_response({"total": len(self.requests), "requests": records})

    async def _admin_tickets(self, request: web.Request) -> web.StreamResponse:
        event = self.world.events.get(request.match_info["event_id"])
        if event is None:
            return web.json_response({"error": "unknown event"}, status=404)
        return web.json_response(event.tickets)
