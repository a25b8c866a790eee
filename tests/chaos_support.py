"""Helpers for the crash, chaos and hostile-input tests.

The central tool is :class:`RecordingTransport`: it wraps the job's real aiohttp transport and
writes down, on the job's side of the wire, when each request was handed to the network and
when its answer (or the lack of one) came back. Together with the sandbox's own request log
(what reached the server, stamped on arrival with the same event loop's clock) it lets a test
prove the "never resend what is already done" rule, which neither side can prove alone:

* the sandbox log cannot tell a legitimate resend after a lost reply (the job never learned the
  change was applied) from a wasteful one (the job had its 204 already);
* the job's side cannot see requests that arrived but whose answers were lost.

See :func:`check_run` for the rule itself.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import sys
from collections.abc import Callable, Collection, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from batchjob import JobConfig, RunResult, StopRequest, TokenSource, run_job
from batchjob._cells import unescape_cell
from batchjob._errors import StoreError
from batchjob._logging import Redactor, make_logger
from batchjob.sandbox import RequestRecord, Sandbox, World
from batchjob.send import AiohttpTransport, RawResponse, Transport, TransportError, make_session
from batchjob.store import default_path
from batchjob.store._sqlite import open_sqlite
from tests.support import read_report, token_for

Pair = tuple[str, str]

#: Fast but real: short backoff waits; everything else is the caller's.
QUICK: dict[str, Any] = {"rate": 300.0, "concurrency": 8, "retry_base": 0.005, "retry_cap": 0.05}

#: Formula-like first characters (Excel, LibreOffice, Google Sheets).
TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


# --- the job's side of the wire -----------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    """One attempt as the job saw it. Times are the running loop's clock (``loop.time()``)."""

    method: str
    path: str
    keys: tuple[str, ...]
    sent: float  # handed to the transport
    answered: float  # answer, network error or cancellation
    status: int  # HTTP status; 0 = no answer (network error, timeout); -1 = cancelled


class RecordingTransport:
    """A :class:`~batchjob.Transport` that logs every attempt and delegates to the real one."""

    def __init__(self, inner: Transport, log: list[Exchange] | None = None) -> None:
        self.inner = inner
        self.log: list[Exchange] = [] if log is None else log

    async def request(
        self, method: str, url: str, *, headers: dict[str, str], body: bytes | None
    ) -> RawResponse:
        loop = asyncio.get_running_loop()
        keys: tuple[str, ...] = ()
        if body:
            keys = tuple(json.loads(body).get("order_ticket_keys", ()))
        path = url.split("://", 1)[-1].partition("/")[2]
        sent = loop.time()
        status = -1
        try:
            raw = await self.inner.request(method, url, headers=headers, body=body)
            status = raw.status
            return raw
        except TransportError:
            status = 0
            raise
        finally:
            self.log.append(Exchange(method, "/" + path, keys, sent, loop.time(), status))


async def run_recorded(
    sandbox: Sandbox,
    inputs: Sequence[Path],
    report: Path,
    *,
    stop: StopRequest | None = None,
    progress: Any = None,
    exchanges: list[Exchange] | None = None,
    tokens: TokenSource | None = None,
    **settings: Any,
) -> tuple[RunResult, list[Exchange]]:
    """The real job (real aiohttp session, real timeouts) with every attempt recorded.

    Attempts go to ``exchanges`` as they happen, so a caller keeps them if the run is cancelled.
    """
    config = JobConfig(
        inputs=tuple(inputs),
        report=report,
        base_url=sandbox.base_url,
        token_url=sandbox.token_url,
        **(QUICK | settings),
    )
    session = make_session(
        connect_timeout=config.connect_timeout,
        request_timeout=config.request_timeout,
        concurrency=config.concurrency,
    )
    recorder = RecordingTransport(AiohttpTransport(session), exchanges)
    log = make_logger(
        log_format="json", level="debug", redactor=Redactor([sandbox.access_token]),
        stream=io.StringIO(),
    )  # fmt: skip
    try:
        result = await run_job(
            config,
            tokens=tokens or token_for(sandbox),
            transport=recorder,
            log=log,
            stop=stop,
            progress=progress,
        )
    finally:
        await session.close()
    return result, recorder.log


class CrashAfter:
    """A progress display that cancels the run once ``keys`` outcomes were recorded.

    Cancelling ``run_job`` mid-flight leaves its journal behind and writes no final report,
    which is what a crash leaves (the journal may also hold ``interrupted`` rows for requests in
    flight: those are never ``undone``, so they change nothing for a resume).
    """

    def __init__(self, keys: int) -> None:
        self.keys = keys
        self.seen = 0
        self.task: asyncio.Task[Any] | None = None

    def start(self, total: int) -> None:
        self.task = asyncio.current_task()

    def advance(self, keys: int, rate: float) -> None:
        self.seen += keys
        if self.seen >= self.keys and self.task is not None:
            self.task.cancel()
            self.task = None

    def close(self) -> None:
        pass


async def crash_run(run: Coroutine[Any, Any, Any]) -> None:
    """Run ``run`` in its own task; a :class:`CrashAfter` cancelling it is the expected end."""
    task = asyncio.ensure_future(run)
    try:
        await task
    except asyncio.CancelledError:
        me = asyncio.current_task()
        if not task.cancelled() or (me is not None and me.cancelling()):
            raise  # we were cancelled ourselves (a timeout), not the run
    else:
        raise AssertionError("the run finished before the simulated crash")


# --- the invariants -----------------------------------------------------------------------------


def ack_times(exchanges: Iterable[Exchange]) -> dict[str, float]:
    """For each key: when the job first received a 2xx for an undo request holding it."""
    acked: dict[str, float] = {}
    for x in exchanges:
        if x.method == "POST" and 200 <= x.status < 300:
            for key in x.keys:
                acked[key] = min(acked.get(key, x.answered), x.answered)
    return acked


def check_run(
    report_path: Path,
    expected: Sequence[Pair],
    world: World,
    server_log: Sequence[RequestRecord],
    exchanges: Sequence[Exchange],
    *,
    carried: Collection[str] = (),
    not_attempted_is_truthful: bool = True,
) -> pd.DataFrame:
    """Assert the invariants every run must keep, whatever went wrong. Returns the report.

    ``server_log`` and ``exchanges`` are this run's requests only; ``carried`` are keys an
    earlier run already undid (a ``--resume``), which this run must not send at all.

    1. Exactly once: the report holds every expected (event, key) once, in input order.
    2. Truthful: ``undone`` only where the sandbox has the ticket not checked in, hence no
       ticket still checked in is reported ``undone``; and, carried keys aside, ``undone``
       exactly for the keys the job got a 2xx for (nothing claimed without an answer, no
       answer left unrecorded).
    3. Never resent once done. The job records a key ``undone`` only after it received a 2xx
       for a request holding it, so that moment, ``ack``, is the earliest the ledger (and the
       journal, appended in the same call) can know it. Keys are in one group at a time, so
       after ``ack`` nothing may send the key again: no attempt holding it may be handed to
       the transport after ``ack`` (job side; this also covers requests that the fault
       injection answered before reading their body, which the sandbox logs without keys),
       and no request holding it may *arrive* at the sandbox after ``ack`` (server side,
       arrival stamped by the same loop clock; this covers what the job's side cannot see).
       Earlier resends are legitimate: a lost reply, a timeout or a 5xx leaves the job not
       knowing whether the change was applied. A "slow" request that the server applies
       after the job gave up on it is stamped with its arrival, which came before the retry
       that got the 204, so it correctly counts as before ``ack``.
    4. A ``not_attempted`` row whose message does not hedge ("may have applied it") was
       never applied by the server; one that says "before this key was sent" was never sent.
    """
    report = read_report(report_path)
    pairs = [(unescape_cell(e), unescape_cell(k)) for e, k in zip(
        report.event_id, report.order_ticket_key, strict=True)]  # fmt: skip
    assert pairs == list(expected), "report rows differ from the input's (event, key) pairs"

    outcome = dict(zip(pairs, report.outcome, strict=True))
    for (event_id, key), what in outcome.items():
        ticket_known = event_id in world.events and key in world.events[event_id].tickets
        if what == "undone":
            assert ticket_known, f"{key!r} reported undone but the sandbox has no such ticket"
            assert not world.checked_in(event_id, key), f"{key!r} undone but still checked in"
        if ticket_known and world.checked_in(event_id, key):
            assert what != "undone"

    carried = set(carried)
    acked = ack_times(exchanges)
    assert not carried & set(acked), "a key undone by an earlier run was sent again"
    sent_keys = {k for x in exchanges for k in x.keys} | keys_sent(server_log)
    assert not carried & sent_keys, "a key undone by an earlier run was sent again"
    undone_keys = {k for (_, k), what in outcome.items() if what == "undone"} - carried
    assert undone_keys == set(acked), (
        f"undone without a 2xx: {sorted(undone_keys - set(acked))[:5]}; "
        f"2xx but not undone: {sorted(set(acked) - undone_keys)[:5]}"
    )
    for x in exchanges:
        for key in x.keys:
            if key in acked:
                assert x.sent <= acked[key], f"{key!r} sent again after its 204 was received"
    for r in server_log:
        for key in r.keys:
            if key in acked:
                assert r.at <= acked[key], f"{key!r} reached the server again after its 204"

    applied = {k for r in server_log if r.applied for k in r.keys}
    for (_, key), what, message in zip(pairs, report.outcome, report.error_message, strict=True):
        if what != "not_attempted" or "may" in message or not not_attempted_is_truthful:
            continue
        if "before this key was sent" in message or "before this key" in message:
            assert key not in sent_keys, f"{key!r} reported not sent ({message!r}) but was sent"
        assert key not in applied, (
            f"{key!r} is not_attempted ({message!r}) with no word that the server may have "
            "applied it, but the server did"
        )
    return report


def assert_all_good_keys_undone(world: World, good: Iterable[Pair]) -> None:
    still = [(e, k) for e, k in good if world.checked_in(e, k)]
    assert not still, f"{len(still)} good tickets still checked in, e.g. {still[:3]}"


# --- files and processes ------------------------------------------------------------------------


def journal_path(report: Path) -> Path:
    return report.with_name(report.name + ".journal")


def journal_records(path: Path) -> list[dict[str, str]]:
    """The records of a journal, read the way ``--resume`` reads it.

    A crash may leave the last line cut short. Like pandas (which ``--resume`` uses), a cut
    line whose first fields are whole counts, padded with empty fields: a line cut right after
    its outcome still says ``undone``, which is true, as the line is written after the answer.
    A line glued to such a fragment has too many fields and is no record any more.
    """
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    end = text.rfind("\n") + 1
    reader = csv.reader(io.StringIO(text[:end], newline=""))
    header = next(reader, [])
    rows = [row for row in reader if len(row) == len(header)]
    fragment = text[end:]
    if fragment and header:
        try:
            fields = next(csv.reader(io.StringIO(fragment, newline="")), [])
        except csv.Error:
            fields = []
        # Two fields or fewer: the key may be cut; either way such a line says nothing.
        if 3 <= len(fields) <= len(header):
            rows.append(fields + [""] * (len(header) - len(fields)))
    return [{k: unescape_cell(v) for k, v in zip(header, row, strict=True)} for row in rows]


def undone_in_journal(path: Path) -> set[Pair]:
    """Keys recorded undone so far: in the journal (``--state none``), or else in the run
    store at the default location, for the run of the report the journal belongs to."""
    if path.exists():
        return {
            (r["event_id"], r["order_ticket_key"])
            for r in journal_records(path)
            if r.get("outcome") == "undone"
        }
    return recorded_in_store(path.with_name(path.name.removesuffix(".journal")), "undone")


def recorded_in_store(report: Path, outcome: str, store: Path | None = None) -> set[Pair]:
    """(event, key) pairs the run store records with ``outcome`` for ``report``'s last run."""
    store = store or default_path()
    if not store.exists():
        return set()
    try:
        opened = open_sqlite(store)
    except StoreError:
        return set()  # being created by the run right now
    try:
        run = opened.last_run_for_report(os.path.abspath(report))
        if run is None:
            return set()
        rows = opened.rows(run.run_id)
    finally:
        opened.close()
    rows = rows[rows["outcome"] == outcome]
    return set(zip(rows["event_id"], rows["order_ticket_key"], strict=True))


def cells(path: Path) -> list[list[str]]:
    """Every row of a CSV this tool wrote, as raw (still escaped) cells."""
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def cli_env(sandbox: Sandbox | None = None, **extra: str) -> dict[str, str]:
    """The environment for a child ``python -m batchjob``: ours minus any batchjob settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHJOB_", "CC_"))}
    if sandbox is not None:
        env |= {"CC_ACCESS_TOKEN": sandbox.access_token, "CC_BASE_URL": sandbox.base_url}
    return env | extra


async def start_cli(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchjob", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env, cwd=cwd,
    )  # fmt: skip


@dataclass
class Finished:
    code: int
    out: str
    err: str
    extra: dict[str, Any] = field(default_factory=dict)


async def finish(proc: asyncio.subprocess.Process, within: float = 60.0) -> Finished:
    out, err = await asyncio.wait_for(proc.communicate(), within)
    assert proc.returncode is not None
    return Finished(proc.returncode, out.decode(), err.decode())


async def cli(*args: str, env: dict[str, str], cwd: Path | None = None) -> Finished:
    return await finish(await start_cli(*args, env=env, cwd=cwd))


async def wait_until(
    condition: Callable[[], bool], *, within: float = 20.0, what: str = "condition"
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def undo_requests(sandbox: Sandbox, since: float = float("-inf")) -> list[RequestRecord]:
    return [r for r in sandbox.requests if r.method == "POST" and r.at >= since]


def keys_sent(records: Iterable[RequestRecord]) -> set[str]:
    return {k for r in records for k in r.keys}


def no_traceback(text: str) -> bool:
    return "Traceback (most recent call last)" not in text
