"""``python -m bench.stamped STAMP ARGS...``: ``python -m batchjob ARGS...``, stamped.

Imports everything a run imports, then writes one JSON line to STAMP: ``monotonic`` (this
machine's monotonic clock, the one the sandbox stamps arrivals with) and ``wall`` (epoch
seconds, what the JSON log lines say) at the moment batchjob's command line starts, so that
row N1 can time "file to first request" without the interpreter's start and the imports, as
row 4's ``pandas.read_csv`` baseline is timed. Then it runs the command as ``python -m
batchjob`` would.
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    stamp, *args = argv
    # What `batchjob run` imports on its way to the first request: loaded before the stamp.
    import aiohttp  # noqa: F401
    import pandas  # noqa: F401
    import pyarrow.compute
    import pyarrow.csv  # noqa: F401
    import rich.console  # noqa: F401
    import structlog  # noqa: F401

    import batchjob._progress
    import batchjob._tokens
    import batchjob.plan
    import batchjob.read
    import batchjob.run
    import batchjob.store._sqlite  # noqa: F401
    from batchjob._cli import main as batchjob_main

    with open(stamp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"monotonic": time.monotonic(), "wall": time.time()}) + "\n")
    return batchjob_main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
