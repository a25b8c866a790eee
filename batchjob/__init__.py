"""batchjob: reverse Constant Contact event ticket check-ins in bulk, safely and fast.

The public surface is what ``__all__`` names (pinned by ``tests/test_layout.py``);
everything else lives in the stage packages, in pipeline order: :mod:`batchjob.read` ->
:mod:`batchjob.plan` -> :mod:`batchjob.send` -> :mod:`batchjob.record`, driven by
:mod:`batchjob.run`. ::

    from batchjob import JobConfig, run_job
    result = await run_job(JobConfig(inputs=(Path("scans.csv"),)), tokens=my_token_source)

Names that need pandas or aiohttp are imported on first use, so that ``import batchjob`` (and
``batchjob --help``) stays quick.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from batchjob._config import JobConfig, load_config
from batchjob._errors import (
    BatchjobError,
    ConfigError,
    ExitCode,
    InputError,
    ReportError,
    TokenEndpointError,
    TokenError,
    UsageError,
)
from batchjob._model import REPORT_COLUMNS, Action, ColumnAliases, Outcome

if TYPE_CHECKING:
    __version__: str
    from batchjob._tokens import FileTokenSource, Secret, StaticToken, TokenSource
    from batchjob.run import RunResult, StopRequest, run_job, run_job_sync
    from batchjob.send import RawResponse, Transport, TransportError

_LAZY = {
    "RawResponse": "batchjob.send",
    "RunResult": "batchjob.run",
    "Secret": "batchjob._tokens",
    "StaticToken": "batchjob._tokens",
    "StopRequest": "batchjob.run",
    "TokenSource": "batchjob._tokens",
    "Transport": "batchjob.send",
    "TransportError": "batchjob.send",
    "run_job": "batchjob.run",
    "run_job_sync": "batchjob.run",
    "FileTokenSource": "batchjob._tokens",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        return _version()
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'batchjob' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def _version() -> str:
    """The installed distribution's version: pyproject.toml is the one place it is written."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("batchjob")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "REPORT_COLUMNS",
    "Action",
    "BatchjobError",
    "ColumnAliases",
    "ConfigError",
    "ExitCode",
    "FileTokenSource",
    "InputError",
    "JobConfig",
    "Outcome",
    "RawResponse",
    "ReportError",
    "RunResult",
    "Secret",
    "StaticToken",
    "StopRequest",
    "TokenEndpointError",
    "TokenError",
    "TokenSource",
    "Transport",
    "TransportError",
    "UsageError",
    "__version__",
    "load_config",
    "run_job",
    "run_job_sync",
]
