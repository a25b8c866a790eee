"""``python -m bench [--smoke] [--only N]``: machine, then one markdown table of results."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from batchjob.store import default_path
from bench.pg import stop_shared
from bench.pg_rows import ROWS as PG_ROWS
from bench.rows import ROWS as BASE_ROWS
from bench.rows import Context, Row, default_store_stamp, isolate_state, say
from bench.store_rows import ROWS as STORE_ROWS

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
ROWS = {**BASE_ROWS, **STORE_ROWS, **PG_ROWS}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> list[str]:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores (load average at start: {load})",
        f"- Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.release()}",
        f"- aiohttp {version('aiohttp')}, aiolimiter {version('aiolimiter')}, "
        f"pandas {version('pandas')}, pyarrow {version('pyarrow')}",
    ]


def table(rows: Sequence[Row]) -> list[str]:
    def result(row: Row) -> str:
        if row.skip:
            return "SKIP"
        return "info" if row.passed is None else "PASS" if row.passed else "FAIL"

    lines = [
        "| # | Measure | Figure | Ratio | Target | Result | Notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = (row.key, row.measure, row.figure, row.ratio, row.target, result(row), row.notes)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="shrunken sizes: proves it runs")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(ROWS),
        metavar="N",
        help="run only row N (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="scratch directory")
    args = parser.parse_args(argv)
    ctx = Context(smoke=args.smoke, out=args.out / ("smoke" if args.smoke else "full"))
    ctx.out.mkdir(parents=True, exist_ok=True)
    users_store = default_path()  # before isolate_state: the user's own default
    home_store = default_store_stamp(users_store)
    state_home = isolate_state(ctx.out)
    say(f"run stores: each row names its own; XDG_STATE_HOME={state_home} for the rest")

    started = time.monotonic()
    rows: list[Row] = []
    broke = False
    header = machine()
    try:
        for number in args.only or sorted(ROWS):
            try:
                rows.extend(ROWS[number](ctx))
            except Exception as exc:  # one broken row must not hide the others
                broke = True
                traceback.print_exc()
                rows.append(
                    Row(
                        number,
                        ROWS[number].__name__,
                        "",
                        "",
                        "",
                        False,
                        f"ERROR: {type(exc).__name__}: {exc}",
                    )
                )
    finally:
        stop_shared()  # the PostgreSQL server rows P1 and P2 started, if any
    elapsed = time.monotonic() - started
    say(f"done in {elapsed:.0f}s")
    if default_store_stamp(users_store) != home_store:
        broke = True
        say(f"ERROR: the user's default run store {users_store} changed during the bench")
    mode = "smoke (shrunken sizes)" if args.smoke else "full"
    print(f"## batchjob benchmark, {mode}\n")
    print("\n".join(header))
    print(f"- bench wall time: {elapsed:.0f}s\n")
    print("\n".join(table(rows)))
    sys.stdout.flush()
    return 1 if broke else 0
