"""Running a command in a fresh process and measuring that process alone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessCost:
    exit_code: int
    wall: float  # seconds, from spawn to exit
    cpu: float  # user + system seconds of the process (and any children it waited for)
    peak_rss: int  # bytes, the process's maximum resident set size
    stdout: str

    @property
    def peak_rss_mib(self) -> float:
        return self.peak_rss / 2**20


def settle_disk() -> None:
    """Write out what earlier steps left in the page cache (reports, stores: gigabytes in the
    full run), so that a timed run does not share the disk with their writeback."""
    if hasattr(os, "sync"):
        os.sync()


def run_measured(
    cmd: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stderr: Path | None = None,
) -> ProcessCost:
    """Run ``cmd`` and return its own rusage (via wait4, so other children never count)."""
    err = stderr.open("ab") if stderr is not None else subprocess.DEVNULL
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    finally:
        if stderr is not None and not isinstance(err, int):
            err.close()
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return ProcessCost(
        exit_code=proc.returncode,
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
        peak_rss=usage.ru_maxrss * scale,
        stdout=out.decode("utf-8", "replace"),
    )
