"""One measured step in a fresh process: ``python -m bench.probe plan|pandas FILE``.

Prints one JSON line with the step's seconds (imports excluded) and its row count; the parent
reads the process's peak RSS from wait4.
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    what, path = argv
    if what == "plan":
        from batchjob.plan import build_plan
        from batchjob.read import read_inputs

        started = time.perf_counter()
        plan = build_plan(read_inputs([path]))
        seconds = time.perf_counter() - started
        rows = len(plan.rows)
        keys = plan.key_count
    elif what == "pandas":
        import pandas as pd

        started = time.perf_counter()
        frame = pd.read_csv(path)
        seconds = time.perf_counter() - started
        rows = keys = len(frame)
    else:
        print(f"unknown probe {what!r}", file=sys.stderr)
        return 2
    print(json.dumps({"seconds": seconds, "rows": rows, "keys": keys}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
