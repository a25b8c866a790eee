"""The sandbox: a local stand-in for Constant Contact's V3 events API (demo, tests, bench).

Never imported by ``batchjob run``: only ``batchjob sandbox``, ``batchjob demo``, the tests and
the benchmarks load it.
"""

from batchjob.sandbox._serve import add_sandbox_arguments, main_sandbox, serve
from batchjob.sandbox._server import (
    Counters,
    EventState,
    Faults,
    RequestRecord,
    Sandbox,
    SandboxSettings,
    World,
)

__all__ = [
    "Counters",
    "EventState",
    "Faults",
    "RequestRecord",
    "Sandbox",
    "SandboxSettings",
    "World",
    "add_sandbox_arguments",
    "main_sandbox",
    "serve",
]
