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
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web

from batchjob._auth import add_auth_arguments, parse_redirect, run_auth_command
from batchjob._config import ConfigError, JobConfig
from batchjob._sandbox import Sandbox, SandboxSettings, World
from batchjob._tokens import (
    FileTokenSource,
    Secret,
    StaticToken,
    TokenError,
    TokenSet,
    read_token_file,
    token_source_from_env,
)

FAST_RETRY = (0.01, 0.01)
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


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


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


async def test_failed_write_does_not_hand_out_the_token(
    tmp_path: Path, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    async with Sandbox(world, settings()) as sb:
        path = token_file(tmp_path / "t.json", sb, expires_at=0)
        before = path.read_bytes()
        monkeypatch.setattr("batchjob._tokens.os.replace", refuse)
        async with source(path, sb) as tokens:
            with pytest.raises(TokenError, match=r"could not save them.*batchjob auth") as caught:
                await tokens.token()
            assert_no_tokens(str(caught.value), sb.access_token, sb.refresh_token)
        assert path.read_bytes() == before
        assert no_temp_files(tmp_path)


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
