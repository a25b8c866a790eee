"""Helpers for tests: writing inputs, reading reports, running the real job on the sandbox."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from batchjob import JobConfig, RunResult, Secret, StaticToken, run_job
from batchjob._logging import Redactor, make_logger
from batchjob.sandbox import Sandbox, World

# Fast but real: the sandbox limits at 400/s, the job paces at 300/s, backoff waits are short.
FAST = {"rate": 300.0, "concurrency": 8, "retry_base": 0.005, "retry_cap": 0.05}


def write_csv(path: Path, rows: Iterable[Sequence[str]], header: Sequence[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def ticket_rows(world: World) -> list[tuple[str, str]]:
    return [(event_id, key) for event_id, ev in world.events.items() for key in ev.tickets]


def read_report(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


async def run(
    sandbox: Sandbox,
    inputs: Sequence[Path],
    tmp_path: Path,
    *,
    report: str = "report.csv",
    log: io.StringIO | None = None,
    **settings: Any,
) -> RunResult:
    config = JobConfig(
        inputs=tuple(inputs),
        report=tmp_path / report,
        base_url=sandbox.base_url,
        token_url=sandbox.token_url,
        **(FAST | settings),
    )
    tokens = token_for(sandbox)
    logger = make_logger(
        log_format="json",
        level="debug",
        redactor=Redactor([sandbox.access_token]),
        stream=log or io.StringIO(),
    )
    return await run_job(config, tokens=tokens, log=logger)


def token_for(sandbox: Sandbox) -> StaticToken:
    return StaticToken(Secret(sandbox.access_token))
