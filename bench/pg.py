"""A PostgreSQL server of the bench's own, for rows P1 and P2 (``--state postgresql://...``).

The approach of tests/pg_support.py (not imported: it needs pytest): ``initdb`` a cluster in a
folder under bench/out (trust authentication, superuser ``batchjob``), ``pg_ctl start`` it on
127.0.0.1 on a free port (TCP only, no unix socket), stop it when the bench ends.
``initdb`` refuses to run as root: as root, the cluster belongs to the ``postgres`` user and
its programs run as that user (``runuser -u postgres --``). Unlike the tests' server, this one
keeps PostgreSQL's durability defaults (``fsync`` on): the bench measures what a user gets.

One server per bench process (:func:`shared_server`), started by the first row that asks;
:func:`stop_shared` (the bench's end, and atexit) stops it and removes its folder.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPERUSER = "batchjob"


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
            found = subprocess.run(
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
    root: Path  # data, socket, log
    port: int = 0
    as_user: list[str] = field(default_factory=list)  # ["runuser", "-u", "postgres", "--"]
    version: str = ""

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def _pg(self, program: str, *args: str, timeout: float = 120) -> str:
        command = [*self.as_user, str(self.bindir / program), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{program} failed: {' / '.join(tail)}")
        return done.stdout

    def initdb(self) -> None:
        self._pg(
            "initdb", "-D", str(self.data), "--auth=trust", f"--username={SUPERUSER}",
            "--encoding=UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        self.version = self._pg("postgres", "--version").strip()

    def start(self) -> None:
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                "-c unix_socket_directories=''",  # TCP only: no socket path to outgrow
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

    def fresh_database(self, name: str) -> str:
        """A new, empty database ``name`` (dropped first if a crashed bench left it); its URL."""
        with self.admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def database_bytes(self, name: str) -> int:
        with self.admin() as admin:
            row = admin.execute("SELECT pg_database_size(%s)", (name,)).fetchone()
        return int(row[0]) if row else 0

    def drop_database(self, name: str) -> None:
        with contextlib.suppress(Exception), self.admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    # --- the server's own CPU ------------------------------------------------------------------

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def cpu_seconds(self) -> float:
        """User + system seconds of the server so far: the postmaster, its live children
        (checkpointer, WAL writer, backends) and the children it reaped (ended backends)."""
        tick = os.sysconf("SC_CLK_TCK")
        parent = self.postmaster_pid()
        ticks = 0
        for stat in glob.glob("/proc/[0-9]*/stat"):
            fields = _stat_fields(stat)
            if fields is None:
                continue
            pid, ppid = int(stat.split("/")[2]), int(fields[1])
            if pid == parent:
                ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
            elif ppid == parent:
                ticks += int(fields[11]) + int(fields[12])
        return ticks / tick

    def backends(self) -> int:
        """Client connections open now (one process each)."""
        with self.admin() as admin:
            row = admin.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).fetchone()
        return int(row[0]) if row else 0

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until no client is connected (a run's backends end just after it does), so
        that :meth:`cpu_seconds` counts their whole work."""
        deadline = time.monotonic() + timeout
        while self.backends() and time.monotonic() < deadline:
            time.sleep(0.05)


def _stat_fields(path: str) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces): state, ppid, ..."""
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(root: Path) -> tuple[PgServer | None, str]:
    """A started server in ``root`` (made afresh), or None and why not."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return None, "psycopg is not installed (pip install -e '.[postgresql]')"
    bindir = find_bindir()
    if bindir is None:
        return None, "no PostgreSQL programs found (pg_ctl, initdb: install postgresql)"
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
    root = root.resolve()
    server = PgServer(bindir, root, as_user=as_user)
    if (server.data / "postmaster.pid").exists():  # a bench killed before it stopped its server
        with contextlib.suppress(RuntimeError, OSError, subprocess.SubprocessError):
            server.stop("immediate")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if owner is not None:
        os.chown(root, *owner)
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
            if server.log.exists()
            else []
        )
        shutil.rmtree(root, ignore_errors=True)
        return None, f"the server did not start: {exc}{' / ' + log[0] if log else ''}"
    return server, ""


class _Shared:
    tried = False
    server: PgServer | None = None
    why = ""


def shared_server(root: Path) -> tuple[PgServer | None, str]:
    """The bench's one server (started in ``root`` on the first call), or None and why not."""
    if not _Shared.tried:
        _Shared.tried = True
        _Shared.server, _Shared.why = start_server(root)
        if _Shared.server is not None:
            atexit.register(stop_shared)
    return _Shared.server, _Shared.why


def stop_shared() -> None:
    server, _Shared.server = _Shared.server, None
    if server is not None:
        with contextlib.suppress(Exception):
            server.stop("fast")
        shutil.rmtree(server.root, ignore_errors=True)
