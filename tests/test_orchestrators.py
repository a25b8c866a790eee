"""batchjob called the ways orchestrators call it: from a worker thread (Airflow's and
Prefect's task runners), and from code that already runs an event loop (a notebook, an async
worker). Each is a dry run: the same set-up as a real run, nothing sent."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from batchjob._cli import main
from batchjob.sandbox import Sandbox, SandboxSettings, World
from tests.support import read_report, ticket_rows, write_csv

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


def readme_example() -> str:
    """The README's orchestrator example, as a user would copy it."""
    text = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    start = text.index("```python\nfrom pathlib import Path\n\nfrom batchjob import ExitCode")
    return text[start + len("```python\n") : text.index("```", start + 3)]


async def test_the_readme_s_orchestrator_task_undoes_every_key_from_a_worker_thread(
    tmp_path: Path,
) -> None:
    world = World.generate(2, 30, seed=11)
    inputs = write_csv(tmp_path / "in.csv", ticket_rows(world), ("event_id", "order_ticket_key"))
    namespace: dict[str, Any] = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)  # noqa: S102 (our README)
    task = namespace["undo_check_ins"]
    async with Sandbox(world, SandboxSettings(rate=None, daily_quota=None)) as sandbox:
        # As a thread-based orchestrator runs a task: a worker thread, no loop of its own.
        counts = await asyncio.to_thread(
            task, [str(inputs)], str(tmp_path / "r.csv"), sandbox.access_token, sandbox.base_url
        )
    assert counts["undone"] == len(ticket_rows(world))
    assert read_report(tmp_path / "r.csv").outcome.eq("undone").all()


async def test_a_library_call_without_a_token_raises_a_token_error(tmp_path: Path) -> None:
    from batchjob import JobConfig, TokenError, run_job

    inputs = write_csv(tmp_path / "in.csv", [(EVENT, "k1")], ("event_id", "order_ticket_key"))
    with pytest.raises(TokenError, match="no access token"):
        await run_job(JobConfig(inputs=(inputs,), report=tmp_path / "r.csv"))
    assert not (tmp_path / "r.csv").exists()


async def test_reading_planning_and_writing_never_run_on_the_host_s_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An orchestrator's loop keeps running while a big file is read, planned and the report
    written: those run in a worker thread, whatever their size (checked by thread, not by
    timing, which a shared machine cannot promise)."""
    import batchjob.run._pipeline as pipeline
    from batchjob import JobConfig, run_job

    loop_thread = threading.get_ident()
    seen: dict[str, int] = {}

    def on_a_thread(name: str, real: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen[name] = threading.get_ident()
            return real(*args, **kwargs)

        return wrapper

    for name in ("read_inputs", "build_plan", "write_final"):
        monkeypatch.setattr(pipeline, name, on_a_thread(name, getattr(pipeline, name)))
    rows = [(EVENT, f"k{i}") for i in range(1000)]
    inputs = write_csv(tmp_path / "in.csv", rows, ("event_id", "order_ticket_key"))
    config = JobConfig(inputs=(inputs,), report=tmp_path / "r.csv", dry_run=True)
    await run_job(config)
    assert set(seen) == {"read_inputs", "build_plan", "write_final"}
    assert loop_thread not in seen.values()


async def test_the_result_s_exit_code_is_a_plain_number_for_logs_and_json(tmp_path: Path) -> None:
    """RunResult.exit_code goes into JSON, logs and sys.exit: an int, not an enum's repr."""
    from batchjob import JobConfig, run_job

    inputs = write_csv(tmp_path / "in.csv", [(EVENT, "k1")], ("event_id", "order_ticket_key"))
    result = await run_job(JobConfig(inputs=(inputs,), report=tmp_path / "r.csv", dry_run=True))
    assert type(result.exit_code) is int
    assert repr(result.exit_code) == "0"
