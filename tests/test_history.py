"""``batchjob runs``: the run store's history, listed, shown and its reports written again.

Real runs against the sandbox fill each test's own default store (tests/conftest.py), then the
command line runs in-process (``batchjob._cli.main``) and its output is read as a person or a
script would.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from aiohttp import web

from batchjob import JobConfig, RunResult, Secret, StaticToken, run_job
from batchjob._cli import main
from batchjob.sandbox import Sandbox, World
from batchjob.store import (
    IDS_SCHEMA,
    PLAN_SCHEMA,
    ROWS_SCHEMA,
    RunStart,
    default_path,
    open_store,
)
from tests.support import FAST, run, ticket_rows, write_csv

HEADER = ("event_id", "order_ticket_key")
MISSING_EVENT = "07216444-4e3b-41ea-a3b8-5a418fce41f4"


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``batchjob ARGS`` in-process: (exit code, stdout, stderr)."""
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 2
    out, err = capsys.readouterr()
    return code, out, err


def runs_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code, out, err = cli(capsys, "runs", "--json", *args)
    assert code == 0, err
    document: dict[str, Any] = json.loads(out)
    return document


async def plain_run(
    sandbox: Sandbox, world: World, tmp_path: Path, name: str, first_key: int = 0
) -> RunResult:
    """50 keys undone, from the ``first_key``-th of the world's."""
    pairs = ticket_rows(world)[first_key : first_key + 50]
    path = write_csv(tmp_path / f"{name}.csv", pairs, HEADER)
    return await run(sandbox, [path], tmp_path, report=f"{name}-report.csv")


async def hostile_run(sandbox: Sandbox, world: World, tmp_path: Path) -> RunResult:
    """A run whose report holds every kind of cell: undone and failed keys, invalid rows,
    formula-like keys, commas, quotes, non-ASCII, errors with punctuation, an odd file name."""
    event = next(iter(world.events))
    rows = [
        *ticket_rows(world)[:30],
        (event, '=HYPERLINK("http://evil.example/?a=1,b=2","click")'),
        (event, "+1,2"),
        (event, "-@x"),
        (event, 'a,b"c'),
        (event, "'=already escaped"),
        (event, "clé-ü-ключ"),
        ("not-a-uuid", "k1"),
        (event, ""),
        (MISSING_EVENT, "zz"),
        (f" {event.upper()} ", ticket_rows(world)[40][1]),
    ]
    path = write_csv(tmp_path / 'in, "odd" =name.csv', rows, HEADER)
    return await run(sandbox, [path], tmp_path, report="hostile-report.csv")


async def test_runs_lists_every_run_newest_first(
    sandbox: Sandbox, world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = await plain_run(sandbox, world, tmp_path, "first")
    second = await plain_run(sandbox, world, tmp_path, "second", 50)
    code, out, err = cli(capsys, "runs")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["RUN", "STARTED", "TOOK", "ACTION", "RESULT", "COUNTS", "INPUTS"]
    assert [line.split()[0] for line in lines[1:]] == [second.run_id, first.run_id]
    assert "exit 0" in lines[1] and "undone 50" in lines[1] and "second.csv" in lines[1]
    assert "exit 0" in lines[2] and "undone 50" in lines[2] and "first.csv" in lines[2]
    code, out, _ = cli(capsys, "runs", "--limit", "1")
    assert code == 0 and len(out.splitlines()) == 2 and second.run_id in out


async def test_runs_json_has_the_counts_and_the_documented_fields(
    sandbox: Sandbox, world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = await plain_run(sandbox, world, tmp_path, "first")
    second = await hostile_run(sandbox, world, tmp_path)
    document = runs_json(capsys)
    assert document["schema_version"] == 1
    assert document["store"] == str(default_path())
    assert [r["run_id"] for r in document["runs"]] == [second.run_id, first.run_id]
    newest = document["runs"][0]
    assert set(newest) == {
        "run_id",
        "state",
        "exit_code",
        "action",
        "base_url",
        "started_at",
        "ended_at",
        "elapsed_seconds",
        "requests",
        "stop_reason",
        "counts",
        "counts_from",
        "inputs",
        "report",
        "host",
        "pid",
    }
    assert newest["counts"] == second.counts
    assert newest["counts_from"] == "record"
    assert newest["state"] == "finished" and newest["exit_code"] == second.exit_code == 1
    assert newest["action"] == "undo" and newest["base_url"] == sandbox.base_url
    assert newest["started_at"] == second.started_at and newest["ended_at"] == second.ended_at
    assert newest["requests"] == second.requests and newest["stop_reason"] is None
    assert newest["report"] == str(tmp_path / "hostile-report.csv")
    assert [i["path"] for i in newest["inputs"]] == [str(tmp_path / 'in, "odd" =name.csv')]
    assert len(newest["inputs"][0]["sha256"]) == 64
    assert newest["host"] == socket.gethostname() and newest["pid"] == os.getpid()
    assert document["runs"][1]["counts"]["undone"] == 50


async def test_show_prints_one_run_with_its_counts_by_event(
    sandbox: Sandbox, world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = await hostile_run(sandbox, world, tmp_path)
    code, out, err = cli(capsys, "runs", "show", result.run_id)
    assert code == 0, err
    assert f"run:         {result.run_id}" in out
    assert "state:       finished, exit 1" in out
    assert f"report:      {tmp_path / 'hostile-report.csv'}" in out
    assert f"failed rows: {result.failed_rows} ({result.failed_rows_count} rows)" in out
    assert "outcomes:    " in out and "per event:" in out
    per_event = out.split("per event:\n", 1)[1].splitlines()
    assert len(per_event) == len(result.per_event)
    for event_id, counts in result.per_event.items():
        shown = [line for line in per_event if line.startswith(f"  {event_id}: ")]
        assert len(shown) == 1, (event_id, per_event)
        for outcome, n in counts.items():
            assert (f"{outcome} {n}" in shown[0]) == bool(n), (outcome, shown[0])

    document = runs_json(capsys, "show", result.run_id)
    shown_run = document["run"]
    assert shown_run["per_event"] == result.per_event
    assert shown_run["counts"] == result.counts
    assert shown_run["record"]["run_id"] == result.run_id
    assert shown_run["failed_rows"] == str(result.failed_rows)
    assert shown_run["failed_rows_count"] == result.failed_rows_count
    # --json before or after the subcommand; --state too.
    code, out, _ = cli(capsys, "runs", "--state", str(default_path()), "show", result.run_id[:15])
    assert code == 0 and result.run_id in out


async def test_report_writes_the_run_report_again_byte_for_byte(
    sandbox: Sandbox, world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hostile = await hostile_run(sandbox, world, tmp_path)
    whole = await run(
        sandbox,
        [write_csv(tmp_path / "all.csv", ticket_rows(world), HEADER)],
        tmp_path,
        report="all.csv.report",
        again=True,
    )
    for result in (hostile, whole):
        out = tmp_path / "again" / f"{result.run_id}.csv"
        code, stdout, err = cli(capsys, "runs", "report", result.run_id, "--out", str(out))
        assert code == 0, err
        assert out.read_bytes() == result.report.read_bytes()
        assert f"({sum(result.counts.values())} rows)" in stdout
    report = hostile.report.read_text(encoding="utf-8")
    assert "'=HYPERLINK" in report and "invalid" in report and "event.not_found" in report
    written = sorted(p.name for p in (tmp_path / "again").iterdir())
    assert written == sorted(f"{r.run_id}.csv" for r in (hostile, whole))  # no temporary file


async def test_report_again_after_server_errors_with_commas_quotes_and_formulas(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Error keys and messages the server chose: quoted, escaped and cut as the run wrote them."""
    error = [{"error_key": "=cmd|' /C calc'!A0", "error_message": 'bad, "quoted"\r\n+next, é'}]

    async def event(request: web.Request) -> web.Response:
        return web.json_response({"event_id": request.match_info["id"], "status": "ACTIVE"})

    async def undo(request: web.Request) -> web.Response:
        body = await request.json()
        if "ok" in body["order_ticket_keys"][0]:
            return web.Response(status=204)
        return web.json_response(error, status=400)

    app = web.Application()
    app.router.add_get("/v3/events/{id}", event)
    app.router.add_post("/v3/events/{id}/undo_check_in/tickets", undo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        pairs = [(MISSING_EVENT, f"ok-{n}") for n in range(5)]
        pairs += [(MISSING_EVENT, key) for key in ("@SUM(1,2)", 'x"y', "-1", "plain")]
        path = write_csv(tmp_path / "in.csv", pairs, HEADER)
        settings: dict[str, Any] = {**FAST, "batch_size": 1}
        config = JobConfig(
            inputs=(path,),
            report=tmp_path / "report.csv",
            base_url=f"http://127.0.0.1:{port}/v3",
            **settings,
        )
        result = await run_job(config, tokens=token_for_anyone())
    finally:
        await runner.cleanup()
    assert result.counts["failed"] == 4 and result.counts["undone"] == 5
    assert "'=cmd" in result.report.read_text(encoding="utf-8")
    out = tmp_path / "again.csv"
    code, _, err = cli(capsys, "runs", "report", result.run_id, "--out", str(out))
    assert code == 0, err
    assert out.read_bytes() == result.report.read_bytes()


def token_for_anyone() -> StaticToken:
    return StaticToken(Secret("any-token-0123456789"))


async def test_report_of_a_run_stopped_early_holds_its_not_attempted_rows(
    sandbox: Sandbox, world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_csv(tmp_path / "in.csv", ticket_rows(world), HEADER)
    result = await run(sandbox, [path], tmp_path, batch_size=10, max_requests=5)
    assert result.exit_code == 3 and result.counts["not_attempted"]
    out = tmp_path / "again.csv"
    code, _, err = cli(capsys, "runs", "report", result.run_id, "--out", str(out))
    assert code == 0, err
    assert out.read_bytes() == result.report.read_bytes()
    summary = runs_json(capsys)["runs"][0]
    assert summary["exit_code"] == 3 and summary["stop_reason"] == result.stopped != ""
    code, out_text, _ = cli(capsys, "runs")
    assert "exit 3" in out_text


async def test_report_never_replaces_a_file_without_force_nor_writes_through_a_link(
    sandbox: Sandbox, world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = await plain_run(sandbox, world, tmp_path, "first")
    out = tmp_path / "mine.csv"
    out.write_text("my own file\n")
    code, _, err = cli(capsys, "runs", "report", result.run_id, "--out", str(out))
    assert code == 2 and "already exists" in err and "--force" in err
    assert out.read_text() == "my own file\n"

    code, _, err = cli(capsys, "runs", "report", result.run_id, "--out", str(out), "--force")
    assert code == 0, err
    assert out.read_bytes() == result.report.read_bytes()

    target = tmp_path / "target.txt"
    target.write_text("not yours\n")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    for extra in ((), ("--force",)):
        code, _, err = cli(capsys, "runs", "report", result.run_id, "--out", str(link), *extra)
        assert code == 2 and "symbolic link" in err
        assert link.is_symlink() and target.read_text() == "not yours\n"

    for extra in ((), ("--force",)):
        code, _, err = cli(
            capsys, "runs", "report", result.run_id, "--out", str(default_path()), *extra
        )
        assert code == 2, err
    store = open_store("default")  # the store is still a store
    assert store is not None and [r.run_id for r in store.runs(5)] == [result.run_id]
    store.close()
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


async def test_run_ids_unknown_ambiguous_and_prefixes(
    sandbox: Sandbox, world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = await plain_run(sandbox, world, tmp_path, "first")
    second = await plain_run(sandbox, world, tmp_path, "second", 50)
    for command in (("show",), ("report",)):
        extra = ("--out", str(tmp_path / "x.csv")) if command == ("report",) else ()
        code, out, err = cli(capsys, "runs", *command, "19990101-000000-dead", *extra)
        assert code == 2 and "no run '19990101-000000-dead'" in err and "batchjob runs" in err
        assert not (tmp_path / "x.csv").exists()
    # Both runs start with the same date: a prefix that names both is refused.
    common = "20"  # every run id of this century
    code, _, err = cli(capsys, "runs", "show", common)
    assert code == 2 and "more than one run" in err
    code, out, err = cli(capsys, "runs", "show", second.run_id[:-1])
    if first.run_id[:-1] != second.run_id[:-1]:
        assert code == 0 and second.run_id in out, err
    code, out, err = cli(capsys, "runs", "show", first.run_id)
    assert code == 0 and first.run_id in out


def test_state_none_is_no_run_store(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (("runs",), ("runs", "--json"), ("runs", "show", "2026")):
        code, _, err = cli(capsys, *args, "--state", "none")
        assert code == 2 and "no run store" in err


def test_state_none_from_the_environment_and_a_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "settings.toml"
    config.write_text('state = "none"\n')
    code, _, err = cli(capsys, "runs", "--config", str(config))
    assert code == 2 and "no run store" in err
    monkeypatch.setenv("BATCHJOB_STATE", "none")
    code, _, err = cli(capsys, "runs")
    assert code == 2 and "no run store" in err


def test_a_store_not_there_yet_lists_nothing_and_is_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, "runs")
    assert code == 0, err
    assert out == f"no runs recorded in {default_path()}\n"
    assert not default_path().exists() and not default_path().parent.exists()
    assert runs_json(capsys)["runs"] == []
    elsewhere = tmp_path / "state.sqlite3"
    code, _, err = cli(capsys, "runs", "show", "2026", "--state", str(elsewhere))
    assert code == 2 and "no run '2026'" in err
    assert not elsewhere.exists()


def test_limit_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "runs", "--limit", "0")
    assert code == 2 and "--limit" in err


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _plan(positions: list[int], event: str) -> pa.Table:
    n = len(positions)
    return pa.table(
        {
            "position": positions,
            "event_id": [event] * n,
            "order_ticket_key": [f"k{p}" for p in positions],
            "file": [0] * n,
            "source_row": [p + 2 for p in positions],
        },
        schema=PLAN_SCHEMA,
    )


def _rows(positions: list[int], outcome: str) -> pa.Table:
    n = len(positions)
    return pa.table(
        {
            "position": positions,
            "outcome": [outcome] * n,
            "http_status": [204 if outcome == "undone" else 0] * n,
            "error": [0] * n,
            "attempts": [1 if outcome == "undone" else 0] * n,
            "finished_at": [1_800_000_000.5 if outcome == "undone" else None] * n,
        },
        schema=ROWS_SCHEMA,
    )


_NO_IDS = IDS_SCHEMA.empty_table()


@pytest.mark.skipif(os.name != "posix", reason="a dead process is told apart on POSIX only")
def test_a_run_that_died_shows_what_it_recorded_and_has_no_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = open_store("default")
    assert store is not None
    run_id = "20261128-023000-0bad"
    store.begin_run(
        RunStart(
            run_id=run_id,
            base_url="http://127.0.0.1:9/v3",
            action="undo",
            started_at="2026-11-28T02:30:00Z",
            report=str(tmp_path / "night.csv"),
            files=["night \x1b[31mred.csv"],
            host=socket.gethostname(),
            pid=_dead_pid(),
        )
    )
    store.add_plan(run_id, _plan([0, 1, 2, 5], MISSING_EVENT), None)
    store.record(run_id, _rows([0, 1, 2], "undone"), _NO_IDS, [])
    store.record(run_id, _rows([5], "invalid"), _NO_IDS, [])
    store.close()

    code, out, err = cli(capsys, "runs")
    assert code == 0, err
    line = out.splitlines()[1]
    assert line.split()[:3] == [run_id, "2026-11-28T02:30:00Z", "-"]
    assert "died" in line and "undone 3, invalid 1 so far" in line
    summary = runs_json(capsys)["runs"][0]
    assert summary["state"] == "died" and summary["exit_code"] is None
    assert summary["counts"]["undone"] == 3 and summary["counts_from"] == "rows"
    assert summary["inputs"] is None and summary["ended_at"] is None
    code, out, err = cli(capsys, "runs", "show", run_id)
    assert code == 0, err
    assert "died (no end recorded)" in out and f"{MISSING_EVENT}: undone 3, invalid 1" in out

    code, _, err = cli(capsys, "runs", "report", run_id, "--out", str(tmp_path / "r.csv"))
    assert code == 2 and "died" in err and "--resume" in err
    assert not (tmp_path / "r.csv").exists()


async def test_a_report_whose_rows_were_pruned_is_refused(
    sandbox: Sandbox, world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = await plain_run(sandbox, world, tmp_path, "first")
    out = tmp_path / "again.csv"
    db = sqlite3.connect(default_path())
    with db:  # the plan's rows stay; the outcomes of the last 10 are gone
        db.execute("DELETE FROM chunks WHERE kind = 'rows'")
    store = open_store("default")
    assert store is not None
    store.record(result.run_id, _rows(list(range(40)), "undone"), _NO_IDS, [])
    store.close()
    code, _, err = cli(capsys, "runs", "report", result.run_id, "--out", str(out))
    assert code == 2 and "holds 40 of the 50 report rows" in err
    with db:
        db.execute("DELETE FROM chunks")
    db.close()
    code, _, err = cli(capsys, "runs", "report", result.run_id, "--out", str(out))
    assert code == 2 and "no report rows" in err
    assert not out.exists()
    # Listing and showing still work: the counts are the run's record.
    assert runs_json(capsys)["runs"][0]["counts"]["undone"] == 50


async def test_control_characters_from_the_store_never_reach_the_terminal(
    sandbox: Sandbox, world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_csv(tmp_path / "in\x1b]0;pwned\x07\u202e.csv", ticket_rows(world)[:5], HEADER)
    await run(sandbox, [path], tmp_path, report="r\x1b[2J.csv")
    for args in (("runs",), ("runs", "show", "2"), ("runs", "--json")):
        code, out, err = cli(capsys, *args)
        assert code == 0, err
        assert not any(c in out for c in "\x1b\x07\u202e"), out
    code, out, _ = cli(capsys, "runs", "show", "2")
    assert "in\\x1b]0;pwned\\x07\\u202e.csv" in out and "r\\x1b[2J.csv" in out


async def test_prune_drops_old_runs_rows_and_keeps_what_they_did(
    sandbox: Sandbox, world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = ticket_rows(world)[:40]
    inputs = write_csv(tmp_path / "in.csv", rows, HEADER)
    first = await run(sandbox, [inputs], tmp_path, report="1.csv")
    size = sum(p.stat().st_size for p in default_path().parent.iterdir())

    code, out, err = cli(capsys, "runs", "prune", "--older-than", "0")

    assert code == 0, err
    assert "pruned 1 runs" in out
    assert sum(p.stat().st_size for p in default_path().parent.iterdir()) <= size
    code, _, err = cli(capsys, "runs", "report", first.run_id, "--out", str(tmp_path / "x.csv"))
    assert code == 2 and "no report rows" in err
    assert runs_json(capsys)["runs"][0]["counts"]["undone"] == 40  # still listed, with counts
    # What it did still counts: the same export is skipped, not sent again.
    since = len(sandbox.requests)
    second = await run(sandbox, [inputs], tmp_path, report="2.csv")
    assert second.already_done == 40 and len(sandbox.requests) == since


def test_prune_refuses_a_negative_age(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "runs", "prune", "--older-than", "-1")
    assert code == 2 and "--older-than" in err
