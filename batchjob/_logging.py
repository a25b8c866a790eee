"""Structured logs: console lines for people, JSON lines for schedulers. Secrets never print.

No global structlog configuration: each run wraps its own logger, so a library caller (an
orchestrator) keeps its own logging setup and two runs in one process do not interfere.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import sys
from collections.abc import Iterable
from typing import Any, TextIO
from urllib.parse import quote, quote_plus

import structlog
from structlog.typing import EventDict, WrappedLogger

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


#: Most characters of one server text (an error key or message) kept: a server may send
#: megabytes, and every key of a request gets a copy in its report row.
MAX_SERVER_TEXT = 1000
#: Most characters of any text in a report row: the backstop for messages batchjob composes
#: around a server's text ("retries exhausted: ...; it was sent 3 times ...").
MAX_REPORT_TEXT = 2000
#: ... and of an error key (a short identifier, when the server plays fair).
MAX_ERROR_KEY = 200
TRUNCATED = "...[truncated]"

# Control characters (C0, DEL, C1), lone surrogates, line separators and bidi controls: a NUL
# makes a CSV unreadable as input, a newline breaks a journal line, ESC drives a terminal,
# a bidi override reorders what a reader sees.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every control character written as an escape (``\\x00``): one line,
    valid UTF-8, and readable back by batchjob as input."""
    return _UNSAFE.sub(_escape, text)


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, ending ``...[truncated]`` when cut."""
    if len(text) <= limit:
        return text
    return text[: max(0, limit - len(TRUNCATED))] + TRUNCATED


_HEX_ESCAPE = re.compile(r"%[0-9A-F]{2}|\\u[0-9a-f]{4}")
_URL_SAFE = str.maketrans("+/", "-_")


def _other_case(match: re.Match[str]) -> str:
    text = match.group()
    return text.lower() if text.startswith("%") else text[:2] + text[2:].upper()


def secret_forms(secret: str) -> frozenset[str]:
    """``secret`` and the ways a server could echo it back, to redact them all.

    A token endpoint may echo its form body (percent-encoded: ``quote_plus``, or ``quote``
    from a re-encoding; either case of hex digits), put a secret into JSON text that reaches us
    still escaped (``\\u00e9``, ``\\/``), or hand back base64 of it (standard or URL-safe,
    padded or not). A base64 secret (the HTTP Basic credential) also gets its URL-safe spelling.
    """
    if not secret:
        return frozenset()
    forms = {
        secret,
        quote(secret, safe=""),
        quote(secret),
        quote_plus(secret),
        quote_plus(secret, safe="/"),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        repr(secret)[1:-1],
        secret.translate(_URL_SAFE),
    }
    for escaped in (json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]):
        forms.add(escaped.replace("/", "\\/"))
    for encoded in (base64.b64encode(secret.encode()), base64.urlsafe_b64encode(secret.encode())):
        forms |= {encoded.decode(), encoded.decode().rstrip("=")}
    forms |= {_HEX_ESCAPE.sub(_other_case, form) for form in forms}
    return frozenset(form for form in forms if form)


#: The shortest start of a secret taken for one at the end of a cut text: shorter ones are
#: too likely to be ordinary text, and say too little of the secret to matter.
_MIN_TAIL = 6


class Redactor:
    """Knows a run's secrets and keeps them out of every text it cleans.

    Replaces every known secret, in each form of :func:`secret_forms`, with ``***`` anywhere
    in a log event's values (it is a structlog processor) and in any text passed to
    :meth:`scrub` or :meth:`clean`.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self._forms: set[str] = set()
        self._ordered: tuple[str, ...] = ()
        self._pattern: re.Pattern[str] | None = None
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str) -> None:
        if secret and secret not in self._secrets:
            self._secrets.add(secret)
            self._forms |= secret_forms(secret)
            # Longest first: a secret (or form) that holds another is replaced whole. One
            # pattern for all: a log event costs one scan, however many forms there are.
            self._ordered = tuple(sorted(self._forms, key=len, reverse=True))
            self._pattern = re.compile("|".join(map(re.escape, self._ordered)))

    def __contains__(self, secret: str) -> bool:
        return secret in self._secrets

    def scrub(self, text: str) -> str:
        return self._pattern.sub("***", text) if self._pattern is not None else text

    def clean(self, text: str, limit: int = MAX_SERVER_TEXT, *, cut: bool = False) -> str:
        """``text`` safe to write anywhere: no secret, no control character, at most ``limit``
        characters. Secrets go first, so the final cut can never leave part of one. ``cut``:
        the text was cut before it came here (a body at the read limit), so it may end in the
        first part of a secret: that goes too."""
        text = self.scrub(text)
        if cut:
            text = self.scrub_tail(text)
        return clip(printable(text), limit)

    def scrub_tail(self, text: str) -> str:
        """``text`` without a trailing start of a secret (at least ``_MIN_TAIL`` characters)."""
        for form in self._ordered:
            longest = min(len(form) - 1, len(text))
            for size in range(longest, _MIN_TAIL - 1, -1):
                if text.endswith(form[:size]):
                    return text[:-size] + "***"
        return text

    def __call__(self, _: WrappedLogger, __: str, event: EventDict) -> EventDict:
        if not self._secrets:
            return event
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = self.scrub(value)
            elif not isinstance(value, int | float | bool | type(None)):
                event[key] = self.scrub(str(value))
        return event


def make_logger(
    *,
    log_format: str | None,
    level: str = "info",
    redactor: Redactor | None = None,
    stream: TextIO | None = None,
) -> structlog.stdlib.BoundLogger:
    stream = stream or sys.stderr
    fmt = log_format or ("console" if stream.isatty() else "json")
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redactor or Redactor(),
        renderer,
    ]
    logger = structlog.wrap_logger(
        structlog.PrintLogger(stream),
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level.lower(), 20)),
    )
    # bind() builds the real logger now: the lazy proxy structlog returns would otherwise sit
    # in front of every call, a measurable cost at thousands of requests a second.
    return logger.bind()  # type: ignore[no-any-return]


def _drop(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    raise structlog.DropEvent


def null_logger() -> Any:
    """A logger that drops everything, for library callers that pass none."""
    return structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[_drop],
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
    ).bind()


__all__ = [
    "MAX_REPORT_TEXT",
    "MAX_SERVER_TEXT",
    "TRUNCATED",
    "Redactor",
    "clip",
    "make_logger",
    "null_logger",
    "printable",
    "secret_forms",
]
