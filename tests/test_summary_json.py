"""``--summary-json``: the run's record, as docs/summary-json.md says, written atomically on
every run that starts (also one that stops early, and a dry run), never through a link."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from batchjob import JobConfig, ReportError, RunResult, run_job
from batchjob._logging import Redactor
from batchjob.record import write_bytes_atomically
from batchjob.run import _pipeline
from batchjob.run._record import build_record, describe_inputs
from batchjob.sandbox import Sandbox, World
from tests.chaos_support import cli, cli_env
from tests.support import FAST, run, ticket_rows, token_for, write_csv

#: Two tries; an unreachable API is called so after 0.3 s of silence (60 s by default).
QUICKLY: dict[str, Any] = {
    **FAST,
    "retry_max_tries": 2,
    "retry_max_time": 1.0,
    "unreachable_after": 0.3,
}
DOC = Path(__file__).resolve().parent.parent / "docs" / "summary-json.md"
HEADER = ("Event ID", "Order Ticket Key")
#: The doc's type words, as Python types (bool is not an integer here).
TYPES: dict[str, tuple[type, ...]] = {
    "integer": (int,),
    "number": (int, float),
    "string": (str,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}


def documented_fields() -> dict[str, tuple[type, ...]]:
    """The field table of docs/summary-json.md: name -> the types it allows."""
    fields = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| `(\w+)` \| ([a-z ]+) \|", line)
        if match:
            words = match.group(2).split(" or ")
            fields[match.group(1)] = tuple(t for w in words for t in TYPES[w.strip()])
    return fields


def check_record(record: dict[str, Any]) -> None:
    """Every documented field with its type, nothing undocumented, and the nested shapes."""
    fields = documented_fields()
    assert len(fields) > 20
    assert set(record) == set(fields), set(record) ^ set(fields)
    for name, types in fields.items():
        value = record[name]
        assert isinstance(value, types) and not (isinstance(value, bool) and bool not in types), (
            f"{name}: {value!r}"
        )
    assert record["schema_version"] == 1
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{4}", record["run_id"])
    for name in ("started_at", "ended_at"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record[name])
    assert record["started_at"] <= record["ended_at"]
    assert record["run_id"][:8] == record["started_at"][:10].replace("-", "")
    assert record["action"] in ("undo", "check-in")
    for counts in (record["counts"], *record["per_event"].values()):
        assert all(isinstance(v, int) and not isinstance(v, bool) for v in counts.values())
    for item in record["inputs"]:
        assert set(item) == {"path", "size", "sha256"}
        assert item["sha256"] is None or re.fullmatch(r"[0-9a-f]{64}", item["sha256"])
    assert "rate" in record["settings"] and "columns" in record["settings"]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_a_finished_run_writes_its_record(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    rows = [*ticket_rows(world), (ticket_rows(world)[0][0], "no-such-key")]
    inputs = write_csv(tmp_path / "in.csv", rows, HEADER)
    path = tmp_path / "out" / "last-run.json"

    result = await run(sandbox, [inputs], tmp_path, summary_json=path)

    record = json.loads(path.read_text(encoding="ascii"))
    check_record(record)
    assert record["exit_code"] == result.exit_code == 1
    assert record["stop_reason"] is None
    assert record["run_id"] == result.run_id
    assert record["counts"] == result.counts and record["counts"]["failed"] == 1
    assert record["per_event"] == result.per_event
    assert (record["requests"], record["retries"]) == (result.requests, result.retries)
    assert record["inputs"] == [
        {
            "path": str(inputs),
            "size": inputs.stat().st_size,
            "sha256": hashlib.sha256(inputs.read_bytes()).hexdigest(),
        }
    ]
    assert record["base_url"] == sandbox.base_url and record["action"] == "undo"
    assert record["report"] == str(result.report)
    assert record["failed_rows"] == str(result.failed_rows)
    assert record["failed_rows_count"] == 1
    assert sandbox.access_token not in path.read_text()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


async def test_a_run_that_stops_early_and_a_dry_run_write_it_too(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    inputs = write_csv(tmp_path / "in.csv", ticket_rows(world), HEADER)
    path = tmp_path / "run.json"
    config = JobConfig(
        inputs=(inputs,),
        report=tmp_path / "stopped.csv",
        base_url=f"http://127.0.0.1:{closed_port()}/v3",
        summary_json=path,
        **QUICKLY,
    )
    stopped = await run_job(config, tokens=token_for(sandbox))
    record = json.loads(path.read_text())
    check_record(record)
    assert record["exit_code"] == stopped.exit_code == 3
    assert "connection refused" in record["stop_reason"]
    assert record["counts"]["not_attempted"] == len(ticket_rows(world))

    dry = await run(sandbox, [inputs], tmp_path, report="dry.csv", summary_json=path, dry_run=True)
    record = json.loads(path.read_text())
    check_record(record)
    assert record["dry_run"] is True and record["exit_code"] == dry.exit_code == 0
    assert record["requests"] == 0 and record["counts"]["planned"] == len(ticket_rows(world))
    assert record["run_id"] != stopped.run_id


def test_every_text_goes_through_the_redactor(tmp_path: Path) -> None:
    secret = "s3cr3t-token-value-0123456789"
    config = JobConfig(inputs=(tmp_path / f"{secret}.csv",), base_url="https://a.example/v3")
    result = RunResult(
        report=tmp_path / "r.csv",
        failed_rows=tmp_path / "f.csv",
        exit_code=3,
        counts={"undone": 0},
        per_event={"e": {"undone": 0}},
        requests=1,
        retries=0,
        throttled=0,
        elapsed=0.5,
        rate=4.0,
        stopped=f"server said Bearer {secret}\x1b[31m",
        run_id="20261128-000000-abcd",
        started_at="2026-11-28T00:00:00Z",
        ended_at="2026-11-28T00:00:01Z",
    )
    inputs = [{"path": f"/in/{secret}.csv", "size": 1, "sha256": "0" * 64}]

    record = build_record(config, result, inputs, Redactor([secret]))

    text = json.dumps(record)
    assert secret not in text and "***" in record["stop_reason"]
    assert "\x1b" not in record["stop_reason"]  # control characters are escaped
    check_record(record)


@pytest.mark.parametrize(
    "target", ["link", "input", "report", "failed-rows", "journal", "config", "directory"]
)
async def test_a_summary_path_that_is_a_link_an_input_or_the_report_is_refused(
    sandbox: Sandbox, world: World, tmp_path: Path, target: str
) -> None:
    inputs = write_csv(tmp_path / "in.csv", ticket_rows(world)[:5], HEADER)
    elsewhere = tmp_path / "precious.json"
    elsewhere.write_text("keep me")
    path = {
        "link": tmp_path / "link.json",
        "input": inputs,
        "report": tmp_path / "report.csv",
        "failed-rows": tmp_path / "report.failed.csv",
        "journal": tmp_path / "report.csv.journal",
        "config": tmp_path / "settings.toml",
        "directory": tmp_path / "folder",
    }[target]
    extra: dict[str, Any] = {}
    if target == "config":
        path.write_text("rate = 300.0\n")
        extra["config_file"] = path
    if target == "link":
        path.symlink_to(elsewhere)
    if target == "directory":
        path.mkdir()
    input_bytes = inputs.read_bytes()

    with pytest.raises(ReportError, match=r"summary|directory"):
        await run(sandbox, [inputs], tmp_path, summary_json=path, **extra)

    assert not sandbox.requests  # refused before anything was sent
    assert elsewhere.read_text() == "keep me" and inputs.read_bytes() == input_bytes
    assert not (tmp_path / "report.csv").exists()


def test_an_input_that_is_a_pipe_is_not_read_twice(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    plain = write_csv(tmp_path / "in.csv", [("e", "k")], HEADER)
    # Opening the FIFO to read it would block until a writer comes: one comes after 5 s (and
    # closes at once), so that such a bug fails the test instead of hanging it.
    writer = threading.Timer(5.0, lambda: open(fifo, "wb").close())
    writer.daemon = True
    writer.start()
    try:
        described = describe_inputs([fifo, plain])
    finally:
        writer.cancel()
    assert described[0] == {"path": str(fifo), "size": None, "sha256": None}
    assert described[1]["sha256"] == hashlib.sha256(plain.read_bytes()).hexdigest()


def test_a_write_cut_short_leaves_the_old_record_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run.json"
    path.write_text('{"old": true}')

    def killed(fd: int) -> None:
        raise KeyboardInterrupt  # as a signal landing mid-write would

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomically(path, b'{"new": true}')
    assert path.read_text() == '{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


async def test_a_temporary_file_left_by_a_killed_run_is_removed_by_the_next(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    inputs = write_csv(tmp_path / "in.csv", ticket_rows(world)[:5], HEADER)
    path = tmp_path / "run.json"
    dead = 4_194_999  # above Linux's largest pid: no process has it
    stale = tmp_path / f".run.json.{dead}.tmp"
    stale.write_text('{"half": ')

    await run(sandbox, [inputs], tmp_path, summary_json=path)

    assert not stale.exists()
    check_record(json.loads(path.read_text()))


async def test_a_record_that_cannot_be_written_makes_the_run_exit_3(
    sandbox: Sandbox, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(path: Path, record: dict[str, Any]) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_pipeline, "write_summary_json", disk_full)
    inputs = write_csv(tmp_path / "in.csv", ticket_rows(world)[:5], HEADER)

    result = await run(sandbox, [inputs], tmp_path, summary_json=tmp_path / "run.json")

    assert result.exit_code == 3
    assert "cannot write the summary JSON" in result.stopped
    assert result.report.exists()  # the report is written all the same


async def test_the_command_line_writes_it_for_a_broken_night(
    sandbox: Sandbox, world: World, tmp_path: Path
) -> None:
    inputs = write_csv(tmp_path / "in.csv", ticket_rows(world), HEADER)
    config = tmp_path / "c.toml"
    config.write_text(
        "retry_max_tries = 2\nretry_base = 0.001\nretry_cap = 0.01\n"
        "retry_max_time = 1.0\nunreachable_after = 0.3\n"
    )
    env = cli_env(sandbox, CC_BASE_URL=f"http://127.0.0.1:{closed_port()}/v3")

    done = await cli(
        "run", str(inputs), "--report", str(tmp_path / "r.csv"), "--config", str(config),
        "--summary-json", str(tmp_path / "run.json"), "--no-progress", env=env,
    )  # fmt: skip

    assert done.code == 3, done.err
    record = json.loads((tmp_path / "run.json").read_text())
    check_record(record)
    assert record["exit_code"] == 3 and "connection refused" in record["stop_reason"]
    assert record["settings"]["config_file"] == str(config)
    assert sandbox.access_token not in (tmp_path / "run.json").read_text()
