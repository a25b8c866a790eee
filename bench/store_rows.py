"""Rows N1 and N2: what the run store costs (batchjob/store, run/_incremental, run/_remember).

N1, the nightly incremental run: a cumulative export whose older rows an earlier run in the
store already undid. N2: row 5 with the store on against row 5 without it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from bench.data import big_world, split_export
from bench.measure import ProcessCost, run_measured, settle_disk
from bench.rows import (
    Context,
    EndToEnd,
    Row,
    _probe,
    all_undone,
    end_to_end_run,
    job_command,
    job_env,
    say,
)
from bench.sandbox import REPO, SandboxProcess

#: The files SQLite keeps for one store: the database, and in WAL mode its log and index.
_STORE_FILES = ("", "-wal", "-shm", "-journal")


def store_bytes(path: Path) -> int:
    """Bytes of the store's files on disk (the database and any file SQLite keeps beside)."""
    total = 0
    for suffix in _STORE_FILES:
        side = Path(f"{path}{suffix}")
        if side.exists():
            total += side.stat().st_size
    return total


def store_counts(path: Path) -> tuple[int, int, int]:
    """(identities with a latest outcome, report rows, runs) of a closed store."""
    from batchjob.store._sqlite import open_sqlite

    store = open_sqlite(path)
    try:
        runs = store.runs(1_000_000)
        rows = sum(len(store.rows(run.run_id)) for run in runs)
        keys = sum(store.latest(api).num_rows for api in {run.base_url for run in runs})
    finally:
        store.close()
    return keys, rows, len(runs)


def copy_store(source: Path, target: Path) -> None:
    """A private copy of a closed store (every file of it), as a fresh run would find it."""
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    for suffix in _STORE_FILES:
        side = Path(f"{source}{suffix}")
        if side.exists():
            shutil.copyfile(side, f"{target}{suffix}")
            os.chmod(f"{target}{suffix}", 0o600)


def _log_offsets(log: Path, wall_start: float, names: tuple[str, ...]) -> dict[str, float]:
    """Seconds from the stamp to the first JSON log line of each event named."""
    found: dict[str, float] = {}
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        name = entry.get("event") if isinstance(entry, dict) else None
        if name in names and name not in found:
            at = datetime.fromisoformat(str(entry["timestamp"])).timestamp()
            found[name] = at - wall_start
    return found


# --- row N1: the nightly incremental run -----------------------------------------------------


@dataclass(frozen=True)
class NightlyRound:
    cost: ProcessCost
    to_first: float  # seconds: the run's start (imports done) to the first undo POST's arrival
    from_spawn: float  # seconds: the process's spawn to the same arrival
    posts: int  # undo POSTs the sandbox saw
    gets: int  # event checks (GET /events/{id})
    others: int  # anything else
    counts: dict[str, int]  # the run's outcomes (its --summary-json)
    marks: dict[str, float]  # log events, seconds from the run's start
    complete: bool  # every key of the world undone afterwards
    store_size: int  # bytes of the store after the run
    store_keys: int
    store_rows: int
    store_runs: int


def _nightly_round(
    sandbox: SandboxProcess,
    workdir: Path,
    csv_path: Path,
    pristine: Path,
    batch: int,
    index: int,
) -> NightlyRound:
    folder = workdir / f"round-{index}"
    store = folder / "state" / "state.sqlite3"
    copy_store(pristine, store)
    stamp = folder / "stamp.json"
    summary = folder / "summary.json"
    log = folder / "job.log"
    cmd = job_command(
        sandbox.info,
        csv_path,
        folder / "report.csv",
        state=str(store),
        batch=batch,
        log_level="info",
        extra=("--summary-json", str(summary)),
        runner=("-m", "bench.stamped", str(stamp)),
    )
    seen = int(sandbox.state()["requests_recorded"])
    settle_disk()
    spawned = time.monotonic()  # the same clock as the sandbox's arrivals (one machine)
    cost = run_measured(cmd, cwd=REPO, env=job_env(sandbox.info), stderr=log)
    if cost.exit_code != 0:
        raise RuntimeError(f"nightly run {index} exited {cost.exit_code}; see {log}")
    records = sandbox.requests(since=seen)
    started = json.loads(stamp.read_text(encoding="utf-8"))
    posts = [r for r in records if r["method"] == "POST" and "/undo_check_in/" in r["path"]]
    gets = [r for r in records if r["method"] == "GET"]
    if not posts:
        raise RuntimeError(f"nightly run {index} sent no undo request")
    first = min(float(r["at"]) for r in posts)
    counts = json.loads(summary.read_text(encoding="utf-8"))["counts"]
    marks = _log_offsets(
        log, float(started["wall"]), ("plan.ready", "incremental.skipped", "event.ready")
    )
    size = store_bytes(store)
    keys, rows, runs = store_counts(store)
    return NightlyRound(
        cost=cost,
        to_first=first - float(started["monotonic"]),
        from_spawn=first - spawned,
        posts=len(posts),
        gets=len(gets),
        others=len(records) - len(posts) - len(gets),
        counts={str(k): int(v) for k, v in counts.items()},
        marks=marks,
        complete=all_undone(sandbox),
        store_size=size,
        store_keys=keys,
        store_rows=rows,
        store_runs=runs,
    )


def row_nightly(ctx: Context) -> list[Row]:
    events, per_event = 20, ctx.size(50_000, 2_500)
    total = events * per_event
    new = total // 100  # 990,000 done by earlier runs, 10,000 new (smoke: 49,500 and 500)
    batch = 1000
    rounds = 1 if ctx.smoke else 3
    say(f"row N1: nightly incremental, {total:,} rows of which {new:,} new")
    world_path, csv_path = big_world(ctx.out / "data", events, per_event, seed=7)
    earlier_csv, new_rows = split_export(csv_path, new)
    by_event: dict[str, list[str]] = defaultdict(list)
    for event_id, key in new_rows:
        by_event[event_id].append(key)
    expected_posts = sum(math.ceil(len(keys) / batch) for keys in by_event.values())
    workdir = ctx.workdir("nightly")
    pristine = workdir / "prepared" / "state.sqlite3"
    args = ["--rate", "none", "--quota", "none", "--world", str(world_path)]
    runs: list[NightlyRound] = []
    pandas_s: list[float] = []
    # One sandbox for every run: the store's identities are per API base URL.
    with SandboxProcess(*args, log=workdir / "sandbox.log") as sandbox:
        say(f"row N1: preparing the store: the real job over the first {total - new:,} rows")
        prep_cmd = job_command(
            sandbox.info, earlier_csv, workdir / "prepared" / "report.csv", state=str(pristine)
        )
        prep = run_measured(
            prep_cmd, cwd=REPO, env=job_env(sandbox.info), stderr=workdir / "prepare.log"
        )
        if prep.exit_code != 0:
            raise RuntimeError(f"preparing run exited {prep.exit_code}; see prepare.log")
        prep_size = store_bytes(pristine)
        prep_keys, _, _ = store_counts(pristine)
        for index in range(rounds):
            if index:  # the new tickets were checked in at the door again: tonight's scans
                for event_id, keys in by_event.items():
                    sandbox.check_in(event_id, keys)
            pandas_s.append(_probe("pandas", csv_path)[0])  # interleaved: same cache, load
            say(f"row N1: nightly run {index + 1}/{rounds}")
            runs.append(_nightly_round(sandbox, workdir, csv_path, pristine, batch, index))
    best = min(runs, key=lambda r: r.to_first)
    first = runs[0]
    exact = all(
        r.posts == expected_posts and r.gets == len(by_event) and r.others == 0 for r in runs
    )
    outcomes_ok = all(
        r.counts.get("skipped") == total - new and r.counts.get("undone") == new and r.complete
        for r in runs
    )
    bare = min(pandas_s)
    ratio = best.to_first / bare
    marks = ", ".join(f"{name} +{at:.2f}s" for name, at in sorted(best.marks.items(), key=_at))
    per_key = first.store_size / first.store_keys
    prep_per_key = prep_size / prep_keys
    growth = (first.store_size - prep_size) / max(1, first.store_rows - prep_keys)
    rss = max(r.cost.peak_rss for r in runs) / 2**20
    return [
        Row(
            "N1",
            f"Nightly incremental: {total:,}-row cumulative export, {total - new:,} undone by "
            f"an earlier run in the store, {new:,} new ({len(by_event)} events), batch {batch}",
            f"{first.posts} undo requests + {first.gets} event checks "
            f"(exact: {expected_posts} + {len(by_event)})",
            "exact" if exact else "NOT exact: " + "; ".join(_sent(r) for r in runs),
            "ceil(new / batch) per event + event checks",
            exact and outcomes_ok,
            f"{len(runs)} run(s), each: skipped {first.counts.get('skipped', 0):,}, undone "
            f"{first.counts.get('undone', 0):,}; the preparing run ({total - new:,} rows, "
            f"fresh store) took {prep.wall:.1f}s"
            + ("" if outcomes_ok else "; NOT every run skipped the old rows and undid the new"),
        ),
        Row(
            "N1b",
            f"Nightly incremental: file to first request ({total:,} rows, store holding "
            f"{prep_keys:,} done keys)",
            f"{best.to_first:.2f}s to the first undo POST; pandas.read_csv {bare:.2f}s",
            f"{ratio:.2f}x read_csv",
            "<= 3x",
            ratio <= 3.0,
            f"best of {len(runs)} (all: {', '.join(f'{r.to_first:.2f}s' for r in runs)}; "
            f"read_csv: {', '.join(f'{t:.2f}s' for t in pandas_s)}); "
            "from the run's start (imports done, `python -m bench.stamped`) to the sandbox's "
            f"arrival of the first undo POST, one monotonic clock; log: {marks}; from spawn "
            f"{best.from_spawn:.2f}s; process {best.cost.wall:.1f}s wall, peak RSS {rss:.0f} MiB",
        ),
        Row(
            "N1c",
            "Nightly incremental: store size per key",
            f"{per_key:.0f} B/key ({first.store_size / 2**20:.0f} MiB, {first.store_keys:,} "
            f"keys, {first.store_runs} runs, {first.store_rows:,} report rows)",
            f"after the first run {prep_per_key:.0f} B/key",
            "reported",
            None,
            f"bytes of the SQLite file(s) / identities in the store; each run adds every row "
            f"of its report, skipped ones too: ~{growth:.0f} B per report row, "
            f"{(first.store_size - prep_size) / 2**20:.0f} MiB for this run",
        ),
    ]


def _at(item: tuple[str, float]) -> float:
    return item[1]


def _sent(run: NightlyRound) -> str:
    return f"{run.posts} POST + {run.gets} GET + {run.others} other"


# --- row N2: row 5 with the store on ---------------------------------------------------------


def row_store_cost(ctx: Context) -> list[Row]:
    events, per_event = 20, ctx.size(50_000, 2_500)
    keys = events * per_event
    rounds = 1 if ctx.smoke else 2
    say(f"row N2: row 5 ({keys:,} keys) with a fresh scratch store and with --state none")
    world_path, csv_path = big_world(ctx.out / "data", events, per_event, seed=7)
    runs: dict[str, list[EndToEnd]] = {"none": [], "store": []}
    sizes: list[int] = []
    for index in range(rounds):  # alternating, so both see the same machine
        say(f"row N2: round {index + 1}/{rounds}, --state none")
        runs["none"].append(
            end_to_end_run(ctx, f"store-cost-none-{index}", world_path, csv_path, "none")
        )
        say(f"row N2: round {index + 1}/{rounds}, a fresh store")
        scratch = ctx.workdir(f"store-cost-state-{index}") / "state.sqlite3"
        runs["store"].append(
            end_to_end_run(ctx, f"store-cost-store-{index}", world_path, csv_path, str(scratch))
        )
        sizes.append(store_bytes(scratch))
    off = min(runs["none"], key=lambda r: r.cost.wall)
    on = min(runs["store"], key=lambda r: r.cost.wall)
    off_rss = max(r.cost.peak_rss for r in runs["none"])
    on_rss = max(r.cost.peak_rss for r in runs["store"])
    wall_ratio = on.cost.wall / off.cost.wall
    rss_ratio = on_rss / off_rss
    every = [*runs["none"], *runs["store"]]
    complete = all(r.complete and r.cost.exit_code == 0 for r in every)
    ok = wall_ratio <= 1.5 and rss_ratio <= 2.0 and complete
    walls = {name: ", ".join(f"{r.cost.wall:.1f}s" for r in found) for name, found in runs.items()}
    return [
        Row(
            "N2",
            f"Store cost: row 5 ({keys:,} keys) with a fresh store vs `--state none`",
            f"store {on.cost.wall:.1f}s, {on.cost.cpu:.1f}s CPU, {on_rss / 2**20:.0f} MiB; "
            f"none {off.cost.wall:.1f}s, {off.cost.cpu:.1f}s CPU, {off_rss / 2**20:.0f} MiB",
            f"{wall_ratio:.2f}x wall; {rss_ratio:.2f}x RSS",
            "<= 1.5x wall; < 2x RSS",
            ok,
            f"best wall of {rounds} each (store: {walls['store']}; none: {walls['none']}), "
            f"peak RSS the highest; CPU {on.cost.cpu / off.cost.cpu:.2f}x (less sensitive to "
            f"a busy machine); store {max(sizes) / 2**20:.0f} MiB after the run"
            + ("" if complete else "; NOT every run undid every key"),
        )
    ]


ROWS: dict[str, Callable[[Context], list[Row]]] = {"N1": row_nightly, "N2": row_store_cost}
