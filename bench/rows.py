"""The benchmark's rows. Each returns one or more :class:`Row` measured in the same run."""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from batchjob import JobConfig, RunResult, Secret, StaticToken, run_job
from batchjob._logging import Redactor, make_logger
from bench.data import big_world, world_with_bad_keys, write_csv
from bench.measure import ProcessCost, run_measured, settle_disk
from bench.sandbox import REPO, SandboxInfo, SandboxProcess


@dataclass(frozen=True)
class Row:
    key: str
    measure: str
    figure: str
    ratio: str
    target: str
    passed: bool | None  # None: reported, no target
    notes: str = ""
    skip: bool = False  # could not be measured here (the notes say why): SKIP, not ERROR


@dataclass(frozen=True)
class Context:
    smoke: bool
    out: Path

    def size(self, full: int, smoke: int) -> int:
        return smoke if self.smoke else full

    def workdir(self, name: str) -> Path:
        path = self.out / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --- the run store: never the user's ----------------------------------------------------------


def isolate_state(out: Path) -> Path:
    """Point this process and its children at a scratch state folder, never ~/.local/state.

    Every row also names its store (``state="none"``, ``--state none`` or a scratch file);
    this is the second lock: a run that fell back to the default store would land here.
    ``BATCHJOB_STATE`` from the caller's environment is dropped for the same reason.
    """
    home = (out / "xdg-state").resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["XDG_STATE_HOME"] = str(home)
    os.environ.pop("BATCHJOB_STATE", None)
    return home


def default_store_stamp(path: Path) -> tuple[int, int] | None:
    """(mtime, size) of the user's default run store ``path`` (taken before
    :func:`isolate_state`), or None if there is none: the bench must leave it as it was."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


def job_env(info: SandboxInfo) -> dict[str, str]:
    """A `batchjob run` child's environment: the sandbox's token, no BATCHJOB_STATE."""
    env = dict(os.environ, CC_ACCESS_TOKEN=info.access_token)
    env.pop("BATCHJOB_STATE", None)
    return env


def job_command(
    info: SandboxInfo,
    csv_path: Path,
    report: Path,
    *,
    state: str,
    batch: int = 1000,
    concurrency: int = 8,
    rate: int = 100_000,
    log_level: str = "warning",
    extra: Sequence[str] = (),
    runner: Sequence[str] = ("-m", "batchjob"),
) -> list[str]:
    """``python -m batchjob run FILE ...`` against the sandbox; ``state`` is always given."""
    cmd = [sys.executable, *runner, "run", str(csv_path)]
    cmd += ["--base-url", info.base_url, "--rate", str(rate)]
    cmd += ["--concurrency", str(concurrency), "--batch-size", str(batch)]
    cmd += ["--report", str(report), "--no-progress", "--state", state]
    cmd += ["--log-format", "json", "--log-level", log_level, *extra]
    return cmd


# --- helpers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRun:
    result: RunResult
    wall: float
    log: list[dict[str, Any]]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.log if e.get("event") == name]


async def _run_job(info: SandboxInfo, csv_path: Path, workdir: Path, **settings: Any) -> JobRun:
    # No run store unless a caller asks for one: the rows before the store measure the same
    # job as always (and never touch a user's store).
    settings.setdefault("state", "none")
    config = JobConfig(
        inputs=(csv_path,),
        report=workdir / f"report-{time.monotonic_ns()}.csv",
        base_url=info.base_url,
        **settings,
    )
    stream = io.StringIO()
    log = make_logger(
        log_format="json", level="info", redactor=Redactor([info.access_token]), stream=stream
    )
    started = time.monotonic()
    result = await run_job(config, tokens=StaticToken(Secret(info.access_token)), log=log)
    wall = time.monotonic() - started
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    return JobRun(result, wall, lines)


def run_job_in_process(info: SandboxInfo, csv_path: Path, workdir: Path, **settings: Any) -> JobRun:
    return asyncio.run(_run_job(info, csv_path, workdir, **settings))


def csv_from_sandbox(sandbox: SandboxProcess, path: Path, *, seed: int) -> tuple[Path, int]:
    """The CSV export of every ticket the sandbox's generated world holds."""
    rows: list[tuple[str, str]] = []
    for event_id in sandbox.state()["events"]:
        tickets = sandbox.get(f"/_sandbox/tickets/{event_id}")
        rows.extend((event_id, key) for key in tickets)
    return write_csv(path, rows, seed=seed), len(rows)


def pct(share: float) -> str:
    return f"{100 * share:.2f}%"


def all_undone(sandbox: SandboxProcess) -> bool:
    return all(ev["checked_in"] == 0 for ev in sandbox.state()["events"].values())


def rate_changes(run: JobRun) -> str:
    changes = run.events("rate.changed")
    if not changes:
        return "no rate change logged"
    low = min(float(e["new"]) for e in changes)
    return f"{len(changes)} rate changes logged, lowest {low:.2f}/s, final {run.result.rate:.2f}/s"


# --- rows 1 and 2: pacing --------------------------------------------------------------------


def _paced_run(
    ctx: Context,
    name: str,
    *,
    server_rate: float,
    job_rate: float,
    keys: int,
    batch: int,
    storm: float = 0.0,
) -> tuple[JobRun, list[dict[str, Any]], bool]:
    workdir = ctx.workdir(name)
    args = ["--rate", f"{server_rate:g}", "--burst", "1", "--quota", "none", "--events", "1"]
    args += ["--tickets-per-event", str(keys), "--seed", "1", "--throttle-storm", f"{storm:g}"]
    with SandboxProcess(*args, log=workdir / "sandbox.log") as sandbox:
        csv_path, _ = csv_from_sandbox(sandbox, workdir / "keys.csv", seed=1)
        run = run_job_in_process(
            sandbox.info, csv_path, workdir, rate=job_rate, batch_size=batch, concurrency=4
        )
        records = sandbox.requests()
        complete = all_undone(sandbox) and run.result.counts["undone"] == keys
    return run, records, complete


def row_pacing(ctx: Context) -> list[Row]:
    rate, batch = 20.0, 5
    keys = ctx.size(2000, 200)
    say(f"row 1: pacing, {keys} keys / batch {batch} at {rate:g}/s against a {rate:g}/s bucket")
    run, records, complete = _paced_run(
        ctx, "pacing", server_rate=rate, job_rate=rate, keys=keys, batch=batch
    )
    throttled = sum(1 for r in records if r["status"] == 429)
    accepted = [r for r in records if r["status"] != 429]
    span = accepted[-1]["at"] - records[0]["at"]
    achieved = (len(accepted) - 1) / span
    share = throttled / len(records)
    ok = achieved / rate >= 0.97 and share <= 0.01 and complete
    return [
        Row(
            "1",
            f"Pacing efficiency: job at R={rate:g}/s, server bucket R, burst 1",
            f"{achieved:.2f} req/s accepted; {throttled}/{len(records)} answered 429",
            f"{achieved / rate:.3f} of R; 429 {pct(share)}",
            ">= 0.97; <= 1%",
            ok,
            f"{len(accepted)} requests in {span:.1f}s (server clock), job wall {run.wall:.1f}s; "
            f"{rate_changes(run)}" + ("" if complete else "; NOT every key undone"),
        )
    ]


def row_adaptation(ctx: Context) -> list[Row]:
    rate, batch = 20.0, 5
    granted = rate / 2
    keys = ctx.size(2000, 200)
    say(f"row 2: adaptation, job at {rate:g}/s against a {granted:g}/s bucket")
    run, records, complete = _paced_run(
        ctx, "adaptation", server_rate=granted, job_rate=rate, keys=keys, batch=batch
    )
    needed = math.ceil(keys / batch) + 1  # the undo requests and one event check
    ideal = needed / granted
    throttled = sum(1 for r in records if r["status"] == 429)
    share = throttled / len(records)
    ratio = run.wall / ideal
    ok = ratio <= 1.10 and share <= 0.05 and complete
    return [
        Row(
            "2",
            f"Adaptation: job at R={rate:g}/s, server grants R/2={granted:g}/s",
            f"{run.wall:.1f}s for {needed} requests (ideal {ideal:.1f}s); "
            f"{throttled}/{len(records)} answered 429",
            f"{ratio:.3f} of ideal; 429 {pct(share)}",
            "<= 1.10; <= 5%",
            ok,
            rate_changes(run) + ("" if complete else "; NOT every key undone"),
        )
    ]


def row_noise(ctx: Context) -> list[Row]:
    rate, batch, storm = 20.0, 5, 0.05
    keys = ctx.size(2000, 200)
    say(
        f"row 2b: 429 noise, job at {rate:g}/s against a {rate:g}/s bucket that also refuses "
        f"{pct(storm)} of requests at random"
    )
    run, records, complete = _paced_run(
        ctx, "noise", server_rate=rate, job_rate=rate, keys=keys, batch=batch, storm=storm
    )
    needed = math.ceil(keys / batch) + 1  # the undo requests and one event check
    # Each random 429 costs one more request, and the job never goes above R: the best a
    # client can do is send at R throughout, so needed / (1 - storm) requests at R.
    ideal = needed / (1.0 - storm) / rate
    throttled = sum(1 for r in records if r["status"] == 429)
    share = throttled / len(records)
    ratio = run.wall / ideal
    ok = ratio <= 1.25 and share <= storm + 0.03 and complete
    return [
        Row(
            "2b",
            f"429 noise: job at R={rate:g}/s, server bucket R, plus {pct(storm)} of requests "
            "refused 429 at random",
            f"{run.wall:.1f}s for {needed} requests (ideal {ideal:.1f}s); "
            f"{throttled}/{len(records)} answered 429",
            f"{ratio:.3f} of ideal; 429 {pct(share)}",
            f"<= 1.25; <= {pct(storm + 0.03)}",
            ok,
            rate_changes(run) + ("" if complete else "; NOT every key undone"),
        )
    ]


# --- row 3: client overhead ------------------------------------------------------------------


def _span_rate(records: Sequence[dict[str, Any]]) -> float:
    span = float(records[-1]["at"]) - float(records[0]["at"])
    return (len(records) - 1) / span


async def _bare_loop(
    info: SandboxInfo, event_id: str, bodies: Sequence[bytes], concurrency: int
) -> float:
    url = f"{info.base_url}/events/{event_id}/undo_check_in/tickets"
    headers = {"Authorization": f"Bearer {info.access_token}", "Content-Type": "application/json"}
    pending = iter(bodies)
    statuses: list[int] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for body in pending:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    statuses.append(resp.status)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.monotonic() - started
    if set(statuses) != {204}:
        raise RuntimeError(f"bare loop got statuses {sorted(set(statuses))}")
    return wall


def row_overhead(ctx: Context) -> list[Row]:
    batch, concurrency = 10, 16
    keys = ctx.size(40_000, 4_000)
    rounds = 1 if ctx.smoke else 3  # a bare round lasts well under a second: noisy alone
    say(f"row 3: client overhead, {keys // batch} requests of {batch} keys, unlimited server")
    workdir = ctx.workdir("overhead")
    args = ["--rate", "none", "--quota", "none", "--events", "1"]
    args += ["--tickets-per-event", str(keys), "--seed", "3"]
    job_rates: list[float] = []
    job_walls: list[float] = []
    bare_rates: list[float] = []
    with SandboxProcess(*args, log=workdir / "sandbox.log") as sandbox:
        csv_path, _ = csv_from_sandbox(sandbox, workdir / "keys.csv", seed=3)
        (event_id,) = sandbox.state()["events"]
        # The job sends the keys in input order, so the bare loop sends the very same bodies.
        with csv_path.open(encoding="utf-8") as fh:
            ordered = [line.split(",")[1] for line in list(fh)[1:]]
        bodies = [
            json.dumps(
                {"order_ticket_keys": ordered[i : i + batch]}, separators=(",", ":")
            ).encode()
            for i in range(0, len(ordered), batch)
        ]
        seen = 0
        for _ in range(rounds):
            run = run_job_in_process(
                sandbox.info,
                csv_path,
                workdir,
                rate=1e6,
                batch_size=batch,
                concurrency=concurrency,
            )
            records = sandbox.requests()
            job_rates.append(_span_rate([r for r in records[seen:] if r["method"] == "POST"]))
            job_walls.append(len(bodies) / run.wall)
            seen = len(records)
            asyncio.run(_bare_loop(sandbox.info, event_id, bodies, concurrency))
            records = sandbox.requests()
            bare_rates.append(_span_rate(records[seen:]))
            seen = len(records)
    job, bare = max(job_rates), max(bare_rates)
    ratio = job / bare
    return [
        Row(
            "3",
            f"Client overhead: {len(bodies)} requests x {batch} keys, concurrency {concurrency}, "
            "server unlimited",
            f"job {job:.0f} req/s vs bare aiohttp {bare:.0f} req/s",
            f"{ratio:.2f} of bare",
            ">= 0.70",
            ratio >= 0.70,
            f"best of {rounds} (server clock, first to last request); job incl. reading "
            f"input and writing the report: {max(job_walls):.0f} req/s",
        )
    ]


# --- row 4: input ----------------------------------------------------------------------------


def _probe(what: str, csv_path: Path) -> tuple[float, ProcessCost]:
    cost = run_measured([sys.executable, "-m", "bench.probe", what, str(csv_path)], cwd=REPO)
    if cost.exit_code != 0:
        raise RuntimeError(f"probe {what} failed with exit {cost.exit_code}")
    return float(json.loads(cost.stdout)["seconds"]), cost


def row_input(ctx: Context) -> list[Row]:
    events, per_event = 20, ctx.size(50_000, 2_500)
    rows = events * per_event
    say(f"row 4: input, {rows:,} rows")
    _, csv_path = big_world(ctx.out / "data", events, per_event, seed=7)
    rounds = 1 if ctx.smoke else 5  # fresh processes on a shared machine: the best of several
    pandas_runs = []
    plan_runs = []
    for _ in range(rounds):  # interleaved, so both see the same page cache and load
        pandas_runs.append(_probe("pandas", csv_path))
        plan_runs.append(_probe("plan", csv_path))
    pandas_s, pandas_cost = min(pandas_runs, key=lambda r: r[0])
    plan_s, plan_cost = min(plan_runs, key=lambda r: r[0])
    ratio = plan_s / pandas_s
    peak = max(cost.peak_rss for _, cost in plan_runs)
    ok = ratio <= 2.0 and peak <= 2**30
    return [
        Row(
            "4",
            f"Input: {rows:,}-row CSV ({events} events, 3 columns) to a complete plan",
            f"plan {plan_s:.2f}s, peak RSS {peak / 2**20:.0f} MiB; "
            f"pandas.read_csv {pandas_s:.2f}s, {pandas_cost.peak_rss_mib:.0f} MiB",
            f"{ratio:.2f}x time; RSS {peak / 2**30:.2f} GiB",
            "<= 2x; <= 1 GiB",
            ok,
            f"best of {rounds}, each in a fresh process; time excludes imports, RSS includes "
            f"them; whole plan process {plan_cost.wall:.1f}s wall",
        ),
        *row_excel(ctx),  # 4b: the other half of "big inputs"
    ]


def _excel_file(path: Path, rows: int) -> Path:
    if path.exists():
        return path
    import openpyxl

    path.parent.mkdir(parents=True, exist_ok=True)
    book = openpyxl.Workbook(write_only=True)
    sheet = book.create_sheet("Scans")
    sheet.append(["Event ID", "Ticket Key", "Scanned At"])
    event = "07216444-4e3b-41ea-a3b8-5a418fce41f4"
    for i in range(rows):
        # Half the keys as numbers, as Excel stores digit-only keys typed into a cell.
        sheet.append([event, 100_000_000 + i if i % 2 else f"{i:012x}", "2026-05-01 10:00"])
    tmp = path.with_suffix(".tmp.xlsx")
    book.save(tmp)
    tmp.replace(path)
    return path


def _best_time(fn: Callable[[], object], rounds: int) -> float:
    best = math.inf
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def row_excel(ctx: Context) -> list[Row]:
    import pandas as pd

    from batchjob.read import read_inputs

    rows = ctx.size(100_000, 5_000)
    say(f"row 4b: Excel, {rows:,} rows: calamine vs openpyxl")
    path = _excel_file(ctx.out / "data" / f"scans-{rows}.xlsx", rows)
    rounds = 1 if ctx.smoke else 2
    calamine = _best_time(lambda: pd.read_excel(path, engine="calamine", dtype=str), rounds)
    openpyxl = _best_time(lambda: pd.read_excel(path, engine="openpyxl", dtype=str), rounds)
    ours = _best_time(lambda: read_inputs([path]), rounds)
    return [
        Row(
            "4b",
            f"Excel: {rows:,}-row .xlsx, pandas.read_excel with each engine",
            f"calamine {calamine:.2f}s, openpyxl {openpyxl:.2f}s; read_inputs {ours:.2f}s",
            f"calamine {openpyxl / calamine:.1f}x faster",
            "the faster engine is used",
            calamine <= openpyxl,
            f"best of {rounds}; read_inputs uses calamine and normalises numbers to text",
        )
    ]


# --- row 5: end to end -----------------------------------------------------------------------


@dataclass(frozen=True)
class EndToEnd:
    cost: ProcessCost
    complete: bool  # every key of the world undone
    requests: int  # as the sandbox counted them


def end_to_end_run(
    ctx: Context, name: str, world_path: Path, csv_path: Path, state: str
) -> EndToEnd:
    """Row 5's measurement: ``batchjob run`` over the whole world, against a fresh sandbox.

    ``state`` is the run store: ``none``, or a path (a scratch file under bench/out).
    """
    workdir = ctx.workdir(name)
    args = ["--rate", "none", "--quota", "none", "--world", str(world_path)]
    with SandboxProcess(*args, "--no-record-requests", log=workdir / "sandbox.log") as sandbox:
        cmd = job_command(sandbox.info, csv_path, workdir / "report.csv", state=state)
        settle_disk()
        cost = run_measured(cmd, cwd=REPO, env=job_env(sandbox.info), stderr=workdir / "job.log")
        requests = int(sandbox.state()["counters"]["total"])
        complete = all_undone(sandbox)
    return EndToEnd(cost, complete, requests)


def row_end_to_end(ctx: Context) -> list[Row]:
    events, per_event = 20, ctx.size(50_000, 2_500)
    keys = events * per_event
    batch, concurrency = 1000, 8
    say(f"row 5: end to end, {keys:,} keys (preparing the world file)")
    world_path, csv_path = big_world(ctx.out / "data", events, per_event, seed=7)
    say("row 5: running `python -m batchjob run --state none` in a subprocess")
    run = end_to_end_run(ctx, "e2e", world_path, csv_path, "none")
    cost = run.cost
    ok = cost.exit_code == 0 and run.complete
    return [
        Row(
            "5",
            f"End to end: `batchjob run --state none`, {keys:,} keys ({events} events), "
            f"batch {batch}, concurrency {concurrency}, server unlimited",
            f"{cost.wall:.1f}s wall, {cost.cpu:.1f}s CPU, peak RSS {cost.peak_rss_mib:.0f} MiB",
            f"{keys / cost.wall:,.0f} keys/s; CPU {cost.cpu / cost.wall:.2f} of wall",
            "all keys undone (timing reported)",
            ok,
            f"exit {cost.exit_code}, {run.requests} requests; whole process incl. interpreter "
            "start, plan and report; no run store (row N2 has it on)",
        )
    ]


# --- row 6: bad keys -------------------------------------------------------------------------


def _bad_keys_run(ctx: Context, keys: int, bad: int, batch: int) -> Row:
    workdir = ctx.workdir(f"badkeys-{bad}")
    world_path, csv_path, good = world_with_bad_keys(workdir, keys, bad, seed=11)
    args = ["--rate", "none", "--quota", "none", "--world", str(world_path)]
    with SandboxProcess(*args, log=workdir / "sandbox.log") as sandbox:
        run = run_job_in_process(sandbox.info, csv_path, workdir, rate=1e6, batch_size=batch)
        posts = sum(1 for r in sandbox.requests() if r["method"] == "POST")
        complete = all_undone(sandbox)
    counts = run.result.counts
    minimum = math.ceil(keys / batch)
    ratio = posts / minimum
    exact = complete and counts["undone"] == good and counts["failed"] == bad
    share = bad / keys
    return Row(
        "6" if share >= 0.01 else "6b",
        f"Bad keys: {keys:,} keys, batch {batch}, {pct(share)} unknown ({bad}) at random",
        f"{posts} undo requests (minimum {minimum})",
        f"{ratio:.2f}x",
        "<= 9.5x; all good undone" if share >= 0.01 else "all good undone (reported)",
        (ratio <= 9.5 and exact) if share >= 0.01 else exact,
        f"undone {counts['undone']}/{good}, failed {counts['failed']}/{bad}; "
        "concurrency 4 (default)",
    )


def row_bad_keys(ctx: Context) -> list[Row]:
    keys, batch = ctx.size(10_000, 2_000), 100
    say(f"row 6: bad keys, {keys:,} keys")
    return [
        _bad_keys_run(ctx, keys, keys // 100, batch),
        _bad_keys_run(ctx, keys, keys // 1000, batch),
    ]


ROWS: dict[str, Callable[[Context], list[Row]]] = {
    "1": row_pacing,
    "2": row_adaptation,
    "2b": row_noise,
    "3": row_overhead,
    "4": row_input,
    "5": row_end_to_end,
    "6": row_bad_keys,
}
