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
      "token_type": "Bearer",
      "scope": "campaign_data offline_access"
    }

- ``refresh_token`` is required. ``access_token`` and ``expires_at`` may be absent or null:
  the first use then refreshes.
- ``expires_at`` is when the access token stops working. It is written as ISO 8601 in UTC with
  a ``Z``; on read, ISO 8601 (an offset, or none meaning UTC) and UTC epoch seconds (a JSON
  number) are both accepted.
- ``token_type`` and ``scope`` are informational.

The file is replaced atomically (a temporary file in the same directory, created with mode 0600,
fsynced, renamed over the old one, then the directory fsynced), so a reader sees the old pair or
the new pair, never half of one, and a crash never loses the newest refresh token once a refresh
has returned. Refresh tokens may rotate (each works once), so the new pair is on disk *before*
the new access token is handed out.

Refreshes are serialised twice: an :class:`asyncio.Lock` within a process, and an exclusive
``flock`` on ``<token file>.lock`` across processes. Whoever gets the lock re-reads the file first
and uses what another process stored if it is still good, so concurrent runs refresh once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp

from batchjob._config import DEFAULT_TOKEN_URL, JobConfig, check_url_is_safe
from batchjob._logging import null_logger

__all__ = [
    "FileTokenSource",
    "ManagedTokenSource",
    "Secret",
    "StaticToken",
    "TokenEndpointError",
    "TokenError",
    "TokenSet",
    "default_token_session",
    "read_token_file",
    "request_tokens",
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
#: An access token this close to its expiry is not handed out any more, refresh or not.
_EXPIRY_SKEW = 10.0

_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Secret:
    """A string that does not print itself."""

    value: str

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"


class TokenError(Exception):
    """No usable token: the file is missing or malformed, or the token server said no.

    The message says what to do about it and never contains a token.
    """


class TokenEndpointError(TokenError):
    """The token endpoint answered with an OAuth error (``error`` is its code)."""

    def __init__(self, *, status: int, error: str, detail: str) -> None:
        super().__init__(f"token endpoint answered {status} ({detail})")
        self.status = status
        self.error = error
        self.detail = detail  # "error: description", scrubbed of anything that was sent


class ManagedTokenSource(Protocol):
    """A TokenSource (see ``batchjob._api``) the CLI can also redact and close."""

    async def token(self) -> str: ...

    async def refresh(self, rejected: str) -> str | None: ...

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

    def to_json(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token.value if self.access_token else None,
            "refresh_token": self.refresh_token.value,
            "expires_at": _iso(self.expires_at),
            "token_type": self.token_type,
            "scope": self.scope,
        }

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


def read_token_file(path: Path) -> TokenSet:
    """The tokens in ``path``. Errors name the file and the problem, never its content."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TokenError(
            f"token file {path} not found: create it with `batchjob auth --token-file {path}`"
        ) from None
    except OSError as exc:
        raise TokenError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        # The decoder's message gives a position only, never the text around it.
        raise TokenError(
            f"token file {path} is not valid JSON (line {exc.lineno}, column {exc.colno})"
        ) from None
    except UnicodeDecodeError:
        raise TokenError(f"token file {path} is not UTF-8 text") from None
    if not isinstance(data, dict):
        raise TokenError(f"token file {path} must hold a JSON object")
    refresh = data.get("refresh_token")
    if not isinstance(refresh, str) or not refresh.strip():
        raise TokenError(f"token file {path} has no refresh_token")
    access = data.get("access_token")
    if access is not None and not isinstance(access, str):
        raise TokenError(f"token file {path}: access_token must be a string or null")
    try:
        expires_at = _parse_expires_at(data.get("expires_at"))
    except (ValueError, OverflowError, OSError):
        raise TokenError(
            f"token file {path}: expires_at must be UTC epoch seconds or an ISO 8601 time"
        ) from None
    token_type = data.get("token_type")
    scope = data.get("scope")
    return TokenSet(
        refresh_token=Secret(refresh.strip()),
        access_token=Secret(access.strip()) if access and access.strip() else None,
        expires_at=expires_at,
        token_type=token_type if isinstance(token_type, str) else "Bearer",
        scope=scope if isinstance(scope, str) else "",
    )


def write_token_file(path: Path, tokens: TokenSet) -> None:
    """Replace ``path`` with ``tokens`` atomically and durably; the file is mode 0600.

    Raises OSError; the caller knows whether a refresh token was spent and words the error.
    """
    payload = (json.dumps(tokens.to_json(), indent=2) + "\n").encode()
    directory = path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    # 0600 from creation: a chmod afterwards would leave a moment where others could read it.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename is only durable once the directory entry is on disk too.
    dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def lock_path_for(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@contextlib.asynccontextmanager
async def token_file_lock(
    path: Path, *, give_up_after: float = DEFAULT_LOCK_TIMEOUT
) -> AsyncIterator[None]:
    """Hold an exclusive flock on ``<path>.lock``: one refresh at a time across processes.

    Polls with LOCK_NB instead of blocking in a thread: a cancelled waiter then leaves nothing
    behind that could take the lock later and hold it forever. The lock file is never deleted
    (deleting it would let two processes lock two different files).
    """
    lock_path = lock_path_for(path)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise TokenError(f"cannot open lock file {lock_path}: {exc.strerror or exc}") from None
    try:
        deadline = time.monotonic() + give_up_after
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TokenError(
                        f"another process has held {lock_path} for over {give_up_after:g} s "
                        "while refreshing the token; try again later"
                    ) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
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


def _basic_auth(client_id: str, client_secret: Secret) -> str:
    # RFC 6749 2.3.1: both parts form-urlencoded before base64, so a ':' in either survives.
    pair = f"{quote(client_id, safe='')}:{quote(client_secret.value, safe='')}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


def _scrub(text: str, known: Sequence[str]) -> str:
    for value in known:
        if value:
            text = text.replace(value, "***")
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
) -> TokenSet:
    """POST one grant to the token endpoint and return the tokens it answers with.

    Network faults, 429 and 5xx are retried after each of ``retry_waits``. An OAuth error
    raises :class:`TokenEndpointError` at once; anything else that goes wrong raises TokenError.
    When the answer has no refresh token (long-lived tokens) the one sent is kept.
    """
    body = dict(form)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if client_secret is not None:
        headers["Authorization"] = _basic_auth(client_id, client_secret)
    else:
        body["client_id"] = client_id
    known = [v for k, v in body.items() if k in ("refresh_token", "code", "code_verifier")]
    if client_secret is not None:
        known.append(client_secret.value)
    problem = ""
    for attempt in range(len(retry_waits) + 1):
        if attempt:
            await asyncio.sleep(retry_waits[attempt - 1])
        sent_at = clock()
        try:
            # No redirects: a redirect could carry the form (and the secret) somewhere else.
            async with session.post(
                token_url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                status = resp.status
                payload = await resp.read()
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


def _parse_token_answer(
    status: int,
    payload: bytes,
    body: Mapping[str, str],
    known: Sequence[str],
    sent_at: float,
    token_url: str,
) -> TokenSet:
    try:
        data: Any = json.loads(payload) if payload else None
    except (ValueError, UnicodeDecodeError):
        data = None
    if status != 200:
        error = description = ""
        if isinstance(data, dict):
            error = str(data.get("error", ""))
            description = str(data.get("error_description", ""))
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
    expires_at = None
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
        expires_at = sent_at + float(expires_in)
    token_type = data.get("token_type")
    scope = data.get("scope")
    return TokenSet(
        refresh_token=Secret(refresh),
        access_token=Secret(data["access_token"]),
        expires_at=expires_at,
        token_type=token_type if isinstance(token_type, str) else "Bearer",
        scope=scope if isinstance(scope, str) else "",
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
    ``log`` (a structlog-style logger) gets ``token.refreshed`` and ``token.refresh_failed``;
    their fields never hold a token.

    When a refresh *before expiry* fails, the current access token is still handed out until
    it actually expires (the failure is logged and kept in :attr:`last_error`): an outage of the
    token endpoint, or even a dead refresh token, need not stop a run the token still covers.

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
        self._holdoff_until = -math.inf
        self.last_error: TokenError | None = None
        self._lock = asyncio.Lock()
        self._current: TokenSet | None = None
        self._refresh_at: float | None = None
        self._seen: dict[str, None] = {}  # insertion-ordered set
        self._failure: TokenError | None = None
        self._pending: set[asyncio.Task[str]] = set()
        self.refreshes = 0  # successful refreshes by this source (for logs and tests)
        if client_secret is not None:
            self._remember(client_secret.value)

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
        except TokenError as exc:
            still_valid = self._unexpired()
            if still_valid is None:
                raise
            self._holdoff_until = self._clock() + self._retry_holdoff
            self._log.warning(
                "token.refresh_failed",
                error=str(exc),
                fallback="using the current access token until it expires",
                expires_at=_iso(self._current.expires_at if self._current else None),
            )
            return still_valid

    async def refresh(self, rejected: str) -> str:
        """A token other than ``rejected`` (which got a 401), refreshing only if no one has."""
        if self._current is None:
            self._adopt(read_token_file(self._path))
        return await self._renew(rejected)

    # -- for the CLI -------------------------------------------------------------------------

    def check(self) -> None:
        """Read and validate the token file now, so a bad one fails before a run starts."""
        tokens = read_token_file(self._path)
        if self._current is None:
            self._adopt(tokens)

    def secrets(self) -> tuple[str, ...]:
        """Every secret value this source has seen so far (tokens, client secret)."""
        return tuple(self._seen)

    async def close(self) -> None:
        """Let a refresh in progress store its tokens, then close an owned session."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
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
        if tokens == self._current:
            return
        for value in tokens.secret_values():
            self._remember(value)
        self._current = tokens
        if tokens.expires_at is None:
            self._refresh_at = None
        else:
            margin = self._margin
            if lifetime is not None:
                # A server handing out short-lived tokens must not make every request refresh.
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
        async with token_file_lock(self._path, give_up_after=self._lock_timeout):
            on_disk = read_token_file(self._path)
            self._adopt(on_disk)
            fresh = self._fresh(rejected)
            if fresh is not None:
                return fresh  # another process refreshed and stored its tokens
            session = self._get_session()
            started = self._clock()
            try:
                new = await request_tokens(
                    session,
                    self._token_url,
                    {"grant_type": "refresh_token", "refresh_token": on_disk.refresh_token.value},
                    client_id=self._client_id,
                    client_secret=self._client_secret,
                    clock=self._clock,
                    retry_waits=self._retry_waits,
                )
            except TokenEndpointError as exc:
                if exc.error in ("invalid_grant", "invalid_client", "unauthorized_client"):
                    self._failure = self._refused(exc)
                    self.last_error = self._failure
                    raise self._failure from None
                self.last_error = exc
                raise
            except TokenError as exc:
                self.last_error = exc
                raise
            for value in new.secret_values():
                self._remember(value)
            try:
                write_token_file(self._path, new)
            except OSError as exc:
                self._failure = TokenError(
                    f"got new tokens but could not save them to {self._path} "
                    f"({exc.strerror or exc}); the old refresh token may be spent: "
                    + auth_hint(self._path, self._client_id)
                )
                self.last_error = self._failure
                raise self._failure from None
            lifetime = None if new.expires_at is None else new.expires_at - started
            self._adopt(new, lifetime)
            self.refreshes += 1
            self._log.info(
                "token.refreshed", token_file=str(self._path), expires_at=_iso(new.expires_at)
            )
            assert new.access_token is not None
            return new.access_token.value

    def _refused(self, exc: TokenEndpointError) -> TokenError:
        if exc.error == "invalid_grant":
            return TokenError(
                f"the refresh token in {self._path} was refused ({exc.detail}): it was used "
                "already (rotating tokens work once), unused for 180 days, or revoked; "
                + auth_hint(self._path, self._client_id)
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
    )
    source.check()
    return source
