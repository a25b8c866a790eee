"""The real job against the real sandbox over loopback HTTP: what a user relies on."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openpyxl
import pandas as pd
import pytest

from batchjob import REPORT_COLUMNS, JobConfig, ReportError, RunResult, run_job
from batchjob._errors import StoreError
from batchjob.sandbox import EventState, Sandbox, SandboxSettings, World
from batchjob.send import AiohttpTransport, RawResponse
from tests.support import read_report, run, ticket_rows, token_for, write_csv

HEADER = ("Event ID", "Order Ticket Key", "Name")


def posts_for(sandbox: Sandbox, event_id: str) -> int:
    return sum(1 for r in sandbox.requests if r.method == "POST" and r.event_id == event_id)


async def test_every_key_is_reported_once_in_input_order_and_matches_the_server(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    rows = ticket_rows(world)
    event_a = rows[0][0]
    unknown = [(event_a, "no-such-key-1"), (event_a, "no-such-key-2")]
    data = [(e, k, "x") for e, k in rows[:300]] + [(e, k, "dup") for e, k in rows[:5]]
    data += [(e, k, "?") for e, k in unknown] + [(e, k, "x") for e, k in rows[300:]]
    inputs = write_csv(tmp_path / "in.csv", data, HEADER)

    result = await run(sandbox, [inputs], tmp_path)

    report = read_report(result.report)
    assert tuple(report.columns) == REPORT_COLUMNS
    expected = list(dict.fromkeys((e, k) for e, k, _ in data))
    assert list(zip(report.event_id, report.order_ticket_key, strict=True)) == expected
    for event_id, key, outcome in zip(
        report.event_id, report.order_ticket_key, report.outcome, strict=True
    ):
        if outcome == "undone":
            assert not world.checked_in(str(event_id), str(key))
    assert set(report[report.outcome == "failed"].order_ticket_key) == {k for _, k in unknown}
    assert (report.outcome == "undone").sum() == len(rows)
    assert result.exit_code == 1
    assert result.counts["undone"] == len(rows) and result.counts["failed"] == 2


async def test_transient_faults_are_retried_until_every_key_is_undone(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    sandbox.faults.error_503 = 0.15
    sandbox.faults.error_500 = 0.05
    sandbox.faults.drop = 0.1
    sandbox.faults.lost_reply = 0.1
    inputs = write_csv(tmp_path / "in.csv", [(e, k, "") for e, k in ticket_rows(world)], HEADER)

    result = await run(sandbox, [inputs], tmp_path, batch_size=20, retry_max_tries=12)

    assert result.exit_code == 0, result.summary()
    assert result.retries > 0
    assert sandbox.counters.by_status[503] > 0 and sandbox.counters.dropped > 0
    assert all(not v for ev in world.events.values() for v in ev.tickets.values())


async def test_bad_keys_are_isolated_and_good_keys_in_their_requests_still_undone(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    event_id, ev = next(iter(world.events.items()))
    keys = list(ev.tickets)
    bad = {keys[7] + "x", keys[90] + "x", keys[150] + "x"}
    data = [(event_id, k, "") for k in keys[:100]] + [(event_id, b, "") for b in sorted(bad)]
    data += [(event_id, k, "") for k in keys[100:]]
    inputs = write_csv(tmp_path / "in.csv", data, HEADER)

    result = await run(sandbox, [inputs], tmp_path, batch_size=50)

    report = read_report(result.report)
    failed = report[report.outcome == "failed"]
    assert set(failed.order_ticket_key) == bad
    assert set(failed.http_status) == {"404"} and set(failed.error_key) == {"ticket.not_found"}
    assert set(report[report.outcome == "undone"].order_ticket_key) == set(keys)
    assert not any(ev.tickets.values())
    # 203 keys at 50 a request is 5 requests if all were good; plain halving spends far more.
    assert result.requests - 1 <= 5 + 3 * 7


async def test_an_inactive_event_costs_one_check_and_no_undo_request(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    draft_id = "8f0a3c2e-1b4d-4e5f-9a6b-7c8d9e0f1a2b"
    world.events[draft_id] = EventState("DRAFT", {"k1": True, "k2": True})
    missing_id = "00000000-0000-4000-8000-000000000000"
    data = [(draft_id, "k1", ""), (draft_id, "k2", ""), (missing_id, "k3", "")]
    inputs = write_csv(tmp_path / "in.csv", data, HEADER)

    result = await run(sandbox, [inputs], tmp_path)

    report = read_report(result.report)
    assert list(report.outcome) == ["failed", "failed", "failed"]
    assert "DRAFT" in report.error_message[0]
    assert report.http_status[2] == "404"
    assert posts_for(sandbox, draft_id) == 0 and posts_for(sandbox, missing_id) == 0
    assert world.events[draft_id].tickets == {"k1": True, "k2": True}


async def test_quota_exceeded_stops_the_run_and_the_failed_rows_rerun_finishes_it(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    sandbox.settings.daily_quota = 4
    inputs = write_csv(tmp_path / "in.csv", [(e, k, "") for e, k in ticket_rows(world)], HEADER)

    first = await run(sandbox, [inputs], tmp_path, batch_size=50, concurrency=1)

    assert first.exit_code == 3
    assert "quota" in first.stopped
    report = read_report(first.report)
    waiting = report[report.outcome == "not_attempted"]
    assert len(waiting) > 0 and len(waiting) + (report.outcome == "undone").sum() == len(report)
    assert waiting.error_message.str.contains("00:00 UTC").all()
    failed_rows = read_report(first.failed_rows)
    assert sorted(failed_rows.order_ticket_key) == sorted(waiting.order_ticket_key)

    sandbox.reset_quota()
    sandbox.settings.daily_quota = None
    second = await run(sandbox, [first.failed_rows], tmp_path, report="retry.csv")

    assert second.exit_code == 0
    assert second.counts["undone"] == len(waiting)
    assert all(not v for ev in world.events.values() for v in ev.tickets.values())


async def test_leading_zeros_and_excel_numbers_reach_the_api_as_written(
    tmp_path: Path,
) -> None:
    event_id = "07216444-4e3b-41ea-a3b8-5a418fce41f4"
    world = World({event_id: EventState("ACTIVE", {"000123": True, "123456": True, "42": True})})
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["Event ID", "Ticket Key"])
    sheet.append([event_id, "000123"])  # text cell
    sheet.append([event_id, 123456])  # number cell: Excel stores 123456.0
    sheet.append([event_id, 42.0])
    book.save(tmp_path / "scans.xlsx")

    async with Sandbox(world, SandboxSettings(rate=None, daily_quota=None)) as sandbox:
        result = await run(sandbox, [tmp_path / "scans.xlsx"], tmp_path)

    assert result.exit_code == 0, result.summary()
    assert world.events[event_id].tickets == {"000123": False, "123456": False, "42": False}
    report = read_report(result.report)
    assert list(report.order_ticket_key) == ["000123", "123456", "42"]


async def test_invalid_rows_are_reported_with_file_row_and_column_and_never_sent(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    (event_id, key), *_ = ticket_rows(world)
    data = [(event_id, key, ""), (event_id, "", "no key"), ("not-a-uuid", "abc", "bad event")]
    inputs = write_csv(tmp_path / "in.csv", data, HEADER)

    result = await run(sandbox, [inputs], tmp_path)

    report = read_report(result.report)
    assert list(report.outcome) == ["undone", "invalid", "invalid"]
    assert list(report.source_row) == ["2", "3", "4"]
    assert (report.source_file == str(inputs)).all()
    assert "Order Ticket Key" in report.error_message[1]
    assert "Event ID" in report.error_message[2] and "not-a-uuid" in report.error_message[2]
    sent = {k for r in sandbox.requests for k in r.keys}
    assert sent == {key}
    assert result.exit_code == 1


async def test_dry_run_plans_without_sending(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    inputs = write_csv(tmp_path / "in.csv", [(e, k, "") for e, k in ticket_rows(world)], HEADER)
    result = await run(sandbox, [inputs], tmp_path, dry_run=True)
    assert sandbox.counters.total == 0
    assert set(read_report(result.report).outcome) == {"planned"}
    assert result.exit_code == 0


async def test_a_server_refusing_large_requests_gets_smaller_ones(
    world: World, tmp_path: Path
) -> None:
    settings = SandboxSettings(rate=None, daily_quota=None, max_keys_per_request=30)
    inputs = write_csv(tmp_path / "in.csv", [(e, k, "") for e, k in ticket_rows(world)], HEADER)
    async with Sandbox(world, settings) as sandbox:
        result = await run(sandbox, [inputs], tmp_path, batch_size=100)
    assert result.exit_code == 0, result.summary()
    assert sandbox.counters.by_status[413] >= 1


async def test_a_rejected_token_stops_the_run_and_is_never_printed(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    secret = sandbox.access_token
    inputs = write_csv(tmp_path / "in.csv", [(e, k, "") for e, k in ticket_rows(world)], HEADER)
    log = io.StringIO()
    sandbox.revoke_tokens()

    result = await run(sandbox, [inputs], tmp_path, log=log)

    assert result.exit_code == 3 and "401" in result.stopped
    assert set(read_report(result.report).outcome) == {"not_attempted"}
    everything = log.getvalue() + result.summary() + result.report.read_text()
    everything += result.failed_rows.read_text()
    assert '"status": 401' in log.getvalue()  # the log really saw the refusal...
    assert secret not in everything  # ...and never the token


async def _cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchjob", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_command_line_run_reports_and_exits_by_outcome(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    inputs = write_csv(tmp_path / "in.csv", [(e, k, "") for e, k in ticket_rows(world)], HEADER)
    env = {"CC_ACCESS_TOKEN": sandbox.access_token, "CC_BASE_URL": sandbox.base_url}
    report = tmp_path / "r.csv"

    code, out, err = await _cli(
        "run", str(inputs), "--report", str(report), "--rate", "300", "--log-format", "json",
        "--log-level", "debug", env=env,
    )  # fmt: skip

    assert code == 0, err
    assert "undone 600" in out
    assert '"event": "run.finished"' in err
    assert sandbox.access_token not in out + err + report.read_text()

    again, _, err = await _cli("run", str(inputs), "--report", str(report), env=env)
    assert again == 2 and "--resume" in err


async def test_unreadable_input_stops_before_anything_is_sent(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    good = write_csv(tmp_path / "good.csv", [(e, k, "") for e, k in ticket_rows(world)], HEADER)
    no_key = write_csv(tmp_path / "names.csv", [("Ann", "a@example.com")], ("Name", "Email"))
    env = {"CC_ACCESS_TOKEN": sandbox.access_token, "CC_BASE_URL": sandbox.base_url}

    code, _, err = await _cli(
        "run", str(good), str(no_key), "--report", str(tmp_path / "r"), env=env
    )
    assert code == 2
    assert "names.csv" in err and "Name" in err and "Email" in err
    assert "Traceback" not in err

    code, _, err = await _cli("run", str(tmp_path / "missing.csv"), env=env)
    assert code == 2 and "missing.csv" in err
    assert sandbox.counters.total == 0


def test_insecure_base_url_is_refused(tmp_path: Path) -> None:
    from batchjob import ConfigError

    with pytest.raises(ConfigError, match="clear text"):
        JobConfig(inputs=(tmp_path,), base_url="http://api.example.com/v3")


async def test_library_callers_get_a_result_without_any_logging_setup(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    inputs = write_csv(tmp_path / "in.csv", [(e, k, "") for e, k in ticket_rows(world)], HEADER)
    config = JobConfig(
        inputs=(inputs,), report=tmp_path / "r.csv", base_url=sandbox.base_url, rate=300.0
    )
    result = await run_job(config, tokens=token_for(sandbox))
    assert result.exit_code == 0 and result.counts["undone"] == 600


async def test_an_event_cancelled_mid_run_stops_costing_requests(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    event_id, ev = next(iter(world.events.items()))
    keys = list(ev.tickets)
    inputs = write_csv(tmp_path / "in.csv", [(event_id, k, "") for k in keys], HEADER)

    async def cancel_after_first_undo() -> None:
        # Polls the sandbox's request log: the test has no hook inside the server.
        while posts_for(sandbox, event_id) < 1:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        ev.status = "CANCELLED"

    canceller = asyncio.ensure_future(cancel_after_first_undo())
    result = await run(sandbox, [inputs], tmp_path, batch_size=5, concurrency=2, rate=200.0)
    await canceller

    report = read_report(result.report)
    assert len(report) == len(keys)
    left = report[report.outcome != "undone"]
    assert len(left) > 100
    assert set(left.outcome) == {"failed"}
    assert (left.error_key == "event_not_active").sum() >= len(left) - 10
    # 200 keys at 5 a request: without a fresh look at the event, isolation would spend a
    # request per key. A handful of refusals, one more GET, and it stops.
    assert posts_for(sandbox, event_id) <= 20
    gets = [r for r in sandbox.requests if r.method == "GET" and r.event_id == event_id]
    assert len(gets) == 2


async def test_a_size_limit_is_learned_once_for_the_whole_run(world: World, tmp_path: Path) -> None:
    settings = SandboxSettings(rate=None, daily_quota=None, max_keys_per_request=30)
    inputs = write_csv(tmp_path / "in.csv", [(e, k, "") for e, k in ticket_rows(world)], HEADER)
    async with Sandbox(world, settings) as sandbox:
        result = await run(sandbox, [inputs], tmp_path, batch_size=100, concurrency=4)
    assert result.exit_code == 0, result.summary()
    # 600 keys: 24 requests of 25 once the limit is known, plus 3 event checks and the few
    # 413s in flight when it was learned; halving per 413 would shrink batches to 6 or less.
    assert sandbox.counters.by_status[413] <= 8
    assert result.requests <= 3 + 24 + 8


@pytest.mark.parametrize("state", ["none", "default"])
async def test_resume_never_drops_keys_of_the_report_it_replaces(
    sandbox: Sandbox, world: World, tmp_path: Path, state: str
) -> None:
    sandbox.settings.daily_quota = 3
    inputs = write_csv(tmp_path / "in.csv", [(e, k, "") for e, k in ticket_rows(world)], HEADER)
    first = await run(sandbox, [inputs], tmp_path, concurrency=1, state=state)
    assert first.exit_code == 3
    before = first.report.read_bytes()
    sandbox.settings.daily_quota = None

    # A copy: the failed-rows file itself is this run's output, refused as an input.
    retry = tmp_path / "retry.csv"
    retry.write_bytes(first.failed_rows.read_bytes())
    if state == "none":
        # From the report alone, inputs that leave keys out would lose their record: refused.
        with pytest.raises(ReportError, match="not in these inputs"):
            await run(sandbox, [retry], tmp_path, resume=True, state=state)
        assert first.report.read_bytes() == before
    else:
        # The store holds the run's plan: the keys the inputs leave out come from it.
        partial = await run(sandbox, [retry], tmp_path, resume=True, state=state)
        assert partial.exit_code == 0 and partial.counts["undone"] == 600
        return

    again = await run(sandbox, [inputs], tmp_path, resume=True, state=state)
    assert again.exit_code == 0 and again.counts["undone"] == 600
    # Rows carried over from the first run keep their real finishing time.
    before_rows = pd.read_csv(io.BytesIO(before), dtype=str, keep_default_na=False)
    carried = before_rows[before_rows.outcome == "undone"]
    after = read_report(again.report).set_index("order_ticket_key")
    assert len(carried) > 0
    for key, finished in zip(carried.order_ticket_key, carried.finished_at, strict=True):
        assert after.loc[key, "finished_at"] == finished


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device"),
        ValueError("a bug in the writer"),
        StoreError("state.sqlite3: cannot write the run store: disk I/O error"),
    ],
)
@pytest.mark.parametrize("state", ["default", "none"])  # the run store, or the journal
async def test_a_record_that_cannot_be_written_stops_the_run_and_the_report_keeps_every_key(
    sandbox: Sandbox,
    world: World,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    state: str,
) -> None:
    from batchjob.record import Journal
    from batchjob.run._remember import StoreJournal

    recorder: Any = StoreJournal if state == "default" else Journal
    real_flush = recorder.flush
    flushes = 0

    def disk_fills_up(self: Any) -> None:
        nonlocal flushes
        flushes += 1
        if flushes == 3:
            raise error
        real_flush(self)

    monkeypatch.setattr(recorder, "flush", disk_fills_up)
    rows = ticket_rows(world)
    inputs = write_csv(tmp_path / "in.csv", [(e, k, "") for e, k in rows], HEADER)

    result = await run(sandbox, [inputs], tmp_path, batch_size=10, concurrency=2, state=state)

    assert result.exit_code == 3, result.summary()
    assert str(error) in result.stopped
    report = read_report(result.report)
    assert list(zip(report.event_id, report.order_ticket_key, strict=True)) == rows
    for event_id, key, outcome in zip(
        report.event_id, report.order_ticket_key, report.outcome, strict=True
    ):
        # Undone where the server says so; every other key says it was not attempted.
        assert (outcome == "undone") == (not world.checked_in(str(event_id), str(key)))
        assert outcome in ("undone", "not_attempted")
    assert 0 < (report.outcome == "undone").sum() < len(rows)


Undo = Callable[[AiohttpTransport, str, dict[str, str], bytes | None], Awaitable[RawResponse]]


class UndoThrough:
    """The event check goes to the sandbox; each undo request goes through ``undo``."""

    def __init__(self, real: AiohttpTransport, undo: Undo) -> None:
        self.real = real
        self.undo = undo

    async def request(
        self, method: str, url: str, *, headers: dict[str, str], body: bytes | None
    ) -> RawResponse:
        if method != "POST":
            return await self.real.request(method, url, headers=headers, body=body)
        return await self.undo(self.real, url, headers, body)


async def run_through(
    sandbox: Sandbox, rows: list[tuple[str, str]], tmp_path: Path, undo: Undo, **settings: Any
) -> RunResult:
    inputs = write_csv(tmp_path / "in.csv", [(e, k, "") for e, k in rows], HEADER)
    config = JobConfig(
        inputs=(inputs,), report=tmp_path / "report.csv", base_url=sandbox.base_url, **settings
    )
    session = aiohttp.ClientSession()
    try:
        transport = UndoThrough(AiohttpTransport(session), undo)
        # A guard, not a timing: a run that waits where it should not fails instead of hanging.
        return await asyncio.wait_for(
            run_job(config, tokens=token_for(sandbox), transport=transport), 120
        )
    finally:
        await session.close()


def scripted(*answers: RawResponse) -> Undo:
    """Undo requests get ``answers`` in turn, the last one for ever after."""
    queue = list(answers)

    async def undo(
        real: AiohttpTransport, url: str, headers: dict[str, str], body: bytes | None
    ) -> RawResponse:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return undo


@pytest.mark.parametrize(
    ("fault", "may_have_applied"), [("error_500", True), ("error_503", True), ("drop", True)]
)
async def test_a_request_that_never_succeeds_says_whether_the_server_may_have_applied_it(
    sandbox: Sandbox, world: World, tmp_path: Path, fault: str, may_have_applied: bool
) -> None:
    # A 5xx or a dropped connection leaves it open. (Endless 429s never fail a key: see
    # test_hostile_server.py.)
    async def faulty(
        real: AiohttpTransport, url: str, headers: dict[str, str], body: bytes | None
    ) -> RawResponse:
        setattr(sandbox.faults, fault, 1.0)
        try:
            return await real.request("POST", url, headers=headers, body=body)
        finally:
            setattr(sandbox.faults, fault, 0.0)

    result = await run_through(
        sandbox, ticket_rows(world)[:5], tmp_path, faulty,
        batch_size=5, retry_max_tries=2, retry_base=0.01,
    )  # fmt: skip

    report = read_report(result.report)
    assert set(report.outcome) == {"failed"}, result.summary()
    assert report.error_message.str.startswith("retries exhausted").all()
    assert report.error_message.str.contains("may have applied").all() == may_have_applied


async def test_a_run_stopped_by_the_quota_does_not_wait_for_retries_sleeping_in_backoff(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    # One request is told to come back in 15 minutes (503, Retry-After); the next one meets
    # the daily quota. The sleeping retry could only be refused by then: the run ends at once
    # instead of waiting out the grace period (here longer than the test's patience).
    quota = b'[{"error_key":"quota_exceeded","error_message":"Limit Exceeded"}]'
    answers = scripted(RawResponse(503, {"Retry-After": "900"}, b""), RawResponse(429, {}, quota))

    async def busy_then_quota(
        real: AiohttpTransport, url: str, headers: dict[str, str], body: bytes | None
    ) -> RawResponse:
        answer = await answers(real, url, headers, body)
        if answer.status == 429:
            await asyncio.sleep(0.2)  # the first request is asleep in its backoff by now
        return answer

    result = await run_through(
        sandbox, ticket_rows(world)[:10], tmp_path, busy_then_quota,
        batch_size=5, concurrency=2, grace_period=3600.0,
    )  # fmt: skip

    assert result.exit_code == 3 and "quota" in result.stopped, result.summary()
    report = read_report(result.report)
    assert set(report.outcome) == {"not_attempted"}
    # The one answered 503 may have been applied; the one refused for quota was not.
    may_have_applied = report.error_message.str.contains("may have applied")
    assert may_have_applied.sum() == 5


async def test_a_key_sent_without_an_answer_still_says_so_after_its_request_was_split(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    # 503 (maybe applied), then 400 for a key (the request is split to find it), then the
    # request budget ends the run: keys never resolved must still say they may be applied.
    refusal = b'[{"error_key":"ticket.not_found","error_message":"a key is unknown"}]'
    result = await run_through(
        sandbox,
        ticket_rows(world)[:4],
        tmp_path,
        scripted(RawResponse(503, {}, b""), RawResponse(400, {}, refusal)),
        batch_size=4,
        max_requests=3,  # the event check, the 503, the 400
        retry_base=0.01,
    )

    assert "budget" in result.stopped, result.summary()
    report = read_report(result.report)
    assert set(report.outcome) == {"not_attempted"}
    assert report.error_message.str.contains("sent once without a usable answer").all()


async def test_an_error_message_no_report_can_encode_is_kept_escaped(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    broken = b'[{"error_key":"oops","error_message":"\\ud800 went wrong"}]'
    result = await run_through(
        sandbox,
        ticket_rows(world)[:3],
        tmp_path,
        scripted(RawResponse(500, {}, broken)),
        retry_max_tries=2,
        retry_base=0.01,
    )

    report = read_report(result.report)
    assert set(report.outcome) == {"failed"}, result.summary()
    # The lone surrogate the server sent is shown as its escape, one backslash and "ud800".
    assert report.error_message.str.contains("\\ud800 went wrong", regex=False).all()
