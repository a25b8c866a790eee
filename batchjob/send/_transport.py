"""The transport seam: how bytes reach the API and come back.

:class:`AiohttpTransport` is the real one; tests may pass any object with the same ``request``
coroutine (see :class:`Transport`). Bodies are read with a bound, whatever the server sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import aiohttp

#: Most bytes of an answer's body read: an error body is shown cut to MAX_SERVER_TEXT
#: characters anyway, and a server may send one that never ends.
MAX_BODY = 64 * 1024
#: ... but a GET's success body (the event) must be read whole to find its status.
MAX_SUCCESS_BODY = 1024 * 1024


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


class TransportError(Exception):
    """No answer: connection refused or dropped, timeout. Never carries request headers.

    ``cause`` says in a few words why, for the message of a run that cannot reach the API;
    ``unreachable``: no connection was made at all (refused, DNS, TLS, connect timeout), as
    opposed to one made and then dropped or left unanswered.
    """

    def __init__(self, message: str, cause: str = "no answer", *, unreachable: bool = False):
        super().__init__(message)
        self.cause = cause
        self.unreachable = unreachable


def no_answer_cause(exc: BaseException) -> tuple[str, bool]:
    """Why a request got no HTTP answer, in words a person running the job can act on, and
    whether the server was not reached at all."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "DNS lookup failed", True
    if isinstance(exc, aiohttp.ClientSSLError):  # certificate or handshake
        return "TLS handshake failed", True
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "connection refused", True
        return "cannot connect", True
    if isinstance(exc, aiohttp.ConnectionTimeoutError):  # sock_connect: nothing answered
        return "connecting timed out", True
    if isinstance(exc, TimeoutError):  # aiohttp's timeouts are TimeoutErrors too
        return "timed out", False
    return "connection dropped without an answer", False


class Transport(Protocol):
    async def request(
        self, method: str, url: str, *, headers: dict[str, str], body: bytes | None
    ) -> RawResponse: ...


class AiohttpTransport:
    """The real transport: one aiohttp session for the run.

    Reads at most MAX_BODY bytes of a body (MAX_SUCCESS_BODY of a GET's 2xx): the rest is
    never read, and the connection is closed rather than reused.
    """

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def request(
        self, method: str, url: str, *, headers: dict[str, str], body: bytes | None
    ) -> RawResponse:
        try:
            # No redirects: a bearer token has no business following one, and a redirect's
            # answer is not the API's.
            async with self._session.request(
                method, url, headers=headers, data=body, allow_redirects=False
            ) as resp:
                success = method == "GET" and 200 <= resp.status < 300
                limit = MAX_SUCCESS_BODY if success else MAX_BODY
                payload = await read_at_most(resp.content, limit)
                return RawResponse(resp.status, dict(resp.headers), payload)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # aiohttp's messages name the URL at most; the type is what a reader needs. They
            # may quote what the server sent (a header): the client cleans the text.
            cause, unreachable = no_answer_cause(exc)
            raise TransportError(
                type(exc).__name__ + (f": {exc}" if str(exc) else ""),
                cause,
                unreachable=unreachable,
            ) from None


async def read_at_most(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body's first ``limit`` bytes, or all of it if shorter."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await content.read(limit - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def make_session(
    *, connect_timeout: float, request_timeout: float, concurrency: int
) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=request_timeout, sock_connect=connect_timeout)
    # A few spare connections: a dropped one should not make the next request wait.
    connector = aiohttp.TCPConnector(limit=concurrency + 2, enable_cleanup_closed=True)
    return aiohttp.ClientSession(
        timeout=timeout,
        connector=connector,
        headers={"User-Agent": "batchjob/1.0", "Accept": "application/json"},
        raise_for_status=False,
    )
