"""Unattended tokens: the token file, refreshes (once, stored first) and ``batchjob auth``.

Against the real sandbox over loopback where it can; a tiny aiohttp app stands in where the
sandbox lacks something (the authorization_code grant, 5xx from the token endpoint).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web

from batchjob._auth import parse_redirect, run_auth_command
from batchjob._cli import _run as cli_run
from batchjob._cli import add_auth_arguments
from batchjob._cli import main as cli_main
from batchjob._config import JobConfig
from batchjob._errors import ConfigError, TokenError, TokenSaveError
from batchjob._logging import MAX_SERVER_TEXT
from batchjob._tokens import (
    FileTokenSource,
    Secret,
    StaticToken,
    TokenSet,
    default_token_session,
    find_rescued_tokens,
    read_token_file,
    rescue_tokens,
    token_source_from_env,
)
from batchjob.sandbox import Sandbox, SandboxSettings, World
from tests.chaos_support import cli, cli_env, finish
from tests.support import ticket_rows, write_csv

FAST_RETRY = (0.01, 0.01)
KEY_HEADER = ("event_id", "order_ticket_key")
HOUR = 3600.0


# --- helpers ----------------------------------------------------------------------------------


def settings(ttl: float | None = None) -> SandboxSettings:
    return SandboxSettings(rate=None, daily_quota=None, access_token_ttl=ttl, seed=1)


def write_raw(path: Path, **fields: Any) -> Path:
    path.write_text(json.dumps(fields), encoding="utf-8")
    return path


def token_file(path: Path, sb: Sandbox, *, access: str | None = None, expires_at: Any) -> Path:
    return write_raw(
        path,
        access_token=sb.access_token if access is None else access,
        refresh_token=sb.refresh_token,
        expires_at=expires_at,
    )


def source(path: Path, sb: Sandbox, **kwargs: Any) -> FileTokenSource:
    kwargs.setdefault("retry_waits", FAST_RETRY)
    return FileTokenSource(path, sb.client_id, token_url=sb.token_url, **kwargs)


def temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def no_temp_files(directory: Path) -> bool:
    return not temp_files(directory)


def rescued_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if ".rescued-" in p.name]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def get_event(
    session: aiohttp.ClientSession, sb: Sandbox, event_id: str, tokens: FileTokenSource
) -> int:
    """What ApiClient._send does with a token source: token(), and one refresh after a 401."""

    async def once(token: str) -> int:
        headers = {"Authorization": f"Bearer {token}"}
        async with session.get(f"{sb.base_url}/events/{event_id}", headers=headers) as resp:
            await resp.read()
            return resp.status

    token = await tokens.token()
    status = await once(token)
    if status == 401:
        status = await once(await tokens.refresh(token))
    return status


async def refresh_directly(sb: Sandbox, refresh_token: str) -> tuple[int, dict[str, Any]]:
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    form["client_id"] = sb.client_id
    async with (
        aiohttp.ClientSession() as session,
        session.post(sb.token_url, data=form) as resp,
    ):
        return resp.status, await resp.json()


def refuse_new_pair(problem: OSError) -> Callable[[Any, Any], None]:
    """An os.replace that fails once a refresh has answered: for a new pair, not for the
    token file's own bytes, which a refresh renames over it first to prove it can."""
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(dst).exists() and Path(src).read_bytes() != Path(dst).read_bytes():
            raise problem
        real_replace(src, dst)

    return replace


def assert_no_tokens(text: str, *tokens: str) -> None:
    for token in tokens:
        assert token not in text


@pytest.fixture
def event_id(world: World) -> str:
    return next(iter(world.events))


@asynccontextmanager
async def token_server(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """A stand-in token endpoint on loopback; yields its URL."""
    app = web.Application()
    app.router.add_post("/oauth2/default/v1/token", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/oauth2/default/v1/token"
    finally:
        await runner.cleanup()


def token_answer(access: str, refresh: str, expires_in: int = 86_400) -> web.Response:
    return web.json_response(
        {
            "access_token": access,
            "refresh_token": refresh,
            "token_type": "Bearer",
            "expires_in": expires_in,
        }
    )


# --- refresh before expiry --------------------------------------------------------------------


async def test_refresh_before_expiry_stores_rotated_pair_first(
    tmp_path: Path, world: World, event_id: str
) -> None:
    async with Sandbox(world, settings(ttl=HOUR)) as sb:
        first_access, first_refresh = sb.access_token, sb.refresh_token
        path = token_file(tmp_path / "cc-token.json", sb, expires_at=time.time() + 60)
        learned: list[str] = []
        on_disk_when_returned: list[TokenSet] = []
        async with source(path, sb, on_new_secret=learned.append) as tokens:
            new_access = await tokens.token()
            # token() has returned, nothing has used the new token yet: it must already be
            # stored together with the rotated refresh token.
            on_disk_when_returned.append(read_token_file(path))
            assert sb.counters.token_requests == 1
            assert new_access != first_access
            assert new_access == sb.access_token
            stored = on_disk_when_returned[0]
            assert stored.refresh_token.value == sb.refresh_token != first_refresh
            assert stored.access_token == Secret(new_access)
            assert stored.expires_at is not None
            assert abs(stored.expires_at - (time.time() + HOUR)) < 5
            assert mode(path) == 0o600
            assert no_temp_files(tmp_path)
            raw = json.loads(path.read_text())
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", raw["expires_at"])

            # The new token works, and a fresh one is not refreshed again.
            async with aiohttp.ClientSession() as session:
                assert await get_event(session, sb, event_id, tokens) == 200
            assert await tokens.token() == new_access
            assert sb.counters.token_requests == 1

            # The redactor heard of every token, the new ones included.
            assert {first_access, first_refresh, new_access, sb.refresh_token} <= set(learned)
            assert set(tokens.secrets()) == set(learned)

        # Rotation: the refresh token that was used is spent.
        status, body = await refresh_directly(sb, first_refresh)
        assert (status, body["error"]) == (400, "invalid_grant")


async def test_fresh_token_is_used_without_refreshing(tmp_path: Path, world: World) -> None:
    async with Sandbox(world, settings()) as sb:
        expires = "2999-01-01T00:00:00+00:00"
        path = token_file(tmp_path / "t.json", sb, expires_at=expires)
        async with source(path, sb) as tokens:
            assert await tokens.token() == sb.access_token
        assert sb.counters.token_requests == 0


async def test_file_without_access_token_refreshes_on_first_use(
    tmp_path: Path, world: World
) -> None:
    async with Sandbox(world, settings()) as sb:
        path = write_raw(tmp_path / "t.json", refresh_token=sb.refresh_token)
        async with source(path, sb) as tokens:
            assert await tokens.token() == sb.access_token
        assert read_token_file(path).refresh_token.value == sb.refresh_token
        assert sb.counters.token_requests == 1


async def test_short_lived_tokens_do_not_refresh_on_every_call(
    tmp_path: Path, world: World
) -> None:
    # expires_in (60 s) is below the 300 s margin: refresh at half the lifetime instead.
    async with Sandbox(world, settings(ttl=60)) as sb:
        path = write_raw(tmp_path / "t.json", refresh_token=sb.refresh_token)
        async with source(path, sb) as tokens:
            first = await tokens.token()
            assert await tokens.token() == first
        assert sb.counters.token_requests == 1


# --- after a 401 ------------------------------------------------------------------------------


async def test_401_with_ten_concurrent_callers_refreshes_once(
    tmp_path: Path, world: World, event_id: str
) -> None:
    async with Sandbox(world, settings()) as sb:
        # The file's access token looks fresh but the server no longer knows it.
        path = token_file(tmp_path / "t.json", sb, access="revoked-access", expires_at=2e9)
        async with source(path, sb) as tokens, aiohttp.ClientSession() as session:
            statuses = await asyncio.gather(
                *(get_event(session, sb, event_id, tokens) for _ in range(10))
            )
            assert statuses == [200] * 10
            assert sb.counters.token_requests == 1
            assert tokens.refreshes == 1
            assert read_token_file(path).refresh_token.value == sb.refresh_token


async def test_refresh_after_another_task_refreshed_returns_its_token(
    tmp_path: Path, world: World
) -> None:
    async with Sandbox(world, settings()) as sb:
        path = token_file(tmp_path / "t.json", sb, access="old", expires_at=2e9)
        async with source(path, sb) as tokens:
            new = await tokens.refresh("old")
            assert await tokens.refresh("old") == new  # a late caller with the old token
            assert sb.counters.token_requests == 1
            await tokens.refresh(new)  # the new one rejected too: that is a new refresh
            assert sb.counters.token_requests == 2


# --- two processes ----------------------------------------------------------------------------


async def test_two_sources_on_one_file_refresh_once(tmp_path: Path, world: World) -> None:
    async with Sandbox(world, settings(ttl=HOUR)) as sb:
        path = token_file(tmp_path / "t.json", sb, expires_at=time.time() + 10)
        async with source(path, sb) as a, source(path, sb) as b:
            got = await asyncio.gather(*(s.token() for s in (a, b, a, b, a, b)))
            assert len(set(got)) == 1
            assert sb.counters.token_requests == 1
            assert a.refreshes + b.refreshes == 1

            # Both later get a 401 on that token: still one refresh between them.
            rejected = got[0]
            again = await asyncio.gather(a.refresh(rejected), b.refresh(rejected))
            assert again[0] == again[1] != rejected
            assert sb.counters.token_requests == 2
        assert read_token_file(path).refresh_token.value == sb.refresh_token


@contextmanager
def held_lock(path: Path) -> Iterator[None]:
    """The lock another batchjob process would hold while it refreshes."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


async def test_waits_for_another_process_and_uses_what_it_stored(
    tmp_path: Path, world: World
) -> None:
    async with Sandbox(world, settings(ttl=HOUR)) as sb:
        path = token_file(tmp_path / "t.json", sb, expires_at=time.time() + 10)
        spent_refresh = sb.refresh_token
        async with source(path, sb) as tokens:
            with held_lock(path):
                waiting = asyncio.ensure_future(tokens.token())
                await asyncio.sleep(0.05)
                assert not waiting.done()
                # The other process refreshes (rotating the token this source has in memory)
                # and stores the new pair before it lets go of the lock.
                status, body = await refresh_directly(sb, spent_refresh)
                assert status == 200
                write_raw(
                    path,
                    access_token=body["access_token"],
                    refresh_token=body["refresh_token"],
                    expires_at=time.time() + HOUR,
                )
            assert await waiting == body["access_token"]
            assert sb.counters.token_requests == 1  # only the other process's
            assert tokens.refreshes == 0


# --- failures ---------------------------------------------------------------------------------


async def test_invalid_grant_says_what_to_do_and_shows_no_token(
    tmp_path: Path, world: World
) -> None:
    async with Sandbox(world, settings()) as sb:
        path = token_file(tmp_path / "t.json", sb, expires_at=time.time())
        before = path.read_bytes()
        all_tokens = (sb.access_token, sb.refresh_token)
        sb.revoke_tokens()
        async with source(path, sb) as tokens:
            with pytest.raises(TokenError) as caught:
                await tokens.token()
            message = str(caught.value)
            assert "invalid_grant" in message
            assert "batchjob auth" in message
            assert str(path) in message
            assert_no_tokens(message + repr(caught.value) + repr(tokens), *all_tokens)
            # The failure sticks: other callers do not hammer the token endpoint.
            with pytest.raises(TokenError):
                await tokens.refresh(sb.access_token)
            assert sb.counters.token_requests == 1
        assert path.read_bytes() == before


async def test_wrong_client_id_is_reported(tmp_path: Path, world: World) -> None:
    async with Sandbox(world, settings()) as sb:
        path = token_file(tmp_path / "t.json", sb, expires_at=0)
        tokens = FileTokenSource(
            path, "someone-else", token_url=sb.token_url, retry_waits=FAST_RETRY
        )
        async with tokens:
            with pytest.raises(TokenError, match=r"invalid_client.*CC_CLIENT_ID"):
                await tokens.token()


async def test_transient_failures_are_retried(tmp_path: Path) -> None:
    calls: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        calls.append(request.method)
        if len(calls) < 3:
            return web.Response(status=503, text="<html>busy</html>")
        return token_answer("new-access", "new-refresh")

    path = write_raw(tmp_path / "t.json", refresh_token="r0", access_token="a0", expires_at=0)
    async with (
        token_server(handler) as url,
        FileTokenSource(path, "cid", token_url=url, retry_waits=FAST_RETRY) as tokens,
    ):
        assert await tokens.token() == "new-access"
    assert len(calls) == 3
    assert read_token_file(path).refresh_token.value == "new-refresh"


async def test_persistent_5xx_gives_up_and_keeps_the_file(tmp_path: Path) -> None:
    calls = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        return web.Response(status=500)

    path = write_raw(tmp_path / "t.json", refresh_token="r0-secret", expires_at=None)
    before = path.read_bytes()
    async with (
        token_server(handler) as url,
        FileTokenSource(path, "cid", token_url=url, retry_waits=FAST_RETRY) as tokens,
    ):
        with pytest.raises(TokenError, match="failed 3 times") as caught:
            await tokens.token()
    assert calls == 3
    assert "r0-secret" not in str(caught.value)
    assert path.read_bytes() == before


async def test_unreachable_token_endpoint(tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response()

    async with token_server(handler) as url:
        pass  # the port is closed again: connections are refused
    path = write_raw(tmp_path / "t.json", refresh_token="r0", expires_at=None)
    async with FileTokenSource(path, "cid", token_url=url, retry_waits=FAST_RETRY) as tokens:
        with pytest.raises(TokenError, match="no answer"):
            await tokens.token()


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class RecordingLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.events.append(("info", event, fields))

    def warning(self, event: str, **fields: Any) -> None:
        self.events.append(("warning", event, fields))


async def test_a_token_endpoint_s_huge_error_is_cut_in_the_log(tmp_path: Path) -> None:
    """The endpoint's text goes into the token.refresh_failed line: at most the length every
    other server text is kept to, not the 256 KiB a hostile endpoint may send."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = {"error": "invalid_request", "error_description": "x" * 200_000}
        return web.json_response(body, status=400)

    clock, log = Clock(), RecordingLog()
    path = write_raw(
        tmp_path / "t.json", access_token="a0", refresh_token="r0", expires_at=clock.now + 120
    )
    async with (
        token_server(handler) as url,
        FileTokenSource(
            path, "cid", token_url=url, clock=clock, retry_waits=FAST_RETRY, log=log
        ) as tokens,
    ):
        assert await tokens.token() == "a0"
    [(level, event, fields)] = log.events
    assert (level, event) == ("warning", "token.refresh_failed")
    assert len(fields["error"]) <= MAX_SERVER_TEXT


async def test_failed_refresh_before_expiry_keeps_using_the_current_token(
    tmp_path: Path,
) -> None:
    calls = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        return web.Response(status=503)

    clock, log = Clock(), RecordingLog()
    path = write_raw(
        tmp_path / "t.json", access_token="a0", refresh_token="r0", expires_at=clock.now + 120
    )
    async with (
        token_server(handler) as url,
        FileTokenSource(
            path, "cid", token_url=url, clock=clock, retry_waits=FAST_RETRY, log=log
        ) as tokens,
    ):
        assert await tokens.token() == "a0"  # within the margin: refresh failed, token still good
        assert calls == 3
        assert tokens.last_error is not None
        assert [e[:2] for e in log.events] == [("warning", "token.refresh_failed")]
        assert await tokens.token() == "a0"
        assert calls == 3  # no new attempt during the holdoff
        clock.now += 31
        assert await tokens.token() == "a0"
        assert calls == 6
        clock.now += 120  # expired now
        with pytest.raises(TokenError, match="failed 3 times"):
            await tokens.token()
    assert_no_tokens(repr(log.events), "a0", "r0")


async def test_refresh_is_logged_without_tokens(tmp_path: Path, world: World) -> None:
    log = RecordingLog()
    async with Sandbox(world, settings(ttl=HOUR)) as sb:
        path = token_file(tmp_path / "t.json", sb, expires_at=0)
        old = (sb.access_token, sb.refresh_token)
        async with source(path, sb, log=log) as tokens:
            await tokens.token()
        assert [e[:2] for e in log.events] == [("info", "token.refreshed")]
        assert_no_tokens(repr(log.events), *old, sb.access_token, sb.refresh_token)


async def test_client_secret_goes_in_basic_auth(tmp_path: Path, world: World) -> None:
    seen: list[tuple[str, dict[str, str]]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        form = await request.post()
        seen.append(
            (request.headers.get("Authorization", ""), {k: str(v) for k, v in form.items()})
        )
        return token_answer("a1", "r1")

    path = write_raw(tmp_path / "t.json", refresh_token="r0", expires_at=None)
    async with (
        token_server(handler) as url,
        FileTokenSource(path, "my:id", client_secret=Secret("s3cr/et"), token_url=url) as tokens,
    ):
        assert await tokens.token() == "a1"
        assert "s3cr/et" in tokens.secrets()
    header, form = seen[0]
    assert header == "Basic " + base64.b64encode(b"my%3Aid:s3cr%2Fet").decode()
    assert form == {"grant_type": "refresh_token", "refresh_token": "r0"}

    # The sandbox takes the client id from Basic auth too.
    async with Sandbox(world, settings()) as sb:
        path = token_file(tmp_path / "s.json", sb, expires_at=0)
        async with FileTokenSource(
            path, sb.client_id, client_secret=Secret("x"), token_url=sb.token_url
        ) as tokens:
            assert await tokens.token() == sb.access_token


async def test_failed_save_keeps_the_new_pair_next_to_the_file_and_stops(
    tmp_path: Path, world: World, monkeypatch: pytest.MonkeyPatch, event_id: str
) -> None:
    # Disk full just as the answer arrives: the refresh token in the file is spent, so the new
    # pair must land somewhere the user can find it, and the run must stop and say where.
    refuse = refuse_new_pair(OSError(28, "No space left on device"))

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    async with Sandbox(world, settings(ttl=HOUR)) as sb:
        spent = sb.refresh_token
        # Still good for 60 s, but within the refresh margin: a refresh is due.
        path = token_file(tmp_path / "t.json", sb, expires_at=time.time() + 60)
        before = path.read_bytes()
        log = RecordingLog()
        with monkeypatch.context() as patch:
            patch.setattr("batchjob._tokens.os.replace", refuse)
            async with source(path, sb, log=log) as tokens:
                with pytest.raises(TokenSaveError, match="No space left") as caught:
                    await tokens.token()  # not the still-valid token: the run stops
                with pytest.raises(TokenSaveError):
                    await tokens.refresh(sb.access_token)
        assert sb.counters.token_requests == 1
        message = str(caught.value)
        assert_no_tokens(message + repr(log.events), sb.access_token, sb.refresh_token, spent)
        assert path.read_bytes() == before
        assert no_temp_files(tmp_path)
        (rescued,) = rescued_files(tmp_path)
        assert f"mv {rescued} {path}" in message
        assert mode(rescued) == 0o600
        assert read_token_file(rescued).refresh_token.value == sb.refresh_token

        # Doing what the message says gets the next run going.
        rescued.replace(path)
        async with source(path, sb) as tokens, aiohttp.ClientSession() as session:
            assert await get_event(session, sb, event_id, tokens) == 200
        assert sb.counters.token_requests == 1


async def test_cancelled_caller_does_not_lose_the_rotated_token(tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.2)
        return token_answer("a1", "r1")

    path = write_raw(tmp_path / "t.json", refresh_token="r0", expires_at=0)
    async with token_server(handler) as url:
        tokens = FileTokenSource(path, "cid", token_url=url)
        caller = asyncio.ensure_future(tokens.token())
        await asyncio.sleep(0.05)
        caller.cancel()  # SIGINT while the refresh is in flight
        with pytest.raises(asyncio.CancelledError):
            await caller
        await tokens.close()  # waits for the refresh to store what it got
    assert read_token_file(path).refresh_token.value == "r1"


# --- the token file ---------------------------------------------------------------------------


async def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.json"
    async with FileTokenSource(path, "cid") as tokens:
        with pytest.raises(TokenError, match=re.escape(str(path)) + ".*not found"):
            await tokens.token()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"refresh_token": "sekrit-value", ', "not valid JSON"),
        ('["sekrit-value"]', "JSON object"),
        ('{"access_token": "sekrit-value"}', "no refresh_token"),
        ('{"refresh_token": 7}', "no refresh_token"),
        ('{"refresh_token": "r", "access_token": ["sekrit-value"]}', "access_token"),
        ('{"refresh_token": "sekrit-value", "expires_at": "soon"}', "expires_at"),
        ('{"refresh_token": "sekrit-value", "expires_at": true}', "expires_at"),
    ],
)
def test_malformed_file_names_the_problem_not_the_content(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(TokenError, match=problem) as caught:
        read_token_file(path)
    assert str(path) in str(caught.value)
    assert "sekrit" not in str(caught.value)


@pytest.mark.parametrize(
    ("expires_at", "epoch"),
    [
        (1_767_225_600, 1_767_225_600.0),
        (1_767_225_600.5, 1_767_225_600.5),
        ("1767225600", 1_767_225_600.0),
        ("2026-01-01T00:00:00Z", 1_767_225_600.0),
        ("2026-01-01T01:00:00+01:00", 1_767_225_600.0),
        ("2026-01-01T00:00:00", 1_767_225_600.0),  # no offset: UTC
        (None, None),
    ],
)
def test_expires_at_accepts_epoch_and_iso(tmp_path: Path, expires_at: Any, epoch: Any) -> None:
    path = write_raw(tmp_path / "t.json", refresh_token="r", expires_at=expires_at)
    assert read_token_file(path).expires_at == epoch


def test_token_set_repr_shows_no_token() -> None:
    tokens = TokenSet(Secret("refresh-value"), Secret("access-value"), 1.0)
    assert_no_tokens(repr(tokens) + str(tokens), "refresh-value", "access-value")


def test_token_url_must_be_https_or_loopback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="https"):
        FileTokenSource(tmp_path / "t.json", "cid", token_url="http://authz.example.com/token")
    FileTokenSource(tmp_path / "t.json", "cid", token_url="http://127.0.0.1:9/token")


# --- choosing a source ------------------------------------------------------------------------


async def test_source_from_env(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "t.json", refresh_token="r", access_token="a", expires_at=2e9)
    config = JobConfig(token_file=path, client_id="cid")
    learned: list[str] = []

    static = token_source_from_env(
        config, {"CC_ACCESS_TOKEN": " tok "}, on_new_secret=learned.append
    )
    assert isinstance(static, StaticToken)
    assert await static.token() == "tok"
    await static.close()
    assert learned == ["tok"]

    assert token_source_from_env(JobConfig(), {}) is None

    from_file = token_source_from_env(config, {}, on_new_secret=learned.append)
    assert isinstance(from_file, FileTokenSource)
    assert set(learned) >= {"a", "r"}  # read when the source was made, before any log line
    assert await from_file.token() == "a"
    await from_file.close()

    env = {"CC_TOKEN_FILE": str(path), "CC_CLIENT_ID": "cid", "CC_CLIENT_SECRET": "shh"}
    from_env = token_source_from_env(JobConfig(), env)
    assert isinstance(from_env, FileTokenSource)
    assert from_env.path == path
    assert "shh" in from_env.secrets()
    await from_env.close()


def test_source_from_env_problems(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    with pytest.raises(TokenError, match="CC_CLIENT_ID"):
        token_source_from_env(JobConfig(token_file=path), {})
    with pytest.raises(TokenError, match=re.escape(str(path)) + ".*not found"):
        token_source_from_env(JobConfig(token_file=path, client_id="cid"), {})


@pytest.mark.parametrize("token", ["abc\ndef", "abc\x01def", "abc def", "abcdéf"])
async def test_an_access_token_no_server_could_have_issued_stops_the_run_before_it_starts(
    tmp_path: Path, token: str
) -> None:
    """A newline would make aiohttp refuse the header mid-run (exit 3 'internal error'); an
    odd byte could come back escaped in a server's echo, a form the redactor does not know."""
    event = "07216444-4e3b-41ea-a3b8-5a418fce41f4"
    inputs = write_csv(tmp_path / "in.csv", [(event, "k")], ("event_id", "order_ticket_key"))
    env = cli_env(CC_ACCESS_TOKEN=token, CC_BASE_URL="http://127.0.0.1:9/v3")
    done = await cli("run", str(inputs), "--report", str(tmp_path / "r.csv"), env=env)
    assert done.code == 2, done.err
    assert "CC_ACCESS_TOKEN" in done.err
    assert token.strip() not in done.err + done.out


# --- batchjob auth ----------------------------------------------------------------------------


def auth_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="batchjob auth")
    add_auth_arguments(parser)
    return parser.parse_args(list(argv))


class BrowserUser:
    """stdin: reads the authorize URL the command printed and 'pastes' the redirect back."""

    def __init__(self, stdout: io.StringIO, make_redirect: Callable[[dict[str, str]], str]):
        self.stdout = stdout
        self.make_redirect = make_redirect
        self.authorize: dict[str, str] = {}

    def isatty(self) -> bool:
        return False

    def readline(self) -> str:
        url = re.search(r"https?://\S+/authorize\?\S+", self.stdout.getvalue())
        assert url is not None
        self.authorize = {k: v[0] for k, v in parse_qs(urlsplit(url.group()).query).items()}
        return self.make_redirect(self.authorize) + "\n"


async def test_auth_pkce_exchange_writes_the_token_file(tmp_path: Path) -> None:
    exchanges: list[dict[str, str]] = []
    challenges: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        form = {k: str(v) for k, v in (await request.post()).items()}
        exchanges.append(form)
        verifier = form.get("code_verifier", "").encode()
        s256 = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=").decode()
        if (
            form.get("grant_type") != "authorization_code"
            or form.get("code") != "the-code"
            or form.get("redirect_uri") != "https://localhost/cb"
            or form.get("client_id") != "cid"
            or s256 != challenges[0]
        ):
            return web.json_response({"error": "invalid_grant"}, status=400)
        return token_answer("pkce-access", "pkce-refresh", expires_in=86_400)

    def redirect(authorize: dict[str, str]) -> str:
        challenges.append(authorize["code_challenge"])
        return f"https://localhost/cb?code=the-code&state={authorize['state']}"

    path = tmp_path / "new-dir" / "cc-token.json"
    stdout, stderr = io.StringIO(), io.StringIO()
    stdin = BrowserUser(stdout, redirect)
    async with token_server(handler) as url:
        args = auth_args(
            "--client-id", "cid", "--token-file", str(path),
            "--token-url", url, "--redirect-uri", "https://localhost/cb",
        )  # fmt: skip
        code = await asyncio.to_thread(
            run_auth_command, args, stdin=stdin, stdout=stdout, stderr=stderr, environ={}
        )
    assert code == 0, stderr.getvalue()
    sent = stdin.authorize
    assert sent["scope"] == "campaign_data offline_access"
    assert sent["code_challenge_method"] == "S256"
    assert sent["response_type"] == "code"
    assert sent["client_id"] == "cid"
    assert len(exchanges) == 1
    stored = read_token_file(path)
    assert stored.refresh_token.value == "pkce-refresh"
    assert stored.access_token == Secret("pkce-access")
    assert stored.expires_at is not None and stored.expires_at > time.time() + 80_000
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    output = stdout.getvalue() + stderr.getvalue()
    assert "CC_TOKEN_FILE" in output
    assert_no_tokens(output, "pkce-access", "pkce-refresh", exchanges[0]["code_verifier"])


async def test_auth_refuses_a_redirect_from_another_attempt(tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        raise AssertionError("nothing may be exchanged")

    path = tmp_path / "t.json"
    stdout, stderr = io.StringIO(), io.StringIO()
    stdin = BrowserUser(stdout, lambda a: "https://localhost/?code=c&state=forged")
    async with token_server(handler) as url:
        args = auth_args("--client-id", "cid", "--token-file", str(path), "--token-url", url)
        code = await asyncio.to_thread(
            run_auth_command, args, stdin=stdin, stdout=stdout, stderr=stderr, environ={}
        )
    assert code == 1
    assert "state does not match" in stderr.getvalue()
    assert not path.exists()


def test_parse_redirect() -> None:
    assert parse_redirect("https://localhost/?code=abc&state=s\n", "s") == "abc"
    assert parse_redirect("  abc  ", "s") == "abc"
    with pytest.raises(TokenError, match="access_denied"):
        parse_redirect("https://localhost/?error=access_denied&state=s", "s")
    with pytest.raises(TokenError, match="no code"):
        parse_redirect("https://localhost/?state=s", "s")


async def test_auth_import_refresh_token(tmp_path: Path, world: World, event_id: str) -> None:
    async with Sandbox(world, settings(ttl=HOUR)) as sb:
        pasted = sb.refresh_token
        path = tmp_path / "t.json"
        stdout, stderr = io.StringIO(), io.StringIO()
        args = auth_args("--import-refresh-token", "--token-file", str(path))
        env = {"CC_CLIENT_ID": sb.client_id, "CC_TOKEN_URL": sb.token_url}
        code = await asyncio.to_thread(
            run_auth_command,
            args,
            stdin=io.StringIO(pasted + "\n"),
            stdout=stdout,
            stderr=stderr,
            environ=env,
        )
        assert code == 0, stderr.getvalue()
        stored = read_token_file(path)
        assert stored.refresh_token.value == sb.refresh_token != pasted  # rotated, stored
        assert mode(path) == 0o600
        assert_no_tokens(stdout.getvalue() + stderr.getvalue(), pasted, sb.refresh_token)

        # The file is ready for a run.
        async with source(path, sb) as tokens, aiohttp.ClientSession() as session:
            assert await get_event(session, sb, event_id, tokens) == 200
        assert sb.counters.token_requests == 1

        # The pasted token is spent now: importing it again fails, without echoing it.
        stderr = io.StringIO()
        code = await asyncio.to_thread(
            run_auth_command,
            args,
            stdin=io.StringIO(pasted),
            stdout=io.StringIO(),
            stderr=stderr,
            environ=env,
        )
        assert code == 1
        assert "invalid_grant" in stderr.getvalue()
        assert pasted not in stderr.getvalue()
        assert read_token_file(path) == stored


@pytest.mark.parametrize(
    ("argv", "environ", "problem"),
    [
        (("--token-file", "t.json"), {}, "--client-id"),
        (("--client-id", "cid"), {}, "--token-file"),
        (
            ("--client-id", "c", "--token-file", "t", "--token-url", "http://x.example/t"),
            {},
            "https",
        ),
    ],
)
def test_auth_usage_problems(argv: tuple[str, ...], environ: dict[str, str], problem: str) -> None:
    stderr = io.StringIO()
    code = run_auth_command(
        auth_args(*argv), stdin=io.StringIO(), stdout=io.StringIO(), stderr=stderr, environ=environ
    )
    assert code == 2
    assert problem in stderr.getvalue()


# --- a token file whose folder cannot take the new pair ---------------------------------------


def chattr(directory: Path, flag: str) -> bool:
    """Set or clear the immutable attribute: the one "read-only folder" that stops root too."""
    program = shutil.which("chattr")
    if program is None:
        return False
    done = subprocess.run([program, flag, str(directory)], capture_output=True, check=False)  # noqa: S603
    return done.returncode == 0


@contextmanager
def immutable(directory: Path) -> Iterator[None]:
    if not chattr(directory, "+i"):
        pytest.skip("chattr +i is not available here")
    try:
        yield
    finally:
        chattr(directory, "-i")


async def test_unwritable_folder_never_spends_the_refresh_token(
    tmp_path: Path, world: World
) -> None:
    folder = tmp_path / "tokens"
    folder.mkdir()
    async with Sandbox(world, settings()) as sb:
        path = token_file(folder / "t.json", sb, expires_at=0)
        (folder / "t.json.lock").touch()  # left by an earlier run
        before = path.read_bytes()
        with immutable(folder):
            async with source(path, sb) as tokens:
                with pytest.raises(TokenError, match="cannot write a new file in") as caught:
                    await tokens.token()
                with pytest.raises(TokenError, match="not used"):
                    tokens.check()  # what a run does before it starts
        assert sb.counters.token_requests == 0
        assert_no_tokens(str(caught.value), sb.access_token, sb.refresh_token)
        assert path.read_bytes() == before
        assert not list(folder.glob(".*tmp"))
        status, _ = await refresh_directly(sb, sb.refresh_token)
        assert status == 200  # still unspent


async def test_folder_refusing_new_files_is_found_before_the_refresh(
    tmp_path: Path, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same without chattr: only creating a file in the folder fails (a read-only mount).
    real_open = os.open

    def read_only_folder(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_EXCL and Path(file).parent == tmp_path:
            raise OSError(30, "Read-only file system")
        return real_open(file, flags, *args, **kwargs)

    async with Sandbox(world, settings()) as sb:
        path = token_file(tmp_path / "t.json", sb, expires_at=0)
        monkeypatch.setattr("batchjob._tokens.os.open", read_only_folder)
        async with source(path, sb) as tokens:
            with pytest.raises(TokenError, match=r"Read-only file system.*not used"):
                await tokens.token()
        assert sb.counters.token_requests == 0


async def test_a_run_refuses_an_unwritable_token_folder_before_sending(
    tmp_path: Path, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "tokens"
    folder.mkdir()
    async with Sandbox(world, settings()) as sb:
        # A token good for a day: the run would not even need a refresh, but its nightly
        # successor would, and could not save it.
        path = token_file(folder / "t.json", sb, expires_at=time.time() + 86_400)
        inputs = write_csv(tmp_path / "in.csv", ticket_rows(world)[:3], KEY_HEADER)
        monkeypatch.setenv("CC_TOKEN_FILE", str(path))
        monkeypatch.setenv("CC_CLIENT_ID", sb.client_id)
        argv = ["run", str(inputs), "--report", str(tmp_path / "r.csv"), "--base-url", sb.base_url]
        with immutable(folder):
            code = await asyncio.to_thread(cli_main, argv)
        assert code == 2
        assert sb.counters.total == 0 and sb.counters.token_requests == 0


async def test_save_failing_after_the_answer_rescues_the_pair(
    tmp_path: Path, world: World, monkeypatch: pytest.MonkeyPatch, event_id: str
) -> None:
    # The folder turns read-only while the refresh is on the wire: proven writable before,
    # refused after. The new pair goes to the state folder; the next run points at it.
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    folder = tmp_path / "tokens"
    folder.mkdir()
    if not chattr(folder, "-i"):
        pytest.skip("chattr is not available here")
    async with Sandbox(world, settings()) as sb:

        async def lock_folder_then_answer(request: web.Request) -> web.StreamResponse:
            form = {k: str(v) for k, v in (await request.post()).items()}
            async with aiohttp.ClientSession() as s, s.post(sb.token_url, data=form) as resp:
                status, body = resp.status, await resp.read()
            assert chattr(folder, "+i")
            return web.Response(status=status, body=body, content_type="application/json")

        spent = sb.refresh_token
        path = token_file(folder / "t.json", sb, expires_at=0)
        before = path.read_bytes()
        try:
            async with (
                token_server(lock_folder_then_answer) as url,
                FileTokenSource(path, sb.client_id, token_url=url) as tokens,
            ):
                with pytest.raises(TokenSaveError) as caught:
                    await tokens.token()
        finally:
            chattr(folder, "-i")
        assert path.read_bytes() == before
        (rescued,) = rescued_files(tmp_path / "state" / "batchjob")
        message = str(caught.value)
        assert str(rescued) in message and "spent" in message
        assert_no_tokens(message, spent, sb.refresh_token, sb.access_token)
        assert mode(rescued) == 0o600
        assert read_token_file(rescued).refresh_token.value == sb.refresh_token
        # The read-only folder also kept the temporary file holding the pair: the next run
        # would put it in place (see test_left_temporary_files_are_put_in_place_...). Without
        # it, the next run finds the spent token refused, and is told where the good one is.
        (left,) = temp_files(folder)
        assert sb.refresh_token.encode() in left.read_bytes()
        left.unlink()
        async with source(path, sb) as tokens:
            with pytest.raises(TokenError, match="invalid_grant") as refused:
                await tokens.token()
        assert f"mv {rescued} {path}" in str(refused.value)
        rescued.replace(path)
        async with source(path, sb) as tokens, aiohttp.ClientSession() as session:
            assert await get_event(session, sb, event_id, tokens) == 200


async def test_pair_that_fits_nowhere_says_it_is_lost(
    tmp_path: Path, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    refuse = refuse_new_pair(OSError(28, "No space left on device"))
    async with Sandbox(world, settings()) as sb:
        path = token_file(tmp_path / "t.json", sb, expires_at=0)
        monkeypatch.setattr("batchjob._tokens.os.replace", refuse)
        monkeypatch.setattr("batchjob._tokens.rescue_directories", lambda path, env=None: ())
        async with source(path, sb) as tokens:
            with pytest.raises(TokenSaveError, match=r"lost.*batchjob auth") as caught:
                await tokens.token()
        assert_no_tokens(str(caught.value), sb.access_token, sb.refresh_token)


async def test_auth_refuses_a_folder_that_takes_no_new_file_before_spending_anything(
    tmp_path: Path, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root passes os.access on a folder where creating a file then fails (a full disk here);
    # only creating a file there proves it. The pasted refresh token must stay unspent.
    real_open = os.open

    def disk_full(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_EXCL and Path(file).parent == tmp_path:
            raise OSError(28, "No space left on device")
        return real_open(file, flags, *args, **kwargs)

    async with Sandbox(world, settings()) as sb:
        pasted = sb.refresh_token
        stderr = io.StringIO()
        args = auth_args("--import-refresh-token", "--token-file", str(tmp_path / "t.json"))
        env = {"CC_CLIENT_ID": sb.client_id, "CC_TOKEN_URL": sb.token_url}
        monkeypatch.setattr("batchjob._tokens.os.open", disk_full)
        code = await asyncio.to_thread(
            run_auth_command,
            args,
            stdin=io.StringIO(pasted + "\n"),
            stdout=io.StringIO(),
            stderr=stderr,
            environ=env,
        )
        assert code == 2, stderr.getvalue()
        assert "No space left" in stderr.getvalue()
        assert sb.counters.token_requests == 0  # the pasted token is still good


async def test_auth_rescues_tokens_it_cannot_save(
    tmp_path: Path, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    async with Sandbox(world, settings()) as sb:
        pasted = sb.refresh_token
        path = tmp_path / "t.json"
        stderr = io.StringIO()
        args = auth_args("--import-refresh-token", "--token-file", str(path))
        env = {"CC_CLIENT_ID": sb.client_id, "CC_TOKEN_URL": sb.token_url}
        monkeypatch.setattr("batchjob._tokens.os.replace", refuse)
        code = await asyncio.to_thread(
            run_auth_command,
            args,
            stdin=io.StringIO(pasted + "\n"),
            stdout=io.StringIO(),
            stderr=stderr,
            environ=env,
        )
        assert code == 1
        (rescued,) = rescued_files(tmp_path)
        assert f"mv {rescued} {path}" in stderr.getvalue()
        assert_no_tokens(stderr.getvalue(), pasted, sb.refresh_token, sb.access_token)
        assert read_token_file(rescued).refresh_token.value == sb.refresh_token
        assert mode(rescued) == 0o600


# --- a token endpoint that never answers ------------------------------------------------------


class SilentServer:
    """Accepts connections and reads whatever comes, but never answers."""

    def __init__(self) -> None:
        self.accepted = 0
        self.url = ""

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while await reader.read(65536):
                pass
        finally:
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[SilentServer]:
        server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/oauth2/default/v1/token"
        try:
            yield self
        finally:
            server.close()


def short_session() -> aiohttp.ClientSession:
    return default_token_session(connect_timeout=0.3, request_timeout=0.3)


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never came true")


async def test_callers_queued_behind_a_failed_refresh_share_its_failure(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "t.json", refresh_token="r0", access_token="a0", expires_at=0)
    async with SilentServer().running() as silent:
        async with FileTokenSource(
            path, "cid", token_url=silent.url, session=short_session, retry_waits=FAST_RETRY
        ) as tokens:
            results = await asyncio.gather(
                *(tokens.token() for _ in range(5)), return_exceptions=True
            )
        assert all(isinstance(r, TokenError) for r in results)
        assert silent.accepted == 3  # one refresh (three tries), not one per caller


async def test_closing_does_not_retry_a_refresh_that_gets_no_answer(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "t.json", refresh_token="r0", access_token="a0", expires_at=0)
    before = path.read_bytes()
    async with SilentServer().running() as silent:
        # Backoff longer than a try: even if the try on the wire times out before close() (a
        # stalled machine), close() finds the refresh waiting to retry, and it must not.
        tokens = FileTokenSource(
            path, "cid", token_url=silent.url, session=short_session, retry_waits=(1.0, 1.0)
        )
        caller = asyncio.ensure_future(tokens.token())
        await until(lambda: silent.accepted == 1)
        caller.cancel()  # the run stops (SIGINT) while the refresh waits for its answer
        with pytest.raises(asyncio.CancelledError):
            await caller
        await tokens.close()  # waits out the try on the wire (0.3 s), starts no other
        assert silent.accepted == 1
        with pytest.raises(TokenError, match="stopping"):
            await tokens.refresh("a0")
    assert path.read_bytes() == before


async def test_close_gives_up_on_a_refresh_after_close_timeout(tmp_path: Path) -> None:
    # A borrowed session without any timeout: close() still returns, and says so in the log.
    path = write_raw(tmp_path / "t.json", refresh_token="r0", access_token="a0", expires_at=0)
    log = RecordingLog()
    async with SilentServer().running() as silent, aiohttp.ClientSession() as session:
        tokens = FileTokenSource(
            path, "cid", token_url=silent.url, session=session, close_timeout=0.2, log=log
        )
        caller = asyncio.ensure_future(tokens.token())
        await until(lambda: silent.accepted == 1)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        async with asyncio.timeout(60):  # only a guard against hanging: far above 0.2 s
            await tokens.close()
    assert [e[:2] for e in log.events] == [("warning", "token.refresh_abandoned")]
    assert_no_tokens(repr(log.events), "r0", "a0")
    assert no_temp_files(tmp_path)


async def test_run_stops_after_one_refresh_when_the_endpoint_never_answers(
    tmp_path: Path, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three events are checked at once, so three requests wait for the token: the first
    # refresh's failure stops the run, and shutdown waits for no second one.
    async with Sandbox(world, settings()) as sb, SilentServer().running() as silent:
        path = token_file(tmp_path / "t.json", sb, expires_at=0)
        before = path.read_bytes()
        inputs = write_csv(tmp_path / "in.csv", ticket_rows(world), KEY_HEADER)
        monkeypatch.setenv("CC_TOKEN_FILE", str(path))
        monkeypatch.setenv("CC_CLIENT_ID", sb.client_id)
        config = JobConfig(
            inputs=(inputs,),
            report=tmp_path / "r.csv",
            base_url=sb.base_url,
            token_url=silent.url,
            connect_timeout=0.3,
            request_timeout=0.3,
            log_format="json",
        )
        result = await cli_run(config)
        assert silent.accepted == 3  # one refresh of three tries; none after the stop
        assert result.exit_code == 3
        assert "token endpoint" in result.stopped
        assert result.counts["not_attempted"] == len(ticket_rows(world))
        assert sb.counters.total == 0
        assert path.read_bytes() == before


# --- two processes on one token file ----------------------------------------------------------


async def test_two_sources_refresh_once_per_expiry_between_them(
    tmp_path: Path, world: World
) -> None:
    # 60 s tokens are refreshed at half-life. Two runs sharing the file must take turns: the
    # one that comes second uses the token the first stored, for the rest of its life.
    clock = Clock()
    async with Sandbox(world, settings(ttl=60)) as sb:
        path = write_raw(tmp_path / "t.json", refresh_token=sb.refresh_token)
        async with source(path, sb, clock=clock) as a, source(path, sb, clock=clock) as b:
            for period in range(1, 5):
                got = await asyncio.gather(
                    asyncio.ensure_future(a.token()), asyncio.ensure_future(b.token())
                )
                assert sb.counters.token_requests == period
                assert list(got) == [sb.access_token] * 2
                clock.now += 31
        assert a.refreshes + b.refreshes == 4
    assert json.loads(path.read_text())["issued_at"] is not None


CHILD = """
import asyncio, hashlib, sys
from pathlib import Path
from batchjob._tokens import FileTokenSource

async def main() -> None:
    path, client_id, url = sys.argv[1:4]
    async with FileTokenSource(Path(path), client_id, token_url=url) as tokens:
        print(hashlib.sha256((await tokens.token()).encode()).hexdigest())

asyncio.run(main())
"""


async def test_two_processes_sharing_a_file_refresh_once(tmp_path: Path, world: World) -> None:
    # 120 s tokens: within 300 s of expiry from the start, due at half-life (60 s of slack).
    async with Sandbox(world, settings(ttl=120)) as sb:
        path = write_raw(tmp_path / "t.json", refresh_token=sb.refresh_token)

        async def child() -> str:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CHILD, str(path), sb.client_id, sb.token_url,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
            return out.decode().strip()

        first, second = await asyncio.gather(child(), child())
        assert first == second == hashlib.sha256(sb.access_token.encode()).hexdigest()
        assert sb.counters.token_requests == 1
        assert read_token_file(path).refresh_token.value == sb.refresh_token


# --- hostile paths, files and answers ---------------------------------------------------------


async def test_token_file_that_is_a_symlink_is_refused(tmp_path: Path, world: World) -> None:
    async with Sandbox(world, settings()) as sb:
        real = token_file(tmp_path / "real.json", sb, expires_at=0)
        before = real.read_bytes()
        link = tmp_path / "t.json"
        link.symlink_to(real)
        async with source(link, sb) as tokens:
            with pytest.raises(TokenError, match="symbolic link") as caught:
                await tokens.token()
        assert link.is_symlink() and real.read_bytes() == before
        assert sb.counters.token_requests == 0
        assert_no_tokens(str(caught.value), sb.access_token, sb.refresh_token)

        args = auth_args("--client-id", "c", "--token-file", str(link), "--token-url", sb.token_url)
        err = io.StringIO()
        code = await asyncio.to_thread(
            run_auth_command,
            args,
            stdin=io.StringIO(),
            stdout=io.StringIO(),
            stderr=err,
            environ={},
        )
        assert code == 2 and "symbolic link" in err.getvalue()


async def test_lock_file_that_is_a_symlink_is_refused(tmp_path: Path, world: World) -> None:
    async with Sandbox(world, settings()) as sb:
        path = token_file(tmp_path / "t.json", sb, expires_at=0)
        victim = tmp_path / "victim"
        (tmp_path / "t.json.lock").symlink_to(victim)  # dangling: opening it would create it
        async with source(path, sb) as tokens:
            with pytest.raises(TokenError, match=r"lock file .* symbolic link") as caught:
                await tokens.token()
        assert not victim.exists()
        assert sb.counters.token_requests == 0
        assert_no_tokens(str(caught.value), sb.access_token, sb.refresh_token)


def test_token_file_that_is_a_fifo_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "t.json"
    os.mkfifo(fifo)
    code = (
        "import sys, pathlib, batchjob._tokens as t; t.read_token_file(pathlib.Path(sys.argv[1]))"
    )
    try:
        done = subprocess.run(  # noqa: S603 (our own interpreter and code)
            [sys.executable, "-c", code, str(fifo)],
            capture_output=True,
            text=True,
            timeout=60,  # only a guard: the answer takes well under a second
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("reading a FIFO token file hung")
    assert "not a regular file" in done.stderr


def test_huge_token_file_is_not_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text('{"refresh_token": "r"}' + " " * (2 << 20))
    with pytest.raises(TokenError, match=r"over .* bytes"):
        read_token_file(path)


@pytest.mark.parametrize("expires_in", ["Infinity", "1e300", "-5", "NaN"])
async def test_absurd_expires_in_still_saves_the_new_pair(tmp_path: Path, expires_in: str) -> None:
    # The refresh token is spent the moment the answer arrives: nothing in it may stop the save.
    async def handler(request: web.Request) -> web.StreamResponse:
        body = f'{{"access_token": "a1", "refresh_token": "r1", "expires_in": {expires_in}}}'
        return web.Response(text=body, content_type="application/json")

    path = write_raw(tmp_path / "t.json", refresh_token="r0", expires_at=0)
    async with token_server(handler) as url, FileTokenSource(path, "cid", token_url=url) as t:
        assert await t.token() == "a1"
    stored = read_token_file(path)
    assert stored.refresh_token.value == "r1" and stored.expires_at is None


async def test_long_token_file_name_and_leftover_temp_files(tmp_path: Path, world: World) -> None:
    async with Sandbox(world, settings()) as sb:
        path = token_file(tmp_path / ("t" * 240 + ".json"), sb, expires_at=0)
        leftover = tmp_path / f".{path.name[:128]}.0123456789ab.tmp"  # from a killed run
        leftover.write_text("{}")
        async with source(path, sb) as tokens:
            assert await tokens.token() == sb.access_token
        assert read_token_file(path).refresh_token.value == sb.refresh_token
        assert no_temp_files(tmp_path)


async def test_endless_answer_from_the_token_endpoint_is_not_buffered(tmp_path: Path) -> None:
    finished = False

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal finished
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for _ in range(1024):  # 64 MiB, unless the client hangs up first
            await resp.write(b" " * 65536)
        finished = True
        return resp

    path = write_raw(tmp_path / "t.json", refresh_token="r0", expires_at=0)
    before = path.read_bytes()
    async with token_server(endless) as url, FileTokenSource(path, "cid", token_url=url) as t:
        with pytest.raises(TokenError, match="not a token answer") as caught:
            await t.token()
    assert not finished
    assert "r0" not in str(caught.value)
    assert path.read_bytes() == before


def test_only_our_own_rescued_files_are_suggested(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "t.json", refresh_token="r0")
    rescued = rescue_tokens(path, TokenSet(Secret("r1"), Secret("a1")))
    assert find_rescued_tokens(path) == rescued
    os.chown(rescued, 12345, 12345)  # as if another user had planted it
    assert find_rescued_tokens(path) is None
    (tmp_path / "t.json.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(TokenError, match="lock file"):
        FileTokenSource(path, "cid").check()


# --- JSON nested deeper than the parser goes --------------------------------------------------

NESTED = b"[" * 100_000 + b"]" * 100_000  # 200 KB: under the answer cap, over any stack


@pytest.mark.parametrize(
    ("status", "body"), [(200, NESTED), (400, b'{"error": ' + NESTED + b"}")], ids=["200", "400"]
)
async def test_a_deeply_nested_answer_fails_the_refresh_and_keeps_the_current_token(
    tmp_path: Path, status: int, body: bytes
) -> None:
    async def nested(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, content_type="application/json")

    # Due for a refresh (within the margin) but still good for 100 s: the fallback applies.
    path = write_raw(tmp_path / "t.json", refresh_token="r0", access_token="a0")
    path.write_text(json.dumps({**json.loads(path.read_text()), "expires_at": time.time() + 100}))
    before = path.read_bytes()
    async with token_server(nested) as url, FileTokenSource(path, "cid", token_url=url) as t:
        assert await t.token() == "a0"
        assert isinstance(t.last_error, TokenError)
    assert path.read_bytes() == before


def test_a_deeply_nested_token_file_is_a_token_error(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_bytes(NESTED)
    with pytest.raises(TokenError, match="nested too deeply"):
        read_token_file(path)


# --- a lock file that is not a file -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["directory", "fifo"])
async def test_a_lock_that_is_not_a_regular_file_stops_the_run_before_it_starts(
    tmp_path: Path, world: World, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    async with Sandbox(world, settings()) as sb:
        path = token_file(tmp_path / "t.json", sb, expires_at=0)
        lock = tmp_path / "t.json.lock"
        if kind == "directory":
            lock.mkdir()
        else:
            os.mkfifo(lock)
        with pytest.raises(TokenError, match=r"lock file .* not a regular file"):
            FileTokenSource(path, sb.client_id, token_url=sb.token_url).check()

        inputs = write_csv(tmp_path / "in.csv", ticket_rows(world)[:3], KEY_HEADER)
        monkeypatch.setenv("CC_TOKEN_FILE", str(path))
        monkeypatch.setenv("CC_CLIENT_ID", sb.client_id)
        monkeypatch.setenv("CC_TOKEN_URL", sb.token_url)
        argv = ["run", str(inputs), "--report", str(tmp_path / "r.csv"), "--base-url", sb.base_url]
        assert await asyncio.to_thread(cli_main, argv) == 2  # before it starts, not exit 3
        assert sb.counters.total == 0 and sb.counters.token_requests == 0


# --- a token file that cannot be replaced (its folder can) ------------------------------------


@pytest.mark.parametrize("flag", ["+i", "+a"])
async def test_an_immutable_or_append_only_token_file_never_spends_the_refresh_token(
    tmp_path: Path, world: World, flag: str
) -> None:
    async with Sandbox(world, settings()) as sb:
        path = token_file(tmp_path / "t.json", sb, expires_at=0)
        before = path.read_bytes()
        if not chattr(path, flag):
            pytest.skip(f"chattr {flag} is not available here")
        try:
            with pytest.raises(TokenError, match=r"cannot be replaced.*not used"):
                source(path, sb).check()  # what a run does before it starts: exit 2
            async with source(path, sb) as tokens:
                with pytest.raises(TokenError, match="not used") as caught:
                    await tokens.token()
        finally:
            chattr(path, "-" + flag[1:])
        assert sb.counters.token_requests == 0
        assert not isinstance(caught.value, TokenSaveError)
        assert path.read_bytes() == before
        assert no_temp_files(tmp_path) and not rescued_files(tmp_path)
        status, _ = await refresh_directly(sb, sb.refresh_token)
        assert status == 200  # still unspent


async def test_a_token_file_the_rename_cannot_replace_is_found_before_the_refresh(
    tmp_path: Path, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same without chattr: only renaming over the token file fails (EPERM).
    async with Sandbox(world, settings()) as sb:
        path = token_file(tmp_path / "t.json", sb, expires_at=0)
        before = path.read_bytes()
        real_replace = os.replace

        def refuse_over_token_file(src: Any, dst: Any) -> None:
            if Path(dst) == path:
                raise PermissionError(1, "Operation not permitted")
            real_replace(src, dst)

        monkeypatch.setattr("batchjob._tokens.os.replace", refuse_over_token_file)
        async with source(path, sb) as tokens:
            with pytest.raises(TokenError, match=r"Operation not permitted.*not used") as caught:
                await tokens.token()
        assert sb.counters.token_requests == 0
        assert not isinstance(caught.value, TokenSaveError)
        assert path.read_bytes() == before
        assert no_temp_files(tmp_path) and not rescued_files(tmp_path)


async def test_auth_refuses_an_immutable_token_file_before_spending_anything(
    tmp_path: Path, world: World
) -> None:
    async with Sandbox(world, settings()) as sb:
        path = write_raw(tmp_path / "t.json", refresh_token="old")
        if not chattr(path, "+i"):
            pytest.skip("chattr +i is not available here")
        stderr = io.StringIO()
        args = auth_args("--import-refresh-token", "--token-file", str(path))
        env = {"CC_CLIENT_ID": sb.client_id, "CC_TOKEN_URL": sb.token_url}
        try:
            code = await asyncio.to_thread(
                run_auth_command,
                args,
                stdin=io.StringIO(sb.refresh_token + "\n"),
                stdout=io.StringIO(),
                stderr=stderr,
                environ=env,
            )
        finally:
            chattr(path, "-i")
        assert code == 2, stderr.getvalue()
        assert "immutable" in stderr.getvalue()
        assert sb.counters.token_requests == 0  # the pasted token is still good
        assert not rescued_files(tmp_path)


# --- a new pair left in a temporary file by a kill -9 -----------------------------------------

#: A run whose rename of a new pair over the token file stalls (announcing it), so the test
#: can kill -9 it between the fsynced temporary file and the rename.
STALLED_RENAME = """
import os, sys, time
from pathlib import Path
from batchjob._cli import main

real, token_path = os.replace, Path(sys.argv.pop(1))

def replace(src, dst, *args, **kwargs):
    # Not the trial rename of the file's own bytes: the new pair's.
    if Path(dst) == token_path and Path(src).read_bytes() != token_path.read_bytes():
        print("renaming", flush=True)
        time.sleep(600)
    return real(src, dst, *args, **kwargs)

os.replace = replace
sys.exit(main(sys.argv[1:]))
"""


async def test_a_new_pair_left_in_a_temporary_file_by_a_kill_9_is_put_in_place(
    tmp_path: Path, world: World
) -> None:
    async with Sandbox(world, settings()) as sb:
        path = write_raw(tmp_path / "t.json", refresh_token=sb.refresh_token, access_token=None)
        inputs = write_csv(tmp_path / "in.csv", ticket_rows(world)[:5], KEY_HEADER)
        env = cli_env(
            None,
            CC_BASE_URL=sb.base_url,
            CC_TOKEN_URL=sb.token_url,
            CC_TOKEN_FILE=str(path),
            CC_CLIENT_ID=sb.client_id,
        )
        run = ("run", str(inputs), "--report", str(tmp_path / "r.csv"), "--no-progress")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", STALLED_RENAME, str(path), *run,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"renaming\n"
        os.kill(proc.pid, signal.SIGKILL)
        assert (await finish(proc)).code == -signal.SIGKILL
        (left,) = temp_files(tmp_path)
        assert sb.refresh_token.encode() in left.read_bytes()  # the only copy of the new pair
        assert sb.counters.token_requests == 1

        rerun = await cli(*run, "--resume", env=env)

    assert rerun.code == 0, rerun.err
    assert sb.counters.token_requests == 1  # the new pair's access token was still good
    assert read_token_file(path).refresh_token.value == sb.refresh_token
    assert read_token_file(path).access_token == Secret(sb.access_token)
    assert no_temp_files(tmp_path) and not rescued_files(tmp_path)
    assert "token.recovered" in rerun.err
    assert_no_tokens(rerun.err + rerun.out, sb.refresh_token, sb.access_token)


def left_temp(path: Path, content: bytes, mtime: float) -> Path:
    temp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    temp.write_bytes(content)
    os.utime(temp, (mtime, mtime))
    return temp


async def test_left_temporary_files_are_put_in_place_rescued_or_removed(
    tmp_path: Path, world: World, event_id: str
) -> None:
    async with Sandbox(world, settings()) as sb:
        path = write_raw(tmp_path / "t.json", refresh_token="spent", access_token="old")
        now = path.stat().st_mtime
        pair = json.dumps({"refresh_token": sb.refresh_token, "access_token": sb.access_token})
        older = json.dumps({"refresh_token": "r-older", "access_token": "a-older"})
        reserved = left_temp(path, bytes(16384), now + 2)  # killed before the refresh answered
        # Killed after writing the pair, before cutting the reserved room off: NULs follow.
        newer = left_temp(path, pair.encode() + b"\n" + bytes(1000), now + 1)
        # Older than the token file (someone replaced it since): kept aside, not put in place.
        stale = left_temp(path, older.encode(), now - 60)
        async with source(path, sb) as tokens, aiohttp.ClientSession() as session:
            assert await get_event(session, sb, event_id, tokens) == 200
        assert sb.counters.token_requests == 0  # the left pair's access token was good
        stored = read_token_file(path)
        assert stored.refresh_token.value == sb.refresh_token
        assert not (reserved.exists() or newer.exists() or stale.exists())
        (rescued,) = rescued_files(tmp_path)
        assert mode(rescued) == 0o600
        assert read_token_file(rescued).refresh_token.value == "r-older"
        assert find_rescued_tokens(path) == rescued
