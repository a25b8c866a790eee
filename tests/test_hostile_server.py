"""batchjob against a real loopback server that misbehaves on purpose (aiohttp.web, 127.0.0.1).

Each case is something a hostile server, or a proxy in front of one, can do: echo the token
(in a JSON error, an HTML page, a header of a cut answer), send bodies that never end, are
huge, binary or malformed, cut the connection mid-header, drip, throttle. Whatever it does, a
user relies on the same things: every key in the report exactly once with a true outcome, no
secret in any byte batchjob writes (report, failed-rows file, journal, logs, summary), and a
run that finishes.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import secrets
import sys
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pandas as pd
import pytest
from aiohttp import web

from batchjob import JobConfig, RunResult, Secret, StaticToken, run_job
from batchjob._logging import MAX_SERVER_TEXT, TRUNCATED, Redactor, make_logger
from batchjob._tokens import FileTokenSource, TokenSet, TokenSource, write_token_file
from batchjob.record import Journal
from batchjob.sandbox import Sandbox, SandboxSettings, World
from batchjob.send._transport import MAX_BODY
from tests.support import FAST, read_report, ticket_rows, token_for, write_csv

EVENT = "07216444-4e3b-41ea-a3b8-5a418fce41f4"
KEYS = ("k1", "k2", "k3")
HEADER = ("event_id", "order_ticket_key")
#: Short backoff, few tries, a short timeout: each case runs in well under a second or two.
QUICK: dict[str, Any] = {
    "rate": 500.0,
    "retry_base": 0.001,
    "retry_cap": 0.005,
    "retry_max_tries": 2,
    "request_timeout": 2.0,
}

Behaviour = Callable[["Hostile", web.Request], Awaitable[web.StreamResponse]]


def new_secret(kind: str) -> str:
    return f"{kind}-{secrets.token_urlsafe(24)}"


def fragments(secret: str, size: int = 12) -> list[str]:
    """Pieces of ``secret``: a text cut in the middle of one must not leave them behind."""
    return [secret[i : i + size] for i in range(0, len(secret) - size + 1, 4)]


# --- the server -------------------------------------------------------------------------------


@dataclass
class Hostile:
    """A loopback API. Undo requests get ``undo``; the event check ``event``; the token
    endpoint hands out ``refreshed`` access tokens one after another."""

    undo: Behaviour
    event: Behaviour | None = None
    base_url: str = ""
    token_url: str = ""
    sent: int = 0  # body bytes the endless senders got onto the wire
    undo_requests: int = 0
    refresh_token: str = field(default_factory=lambda: new_secret("refresh"))
    client_secret: str = field(default_factory=lambda: new_secret("client"))
    issued: list[str] = field(default_factory=list)  # access tokens handed out by /token
    valid: set[str] = field(default_factory=set)  # tokens accepted; empty: any
    _runner: web.AppRunner | None = None

    async def __aenter__(self) -> Hostile:
        app = web.Application()
        app.router.add_get("/v3/events/{event_id}", self._event)
        app.router.add_post("/v3/events/{event_id}/undo_check_in/tickets", self._undo)
        app.router.add_post("/token", self._token)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}/v3"
        self.token_url = f"http://127.0.0.1:{port}/token"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    def authorized(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        return not self.valid or auth.removeprefix("Bearer ") in self.valid

    async def _event(self, request: web.Request) -> web.StreamResponse:
        if self.event is None:
            return web.json_response({"status": "ACTIVE"})
        return await self.event(self, request)

    async def _undo(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.undo_requests += 1
        if not self.authorized(request):
            return web.json_response([{"error_key": "unauthorized"}], status=401)
        return await self.undo(self, request)

    async def _token(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        access = new_secret("access")
        self.issued.append(access)
        self.valid = {access}
        self.refresh_token = new_secret("refresh")  # rotating, like Constant Contact's
        return web.json_response(
            {"access_token": access, "refresh_token": self.refresh_token, "expires_in": 3600}
        )

    def secrets(self) -> list[str]:
        return [*self.issued, self.refresh_token, self.client_secret]


def echo(request: web.Request, server: Hostile) -> str:
    """Everything secret the server could know: what it was sent, and what it issued."""
    return " ".join([request.headers.get("Authorization", ""), *server.secrets()])


async def raw(request: web.Request, data: bytes) -> web.StreamResponse:
    """Write ``data`` as the whole answer and hang up: HTTP that aiohttp.web would not send."""
    assert request.transport is not None
    request.transport.write(data)
    request.transport.close()
    return web.Response(status=204)  # goes nowhere: the connection is closed


async def endless(server: Hostile, response: web.StreamResponse, chunk: bytes) -> None:
    """Send ``chunk`` until the client stops reading. Bounded (64 MiB) all the same, so a
    client that reads everything ends the test with a failure rather than the machine's
    memory."""
    try:
        for _ in range((64 << 20) // len(chunk)):
            await response.write(chunk)
            server.sent += len(chunk)
    except (ConnectionError, RuntimeError):
        pass  # the client hung up: what it should do


# --- running the job and reading everything it wrote -------------------------------------------


@dataclass
class Written:
    result: RunResult
    report: pd.DataFrame
    files: dict[str, bytes]  # everything batchjob wrote, by name


async def run_against(
    server: Hostile,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    tokens: TokenSource | None = None,
    inputs: Path | None = None,
    report: str = "report.csv",
    **settings: Any,
) -> Written:
    if inputs is None:
        inputs = write_csv(tmp_path / "in.csv", [(EVENT, k) for k in KEYS], HEADER)
    journals: list[bytes] = []
    remove = Journal.remove

    def keep_journal(path: Path) -> None:
        if path.exists():
            journals.append(path.read_bytes())
        remove(path)

    monkeypatch.setattr(Journal, "remove", staticmethod(keep_journal))
    log = io.StringIO()
    config = JobConfig(
        inputs=(inputs,),
        report=tmp_path / report,
        base_url=server.base_url,
        token_url=server.token_url,
        **(QUICK | settings),
    )
    # A logger with no redactor of its own: a library caller's. Nothing may reach it either.
    logger = make_logger(log_format="json", level="debug", stream=log)
    token = tokens if tokens is not None else StaticToken(Secret(new_secret("access")))
    # A guard, not a timing: a run that hangs fails instead.
    result = await asyncio.wait_for(run_job(config, tokens=token, log=logger), 120)
    files = {
        "report": result.report.read_bytes(),
        "failed rows": result.failed_rows.read_bytes(),
        "journal": b"".join(journals),
        "log": log.getvalue().encode(),
        "summary": result.summary().encode(),
    }
    return Written(result, read_report(result.report), files)


def sent_tokens(tokens: TokenSource) -> list[str]:
    return list(getattr(tokens, "secrets", lambda: ())())


def assert_no_secret(files: dict[str, bytes], secret_values: Sequence[str]) -> None:
    assert secret_values
    for name, data in files.items():
        assert data or name == "journal", f"{name} is empty"
        for value in secret_values:
            for piece in fragments(value):
                assert piece.encode() not in data, f"part of a secret in the {name}"


def assert_every_key_once(written: Written, outcome: str) -> None:
    report = written.report
    assert list(report.order_ticket_key) == list(KEYS)
    assert set(report.outcome) == {outcome}, written.result.summary()


# --- echoed secrets ---------------------------------------------------------------------------


async def echo_in_json(server: Hostile, request: web.Request) -> web.StreamResponse:
    message = f"you sent {echo(request, server)}"
    return web.json_response([{"error_key": "echo", "error_message": message}], status=400)


async def echo_in_html_500(server: Hostile, request: web.Request) -> web.StreamResponse:
    # The token straddles the first 200 characters, where a page used to be cut.
    page = f"<html><body>{'x' * 150} {echo(request, server)} {'y' * 8000}</body></html>"
    return web.Response(status=500, text=page, content_type="text/html")


async def echo_in_header_of_cut_204(server: Hostile, request: web.Request) -> web.StreamResponse:
    # aiohttp's ServerDisconnectedError quotes the headers it had read.
    head = f"HTTP/1.1 204 No Content\r\nX-Echo: {echo(request, server)}\r\n"
    return await raw(request, head.encode())


async def echo_in_invalid_header(server: Hostile, request: web.Request) -> web.StreamResponse:
    # aiohttp's "Invalid HTTP header" quotes the header's value.
    head = f"HTTP/1.1 500 Oops\r\nX-Echo: {echo(request, server)}\x00\r\n\r\n"
    return await raw(request, head.encode())


@pytest.mark.parametrize(
    ("behaviour", "outcome"),
    [
        (echo_in_json, "failed"),
        (echo_in_html_500, "failed"),
        (echo_in_header_of_cut_204, "failed"),
        (echo_in_invalid_header, "failed"),
    ],
)
async def test_an_echoed_token_never_reaches_any_file_log_or_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, behaviour: Behaviour, outcome: str
) -> None:
    async with Hostile(behaviour) as server:
        tokens = StaticToken(Secret(new_secret("access")))
        written = await run_against(server, tmp_path, monkeypatch, tokens=tokens)

    assert_every_key_once(written, outcome)
    assert_no_secret(written.files, sent_tokens(tokens))
    # Redacted, not dropped: the user still reads what the server said.
    assert written.report.error_message.str.contains(r"\*\*\*").all()


async def test_a_refreshed_token_the_refresh_token_and_the_client_secret_are_redacted_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first token is refused (401), a refresh gets a new pair, and the server echoes the
    # new token with the refresh token and the client secret in every error.
    async with Hostile(echo_in_json) as server:
        token_file = tmp_path / "tokens.json"
        first = new_secret("access")
        write_token_file(
            token_file,
            TokenSet(refresh_token=Secret(server.refresh_token), access_token=Secret(first)),
        )
        server.valid = {"not the first token"}
        tokens = FileTokenSource(
            token_file,
            "client-id",
            client_secret=Secret(server.client_secret),
            token_url=server.token_url,
        )
        async with tokens:
            written = await run_against(server, tmp_path, monkeypatch, tokens=tokens)
        every_secret = [first, *server.secrets(), *tokens.secrets()]

    assert len(server.issued) == 1
    assert_every_key_once(written, "failed")
    assert_no_secret(written.files, every_secret)


async def test_the_command_line_writes_no_secret_to_stdout_stderr_or_any_file(
    tmp_path: Path,
) -> None:
    async with Hostile(echo_in_header_of_cut_204) as server:
        inputs = write_csv(tmp_path / "in.csv", [(EVENT, k) for k in KEYS], HEADER)
        settings = tmp_path / "settings.toml"
        settings.write_text("\n".join(f"{k} = {v!r}" for k, v in QUICK.items()) + "\n")
        token = new_secret("access")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CC_")}
        env["CC_ACCESS_TOKEN"] = token
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "batchjob", "run", str(inputs),
            "--report", str(tmp_path / "report.csv"), "--config", str(settings),
            "--base-url", server.base_url, "--log-format", "json", "--log-level", "debug",
            "--no-progress",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(process.communicate(), 120)

    assert process.returncode == 1, stderr.decode()
    files = {
        "stdout": stdout,
        "stderr": stderr,
        "report": (tmp_path / "report.csv").read_bytes(),
        "failed rows": (tmp_path / "report.failed.csv").read_bytes(),
    }
    assert_no_secret(files, [token])
    assert b"ServerDisconnectedError" in files["report"]


async def test_an_event_check_answered_with_an_echo_fails_its_keys_without_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def event_echo(server: Hostile, request: web.Request) -> web.StreamResponse:
        message = f"no such event for {echo(request, server)}"
        return web.json_response([{"error_key": "missing", "error_message": message}], status=404)

    async with Hostile(echo_in_json, event=event_echo) as server:
        tokens = StaticToken(Secret(new_secret("access")))
        written = await run_against(server, tmp_path, monkeypatch, tokens=tokens)
        assert server.undo_requests == 0

    # The run's only event check answered 404: a wrong URL or account, so the run stops and
    # its keys are left for the next run (not failed); the 404's text is in each row.
    assert_every_key_once(written, "not_attempted")
    assert written.result.exit_code == 3
    assert_no_secret(written.files, sent_tokens(tokens))


# --- bodies that never end, are huge, binary or malformed ----------------------------------------


async def endless_chunked_500(server: Hostile, request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=500)
    response.enable_chunked_encoding()
    await response.prepare(request)
    await endless(server, response, b"<p>" + b"x" * 65533)
    return response


async def gzip_bomb_500(server: Hostile, request: web.Request) -> web.StreamResponse:
    # 256 MiB of zeros in a quarter of a megabyte.
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    body = b"".join([compressor.compress(block) for _ in range(256)] + [compressor.flush()])
    server.sent += len(body)
    headers = {"Content-Encoding": "gzip", "Content-Type": "text/html"}
    return web.Response(status=500, body=body, headers=headers)


@pytest.mark.parametrize("behaviour", [endless_chunked_500, gzip_bomb_500])
async def test_an_endless_error_body_is_read_only_up_to_a_small_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, behaviour: Behaviour
) -> None:
    async with Hostile(behaviour) as server:
        written = await run_against(server, tmp_path, monkeypatch)
        tries = server.undo_requests

    assert_every_key_once(written, "failed")
    # 64 KiB read per try; the rest is what the sockets' buffers held when the client left.
    assert server.sent < tries * (8 << 20)


async def endless_event(server: Hostile, request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=200)
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(b'{"status": "ACTIVE", "description": "')
    await endless(server, response, b"x" * 65536)
    return response


async def deeply_nested_event(server: Hostile, request: web.Request) -> web.StreamResponse:
    return web.Response(status=200, body=b"[" * 500_000, content_type="application/json")


async def odd_status_event(server: Hostile, request: web.Request) -> web.StreamResponse:
    status = f"ACT\x00IVE\x1b[2J {request.headers.get('Authorization')} " + "S" * 100_000
    return web.json_response({"status": status})


async def status_echo_event(server: Hostile, request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": request.headers.get("Authorization")})


@pytest.mark.parametrize(
    ("event", "error_key"),
    [
        (endless_event, "event_unreadable"),
        (deeply_nested_event, "event_unreadable"),
        (odd_status_event, "event_not_active"),
        (status_echo_event, "event_not_active"),
    ],
)
async def test_an_event_answered_with_an_unreadable_body_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, event: Behaviour, error_key: str
) -> None:
    async with Hostile(echo_in_json, event=event) as server:
        tokens = StaticToken(Secret(new_secret("access")))
        written = await run_against(server, tmp_path, monkeypatch, tokens=tokens)
        assert server.undo_requests == 0

    # Its status unreadable, the event is not used: nothing is sent for it, and the message
    # says why (a body too large or not JSON is not "an event that is not active").
    assert_every_key_once(written, "failed")
    assert written.report.error_key.eq(error_key).all()
    assert written.report.error_message.str.len().max() <= MAX_SERVER_TEXT
    assert_no_secret(written.files, sent_tokens(tokens))
    # Not even with its letters' case changed (the status is compared in upper case).
    assert_no_secret(written.files, [t.upper() for t in sent_tokens(tokens)])
    assert server.sent < 16 << 20  # 1 MiB read at most


@pytest.mark.parametrize("size", [60_000, 5_000_000])
async def test_a_huge_error_message_is_stored_cut_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    async def huge(server: Hostile, request: web.Request) -> web.StreamResponse:
        body = json.dumps([{"error_key": "big", "error_message": "m" * size}])
        return web.Response(status=400, text=body, content_type="application/json")

    async with Hostile(huge) as server:
        written = await run_against(server, tmp_path, monkeypatch)

    assert_every_key_once(written, "failed")
    messages = written.report.error_message
    assert messages.str.len().max() <= MAX_SERVER_TEXT
    assert messages.str.endswith(TRUNCATED).all()
    assert len(written.files["report"]) < 10 * MAX_SERVER_TEXT


async def token_cut_by_the_read_limit(server: Hostile, request: web.Request) -> web.StreamResponse:
    # Whitespace padding (shown folded to one space) puts the token across the 64 KiB a
    # client reads: what it keeps of the body ends in the first part of the token.
    secret = request.headers.get("Authorization", "")
    head = "x" + " " * (MAX_BODY - len(secret) // 2 - 1)
    return web.Response(status=400, text=head + secret + " tail", content_type="text/plain")


async def test_a_body_cut_at_the_read_limit_in_the_middle_of_the_token_keeps_none_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Hostile(token_cut_by_the_read_limit) as server:
        tokens = StaticToken(Secret(new_secret("access")))
        written = await run_against(server, tmp_path, monkeypatch, tokens=tokens)

    assert_every_key_once(written, "failed")
    assert written.report.error_message.str.contains("Bearer").all()  # the text is shown
    assert_no_secret(written.files, sent_tokens(tokens))


async def binary_400(server: Hostile, request: web.Request) -> web.StreamResponse:
    body = b"\x00\xff\xfe garbage \x1b[31m\r\n\x00" + bytes(range(256))
    return web.Response(status=400, body=body, content_type="application/octet-stream")


async def control_characters_in_json(server: Hostile, request: web.Request) -> web.StreamResponse:
    message = "bad\x00key\r\nnext line\x1b[2J\u202eevil\ud800 \x85 \t end"
    body = json.dumps([{"error_key": "nul\x00key", "error_message": message}])
    return web.Response(status=400, text=body, content_type="application/json")


@pytest.mark.parametrize("behaviour", [binary_400, control_characters_in_json])
async def test_a_failed_rows_file_after_binary_server_text_is_valid_input_for_the_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, behaviour: Behaviour
) -> None:
    async with Hostile(behaviour) as server:
        written = await run_against(server, tmp_path, monkeypatch)
        assert_every_key_once(written, "failed")
        for name in ("report", "failed rows", "journal"):
            text = written.files[name].decode("utf-8")  # valid UTF-8
            assert not any(c in text for c in "\x00\x1b\x85\u202e"), name
            assert text.count("\n") == len(KEYS) + 1 or name == "journal", name

        # The retry path: the failed-rows file is the next run's input, as documented.
        async def accept(server: Hostile, request: web.Request) -> web.StreamResponse:
            return web.Response(status=204)

        server.undo = accept
        rerun = await run_against(
            server, tmp_path, monkeypatch, inputs=written.result.failed_rows, report="rerun.csv"
        )

    assert rerun.result.exit_code == 0, rerun.result.summary()
    assert_every_key_once(rerun, "undone")


@pytest.mark.parametrize(
    "body",
    [
        b'[{"error_key": "cut", "error_mess',
        b'{"error_key": {"nested": [1, {"x": null}]}, "error_message": 12}',
        b"[" * 100_000,
        b'[{"error_key": "deep", "error_message": ' + b"[" * 900 + b"]" * 900 + b"}]",
        b'"just a string"',
        b"null",
        b"[1, 2, 3]",
        b"\xef\xbb\xbf<html>\xc3\x28 broken utf-8</html>",
    ],
)
async def test_a_malformed_error_body_fails_the_keys_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: bytes
) -> None:
    async def malformed(server: Hostile, request: web.Request) -> web.StreamResponse:
        return web.Response(status=400, body=body, content_type="application/json")

    async with Hostile(malformed) as server:
        written = await run_against(server, tmp_path, monkeypatch)

    assert_every_key_once(written, "failed")
    assert written.result.exit_code == 1
    assert set(written.report.http_status) == {"400"}


# --- connections cut or never finished ---------------------------------------------------------


async def cut_mid_status_line(server: Hostile, request: web.Request) -> web.StreamResponse:
    return await raw(request, b"HTTP/1.1 500 Internal Se")


async def cut_mid_header(server: Hostile, request: web.Request) -> web.StreamResponse:
    return await raw(request, b"HTTP/1.1 204 No Content\r\nContent-Ty")


async def cut_mid_body(server: Hostile, request: web.Request) -> web.StreamResponse:
    return await raw(request, b'HTTP/1.1 500 Oops\r\nContent-Length: 100\r\n\r\n[{"error')


async def slow_drip_body(server: Hostile, request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=500)
    response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        for _ in range(2_000):  # bounded: 100 s at most, far past the client's timeout
            await response.write(b"x")
            await asyncio.sleep(0.05)
    except (ConnectionError, RuntimeError):
        pass
    return response


async def slow_drip_headers(server: Hostile, request: web.Request) -> web.StreamResponse:
    assert request.transport is not None
    request.transport.write(b"HTTP/1.1 204 No Content\r\n")
    for _ in range(2_000):
        if request.transport.is_closing():
            break
        request.transport.write(b"X")
        await asyncio.sleep(0.05)
    request.transport.close()
    return web.Response(status=204)


@pytest.mark.parametrize(
    "behaviour",
    [cut_mid_status_line, cut_mid_header, cut_mid_body, slow_drip_body, slow_drip_headers],
)
async def test_a_cut_or_endless_answer_fails_the_keys_saying_they_may_have_been_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, behaviour: Behaviour
) -> None:
    async with Hostile(behaviour) as server:
        written = await run_against(server, tmp_path, monkeypatch, request_timeout=0.5)

    assert_every_key_once(written, "failed")
    messages = written.report.error_message
    assert messages.str.startswith("retries exhausted").all()
    assert messages.str.contains("may have applied").all()


# --- throttling ---------------------------------------------------------------------------------


async def test_endless_throttling_stops_the_run_with_every_key_not_attempted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def throttled(server: Hostile, request: web.Request) -> web.StreamResponse:
        body = [{"error_key": "throttled", "error_message": "Too Many Requests"}]
        return web.json_response(body, status=429)

    # Nothing but 429s for 5 x retry_max_time (here 0.2 s) run-wide stops the run.
    async with Hostile(throttled) as server:
        written = await run_against(server, tmp_path, monkeypatch, retry_max_time=0.2)

    assert written.result.exit_code == 3
    assert_every_key_once(written, "not_attempted")
    assert "429 throttled" in written.result.stopped
    # A 429 is a refusal: nothing was applied, and the message does not say otherwise.
    assert not written.report.error_message.str.contains("may have applied").any()


@pytest.mark.parametrize(
    ("status", "error_key"),
    [(429, "throttled"), (429, ""), (403, "rate_limit_exceeded"), (403, "QPSExceeded")],
)
async def test_throttling_on_every_request_the_event_check_included_never_fails_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int, error_key: str
) -> None:
    # More throttled answers in a row, on the event check and on the undo, than the retry
    # budget has tries: they are waited out, not counted.
    answers = {"event": 0, "undo": 0}
    body = [{"error_key": error_key, "error_message": "slow down"}]

    def throttle_first(kind: str, then: Callable[[], web.StreamResponse]) -> Behaviour:
        async def behaviour(server: Hostile, request: web.Request) -> web.StreamResponse:
            answers[kind] += 1
            return web.json_response(body, status=status) if answers[kind] <= 5 else then()

        return behaviour

    async with Hostile(
        throttle_first("undo", lambda: web.Response(status=204)),
        event=throttle_first("event", lambda: web.json_response({"status": "ACTIVE"})),
    ) as server:
        written = await run_against(server, tmp_path, monkeypatch, batch_size=10)

    assert written.result.exit_code == 0, written.result.summary()
    assert_every_key_once(written, "undone")
    assert written.result.throttled == 10


@pytest.fixture
async def shared_bucket() -> AsyncIterator[Sandbox]:
    world = World.generate(2, 30, seed=3)
    settings = SandboxSettings(rate=50.0, burst=1.0, daily_quota=None, seed=1)
    async with Sandbox(world, settings) as sandbox:
        yield sandbox


async def test_two_runs_on_one_api_key_at_once_both_undo_every_key(
    shared_bucket: Sandbox, tmp_path: Path
) -> None:
    # Both runs pace at the key's whole limit, so each one's requests, its event check
    # included, meet 429s made by the other. A retry budget of 2 tries would have turned them
    # into failed keys. Without a store, as two apps on one key are: runs that share a store
    # take turns instead (tests/test_key_sharing.py).
    sandbox = shared_bucket
    rows = ticket_rows(sandbox.world)
    halves = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
    settings: dict[str, Any] = FAST | {"rate": 50.0, "batch_size": 1, "concurrency": 4}
    settings["state"] = "none"
    settings["retry_max_tries"] = 2

    async def one(name: str, part: list[tuple[str, str]]) -> RunResult:
        inputs = write_csv(tmp_path / f"{name}.csv", part, HEADER)
        config = JobConfig(
            inputs=(inputs,),
            report=tmp_path / f"{name}-report.csv",
            base_url=sandbox.base_url,
            **settings,
        )
        return await run_job(config, tokens=token_for(sandbox))

    async def second() -> RunResult:
        # Starts once the first one paces at the limit, as a second cron job would.
        for _ in range(2_000):
            if sandbox.counters.accepted >= 10:
                break
            await asyncio.sleep(0.005)
        return await one("second", halves[1])

    results = await asyncio.wait_for(asyncio.gather(one("first", halves[0]), second()), 300)

    assert sandbox.counters.throttled > 0  # they did get in each other's way
    for result, part in zip(results, halves, strict=True):
        report = read_report(result.report)
        assert result.exit_code == 0, result.summary()
        assert list(zip(report.event_id, report.order_ticket_key, strict=True)) == part
        assert set(report.outcome) == {"undone"}
    assert not any(v for ev in sandbox.world.events.values() for v in ev.tickets.values())


# --- a token endpoint that echoes what it was sent --------------------------------------------


def encoded_forms(secret: str) -> dict[str, str]:
    """``secret`` as a server could echo it back; none may appear in anything batchjob writes."""
    raw = secret.encode()
    return {
        "raw": secret,
        "quote_plus": quote_plus(secret),
        "quote": quote(secret, safe=""),
        "quote lower-case hex": re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), quote(secret)),
        "JSON escaped": json.dumps(secret)[1:-1],
        "base64": base64.b64encode(raw).decode(),
        "URL-safe base64": base64.urlsafe_b64encode(raw).decode().rstrip("="),
    }


def everything_written(directory: Path, *, but: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p != but}


async def test_a_token_endpoint_echoing_the_basic_credential_and_the_form_leaks_nothing(
    tmp_path: Path,
) -> None:
    # Every character a form or Basic credential encodes: '+', '/', '=', a space, non-ASCII.
    refresh = f"rt+/= \u00fc{secrets.token_hex(8)}"
    client_secret = f"cs+/= \u00e9{secrets.token_hex(8)}"
    access = new_secret("access")
    credential = ""

    async def echo_token(request: web.Request) -> web.StreamResponse:
        nonlocal credential
        auth = request.headers.get("Authorization", "")
        credential = auth.removeprefix("Basic ")
        body = await request.text()  # as sent: percent-encoded
        form = {k: str(v) for k, v in (await request.post()).items()}
        echoed = " | ".join(
            [
                f"auth={auth}",
                f"url-safe={credential.translate(str.maketrans('+/', '-_'))}",
                f"body={body}",
                f"form={json.dumps(form)}",  # JSON inside JSON: \\u00fc survives one decoding
                f"re-encoded={quote(form.get('refresh_token', ''), safe='')}",
                "base64=" + base64.b64encode(form.get("refresh_token", "").encode()).decode(),
            ]
        )
        return web.json_response(
            {"error": "invalid_request", "error_description": f"bad request: {echoed}"}, status=400
        )

    app = web.Application()
    app.router.add_post("/token", echo_token)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    token_file = tmp_path / "tokens.json"
    # Expired: the refresh is needed at once, and its failure stops the run (exit 3).
    token_file.write_text(
        json.dumps({"refresh_token": refresh, "access_token": access, "expires_at": 1000})
    )
    inputs = write_csv(tmp_path / "in.csv", [(EVENT, k) for k in KEYS], HEADER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CC_", "BATCHJOB_"))}
    env |= {
        "CC_TOKEN_FILE": str(token_file),
        "CC_CLIENT_ID": "cid",
        "CC_CLIENT_SECRET": client_secret,
        "CC_TOKEN_URL": f"{url}/token",
    }
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "batchjob", "run", str(inputs),
            "--report", str(tmp_path / "report.csv"), "--base-url", f"{url}/v3",
            "--log-format", "json", "--log-level", "debug", "--no-progress",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    finally:
        await runner.cleanup()

    assert process.returncode == 3, stderr.decode()
    assert credential  # the secret went as HTTP Basic auth, and came back
    files = everything_written(tmp_path, but=token_file)
    files |= {"stdout": stdout, "stderr": stderr}
    assert {"report.csv", "report.failed.csv"} <= set(files)
    assert b"bad request" in files["report.csv"]  # redacted, not dropped
    secret_values = [refresh, client_secret, access, credential]
    for name, data in files.items():
        text = data.decode()
        for value in secret_values:
            for form, encoded in encoded_forms(value).items():
                assert encoded not in text, f"{name} holds a secret ({form})"


def test_the_redactor_knows_the_encoded_forms_of_every_secret() -> None:
    secret = "a+b/c= d\u00e9"
    redactor = Redactor([secret])
    echoes = [
        *encoded_forms(secret).values(),
        "a%2bb%2fc%3d+d%c3%a9",  # lower-case hex
        "a+b\\/c= d\\u00E9",  # JSON with '/' escaped, upper-case \\u hex
        "a-b_c= d\u00e9",  # a base64 secret in its URL-safe alphabet
        base64.urlsafe_b64encode(secret.encode()).decode(),  # padded
    ]
    for echoed in echoes:
        assert redactor.scrub(f"<{echoed}>") == "<***>", echoed
    assert redactor.scrub("nothing secret") == "nothing secret"
