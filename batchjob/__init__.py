"""batchjob: reverse Constant Contact event ticket check-ins in bulk, safely and fast.

The public surface is small on purpose; everything else lives in private modules.

    from batchjob import JobConfig, run_job
    result = await run_job(JobConfig(inputs=(Path("scans.csv"),)), tokens=my_token_source)
"""

from batchjob._api import TokenSource, Transport
from batchjob._config import ConfigError, JobConfig, load_config
from batchjob._inputs import ColumnAliases, InputError
from batchjob._model import REPORT_COLUMNS, Outcome
from batchjob._report import ReportError
from batchjob._runner import RunResult, StopRequest, run_job
from batchjob._tokens import Secret, StaticToken

__version__ = "1.0.0"

__all__ = [
    "REPORT_COLUMNS",
    "ColumnAliases",
    "ConfigError",
    "InputError",
    "JobConfig",
    "Outcome",
    "ReportError",
    "RunResult",
    "Secret",
    "StaticToken",
    "StopRequest",
    "TokenSource",
    "Transport",
    "load_config",
    "run_job",
]
