"""What events staff see at a terminal: log lines whole, above one progress bar.

The run is a real child process on a real pseudo-terminal, and what it wrote is played into
a terminal emulator (pyte), which gives the screen as a person would see it.
"""

from __future__ import annotations

import asyncio
import os
import pty
import sys
from pathlib import Path

import pyte

from batchjob.sandbox import Sandbox, SandboxSettings, World
from tests.chaos_support import cli_env
from tests.support import ticket_rows, write_csv

COLUMNS, LINES = 160, 200
BAR = "undoing check-ins"


async def screen_of_a_run(tmp_path: Path) -> list[str]:
    world = World.generate(3, 40, seed=2)
    inputs = write_csv(tmp_path / "in.csv", ticket_rows(world), ("event_id", "order_ticket_key"))
    # Slow enough that the bar is drawn between log lines: 12 requests at 8/s.
    settings = SandboxSettings(rate=None, daily_quota=None)
    async with Sandbox(world, settings) as sandbox:
        primary, secondary = pty.openpty()
        os.set_blocking(primary, False)
        env = cli_env(sandbox, COLUMNS=str(COLUMNS), LINES=str(LINES), TERM="xterm")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "batchjob", "run", str(inputs),
            "--report", str(tmp_path / "r.csv"), "--rate", "8", "--batch-size", "10",
            stdin=secondary, stdout=secondary, stderr=secondary, env=env,
        )  # fmt: skip
        os.close(secondary)
        output = bytearray()
        while True:
            try:
                chunk = os.read(primary, 65536)
            except BlockingIOError:
                if proc.returncode is not None:
                    break
                await asyncio.sleep(0.02)
                continue
            except OSError:  # the child has gone and closed the terminal
                break
            if not chunk:
                break
            output += chunk
        await asyncio.wait_for(proc.wait(), 60)
        os.close(primary)
    assert proc.returncode == 0, output.decode(errors="replace")[-2000:]
    screen = pyte.Screen(COLUMNS, LINES)
    pyte.ByteStream(screen).feed(bytes(output))
    return [line.rstrip() for line in screen.display if line.strip()]


async def test_log_lines_stay_whole_above_a_single_progress_bar(tmp_path: Path) -> None:
    lines = await screen_of_a_run(tmp_path)
    logs = [line for line in lines if "chunk.undone" in line or "event.ready" in line]
    assert len(logs) >= 12, lines
    # A whole log line starts with its timestamp: no stale copy of the bar in front of it.
    assert all(line.startswith("20") for line in logs), logs
    assert sum(BAR in line for line in lines) == 1, lines
