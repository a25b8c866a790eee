"""One store test suite, run on both backends: SQLite (a real file) and PostgreSQL (a real
server the session starts, tests/pg_support.py). Same primitives, same answers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from batchjob._errors import StoreError
from batchjob.sandbox import Sandbox, World
from batchjob.store import IDS_SCHEMA, PLAN_SCHEMA, ROWS_SCHEMA, RunEnd, RunStart, open_store
from batchjob.store._chunks import ChunkStore
from batchjob.store._columns import IDS, PLAN, ROWS, encode
from batchjob.store._schema import MIGRATIONS, postgres_statement
from tests.support import read_report, run, ticket_rows, write_csv

API = "http://127.0.0.1:9/v3"
HEADER = ("Event ID", "Order Ticket Key")
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)]


@pytest.fixture(params=BACKENDS)
def state(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "state.sqlite3")
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def store(state: str) -> Iterator[ChunkStore]:
    opened = open_store(state)
    assert isinstance(opened, ChunkStore)
    yield opened
    opened.close()


def plan(keys: list[str], event: str = "e") -> pa.Table:
    n = len(keys)
    return pa.table(
        {"position": list(range(n)), "event_id": [event] * n, "order_ticket_key": keys,
         "file": [0] * n, "source_row": [i + 2 for i in range(n)]},
        schema=PLAN_SCHEMA,
    )  # fmt: skip


def rows(positions: list[int], outcome: str, status: int = 204, error: int = 0) -> pa.Table:
    n = len(positions)
    return pa.table(
        {"position": positions, "outcome": [outcome] * n, "http_status": [status] * n,
         "error": [error] * n, "attempts": [1] * n, "finished_at": [1.8e9] * n},
        schema=ROWS_SCHEMA,
    )  # fmt: skip


def ids(keys: list[str], positions: list[int], outcome: str, pending: str = "") -> pa.Table:
    n = len(keys)
    return pa.table(
        {"identity": [f"e\x1f{k}" for k in keys], "position": positions, "outcome": [outcome] * n,
         "pending": [pending] * n, "sent": [True] * n, "finished_at": [1.8e9] * n},
        schema=IDS_SCHEMA,
    )  # fmt: skip


def start(run_id: str, action: str = "undo") -> RunStart:
    return RunStart(run_id, API, action, "2026-11-28T02:00:00Z", f"/r/{run_id}.csv", ["in.csv"])


def test_a_run_recorded_block_by_block_reads_back_whole(store: ChunkStore) -> None:
    keys = [f"k{i}" for i in range(6)]
    store.begin_run(start("20261128-020000-aaaa"))
    store.add_plan("20261128-020000-aaaa", plan(keys), None)
    store.record(
        "20261128-020000-aaaa", rows([0, 1, 2], "undone"), ids(keys[:3], [0, 1, 2], "undone"), []
    )
    store.record(
        "20261128-020000-aaaa",
        rows([3, 4], "failed", status=503, error=1),
        ids(keys[3:5], [3, 4], "failed", pending="undo"),
        [(1, "server_error", 'try, later, "quoted"')],
    )
    store.end_run("20261128-020000-aaaa", RunEnd("2026-11-28T02:01:00Z", 1, "", 3, {"a": 1}))

    (info,) = store.runs(5)
    assert info.state == "finished" and info.record == {"a": 1} and info.exit_code == 1
    assert store.run("20261128-0200") == info
    got = store.rows(info.run_id)
    assert list(got.outcome) == ["undone"] * 3 + ["failed"] * 2 + [""]  # k5: never decided
    assert got.error_message[3] == 'try, later, "quoted"' and got.source_file[0] == "in.csv"
    done = store.done(API, "undone", ["e\x1fk1", "e\x1fk4", "e\x1fnope"])
    assert list(done.index) == [0] and done.run_id == [info.run_id]
    assert list(store.pending(API, "undo").order_ticket_key) == ["k3", "k4"]
    assert list(store.revertible(info.run_id).order_ticket_key) == ["k0", "k1", "k2"]
    counts = dict(((e, o), n) for e, o, n in store.outcome_counts(info.run_id))
    assert counts == {("e", "undone"): 3, ("e", "failed"): 2}


def test_a_later_run_decides_and_an_ambiguous_prefix_is_refused(store: ChunkStore) -> None:
    for run_id, outcome in (("20261128-020000-aaaa", "failed"), ("20261128-030000-bbbb", "undone")):
        store.begin_run(start(run_id))
        store.add_plan(run_id, plan(["k"]), None)
        store.record(
            run_id,
            rows([0], outcome),
            ids(["k"], [0], outcome, "undo"[: 4 * (outcome == "failed")]),
            [],
        )
        store.end_run(run_id, RunEnd("t", 0, "", 1, {"x": 1}))
    done = store.done(API, "undone", ["e\x1fk"])
    assert done.run_id == ["20261128-030000-bbbb"]
    assert len(store.pending(API, "undo")) == 0
    assert store.sent_after("20261128-020000-aaaa", API) == {("e", "k")}
    with pytest.raises(StoreError, match="more than one run"):
        store.run("20261128")


def test_a_lease_and_a_daily_budget_hold_across_two_openers(store: ChunkStore, state: str) -> None:
    other = open_store(state)
    assert other is not None
    try:
        assert store.lease("key", "a", 30) == (True, "a")
        assert other.lease("key", "b", 30) == (False, "a")
        store.release("key", "a")
        assert other.lease("key", "b", 30) == (True, "b")
        assert store.spend("key", "2026-11-28", 6, 10) == 6
        assert other.spend("key", "2026-11-28", 6, 10) == 4
        assert store.spend("key", "2026-11-28", 1, 10) == 0
        other.unspend("key", "2026-11-28", 3)
        assert store.spend("key", "2026-11-28", 5, 10) == 3
        assert store.spend("key", "2026-11-29", 5, 10) == 5  # a new day
    finally:
        other.close()


def test_many_openers_at_once_migrate_one_store_once(state: str) -> None:
    errors: list[BaseException] = []

    def open_and_close() -> None:
        try:
            opened = open_store(state)
            assert opened is not None
            opened.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_and_close) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def _execute(state: str, statements: list[str]) -> None:
    if state.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(state, autocommit=True) as conn:
            for statement in statements:
                conn.execute(postgres_statement(statement).encode())
    else:
        import sqlite3

        db = sqlite3.connect(state)
        with db:
            for statement in statements:
                db.execute(statement)
        db.close()


def test_a_store_of_the_previous_schema_opens_and_keeps_its_history(state: str) -> None:
    chunk = {
        PLAN: encode(plan(["k"])),
        ROWS: encode(rows([0], "undone")),
        IDS: encode(ids(["k"], [0], "undone")),
    }
    hexed = {kind: data.hex() for kind, data in chunk.items()}

    def blob(data: str) -> str:
        return f"'\\x{data}'::bytea" if state.startswith("postgresql") else f"X'{data}'"

    _execute(
        state,
        [
            *MIGRATIONS[0],
            "INSERT INTO meta VALUES ('schema_version', '1')",
            f"INSERT INTO apis VALUES (1, '{API}')",  # noqa: S608 (constants)
            "INSERT INTO runs (seq, run_id, api, action, started_at, ended_at, exit_code, report, "
            "requests) VALUES (1, '20261101-020000-abcd', 1, 'undo', '2026-11-01T02:00:00Z', "
            "'2026-11-01T02:01:00Z', 0, '/r.csv', 1)",
            "INSERT INTO run_files VALUES (1, 0, 'in.csv')",
            *(
                f"INSERT INTO chunks (run, number, kind, data) VALUES (1, {n}, '{kind}', "  # noqa: S608
                f"{blob(hexed[kind])})"
                for n, kind in enumerate((PLAN, ROWS, IDS))
            ),
        ],
    )
    opened = open_store(state)
    assert opened is not None
    try:
        (old,) = opened.runs(5)
        assert old.run_id == "20261101-020000-abcd" and old.host == "" and old.pid == 0
        assert opened.done(API, "undone", ["e\x1fk"]).run_id == [old.run_id]
        assert opened.spend("key", "d", 1, 5) == 1  # the budgets table schema 2 added
    finally:
        opened.close()


def test_a_store_of_a_newer_schema_is_refused(store: ChunkStore, state: str) -> None:
    store.close()
    _execute(state, ["UPDATE meta SET value = '99' WHERE name = 'schema_version'"])
    with pytest.raises(StoreError, match="schema version 99, newer than this batchjob"):
        open_store(state)


@pytest.mark.postgresql
def test_postgres_reconnects_after_the_server_drops_the_connection(postgres_url: str) -> None:
    import psycopg

    store = open_store(postgres_url)
    assert store is not None
    try:
        store.begin_run(start("20261128-020000-aaaa"))
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'batchjob' AND pid <> pg_backend_pid()"
            )
        assert [r.run_id for r in store.runs(5)] == ["20261128-020000-aaaa"]  # reconnected
    finally:
        store.close()


@pytest.mark.postgresql
def test_postgres_unreachable_fails_in_bounded_time_and_hides_the_password(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"postgresql://me:s3cret-pw@127.0.0.1:{port}/db?connect_timeout=2"
    with pytest.raises(StoreError) as refused:
        open_store(url)
    assert "s3cret-pw" not in str(refused.value)
    assert "postgresql://me:(not shown)@127.0.0.1" in str(refused.value)


# --- the run stage on each backend ------------------------------------------------------------


async def test_runs_on_each_backend_skip_carry_over_and_revert(
    sandbox: Sandbox, world: World, tmp_path: Path, state: str
) -> None:
    rows_ = ticket_rows(world)
    inputs = write_csv(tmp_path / "in.csv", rows_, HEADER)
    first = await run(
        sandbox, [inputs], tmp_path, report="1.csv", state=state, batch_size=20, max_requests=6
    )
    assert first.exit_code == 3
    second = await run(sandbox, [inputs], tmp_path, report="2.csv", state=state, pending=True)
    report = read_report(second.report)
    assert second.exit_code == 0 and second.already_done == first.counts["undone"]
    assert set(report.outcome) == {"undone", "skipped"}
    assert not any(world.checked_in(e, k) for e, k in rows_)
    back = await run(
        sandbox, [], tmp_path, report="3.csv", state=state, revert=second.run_id,
        action="check-in",
    )  # fmt: skip
    assert back.exit_code == 0
    assert len(read_report(back.report)) == second.counts["undone"]


async def test_a_store_that_fails_for_a_while_loses_nothing_and_the_run_goes_on(
    sandbox: Sandbox, world: World, tmp_path: Path, state: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks wait in memory while the store fails; the writer tries again with backoff."""
    real = ChunkStore.record
    failures = iter(range(3))

    def flaky(self: ChunkStore, *args: object, **kwargs: object) -> None:
        if next(failures, None) is not None:
            raise StoreError("state: lost the connection to the run store: server closed")
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ChunkStore, "record", flaky)
    inputs = write_csv(tmp_path / "in.csv", ticket_rows(world), HEADER)
    result = await run(sandbox, [inputs], tmp_path, report="r.csv", state=state, batch_size=20)
    assert result.exit_code == 0, result.summary()
    monkeypatch.setattr(ChunkStore, "record", real)
    stored = open_store(state)
    assert stored is not None
    try:
        recorded = stored.rows(result.run_id)
    finally:
        stored.close()
    assert set(recorded.outcome) == {"undone"} and len(recorded) == len(ticket_rows(world))


async def test_a_store_down_past_the_bound_stops_the_run_and_resume_finishes_it(
    sandbox: Sandbox, world: World, tmp_path: Path, state: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchjob.run._remember import StoreJournal

    monkeypatch.setattr(StoreJournal, "outage_limit", 0.5)
    real = ChunkStore.record
    calls = iter(range(10**6))

    def dies(self: ChunkStore, *args: object, **kwargs: object) -> None:
        if next(calls) >= 2:
            raise StoreError("state: cannot connect to the run store: connection refused")
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ChunkStore, "record", dies)
    rows_ = ticket_rows(world)
    inputs = write_csv(tmp_path / "in.csv", rows_, HEADER)
    first = await run(
        sandbox, [inputs], tmp_path, report="r.csv", state=state, batch_size=10, rate=100.0
    )
    assert first.exit_code == 3, first.summary()
    assert "cannot connect to the run store" in first.stopped
    report = read_report(first.report)  # written from memory: every key, truthfully
    assert len(report) == len(rows_)
    for event, key, outcome in zip(
        report.event_id, report.order_ticket_key, report.outcome, strict=True
    ):
        assert outcome in ("undone", "not_attempted")
        assert (outcome == "undone") == (not world.checked_in(event, key))

    monkeypatch.setattr(ChunkStore, "record", real)  # the store is back
    resumed = await run(sandbox, [inputs], tmp_path, report="r.csv", state=state, resume=True)
    assert resumed.exit_code == 0, resumed.summary()
    assert not any(world.checked_in(e, k) for e, k in rows_)


@pytest.mark.postgresql
async def test_a_run_survives_its_postgres_connection_being_cut_mid_run(
    sandbox: Sandbox, world: World, tmp_path: Path, postgres_url: str
) -> None:
    import asyncio

    import psycopg

    rows_ = ticket_rows(world)
    inputs = write_csv(tmp_path / "in.csv", rows_, HEADER)

    async def cut_connections() -> None:
        for _ in range(3):
            await asyncio.sleep(0.15)
            with psycopg.connect(postgres_url, autocommit=True) as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'batchjob' AND pid <> pg_backend_pid()"
                )

    cutter = asyncio.create_task(cut_connections())
    result = await run(
        sandbox, [inputs], tmp_path, report="r.csv", state=postgres_url, batch_size=5, rate=80.0
    )
    await cutter
    assert result.exit_code == 0, result.summary()
    stored = open_store(postgres_url)
    assert stored is not None
    try:
        recorded = stored.rows(result.run_id)
    finally:
        stored.close()
    assert set(recorded.outcome) == {"undone"} and len(recorded) == len(rows_)


@pytest.mark.postgresql
async def test_a_database_password_never_reaches_a_file_a_log_or_the_store(
    sandbox: Sandbox, world: World, tmp_path: Path, postgres_url: str
) -> None:
    import io

    import psycopg

    secret = "hunter2-db-secret"
    url = postgres_url.replace("batchjob@", f"batchjob:{secret}@") + f"?password={secret}"
    inputs = write_csv(tmp_path / "in.csv", ticket_rows(world)[:30], HEADER)
    log = io.StringIO()
    result = await run(
        sandbox, [inputs], tmp_path, report="r.csv", state=url, log=log,
        summary_json=tmp_path / "summary.json",
    )  # fmt: skip
    assert result.exit_code == 0
    written = [log.getvalue(), result.summary(), (tmp_path / "summary.json").read_text()]
    written += [(tmp_path / name).read_text() for name in ("r.csv", "r.failed.csv")]
    with psycopg.connect(postgres_url) as db:
        written += [str(row) for row in db.execute("SELECT * FROM runs").fetchall()]
    assert all(secret not in text for text in written)
    assert "(not shown)" in (tmp_path / "summary.json").read_text()


def test_a_chunk_crafted_to_inflate_or_of_other_columns_is_refused_before_it_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from batchjob.store import _columns

    other = pa.table({"x": pa.array(["a" * 1000] * 1000)})
    with pytest.raises(StoreError, match="other columns"):
        _columns.decode(encode(other), IDS_SCHEMA)
    monkeypatch.setattr(_columns, "MAX_CHUNK_BYTES", 1 << 20)
    big = ids(["k" * 1000] * 5000, list(range(5000)), "undone")  # 5 MB, compresses to little
    with pytest.raises(StoreError, match="larger than any batchjob writes"):
        _columns.decode(encode(big), IDS_SCHEMA)
    with pytest.raises(StoreError, match="cannot be read"):
        _columns.decode(b"\xff" * 100, IDS_SCHEMA)


def test_a_corrupt_chunk_in_the_store_is_a_store_error_not_a_crash(
    store: ChunkStore, state: str
) -> None:
    store.begin_run(start("20261128-020000-aaaa"))
    store.add_plan("20261128-020000-aaaa", plan(["k"]), None)
    store.close()
    garbage = "'\\x7a7a'::bytea" if state.startswith("postgresql") else "X'7a7a'"
    _execute(
        state,
        [f"INSERT INTO chunks (run, number, kind, data) VALUES (1, 9, 'ids', {garbage})"],  # noqa: S608
    )
    reopened = open_store(state)
    assert reopened is not None
    try:
        with pytest.raises(StoreError, match="cannot be read"):
            reopened.done(API, "undone", ["e\x1fk"])
    finally:
        reopened.close()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://me:pa#ss@127.0.0.1/db",
        "postgresql://me@127.0.0.1/db?password=pa%23ss",
        "postgresql://me@127.0.0.1/db?sslpassword=pa%23ss",
    ],
)
def test_every_password_a_state_url_holds_is_hidden(url: str) -> None:
    from batchjob.store import display_state, state_secrets

    assert "pa#ss" in state_secrets(url)
    assert "pa#ss" not in display_state(url) and "pa%23ss" not in display_state(url)


def _open_at(path: str, barrier: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    opened = open_store(path)
    assert opened is not None
    opened.close()


@pytest.mark.skipif(
    "fork" not in __import__("multiprocessing").get_all_start_methods(), reason="needs fork"
)
def test_processes_creating_one_new_sqlite_store_at_the_same_instant_all_succeed(
    tmp_path: Path,
) -> None:
    """Switching a new file to WAL needs it to itself: it was 'database is locked' about 3 %
    of the time (found by the helper that built the first PostgreSQL backend)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for round_ in range(4):
        path = str(tmp_path / f"new-{round_}.sqlite3")
        barrier = context.Barrier(6)
        children = [context.Process(target=_open_at, args=(path, barrier)) for _ in range(6)]
        for child in children:
            child.start()
        for child in children:
            child.join(60)
        assert [child.exitcode for child in children] == [0] * 6


def test_prune_keeps_what_pruned_runs_did(store: ChunkStore) -> None:
    for run_id, key, outcome, pending in (
        ("20261101-020000-aaaa", "k", "undone", ""),
        ("20261102-020000-bbbb", "j", "failed", "undo"),
    ):
        store.begin_run(start(run_id))
        store.add_plan(run_id, plan([key]), None)
        store.record(run_id, rows([0], outcome, 204 if pending == "" else 503),
                     ids([key], [0], outcome, pending), [])  # fmt: skip
        store.end_run(run_id, RunEnd("t", 0, "", 1, {"a": 1}))

    assert store.prune("2026-12-01T00:00:00Z") == ["20261101-020000-aaaa"]

    assert len(store.rows("20261101-020000-aaaa")) == 0
    assert store.done(API, "undone", ["e\x1fk"]).run_id == ["20261101-020000-aaaa"]
    # The run that still owns a pending key keeps its plan: --pending knows where j came from.
    assert list(store.pending(API, "undo").source_file) == ["in.csv"]
    assert store.prune("2026-12-01T00:00:00Z") == []
