"""Everything going wrong at once: the real job against a misbehaving sandbox.

Each test switches on several faults together (dropped connections, 500s, gateway 503s with HTML
bodies, answers slower than the job's request timeout, replies lost after the change was
applied, 429 storms), then checks the invariants in :func:`tests.chaos_support.check_run`:
every key reported exactly once, ``undone`` only where it is true, nothing sent again after the
job knew it was done. Then a rerun of the failed-rows file with the faults off must finish the
job. Sandbox rates are high and backoff waits short so the whole file runs in seconds.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchjob import RunResult, StopRequest
from batchjob.sandbox import Faults, Sandbox, SandboxSettings, World
from tests.chaos_support import (
    CrashAfter,
    Pair,
    assert_all_good_keys_undone,
    check_run,
    cli_env,
    crash_run,
    finish,
    journal_path,
    run_recorded,
    start_cli,
    undone_in_journal,
    wait_until,
)
from tests.support import read_report, ticket_rows, write_csv

HEADER = ("Event ID", "Order Ticket Key")
SLOW = 0.45  # seconds a "slow" request waits, above the job's request timeout
TIMEOUT = 0.25  # the job's request timeout in these tests

ALL_FAULTS = Faults(
    drop=0.06,
    error_500=0.05,
    error_503=0.06,
    lost_reply=0.08,
    slow=0.04,
    slow_seconds=SLOW,
    throttle_storm=0.05,
)
# Few tries, so some requests give up under faults and the rerun has work to do.
CHAOS_JOB: dict[str, Any] = {
    "batch_size": 10,
    "request_timeout": TIMEOUT,
    "retry_max_tries": 4,
}


def faults_off(sandbox: Sandbox) -> None:
    # In place: the sandbox reads its own Faults object on every request.
    for name in ("drop", "error_500", "error_503", "lost_reply", "slow", "throttle_storm"):
        setattr(sandbox.faults, name, 0.0)


def chaos_inputs(world: World, tmp_path: Path, *, unknown: int = 4) -> tuple[Path, list[Pair]]:
    """All tickets, with a few unknown keys among them (the API refuses their whole request)."""
    rows = ticket_rows(world)
    pairs = list(rows)
    step = max(1, len(rows) // (unknown + 1))
    for i in range(unknown):
        event_id = rows[(i + 1) * step][0]
        pairs.insert((i + 1) * step + i, (event_id, f"no-such-ticket-{i}"))
    return write_csv(tmp_path / "in.csv", pairs, HEADER), pairs


def good_pairs(world: World, pairs: list[Pair]) -> list[Pair]:
    return [(e, k) for e, k in pairs if e in world.events and k in world.events[e].tickets]


async def settle_stragglers() -> None:
    """Let "slow" requests the job gave up on reach the endpoint, so the log is complete."""
    await asyncio.sleep(SLOW + 0.1)


async def rerun_failed_rows(
    sandbox: Sandbox,
    world: World,
    failed_rows: Path,
    report: Path,
    *,
    carried: set[str],
    **job: Any,
) -> Any:
    """Faults off, rerun the failed-rows file; it must finish every good key it holds."""
    faults_off(sandbox)
    pairs = [(str(e), str(k)) for e, k in zip(*_pairs_of(failed_rows), strict=True)]
    since = len(sandbox.requests)
    result, exchanges = await run_recorded(sandbox, [failed_rows], report, **job)
    check_run(report, pairs, world, sandbox.requests[since:], exchanges, carried=carried)
    rerun = read_report(report)
    assert set(rerun[rerun.outcome != "undone"].outcome) <= {"failed"}
    for event_id, key in zip(
        rerun[rerun.outcome != "undone"].event_id,
        rerun[rerun.outcome != "undone"].order_ticket_key,
        strict=True,
    ):
        assert key not in world.events[event_id].tickets, f"good key {key!r} not undone"
    return result


def _pairs_of(path: Path) -> tuple[list[str], list[str]]:
    from batchjob._cells import unescape_cell

    frame = read_report(path)
    return (
        [unescape_cell(e) for e in frame.event_id],
        [unescape_cell(k) for k in frame.order_ticket_key],
    )


async def rerun_converges(
    sandbox: Sandbox, world: World, pairs: list[Pair], first: RunResult, tmp_path: Path
) -> None:
    """With faults off, the first run's failed-rows file finishes every good key."""
    await rerun_failed_rows(
        sandbox, world, first.failed_rows, tmp_path / "rerun.csv",
        carried=undone_keys(first.report),
    )  # fmt: skip
    assert_all_good_keys_undone(world, good_pairs(world, pairs))


def undone_keys(report: Path) -> set[str]:
    frame = read_report(report)
    return set(frame[frame.outcome == "undone"].order_ticket_key)


# --- all faults at once --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_all_faults_at_once_keep_every_invariant_and_a_rerun_converges(
    tmp_path: Path, seed: int
) -> None:
    world = World.generate(2, 200, seed=100 + seed)
    inputs, pairs = chaos_inputs(world, tmp_path)
    faults = Faults(**vars(ALL_FAULTS))
    settings_ = SandboxSettings(rate=400.0, burst=20.0, daily_quota=None, seed=seed)
    async with Sandbox(world, settings_, faults) as sandbox:
        first, exchanges = await run_recorded(sandbox, [inputs], tmp_path / "r.csv", **CHAOS_JOB)
        await settle_stragglers()

        assert first.exit_code == 1, first.summary()  # the unknown keys at least
        c = sandbox.counters
        fired = [c.dropped, c.lost_replies, c.by_status[500], c.by_status[503], c.throttled,
                 sum(x.status == 0 for x in exchanges) - c.dropped - c.lost_replies]  # fmt: skip
        assert sum(1 for n in fired if n > 0) >= 4, f"too few kinds of fault fired: {fired}"
        report = check_run(first.report, pairs, world, sandbox.requests, exchanges)
        unknown = report[report.order_ticket_key.str.startswith("no-such-ticket")]
        assert set(unknown.outcome) <= {"failed"}
        assert not journal_path(first.report).exists()

        await rerun_converges(sandbox, world, pairs, first, tmp_path)


async def test_daily_quota_running_out_under_faults_stops_truthfully(tmp_path: Path) -> None:
    world = World.generate(2, 150, seed=7)
    inputs, pairs = chaos_inputs(world, tmp_path, unknown=2)
    faults = Faults(**vars(ALL_FAULTS))
    settings_ = SandboxSettings(rate=400.0, burst=20.0, daily_quota=25, seed=9)
    async with Sandbox(world, settings_, faults) as sandbox:
        first, exchanges = await run_recorded(sandbox, [inputs], tmp_path / "r.csv", **CHAOS_JOB)
        await settle_stragglers()

        assert first.exit_code == 3 and "quota" in first.stopped, first.summary()
        report = check_run(
            first.report, pairs, world, sandbox.requests, exchanges,
        )  # fmt: skip
        waiting = report[report.outcome == "not_attempted"]
        assert len(waiting) and waiting.error_message.str.contains("quota|00:00 UTC").all()

        sandbox.reset_quota()
        sandbox.settings.daily_quota = None
        await rerun_converges(sandbox, world, pairs, first, tmp_path)


async def test_a_stop_under_faults_lets_requests_in_flight_finish_truthfully(
    tmp_path: Path,
) -> None:
    """SIGTERM's in-process twin: stop after some keys, while faults keep requests retrying."""
    world = World.generate(2, 150, seed=8)
    inputs, pairs = chaos_inputs(world, tmp_path, unknown=2)
    faults = Faults(**vars(ALL_FAULTS))
    stop = StopRequest()

    class StopAfter(CrashAfter):
        def advance(self, keys: int, rate: float) -> None:
            self.seen += keys
            if self.seen >= self.keys:
                stop.request("interrupted by SIGTERM", 143)

    settings_ = SandboxSettings(rate=400.0, burst=20.0, daily_quota=None, seed=4)
    async with Sandbox(world, settings_, faults) as sandbox:
        first, exchanges = await run_recorded(
            sandbox, [inputs], tmp_path / "r.csv", stop=stop, progress=StopAfter(60),
            **CHAOS_JOB | {"grace_period": 5.0},
        )  # fmt: skip
        await settle_stragglers()

        assert first.exit_code == 143 and "SIGTERM" in first.stopped
        report = check_run(
            first.report, pairs, world, sandbox.requests, exchanges,
        )  # fmt: skip
        assert (report.outcome == "not_attempted").sum() > 0
        # Every answer that came back was recorded: none was cut off by the stop.
        assert not any(x.status == -1 for x in exchanges)

        await rerun_converges(sandbox, world, pairs, first, tmp_path)


async def test_a_key_applied_before_the_quota_ran_out_is_not_reported_as_never_sent(
    tmp_path: Path,
) -> None:
    """Lost reply (applied, no answer), then the retry meets quota_exceeded.

    Deterministic: every undo is applied and its reply lost; the quota admits the event check
    and that one undo only.
    """
    world = World.generate(1, 5, seed=3)
    inputs, pairs = chaos_inputs(world, tmp_path, unknown=0)
    settings_ = SandboxSettings(rate=None, daily_quota=2, seed=1)
    async with Sandbox(world, settings_, Faults(lost_reply=1.0)) as sandbox:
        result, exchanges = await run_recorded(sandbox, [inputs], tmp_path / "r.csv")
        assert result.exit_code == 3 and "quota" in result.stopped
        assert sandbox.counters.lost_replies == 1
        assert world.checked_in_count(pairs[0][0]) == 0  # the server did undo all five
        report = read_report(result.report)
        # They may stay not_attempted for the rerun, but the report must not say they were
        # left alone: it must say, as "retries exhausted" rows do, that the server may have
        # applied it.
        assert report.error_message.str.contains("may").all(), list(report.error_message)
        check_run(result.report, pairs, world, sandbox.requests, exchanges)


class AfterKeys(CrashAfter):
    """Calls ``action`` once, when ``keys`` outcomes have been recorded."""

    def __init__(self, keys: int, action: Callable[[], object]) -> None:
        super().__init__(keys)
        self.action: Callable[[], object] | None = action

    def advance(self, keys: int, rate: float) -> None:
        self.seen += keys
        if self.seen >= self.keys and self.action is not None:
            self.action()
            self.action = None


async def test_the_api_vanishing_mid_run_leaves_a_truthful_report_and_a_rerun_finishes(
    tmp_path: Path,
) -> None:
    """The network drops for good: connections refused until the run stops (exit 3)."""
    world = World.generate(2, 150, seed=51)
    inputs, pairs = chaos_inputs(world, tmp_path, unknown=2)
    faults = Faults(**vars(ALL_FAULTS))
    settings_ = SandboxSettings(rate=400.0, burst=20.0, daily_quota=None, seed=5)
    sandbox = Sandbox(world, settings_, faults)
    await sandbox.start()
    try:
        port = sandbox.port
        outages: list[asyncio.Task[None]] = []
        outage = AfterKeys(80, lambda: outages.append(asyncio.ensure_future(sandbox.stop())))
        # Unreachable after 0.5 s with no answer (60 s by default), within a 2 s budget.
        quick_outage = CHAOS_JOB | {"retry_max_time": 2.0, "unreachable_after": 0.5}
        first, exchanges = await run_recorded(
            sandbox, [inputs], tmp_path / "r.csv", progress=outage, **quick_outage
        )
        await asyncio.gather(*outages)
        await settle_stragglers()

        # Not a normal night: the run stops (exit 3) instead of spending every key's retries,
        # and what it did not do is left for the next run, not failed.
        assert first.exit_code == 3, first.summary()
        assert "cannot be reached (connection refused" in first.stopped
        report = check_run(first.report, pairs, world, sandbox.requests, exchanges)
        left = report[report.outcome == "not_attempted"]
        assert len(left) > 0
        assert left.error_message.str.contains("cannot be reached").all()

        await sandbox.start(port=port)  # the network is back
        await rerun_converges(sandbox, world, pairs, first, tmp_path)
    finally:
        await sandbox.stop()


async def test_a_static_token_expiring_mid_run_stops_truthfully_and_a_new_token_finishes(
    tmp_path: Path,
) -> None:
    """CC_ACCESS_TOKEN cannot be refreshed: the first 401 stops the run (exit 3)."""
    world = World.generate(2, 150, seed=61)
    inputs, pairs = chaos_inputs(world, tmp_path, unknown=2)
    faults = Faults(**vars(ALL_FAULTS))
    settings_ = SandboxSettings(rate=400.0, burst=20.0, daily_quota=None, seed=8)
    async with Sandbox(world, settings_, faults) as sandbox:
        expire = AfterKeys(80, lambda: setattr(sandbox.settings, "access_token_ttl", 0.0))
        first, exchanges = await run_recorded(
            sandbox, [inputs], tmp_path / "r.csv", progress=expire, **CHAOS_JOB
        )
        await settle_stragglers()

        assert first.exit_code == 3 and "401" in first.stopped, first.summary()
        report = check_run(
            first.report, pairs, world, sandbox.requests, exchanges,
        )  # fmt: skip
        assert (report.outcome == "not_attempted").sum() > 0

        sandbox.settings.access_token_ttl = None
        sandbox.issue_access_token()  # a new token, as a person would paste tomorrow
        await rerun_converges(sandbox, world, pairs, first, tmp_path)


# --- a crash under faults, then --resume ---------------------------------------------------------


async def test_kill_9_under_faults_then_resume_sends_nothing_already_done(
    tmp_path: Path,
) -> None:
    world = World.generate(2, 200, seed=21)
    inputs, pairs = chaos_inputs(world, tmp_path, unknown=2)
    faults = Faults(**vars(ALL_FAULTS))
    report = tmp_path / "r.csv"
    config = tmp_path / "job.toml"
    config.write_text(
        f"request_timeout = {TIMEOUT}\nretry_base = 0.005\nretry_cap = 0.05\n"
        "retry_max_tries = 4\nconcurrency = 4\n",
        encoding="utf-8",
    )
    settings_ = SandboxSettings(rate=60.0, burst=1.0, daily_quota=None, seed=12)
    async with Sandbox(world, settings_, faults) as sandbox:
        proc = await start_cli(
            "run", str(inputs), "--report", str(report), "--config", str(config),
            "--rate", "60", "--batch-size", "5", env=cli_env(sandbox),
        )  # fmt: skip
        journal = journal_path(report)
        await wait_until(lambda: len(undone_in_journal(journal)) >= 60, what="journal rows")
        os.kill(proc.pid, signal.SIGKILL)
        killed = await finish(proc)
        assert killed.code == -signal.SIGKILL
        await settle_stragglers()

        before = undone_in_journal(journal)
        assert before, "the journal should hold undone rows"
        for event_id, key in before:  # the journal holds only true outcomes
            assert not world.checked_in(event_id, key)
        assert not report.exists()

        # Resume in-process, faults still on, so both sides of the wire are recorded.
        sandbox.set_rate(400.0, burst=20.0)
        since = len(sandbox.requests)
        resumed, exchanges = await run_recorded(sandbox, [inputs], report, resume=True, **CHAOS_JOB)
        await settle_stragglers()
        carried = {k for _, k in before}
        check_run(report, pairs, world, sandbox.requests[since:], exchanges, carried=carried)
        assert resumed.exit_code == 1, resumed.summary()  # the unknown keys at least
        assert not journal.exists()

        await rerun_failed_rows(
            sandbox, world, resumed.failed_rows, tmp_path / "rerun.csv",
            carried=undone_keys(report),
        )  # fmt: skip
        assert_all_good_keys_undone(world, good_pairs(world, pairs))


async def test_crashes_in_a_row_under_faults_then_resume_finish_exactly_once(
    tmp_path: Path,
) -> None:
    """Three crashes, each resumed, faults on throughout; a last resume finishes the job."""
    world = World.generate(2, 150, seed=31)
    inputs, pairs = chaos_inputs(world, tmp_path, unknown=2)
    faults = Faults(**vars(ALL_FAULTS))
    report = tmp_path / "r.csv"
    journal = journal_path(report)
    settings_ = SandboxSettings(rate=400.0, burst=20.0, daily_quota=None, seed=13)
    async with Sandbox(world, settings_, faults) as sandbox:
        carried: set[str] = set()
        for crash_after in (40, 60, 60):
            since = len(sandbox.requests)
            exchanges: list[Any] = []
            await crash_run(
                run_recorded(
                    sandbox, [inputs], report, resume=True, progress=CrashAfter(crash_after),
                    exchanges=exchanges, **CHAOS_JOB,
                )
            )  # fmt: skip
            await settle_stragglers()
            now_undone = undone_in_journal(journal)
            assert not report.exists()
            # What this run acknowledged is in the journal; nothing carried was sent again.
            acked = {k for x in exchanges if x.method == "POST" and x.status == 204
                     for k in x.keys}  # fmt: skip
            assert acked <= {k for _, k in now_undone}
            assert not carried & {k for r in sandbox.requests[since:] for k in r.keys}
            for event_id, key in now_undone:
                assert not world.checked_in(event_id, key)
            carried = {k for _, k in now_undone}

        since = len(sandbox.requests)
        final, exchanges = await run_recorded(sandbox, [inputs], report, resume=True, **CHAOS_JOB)
        await settle_stragglers()
        check_run(report, pairs, world, sandbox.requests[since:], exchanges, carried=carried)
        await rerun_failed_rows(
            sandbox, world, final.failed_rows, tmp_path / "rerun.csv",
            carried=undone_keys(report),
        )  # fmt: skip
        assert_all_good_keys_undone(world, good_pairs(world, pairs))


# --- properties ----------------------------------------------------------------------------------

share = st.floats(min_value=0.0, max_value=0.25)


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(min_value=0, max_value=2**16),
    drop=share,
    error_500=share,
    error_503=share,
    lost_reply=share,
    slow=st.floats(min_value=0.0, max_value=0.1),
    # Rate-independent 429s, up to 10 %: the pacer tells them from "over the limit", so they
    # no longer drag the rate down (a 5 % storm once took this test 221 s).
    throttle_storm=st.floats(min_value=0.0, max_value=0.10),
    batch_size=st.integers(min_value=1, max_value=16),
    unknown=st.integers(min_value=0, max_value=3),
)
def test_invariants_hold_for_any_mix_of_faults(
    seed: int,
    drop: float,
    error_500: float,
    error_503: float,
    lost_reply: float,
    slow: float,
    throttle_storm: float,
    batch_size: int,
    unknown: int,
) -> None:
    faults = Faults(
        drop=drop,
        error_500=error_500,
        error_503=error_503,
        lost_reply=lost_reply,
        slow=slow,
        slow_seconds=0.2,
        throttle_storm=throttle_storm,
    )

    async def scenario(tmp_path: Path) -> None:
        world = World.generate(1, 40, seed=seed)
        inputs, pairs = chaos_inputs(world, tmp_path, unknown=unknown)
        settings_ = SandboxSettings(rate=None, daily_quota=None, seed=seed)
        async with Sandbox(world, settings_, faults) as sandbox:
            first, exchanges = await run_recorded(
                sandbox, [inputs], tmp_path / "r.csv",
                batch_size=batch_size, request_timeout=0.12, retry_max_tries=3,
            )  # fmt: skip
            await asyncio.sleep(0.25)  # slow stragglers
            check_run(first.report, pairs, world, sandbox.requests, exchanges)
            await rerun_failed_rows(
                sandbox, world, first.failed_rows, tmp_path / "rerun.csv",
                carried=undone_keys(first.report), batch_size=batch_size,
            )  # fmt: skip
            assert_all_good_keys_undone(world, good_pairs(world, pairs))

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp)))


# --- an access token expiring mid-run ------------------------------------------------------------


def _file_token_source() -> Any:
    tokens = importlib.import_module("batchjob._tokens")
    return getattr(tokens, "FileTokenSource", None)


@pytest.mark.skipif(
    _file_token_source() is None,
    reason="needs batchjob._tokens.FileTokenSource (token-file refresh is not written yet)",
)
async def test_tokens_expiring_every_few_hundred_ms_under_faults_lose_nothing(
    tmp_path: Path,
) -> None:
    """Access tokens live 0.3 s and refresh tokens rotate: the run refreshes many times."""
    from batchjob._tokens import read_token_file

    world = World.generate(2, 200, seed=41)
    inputs, pairs = chaos_inputs(world, tmp_path, unknown=2)
    faults = Faults(**vars(ALL_FAULTS))
    settings_ = SandboxSettings(rate=400.0, burst=20.0, daily_quota=None, seed=6,
                                access_token_ttl=0.3)  # fmt: skip
    async with Sandbox(world, settings_, faults) as sandbox:
        token_file = tmp_path / "tokens.json"
        token_file.write_text(
            json.dumps({"access_token": sandbox.access_token,
                        "refresh_token": sandbox.refresh_token, "expires_at": None}),
            encoding="utf-8",
        )  # fmt: skip
        source = _file_token_source()(
            token_file, sandbox.client_id, token_url=sandbox.token_url, retry_waits=(0.01, 0.05)
        )
        try:
            first, exchanges = await run_recorded(
                sandbox, [inputs], tmp_path / "r.csv", tokens=source,
                **CHAOS_JOB | {"batch_size": 5, "rate": 150.0},
            )  # fmt: skip
        finally:
            await source.close()
        await settle_stragglers()

        assert first.stopped == "", first.summary()  # never stopped for a 401
        assert source.refreshes >= 2 and sandbox.counters.token_requests == source.refreshes
        check_run(first.report, pairs, world, sandbox.requests, exchanges)
        # The newest (rotated) refresh token is on disk: tomorrow's run can start from it.
        assert read_token_file(token_file).refresh_token.value == sandbox.refresh_token
        assert token_file.stat().st_mode & 0o777 == 0o600

        sandbox.settings.access_token_ttl = None
        await rerun_converges(sandbox, world, pairs, first, tmp_path)
