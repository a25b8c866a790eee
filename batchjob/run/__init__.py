"""Run: the pipeline read -> plan -> send -> record, and the one function that runs it.

- :mod:`._pipeline`: :func:`run_job`.
- :mod:`._dispatch`: the scheduler and each event's state (:class:`EventState`).
- :mod:`._isolate`: which keys go in each request; finding bad keys (group testing).
- :mod:`._result`: :class:`RunResult` and its summary.
- :mod:`._stop`: :class:`StopRequest` and the signal handlers that set it.
- :mod:`._sync`: :func:`run_job_sync`, for callers that are not async.

What the command line (and an orchestrator) may use:
"""

from batchjob.run._dispatch import Progress
from batchjob.run._pipeline import run_job
from batchjob.run._result import RunResult
from batchjob.run._stop import StopRequest, install_signal_handlers
from batchjob.run._sync import run_job_sync, run_to_end

__all__ = [
    "Progress",
    "RunResult",
    "StopRequest",
    "install_signal_handlers",
    "run_job",
    "run_job_sync",
    "run_to_end",
]
