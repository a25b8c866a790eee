"""Signals, as a person at a terminal or a scheduler sends them to ``python -m batchjob run``.

Each test runs the real command line as a child process against a sandbox served by the test's
own event loop. Requests the sandbox holds with its ``slow`` fault are on the wire and
unanswered: what a second Ctrl-C must not wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchjob import StopRequest
from batchjob.run import install_signal_handlers
from batchjob.sandbox import Faults, Sandbox, SandboxSettings, World
from tests.chaos_support import (
    Pair,
    cli_env,
    finish,
    journal_path,
    keys_sent,
    no_traceback,
    start_cli,
    undone_in_journal,
    wait_until,
)
from tests.support import read_report, ticket_rows, write_csv

HEADER = ("Event ID", "Order Ticket Key")
SLOW_JOB = ("--rate", "40", "--batch-size", "5", "--log-format", "json")
#: Far longer than any test may take: a run that waits it out fails by timing out in finish().
GRACE = 3600.0


class HoldingSandbox(Sandbox):
    """Counts the requests its ``slow`` fault holds: they have arrived and get no answer."""

    held = 0

    async def _gate(self, request: Any, event_id: str | None, at: float) -> Any:
        if self.faults.slow >= 1.0:
            self.held += 1
        return await super()._gate(request, event_id, at)


def holding_sandbox(world: World) -> HoldingSandbox:
    return HoldingSandbox(world, SandboxSettings(rate=40.0, burst=1.0, daily_quota=None, seed=3))


def report_pairs(path: Path) -> list[Pair]:
    frame = read_report(path)
    return list(zip(frame.event_id, frame.order_ticket_key, strict=True))


def grace_config(tmp_path: Path) -> Path:
    """An hour of grace, and requests that may take an hour: only a hurry ends them sooner."""
    path = tmp_path / "grace.toml"
    path.write_text(f"grace_period = {GRACE}\nrequest_timeout = {GRACE}\n", encoding="utf-8")
    return path


@pytest.fixture
def reap() -> Iterator[list[asyncio.subprocess.Process]]:
    """Children to kill if a test fails while they still run."""
    children: list[asyncio.subprocess.Process] = []
    yield children
    for child in children:
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()


async def read_until(stream: asyncio.StreamReader | None, marker: str) -> str:
    """Lines of ``stream`` up to and including the first holding ``marker``."""
    assert stream is not None
    seen = ""
    while marker not in seen:
        line = await asyncio.wait_for(stream.readline(), 30)
        assert line, f"the stream ended before {marker!r}"
        seen += line.decode()
    return seen


async def test_a_second_ctrl_c_cancels_requests_in_flight_and_still_writes_every_key(
    tmp_path: Path,
    reap: list[asyncio.subprocess.Process],
) -> None:
    world = World.generate(1, 300, seed=3)
    pairs = ticket_rows(world)
    inputs = write_csv(tmp_path / "in.csv", pairs, HEADER)
    report = tmp_path / "r.csv"
    sandbox = holding_sandbox(world)
    async with sandbox:
        proc = await start_cli(
            "run", str(inputs), "--report", str(report), "--config", str(grace_config(tmp_path)),
            *SLOW_JOB, env=cli_env(sandbox),
        )  # fmt: skip
        reap.append(proc)
        await wait_until(lambda: len(undone_in_journal(journal_path(report))) >= 20,
                         what="journal rows")  # fmt: skip
        # From now on no request is answered: every concurrency slot (4) ends up held.
        sandbox.faults = Faults(slow=1.0, slow_seconds=GRACE)
        await wait_until(lambda: sandbox.held >= 4, what="four requests held")

        proc.send_signal(signal.SIGINT)
        err = await read_until(proc.stderr, '"run.stopping"')  # the first one was heard
        assert proc.returncode is None  # and the run waits for the requests in flight
        proc.send_signal(signal.SIGINT)
        stopped = await finish(proc)  # within 60 s, where the grace period is an hour

    err += stopped.err
    assert stopped.code == 130, err
    assert no_traceback(err)
    assert "SIGINT" in stopped.out and "cancelled" in stopped.out  # the summary says why
    frame = read_report(report)
    assert report_pairs(report) == pairs  # every key exactly once, in input order
    assert set(frame.outcome) == {"undone", "not_attempted"}
    # The four held requests' keys: sent, never answered, so the server may have applied them
    # (here it did not: a rerun sends them again).
    cut = frame[frame.error_key == "interrupted"]
    assert len(cut) == 4 * 5
    assert set(cut.outcome) == {"not_attempted"}
    assert all("may have applied" in m for m in cut.error_message)
    assert all(
        world.checked_in(e, k) for e, k in zip(cut.event_id, cut.order_ticket_key, strict=True)
    )
    # Every key not undone is in the failed-rows file, to be sent again.
    failed = read_report(tmp_path / "r.failed.csv")
    assert set(failed.order_ticket_key) == set(frame[frame.outcome != "undone"].order_ticket_key)
    assert not journal_path(report).exists()


async def test_a_hangup_stops_the_run_gracefully_writes_the_report_and_exits_129(
    tmp_path: Path,
    reap: list[asyncio.subprocess.Process],
) -> None:
    world = World.generate(1, 300, seed=5)
    pairs = ticket_rows(world)
    inputs = write_csv(tmp_path / "in.csv", pairs, HEADER)
    report = tmp_path / "r.csv"
    sandbox = holding_sandbox(world)
    async with sandbox:
        proc = await start_cli("run", str(inputs), "--report", str(report), *SLOW_JOB,
                               env=cli_env(sandbox))  # fmt: skip
        reap.append(proc)
        await wait_until(lambda: len(undone_in_journal(journal_path(report))) >= 20,
                         what="journal rows")  # fmt: skip
        proc.send_signal(signal.SIGHUP)
        stopped = await finish(proc)

    assert stopped.code == 129, stopped.err
    assert no_traceback(stopped.err)
    assert "SIGHUP" in stopped.out
    frame = read_report(report)
    assert report_pairs(report) == pairs
    assert set(frame.outcome) == {"undone", "not_attempted"}
    # A graceful stop: every answer in flight was recorded. (How many requests arrive after
    # the signal depends on how soon the child handles it: not counted, it would be timing.)
    undone = set(frame[frame.outcome == "undone"].order_ticket_key)
    assert keys_sent(r for r in sandbox.requests if r.status == 204) == undone
    assert not journal_path(report).exists()


async def test_a_hangup_with_the_terminal_gone_still_writes_the_report(
    tmp_path: Path, reap: list[asyncio.subprocess.Process]
) -> None:
    """An ssh drop: SIGHUP, and stdout/stderr lead nowhere (writes fail with EPIPE)."""
    world = World.generate(1, 300, seed=6)
    pairs = ticket_rows(world)
    inputs = write_csv(tmp_path / "in.csv", pairs, HEADER)
    report = tmp_path / "r.csv"
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)

    def journaled_while_reading() -> bool:
        with contextlib.suppress(BlockingIOError):
            while os.read(read_end, 1 << 16):
                pass
        return len(undone_in_journal(journal_path(report))) >= 20

    sandbox = holding_sandbox(world)
    async with sandbox:
        proc = await asyncio.create_subprocess_exec(
            *python_m_batchjob(), "run", str(inputs), "--report", str(report), *SLOW_JOB,
            "--log-level", "debug", stdout=write_end, stderr=write_end, env=cli_env(sandbox),
        )  # fmt: skip
        reap.append(proc)
        os.close(write_end)
        try:
            await wait_until(journaled_while_reading, what="journal rows")
        finally:
            os.close(read_end)  # the terminal is gone: every write from now on fails
        proc.send_signal(signal.SIGHUP)
        code = await asyncio.wait_for(proc.wait(), 60)

    assert code == 129
    frame = read_report(report)
    assert report_pairs(report) == pairs
    assert set(frame.outcome) == {"undone", "not_attempted"}
    assert not journal_path(report).exists()


async def test_a_run_started_with_nohup_ignores_the_hangup_and_finishes(
    tmp_path: Path, reap: list[asyncio.subprocess.Process]
) -> None:
    world = World.generate(1, 100, seed=7)
    pairs = ticket_rows(world)
    inputs = write_csv(tmp_path / "in.csv", pairs, HEADER)
    report = tmp_path / "r.csv"
    sandbox = holding_sandbox(world)
    async with sandbox:
        proc = await asyncio.create_subprocess_exec(
            "nohup", *python_m_batchjob(), "run", str(inputs), "--report", str(report),
            *SLOW_JOB, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=cli_env(sandbox),
        )  # fmt: skip
        reap.append(proc)
        await wait_until(lambda: len(undone_in_journal(journal_path(report))) >= 20,
                         what="journal rows")  # fmt: skip
        proc.send_signal(signal.SIGHUP)
        done = await finish(proc)

    assert done.code == 0, done.err
    assert set(read_report(report).outcome) == {"undone"}


def python_m_batchjob() -> tuple[str, ...]:
    return (sys.executable, "-m", "batchjob")


async def test_a_second_hangup_does_not_hurry_but_a_ctrl_c_after_it_does() -> None:
    """One closed terminal can deliver SIGHUP twice (the kernel, then the shell)."""
    stop = StopRequest()
    loop = asyncio.get_running_loop()
    marker = asyncio.Event()  # SIGUSR1, sent after: once it is handled, so is what came before
    loop.add_signal_handler(signal.SIGUSR1, marker.set)
    remove = install_signal_handlers(stop)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.wait_for(stop.event.wait(), 10)
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGUSR1)
        await asyncio.wait_for(marker.wait(), 10)
        assert not stop.hurried.is_set()
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.wait_for(stop.hurried.wait(), 10)
    finally:
        remove()
        loop.remove_signal_handler(signal.SIGUSR1)
    assert (stop.exit_code, stop.reason) == (129, "interrupted by SIGHUP")


class HeldTokenSandbox(Sandbox):
    """Holds every token refresh until the test releases it: a refresh on the wire."""

    def __init__(self, world: World) -> None:
        super().__init__(world, SandboxSettings(rate=None, burst=1.0, daily_quota=None, seed=3))
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def _token(self, request: Any) -> Any:
        await request.post()  # read (and kept by aiohttp) before the client may go
        self.asked.set()
        # Shielded: like a real server, it rotates the token even if the client has gone.
        return await asyncio.shield(self._answer_when_released(request))

    async def _answer_when_released(self, request: Any) -> Any:
        await self.release.wait()
        return await super()._token(request)


async def test_ctrl_c_while_a_refresh_is_answered_never_loses_the_new_refresh_token(
    tmp_path: Path, reap: list[asyncio.subprocess.Process]
) -> None:
    """Refresh tokens rotate: once the endpoint has answered, the old one is spent, so the
    process must live until the new pair is in the file, however often Ctrl-C is pressed."""
    world = World.generate(1, 20, seed=8)
    inputs = write_csv(tmp_path / "in.csv", ticket_rows(world), HEADER)
    report = tmp_path / "r.csv"
    sandbox = HeldTokenSandbox(world)
    async with sandbox:
        token_file = tmp_path / "token.json"
        # No access token: the first request needs a refresh, which the sandbox holds.
        token_file.write_text(json.dumps({"refresh_token": sandbox.refresh_token}))
        env = cli_env(
            CC_BASE_URL=sandbox.base_url,
            CC_TOKEN_URL=sandbox.token_url,
            CC_TOKEN_FILE=str(token_file),
            CC_CLIENT_ID=sandbox.client_id,
        )
        proc = await start_cli("run", str(inputs), "--report", str(report), *SLOW_JOB, env=env)
        reap.append(proc)
        await asyncio.wait_for(sandbox.asked.wait(), 30)
        proc.send_signal(signal.SIGINT)  # the run stops; the refresh is still on the wire
        await wait_until(report.exists, what="the report")
        for _ in range(3):  # impatient presses while it waits for the refresh
            with contextlib.suppress(ProcessLookupError):  # it died of one: asserted below
                proc.send_signal(signal.SIGINT)
            await asyncio.sleep(0.2)
        sandbox.release.set()
        stopped = await finish(proc)

    assert stopped.code == 130, stopped.err
    assert no_traceback(stopped.err)
    assert report_pairs(report) == ticket_rows(world)
    # The pair the endpoint handed out reached the file: the next run can refresh again.
    assert json.loads(token_file.read_text())["refresh_token"] == sandbox.refresh_token
