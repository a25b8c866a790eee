"""A PostgreSQL server of the test session's own, for the store tests that need one.

``pg_server`` (session scope) finds the server's programs (``pg_ctl`` on PATH, then
``pg_config --bindir``, then /usr/lib/postgresql/*/bin), makes a cluster in a temporary folder
(trust authentication, superuser ``batchjob``), starts it on 127.0.0.1 on a free port with its
unix socket in that folder, and stops it when the session ends. ``initdb`` refuses to run as
root: as root, the cluster belongs to the ``postgres`` user and its programs run as that user.

``postgres_url`` gives each test a database of its own (created from the template, dropped
after), as ``postgresql://batchjob@127.0.0.1:PORT/NAME``.

The server starts when the first test that needs it is collected (a test that asks for
``pg_server`` or ``postgres_url``, or is marked ``postgresql``). Without the programs (or when
the server does not start) those tests are skipped with one reason, and the session's summary
says why in one line (:func:`pytest_terminal_summary`). tests/conftest.py imports the hooks.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SUPERUSER = "batchjob"
_names = itertools.count(1)


def find_bindir() -> Path | None:
    """The folder of ``pg_ctl`` and ``initdb``: PATH, then ``pg_config --bindir``, then the
    newest /usr/lib/postgresql/*/bin (Debian keeps them there, off PATH)."""
    candidates: list[Path] = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
        candidates.append(Path(on_path).parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            found = subprocess.run(  # noqa: S603 (the pg_config on PATH)
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(found.stdout.strip()))
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parent.name.split(".")],
        reverse=True,
    )
    candidates += [Path(p) for p in debian]
    for folder in candidates:
        if (folder / "pg_ctl").is_file() and (folder / "initdb").is_file():
            return folder
    return None


@dataclass
class PgServer:
    bindir: Path
    root: Path  # the temporary folder: data, socket, log
    port: int = 0
    as_user: list[str] = field(default_factory=list)  # ["runuser", "-u", "postgres", "--"]

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def url(self, dbname: str = "postgres", password: str | None = None) -> str:
        user = SUPERUSER if password is None else f"{SUPERUSER}:{password}"
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def _pg(self, program: str, *args: str, timeout: float = 60) -> None:
        command = [*self.as_user, str(self.bindir / program), *args]
        done = subprocess.run(  # noqa: S603 (the server's own programs)
            command, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{program} failed: {' / '.join(tail)}")

    def initdb(self) -> None:
        self._pg(
            "initdb", "-D", str(self.data), "--auth=trust", f"--username={SUPERUSER}",
            "--encoding=UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip

    def start(self) -> None:
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories='{self.root}'",
                # Tests need no durability: a power loss is not among them.
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
            ]
        )
        self._pg(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
            "-o", options, "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def admin(self) -> Any:
        """An autocommit connection to the ``postgres`` database, as the superuser."""
        import psycopg

        return psycopg.connect(self.url(), autocommit=True, connect_timeout=10)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server() -> tuple[PgServer | None, str]:
    """A started server, or None and why not."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return None, "psycopg is not installed (pip install -e '.[dev]')"
    bindir = find_bindir()
    if bindir is None:
        return None, "no pg_ctl found (install the postgresql package)"
    as_user: list[str] = []
    owner: tuple[int, int] | None = None
    if os.name == "posix" and os.geteuid() == 0:  # initdb refuses to run as root
        import pwd

        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            return None, "running as root, and there is no postgres user to run the server as"
        runuser = shutil.which("runuser")
        if runuser is None:
            return None, "running as root, and there is no runuser to run the server as postgres"
        as_user = [runuser, "-u", "postgres", "--"]
        owner = (entry.pw_uid, entry.pw_gid)
    # Not pytest's tmp_path: its folders are 0700 and the postgres user must get into this one.
    root = Path(tempfile.mkdtemp(prefix="batchjob-pg-"))
    if owner is not None:
        os.chown(root, *owner)
    server = PgServer(bindir, root, as_user=as_user)
    try:
        server.initdb()
        for attempt in range(3):  # a free port may be taken before the server binds it
            server.port = _free_port()
            try:
                server.start()
                break
            except (RuntimeError, subprocess.SubprocessError):
                if attempt == 2:
                    raise
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        log = (
            server.log.read_text(errors="replace").strip().splitlines()[-1:]
            if (server.log.exists())
            else []
        )
        shutil.rmtree(root, ignore_errors=True)
        return None, f"the server did not start: {exc}{' / ' + log[0] if log else ''}"
    return server, ""


class _Session:
    """The session's server: started once, when the first test that needs it is collected."""

    tried = False
    server: PgServer | None = None
    why = ""

    @classmethod
    def get(cls) -> tuple[PgServer | None, str]:
        if not cls.tried:
            cls.tried = True
            cls.server, cls.why = _start_server()
            if cls.server is not None:
                atexit.register(cls.stop)  # also when the session ends abnormally
        return cls.server, cls.why

    @classmethod
    def stop(cls) -> None:
        server, cls.server = cls.server, None
        if server is not None:
            with contextlib.suppress(Exception):
                server.stop("immediate")
            shutil.rmtree(server.root, ignore_errors=True)


def _needs_postgres(item: pytest.Item) -> bool:
    return item.get_closest_marker("postgresql") is not None or "pg_server" in getattr(
        item, "fixturenames", ()
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgresql: needs the session's PostgreSQL server")


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected what they do
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Start the server if a selected test needs it; if it cannot start, skip those tests
    with one reason (the summary folds them into one line)."""
    needing = [item for item in items if _needs_postgres(item)]
    if not needing:
        return
    server, why = _Session.get()
    if server is None:
        skip = pytest.mark.skip(reason=f"PostgreSQL tests skipped: {why}")
        for item in needing:
            item.add_marker(skip)


def pytest_sessionfinish() -> None:
    _Session.stop()


@pytest.fixture(scope="session")
def pg_server() -> PgServer:
    server, why = _Session.get()
    if server is None:
        pytest.skip(f"PostgreSQL tests skipped: {why}")
    return server


@pytest.fixture
def postgres_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh database for one test, dropped after it."""
    name = f"batchjob_test_{os.getpid()}_{next(_names)}"
    with pg_server.admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield pg_server.url(name)
    finally:
        with contextlib.suppress(Exception), pg_server.admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line when the PostgreSQL tests were skipped, saying why."""
    if _Session.tried and _Session.why:
        terminalreporter.write_line(f"PostgreSQL tests skipped: {_Session.why}", yellow=True)
