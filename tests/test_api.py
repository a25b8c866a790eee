"""The API client: what each answer means, and when it is retried (aioresponses, no server)."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aioresponses import aioresponses

from batchjob._logging import MAX_SERVER_TEXT, TRUNCATED, Redactor
from batchjob._tokens import Secret, StaticToken
from batchjob.send import (
    AdaptivePacer,
    AiohttpTransport,
    ApiClient,
    RequestGate,
    RetryPolicy,
    Verdict,
)
from batchjob.send._messages import classify, parse_error_body, parse_retry_after

BASE = "https://api.example.test/v3"
EVENT = "07216444-4e3b-41ea-a3b8-5a418fce41f4"
UNDO = re.compile(rf"^{re.escape(BASE)}/events/{EVENT}/undo_check_in/tickets$")


@pytest.mark.parametrize(
    ("status", "error_key", "verdict"),
    [
        (204, "", Verdict.OK),
        (400, "json.invalid", Verdict.KEY_FAULT),
        (404, "ticket.not_found", Verdict.KEY_FAULT),
        (401, "unauthorized", Verdict.AUTH),
        (403, "forbidden", Verdict.FORBIDDEN),
        # The older gateway's over-QPS answer: throttling, not a stop.
        (403, "rate_limit_exceeded", Verdict.RETRY),
        (403, "requestRateExceeded", Verdict.RETRY),
        (403, "QPS.exceeded", Verdict.RETRY),
        (403, "throttled", Verdict.RETRY),
        (403, "corporate_policy", Verdict.FORBIDDEN),
        (403, "rate_plan_inactive", Verdict.FORBIDDEN),
        (403, "RateCard.NotAllowed", Verdict.FORBIDDEN),
        (403, "RATE_LIMIT_EXCEEDED", Verdict.RETRY),
        (403, "too_many_requests", Verdict.RETRY),
        (403, "unauthorized.scope", Verdict.FORBIDDEN),
        (413, "", Verdict.TOO_LARGE),
        (415, "", Verdict.REFUSED),
        (429, "throttled", Verdict.RETRY),
        (429, "", Verdict.RETRY),
        (429, "quota_exceeded", Verdict.QUOTA),
        (500, "", Verdict.RETRY),
        (502, "", Verdict.RETRY),
        (503, "", Verdict.RETRY),
        (504, "", Verdict.RETRY),
        (0, "network", Verdict.RETRY),
    ],
)
def test_classification(status: int, error_key: str, verdict: Verdict) -> None:
    assert classify(status, error_key) is verdict


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'[{"error_key":"throttled","error_message":"Too Many Requests"}]',
            ("throttled", "Too Many Requests"),
        ),
        (
            b'{"error_key":"quota_exceeded","error_message":"Limit Exceeded"}',
            ("quota_exceeded", "Limit Exceeded"),
        ),
        (b'{"error":"invalid_grant","error_description":"expired"}', ("invalid_grant", "expired")),
        (b"<html><body>Bad   Gateway</body></html>", ("", "<html><body>Bad Gateway</body></html>")),
        (b"", ("", "")),
        (b"[]", ("", "")),
    ],
)
def test_error_bodies_of_every_shape_are_read(body: bytes, expected: tuple[str, str]) -> None:
    assert parse_error_body(body) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # A NUL, a newline or ESC in a report row breaks reading it back (or a terminal).
        (
            b'[{"error_key":"k\\u0000","error_message":"a\\u0000b\\r\\nc\\u001b[2J\\u202e"}]',
            ("k\\x00", "a\\x00b\\x0d\\x0ac\\x1b[2J\\u202e"),
        ),
        (b"\x00\xffbinary\x01", ("", "\\x00\ufffdbinary\\x01")),
        (b"[" * 100_000, ("", "[" * (200 - len(TRUNCATED)) + TRUNCATED)),
        (b'{"error_key": {"a": [1]}, "error_message": 12}', ("{'a': [1]}", "12")),
    ],
)
def test_error_bodies_come_back_printable(body: bytes, expected: tuple[str, str]) -> None:
    assert parse_error_body(body) == expected


def test_a_huge_error_message_is_cut_saying_so() -> None:
    body = b'[{"error_key":"big","error_message":"' + b"m" * 60_000 + b'"}]'
    key, message = parse_error_body(body)
    assert key == "big"
    assert len(message) == MAX_SERVER_TEXT and message.endswith(TRUNCATED)


def test_secrets_are_redacted_before_any_cut() -> None:
    secret = "s3cr3t-token-value"
    redactor = Redactor([secret])
    # Whole, the secret would straddle the 200 characters an HTML page is cut to.
    html = b"<html>" + b"x" * 170 + b" Bearer " + secret.encode() + b"</html>"
    escaped = b'[{"error_key":"echo","error_message":"Bearer s3cr3t\\u002dtoken-value"}]'
    assert parse_error_body(html, redactor)[1].endswith("Bearer ***</html>")
    assert parse_error_body(escaped, redactor)[1] == "Bearer ***"


def test_retry_after_seconds_and_dates() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def _client(
    session: aiohttp.ClientSession,
    *,
    budget: int | None = None,
    max_time: float = 10,
    max_throttled: float | None = None,
    gate: RequestGate | None = None,
) -> ApiClient:
    return ApiClient(
        AiohttpTransport(session),
        BASE,
        StaticToken(Secret("tok-secret")),
        AdaptivePacer(1000.0),
        gate or RequestGate(budget),
        RetryPolicy(
            max_tries=4, max_time=max_time, base=0.001, cap=0.01, max_throttled=max_throttled
        ),
        rng=random.Random(1),
    )


async def test_retries_leave_no_plain_text_lines_in_the_host_s_logging(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """backoff logs 'Backing off ...' to its own logger by default: outside batchjob's
    structured, redacted logs, in whatever logging the host (an orchestrator) set up."""
    caplog.set_level(logging.DEBUG)
    with aioresponses() as mock:
        mock.post(UNDO, status=503)
        mock.post(UNDO, status=204)
        answer = await _client(session).undo_check_in(EVENT, ["a"])
    assert answer.attempts == 2
    assert [r for r in caplog.records if r.name.startswith("backoff")] == []


async def test_transient_errors_are_retried_until_success(session: aiohttp.ClientSession) -> None:
    with aioresponses() as mock:
        mock.post(UNDO, status=503)
        mock.post(UNDO, exception=aiohttp.ServerDisconnectedError())
        mock.post(UNDO, status=429, payload=[{"error_key": "throttled", "error_message": "x"}])
        mock.post(UNDO, status=204)
        answer = await _client(session).undo_check_in(EVENT, ["a", "b"])
    assert answer.reply.status == 204
    assert answer.attempts == 4


async def test_retries_are_bounded(session: aiohttp.ClientSession) -> None:
    with aioresponses() as mock:
        mock.post(UNDO, status=500, repeat=True)
        answer = await _client(session).undo_check_in(EVENT, ["a"])
    assert answer.reply.status == 500
    assert answer.attempts == 4


@pytest.mark.parametrize("status", [400, 401, 403, 404])
async def test_client_errors_are_never_resent_unchanged(
    session: aiohttp.ClientSession, status: int
) -> None:
    with aioresponses() as mock:
        mock.post(UNDO, status=status, payload=[{"error_key": "k", "error_message": "m"}])
        mock.post(UNDO, status=204)
        answer = await _client(session).undo_check_in(EVENT, ["a"])
    assert answer.reply.status == status
    assert answer.attempts == 1


async def test_quota_exceeded_is_not_retried(session: aiohttp.ClientSession) -> None:
    body = [{"error_key": "quota_exceeded", "error_message": "Limit Exceeded"}]
    with aioresponses() as mock:
        mock.post(UNDO, status=429, payload=body)
        mock.post(UNDO, status=204)
        answer = await _client(session).undo_check_in(EVENT, ["a"])
    assert answer.reply.verdict is Verdict.QUOTA
    assert answer.attempts == 1


async def test_retry_after_is_honoured(session: aiohttp.ClientSession) -> None:
    with aioresponses() as mock:
        mock.post(UNDO, status=503, headers={"Retry-After": "0.3"})
        mock.post(UNDO, status=204)
        started = time.monotonic()
        answer = await _client(session).undo_check_in(EVENT, ["a"])
        waited = time.monotonic() - started
    assert answer.reply.status == 204
    # The jittered backoff here is at most 0.01 s; only Retry-After explains a 0.3 s wait.
    assert waited >= 0.29


async def test_the_request_carries_the_body_and_token(session: aiohttp.ClientSession) -> None:
    with aioresponses() as mock:
        mock.post(UNDO, status=204)
        await _client(session).undo_check_in(EVENT, ["000123", "b"])
        (call,) = next(iter(mock.requests.values()))
    assert call.kwargs["headers"]["Authorization"] == "Bearer tok-secret"
    assert call.kwargs["headers"]["Content-Type"] == "application/json"
    assert call.kwargs["data"] == b'{"order_ticket_keys":["000123","b"]}'


async def test_budget_stops_before_sending(session: aiohttp.ClientSession) -> None:
    with aioresponses() as mock:
        mock.post(UNDO, status=503, repeat=True)
        answer = await _client(session, budget=2).undo_check_in(EVENT, ["a"])
    assert answer.not_sent.startswith("request budget spent")
    assert answer.attempts == 2


async def test_only_the_documented_204_means_undone(session: aiohttp.ClientSession) -> None:
    # A proxy or captive portal answering 200 must not get keys reported undone.
    with aioresponses() as mock:
        mock.post(UNDO, status=200, body=b"<html>Welcome</html>")
        answer = await _client(session).undo_check_in(EVENT, ["a"])
    assert answer.reply.verdict is Verdict.REFUSED
    assert answer.attempts == 1


async def test_a_retry_after_beyond_the_retry_budget_still_gets_one_more_try(
    session: aiohttp.ClientSession,
) -> None:
    # A maintenance window answering "come back in an hour": the wait is cut to what is left
    # of the request's retry budget (10 s here, max_time), then it is tried again.
    with aioresponses() as mock:
        mock.post(UNDO, status=503, headers={"Retry-After": "3600"})
        mock.post(UNDO, status=204)
        answer = await _client(session, max_time=0.3).undo_check_in(EVENT, ["a"])
    assert answer.reply.status == 204 and answer.attempts == 2


THROTTLED = [{"error_key": "throttled", "error_message": "Too Many Requests"}]


@pytest.mark.parametrize(
    ("status", "body"),
    [(429, THROTTLED), (403, [{"error_key": "rate_limit_exceeded", "error_message": "slow"}])],
)
async def test_throttled_tries_do_not_use_up_the_retry_budget(
    session: aiohttp.ClientSession, status: int, body: list[dict[str, str]]
) -> None:
    # Ten throttled answers, a budget of four tries: the request still succeeds.
    with aioresponses() as mock:
        for _ in range(10):
            mock.post(UNDO, status=status, payload=body)
        mock.post(UNDO, status=503)
        mock.post(UNDO, status=204)
        answer = await _client(session).undo_check_in(EVENT, ["a"])
    assert answer.reply.status == 204
    assert answer.attempts == 12


async def test_endless_throttling_ends_the_request_as_not_sent_and_closes_the_gate(
    session: aiohttp.ClientSession,
) -> None:
    gate = RequestGate()
    with aioresponses() as mock:
        mock.post(UNDO, status=429, payload=THROTTLED, repeat=True)
        answer = await _client(session, max_throttled=0.05, gate=gate).undo_check_in(EVENT, ["a"])
    assert answer.reply.status == 429
    assert "429 throttled" in answer.not_sent
    assert gate.closed == answer.not_sent


async def test_a_huge_retry_after_on_429s_does_not_outlast_the_throttling_stop(
    session: aiohttp.ClientSession,
) -> None:
    gate = RequestGate()
    headers = {"Retry-After": "1e9"}
    with aioresponses() as mock:
        mock.post(UNDO, status=429, payload=THROTTLED, headers=headers, repeat=True)
        client = _client(session, max_throttled=0.2, gate=gate)
        # A guard against a hang, not a timing: the stop is due after 0.2 s of 429s.
        answer = await asyncio.wait_for(client.undo_check_in(EVENT, ["a"]), 30)
    assert "429 throttled" in answer.not_sent
    assert gate.closed == answer.not_sent


async def test_the_client_learns_every_secret_it_sends_and_cleans_server_text(
    session: aiohttp.ClientSession,
) -> None:
    client = _client(session)
    echo = [{"error_key": "echo", "error_message": "you sent Bearer tok-secret"}]
    with aioresponses() as mock:
        mock.post(UNDO, status=400, payload=echo)
        mock.post(UNDO, exception=aiohttp.ServerDisconnectedError("X-Echo: Bearer tok-secret"))
        mock.post(UNDO, status=204)
        refused = await client.undo_check_in(EVENT, ["a"])
        cut = await client.undo_check_in(EVENT, ["a"])
    assert refused.reply.error_message == "you sent Bearer ***"
    assert cut.reply.status == 204  # retried after the cut
    assert "tok-secret" in client.redactor
