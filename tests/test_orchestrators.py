"""batchjob called the ways orchestrators call it: from a worker thread (Airflow's and
Prefect's task runners), and from code that already runs an event loop (a notebook, an async
worker). Each is a dry run: the same set-up as a real run, nothing sent."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from batchjob._cli import main
from tests.support import write_csv

EVENT = "07216444-4e3b-41ea-a3b8-5a418fce41f4"


def dry_run_args(tmp_path: Path) -> list[str]:
    inputs = write_csv(
        tmp_path / "in.csv", [(EVENT, "k1"), (EVENT, "k2")], ("event_id", "order_ticket_key")
    )
    return ["run", str(inputs), "--report", str(tmp_path / "r.csv"), "--dry-run"]


def test_the_command_runs_from_a_worker_thread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    codes: list[int] = []
    worker = threading.Thread(target=lambda: codes.append(main(dry_run_args(tmp_path))))
    worker.start()
    worker.join(60)
    assert codes == [0], capsys.readouterr().err
    assert (tmp_path / "r.csv").exists()


async def test_the_command_runs_from_inside_a_running_event_loop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(dry_run_args(tmp_path)) == 0, capsys.readouterr().err
    assert (tmp_path / "r.csv").exists()
