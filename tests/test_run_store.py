"""Runs that remember: skips, carry-over, resume, revert and concurrency through the run
store, each against the real sandbox and a real SQLite file (issue 11's acceptance list)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pyarrow as pa
import pytest

from batchjob import JobConfig, ReportError, run_job
from batchjob._errors import StoreError
from batchjob.sandbox import Sandbox, World
from batchjob.send import AiohttpTransport, RawResponse, Transport, TransportError
from batchjob.store import SCHEMA_VERSION, default_path
from batchjob.store._columns import IDS, IDS_SCHEMA, PLAN, PLAN_SCHEMA, ROWS, ROWS_SCHEMA, encode
from batchjob.store._schema import MIGRATIONS
from batchjob.store._sqlite import open_sqlite
from tests.chaos_support import cli_env, finish, start_cli
from tests.support import FAST, read_report, run, ticket_rows, token_for, write_csv

HEADER = ("Event ID", "Order Ticket Key")


def undo_posts(sandbox: Sandbox) -> list[Any]:
    return [r for r in sandbox.requests if r.method == "POST" and "undo_check_in" in r.path]


def keys_posted(sandbox: Sandbox, since: int = 0) -> set[str]:
    return {k for r in sandbox.requests[since:] if r.method == "POST" for k in r.keys}


async def test_a_second_run_skips_what_the_first_undid_and_sends_only_what_is_new(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    rows = ticket_rows(world)
    first = write_csv(tmp_path / "night1.csv", rows[:300], HEADER)
    cumulative = write_csv(tmp_path / "night2.csv", rows, HEADER)
    one = await run(sandbox, [first], tmp_path, report="r1.csv")
    assert one.exit_code == 0 and one.counts["undone"] == 300
    since = len(sandbox.requests)

    two = await run(sandbox, [cumulative], tmp_path, report="r2.csv")

    assert two.exit_code == 0, two.summary()
    report = read_report(two.report)
    assert len(report) == len(rows)  # every input row reported, exactly once
    skipped = report[report.outcome == "skipped"]
    assert list(skipped.order_ticket_key) == [k for _, k in rows[:300]]
    assert skipped.error_message.str.fullmatch(
        rf"undone by run {one.run_id} at \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ; "
        "--again sends it anyway"
    ).all()
    assert (report.outcome[300:] == "undone").all()
    # Not one request spent on done work.
    assert keys_posted(sandbox, since) == {k for _, k in rows[300:]}
    assert two.already_done == 300
    assert "300 rows skipped (done by earlier runs)" in two.summary()


async def test_again_sends_rows_an_earlier_run_already_did(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    rows = ticket_rows(world)[:50]
    inputs = write_csv(tmp_path / "in.csv", rows, HEADER)
    await run(sandbox, [inputs], tmp_path, report="r1.csv")
    since = len(sandbox.requests)

    again = await run(sandbox, [inputs], tmp_path, report="r2.csv", again=True)

    assert again.exit_code == 0
    assert set(read_report(again.report).outcome) == {"undone"}
    assert keys_posted(sandbox, since) == {k for _, k in rows}


async def test_identity_columns_make_a_new_scan_of_the_same_ticket_new_work(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    (e, k1), (_, k2), (_, k3) = [r for r in ticket_rows(world) if r[0] == ticket_rows(world)[0][0]][
        :3
    ]
    header = ("Event ID", "Order Ticket Key", "Scan Time")
    night1 = write_csv(tmp_path / "n1.csv", [(e, k1, "27 08:00"), (e, k2, "27 08:01")], header)
    # Cumulative: yesterday's rows again, a new scan of k1, and a new ticket.
    night2 = write_csv(
        tmp_path / "n2.csv",
        [(e, k1, "27 08:00"), (e, k2, "27 08:01"), (e, k1, "28 09:30"), (e, k3, "28 09:31")],
        header,
    )
    identity = ("event_id", "order_ticket_key", "scan time")
    await run(sandbox, [night1], tmp_path, report="r1.csv", identity=identity)
    since = len(sandbox.requests)

    two = await run(sandbox, [night2], tmp_path, report="r2.csv", identity=identity)

    report = read_report(two.report)
    outcomes = dict(zip(report.order_ticket_key, report.outcome, strict=True))
    assert outcomes == {k1: "undone", k2: "skipped", k3: "undone"}
    assert keys_posted(sandbox, since) == {k1, k3}
    since = len(sandbox.requests)
    # The same export a third time: every identity is done now, k1's two scans included.
    three = await run(sandbox, [night2], tmp_path, report="r3.csv", identity=identity)
    assert set(read_report(three.report).outcome) == {"skipped"}
    assert keys_posted(sandbox, since) == set()


async def test_pending_after_a_budget_stop_finishes_exactly_what_was_left(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    rows = ticket_rows(world)
    inputs = write_csv(tmp_path / "in.csv", rows, HEADER)
    first = await run(sandbox, [inputs], tmp_path, report="r1.csv", batch_size=20, max_requests=8)
    left = read_report(first.report)
    left = left[left.outcome == "not_attempted"]
    assert first.exit_code == 3 and len(left) > 0
    since = len(sandbox.requests)

    # No input at all: just what is left.
    second = await run(sandbox, [], tmp_path, report="r2.csv", pending=True)

    assert second.exit_code == 0, second.summary()
    report = read_report(second.report)
    assert sorted(report.order_ticket_key) == sorted(left.order_ticket_key)
    assert set(report.outcome) == {"undone"}
    # Where each key came from: the row of the file the first run read.
    assert list(report.source_file.unique()) == [str(inputs)]
    assert second.from_earlier_runs == len(left)
    assert keys_posted(sandbox, since) == set(left.order_ticket_key)
    assert all(world.checked_in(e, k) is False for e, k in rows)

    third = await run(sandbox, [], tmp_path, report="r3.csv", pending=True)
    assert third.exit_code == 0 and len(read_report(third.report)) == 0


async def test_pending_with_the_nightly_export_sends_each_key_once(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    rows = ticket_rows(world)
    inputs = write_csv(tmp_path / "in.csv", rows[:200], HEADER)
    await run(sandbox, [inputs], tmp_path, report="r1.csv", batch_size=20, max_requests=5)
    since = len(sandbox.requests)
    cumulative = write_csv(tmp_path / "in2.csv", rows, HEADER)

    second = await run(sandbox, [cumulative], tmp_path, report="r2.csv", pending=True)

    report = read_report(second.report)
    assert len(report) == len(rows)  # pending keys merged into their input rows
    assert second.from_earlier_runs == 0
    posts = [k for r in sandbox.requests[since:] if r.method == "POST" for k in r.keys]
    assert len(posts) == len(set(posts))


class RefusedAfter:
    """The API stops answering after ``n`` undo POSTs: every connection refused from then on,
    at the same base URL (an outage in the middle of the night)."""

    def __init__(self, inner: Transport, n: int) -> None:
        self.inner, self.n, self.posts = inner, n, 0

    async def request(
        self, method: str, url: str, *, headers: dict[str, str], body: bytes | None
    ) -> RawResponse:
        if method == "POST":
            self.posts += 1
            if self.posts > self.n:
                raise TransportError("connection refused", "connection refused", unreachable=True)
        return await self.inner.request(method, url, headers=headers, body=body)


async def test_pending_after_an_outage_sends_what_the_outage_left(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    rows = ticket_rows(world)
    inputs = write_csv(tmp_path / "in.csv", rows, HEADER)
    quick: dict[str, Any] = {"batch_size": 20, "concurrency": 2, "unreachable_after": 0.3}
    quick |= {"retry_max_tries": 4, "retry_max_time": 1.0, "retry_base": 0.001, "retry_cap": 0.01}
    config = JobConfig(
        inputs=(inputs,), report=tmp_path / "r1.csv", base_url=sandbox.base_url, **(FAST | quick)
    )
    async with aiohttp.ClientSession() as session:
        transport = RefusedAfter(AiohttpTransport(session), n=4)
        first = await run_job(config, tokens=token_for(sandbox), transport=transport)
    assert first.exit_code == 3, first.summary()
    report = read_report(first.report)
    left = set(report.order_ticket_key[report.outcome != "undone"])
    assert left and set(report.outcome) == {"undone", "not_attempted"}

    second = await run(sandbox, [], tmp_path, report="r2.csv", pending=True)

    assert second.exit_code == 0, second.summary()
    assert set(read_report(second.report).order_ticket_key) == left
    assert all(world.checked_in(e, k) is False for e, k in rows)


async def test_resume_against_another_base_url_is_refused(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    inputs = write_csv(tmp_path / "in.csv", ticket_rows(world), HEADER)
    first = await run(sandbox, [inputs], tmp_path, report="r.csv", batch_size=20, max_requests=4)
    assert first.exit_code == 3
    other = World.generate(3, 200, seed=11)
    async with Sandbox(other) as elsewhere:
        with pytest.raises(
            ReportError, match=r"was against http://127\.0\.0\.1:.*resume it against"
        ):
            await run(elsewhere, [inputs], tmp_path, report="r.csv", resume=True)
        assert elsewhere.counters.total == 0
    # Against the API it started with, it resumes.
    resumed = await run(sandbox, [inputs], tmp_path, report="r.csv", resume=True)
    assert resumed.exit_code == 0


async def test_a_run_killed_before_its_report_must_be_resumed_not_overwritten(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    """The store, not a journal file, knows the run did not finish."""
    from tests.chaos_support import CrashAfter, crash_run, run_recorded

    inputs = write_csv(tmp_path / "in.csv", ticket_rows(world), HEADER)
    report = tmp_path / "r.csv"
    await crash_run(run_recorded(sandbox, [inputs], report, batch_size=10, progress=CrashAfter(60)))
    assert not report.exists() and not report.with_name("r.csv.journal").exists()
    with pytest.raises(ReportError, match="did not finish"):
        await run(sandbox, [inputs], tmp_path, report="r.csv")
    resumed = await run(sandbox, [inputs], tmp_path, report="r.csv", resume=True)
    assert resumed.exit_code == 0
    assert set(read_report(report).outcome) == {"undone"}


async def test_two_runs_at_once_on_one_store_both_finish_and_both_are_recorded(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    rows = ticket_rows(world)
    state = tmp_path / "shared.sqlite3"
    inputs = [
        write_csv(tmp_path / "a.csv", rows[::2], HEADER),
        write_csv(tmp_path / "b.csv", rows[1::2], HEADER),
    ]
    env = cli_env(sandbox)
    args = ["--state", str(state), "--rate", "200", "--batch-size", "5"]
    procs = [
        await start_cli("run", str(p), "--report", f"{tmp_path / p.stem}.out", *args, env=env)
        for p in inputs
    ]
    done = await asyncio.gather(*(finish(p) for p in procs))

    for result in done:
        assert result.code == 0, result.err
        assert "database is locked" not in result.err
    store = open_sqlite(state)
    try:
        runs = store.runs(10)
        assert len(runs) == 2 and {r.state for r in runs} == {"finished"}
        stored = [store.rows(r.run_id) for r in runs]
    finally:
        store.close()
    assert sorted(k for frame in stored for k in frame.order_ticket_key) == sorted(
        k for _, k in rows
    )
    with sqlite3.connect(state) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def test_revert_checks_in_what_a_run_undid_and_nothing_a_later_run_touched(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    rows = ticket_rows(world)
    inputs = write_csv(tmp_path / "in.csv", rows, HEADER)
    undo = await run(sandbox, [inputs], tmp_path, report="undo.csv")
    assert undo.exit_code == 0
    # A later run sends some of the same keys again: those are not the first run's to revert.
    later_rows = rows[:10]
    later = write_csv(tmp_path / "later.csv", later_rows, HEADER)
    await run(sandbox, [later], tmp_path, report="later-report.csv", again=True)
    since = len(sandbox.requests)

    dry = await run(
        sandbox, [], tmp_path, report="dry.csv", revert=undo.run_id, action="check-in",
        dry_run=True,
    )  # fmt: skip
    assert set(read_report(dry.report).outcome) == {"planned"}
    assert len(sandbox.requests) == since  # a dry run sends nothing

    revert = await run(
        sandbox, [], tmp_path, report="revert.csv", revert=undo.run_id, action="check-in"
    )

    assert revert.exit_code == 0, revert.summary()
    report = read_report(revert.report)
    assert set(report.outcome) == {"checked_in"}
    reverted = [(e, k) for e, k in zip(report.event_id, report.order_ticket_key, strict=True)]
    assert reverted == rows[10:]
    assert all(world.checked_in(e, k) for e, k in rows[10:])
    assert not any(world.checked_in(e, k) for e, k in later_rows)
    # Reverting again finds nothing left to revert.
    again = await run(
        sandbox, [], tmp_path, report="revert2.csv", revert=undo.run_id, action="check-in"
    )
    assert again.exit_code == 0 and len(read_report(again.report)) == 0


async def test_the_command_line_reverts_a_run_and_says_what_it_cannot_know(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    rows = ticket_rows(world)[:20]
    inputs = write_csv(tmp_path / "in.csv", rows, HEADER)
    undo = await run(sandbox, [inputs], tmp_path, report="undo.csv")
    proc = await start_cli(
        "revert", undo.run_id[:15], "--report", str(tmp_path / "back.csv"), env=cli_env(sandbox)
    )
    done = await finish(proc)
    assert done.code == 0, done.err
    assert "was not checked in will be checked in after this" in done.err
    assert set(read_report(tmp_path / "back.csv").outcome) == {"checked_in"}


async def test_revert_of_an_unknown_run_is_refused(sandbox: Sandbox, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no run 'nope'"):
        await run(sandbox, [], tmp_path, revert="nope", action="check-in")


def test_a_store_made_by_the_previous_schema_opens_and_keeps_its_history(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.sqlite3"
    plan = pa.table(
        {"position": [0], "event_id": ["e"], "order_ticket_key": ["k"], "file": [0],
         "source_row": [2]},
        schema=PLAN_SCHEMA,
    )  # fmt: skip
    rows = pa.table(
        {"position": [0], "outcome": ["undone"], "http_status": [204], "error": [0],
         "attempts": [1], "finished_at": [1.5e9]},
        schema=ROWS_SCHEMA,
    )  # fmt: skip
    ids = pa.table(
        {"identity": ["e\x1fk"], "position": [0], "outcome": ["undone"], "pending": [""],
         "sent": [True], "finished_at": [1.5e9]},
        schema=IDS_SCHEMA,
    )  # fmt: skip
    with sqlite3.connect(path) as db:  # what batchjob with schema 1 wrote
        for statement in MIGRATIONS[0]:
            db.execute(statement)
        db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        db.execute("INSERT INTO apis VALUES (1, 'http://127.0.0.1:9/v3')")
        db.execute(
            "INSERT INTO runs (seq, run_id, api, action, started_at, ended_at, exit_code, "
            "report, requests) VALUES (1, '20261101-020000-abcd', 1, 'undo', "
            "'2026-11-01T02:00:00Z', '2026-11-01T02:01:00Z', 0, '/r.csv', 1)"
        )
        db.execute("INSERT INTO run_files VALUES (1, 0, 'in.csv')")
        for number, (kind, table) in enumerate([(PLAN, plan), (ROWS, rows), (IDS, ids)]):
            db.execute(
                "INSERT INTO chunks (run, number, kind, data) VALUES (1, ?, ?, ?)",
                (number, kind, encode(table)),
            )

    store = open_sqlite(path)
    try:
        (old,) = store.runs(5)
        assert old.run_id == "20261101-020000-abcd" and old.state == "finished"
        assert old.host == "" and old.pid == 0  # columns schema 2 added
        done = store.done("http://127.0.0.1:9/v3", "undone", ["e\x1fk", "e\x1fother"])
        assert list(done.index) == [0] and done.run_id == ["20261101-020000-abcd"]
        assert list(store.rows(old.run_id).order_ticket_key) == ["k"]
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        version = db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
    assert int(version[0]) == SCHEMA_VERSION


def test_a_store_from_a_newer_batchjob_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    open_sqlite(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE name = 'schema_version'")
    before = path.read_bytes()
    with pytest.raises(StoreError, match="schema version 99, newer than this batchjob"):
        open_sqlite(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("what", ["link", "side-link", "garbage", "other-db"])
def test_a_store_path_that_is_not_a_store_of_ours_is_refused(tmp_path: Path, what: str) -> None:
    path = tmp_path / "state.sqlite3"
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    if what == "link":
        path.symlink_to(target)
    elif what == "side-link":
        Path(f"{path}-wal").symlink_to(target)
    elif what == "garbage":
        path.write_bytes(b"not a database at all, but long enough to be read as one" * 100)
    else:
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE mine (x)")
    with pytest.raises(StoreError):
        open_sqlite(path)
    assert target.read_bytes() == b""


async def test_state_none_runs_without_a_store_as_before(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    inputs = write_csv(tmp_path / "in.csv", ticket_rows(world)[:20], HEADER)
    await run(sandbox, [inputs], tmp_path, report="r1.csv", state="none")
    second = await run(sandbox, [inputs], tmp_path, report="r2.csv", state="none")
    assert set(read_report(second.report).outcome) == {"undone"}  # nothing remembered
    assert not default_path().exists()
    assert second.state == "" and "store:" not in second.summary()


async def test_a_dry_run_reads_the_store_and_records_nothing(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    rows = ticket_rows(world)[:30]
    inputs = write_csv(tmp_path / "in.csv", rows, HEADER)
    first = await run(sandbox, [inputs], tmp_path, report="r1.csv")
    dry = await run(sandbox, [inputs], tmp_path, report="r2.csv", dry_run=True)
    assert set(read_report(dry.report).outcome) == {"skipped"}  # what a real run would do
    store = open_sqlite(default_path())
    try:
        assert [r.run_id for r in store.runs(10)] == [first.run_id]
    finally:
        store.close()


# --- found by the adversarial review ------------------------------------------------------------


async def test_a_killed_pending_run_can_be_resumed_with_or_without_inputs(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    """Its keys came from the store: --resume finds them there again (it used to refuse:
    'keys of the earlier run are not in these inputs')."""
    from tests.chaos_support import CrashAfter, crash_run, run_recorded

    rows = ticket_rows(world)
    second_in = write_csv(tmp_path / "in2.csv", rows[250:350], HEADER)
    for part, inputs, name in ((rows[:250], [second_in], "with"), (rows[350:], [], "without")):
        # A night stopped by its budget leaves keys pending...
        first_in = write_csv(tmp_path / f"in1-{name}.csv", part, HEADER)
        first = await run(
            sandbox, [first_in], tmp_path, report=f"r1-{name}.csv", batch_size=10, max_requests=3
        )
        assert first.exit_code == 3
        # ... the next night takes them, is killed, and is resumed.
        report = tmp_path / f"r2-{name}.csv"
        await crash_run(
            run_recorded(
                sandbox, inputs, report, batch_size=10, pending=True, progress=CrashAfter(120)
            )
        )
        resumed = await run(
            sandbox, inputs, tmp_path, report=report.name, pending=True, resume=True
        )
        assert resumed.exit_code == 0, resumed.summary()
        got = read_report(resumed.report)
        assert len(got) == len(set(zip(got.event_id, got.order_ticket_key, strict=True)))
    assert not any(world.checked_in(e, k) for e, k in rows)


async def test_a_resumed_run_reports_what_is_true_now_after_a_revert_of_the_killed_run(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    from tests.chaos_support import CrashAfter, crash_run, run_recorded

    rows = ticket_rows(world)
    inputs = write_csv(tmp_path / "in.csv", rows, HEADER)
    report = tmp_path / "r.csv"
    await crash_run(
        run_recorded(sandbox, [inputs], report, batch_size=10, progress=CrashAfter(100))
    )
    store = open_sqlite(default_path())
    try:
        (killed,) = store.runs(5)
    finally:
        store.close()
    back = await run(
        sandbox, [], tmp_path, report="back.csv", revert=killed.run_id, action="check-in"
    )
    assert back.exit_code == 0 and len(read_report(back.report)) >= 100

    resumed = await run(sandbox, [inputs], tmp_path, report="r.csv", resume=True)

    out = read_report(resumed.report)
    lies = [
        (e, k)
        for e, k, o in zip(out.event_id, out.order_ticket_key, out.outcome, strict=True)
        if o == "undone" and world.checked_in(e, k)
    ]
    assert lies == []
    assert resumed.exit_code == 0 and not any(world.checked_in(e, k) for e, k in rows)


async def test_revert_after_a_resume_reverts_every_key_the_two_runs_undid(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    from tests.chaos_support import CrashAfter, crash_run, run_recorded

    rows = ticket_rows(world)
    inputs = write_csv(tmp_path / "in.csv", rows, HEADER)
    report = tmp_path / "r.csv"
    await crash_run(
        run_recorded(sandbox, [inputs], report, batch_size=10, progress=CrashAfter(100))
    )
    resumed = await run(sandbox, [inputs], tmp_path, report="r.csv", resume=True)
    assert resumed.exit_code == 0

    back = await run(
        sandbox, [], tmp_path, report="back.csv", revert=resumed.run_id, action="check-in"
    )

    assert back.exit_code == 0
    assert all(world.checked_in(e, k) for e, k in rows)  # the carried keys too


async def test_a_stopped_check_in_run_leaves_its_keys_pending_for_check_in(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    rows = ticket_rows(world)
    inputs = write_csv(tmp_path / "in.csv", rows, HEADER)
    assert (await run(sandbox, [inputs], tmp_path, report="u.csv")).exit_code == 0
    stopped = await run(
        sandbox, [inputs], tmp_path, report="c.csv", action="check-in", batch_size=10,
        max_requests=5,
    )  # fmt: skip
    assert stopped.exit_code == 3
    report = read_report(stopped.report)
    left = set(report.order_ticket_key[report.outcome == "not_attempted"])
    more = await run(sandbox, [], tmp_path, report="c2.csv", action="check-in", pending=True)
    assert set(read_report(more.report).order_ticket_key) == left


def test_an_sqlite_file_of_another_app_is_refused_and_never_written(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    db = sqlite3.connect(path)
    with db:
        db.execute("CREATE TABLE mine (x)")
        db.execute("INSERT INTO mine VALUES (1)")
    db.close()
    before = path.read_bytes()
    with pytest.raises(StoreError) as caught:
        open_sqlite(path)
    assert str(path) in str(caught.value)
    assert path.read_bytes() == before  # not even switched to WAL mode


@pytest.mark.parametrize(
    "planted",
    [
        "CREATE TRIGGER t AFTER INSERT ON runs BEGIN DELETE FROM chunks; END",
        "CREATE VIEW v AS SELECT * FROM runs",
        "CREATE TABLE extra (x)",
    ],
)
def test_a_store_holding_objects_batchjob_did_not_make_is_refused(
    tmp_path: Path, planted: str
) -> None:
    path = tmp_path / "s.sqlite3"
    open_sqlite(path).close()
    db = sqlite3.connect(path)
    with db:
        db.execute(planted)
    db.close()
    with pytest.raises(StoreError, match="objects batchjob did not make"):
        open_sqlite(path)


@pytest.mark.skipif(os.name != "posix", reason="mode bits")
def test_a_store_others_may_write_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    open_sqlite(path).close()
    path.chmod(0o666)
    with pytest.raises(StoreError, match="can be written by other users"):
        open_sqlite(path)
