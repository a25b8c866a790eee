"""The sandbox API, exercised over real HTTP on loopback."""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import importlib.util
import io
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from batchjob.sandbox import (
    EventState,
    Faults,
    Sandbox,
    SandboxSettings,
    World,
    add_sandbox_arguments,
)
from batchjob.sandbox._serve import _sandbox_from_args
from batchjob.sandbox._server import NO_REPLY, _Bucket

ROOT = Path(__file__).absolute().parents[1]
SAMPLES = ROOT / "sample_data"

ACTIVE = "07216444-4e3b-41ea-a3b8-5a418fce41f4"
COMPLETE = "3f0c8a52-9d1e-4c7b-8e2f-6a5b4c3d2e1f"
DRAFT = "b9a8c7d6-e5f4-4a3b-9c2d-1e0f9a8b7c6d"
UNKNOWN = "00000000-0000-4000-8000-000000000000"


def make_world() -> World:
    return World(
        events={
            ACTIVE: EventState(
                "ACTIVE",
                {
                    "000123": True,
                    "123": True,
                    "a1b2c3d4e5f6": True,
                    "123456": True,
                    "0058085012": False,
                },
                name="Spring Partner Workshop",
            ),
            COMPLETE: EventState("COMPLETE", {"c0ffee000001": True}, name="Donor Breakfast"),
            DRAFT: EventState("DRAFT", {"d4af7e000001": True}, name="Autumn Gala"),
        }
    )


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_key(self) -> str:
        body = self.json()
        assert isinstance(body, list) and len(body) == 1, body
        return str(body[0]["error_key"])


class Client:
    """A thin HTTP client for the tests: every call is a real request to the sandbox."""

    def __init__(self, sb: Sandbox, session: aiohttp.ClientSession) -> None:
        self.sb = sb
        self.session = session
        self.root = sb.base_url.removesuffix("/v3")

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.sb.access_token}"}

    async def request(self, method: str, url: str, **kwargs: Any) -> Reply:
        async with self.session.request(method, url, **kwargs) as resp:
            return Reply(resp.status, resp.headers, await resp.read())

    async def keys(
        self,
        event_id: str,
        keys: Sequence[str],
        *,
        action: str = "undo_check_in",
        headers: dict[str, str] | None = None,
    ) -> Reply:
        return await self.request(
            "POST",
            f"{self.sb.base_url}/events/{event_id}/{action}/tickets",
            json={"order_ticket_keys": list(keys)},
            headers=headers if headers is not None else self.auth(),
        )

    async def event(self, event_id: str, token: str | None = None) -> Reply:
        return await self.request(
            "GET", f"{self.sb.base_url}/events/{event_id}", headers=self.auth(token)
        )

    async def refresh(self, refresh_token: str, client_id: str | None = None) -> Reply:
        return await self.request(
            "POST",
            self.sb.token_url,
            data={
                "grant_type": "refresh_token",
                "refresh_token": refresh_token,
                "client_id": client_id if client_id is not None else self.sb.client_id,
            },
        )


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def open_sandbox(session: aiohttp.ClientSession, **settings: Any) -> tuple[Sandbox, Client]:
    sb = Sandbox(make_world(), SandboxSettings(**{"rate": None, **settings}))
    await sb.start()
    return sb, Client(sb, session)


@pytest.fixture
async def client(session: aiohttp.ClientSession) -> AsyncIterator[Client]:
    sb, c = await open_sandbox(session)
    try:
        yield c
    finally:
        await sb.stop()


# --- the undo endpoint ----------------------------------------------------------------------


async def test_undo_answers_204_and_unchecks_exactly_those_tickets(client: Client) -> None:
    sb = client.sb
    reply = await client.keys(ACTIVE, ["000123", "a1b2c3d4e5f6"])
    assert (reply.status, reply.body) == (204, b"")
    tickets = sb.world.events[ACTIVE].tickets
    assert tickets == {
        "000123": False,
        "123": True,
        "a1b2c3d4e5f6": False,
        "123456": True,
        "0058085012": False,
    }
    assert sb.undo_counts == {(ACTIVE, "000123"): 1, (ACTIVE, "a1b2c3d4e5f6"): 1}
    [record] = sb.requests
    assert record.method == "POST"
    assert record.path == f"/v3/events/{ACTIVE}/undo_check_in/tickets"
    assert (record.status, record.event_id, record.applied) == (204, ACTIVE, True)
    assert record.keys == ("000123", "a1b2c3d4e5f6")


async def test_undo_is_idempotent_and_accepts_an_empty_list(client: Client) -> None:
    assert (await client.keys(ACTIVE, ["0058085012"])).status == 204  # never checked in
    assert (await client.keys(ACTIVE, ["123", "123"])).status == 204
    assert (await client.keys(ACTIVE, ["123"])).status == 204
    assert (await client.keys(ACTIVE, [])).status == 204
    assert client.sb.world.checked_in(ACTIVE, "123") is False
    assert client.sb.undo_counts[(ACTIVE, "123")] == 2  # per request, not per occurrence
    assert client.sb.world.checked_in(ACTIVE, "000123") is True


async def test_keys_are_compared_as_exact_strings(client: Client) -> None:
    # "000123" and "123" are different tickets: stripping zeros must hit the wrong one or none.
    assert (await client.keys(ACTIVE, ["123"])).status == 204
    assert client.sb.world.checked_in(ACTIVE, "000123") is True
    assert (await client.keys(ACTIVE, ["123456.0"])).error_key == "ticket.not_found"


async def test_check_in_is_the_reverse(client: Client) -> None:
    await client.keys(ACTIVE, ["000123"])
    reply = await client.keys(ACTIVE, ["000123", "0058085012"], action="check_in")
    assert reply.status == 204
    assert client.sb.world.checked_in(ACTIVE, "000123") is True
    assert client.sb.world.checked_in(ACTIVE, "0058085012") is True
    assert client.sb.undo_counts == {(ACTIVE, "000123"): 1}  # check-ins are not undo counts


async def test_check_in_follows_the_undo_rules_and_refuses_cancelled_tickets(
    client: Client,
) -> None:
    world = client.sb.world
    world.events[ACTIVE].cancelled = {"123456"}
    world.events[ACTIVE].tickets["000123"] = False
    before = world.snapshot()
    # A cancelled ticket refuses the whole request (400), and nothing in it is checked in.
    refused = await client.keys(ACTIVE, ["000123", "123456"], action="check_in")
    assert (refused.status, refused.error_key) == (400, "ticket.status.invalid")
    # So does an unknown key (404), and an event that is not ACTIVE or COMPLETE (400).
    unknown = await client.keys(ACTIVE, ["000123", "nope"], action="check_in")
    assert (unknown.status, unknown.error_key) == (404, "ticket.not_found")
    draft = await client.keys(DRAFT, ["d4af7e000001"], action="check_in")
    assert (draft.status, draft.error_key) == (400, "event.status.invalid")
    missing = await client.keys(UNKNOWN, ["000123"], action="check_in")
    assert missing.status == 404
    assert world.snapshot() == before
    # Undo leaves a cancelled ticket be: cc-api.md only says it cannot be checked in.
    assert (await client.keys(ACTIVE, ["123456"])).status == 204
    assert (await client.keys(ACTIVE, ["000123"], action="check_in")).status == 204
    assert world.checked_in(ACTIVE, "000123") is True
    assert client.sb.check_in_counts == {(ACTIVE, "000123"): 1}


def test_a_world_file_keeps_its_cancelled_tickets(tmp_path: Path) -> None:
    world = make_world()
    world.events[ACTIVE].cancelled = {"123"}
    world.to_json(tmp_path / "w.json")
    assert World.from_json(tmp_path / "w.json").events[ACTIVE].cancelled == {"123"}
    with pytest.raises(ValueError, match="cancelled"):
        World.from_dict({"events": {ACTIVE: {"status": "ACTIVE", "cancelled": ["x"]}}})


async def test_complete_events_accept_undo(client: Client) -> None:
    assert (await client.keys(COMPLETE, ["c0ffee000001"])).status == 204
    assert client.sb.world.checked_in(COMPLETE, "c0ffee000001") is False


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-the-token"},
        {"Authorization": "Basic c2VjcmV0"},
        {"Authorization": "Bearer"},
    ],
    ids=["missing", "unknown", "wrong-scheme", "empty"],
)
async def test_bad_or_missing_token_is_401_and_changes_nothing(
    client: Client, headers: dict[str, str]
) -> None:
    reply = await client.keys(ACTIVE, ["000123"], headers=headers)
    assert reply.status == 401
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.json() == [{"error_key": "unauthorized", "error_message": "Unauthorized"}]
    assert client.sb.world.checked_in(ACTIVE, "000123") is True
    assert client.sb.counters.accepted == 0  # refused before the quota counts it


async def test_bearer_scheme_is_case_insensitive(client: Client) -> None:
    headers = {"Authorization": f"bearer {client.sb.access_token}"}
    assert (await client.keys(ACTIVE, ["000123"], headers=headers)).status == 204


async def test_wrong_content_type_is_415(client: Client) -> None:
    reply = await client.request(
        "POST",
        f"{client.sb.base_url}/events/{ACTIVE}/undo_check_in/tickets",
        data=json.dumps({"order_ticket_keys": ["000123"]}),
        headers={**client.auth(), "Content-Type": "text/plain"},
    )
    assert reply.status == 415
    assert client.sb.world.checked_in(ACTIVE, "000123") is True


async def test_json_content_type_with_charset_is_accepted(client: Client) -> None:
    reply = await client.request(
        "POST",
        f"{client.sb.base_url}/events/{ACTIVE}/undo_check_in/tickets",
        data=b'{"order_ticket_keys": ["000123"]}',
        headers={**client.auth(), "Content-Type": "application/json; charset=utf-8"},
    )
    assert reply.status == 204


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'"000123"',
        b"{}",
        b'{"order_ticket_keys": "000123"}',
        b'{"order_ticket_keys": [123]}',
        b'{"order_ticket_keys": ["000123", null]}',
        b'{"order_ticket_keys": null}',
        b"\xff\xfe",
    ],
)
async def test_malformed_body_is_400_json_invalid(client: Client, body: bytes) -> None:
    reply = await client.request(
        "POST",
        f"{client.sb.base_url}/events/{ACTIVE}/undo_check_in/tickets",
        data=body,
        headers={**client.auth(), "Content-Type": "application/json"},
    )
    assert reply.status == 400
    assert reply.error_key == "json.invalid"
    assert client.sb.world.checked_in(ACTIVE, "000123") is True


@pytest.mark.parametrize("event_id", [UNKNOWN, "not-a-uuid", ACTIVE.upper()])
async def test_unknown_event_is_404(client: Client, event_id: str) -> None:
    reply = await client.keys(event_id, ["000123"])
    assert (reply.status, reply.error_key) == (404, "event.not_found")
    got = await client.event(event_id)
    assert (got.status, got.error_key) == (404, "event.not_found")


async def test_get_event(client: Client) -> None:
    reply = await client.event(DRAFT)
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.json() == {"event_id": DRAFT, "name": "Autumn Gala", "status": "DRAFT"}


async def test_list_events_paginates_with_a_cursor(client: Client) -> None:
    url: str | None = f"{client.sb.base_url}/events?limit=2"
    seen: list[str] = []
    while url is not None:
        page = (await client.request("GET", url, headers=client.auth())).json()
        assert len(page["events"]) <= 2
        seen += [e["event_id"] for e in page["events"]]
        href = page.get("_links", {}).get("next", {}).get("href")
        url = f"{client.root}{href}" if href else None
    assert seen == [ACTIVE, COMPLETE, DRAFT]
    bad = await client.request(
        "GET", f"{client.sb.base_url}/events?limit=500", headers=client.auth()
    )
    assert bad.status == 400


@pytest.mark.parametrize("status", ["DRAFT", "CANCELLED", "DELETED", "ERROR"])
async def test_event_not_active_or_complete_is_400_and_nothing_applied(
    client: Client, status: str
) -> None:
    client.sb.world.events[DRAFT].status = status
    reply = await client.keys(DRAFT, ["d4af7e000001"])
    assert reply.status == 400
    assert reply.json() == [
        {"error_key": "event.status.invalid", "error_message": "Event must be ACTIVE or COMPLETE"}
    ]
    assert client.sb.world.checked_in(DRAFT, "d4af7e000001") is True
    assert client.sb.undo_counts == {}
    assert client.sb.requests[-1].applied is False


async def test_one_unknown_key_fails_the_whole_request(client: Client) -> None:
    reply = await client.keys(ACTIVE, ["000123", "no-such-key", "a1b2c3d4e5f6"])
    assert reply.status == 404
    assert reply.json() == [
        {
            "error_key": "ticket.not_found",
            "error_message": "One or more order ticket keys were not found",
        }
    ]
    assert b"no-such-key" not in reply.body  # the message does not say which
    assert client.sb.world.checked_in(ACTIVE, "000123") is True
    assert client.sb.world.checked_in(ACTIVE, "a1b2c3d4e5f6") is True
    assert client.sb.undo_counts == {}
    # A key of another event is unknown here too.
    assert (await client.keys(ACTIVE, ["c0ffee000001"])).status == 404


async def test_too_many_keys_is_413(session: aiohttp.ClientSession) -> None:
    sb, client = await open_sandbox(session, max_keys_per_request=2)
    try:
        reply = await client.keys(ACTIVE, ["000123", "123", "123456"])
        assert reply.status == 413
        assert reply.headers["Content-Type"].startswith("application/json")
        assert reply.error_key
        assert sb.world.checked_in(ACTIVE, "000123") is True
        assert (await client.keys(ACTIVE, ["000123", "123"])).status == 204
    finally:
        await sb.stop()


# --- rate limit and quota -------------------------------------------------------------------


class _SettableClockLoop(asyncio.SelectorEventLoop):
    """A loop whose clock the test sets, so spacing can be exact to the last bit."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def time(self) -> float:
        return self.now


@pytest.mark.parametrize("rate", [4.0, 3.0, 7.0, 10.0, 0.3, 250.0])
def test_bucket_admits_requests_spaced_exactly_one_over_rate(rate: float) -> None:
    # Plain aiolimiter refuses about a third of these when 1/rate is inexact in binary.
    loop = _SettableClockLoop()

    async def run() -> None:
        for base in (1234.5678, 987_654.321, 31_536_000.123):
            bucket = _Bucket(rate, 1.0)
            for i in range(200):
                loop.now = base + i * (1 / rate)
                assert await bucket.admit(), (base, i)
            # ...but one arriving a millisecond early is refused, and changes nothing.
            loop.now = base + 200 * (1 / rate) - 1e-3
            assert not await bucket.admit()
            loop.now = base + 200 * (1 / rate)
            assert await bucket.admit()

    try:
        loop.run_until_complete(run())
    finally:
        loop.close()


def test_bucket_burst_allows_that_many_back_to_back() -> None:
    loop = _SettableClockLoop()

    async def run() -> None:
        loop.now = 5000.0
        bucket = _Bucket(4.0, 3.0)
        assert [await bucket.admit() for _ in range(4)] == [True, True, True, False]
        loop.now += 0.25
        assert [await bucket.admit() for _ in range(2)] == [True, False]

    try:
        loop.run_until_complete(run())
    finally:
        loop.close()


async def test_rate_limit_over_http(session: aiohttp.ClientSession) -> None:
    rate = 20.0  # 1/20 is inexact in binary: the case plain aiolimiter gets wrong
    sb, client = await open_sandbox(session, rate=rate)
    loop = asyncio.get_running_loop()
    try:
        assert (await client.event(ACTIVE)).status == 200
        for _ in range(3):
            await asyncio.sleep(max(0.0, sb.requests[-1].at + 1 / rate - loop.time()))
            assert (await client.event(ACTIVE)).status == 200
        refused = await client.event(ACTIVE)  # straight after: refused
        assert refused.status == 429
        assert refused.json() == [{"error_key": "throttled", "error_message": "Too Many Requests"}]
        assert "Retry-After" not in refused.headers
        assert not any(h.lower().startswith(("x-rate", "ratelimit")) for h in refused.headers)
        assert sb.counters.throttled == 1
        assert sb.counters.accepted == 4  # the refused one does not count against the quota
        assert sb.counters.by_status == {200: 4, 429: 1}
    finally:
        await sb.stop()


async def test_throttled_undo_applies_nothing(session: aiohttp.ClientSession) -> None:
    sb, client = await open_sandbox(session, rate=1.0)
    try:
        results = await asyncio.gather(
            client.keys(ACTIVE, ["000123"]), client.keys(ACTIVE, ["123"])
        )
        assert sorted(r.status for r in results) == [204, 429]
        assert sum(not sb.world.checked_in(ACTIVE, k) for k in ("000123", "123")) == 1
    finally:
        await sb.stop()


async def test_set_rate_at_runtime(session: aiohttp.ClientSession) -> None:
    sb, client = await open_sandbox(session, rate=None)
    try:
        assert [(await client.event(ACTIVE)).status for _ in range(3)] == [200] * 3
        sb.set_rate(1.0, burst=2.0)
        assert [(await client.event(ACTIVE)).status for _ in range(3)] == [200, 200, 429]
        with pytest.raises(ValueError):
            sb.set_rate(2.0, burst=0.5)
    finally:
        await sb.stop()


async def test_daily_quota(session: aiohttp.ClientSession) -> None:
    sb, client = await open_sandbox(session, rate=1.0, daily_quota=2)
    try:
        assert (await client.event(ACTIVE)).status == 200
        assert (await client.event(ACTIVE)).status == 429  # throttled: not counted
        assert sb.counters.accepted == 1
        sb.set_rate(None)
        assert (await client.event(ACTIVE)).status == 200
        for _ in range(2):
            reply = await client.event(ACTIVE)
            assert reply.status == 429
            assert reply.json() == [
                {"error_key": "quota_exceeded", "error_message": "Limit Exceeded"}
            ]
            assert "Retry-After" not in reply.headers
        over = await client.keys(ACTIVE, ["000123"])
        assert over.error_key == "quota_exceeded"
        assert sb.world.checked_in(ACTIVE, "000123") is True
        assert (sb.counters.accepted, sb.counters.quota_exceeded) == (2, 3)
        sb.reset_quota()
        assert (await client.event(ACTIVE)).status == 200
    finally:
        await sb.stop()


# --- faults ---------------------------------------------------------------------------------


async def test_error_500_and_503_apply_nothing(client: Client) -> None:
    sb = client.sb
    sb.faults.error_500 = 1.0
    reply = await client.keys(ACTIVE, ["000123"])
    assert reply.status == 500
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.error_key
    sb.faults.error_500, sb.faults.error_503 = 0.0, 1.0
    reply = await client.keys(ACTIVE, ["000123"])
    assert reply.status == 503
    assert reply.headers["Content-Type"].startswith("text/html")  # a gateway's page, not JSON
    sb.faults.error_503 = 0.0
    assert sb.world.checked_in(ACTIVE, "000123") is True
    assert sb.counters.accepted == 0
    assert (await client.keys(ACTIVE, ["000123"])).status == 204


async def test_faults_come_before_the_token_check(client: Client) -> None:
    client.sb.faults.error_500 = 1.0
    reply = await client.keys(ACTIVE, ["000123"], headers={})
    assert reply.status == 500


async def test_drop_closes_the_connection_and_applies_nothing(client: Client) -> None:
    sb = client.sb
    sb.faults.drop = 1.0
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await client.keys(ACTIVE, ["000123"])
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await client.event(ACTIVE)
    assert sb.world.checked_in(ACTIVE, "000123") is True
    assert sb.undo_counts == {}
    # aiohttp may resend the GET once by itself (an idempotent method on a closed connection).
    assert sb.counters.dropped == len(sb.requests) >= 2
    assert {(r.status, r.applied) for r in sb.requests} == {(NO_REPLY, False)}
    sb.faults.drop = 0.0
    assert (await client.keys(ACTIVE, ["000123"])).status == 204


async def test_lost_reply_applies_then_closes(client: Client) -> None:
    sb = client.sb
    sb.faults.lost_reply = 1.0
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await client.keys(ACTIVE, ["000123", "123"])
    assert sb.world.checked_in(ACTIVE, "000123") is False
    assert sb.world.checked_in(ACTIVE, "123") is False
    assert sb.undo_counts == {(ACTIVE, "000123"): 1, (ACTIVE, "123"): 1}
    [record] = sb.requests
    assert (record.status, record.applied, record.keys) == (NO_REPLY, True, ("000123", "123"))
    assert sb.counters.lost_replies == 1
    # Only applied undo requests lose their reply; refusals are still answered.
    assert (await client.keys(ACTIVE, ["nope"])).status == 404
    assert (await client.event(ACTIVE)).status == 200


async def test_slow_delays_the_answer(client: Client) -> None:
    client.sb.faults.slow, client.sb.faults.slow_seconds = 1.0, 0.2
    started = time.monotonic()
    reply = await client.keys(ACTIVE, ["000123"])
    assert time.monotonic() - started >= 0.2
    assert reply.status == 204


async def test_throttle_storm_ignores_the_bucket(client: Client) -> None:
    client.sb.faults.throttle_storm = 1.0
    reply = await client.keys(ACTIVE, ["000123"])
    assert (reply.status, reply.error_key) == (429, "throttled")
    assert "Retry-After" not in reply.headers
    assert client.sb.world.checked_in(ACTIVE, "000123") is True
    assert client.sb.counters.throttled == 1


async def test_faults_are_reproducible_with_a_seed(session: aiohttp.ClientSession) -> None:
    runs: list[list[int]] = []
    for _ in range(2):
        sb = Sandbox(
            make_world(),
            SandboxSettings(rate=None, seed=42),
            Faults(error_500=0.3, error_503=0.2, throttle_storm=0.2),
        )
        async with sb:
            client = Client(sb, session)
            runs.append([(await client.event(ACTIVE)).status for _ in range(40)])
    assert runs[0] == runs[1]
    assert set(runs[0]) == {200, 429, 500, 503}


async def test_token_endpoint_and_sandbox_routes_ignore_faults(client: Client) -> None:
    sb = client.sb
    sb.faults.drop = sb.faults.error_500 = 1.0
    assert (await client.refresh(sb.refresh_token)).status == 200
    assert (await client.request("GET", f"{client.root}/_sandbox/state")).status == 200
    assert sb.counters.total == 0


# --- tokens ---------------------------------------------------------------------------------


async def test_refresh_tokens_rotate(client: Client) -> None:
    sb = client.sb
    first_access, first_refresh = sb.access_token, sb.refresh_token
    reply = await client.refresh(first_refresh)
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.headers["Cache-Control"] == "no-store"
    body = reply.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 86_400
    assert body["scope"] == "campaign_data offline_access"
    assert body["access_token"] != first_access
    assert body["refresh_token"] != first_refresh
    assert (sb.access_token, sb.refresh_token) == (body["access_token"], body["refresh_token"])

    spent = await client.refresh(first_refresh)
    assert spent.status == 400
    assert spent.json() == {
        "error": "invalid_grant",
        "error_description": "unknown, invalid, or expired refresh token",
    }
    assert (await client.event(ACTIVE, body["access_token"])).status == 200
    assert (await client.event(ACTIVE, first_access)).status == 200  # lives to its own expiry
    again = await client.refresh(body["refresh_token"])
    assert again.status == 200
    assert sb.counters.token_requests == 3
    assert all(r.path.startswith("/v3/") for r in sb.requests)


async def test_token_endpoint_errors(client: Client) -> None:
    sb = client.sb
    unknown = await client.refresh("made-up")
    assert (unknown.status, unknown.json()["error"]) == (400, "invalid_grant")
    wrong_client = await client.refresh(sb.refresh_token, client_id="someone-else")
    assert (wrong_client.status, wrong_client.json()["error"]) == (401, "invalid_client")
    wrong_grant = await client.request(
        "POST", sb.token_url, data={"grant_type": "client_credentials", "client_id": sb.client_id}
    )
    assert (wrong_grant.status, wrong_grant.json()["error"]) == (400, "unsupported_grant_type")
    as_json = await client.request(
        "POST",
        sb.token_url,
        json={
            "grant_type": "refresh_token",
            "refresh_token": sb.refresh_token,
            "client_id": sb.client_id,
        },
    )
    assert as_json.status == 400
    # None of those spent the refresh token.
    assert (await client.refresh(sb.refresh_token)).status == 200


async def test_client_id_by_basic_auth(client: Client) -> None:
    sb = client.sb
    basic = base64.b64encode(f"{sb.client_id}:".encode()).decode()
    reply = await client.request(
        "POST",
        sb.token_url,
        data={"grant_type": "refresh_token", "refresh_token": sb.refresh_token},
        headers={"Authorization": f"Basic {basic}"},
    )
    assert reply.status == 200


async def test_long_lived_refresh_tokens(session: aiohttp.ClientSession) -> None:
    sb, client = await open_sandbox(session, rotate_refresh_tokens=False)
    try:
        refresh = sb.refresh_token
        for _ in range(2):
            reply = await client.refresh(refresh)
            assert reply.status == 200
            assert reply.json()["refresh_token"] == refresh
    finally:
        await sb.stop()


async def test_access_tokens_expire(session: aiohttp.ClientSession) -> None:
    sb, client = await open_sandbox(session, access_token_ttl=0.3)
    try:
        old = sb.access_token
        assert (await client.event(ACTIVE)).status == 200
        await asyncio.sleep(0.15)
        reply = await client.refresh(sb.refresh_token)
        assert reply.json()["expires_in"] == 1
        new = reply.json()["access_token"]
        await asyncio.sleep(0.2)  # old is 0.35 s old, new 0.2 s
        expired = await client.event(ACTIVE, old)
        assert (expired.status, expired.error_key) == (401, "unauthorized")
        assert (await client.event(ACTIVE, new)).status == 200
    finally:
        await sb.stop()


# --- /_sandbox ------------------------------------------------------------------------------


async def test_sandbox_state_and_tickets(client: Client) -> None:
    await client.keys(ACTIVE, ["000123"])
    await client.keys(ACTIVE, ["nope"])
    state = (await client.request("GET", f"{client.root}/_sandbox/state")).json()
    assert state["counters"]["total"] == 2
    assert state["counters"]["by_status"] == {"204": 1, "404": 1}
    assert state["counters"]["accepted"] == 2
    assert state["events"][ACTIVE] == {
        "name": "Spring Partner Workshop",
        "status": "ACTIVE",
        "tickets": 5,
        "checked_in": 3,
    }
    assert state["undo_counts"] == {"distinct_tickets": 1, "total": 1, "max_per_ticket": 1}
    assert state["settings"]["rate"] is None
    assert state["faults"]["drop"] == 0.0
    assert client.sb.access_token not in json.dumps(state)

    tickets = await client.request("GET", f"{client.root}/_sandbox/tickets/{ACTIVE}")
    assert tickets.json() == {
        "000123": False,
        "123": True,
        "a1b2c3d4e5f6": True,
        "123456": True,
        "0058085012": False,
    }
    missing = await client.request("GET", f"{client.root}/_sandbox/tickets/{UNKNOWN}")
    assert missing.status == 404

    recorded = await client.request("GET", f"{client.root}/_sandbox/requests?since=1&keys=1")
    assert recorded.json()["total"] == 2
    [second] = recorded.json()["requests"]
    assert (second["status"], second["keys"], second["applied"]) == (404, ["nope"], False)
    assert second["at"] == client.sb.requests[1].at


async def test_recording_can_be_turned_off(session: aiohttp.ClientSession) -> None:
    sb = Sandbox(make_world(), SandboxSettings(rate=None), record_requests=False)
    async with sb:
        assert (await Client(sb, session).keys(ACTIVE, ["000123"])).status == 204
    assert sb.requests == []
    assert (sb.counters.total, sb.undo_counts[(ACTIVE, "000123")]) == (1, 1)


async def test_sandbox_faults_endpoint(client: Client) -> None:
    url = f"{client.root}/_sandbox/faults"
    reply = await client.request("POST", url, json={"error_500": 1})
    assert reply.status == 200
    assert reply.json()["error_500"] == 1.0
    assert client.sb.faults.error_500 == 1.0
    assert (await client.event(ACTIVE)).status == 500
    for bad in ({"error_500": 2}, {"nonsense": 0.1}, {"drop": "lots"}, [1]):
        assert (await client.request("POST", url, json=bad)).status == 400
    assert client.sb.faults.error_500 == 1.0  # a refused change leaves everything as it was
    await client.request("POST", url, json={"error_500": 0})
    assert (await client.event(ACTIVE)).status == 200


async def test_sandbox_settings_and_quota_reset_endpoints(client: Client) -> None:
    url = f"{client.root}/_sandbox/settings"
    reply = await client.request("POST", url, json={"daily_quota": 1, "rate": None})
    assert reply.status == 200
    assert reply.json()["daily_quota"] == 1
    assert (await client.event(ACTIVE)).status == 200
    assert (await client.event(ACTIVE)).error_key == "quota_exceeded"
    assert (await client.request("POST", f"{client.root}/_sandbox/reset_quota")).status == 200
    assert (await client.event(ACTIVE)).status == 200
    for bad in ({"rate": 0}, {"burst": 0.5}, {"seed": 3}, {"daily_quota": 1.5}):
        assert (await client.request("POST", url, json=bad)).status == 400, bad
    await client.request("POST", url, json={"rate": 1.0, "daily_quota": None})
    assert [(await client.event(ACTIVE)).status for _ in range(2)] == [200, 429]


# --- World ----------------------------------------------------------------------------------


def test_generate_is_deterministic_and_realistic() -> None:
    world = World.generate(
        4, 300, seed=7, checked_in_share=0.5, statuses=["ACTIVE", "COMPLETE", "DRAFT"]
    )
    assert (
        world.to_dict()
        == World.generate(
            4, 300, seed=7, checked_in_share=0.5, statuses=["ACTIVE", "COMPLETE", "DRAFT"]
        ).to_dict()
    )
    assert world.to_dict() != World.generate(4, 300, seed=8).to_dict()
    assert [e.status for e in world.events.values()] == ["ACTIVE", "COMPLETE", "DRAFT", "ACTIVE"]
    for event_id, event in world.events.items():
        assert uuid.UUID(event_id).version == 4
        assert str(uuid.UUID(event_id)) == event_id
        assert len(event.tickets) == 300
        assert world.checked_in_count(event_id) == 150
        assert event.name
    keys = [k for e in world.events.values() for k in e.tickets]
    assert any(k.startswith("00") and k.isdigit() for k in keys)
    assert any(k.isdigit() and not k.startswith("0") for k in keys)
    assert any(not k.isdigit() for k in keys)


def test_world_json_round_trip(tmp_path: Path) -> None:
    world = make_world()
    path = tmp_path / "world.json"
    world.to_json(path)
    assert World.from_json(path) == world
    assert json.loads(path.read_text())["events"][ACTIVE]["tickets"]["000123"] is True


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"events": []},
        {"events": {"x": {"status": "LIVE", "tickets": {}}}},
        {"events": {"x": {"status": "ACTIVE", "tickets": {"k": "yes"}}}},
    ],
)
def test_world_rejects_malformed_files(data: Any) -> None:
    with pytest.raises(ValueError):
        World.from_dict(data)


def test_checked_in_raises_for_unknown_keys() -> None:
    with pytest.raises(KeyError):
        make_world().checked_in(ACTIVE, "nope")


# --- command line ---------------------------------------------------------------------------


def test_cli_arguments_build_the_sandbox() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", default="parent")  # a parent option of the same name
    sub = parser.add_subparsers(dest="command")
    add_sandbox_arguments(sub.add_parser("sandbox"))
    args = parser.parse_args(
        [
            "sandbox",
            "--rate",
            "none",
            "--quota",
            "5",
            "--drop",
            "0.25",
            "--events",
            "2",
            "--tickets-per-event",
            "10",
            "--seed",
            "3",
            "--token",
            "tok",
            "--max-keys",
            "50",
        ]
    )
    assert args.seed == "parent"
    sb = _sandbox_from_args(args)
    assert (sb.settings.rate, sb.settings.daily_quota, sb.settings.seed) == (None, 5, 3)
    assert sb.settings.max_keys_per_request == 50
    assert sb.faults.drop == 0.25
    assert sb.access_token == "tok"
    assert len(sb.world.events) == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["sandbox", "--drop", "1.5"])


async def test_command_runs_until_sigterm(session: aiohttp.ClientSession) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchjob.sandbox",
        "--port",
        "0",
        "--rate",
        "none",
        "--events",
        "1",
        "--tickets-per-event",
        "5",
        "--seed",
        "3",
        "--token-ttl",
        "600",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=20)
        info = json.loads(line)
        assert set(info) == {"base_url", "token_url", "access_token", "refresh_token", "client_id"}
        event_id = next(iter(World.generate(1, 5, seed=3).events))
        async with session.get(
            f"{info['base_url']}/events/{event_id}",
            headers={"Authorization": f"Bearer {info['access_token']}"},
        ) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
        err = (await proc.stderr.read()).decode()
        assert info["base_url"] in err
        assert info["access_token"] not in err
        assert info["refresh_token"] not in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- sample data ----------------------------------------------------------------------------


def _load_make_samples() -> Any:
    spec = importlib.util.spec_from_file_location("make_samples", SAMPLES / "make_samples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_sample_files_are_what_make_samples_writes(tmp_path: Path) -> None:
    make_samples = _load_make_samples()
    make_samples.write_samples(tmp_path)
    for name in (
        "sandbox_world.json",
        "registrants-export.csv",
        "door-scans-eu.csv",
        "door-scans.xlsx",
    ):
        assert (tmp_path / name).read_bytes() == (SAMPLES / name).read_bytes(), name


def test_sample_data_is_consistent_with_the_world() -> None:
    world = World.from_json(SAMPLES / "sandbox_world.json")
    statuses = sorted(e.status for e in world.events.values())
    assert statuses == ["ACTIVE", "COMPLETE", "DRAFT"]
    draft = next(i for i, e in world.events.items() if e.status == "DRAFT")

    text = (SAMPLES / "registrants-export.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["Event ID", "Order Ticket Key", "First Name", "Last Name", "Email"]
    assert 55 <= len(rows) <= 65
    pairs = [(r["Event ID"], r["Order Ticket Key"]) for r in rows]
    assert len(pairs) - len(set(pairs)) == 1  # one duplicate row
    assert sum(1 for _, k in pairs if k == "") == 1
    not_uuid = [e for e, _ in pairs if e not in world.events]
    assert len(not_uuid) == 1
    with pytest.raises(ValueError):
        uuid.UUID(not_uuid[0])
    unknown = [
        (e, k) for e, k in pairs if e in world.events and k and k not in world.events[e].tickets
    ]
    assert len(unknown) == 1
    assert sum(1 for e, _ in pairs if e == draft) >= 3
    assert any(k.startswith("00") for _, k in pairs)

    raw = (SAMPLES / "door-scans-eu.csv").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    eu = list(csv.DictReader(io.StringIO(raw.decode("cp1252")), delimiter=";"))
    assert list(eu[0]) == ["event_id", "ticket_key", "scanned_at", "gate"]
    assert 15 <= len(eu) <= 25
    assert all(world.checked_in(r["event_id"], r["ticket_key"]) for r in eu)
    assert any(r["ticket_key"].startswith("00") for r in eu)

    openpyxl = pytest.importorskip("openpyxl")
    book = openpyxl.load_workbook(SAMPLES / "door-scans.xlsx", read_only=True)
    assert len(book.sheetnames) == 3 and "Notes" in book.sheetnames
    numeric = 0
    for name in book.sheetnames:
        rows_x = list(book[name].iter_rows(values_only=True))
        if name == "Notes":
            assert "Ticket Key" not in rows_x[0]
            continue
        header = list(rows_x[0])
        e_col, k_col = header.index("Event ID"), header.index("Ticket Key")
        for row in rows_x[1:]:
            key = row[k_col]
            if isinstance(key, int):
                numeric += 1
                key = str(key)
            assert world.checked_in(str(row[e_col]), str(key))
    book.close()
    assert numeric >= 3
