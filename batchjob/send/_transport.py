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
    """No answer: connection refused or dropped, timeout. Never carries request headers."""


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
            raise TransportError(type(exc).__name__ + (f": {exc}" if str(exc) else "")) from None


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
