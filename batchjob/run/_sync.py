"""Running a job to its end from synchronous code: thread-based orchestrators, notebooks."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from batchjob._config import JobConfig
from batchjob._logging import Redactor
from batchjob._tokens import TokenSource
from batchjob.run._dispatch import Progress
from batchjob.run._pipeline import run_job
from batchjob.run._result import RunResult
from batchjob.run._stop import StopRequest
from batchjob.send import Transport

T = TypeVar("T")


def run_to_end(job: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(job)``, also when called from a running event loop (a notebook, an async
    worker): there the job gets a thread and a loop of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(job)
    with ThreadPoolExecutor(1, thread_name_prefix="batchjob") as pool:
        return pool.submit(asyncio.run, job).result()


def run_job_sync(
    config: JobConfig,
    *,
    tokens: TokenSource | None = None,
    transport: Transport | None = None,
    log: Any = None,
    progress: Progress | None = None,
    stop: StopRequest | None = None,
    redactor: Redactor | None = None,
) -> RunResult:
    """:func:`run_job`, run to its end, for callers that are not async (an Airflow or Prefect
    task, a Dagster op, a script). Works from any thread; installs no signal handler.

    ``stop`` must be made inside the job's loop to be awaited there; from another thread,
    call ``loop.call_soon_threadsafe(stop.request, ...)`` on the loop the job runs in, or
    simply let the orchestrator's timeout kill the process: the journal makes that safe.
    """
    return run_to_end(
        run_job(
            config,
            tokens=tokens,
            transport=transport,
            log=log,
            progress=progress,
            stop=stop,
            redactor=redactor,
        )
    )
