"""``python -m bench.storm``: one paced run against a bucket that also refuses at random.

The reproduction of "rate-independent 429s collapse the pacer": by default the job at 4/s
against a 4/s bucket that answers 5 % of requests 429 whatever the rate, 150 keys one per
request. Prints one JSON line: wall time, the ideal, their ratio, the 429 share and the lowest
rate the pacer went to. A run that does not finish within ``--timeout`` is cut short and says
so (``finished: false``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

from bench.cli import DEFAULT_OUT
from bench.rows import Context, JobRun, _run_job, csv_from_sandbox, isolate_state, say
from bench.sandbox import SandboxProcess


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storm", description=__doc__)
    parser.add_argument("--rate", type=float, default=4.0, help="the job's rate (4)")
    parser.add_argument("--server-rate", type=float, default=None, help="bucket (= --rate)")
    parser.add_argument("--storm", type=float, default=0.05, help="random 429 share (0.05)")
    parser.add_argument("--keys", type=int, default=150)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=250.0, help="seconds (250)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="scratch directory")
    args = parser.parse_args(argv)
    server_rate = args.server_rate or args.rate
    isolate_state(args.out)  # and _run_job runs with state="none"
    workdir = Context(smoke=False, out=args.out).workdir(f"storm-{args.seed}")
    sandbox_args = ["--rate", f"{server_rate:g}", "--burst", "1", "--quota", "none"]
    sandbox_args += ["--events", "1", "--tickets-per-event", str(args.keys)]
    sandbox_args += ["--seed", str(args.seed), "--throttle-storm", f"{args.storm:g}"]
    say(f"storm: job at {args.rate:g}/s, bucket {server_rate:g}/s, {args.storm:.0%} random 429")
    with SandboxProcess(*sandbox_args, log=workdir / "sandbox.log") as sandbox:
        csv_path, _ = csv_from_sandbox(sandbox, workdir / "keys.csv", seed=args.seed)

        async def job() -> JobRun:
            return await asyncio.wait_for(
                _run_job(sandbox.info, csv_path, workdir, rate=args.rate,
                         batch_size=args.batch, concurrency=4),
                args.timeout,
            )  # fmt: skip

        run: JobRun | None = None
        with contextlib.suppress(TimeoutError):  # run stays None: it did not finish
            run = asyncio.run(job())
        records = sandbox.requests()
    needed = math.ceil(args.keys / args.batch) + 1  # the undo requests and one event check
    ideal = needed / (1.0 - args.storm) / min(args.rate, server_rate)
    throttled = sum(1 for r in records if r["status"] == 429)
    wall = run.wall if run is not None else args.timeout
    changes = run.events("rate.changed") if run is not None else []
    rates = [float(e["new"]) for e in changes]
    print(json.dumps({
        "finished": run is not None,
        "wall": round(wall, 1),
        "ideal": round(ideal, 1),
        "ratio": round(wall / ideal, 3),
        "requests": len(records),
        "throttled_share": round(throttled / max(1, len(records)), 4),
        "lowest_rate": round(min(rates, default=args.rate), 3) if run is not None else None,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
