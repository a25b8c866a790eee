"""batchjob where POSIX-only APIs are missing, as on Windows (no Windows machine here).

A child process removes them before importing batchjob: the O_NOFOLLOW, O_NONBLOCK,
O_CLOEXEC and O_DIRECTORY flags, os.pwrite and os.getuid, the fcntl module, and the event
loop's add_signal_handler. It then runs the real command against the sandbox with a token
file that must be refreshed: imports, the report lock, the token lock, the token file's
atomic replace, the journal, the final files and Ctrl-C all go through their fallbacks.
What this cannot show: msvcrt's locks (portalocker still uses flock here), Windows' file
sharing rules and paths, and its signal delivery.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from batchjob.sandbox import Sandbox, SandboxSettings, World
from tests.chaos_support import cli_env, finish, undone_in_journal, wait_until
from tests.support import read_report, ticket_rows, write_csv

WITHOUT_POSIX = """
import asyncio, os, sys
import portalocker  # keeps its own platform choice; batchjob must not need fcntl itself
for name in ("O_NOFOLLOW", "O_NONBLOCK", "O_CLOEXEC", "O_DIRECTORY", "pwrite", "getuid"):
    if hasattr(os, name):
        delattr(os, name)
sys.modules["fcntl"] = None
def no_signal_handlers(*args, **kwargs):
    raise NotImplementedError  # what Windows' event loops say
asyncio.unix_events._UnixSelectorEventLoop.add_signal_handler = no_signal_handlers
from batchjob._cli import main
sys.exit(main(sys.argv[1:]))
"""


async def start(
    tmp_path: Path, sandbox: Sandbox, world: World, *extra: str
) -> asyncio.subprocess.Process:
    inputs = write_csv(tmp_path / "in.csv", ticket_rows(world), ("event_id", "order_ticket_key"))
    token_file = tmp_path / "token.json"
    # No access token yet: the run must refresh, lock and replace the token file.
    token_file.write_text(json.dumps({"refresh_token": sandbox.refresh_token}))
    env = cli_env(
        CC_BASE_URL=sandbox.base_url,
        CC_TOKEN_URL=sandbox.token_url,
        CC_TOKEN_FILE=str(token_file),
        CC_CLIENT_ID=sandbox.client_id,
    )
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", WITHOUT_POSIX, "run", str(inputs),
        "--report", str(tmp_path / "r.csv"), "--log-format", "json", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip


async def test_a_run_with_a_token_refresh_works_without_posix_only_apis(tmp_path: Path) -> None:
    world = World.generate(2, 50, seed=21)
    async with Sandbox(world, SandboxSettings(rate=None, daily_quota=None)) as sandbox:
        done = await finish(await start(tmp_path, sandbox, world))
        refresh_token = sandbox.refresh_token
    assert done.code == 0, done.err
    assert read_report(tmp_path / "r.csv").outcome.eq("undone").all()
    saved = json.loads((tmp_path / "token.json").read_text())
    assert saved["refresh_token"] == refresh_token  # the rotated one reached the file


async def test_ctrl_c_stops_gracefully_without_loop_signal_handlers(tmp_path: Path) -> None:
    world = World.generate(1, 300, seed=22)
    settings = SandboxSettings(rate=None, daily_quota=None)
    async with Sandbox(world, settings) as sandbox:
        proc = await start(tmp_path, sandbox, world, "--rate", "20", "--batch-size", "5")
        journal = tmp_path / "r.csv.journal"
        await wait_until(lambda: len(undone_in_journal(journal)) >= 10,
                         what="recorded outcomes")  # fmt: skip
        proc.send_signal(signal.SIGINT)
        done = await finish(proc)
    assert done.code == 130, done.err
    frame = read_report(tmp_path / "r.csv")
    assert len(frame) == 300
    assert set(frame.outcome) == {"undone", "not_attempted"}
