"""Where the bearer token comes from.

Tokens are secrets: they live in :class:`Secret` wrappers whose repr and str never show them,
nothing here logs them, and no exception message carries one.

Two sources:

- :class:`StaticToken`: ``CC_ACCESS_TOKEN``. Nothing to refresh; a 401 stops the run.
- :class:`FileTokenSource`: a token file, for unattended (nightly) runs. It refreshes the access
  token shortly before it expires and once after a 401, and stores every new token pair.

The token file
--------------
A JSON object, written by ``batchjob auth`` and rewritten on every refresh::

    {
      "access_token": "...",
      "refresh_token": "...",
      "expires_at": "2025-06-01T02:00:00Z",
      "issued_at": "2025-05-31T02:00:00Z",
      "token_type": "Bearer",
      "scope": "campaign_data offline_access"
    }

- ``refresh_token`` is required. ``access_token`` and ``expires_at`` may be absent or null:
  the first use then refreshes.
- ``expires_at`` is when the access token stops working. It is written as ISO 8601 in UTC with
  a ``Z``; on read, ISO 8601 (an offset, or none meaning UTC) and UTC epoch seconds (a JSON
  number) are both accepted. ``issued_at`` (same forms, optional) is when it was issued: with
  it, every process sharing the file knows the token's lifetime and so plans the same refresh
  moment (short-lived tokens are refreshed at half-life, not 300 s before expiry).
- ``token_type`` and ``scope`` are informational.
- It must be a regular file reached without a symlink (it is refused otherwise), at most
  1 MiB; its folder must take new files (a run checks this before it starts).

The file is replaced atomically (a temporary file in the same directory, created with mode 0600
and O_EXCL|ONOFOLLOW, fsynced, renamed over the old one, then the directory fsynced), so a
reader sees the old pair or the new pair, never half of one. That temporary file is created,
with room for the new pair, *before* the refresh token is sent: a folder that cannot take it
(read-only, full) stops the refresh with the refresh token unused; so does a token file that
cannot be renamed over (immutable or append-only: a copy of its own bytes is renamed over it
first, under the lock, which proves it can be). Refresh tokens may rotate
(each works once), so the new pair is on disk *before* the new access token is handed out; if
it still cannot replace the file, it goes to a new 0600 file (:func:`rescue_tokens`: next to
the token file, else ``$XDG_STATE_HOME/batchjob``, else the temporary folder), the run stops,
and the message says where it is and how to put it back. A run killed between writing the new
pair and the rename leaves the only copy in the temporary file: the next refresh, under the
lock and before it reads the refresh token, puts such a pair in place if it is newer than the
token file, else rescues it (:func:`remove_stale_temp_files`). Tokens never go to logs or
messages.

Refreshes are serialised twice: an :class:`asyncio.Lock` within a process, and an exclusive
``flock`` on ``<token file>.lock`` (opened with ONOFOLLOW, never written) across processes.
Whoever gets the lock re-reads the file first and uses what another process stored if it is
still good, so concurrent runs refresh once. Once :meth:`FileTokenSource.close` is called (the
run is ending) no refresh starts or retries; one already on the wire is waited for, boundedly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shlex
import stat
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp

from batchjob._config import DEFAULT_TOKEN_URL, JobConfig, check_url_is_safe
from batchjob._errors import StoppingError, TokenEndpointError, TokenError, TokenSaveError
from batchjob._logging import MAX_SERVER_TEXT, clip, null_logger, printable, secret_forms
from batchjob._portable import (
    CLOEXEC,
    NOFOLLOW,
    NONBLOCK,
    fsync_directory,
    owned_by_me,
    try_lock,
    unlock,
    write_at,
)

__all__ = [
    "FileTokenSource",
    "ManagedTokenSource",
    "Secret",
    "StaticToken",
    "TokenEndpointError",
    "TokenError",
    "TokenFileWriter",
    "TokenSaveError",
    "TokenSet",
    "default_token_session",
    "read_token_file",
    "request_tokens",
    "rescue_tokens",
    "token_file_lock",
    "token_source_from_env",
    "write_token_file",
]

ACCESS_TOKEN_ENV = "CC_ACCESS_TOKEN"  # noqa: S105 (a variable name, not a secret)
TOKEN_FILE_ENV = "CC_TOKEN_FILE"  # noqa: S105
CLIENT_ID_ENV = "CC_CLIENT_ID"
CLIENT_SECRET_ENV = "CC_CLIENT_SECRET"  # noqa: S105

#: Refresh this long before the access token expires (CC access tokens live 24 hours).
DEFAULT_REFRESH_MARGIN = 300.0
#: Waits before the 2nd and 3rd attempt at the token endpoint after a network fault or 5xx.
DEFAULT_RETRY_WAITS = (0.5, 2.0)
#: How long to wait for another process's refresh before giving up.
DEFAULT_LOCK_TIMEOUT = 60.0
#: After a failed refresh before expiry, keep using the current token this long before trying
#: again, so an outage of the token endpoint does not slow every request down.
DEFAULT_RETRY_HOLDOFF = 30.0
#: At most this long for a refresh still in flight when the source is closed (the session's own
#: timeout normally ends it sooner); see :meth:`FileTokenSource.close`.
DEFAULT_CLOSE_TIMEOUT = 35.0
#: An access token this close to its expiry is not handed out any more, refresh or not.
_EXPIRY_SKEW = 10.0
#: A token file is a few KiB; a bigger "token file" is not one, and is not read whole.
MAX_TOKEN_FILE_SIZE = 1 << 20
#: A token endpoint's answer is read up to this size; a bigger one is not a token answer.
MAX_TOKEN_ANSWER_SIZE = 256 * 1024
#: Room taken for the new token file before a refresh token is spent (a JWT pair is ~2 KiB).
_RESERVED_BYTES = 16 * 1024
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | CLOEXEC | NOFOLLOW
#: Linux's FS_IOC_GETFLAGS, _IOR('f', 1, long), and its immutable and append-only flags.
_LONG_SIZE = struct.calcsize("l")
_FS_IOC_GETFLAGS = (2 << 30) | (_LONG_SIZE << 16) | (ord("f") << 8) | 1
_FS_FROZEN_FLAGS = 0x10 | 0x20  # FS_IMMUTABLE_FL | FS_APPEND_FL
#: Where a new pair goes when the token file cannot take it (besides the token file's folder).
STATE_HOME_ENV = "XDG_STATE_HOME"

#: RFC 6750's b64token: what an access token may be made of.
_BEARER = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: A longer ``expires_in`` is not believed (the token is then refreshed after a 401 only).
_MAX_LIFETIME = 366 * 86400.0


@dataclass(frozen=True)
class Secret:
    """A string that does not print itself."""

    value: str

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"


STOPPING_MESSAGE = "the run is stopping: the access token is not refreshed any more"


class TokenSource(Protocol):
    """Where bearer tokens come from. ``refresh`` gets a new one after a 401, if it can."""

    async def token(self) -> str: ...

    async def refresh(self, rejected: str) -> str | None:
        """A new token after ``rejected`` got a 401; None when there is no way to get one.

        May raise :class:`~batchjob.TokenError`, which stops the run.
        """
        ...


class ManagedTokenSource(TokenSource, Protocol):
    """A token source the CLI can also redact (its secrets) and close."""

    def secrets(self) -> tuple[str, ...]: ...

    async def close(self) -> None: ...


class StaticToken:
    """A token from CC_ACCESS_TOKEN: nothing to refresh, a 401 stops the run."""

    def __init__(self, token: Secret) -> None:
        self._token = token

    async def token(self) -> str:
        return self._token.value

    async def refresh(self, rejected: str) -> str | None:
        return None

    def secrets(self) -> tuple[str, ...]:
        return (self._token.value,)

    async def close(self) -> None:
        """Nothing to release; here so callers can close any token source the same way."""


# --- the token file ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSet:
    """What the token file holds. Secrets stay wrapped, so a repr is safe to log."""

    refresh_token: Secret
    access_token: Secret | None = None
    expires_at: float | None = None  # UTC epoch seconds
    token_type: str = "Bearer"  # noqa: S105 (a token type name, not a secret)
    scope: str = ""
    issued_at: float | None = None  # UTC epoch seconds; with expires_at, the token's lifetime

    def to_json(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token.value if self.access_token else None,
            "refresh_token": self.refresh_token.value,
            "expires_at": _iso(self.expires_at),
            "issued_at": _iso(self.issued_at),
            "token_type": self.token_type,
            "scope": self.scope,
        }

    def lifetime(self) -> float | None:
        """How long the access token was issued for, if the file says."""
        if self.expires_at is None or self.issued_at is None:
            return None
        life = self.expires_at - self.issued_at
        return life if life > 0 else None

    def secret_values(self) -> tuple[str, ...]:
        values = [self.refresh_token.value]
        if self.access_token is not None:
            values.append(self.access_token.value)
        return tuple(v for v in values if v)


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    # Rounded down: the file never promises a second more than the server did.
    return datetime.fromtimestamp(math.floor(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_expires_at(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("boolean")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("not finite")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            return float(text)
        except ValueError:
            pass
        when = datetime.fromisoformat(text)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    raise ValueError(type(value).__name__)


def _parse_time(value: object) -> float | None:
    """``_parse_expires_at``, also refusing a time that cannot be written back (year 10000)."""
    epoch = _parse_expires_at(value)
    if epoch is not None:
        datetime.fromtimestamp(epoch, UTC)  # raises OverflowError, ValueError or OSError
    return epoch


def _open_regular(path: Path, what: str) -> int:
    """A read-only fd on ``path``, which must be a regular file reached without a symlink.

    ONOFOLLOW: batchjob replaces the token file by renaming over it, so a link there would be
    silently replaced; O_NONBLOCK: a FIFO must not hang the run.
    """
    try:
        fd = os.open(path, os.O_RDONLY | CLOEXEC | NONBLOCK | NOFOLLOW)
    except FileNotFoundError:
        raise TokenError(
            f"{what} {path} not found: create it with `batchjob auth --token-file {path}`"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise TokenError(symlink_message(path, what)) from None
        raise TokenError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TokenError(f"{what} {path} is not a regular file")
    return fd


def symlink_message(path: Path, what: str = "token file") -> str:
    return (
        f"{what} {path} is a symbolic link: batchjob rewrites it on every refresh and never "
        "through a link; give the path of the file itself"
    )


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(fd, min(left, 65536))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_token_file(path: Path) -> TokenSet:
    """The tokens in ``path``. Errors name the file and the problem, never its content."""
    fd = _open_regular(path, "token file")
    try:
        raw = _read_at_most(fd, MAX_TOKEN_FILE_SIZE + 1)
    except OSError as exc:
        raise TokenError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_TOKEN_FILE_SIZE:
        raise TokenError(f"token file {path} is over {MAX_TOKEN_FILE_SIZE} bytes: not a token file")
    return _parse_token_file(path, raw)


def _parse_token_file(path: Path, raw: bytes) -> TokenSet:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        # The decoder's message gives a position only, never the text around it.
        raise TokenError(
            f"token file {path} is not valid JSON (line {exc.lineno}, column {exc.colno})"
        ) from None
    except UnicodeDecodeError:
        raise TokenError(f"token file {path} is not UTF-8 text") from None
    except RecursionError:
        # Deeper than the parser's stack: a malformed file, not an internal error.
        raise TokenError(f"token file {path} is JSON nested too deeply: not a token file") from None
    if not isinstance(data, dict):
        raise TokenError(f"token file {path} must hold a JSON object")
    refresh = data.get("refresh_token")
    if not isinstance(refresh, str) or not refresh.strip():
        raise TokenError(f"token file {path} has no refresh_token")
    access = data.get("access_token")
    if access is not None and not isinstance(access, str):
        raise TokenError(f"token file {path}: access_token must be a string or null")
    try:
        expires_at = _parse_time(data.get("expires_at"))
    except (ValueError, OverflowError, OSError):
        raise TokenError(
            f"token file {path}: expires_at must be UTC epoch seconds or an ISO 8601 time"
        ) from None
    try:
        issued_at = _parse_time(data.get("issued_at"))
    except (ValueError, OverflowError, OSError):
        issued_at = None  # only sharpens when to refresh: a bad one is no reason to stop
    token_type = data.get("token_type")
    scope = data.get("scope")
    return TokenSet(
        refresh_token=Secret(refresh.strip()),
        access_token=Secret(access.strip()) if access and access.strip() else None,
        expires_at=expires_at,
        token_type=token_type if isinstance(token_type, str) else "Bearer",
        scope=scope if isinstance(scope, str) else "",
        issued_at=issued_at,
    )


def _write_all(fd: int, data: bytes, offset: int = 0) -> None:
    write_at(fd, data, offset)


def _temp_name(path: Path) -> str:
    # The name is cut so that a long token file name still leaves room for the suffix.
    return f".{path.name[:128]}.{secrets.token_hex(6)}.tmp"


def _is_temp_name(path: Path, name: str) -> bool:
    return re.fullmatch(re.escape(f".{path.name[:128]}.") + r"[0-9a-f]{12}\.tmp", name) is not None


class TokenFileWriter:
    """The next version of a token file, begun before a refresh token is spent.

    Creating it (O_EXCL|ONOFOLLOW, mode 0600 from the start) and filling it with room for the
    new pair proves the folder takes a new file now (``os.access`` cannot tell: it answers from
    permission bits, which root passes, and knows nothing of a full disk or an NFS server that
    squashes root). :meth:`commit` writes the pair, fsyncs, renames it over
    the token file and fsyncs the folder; :meth:`discard` removes it unused. Raises OSError.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.temp = path.parent / _temp_name(path)
        self._fd: int | None = os.open(self.temp, _NEW_FILE, 0o600)
        self._settled = False
        try:
            _write_all(self._fd, bytes(_RESERVED_BYTES))
        except BaseException:
            self.discard()
            raise

    def commit(self, tokens: TokenSet) -> None:
        self.commit_bytes((json.dumps(tokens.to_json(), indent=2) + "\n").encode())

    def commit_bytes(self, payload: bytes) -> None:
        fd = self._fd
        if fd is None or self._settled:
            raise ValueError("token file writer already used")
        try:
            _write_all(fd, payload)
            os.ftruncate(fd, len(payload))
            os.fsync(fd)
            self._fd = None
            os.close(fd)
            # A symlink at ``path`` is replaced, never written through.
            os.replace(self.temp, self.path)
        except BaseException:
            self.discard()
            raise
        self._settled = True
        # The rename is only durable once the directory entry is on disk too.
        fsync_directory(self.path.parent)

    def discard(self) -> None:
        """Remove the unused file; nothing once :meth:`commit` has succeeded."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if not self._settled:
            self._settled = True
            with contextlib.suppress(OSError):
                os.unlink(self.temp)


def write_token_file(path: Path, tokens: TokenSet) -> None:
    """Replace ``path`` with ``tokens`` atomically and durably; the file is mode 0600.

    Raises OSError; the caller knows whether a refresh token was spent and words the error.
    """
    TokenFileWriter(path).commit(tokens)


def check_folder_writable(path: Path) -> None:
    """Raise TokenError unless the token file's folder takes a new file now (it is removed)."""
    try:
        TokenFileWriter(path).discard()
    except OSError as exc:
        raise TokenError(unwritable_message(path, exc)) from None


def _frozen(fd: int) -> bool:
    """Whether the file is immutable or append-only: nothing, root included, renames over it.

    Permission bits cannot tell; the flags live in ``st_flags`` (BSD, macOS) or behind the
    FS_IOC_GETFLAGS ioctl (Linux). A file system without them answers False.
    """
    flags = getattr(os.fstat(fd), "st_flags", 0)
    if flags & (stat.UF_IMMUTABLE | stat.UF_APPEND | stat.SF_IMMUTABLE | stat.SF_APPEND):
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        import fcntl  # Linux only, like this ioctl
    except ImportError:
        return False
    try:
        # The kernel writes an int; the buffer is a long's size, like the request number says.
        answer = fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(_LONG_SIZE))
    except OSError:
        return False
    return bool(int.from_bytes(answer[:4], sys.byteorder) & _FS_FROZEN_FLAGS)


def unreplaceable_message(path: Path, problem: str) -> str:
    return (
        f"token file {path} cannot be replaced ({problem}): every refresh replaces it, so the "
        "refresh token was not used; remove the flag (chattr -i -a, or chflags nouchg "
        "nouappnd) or move the file somewhere it can be replaced"
    )


def is_frozen(path: Path) -> bool:
    """Whether ``path`` is an immutable or append-only file. Only reads: safe without the lock."""
    try:
        fd = os.open(path, os.O_RDONLY | CLOEXEC | NONBLOCK | NOFOLLOW)
    except OSError:
        return False  # missing, a link, unreadable: read_token_file says what is wrong
    try:
        return _frozen(fd)
    finally:
        os.close(fd)


def check_replaceable(path: Path) -> None:
    """Raise TokenError if ``path`` is immutable or append-only: a run checks it first."""
    if is_frozen(path):
        raise TokenError(unreplaceable_message(path, "it is immutable or append-only"))


def prove_replaceable(path: Path) -> None:
    """Rename a copy of the token file over it, so the rename after a refresh cannot fail.

    The flags are not all that can refuse a rename over one file while its folder takes new
    ones (a file bind-mounted in place, a security module): doing it is the only proof. The
    copy holds the very bytes there, so a reader sees the same pair either way. Call with the
    token-file lock held: unlocked, it could put back a pair another process just replaced.
    Raises TokenError, the refresh token unused.
    """
    check_replaceable(path)
    fd = _open_regular(path, "token file")
    try:
        raw = _read_at_most(fd, MAX_TOKEN_FILE_SIZE + 1)
    except OSError as exc:
        raise TokenError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    try:
        writer = TokenFileWriter(path)
    except OSError as exc:
        raise TokenError(unwritable_message(path, exc)) from None
    try:
        writer.commit_bytes(raw)
    except OSError as exc:
        raise TokenError(unreplaceable_message(path, exc.strerror or str(exc))) from None


def unwritable_message(path: Path, exc: OSError) -> str:
    return (
        f"cannot write a new file in {path.parent} ({exc.strerror or exc}): every refresh "
        f"rewrites {path.name}, so the refresh token was not used; make the folder writable"
    )


@dataclass(frozen=True)
class LeftOver:
    """What :func:`remove_stale_temp_files` did with the temporary files a killed run left."""

    installed: bool = False  # a left pair replaced the token file
    rescued: tuple[Path, ...] = ()  # left pairs older than the token file, kept aside
    kept: tuple[Path, ...] = ()  # left pairs that could be moved nowhere: left as they are


def _left_pair(temp: Path) -> tuple[TokenSet, int] | None:
    """The pair in a left temporary file and when it was written, or None if it holds none.

    A run killed after writing and fsyncing its new pair but before the rename leaves the only
    copy of it there. One killed before cutting off the reserved room leaves NULs after it.
    A reservation (all NULs), a torn write or another user's file holds no pair.
    """
    try:
        fd = _open_regular(temp, "temporary token file")
    except TokenError:
        return None
    try:
        info = os.fstat(fd)
        raw = _read_at_most(fd, MAX_TOKEN_FILE_SIZE + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if not owned_by_me(info) or len(raw) > MAX_TOKEN_FILE_SIZE:
        return None
    try:
        return _parse_token_file(temp, raw.rstrip(b"\0")), info.st_mtime_ns
    except TokenError:
        return None


def _token_file_state(path: Path) -> tuple[TokenSet, int] | None:
    try:
        return read_token_file(path), path.lstat().st_mtime_ns
    except (TokenError, OSError):
        return None


def remove_stale_temp_files(path: Path) -> LeftOver:
    """Deal with temporary token files a killed process left. Call with the token-file lock
    held, before the refresh token is read: it may be spent, with the new pair left here.

    A left pair is newer than the token file if it was written after it (rename keeps a
    file's mtime, so the token file's is when its pair was written): it is the newest link of
    the rotating chain, so it replaces the token file. One written before the token file's
    pair (a later run, ``batchjob auth`` or the user replaced the file since) may still be
    good (a new chain), so it is rescued for :func:`find_rescued_tokens` to point at, not
    deleted. Anything else (a reservation, a torn write) is removed. A pair is only ever
    removed once a copy of it is on disk elsewhere.
    """
    temps: list[Path] = []
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        temps = [Path(e.path) for e in entries if _is_temp_name(path, e.name)]
    pairs: list[tuple[int, Path, TokenSet]] = []
    for temp in temps:
        left = _left_pair(temp)
        if left is None:
            with contextlib.suppress(OSError):
                os.unlink(temp)  # unlink removes a link itself, not its target
        else:
            pairs.append((left[1], temp, left[0]))
    installed = False
    rescued: list[Path] = []
    kept: list[Path] = []
    for written, temp, tokens in sorted(pairs, key=lambda p: p[0]):  # oldest first
        current = _token_file_state(path)
        try:
            if current is not None and current[0] == tokens:
                pass  # the same pair (a trial rename's copy): nothing to keep
            elif current is not None and written >= current[1]:
                # Rewritten rather than renamed: the left file may end in NULs. Ties go to
                # the left pair: it was written after the refresh answered.
                write_token_file(path, tokens)
                installed = True
            else:
                # Older, or no readable token file to compare with: kept aside, not guessed.
                rescued.append(rescue_tokens(path, tokens))
        except OSError:
            kept.append(temp)
            continue
        with contextlib.suppress(OSError):
            os.unlink(temp)
    return LeftOver(installed, tuple(rescued), tuple(kept))


# --- a new pair that cannot be saved ----------------------------------------------------------


def rescue_directories(path: Path, environ: Mapping[str, str] | None = None) -> tuple[Path, ...]:
    """Where :func:`rescue_tokens` tries, in order: next to the token file, then the user's
    state folder (``$XDG_STATE_HOME/batchjob``, default ``~/.local/state/batchjob``), then the
    system's temporary folder."""
    environ = os.environ if environ is None else environ
    state = environ.get(STATE_HOME_ENV, "").strip()
    state_home = Path(state) if state else Path.home() / ".local" / "state"
    return (path.parent, state_home / "batchjob", Path(tempfile.gettempdir()))


def _rescue_prefix(path: Path) -> str:
    # The absolute path's hash tells two token files of the same name apart in a shared folder.
    tag = hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:8]
    return f"{path.name[:64]}.{tag}.rescued-"


def rescue_tokens(path: Path, tokens: TokenSet, environ: Mapping[str, str] | None = None) -> Path:
    """Write ``tokens`` (which could not replace ``path``) to a new 0600 file; its path.

    Created with O_EXCL|ONOFOLLOW under a random name, so a planted link is never followed,
    even in a shared temporary folder. Raises OSError when no place takes it.
    """
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    name = f"{_rescue_prefix(path)}{stamp}-{secrets.token_hex(3)}.json"
    payload = (json.dumps(tokens.to_json(), indent=2) + "\n").encode()
    problem: OSError = OSError(errno.ENOENT, "no folder to try")
    for directory in rescue_directories(path, environ):
        target = directory / name
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(target, _NEW_FILE, 0o600)
        except OSError as exc:
            problem = exc
            continue
        try:
            try:
                _write_all(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(target)
            problem = exc
            continue
        return target
    raise problem


def find_rescued_tokens(path: Path) -> Path | None:
    """The newest pair an earlier run rescued for ``path``, if one is still there."""
    prefix = _rescue_prefix(path)
    found: list[Path] = []
    for directory in rescue_directories(path):
        with contextlib.suppress(OSError):
            found += [p for p in directory.iterdir() if p.name.startswith(prefix) and _ours(p)]
    return max(found, key=lambda p: p.name[len(prefix) :], default=None)


def _ours(path: Path) -> bool:
    """A regular file of this user's: a file someone else left in /tmp is never suggested."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and owned_by_me(info)


# --- the lock ---------------------------------------------------------------------------------


def lock_path_for(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _open_lock(lock_path: Path) -> int:
    # ONOFOLLOW: never create or open a file through a planted link; nothing is written to it.
    flags = os.O_RDWR | os.O_CREAT | CLOEXEC | NONBLOCK | NOFOLLOW
    try:
        fd = os.open(lock_path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise TokenError(symlink_message(lock_path, "lock file")) from None
        if exc.errno == errno.EISDIR:
            raise TokenError(f"lock file {lock_path} is not a regular file: remove it") from None
        raise TokenError(f"cannot open lock file {lock_path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TokenError(f"lock file {lock_path} is not a regular file: remove it")
    return fd


def check_lock_file(path: Path) -> None:
    """Raise TokenError unless ``<path>.lock`` is absent or a regular file we can open.

    Opened the way a refresh opens it, so a directory, FIFO or link there stops a run before
    it starts (exit 2) instead of at its first refresh, hours later. Not created here.
    """
    lock_path = lock_path_for(path)
    if os.path.lexists(lock_path):
        os.close(_open_lock(lock_path))


@contextlib.asynccontextmanager
async def token_file_lock(
    path: Path,
    *,
    give_up_after: float = DEFAULT_LOCK_TIMEOUT,
    stop: asyncio.Event | None = None,
) -> AsyncIterator[None]:
    """Hold an exclusive flock on ``<path>.lock``: one refresh at a time across processes.

    Polls with LOCK_NB instead of blocking in a thread: a cancelled waiter then leaves nothing
    behind that could take the lock later and hold it forever. The lock file is never deleted
    (deleting it would let two processes lock two different files). ``stop``, once set, ends
    the wait with a TokenError.
    """
    lock_path = lock_path_for(path)
    fd = _open_lock(lock_path)
    try:
        deadline = time.monotonic() + give_up_after
        delay = 0.005
        while not try_lock(fd):
            if stop is not None and stop.is_set():
                raise StoppingError(STOPPING_MESSAGE)
            if time.monotonic() >= deadline:
                raise TokenError(
                    f"another process has held {lock_path} for over {give_up_after:g} s "
                    "while refreshing the token; try again later"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
        try:
            yield
        finally:
            unlock(fd)
    finally:
        os.close(fd)


# --- the token endpoint -----------------------------------------------------------------------


def default_token_session(
    *, connect_timeout: float = 10.0, request_timeout: float = 30.0
) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=request_timeout, sock_connect=connect_timeout)
    return aiohttp.ClientSession(
        timeout=timeout,
        headers={"User-Agent": "batchjob/1.0", "Accept": "application/json"},
    )


def basic_credential(client_id: str, client_secret: Secret) -> str:
    """The HTTP Basic credential (after ``Basic ``): a secret too, the client secret in base64."""
    # RFC 6749 2.3.1: both parts form-urlencoded before base64, so a ':' in either survives.
    pair = f"{quote(client_id, safe='')}:{quote(client_secret.value, safe='')}"
    return base64.b64encode(pair.encode()).decode("ascii")


def _scrub(text: str, known: Sequence[str]) -> str:
    # Every form a server could echo (percent-encoded, JSON-escaped, base64), longest first.
    forms = sorted({f for value in known for f in secret_forms(value)}, key=len, reverse=True)
    for form in forms:
        text = text.replace(form, "***")
    return text


async def request_tokens(
    session: aiohttp.ClientSession,
    token_url: str,
    form: Mapping[str, str],
    *,
    client_id: str,
    client_secret: Secret | None,
    clock: Callable[[], float] = time.time,
    retry_waits: Sequence[float] = DEFAULT_RETRY_WAITS,
    stop: asyncio.Event | None = None,
) -> TokenSet:
    """POST one grant to the token endpoint and return the tokens it answers with.

    Network faults, 429 and 5xx are retried after each of ``retry_waits``. An OAuth error
    raises :class:`TokenEndpointError` at once; anything else that goes wrong raises TokenError.
    When the answer has no refresh token (long-lived tokens) the one sent is kept. Once ``stop``
    is set no new attempt starts (the one on the wire may still bring the answer).
    """
    body = dict(form)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if client_secret is not None:
        headers["Authorization"] = "Basic " + basic_credential(client_id, client_secret)
    else:
        body["client_id"] = client_id
    known = [v for k, v in body.items() if k in ("refresh_token", "code", "code_verifier")]
    if client_secret is not None:
        known += [client_secret.value, basic_credential(client_id, client_secret)]
    problem = ""
    for attempt in range(len(retry_waits) + 1):
        if attempt:
            await _sleep_unless(stop, retry_waits[attempt - 1])
        if stop is not None and stop.is_set():
            raise StoppingError(
                f"{STOPPING_MESSAGE} (token endpoint {token_url}: {problem or 'not asked'}); "
                "the token file is unchanged"
            )
        sent_at = clock()
        try:
            # No redirects: a redirect could carry the form (and the secret) somewhere else.
            async with session.post(
                token_url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                status = resp.status
                payload = await _read_capped(resp, MAX_TOKEN_ANSWER_SIZE)
        except (aiohttp.ClientError, TimeoutError) as exc:
            problem = f"no answer ({type(exc).__name__})"
            continue
        if status in _RETRY_STATUSES:
            problem = f"HTTP {status}"
            continue
        return _parse_token_answer(status, payload, body, known, sent_at, token_url)
    raise TokenError(
        f"token endpoint {token_url} failed {len(retry_waits) + 1} times (last: {problem}); "
        "the token file is unchanged, try again later"
    )


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """At most ``cap`` bytes of the body, and one more if there is more: an endless or huge
    answer is never buffered whole."""
    chunks: list[bytes] = []
    size = 0
    while size <= cap:
        chunk = await resp.content.read(min(65536, cap + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


async def _sleep_unless(stop: asyncio.Event | None, seconds: float) -> None:
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def _scalar_text(value: object) -> str:
    # Never str() of a list or object: one nested nearly as deep as the parser allows would
    # recurse as deep again, and it is no OAuth error text anyway.
    if isinstance(value, str):
        return value
    return str(value) if isinstance(value, int | float) else ""


def _parse_token_answer(
    status: int,
    payload: bytes,
    body: Mapping[str, str],
    known: Sequence[str],
    sent_at: float,
    token_url: str,
) -> TokenSet:
    if len(payload) > MAX_TOKEN_ANSWER_SIZE:
        # Not parsed (it would be cut anyway), and no part of it is repeated in the message.
        raise TokenError(
            f"token endpoint {token_url} answered {status} with over "
            f"{MAX_TOKEN_ANSWER_SIZE} bytes: not a token answer"
        )
    try:
        data: Any = json.loads(payload) if payload else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: nested deeper than the parser's stack. Uncaught it would end the run
        # as an internal error and skip the fallback to a still-valid access token.
        data = None
    if status != 200:
        error = description = ""
        if isinstance(data, dict):
            error = _scalar_text(data.get("error"))
            description = _scalar_text(data.get("error_description"))
        detail = f"{error}: {description}" if description else error or "no OAuth error given"
        raise TokenEndpointError(status=status, error=error, detail=_scrub(detail, known))
    if not isinstance(data, dict) or not isinstance(data.get("access_token"), str):
        raise TokenError(f"token endpoint {token_url} answered 200 without an access_token")
    refresh = data.get("refresh_token")
    if not isinstance(refresh, str) or not refresh:
        refresh = body.get("refresh_token", "")
    if not refresh:
        raise TokenError(
            "the token endpoint sent no refresh token: the authorization must include "
            "scope offline_access"
        )
    expires_in = data.get("expires_in")
    expires_at = issued_at = None
    if (
        isinstance(expires_in, int | float)
        and not isinstance(expires_in, bool)
        and 0 < expires_in <= _MAX_LIFETIME  # NaN and Infinity fail it too
    ):
        expires_at, issued_at = sent_at + float(expires_in), sent_at
    token_type = data.get("token_type")
    scope = data.get("scope")
    return TokenSet(
        refresh_token=Secret(refresh),
        access_token=Secret(data["access_token"]),
        expires_at=expires_at,
        token_type=token_type if isinstance(token_type, str) else "Bearer",
        scope=scope if isinstance(scope, str) else "",
        issued_at=issued_at,
    )


def auth_hint(path: Path, client_id: str) -> str:
    return (
        f"get a new one with `batchjob auth --client-id {client_id} --token-file {path}` "
        "(or add --import-refresh-token to paste a refresh token)"
    )


# --- the file token source --------------------------------------------------------------------

SessionLike = aiohttp.ClientSession | Callable[[], aiohttp.ClientSession]


class FileTokenSource:
    """Tokens from a token file, refreshed before expiry and after a 401; see the module doc.

    ``session``: an aiohttp session to borrow (the caller closes it), or a factory for one this
    source creates on first need and closes in :meth:`close`; None uses a default factory.
    ``on_new_secret`` is called with every token value this source learns (read from the file
    or received), before the value is returned or stored, so a log redactor always knows it.
    ``log`` (a structlog-style logger) gets ``token.refreshed``, ``token.refresh_failed`` and
    ``token.refresh_abandoned``; their fields never hold a token.

    When a refresh *before expiry* fails, the current access token is still handed out until
    it actually expires (the failure is logged and kept in :attr:`last_error`): an outage of the
    token endpoint, or even a dead refresh token, need not stop a run the token still covers.
    For ``retry_holdoff`` seconds after a failed refresh no new one starts: callers get the
    current token or, once it has expired, that failure (which stops a run at once instead of
    queueing one doomed refresh after another).

    Raises ConfigError for a token URL that is neither https nor loopback http.
    """

    def __init__(
        self,
        path: Path,
        client_id: str,
        *,
        client_secret: Secret | None = None,
        token_url: str = DEFAULT_TOKEN_URL,
        session: SessionLike | None = None,
        clock: Callable[[], float] = time.time,
        refresh_margin: float = DEFAULT_REFRESH_MARGIN,
        retry_waits: Sequence[float] = DEFAULT_RETRY_WAITS,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        on_new_secret: Callable[[str], None] | None = None,
        log: Any = None,
        retry_holdoff: float = DEFAULT_RETRY_HOLDOFF,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        check_url_is_safe("token_url", token_url)
        if not client_id:
            raise TokenError(f"a token file needs a client id: set {CLIENT_ID_ENV}")
        self._path = Path(path).expanduser()
        self._client_id = client_id
        self._client_secret = client_secret
        self._token_url = token_url
        if isinstance(session, aiohttp.ClientSession):
            self._session: aiohttp.ClientSession | None = session
            self._session_factory: Callable[[], aiohttp.ClientSession] | None = None
        else:
            self._session = None
            self._session_factory = session or default_token_session
        self._clock = clock
        self._margin = refresh_margin
        self._retry_waits = tuple(retry_waits)
        self._lock_timeout = lock_timeout
        self._on_new_secret = on_new_secret
        self._log = log if log is not None else null_logger()
        self._retry_holdoff = retry_holdoff
        self._close_timeout = close_timeout
        self._holdoff_until = -math.inf
        self.last_error: TokenError | None = None
        self._lock = asyncio.Lock()
        self._closing = asyncio.Event()
        self._current: TokenSet | None = None
        self._refresh_at: float | None = None
        self._seen: dict[str, None] = {}  # insertion-ordered set
        self._failure: TokenError | None = None
        self._pending: set[asyncio.Task[str]] = set()
        self.refreshes = 0  # successful refreshes by this source (for logs and tests)
        if client_secret is not None:
            self._remember(client_secret.value)
            # A server echoing the Authorization header shows the secret in base64.
            self._remember(basic_credential(client_id, client_secret))

    def __repr__(self) -> str:
        return f"FileTokenSource({str(self._path)!r}, client_id={self._client_id!r})"

    @property
    def path(self) -> Path:
        return self._path

    # -- the TokenSource protocol ----------------------------------------------------------

    async def token(self) -> str:
        """The current access token, refreshed first if it expires within the margin."""
        if self._current is None:
            self._adopt(read_token_file(self._path))
        fresh = self._fresh(None)
        if fresh is not None:
            return fresh
        still_valid = self._unexpired()
        if still_valid is not None and self._clock() < self._holdoff_until:
            return still_valid
        try:
            return await self._renew(None)
        except TokenSaveError:
            raise
        except TokenError:
            still_valid = self._unexpired()
            if still_valid is None:
                raise
            return still_valid  # the failure was logged where it happened

    async def refresh(self, rejected: str) -> str:
        """A token other than ``rejected`` (which got a 401), refreshing only if no one has."""
        if self._current is None:
            self._adopt(read_token_file(self._path))
        return await self._renew(rejected)

    # -- for the CLI -------------------------------------------------------------------------

    def check(self) -> None:
        """Read and validate the token file and prove its folder writable, before a run starts.

        A folder that cannot take the refreshed file fails now rather than hours later, when
        the access token runs out in the middle of the run.
        """
        tokens = read_token_file(self._path)
        check_lock_file(self._path)
        check_folder_writable(self._path)
        check_replaceable(self._path)
        if self._current is None:
            self._adopt(tokens)

    def secrets(self) -> tuple[str, ...]:
        """Every secret value this source has seen so far (tokens, client secret)."""
        return tuple(self._seen)

    async def close(self) -> None:
        """Start no more refreshes; let one in flight store its tokens; close an owned session.

        A refresh in flight may already have spent the refresh token, so its answer is waited
        for, but it makes no further attempt (no retry, no backoff) and the wait ends after
        ``close_timeout`` at most: normally the session's request timeout ends it first.
        """
        self._closing.set()
        if self._pending:
            _, late = await asyncio.wait(set(self._pending), timeout=self._close_timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
                self._log.warning(
                    "token.refresh_abandoned",
                    token_file=str(self._path),
                    waited=self._close_timeout,
                    note="the token endpoint had not answered; if the next run's refresh "
                    "token is refused, run `batchjob auth` again",
                )
        session = self._session
        if session is not None and self._session_factory is not None:  # owned, not borrowed
            self._session = None
            await session.close()

    async def __aenter__(self) -> FileTokenSource:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- internals ---------------------------------------------------------------------------

    def _remember(self, value: str) -> None:
        if value and value not in self._seen:
            self._seen[value] = None
            if self._on_new_secret is not None:
                self._on_new_secret(value)

    def _adopt(self, tokens: TokenSet, lifetime: float | None = None) -> None:
        """Make ``tokens`` current. ``lifetime``: how long the server said they last, if known."""
        if tokens == self._current:
            return
        for value in tokens.secret_values():
            self._remember(value)
        self._current = tokens
        if tokens.expires_at is None:
            self._refresh_at = None
            return
        margin = self._margin
        lifetime = tokens.lifetime() if lifetime is None else lifetime
        if lifetime is not None:
            # A server handing out short-lived tokens must not make every request refresh. The
            # file keeps the lifetime (issued_at), so a token another process stored is due at
            # the same moment as for that process, not at once (a 60 s token is always
            # "within 300 s" of its expiry), and is not refreshed twice.
            margin = min(margin, lifetime / 2)
        self._refresh_at = tokens.expires_at - margin

    def _unexpired(self) -> str | None:
        """The current access token if it has not expired yet, margin or not."""
        current = self._current
        if current is None or current.access_token is None:
            return None
        if current.expires_at is not None and self._clock() >= current.expires_at - _EXPIRY_SKEW:
            return None
        return current.access_token.value

    def _fresh(self, rejected: str | None) -> str | None:
        """The current access token if it is good to use, else None."""
        current = self._current
        if current is None or current.access_token is None:
            return None
        value = current.access_token.value
        if value == rejected:
            return None
        if self._refresh_at is not None and self._clock() >= self._refresh_at:
            return None
        return value

    async def _renew(self, rejected: str | None) -> str:
        async with self._lock:
            if self._failure is not None:
                raise self._failure
            fresh = self._fresh(rejected)
            if fresh is not None:
                return fresh  # another task refreshed while this one waited for the lock
            if self._closing.is_set():
                raise StoppingError(STOPPING_MESSAGE)
            if self.last_error is not None and self._clock() < self._holdoff_until:
                # A refresh failed moments ago (perhaps the one this caller queued behind):
                # another now would most likely fail the same way, after as long a wait.
                raise self.last_error
            # Shielded: a caller cancelled mid-refresh (SIGINT) must not stop the new, rotated
            # refresh token from reaching the file. close() waits for it.
            task = asyncio.ensure_future(self._renew_exclusive(rejected))
            self._pending.add(task)
            task.add_done_callback(self._settled)
            return await asyncio.shield(task)

    def _settled(self, task: asyncio.Task[str]) -> None:
        self._pending.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved here: a cancelled caller may never look at it

    async def _renew_exclusive(self, rejected: str | None) -> str:
        try:
            token = await self._refresh_under_lock(rejected)
        except TokenError as exc:
            if isinstance(exc, StoppingError):
                raise
            self.last_error = exc
            self._holdoff_until = self._clock() + self._retry_holdoff
            fallback = self._unexpired() is not None and not isinstance(exc, TokenSaveError)
            self._log.warning(
                "token.refresh_failed",
                error=clip(printable(str(exc)), MAX_SERVER_TEXT),
                fallback="using the current access token until it expires"
                if fallback
                else "none: the run stops",
                expires_at=_iso(self._current.expires_at if self._current else None),
            )
            raise
        self._holdoff_until = -math.inf
        return token

    async def _refresh_under_lock(self, rejected: str | None) -> str:
        async with token_file_lock(
            self._path, give_up_after=self._lock_timeout, stop=self._closing
        ):
            # First: a run killed before its rename may have left the only copy of the
            # newest pair, and the refresh token in the file spent.
            self._log_left_over(remove_stale_temp_files(self._path))
            on_disk = read_token_file(self._path)
            self._adopt(on_disk)
            fresh = self._fresh(rejected)
            if fresh is not None:
                return fresh  # another process refreshed and stored its tokens
            if self._closing.is_set():
                raise StoppingError(STOPPING_MESSAGE)
            # Before the refresh token is spent: a token file that cannot be replaced, or a
            # folder that cannot take the new pair now, would lose it (rotating tokens work
            # once). The folder check passes for an immutable file, hence both.
            prove_replaceable(self._path)
            try:
                writer = TokenFileWriter(self._path)
            except OSError as exc:
                raise TokenError(unwritable_message(self._path, exc)) from None
            try:
                new, started = await self._request(on_disk)
                self._save(writer, new)
            finally:
                writer.discard()
            lifetime = None if new.expires_at is None else new.expires_at - started
            self._adopt(new, lifetime)
            self.refreshes += 1
            self._log.info(
                "token.refreshed", token_file=str(self._path), expires_at=_iso(new.expires_at)
            )
            assert new.access_token is not None
            return new.access_token.value

    def _log_left_over(self, left: LeftOver) -> None:
        if left.installed:
            self._log.warning(
                "token.recovered",
                token_file=str(self._path),
                note="a run killed while saving its new pair had left it in a temporary file; "
                "it is in the token file now",
            )
        for rescued in left.rescued:
            self._log.warning(
                "token.left_pair_rescued",
                token_file=str(self._path),
                rescued=str(rescued),
                note="a killed run left a pair older than the token file; kept in case the "
                "token file's refresh token is refused",
            )
        for kept in left.kept:
            self._log.warning(
                "token.left_pair_kept",
                token_file=str(self._path),
                left=str(kept),
                note="a killed run left a pair that could not be moved anywhere",
            )

    async def _request(self, on_disk: TokenSet) -> tuple[TokenSet, float]:
        started = self._clock()
        try:
            new = await request_tokens(
                self._get_session(),
                self._token_url,
                {"grant_type": "refresh_token", "refresh_token": on_disk.refresh_token.value},
                client_id=self._client_id,
                client_secret=self._client_secret,
                clock=self._clock,
                retry_waits=self._retry_waits,
                stop=self._closing,
            )
        except TokenEndpointError as exc:
            if exc.error in ("invalid_grant", "invalid_client", "unauthorized_client"):
                self._failure = self._refused(exc)
                raise self._failure from None
            raise
        for value in new.secret_values():
            self._remember(value)
        return new, started

    def _save(self, writer: TokenFileWriter, new: TokenSet) -> None:
        """Store ``new`` over the token file, or else somewhere recoverable and raise."""
        try:
            writer.commit(new)
            return
        except OSError as exc:
            problem = exc.strerror or str(exc)
        path = self._path
        try:
            rescued = rescue_tokens(path, new)
        except OSError as exc:
            where = (
                f"they could not be written anywhere else either ({exc.strerror or exc}), so "
                "they are lost: " + auth_hint(path, self._client_id)
            )
        else:
            where = (
                f"the new pair is in {rescued} (mode 0600): before the next run, move it over "
                f"the token file: mv {shlex.quote(str(rescued))} {shlex.quote(str(path))}"
            )
        self._failure = TokenSaveError(
            f"got new tokens but could not save them to {path} ({problem}), and the refresh "
            f"token in that file is spent now; {where}"
        )
        raise self._failure

    def _refused(self, exc: TokenEndpointError) -> TokenError:
        if exc.error == "invalid_grant":
            rescued = find_rescued_tokens(self._path)
            hint = auth_hint(self._path, self._client_id)
            if rescued is not None:
                hint = (
                    f"an earlier run could not save its new pair and left it in {rescued}: "
                    f"move it over the token file (mv {shlex.quote(str(rescued))} "
                    f"{shlex.quote(str(self._path))}), or {hint}"
                )
            return TokenError(
                f"the refresh token in {self._path} was refused ({exc.detail}): it was used "
                "already (rotating tokens work once), unused for 180 days, or revoked; " + hint
            )
        return TokenError(
            f"the token endpoint refused client id {self._client_id!r} ({exc.detail}): check "
            f"{CLIENT_ID_ENV} and {CLIENT_SECRET_ENV}"
        )

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            assert self._session_factory is not None
            self._session = self._session_factory()
        return self._session


# --- choosing a source --------------------------------------------------------------------------


def token_source_from_env(
    config: JobConfig,
    environ: Mapping[str, str],
    *,
    on_new_secret: Callable[[str], None] | None = None,
    session: SessionLike | None = None,
    log: Any = None,
) -> ManagedTokenSource | None:
    """The token source a run should use, or None when none is configured.

    ``CC_ACCESS_TOKEN`` wins; else a token file (config ``token_file`` or ``CC_TOKEN_FILE``),
    which needs a client id (config ``client_id`` or ``CC_CLIENT_ID``) and takes an optional
    ``CC_CLIENT_SECRET``. The token file is read and checked here, so a missing or malformed
    one fails before the run starts. Raises TokenError, or ConfigError for an unsafe token URL.
    """
    access = environ.get(ACCESS_TOKEN_ENV, "").strip()
    if access:
        if on_new_secret is not None:
            on_new_secret(access)
        if not _BEARER.fullmatch(access):
            # A newline would be refused by aiohttp mid-run (exit 3), and an odd byte could
            # come back escaped in a server's echo, where the redactor would not know it.
            raise TokenError(
                f"{ACCESS_TOKEN_ENV} holds a character a bearer token cannot have (a space, a "
                "line break, a control character or a non-ASCII letter): copy the token again"
            )
        return StaticToken(Secret(access))
    token_file = config.token_file
    if token_file is None and environ.get(TOKEN_FILE_ENV, "").strip():
        token_file = Path(environ[TOKEN_FILE_ENV].strip())
    if token_file is None:
        return None
    client_id = config.client_id or environ.get(CLIENT_ID_ENV, "").strip()
    if not client_id:
        raise TokenError(
            f"token file {token_file} is set but no client id: set {CLIENT_ID_ENV} "
            "(or client_id in the config file)"
        )
    secret_text = environ.get(CLIENT_SECRET_ENV, "").strip()
    if session is None:

        def session_factory() -> aiohttp.ClientSession:
            return default_token_session(
                connect_timeout=config.connect_timeout, request_timeout=config.request_timeout
            )

        session = session_factory
    source = FileTokenSource(
        token_file,
        client_id,
        client_secret=Secret(secret_text) if secret_text else None,
        token_url=config.token_url,
        session=session,
        on_new_secret=on_new_secret,
        log=log,
        # The session's timeout ends a refresh in flight; this only backs it up.
        close_timeout=config.request_timeout + 5.0,
    )
    source.check()
    return source
