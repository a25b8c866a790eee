"""``python -m bench.looplag``: how long run_job holds up its host's event loop.

An orchestrator (or a notebook) calls ``run_job`` inside its own loop; reading, planning and
writing a large file must not stall it. A dry run of a ``--rows``-row CSV (default 300,000)
runs beside a probe that wakes every 5 ms; prints one JSON line with the longest gap between
wake-ups (the loop's worst stall) and the run's wall time. Target: worst stall under 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from batchjob import JobConfig, run_job

EVENT = "07216444-4e3b-41ea-a3b8-5a418fce41f4"


async def worst_stall(rows: int, folder: Path) -> dict[str, float]:
    path = folder / "in.csv"
    path.write_text(
        "event_id,order_ticket_key\n" + "".join(f"{EVENT},k{i:08d}\n" for i in range(rows))
    )
    # No run store: a dry run would still open the default one (the user's) otherwise.
    config = JobConfig(inputs=(path,), report=folder / "r.csv", dry_run=True, state="none")
    worst = 0.0
    done = False

    async def probe() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            worst = max(worst, now - last - 0.005)
            last = now

    prober = asyncio.create_task(probe())
    await asyncio.sleep(0.02)  # the probe is ticking before the run starts
    started = time.perf_counter()
    await run_job(config)
    wall = time.perf_counter() - started
    done = True
    await prober
    return {"rows": rows, "worst_stall_ms": round(worst * 1000, 1), "run_s": round(wall, 2)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.looplag", description=__doc__)
    parser.add_argument("--rows", type=int, default=300_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(asyncio.run(worst_stall(args.rows, Path(folder)))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
