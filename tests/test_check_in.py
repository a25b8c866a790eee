"""``--action check-in``: the same batches to the check-in endpoint, the reverse of undo."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchjob import Action, JobConfig, ReportError
from batchjob.sandbox import Sandbox, World
from tests.chaos_support import cli, cli_env
from tests.support import read_report, run, ticket_rows, write_csv

HEADER = ("Event ID", "Order Ticket Key")


def check_in_posts(sandbox: Sandbox) -> int:
    return sum(1 for r in sandbox.requests if r.path.endswith("/check_in/tickets"))


async def test_undo_then_check_in_puts_every_ticket_back(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    rows = ticket_rows(world)
    inputs = write_csv(tmp_path / "in.csv", rows, HEADER)
    undone = await run(sandbox, [inputs], tmp_path, report="undo.csv")
    assert undone.exit_code == 0
    assert not any(world.checked_in(e, k) for e, k in rows)

    result = await run(sandbox, [inputs], tmp_path, report="back.csv", action=Action.CHECK_IN)

    assert result.exit_code == 0, result.summary()
    assert all(world.checked_in(e, k) for e, k in rows)
    report = read_report(result.report)
    assert set(report.outcome) == {"checked_in"}
    assert result.counts["checked_in"] == len(rows) and result.counts["undone"] == 0
    assert result.action == "check-in" and "action:      check-in" in result.summary()
    # The same batching as undo: ceil(keys / 100) requests per event, plus its check.
    assert check_in_posts(sandbox) == sum(
        -(-len(ev.tickets) // 100) for ev in world.events.values()
    )
    assert max(sandbox.check_in_counts.values()) == 1


async def test_cancelled_tickets_are_found_and_refused_the_rest_checked_in(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    event_id, ev = next(iter(world.events.items()))
    keys = list(ev.tickets)
    cancelled = {keys[3], keys[77]}
    ev.cancelled = set(cancelled)
    for key in ev.tickets:
        ev.tickets[key] = False
    inputs = write_csv(tmp_path / "in.csv", [(event_id, k) for k in keys], HEADER)

    result = await run(sandbox, [inputs], tmp_path, action="check-in")

    assert result.exit_code == 1, result.summary()
    report = read_report(result.report)
    failed = report[report.outcome == "failed"]
    assert set(failed.order_ticket_key) == cancelled
    assert set(failed.http_status) == {"400"}
    assert set(failed.error_key) == {"ticket.status.invalid"}
    assert (report.outcome != "failed").sum() == (report.outcome == "checked_in").sum()
    assert all(ev.tickets[k] == (k not in cancelled) for k in keys)
    failed_rows = read_report(result.failed_rows)
    assert set(failed_rows.order_ticket_key) == cancelled


async def test_a_check_in_run_resumes_as_a_check_in_run(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    rows = ticket_rows(world)
    for ev in world.events.values():
        for key in ev.tickets:
            ev.tickets[key] = False
    inputs = write_csv(tmp_path / "in.csv", rows, HEADER)
    first = await run(sandbox, [inputs], tmp_path, action="check-in", max_requests=4)
    assert first.exit_code == 3
    done = first.counts["checked_in"]
    assert 0 < done < len(rows)

    second = await run(sandbox, [inputs], tmp_path, action="check-in", resume=True)

    assert second.exit_code == 0, second.summary()
    assert set(read_report(second.report).outcome) == {"checked_in"}
    assert max(sandbox.check_in_counts.values()) == 1  # nothing checked in twice
    assert all(world.checked_in(e, k) for e, k in rows)


async def test_resuming_an_undo_report_as_a_check_in_is_refused(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    inputs = write_csv(tmp_path / "in.csv", ticket_rows(world), HEADER)
    assert (await run(sandbox, [inputs], tmp_path, max_requests=5)).exit_code == 3
    before = len(sandbox.requests)

    with pytest.raises(ReportError, match="--action undo"):
        await run(sandbox, [inputs], tmp_path, action="check-in", resume=True)
    assert len(sandbox.requests) == before


def test_a_check_in_report_has_its_own_default_name() -> None:
    assert JobConfig(action=Action.CHECK_IN).report_path().name.startswith("check-in-")
    # A caller may give the text, as a config file does.
    assert JobConfig(action="check-in").action is Action.CHECK_IN  # type: ignore[arg-type]
    assert JobConfig().report_path().name.startswith("undo-check-in-")


async def test_the_command_line_takes_action_check_in(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    event_id, ev = next(iter(world.events.items()))
    key = next(iter(ev.tickets))
    ev.tickets[key] = False
    inputs = write_csv(tmp_path / "in.csv", [(event_id, key)], HEADER)

    done = await cli(
        "run", str(inputs), "--report", str(tmp_path / "r.csv"), "--action", "check-in",
        "--no-progress", env=cli_env(sandbox),
    )  # fmt: skip

    assert done.code == 0, done.err
    assert world.checked_in(event_id, key)
    assert "action:      check-in" in done.out
    assert set(read_report(tmp_path / "r.csv").outcome) == {"checked_in"}
