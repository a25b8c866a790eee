"""Crash safety and --resume: the nightly job is killed, stopped, run twice or cut short.

Most tests run the real command line (``python -m batchjob run``) as a child process against a
sandbox served by the test's own event loop, so signals, exit codes, locks and files are real.
The sandbox and the job are paced at 40 requests/s with 5 keys a request, so a run lasts long
enough (a second or two) to be interrupted in the middle.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import pytest

from batchjob import JobConfig, ReportError, Secret, StaticToken, run_job
from batchjob.sandbox import Faults, Sandbox, SandboxSettings, World
from tests.chaos_support import (
    CrashAfter,
    Exchange,
    Pair,
    ack_times,
    cells,
    check_run,
    cli,
    cli_env,
    crash_run,
    finish,
    journal_path,
    keys_sent,
    no_traceback,
    run_recorded,
    start_cli,
    undo_requests,
    undone_in_journal,
    wait_until,
)
from tests.support import read_report, ticket_rows, token_for, write_csv

HEADER = ("Event ID", "Order Ticket Key")
SLOW_JOB = ("--rate", "40", "--batch-size", "5", "--log-format", "json")


def slow_sandbox(world: World) -> Sandbox:
    return Sandbox(world, SandboxSettings(rate=40.0, burst=1.0, daily_quota=None, seed=3))


def fast_sandbox(world: World) -> Sandbox:
    return Sandbox(world, SandboxSettings(rate=None, daily_quota=None, seed=3))


def inputs_for(world: World, tmp_path: Path, name: str = "in.csv") -> tuple[Path, list[Pair]]:
    pairs = ticket_rows(world)
    return write_csv(tmp_path / name, pairs, HEADER), pairs


def report_pairs(path: Path) -> list[Pair]:
    frame = read_report(path)
    return list(zip(frame.event_id, frame.order_ticket_key, strict=True))


def leftovers(directory: Path) -> list[str]:
    """Temporary, journal and lock files left in ``directory``."""
    return sorted(
        p.name
        for p in directory.iterdir()
        if p.name.endswith((".tmp", ".journal", ".lock")) or p.name.startswith(".")
    )


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


# --- kill -9 -------------------------------------------------------------------------------------


async def test_kill_9_mid_run_then_resume_finishes_and_resends_nothing_done(
    tmp_path: Path,
) -> None:
    world = World.generate(1, 300, seed=1)
    inputs, pairs = inputs_for(world, tmp_path)
    report = tmp_path / "r.csv"
    journal = journal_path(report)
    async with slow_sandbox(world) as sandbox:
        env = cli_env(sandbox)
        proc = await start_cli("run", str(inputs), "--report", str(report), *SLOW_JOB, env=env)
        await wait_until(lambda: len(undone_in_journal(journal)) >= 40, what="journal rows")
        os.kill(proc.pid, signal.SIGKILL)
        killed = await finish(proc)
        assert killed.code == -signal.SIGKILL
        assert not report.exists()  # no final report: the journal is all there is

        # The journal holds only true outcomes.
        before = undone_in_journal(journal)
        assert before and len(before) < len(pairs)
        for event_id, key in before:
            assert not world.checked_in(event_id, key), f"{key} journaled undone, still in"

        started = sandbox._now()  # the resumed run's requests all arrive after this
        resumed = await cli("run", str(inputs), "--report", str(report), "--resume",
                            *SLOW_JOB, env=env)  # fmt: skip
        assert resumed.code == 0, resumed.err

    frame = read_report(report)
    assert report_pairs(report) == pairs  # every key once, in input order
    assert set(frame.outcome) == {"undone"}
    assert not any(world.events[e].tickets[k] for e, k in pairs)
    # Nothing journaled undone before the kill was sent again.
    again = keys_sent(undo_requests(sandbox, since=started))
    assert not again & {k for _, k in before}
    # Only requests in flight at the kill (applied, never journaled) were sent twice.
    twice = {k for (_, k), n in sandbox.undo_counts.items() if n > 1}
    assert not twice & {k for _, k in before}
    assert len(twice) <= 4 * 5  # concurrency x batch size
    assert leftovers(tmp_path) == []  # the journal and the stale lock are gone
    loaded = re.search(r'"already_undone": (\d+)', resumed.err)
    assert loaded and int(loaded.group(1)) == len(before)


async def test_without_resume_an_earlier_report_or_journal_is_left_alone(
    tmp_path: Path,
) -> None:
    world = World.generate(1, 20, seed=2)
    inputs, _ = inputs_for(world, tmp_path)
    async with fast_sandbox(world) as sandbox:
        env = cli_env(sandbox)
        for existing in ("r.csv", "r.csv.journal"):
            report = tmp_path / "r.csv"
            path = tmp_path / existing
            path.write_bytes(b"event_id,order_ticket_key,outcome\r\nsomething,precious,undone\r\n")
            before = snapshot(tmp_path)

            done = await cli("run", str(inputs), "--report", str(report), env=env)

            assert done.code == 2, done.err
            assert "--resume" in done.err and "another --report" in done.err
            assert "r.csv" in done.err
            assert no_traceback(done.err)
            assert snapshot(tmp_path) == before
            path.unlink()
        assert sandbox.counters.total == 0


DEAD_URL = "http://127.0.0.1:9/v3"


@pytest.mark.parametrize(
    "content",
    [b"Name,Email\nAnn,a@example.com\n", b"\x89PNG\r\n\x1a\n\x00\x00", b'event_id,"unclosed\n'],
)
async def test_resume_on_a_file_that_is_not_a_report_exits_2_and_leaves_it(
    tmp_path: Path, content: bytes
) -> None:
    world = World.generate(1, 5, seed=11)
    inputs, _ = inputs_for(world, tmp_path)
    report = tmp_path / "r.csv"
    report.write_bytes(content)
    # Port 9 (discard): nothing may be sent, and nothing listens there anyway.
    config = JobConfig(inputs=(inputs,), report=report, resume=True, base_url=DEAD_URL)
    with pytest.raises(ReportError, match=r"r\.csv"):
        await run_job(config, tokens=StaticToken(Secret("unused")))
    assert report.read_bytes() == content
    assert leftovers(tmp_path) == []


# --- SIGTERM and SIGINT --------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
async def test_a_signal_stops_dispatching_lets_requests_in_flight_finish_and_writes_all(
    tmp_path: Path, signum: signal.Signals, code: int
) -> None:
    world = World.generate(1, 300, seed=3)
    inputs, pairs = inputs_for(world, tmp_path)
    report = tmp_path / "r.csv"
    journal = journal_path(report)
    async with slow_sandbox(world) as sandbox:
        env = cli_env(sandbox)
        proc = await start_cli("run", str(inputs), "--report", str(report), *SLOW_JOB, env=env)
        await wait_until(lambda: len(undone_in_journal(journal)) >= 40, what="journal rows")
        signalled = sandbox._now()
        os.kill(proc.pid, signum)
        stopped = await finish(proc)

        assert stopped.code == code, stopped.err
        assert signum.name in stopped.out  # the summary says why it stopped
        assert no_traceback(stopped.err)
        frame = read_report(report)
        assert report_pairs(report) == pairs
        assert set(frame.outcome) == {"undone", "not_attempted"}
        waiting = frame[frame.outcome == "not_attempted"]
        assert len(waiting) > 0
        failed_rows = tmp_path / "r.failed.csv"
        assert report_pairs(failed_rows) == list(
            zip(waiting.event_id, waiting.order_ticket_key, strict=True)
        )
        # In flight at the signal: at most one request per concurrency slot went out after it,
        # and every request the server answered 204 is reported undone (none was cut off).
        assert len([r for r in sandbox.requests if r.at > signalled]) <= 4
        undone = set(frame[frame.outcome == "undone"].order_ticket_key)
        assert keys_sent(r for r in sandbox.requests if r.status == 204) == undone
        assert not journal.exists()
        first_undone = undone

        # Finish: SIGTERM's run by --resume on the same report, SIGINT's by the failed rows.
        old_inode = report.stat().st_ino
        started = sandbox._now()
        sandbox.set_rate(None)
        if signum is signal.SIGTERM:
            done = await cli("run", str(inputs), "--report", str(report), "--resume",
                             "--rate", "300", env=env)  # fmt: skip
            final = report
            assert report.stat().st_ino != old_inode  # replaced by a rename, not rewritten
        else:
            final = tmp_path / "rerun.csv"
            done = await cli("run", str(failed_rows), "--report", str(final),
                             "--rate", "300", env=env)  # fmt: skip
        assert done.code == 0, done.err
        assert set(read_report(final).outcome) == {"undone"}
        assert not keys_sent(undo_requests(sandbox, since=started)) & first_undone
        assert not any(world.events[e].tickets[k] for e, k in pairs)
        assert leftovers(tmp_path) == []


# --- one run per report --------------------------------------------------------------------------


async def test_a_second_run_on_the_same_report_is_refused_while_the_first_runs(
    tmp_path: Path,
) -> None:
    world = World.generate(1, 600, seed=4)
    inputs, pairs = inputs_for(world, tmp_path)
    report = tmp_path / "r.csv"
    lock = tmp_path / "r.csv.lock"
    async with slow_sandbox(world) as sandbox:
        env = cli_env(sandbox)
        first = await start_cli("run", str(inputs), "--report", str(report), *SLOW_JOB, env=env)
        await wait_until(
            lambda: lock.exists() and lock.read_text().strip() == str(first.pid),
            what="the first run's lock",
        )
        seconds = await asyncio.gather(
            cli("run", str(inputs), "--report", str(report), env=env),
            cli("run", str(inputs), "--report", str(report), "--resume", env=env),
        )
        assert first.returncode is None  # the first is still running...
        assert lock.read_text().strip() == str(first.pid)  # ...and still holds the lock
        for second in seconds:
            assert second.code == 2, second.err
            assert "another batchjob run" in second.err and str(first.pid) in second.err
            assert no_traceback(second.err)

        os.kill(first.pid, signal.SIGTERM)  # enough seen: the first may stop now
        done = await finish(first)
    assert done.code == 143, done.err
    assert report_pairs(report) == pairs
    # The second runs sent nothing: each ticket undone was undone by exactly one request.
    assert set(sandbox.undo_counts.values()) == {1}
    assert leftovers(tmp_path) == []


# --- a request budget ----------------------------------------------------------------------------


async def test_max_requests_is_never_exceeded_and_the_failed_rows_finish_the_job(
    tmp_path: Path,
) -> None:
    world = World.generate(2, 50, seed=5)
    inputs, pairs = inputs_for(world, tmp_path)
    report = tmp_path / "r.csv"
    async with fast_sandbox(world) as sandbox:
        env = cli_env(sandbox)
        # 2 event checks + 7 undo requests of 10 keys.
        first = await cli("run", str(inputs), "--report", str(report), "--batch-size", "10",
                          "--max-requests", "9", "--rate", "300", env=env)  # fmt: skip

        assert first.code == 3, first.err
        assert sandbox.counters.total == 9
        assert [r.method for r in sandbox.requests].count("GET") == 2
        frame = read_report(report)
        assert report_pairs(report) == pairs
        assert (frame.outcome == "undone").sum() == 70
        waiting = frame[frame.outcome == "not_attempted"]
        assert len(waiting) == 30
        assert waiting.error_message.str.contains("max_requests").all()
        failed_rows = tmp_path / "r.failed.csv"
        assert report_pairs(failed_rows) == list(
            zip(waiting.event_id, waiting.order_ticket_key, strict=True)
        )

        since = len(sandbox.requests)
        rerun = await cli("run", str(failed_rows), "--report", str(tmp_path / "rerun.csv"),
                          "--batch-size", "10", "--rate", "300", env=env)  # fmt: skip
        assert rerun.code == 0, rerun.err
        assert not keys_sent(sandbox.requests[since:]) & set(
            frame[frame.outcome == "undone"].order_ticket_key
        )
    assert not any(world.events[e].tickets[k] for e, k in pairs)


@pytest.mark.parametrize("budget", [0, 1, 5, 12])
async def test_max_requests_counts_event_checks_and_every_retry(
    tmp_path: Path, budget: int
) -> None:
    world = World.generate(3, 40, seed=6)  # 3 checks + 12 undo requests: over every budget
    inputs, pairs = inputs_for(world, tmp_path)
    faults = Faults(error_503=0.3, drop=0.1)
    async with Sandbox(world, SandboxSettings(rate=None, daily_quota=None, seed=budget),
                       faults) as sandbox:  # fmt: skip
        result, exchanges = await run_recorded(
            sandbox, [inputs], tmp_path / "r.csv", max_requests=budget, batch_size=10
        )
        assert sandbox.counters.total <= budget
        assert len(exchanges) <= budget and result.requests <= budget
        assert result.exit_code == 3 and "max_requests" in result.stopped
        frame = check_run(result.report, pairs, world, sandbox.requests, exchanges)
        assert set(frame.outcome) <= {"undone", "not_attempted", "failed"}
        assert (frame.outcome == "not_attempted").sum() > 0


async def test_a_budget_spent_mid_retry_does_not_claim_the_key_was_never_sent(
    tmp_path: Path,
) -> None:
    world = World.generate(1, 5, seed=7)
    inputs, pairs = inputs_for(world, tmp_path)
    async with Sandbox(world, SandboxSettings(rate=None, daily_quota=None),
                       Faults(lost_reply=1.0)) as sandbox:  # fmt: skip
        # The event check, then one undo that is applied and its reply lost; no budget to retry.
        result, exchanges = await run_recorded(
            sandbox, [inputs], tmp_path / "r.csv", max_requests=2
        )
        assert result.exit_code == 3 and sandbox.counters.lost_replies == 1
        assert world.checked_in_count(pairs[0][0]) == 0
        check_run(result.report, pairs, world, sandbox.requests, exchanges)


# --- files left behind ---------------------------------------------------------------------------


async def test_a_clean_finish_leaves_the_report_and_failed_rows_only(tmp_path: Path) -> None:
    world = World.generate(2, 100, seed=8)
    pairs = ticket_rows(world)
    data = [*pairs[:50], (pairs[0][0], "unknown-key"), *pairs[50:]]
    inputs = write_csv(tmp_path / "in.csv", data, HEADER)
    out = tmp_path / "out"
    async with fast_sandbox(world) as sandbox:
        config = JobConfig(inputs=(inputs,), report=out / "r.csv", base_url=sandbox.base_url,
                           rate=300.0, concurrency=8)  # fmt: skip
        result = await run_job(config, tokens=token_for(sandbox))
    assert result.exit_code == 1
    assert sorted(p.name for p in out.iterdir()) == ["r.csv", "r.failed.csv"]
    assert cells(out / "r.failed.csv")[1][1] == "unknown-key"
    assert len(cells(out / "r.csv")) == 1 + len(data)


# --- a crash in the middle of writing the journal ------------------------------------------------


async def crash_then_cut(
    sandbox: Sandbox, inputs: Path, report: Path, cut: str, *, after: int = 60
) -> None:
    """Run until ``after`` keys are recorded, crash, then cut the journal's last record short
    inside its ``cut`` field, as a kill -9 in the middle of a journal write leaves it. The
    journal is a run's record with no store (``--state none``)."""
    await crash_run(
        run_recorded(
            sandbox, [inputs], report, batch_size=10, progress=CrashAfter(after), state="none"
        )
    )
    journal = journal_path(report)
    text = journal.read_text(encoding="utf-8")
    last = text.rstrip("\n").rfind("\n") + 1
    fields = text[last:]
    at = fields.index(",") + 3 if cut == "key" else fields.index('"') + 4
    journal.write_text(text[: last + at], encoding="utf-8")
    assert not journal.read_text(encoding="utf-8").endswith("\n")


async def test_resume_after_a_crash_that_cut_a_quoted_journal_field(tmp_path: Path) -> None:
    world = World.generate(1, 200, seed=9)
    # A comma in the file name: every journal row quotes its source_file.
    inputs, pairs = inputs_for(world, tmp_path, name="scans, night 1.csv")
    report = tmp_path / "r.csv"
    async with fast_sandbox(world) as sandbox:
        await crash_then_cut(sandbox, inputs, report, "source_file")
        before = undone_in_journal(journal_path(report))
        since = len(sandbox.requests)
        result, exchanges = await run_recorded(sandbox, [inputs], report, resume=True, state="none")
        assert result.exit_code == 0
        check_run(report, pairs, world, sandbox.requests[since:], exchanges,
                  carried={k for _, k in before})  # fmt: skip


async def test_two_crashes_in_a_row_never_resend_a_key_the_journal_recorded(
    tmp_path: Path,
) -> None:
    world = World.generate(1, 200, seed=10)
    inputs, pairs = inputs_for(world, tmp_path)
    report = tmp_path / "r.csv"
    async with fast_sandbox(world) as sandbox:
        await crash_then_cut(sandbox, inputs, report, "key")

        # Resume, and crash again: everything this run was told is done must be journaled.
        exchanges: list[Exchange] = []
        await crash_run(run_recorded(sandbox, [inputs], report, resume=True, batch_size=10,
                                     state="none", progress=CrashAfter(60),
                                     exchanges=exchanges))  # fmt: skip
        acked = set(ack_times(exchanges))
        assert acked, "the resumed run should have undone some keys before the crash"
        carried = {k for _, k in undone_in_journal(journal_path(report))} | acked

        since = len(sandbox.requests)
        result, last = await run_recorded(sandbox, [inputs], report, resume=True, state="none")
        assert result.exit_code == 0
        resent = acked & keys_sent(sandbox.requests[since:])
        assert not resent, f"undone and journaled by the second run, sent again: {resent}"
        check_run(report, pairs, world, sandbox.requests[since:], last, carried=carried)
