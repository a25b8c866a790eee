"""The files batchjob writes: never through a link, never over an input or over another of its
own files; a bad journal line is blamed on the journal; a kill's leftovers are cleaned up.

Real files, real symbolic and hard links, a real FIFO, a real child process killed with
SIGKILL; the API is the loopback sandbox, and every refusal is checked to send nothing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, cast

import numpy as np
import pytest

from batchjob import REPORT_COLUMNS, JobConfig, ReportError, run_job
from batchjob.plan import Positions
from batchjob.record import Journal, ReportLock, ReportPaths, RowWriter, remove_stale_temp_files
from batchjob.record._final import _write_atomically
from batchjob.sandbox import Sandbox, SandboxSettings, World
from tests.chaos_support import (
    CrashAfter,
    cli,
    cli_env,
    crash_run,
    finish,
    journal_path,
    no_traceback,
    run_recorded,
    start_cli,
)
from tests.support import read_report, ticket_rows, token_for, write_csv

HEADER = ("Event ID", "Order Ticket Key")
PRECIOUS = b"precious: not batchjob's\n"


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def fast_sandbox(world: World) -> Sandbox:
    return Sandbox(world, SandboxSettings(rate=None, daily_quota=None, seed=3))


def inputs_for(world: World, tmp_path: Path) -> Path:
    return write_csv(tmp_path / "in.csv", ticket_rows(world), HEADER)


def report_shaped(path: Path, world: World, outcome: str = "failed") -> Path:
    """A report of an earlier run over ``world``'s keys: what a failed-rows file looks like."""
    rows = [
        (e, k, outcome, "404", "", "", "1", "in.csv", str(i + 2), "")
        for i, (e, k) in enumerate(ticket_rows(world))
    ]
    return write_csv(path, rows, REPORT_COLUMNS)


def dry_run(inputs: Path, report: Path, **settings: object) -> JobConfig:
    return JobConfig(inputs=(inputs,), report=report, dry_run=True, **settings)  # type: ignore[arg-type]


# --- 1. no write through a link batchjob did not create ------------------------------------------


def symlink_to_victim(lock: Path, victim: Path) -> None:
    victim.write_bytes(PRECIOUS)
    lock.symlink_to(victim)


def dangling_symlink(lock: Path, victim: Path) -> None:
    lock.symlink_to(victim)  # the victim does not exist: opening the link would create it


def hard_link(lock: Path, victim: Path) -> None:
    victim.write_bytes(PRECIOUS)
    os.link(victim, lock)


def fifo(lock: Path, victim: Path) -> None:
    os.mkfifo(lock)


def foreign_text(lock: Path, victim: Path) -> None:
    lock.write_bytes(PRECIOUS)  # someone's own file that happens to have the name


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (symlink_to_victim, "symbolic link"),
        (dangling_symlink, "symbolic link"),
        (hard_link, "hard links"),
        (fifo, "not a regular file"),
        (foreign_text, "not a batchjob lock file"),
    ],
)
async def test_a_lock_file_batchjob_did_not_make_is_refused_never_emptied(
    tmp_path: Path, make: Callable[[Path, Path], None], message: str
) -> None:
    inputs = inputs_for(World.generate(1, 5, seed=1), tmp_path)
    report, victim = tmp_path / "r.csv", tmp_path / "victim.txt"
    lock = tmp_path / "r.csv.lock"
    make(lock, victim)
    existed = victim.exists()

    with pytest.raises(ReportError, match=message):
        await run_job(dry_run(inputs, report))

    assert victim.exists() == existed
    if existed:
        assert victim.read_bytes() == PRECIOUS
    if make is foreign_text:
        assert lock.read_bytes() == PRECIOUS
    assert lock.is_symlink() or lock.exists()  # refused, not removed: it is not batchjob's
    assert not report.exists()


async def test_a_stale_lock_of_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    inputs = inputs_for(World.generate(1, 5, seed=1), tmp_path)
    report = tmp_path / "r.csv"
    (tmp_path / "r.csv.lock").write_text("4194304")  # a pid no process has now
    result = await run_job(dry_run(inputs, report))
    assert result.exit_code == 0
    assert not (tmp_path / "r.csv.lock").exists()


class _OneRow:
    def write(self, fh: IO[str], positions: Positions, keys: list[str] | None = None) -> None:
        fh.write("e,k,undone,204,,,1,in.csv,2,\r\n")


@pytest.mark.parametrize("link", ["symlink", "hard link"])
def test_a_temporary_file_is_always_a_new_file(tmp_path: Path, link: str) -> None:
    target, victim = tmp_path / "r.csv", tmp_path / "victim.txt"
    victim.write_bytes(PRECIOUS)
    # The name is predictable: put a link there before batchjob writes.
    planted = tmp_path / f".r.csv.{os.getpid()}.tmp"
    if link == "symlink":
        planted.symlink_to(victim)
    else:
        os.link(victim, planted)

    _write_atomically(target, cast(RowWriter, _OneRow()), np.arange(1, dtype=np.int64))

    assert victim.read_bytes() == PRECIOUS
    assert target.read_bytes().endswith(b"\r\ne,k,undone,204,,,1,in.csv,2,\r\n")
    assert not target.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "victim.txt"]


async def test_a_run_never_writes_through_links_put_at_its_temporary_names(
    tmp_path: Path,
) -> None:
    world = World.generate(1, 5, seed=1)
    inputs = inputs_for(world, tmp_path)
    report = tmp_path / "r.csv"
    victims = [tmp_path / "victim-1.txt", tmp_path / "victim-2.txt"]
    for name, victim in zip(("r.csv", "r.failed.csv"), victims, strict=True):
        symlink_to_victim(tmp_path / f".{name}.{os.getpid()}.tmp", victim)

    result = await run_job(dry_run(inputs, report))

    assert result.exit_code == 0
    assert [v.read_bytes() for v in victims] == [PRECIOUS, PRECIOUS]
    assert len(read_report(report)) == len(ticket_rows(world))
    assert names(tmp_path) == [
        "in.csv", "r.csv", "r.failed.csv", "victim-1.txt", "victim-2.txt",
    ]  # fmt: skip


@pytest.mark.parametrize("kind", ["dangling symlink", "symlink to a report", "hard link"])
async def test_a_journal_batchjob_did_not_make_is_never_appended_to(
    tmp_path: Path, kind: str
) -> None:
    world = World.generate(1, 20, seed=2)
    inputs = inputs_for(world, tmp_path)
    report = tmp_path / "r.csv"
    journal = journal_path(report)
    other = tmp_path / "other.csv"
    if kind == "dangling symlink":
        journal.symlink_to(other)  # a new run: opening it for append would create other.csv
    else:
        # Another run's report, of these very keys: a --resume would read it, then append.
        report_shaped(other, world)
        if kind == "symlink to a report":
            journal.symlink_to(other)
        else:
            os.link(other, journal)
    before = other.read_bytes() if other.exists() else None

    async with fast_sandbox(world) as sandbox:
        config = JobConfig(inputs=(inputs,), report=report, base_url=sandbox.base_url,
                           rate=300.0, resume=kind != "dangling symlink")  # fmt: skip
        with pytest.raises(ReportError, match=r"symbolic link|hard links") as refused:
            await run_job(config, tokens=token_for(sandbox))
        assert sandbox.counters.total == 0
    assert str(journal) in str(refused.value)
    assert (other.read_bytes() if other.exists() else None) == before
    assert not report.exists()


@pytest.mark.parametrize("which", ["report", "failed_rows"])
async def test_a_report_or_failed_rows_path_that_is_a_link_is_refused(
    tmp_path: Path, which: str
) -> None:
    inputs = inputs_for(World.generate(1, 5, seed=1), tmp_path)
    link, target = tmp_path / "link.csv", tmp_path / "target.csv"
    link.symlink_to(target)
    # The rename would replace the link itself and leave its target alone: not what anyone
    # pointing a link there means, so it is refused.
    settings = {"failed_rows": link} if which == "failed_rows" else {}
    report = link if which == "report" else tmp_path / "r.csv"
    with pytest.raises(ReportError, match="symbolic link"):
        await run_job(dry_run(inputs, report, **settings))
    assert link.is_symlink() and not target.exists()


# --- 2. no output over an input or over another output -------------------------------------------


def _same_report(tmp_path: Path, world: World) -> dict[str, object]:
    # Two spellings of one file: relative (from the working directory) and absolute.
    return {"report": Path("r.csv"), "failed_rows": tmp_path / "sub" / ".." / "r.csv"}


def _the_journal(tmp_path: Path, world: World) -> dict[str, object]:
    return {"report": tmp_path / "r.csv", "failed_rows": tmp_path / "r.csv.journal"}


def _an_input(tmp_path: Path, world: World) -> dict[str, object]:
    return {"report": tmp_path / "r.csv", "failed_rows": Path("./in.csv")}


def _a_hard_link_of_an_input(tmp_path: Path, world: World) -> dict[str, object]:
    os.link(tmp_path / "in.csv", tmp_path / "in-too.csv")
    return {"report": tmp_path / "r.csv", "failed_rows": tmp_path / "in-too.csv"}


def _report_is_an_input(tmp_path: Path, world: World) -> dict[str, object]:
    # An earlier failed-rows file rerun with --resume on itself, reached through a linked folder.
    report_shaped(tmp_path / "in.csv", world)
    (tmp_path / "alias").symlink_to(tmp_path)
    return {"report": tmp_path / "alias" / "in.csv", "resume": True}


def _lock_is_an_input(tmp_path: Path, world: World) -> dict[str, object]:
    os.link(tmp_path / "in.csv", tmp_path / "r.csv.lock")
    return {"report": tmp_path / "r.csv"}


def _journal_is_an_input(tmp_path: Path, world: World) -> dict[str, object]:
    report_shaped(tmp_path / "in.csv", world)
    os.link(tmp_path / "in.csv", tmp_path / "r.csv.journal")
    return {"report": tmp_path / "r.csv", "resume": True}


def _the_token_file(tmp_path: Path, world: World) -> dict[str, object]:
    (tmp_path / "token.json").write_text('{"refresh_token": "only-copy"}')
    return {"report": tmp_path / "r.csv", "failed_rows": tmp_path / "token.json",
            "token_file": tmp_path / "token.json"}  # fmt: skip


def _the_token_lock(tmp_path: Path, world: World) -> dict[str, object]:
    return {"report": tmp_path / "token.json.lock", "token_file": tmp_path / "token.json"}


def _the_config_file(tmp_path: Path, world: World) -> dict[str, object]:
    (tmp_path / "nightly.toml").write_text("rate = 4\n")
    return {"report": tmp_path / "r.csv", "failed_rows": tmp_path / "nightly.toml",
            "config_file": tmp_path / "nightly.toml"}  # fmt: skip


def _a_name_too_long_for_its_temporary_file(tmp_path: Path, world: World) -> dict[str, object]:
    # 240 bytes fit the file system; ".<name>.<pid>.tmp", written at the end, would not.
    return {"report": tmp_path / ("r" * 236 + ".csv")}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (_the_token_file, r"the failed-rows file .* is the token file"),
        (_the_token_lock, r"the report .* is the token file's lock"),
        (_the_config_file, r"the failed-rows file .* is the config file"),
        (_a_name_too_long_for_its_temporary_file, r"its name is too long"),
        (_same_report, r"--failed-rows .* is the report"),
        (_the_journal, r"--failed-rows .* is the report's journal"),
        (_an_input, r"the failed-rows file .* is the input file"),
        (_a_hard_link_of_an_input, r"the failed-rows file .* is the input file"),
        (_report_is_an_input, r"the report .* is the input file"),
        (_lock_is_an_input, r"the report's lock file .* is the input file"),
        (_journal_is_an_input, r"the report's journal .* is the input file"),
    ],
)
async def test_outputs_that_are_an_input_or_each_other_are_refused_before_anything_is_sent(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: Callable[[Path, World], dict[str, object]],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    world = World.generate(1, 20, seed=3)
    inputs_for(world, tmp_path)
    settings = case(tmp_path, world)
    before = contents(tmp_path)

    async with fast_sandbox(world) as sandbox:
        config = JobConfig(inputs=(Path("in.csv"),), base_url=sandbox.base_url, rate=300.0,
                           **settings)  # type: ignore[arg-type]  # fmt: skip
        with pytest.raises(ReportError, match=message):
            await run_job(config, tokens=token_for(sandbox))
        assert sandbox.counters.total == 0
    assert contents(tmp_path) == before


async def test_the_command_line_exits_2_when_failed_rows_would_overwrite_an_input(
    tmp_path: Path,
) -> None:
    world = World.generate(1, 5, seed=4)
    inputs = inputs_for(world, tmp_path)
    before = inputs.read_bytes()
    async with fast_sandbox(world) as sandbox:
        done = await cli("run", str(inputs), "--report", str(tmp_path / "r.csv"),
                         "--failed-rows", str(inputs), env=cli_env(sandbox))  # fmt: skip
        assert sandbox.counters.total == 0
    assert done.code == 2, done.err
    assert "is the input file" in done.err and no_traceback(done.err)
    assert inputs.read_bytes() == before
    assert names(tmp_path) == ["in.csv"]


# --- 3. a bad journal line is blamed on the journal, with its line -------------------------------


def insert_line(path: Path, number: int, text: str) -> None:
    lines = path.read_bytes().split(b"\n")
    lines.insert(number - 1, text.encode() + b"\r")
    path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize(
    ("line", "garbage"),
    [
        (4, "a line of text, not a record"),
        (4, "{event},not-in-the-inputs,undone,204,,,1,in.csv,9,2024-05-01T10:00:00Z"),
        (4, "{event},{key},undone,204,,,many,in.csv,2,2024-05-01T10:00:00Z"),
        (4, '{event},"{key},undone,204'),
        # The first record, a field too many: pandas would take the first column as an index.
        (2, "{event},{key},undone,204,,,1,in.csv,2,2024-05-01T10:00:00Z,extra"),
    ],
)
async def test_resume_names_the_journal_and_the_line_it_cannot_use(
    tmp_path: Path, line: int, garbage: str
) -> None:
    world = World.generate(1, 200, seed=5)
    inputs = inputs_for(world, tmp_path)
    event, key = ticket_rows(world)[0]
    report = tmp_path / "r.csv"
    journal = journal_path(report)
    async with fast_sandbox(world) as sandbox:
        # The journal is the record of a run without a store.
        await crash_run(
            run_recorded(
                sandbox, [inputs], report, batch_size=10, progress=CrashAfter(60), state="none"
            )
        )
        insert_line(journal, line, garbage.format(event=event, key=key))
        before = journal.read_bytes()
        sent = sandbox.counters.total

        with pytest.raises(ReportError) as refused:
            await run_recorded(sandbox, [inputs], report, resume=True, state="none")

        assert sandbox.counters.total == sent
    assert str(refused.value).startswith(f"{journal}, line {line}: ")
    assert journal.read_bytes() == before


async def test_a_journal_that_is_not_one_is_refused_on_resume_never_emptied(
    tmp_path: Path,
) -> None:
    world = World.generate(1, 5, seed=7)
    inputs = inputs_for(world, tmp_path)
    report = tmp_path / "r.csv"
    journal = journal_path(report)
    journal.write_bytes(b"someone's notes, one long line with no newline")
    async with fast_sandbox(world) as sandbox:
        config = JobConfig(inputs=(inputs,), report=report, base_url=sandbox.base_url,
                           rate=300.0, resume=True)  # fmt: skip
        with pytest.raises(ReportError, match="not a batchjob report or journal"):
            await run_job(config, tokens=token_for(sandbox))
        assert sandbox.counters.total == 0
    assert journal.read_bytes() == b"someone's notes, one long line with no newline"


async def test_a_fifo_in_the_journal_s_place_is_refused_not_waited_on(tmp_path: Path) -> None:
    world = World.generate(1, 5, seed=8)
    inputs = inputs_for(world, tmp_path)
    report = tmp_path / "r.csv"
    os.mkfifo(journal_path(report))
    async with fast_sandbox(world) as sandbox:
        # A child process: opening a FIFO for writing with no reader blocks for ever.
        proc = await start_cli("run", str(inputs), "--report", str(report), "--resume",
                               env=cli_env(sandbox))  # fmt: skip
        try:
            done = await finish(proc, within=60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert sandbox.counters.total == 0
    assert done.code == 2, done.err
    assert "not a regular file" in done.err


# --- 4. a kill while writing the report leaves a temporary file: the next run removes it ---------


async def test_only_this_report_s_temporary_files_with_a_dead_writer_are_removed(
    tmp_path: Path,
) -> None:
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await child.wait()  # reaped: its pid names no process now
    dead, alive = child.pid, os.getppid()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(PRECIOUS)
    stale = [
        f".r.csv.{dead}.tmp",
        f".r.failed.csv.{dead}.tmp",
        f".r.csv.{os.getpid()}.tmp",  # ours: this process writes its own within one call
        f".r.csv.{10**30}.tmp",  # no process has such a pid
    ]
    kept = [
        f".r.csv.{alive}.tmp",  # its writer may be at work
        f".other.csv.{dead}.tmp",  # another report's
        f".r.csv.x{dead}.tmp",
        f"r.csv.{dead}.tmp",
    ]
    for name in [*stale, *kept]:
        (tmp_path / name).write_bytes(b"partial")
    link = f".r.failed.csv.{dead + 10**9}.tmp"  # a link to a victim: the link goes, not it
    (tmp_path / link).symlink_to(victim)
    folder = f".r.csv.{dead}1.tmp"  # a folder is never removed
    (tmp_path / folder).mkdir()

    removed = remove_stale_temp_files(ReportPaths(tmp_path / "r.csv", tmp_path / "r.failed.csv"))

    assert sorted(p.name for p in removed) == sorted([*stale, link])
    assert names(tmp_path) == sorted([*kept, folder, "victim.txt"])
    assert victim.read_bytes() == PRECIOUS


# The real command line, its final write stalled once rows are in the temporary file, so that
# a SIGKILL lands in the middle of it every time.
STALLED_WRITE = """
import sys, time
import batchjob.record._final as report
from batchjob._cli import main

real, stall_on = report._write_atomically, sys.argv.pop(1)

class Stalled:
    def __init__(self, writer):
        self.writer = writer

    def write(self, fh, positions, keys=None):
        self.writer.write(fh, positions, keys)
        fh.flush()
        print("writing", flush=True)
        time.sleep(600)

def write(path, writer, positions):
    real(path, Stalled(writer) if path.name == stall_on else writer, positions)

report._write_atomically = write
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("stalled", ["r.csv", "r.failed.csv"])
async def test_a_temporary_file_left_by_a_kill_9_is_removed_by_the_next_run(
    tmp_path: Path, stalled: str
) -> None:
    world = World.generate(1, 50, seed=6)
    pairs = [*ticket_rows(world), (ticket_rows(world)[0][0], "unknown-key")]
    inputs = write_csv(tmp_path / "in.csv", pairs, HEADER)
    report = tmp_path / "r.csv"
    async with fast_sandbox(world) as sandbox:
        env = cli_env(sandbox)
        run = ("run", str(inputs), "--report", str(report), "--rate", "300")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", STALLED_WRITE, stalled, *run,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"writing\n"
        left = tmp_path / f".{stalled}.{proc.pid}.tmp"
        assert left.stat().st_size > 0
        os.kill(proc.pid, signal.SIGKILL)
        assert (await finish(proc)).code == -signal.SIGKILL
        assert left.exists()
        # Not this report's, or its writer still alive: left alone.
        others = {
            tmp_path / f".other.csv.{proc.pid}.tmp": b"another report's",
            tmp_path / f".r.csv.{os.getpid()}.tmp": b"a live process is writing this",
            tmp_path / f".r.csv.{proc.pid}.tmp.bak": b"not a temporary file",
        }
        for path, content in others.items():
            path.write_bytes(content)

        resumed = await cli(*run, "--resume", env=env)

    assert resumed.code == 1, resumed.err  # unknown-key failed
    assert not left.exists()
    assert {p: p.read_bytes() for p in others} == others
    assert len(read_report(report)) == len(pairs)
    assert names(tmp_path) == sorted(["in.csv", "r.csv", "r.failed.csv", *(p.name for p in others)])


# --- the opens themselves: a link planted after the checks, just before the open ---------------


@pytest.mark.parametrize("opener", ["lock", "journal"])
def test_a_link_planted_after_the_checks_is_still_never_written_through(
    tmp_path: Path, opener: str
) -> None:
    """run_job's checks see no link; one put there a moment later meets the open itself
    (O_NOFOLLOW), which must refuse it rather than write into the file it points to."""
    victim = tmp_path / "victim.txt"
    victim.write_text("someone's data\n")
    link = tmp_path / f"r.csv.{opener}"
    link.symlink_to(victim)
    with pytest.raises(ReportError, match="link"):
        if opener == "lock":
            ReportLock(link).acquire()
        else:
            Journal(link, cast(RowWriter, None))
    assert victim.read_text() == "someone's data\n"
