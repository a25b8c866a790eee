"""Rows P1 and P2: the run store on PostgreSQL, and runs that share one API key.

P1: row 5 with a PostgreSQL store, against the SQLite store and ``--state none``. P2: two
``batchjob run`` processes with the same API key on one store and one rate-limited sandbox
(batchjob/run/_share.py): how fully they use the key's rate between them, and how soon the
second takes over when the first is killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.data import big_world, write_csv
from bench.pg import PgServer, shared_server
from bench.rows import (
    Context,
    EndToEnd,
    Row,
    all_undone,
    end_to_end_run,
    job_command,
    job_env,
    pct,
    say,
)
from bench.sandbox import REPO, SandboxInfo, SandboxProcess
from bench.store_rows import store_bytes

#: The lease's default expiry (batchjob JobConfig.lease_timeout): how long a run on another
#: machine waits for a killed holder's lease.
LEASE_TIMEOUT = 30.0


def pg_root(ctx: Context) -> Path:
    return ctx.out / "pg"


# --- row P1: row 5 on PostgreSQL ---------------------------------------------------------------


@dataclass(frozen=True)
class StoreRun:
    run: EndToEnd
    store_size: int  # bytes of the store after the run
    server_cpu: float  # seconds of the PostgreSQL server's processes during the run (0: none)


def _p1_run(
    ctx: Context,
    kind: str,
    index: int,
    world_path: Path,
    csv_path: Path,
    server: PgServer | None,
) -> StoreRun:
    name = f"pg-cost-{kind}-{index}"
    if kind == "none":
        return StoreRun(end_to_end_run(ctx, name, world_path, csv_path, "none"), 0, 0.0)
    if kind == "sqlite":
        scratch = ctx.workdir(f"{name}-state") / "state.sqlite3"
        run = end_to_end_run(ctx, name, world_path, csv_path, str(scratch))
        return StoreRun(run, store_bytes(scratch), 0.0)
    assert server is not None
    database = f"bench_p1_{index}"
    url = server.fresh_database(database)
    try:
        server.settle()
        before = server.cpu_seconds()
        run = end_to_end_run(ctx, name, world_path, csv_path, url)
        server.settle()  # the run's backends end just after it: count their whole work
        cpu = server.cpu_seconds() - before
        size = server.database_bytes(database)
    finally:
        server.drop_database(database)
    return StoreRun(run, size, cpu)


def _cost(run: StoreRun) -> str:
    cost = run.run.cost
    return f"{cost.wall:.1f}s wall, {cost.cpu:.1f}s CPU, {cost.peak_rss_mib:.0f} MiB"


def row_pg_cost(ctx: Context) -> list[Row]:
    events, per_event = 20, ctx.size(50_000, 2_500)
    keys = events * per_event
    rounds = 1 if ctx.smoke else 2
    measure = (
        f"PostgreSQL store: row 5 ({keys:,} keys, batch 1000, concurrency 8) with a fresh "
        "PostgreSQL store vs a fresh SQLite store vs `--state none`"
    )
    target = "PostgreSQL <= 1.5x SQLite (wall)"
    server, why = shared_server(pg_root(ctx))
    if server is None:
        say(f"row P1: SKIP: {why}")
        return [Row("P1", measure, "", "", target, None, f"SKIP: {why}", skip=True)]
    say(f"row P1: row 5 ({keys:,} keys) with PostgreSQL, SQLite and no store ({server.version})")
    world_path, csv_path = big_world(ctx.out / "data", events, per_event, seed=7)
    kinds = ("postgresql", "sqlite", "none")
    runs: dict[str, list[StoreRun]] = {kind: [] for kind in kinds}
    for index in range(rounds):  # alternating (and rotated), so all see the same machine
        order = kinds[index % 3 :] + kinds[: index % 3]
        for kind in order:
            say(f"row P1: round {index + 1}/{rounds}, {kind}")
            runs[kind].append(_p1_run(ctx, kind, index, world_path, csv_path, server))
    best = {kind: min(found, key=lambda r: r.run.cost.wall) for kind, found in runs.items()}
    rss = {kind: max(r.run.cost.peak_rss for r in found) for kind, found in runs.items()}
    pg, lite, none = best["postgresql"], best["sqlite"], best["none"]
    wall = pg.run.cost.wall / lite.run.cost.wall
    every = [r for found in runs.values() for r in found]
    complete = all(r.run.complete and r.run.cost.exit_code == 0 for r in every)
    walls = "; ".join(
        f"{kind}: {', '.join(f'{r.run.cost.wall:.1f}s' for r in runs[kind])}" for kind in kinds
    )
    server_cpu = min(r.server_cpu for r in runs["postgresql"])
    pg_total = pg.run.cost.cpu + pg.server_cpu
    return [
        Row(
            "P1",
            measure,
            f"PostgreSQL {_cost(pg)}; SQLite {_cost(lite)}; none {_cost(none)}",
            f"PG/SQLite {wall:.2f}x wall, {pg.run.cost.cpu / lite.run.cost.cpu:.2f}x CPU, "
            f"{rss['postgresql'] / rss['sqlite']:.2f}x RSS; vs none: PG "
            f"{pg.run.cost.wall / none.run.cost.wall:.2f}x, SQLite "
            f"{lite.run.cost.wall / none.run.cost.wall:.2f}x wall",
            target,
            wall <= 1.5 and complete,
            f"best wall of {rounds} each, alternating ({walls}); CPU and RSS are the run's "
            f"process alone (wait4), RSS the highest; the PostgreSQL server's own processes "
            f"used {pg.server_cpu:.1f}s CPU beside the best run (least {server_cpu:.1f}s), "
            f"run + server {pg_total:.1f}s = {pg_total / lite.run.cost.cpu:.2f}x SQLite's CPU; "
            f"store after the run: PostgreSQL {pg.store_size / 2**20:.0f} MiB (database), "
            f"SQLite {lite.store_size / 2**20:.0f} MiB; {server.version} on 127.0.0.1 "
            "(defaults, fsync on), one fresh database per run"
            + ("" if complete else "; NOT every run undid every key"),
        )
    ]


# --- row P2: two runs, one API key -------------------------------------------------------------


@dataclass
class Child:
    """A ``batchjob run`` subprocess whose JSON log goes to a file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    summary: Path

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("event") == name:
                found.append(entry)
        return found

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(
                f"run {self.name} did not end in {timeout:.0f}s; see {self.log}"
            ) from None

    def end(self) -> None:
        """Kill it if it still runs, and reap it (a zombie's pid would still look alive)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def counts(self) -> dict[str, int]:
        record = json.loads(self.summary.read_text(encoding="utf-8"))
        return {str(k): int(v) for k, v in record["counts"].items()}


def _start_child(
    info: SandboxInfo, workdir: Path, name: str, csv_path: Path, state: str, *, rate: float
) -> Child:
    log, summary = workdir / f"{name}.log", workdir / f"{name}.summary.json"
    cmd = job_command(
        info,
        csv_path,
        workdir / f"{name}-report.csv",
        state=state,
        batch=5,
        concurrency=4,
        rate=int(rate),
        log_level="info",
        extra=("--summary-json", str(summary)),
    )
    env = job_env(info)
    env["BATCHJOB_API_KEY"] = "bench-shared-key"  # the same key for both runs, said outright
    with log.open("ab") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
    return Child(name, proc, log, summary)


def _event_csvs(
    sandbox: SandboxProcess, workdir: Path, sizes: Sequence[int]
) -> list[tuple[str, Path]]:
    """One input per run: the first ``size`` keys of the sandbox's next event."""
    found = []
    event_ids = sorted(sandbox.state()["events"])
    for index, (event_id, size) in enumerate(zip(event_ids, sizes, strict=False)):
        keys = sorted(sandbox.get(f"/_sandbox/tickets/{event_id}"))[:size]
        path = write_csv(workdir / f"input-{index}.csv", [(event_id, k) for k in keys], seed=index)
        found.append((event_id, path))
    return found


def _sandbox_args(rate: float, per_event: int) -> list[str]:
    args = ["--rate", f"{rate:g}", "--burst", "1", "--quota", "none", "--events", "2"]
    return [*args, "--tickets-per-event", str(per_event), "--seed", "2"]


def _store(server: PgServer | None, workdir: Path, database: str) -> str:
    if server is not None:
        return server.fresh_database(database)
    return str(workdir / "state" / "state.sqlite3")


@dataclass(frozen=True)
class Turn:
    """One run's requests on the sandbox's clock."""

    first: float
    last: float
    count: int

    @property
    def rate(self) -> float:
        return (self.count - 1) / (self.last - self.first)


@dataclass(frozen=True)
class Together:
    records: list[dict[str, Any]]
    turns: dict[str, Turn]  # run name: its requests
    order: tuple[str, str]  # the run that sent first, then the other
    waited: bool  # the second run logged key.waiting
    complete: bool
    wall: float

    @property
    def gap(self) -> float:
        """Seconds from the first run's last request to the second's first."""
        return self.turns[self.order[1]].first - self.turns[self.order[0]].last

    @property
    def overlap(self) -> bool:
        """Requests of both runs interleaved: they did not take turns."""
        return self.gap < 0


def _together(
    ctx: Context, server: PgServer | None, rate: float, keys: int, timeout: float
) -> Together:
    workdir = ctx.workdir("shared-key-together")
    with SandboxProcess(*_sandbox_args(rate, keys), log=workdir / "sandbox.log") as sandbox:
        inputs = _event_csvs(sandbox, workdir, [keys, keys])
        state = _store(server, workdir, "bench_p2_together")
        started = time.monotonic()
        children: list[Child] = []
        try:
            for name, (_, path) in zip("AB", inputs, strict=True):
                children.append(_start_child(sandbox.info, workdir, name, path, state, rate=rate))
            codes = [child.wait(timeout) for child in children]
        finally:
            for child in children:
                child.end()
        wall = time.monotonic() - started
        records = sandbox.requests()
        complete = all_undone(sandbox) and codes == [0, 0]
        complete = complete and all(c.counts().get("undone") == keys for c in children)
    (workdir / "requests.json").write_text(json.dumps(records), encoding="utf-8")
    turns = {}
    for name, (event_id, _) in zip("AB", inputs, strict=True):
        at = [float(r["at"]) for r in records if r["event_id"] == event_id]
        turns[name] = Turn(min(at), max(at), len(at))
    first, second = sorted(turns, key=lambda n: turns[n].first)
    waited = bool(children["AB".index(second)].events("key.waiting"))
    if server is not None:
        server.drop_database("bench_p2_together")
    return Together(records, turns, (first, second), waited, complete, wall)


@dataclass(frozen=True)
class Takeover:
    seconds: float  # from A's kill to the sandbox's first request of B
    lease_taken: float | None  # from the kill to B's key.lease_taken log line (wall clock)
    a_sent: int  # requests A sent before it was killed
    b_before_kill: int  # requests of B before the kill (must be 0)
    b_waited: float  # seconds B had been waiting when A was killed
    complete: bool  # B undid every key of its input


def _parse_time(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def _wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"P2 takeover: {what} did not happen in {timeout:.0f}s")
        time.sleep(0.02)


def _takeover(
    ctx: Context,
    server: PgServer | None,
    rate: float,
    keys: int,
    send_for: float,
    timeout: float,
) -> Takeover:
    workdir = ctx.workdir("shared-key-takeover")
    a_keys = max(keys, int(rate * 5 * (send_for + 30)))  # A must outlast B's start
    with SandboxProcess(*_sandbox_args(rate, a_keys), log=workdir / "sandbox.log") as sandbox:
        (a_event, a_csv), (b_event, b_csv) = _event_csvs(sandbox, workdir, [a_keys, keys])
        state = _store(server, workdir, "bench_p2_takeover")
        a = _start_child(sandbox.info, workdir, "A", a_csv, state, rate=rate)
        b: Child | None = None
        try:
            _wait_for(
                "run A's first request",
                lambda: int(sandbox.state()["counters"]["total"]) > 0,
                timeout,
            )
            a_first = float(sandbox.requests()[0]["at"])
            b = _start_child(sandbox.info, workdir, "B", b_csv, state, rate=rate)
            _wait_for("run B waiting for the lease", lambda: bool(b.events("key.waiting")), 60)
            waiting_since = _parse_time(b.events("key.waiting")[0]["timestamp"])
            pause = a_first + send_for - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            if a.proc.poll() is not None:
                raise RuntimeError(f"run A ended before it was killed; see {a.log}")
            killed_wall = time.time()
            killed = time.monotonic()  # the sandbox's clock too (loop.time(), one machine)
            os.kill(a.proc.pid, signal.SIGKILL)
            a.proc.wait()  # reaped at once: a zombie's pid would still look alive
            code = b.wait(timeout)
        finally:
            a.end()
            if b is not None:
                b.end()
        records = sandbox.requests()
        complete = code == 0 and b.counts().get("undone") == keys
        events = sandbox.state()["events"]
        # B's input is the first ``keys`` of its event's a_keys tickets: those undone, no more.
        complete = complete and events[b_event]["checked_in"] == a_keys - keys
    (workdir / "requests.json").write_text(json.dumps(records), encoding="utf-8")
    if server is not None:
        server.drop_database("bench_p2_takeover")
    b_at = [float(r["at"]) for r in records if r["event_id"] == b_event]
    a_sent = sum(1 for r in records if r["event_id"] == a_event)
    taken = b.events("key.lease_taken")
    return Takeover(
        seconds=min(b_at) - killed,
        lease_taken=_parse_time(taken[0]["timestamp"]) - killed_wall if taken else None,
        a_sent=a_sent,
        b_before_kill=sum(1 for at in b_at if at < killed),
        b_waited=killed_wall - waiting_since,
        complete=complete,
    )


def _turn(turn: Turn) -> str:
    return f"{turn.count} requests in {turn.last - turn.first:.2f}s, {turn.rate:.2f}/s"


def row_shared_key(ctx: Context) -> list[Row]:
    rate = 20.0
    keys = ctx.size(1000, 100)
    send_for = ctx.size(3, 1)
    timeout = 300.0
    server, why = shared_server(pg_root(ctx))
    backend = "PostgreSQL" if server is not None else "SQLite"
    store_note = (
        f"one {backend} store ({server.version})"
        if server is not None
        else f"one SQLite store (PostgreSQL unavailable: {why})"
    )
    say(f"row P2: two runs on one key, {keys} keys each, batch 5, at {rate:g}/s; {store_note}")
    together = _together(ctx, server, rate, keys, timeout)
    records = together.records
    accepted = [r for r in records if r["status"] != 429]
    throttled = len(records) - len(accepted)
    span = float(accepted[-1]["at"]) - float(accepted[0]["at"])
    achieved = (len(accepted) - 1) / span
    share = throttled / len(records)
    ok = (
        achieved / rate >= 0.95
        and share <= 0.01
        and together.complete
        and not together.overlap
        and together.waited
    )
    say(f"row P2: takeover: A sends for {send_for}s, then kill -9; B waits for the lease")
    takeover = _takeover(ctx, server, rate, keys, float(send_for), timeout)
    taken = (
        f"B logged key.lease_taken {takeover.lease_taken:.2f}s after the kill; "
        if takeover.lease_taken is not None
        else "B logged no key.lease_taken; "
    )
    takeover_ok = takeover.complete and takeover.b_before_kill == 0 and takeover.seconds < 5
    first, second = together.order
    return [
        Row(
            "P2",
            f"One API key, two runs: both started together on {backend}, {keys:,} keys each "
            f"(batch 5, job rate R={rate:g}/s), one sandbox bucket R, burst 1",
            f"{achieved:.2f} req/s accepted (both runs); {throttled}/{len(records)} answered 429",
            f"{achieved / rate:.3f} of R; 429 {pct(share)}",
            ">= 0.95; <= 1%",
            ok,
            f"{len(accepted)} requests in {span:.1f}s (server clock, first to last accepted; "
            f"ideal {(len(accepted) - 1) / rate:.2f}s), both processes {together.wall:.1f}s; "
            f"they took turns: run {first} sent first ({_turn(together.turns[first])}), run "
            f"{second} "
            + ("logged key.waiting, " if together.waited else "did NOT log key.waiting, ")
            + f"then sent {_turn(together.turns[second])}; the handover (first's last request "
            f"to second's first) took {together.gap:.2f}s where the pacer's slot is "
            f"{1 / rate:.2f}s (the waiting run polls the lease every 0.2 s): without it "
            f"{(len(accepted) - 1) / (span - together.gap + 1 / rate) / rate:.3f} of R"
            + ("; REQUESTS OF BOTH RUNS INTERLEAVED" if together.overlap else "")
            + ("" if together.complete else "; NOT every key undone / exit 0")
            + f"; {store_note}",
        ),
        Row(
            "P2b",
            f"One API key: takeover after `kill -9` of the lease holder, same machine, {backend}",
            f"{takeover.seconds:.2f}s from the kill to run B's first request",
            f"{takeover.seconds / LEASE_TIMEOUT:.3f} of lease_timeout ({LEASE_TIMEOUT:g}s)",
            "reported; PASS: B took over at once (< 5s) and undid all its keys",
            takeover_ok,
            f"A sent {takeover.a_sent} requests in ~{send_for}s, then SIGKILL (and was reaped "
            f"at once); B had waited {takeover.b_waited:.2f}s for the lease, polling it every "
            f"0.2 s, so the kill came ~{takeover.b_waited % 0.2:.2f}s after one of its polls (the "
            f"takeover is 0-0.2 s plus the store's round trips by that phase); {taken}the dead "
            "pid is seen at once on the same machine; a run on another machine would wait for "
            f"the lease to expire instead: up to lease_timeout ({LEASE_TIMEOUT:g}s) after A's "
            f"last renewal (every {LEASE_TIMEOUT / 3:g}s), i.e. {2 * LEASE_TIMEOUT / 3:g}-"
            f"{LEASE_TIMEOUT:g}s after the kill"
            + ("" if takeover.complete else "; B did NOT undo every key / exit 0")
            + (
                f"; B SENT {takeover.b_before_kill} REQUESTS BEFORE THE KILL"
                if takeover.b_before_kill
                else ""
            ),
        ),
    ]


ROWS: dict[str, Callable[[Context], list[Row]]] = {"P1": row_pg_cost, "P2": row_shared_key}
