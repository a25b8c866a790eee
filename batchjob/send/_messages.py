"""The API's messages: the undo body we send, and what an answer means.

Classification is a pure function, so the rules ("never resend a 400 unchanged",
"quota_exceeded stops the run", "throttling is never a key's fault") are tested without a
network.
"""

from __future__ import annotations

import email.utils
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from batchjob._logging import MAX_ERROR_KEY, MAX_SERVER_TEXT, Redactor
from batchjob._model import Action


class Verdict(Enum):
    """What an answer means for the keys in the request and for the run."""

    OK = "ok"  # 2xx: every key in the request is undone
    KEY_FAULT = "key_fault"  # 400/404/409/422: some key in the request is at fault
    TOO_LARGE = "too_large"  # 413: send fewer keys per request
    RETRY = "retry"  # transient: network, timeout, 5xx, 429 throttled, 403 over the rate
    QUOTA = "quota"  # 429 quota_exceeded: nothing more today
    AUTH = "auth"  # 401: token invalid or expired
    FORBIDDEN = "forbidden"  # 403: scope, privilege or app deactivated
    REFUSED = "refused"  # any other answer: not retried, keys failed


#: The endpoint of each action, under /events/{event_id}/; both take the same body.
TICKET_PATHS: dict[Action, str] = {
    Action.UNDO: "undo_check_in/tickets",
    Action.CHECK_IN: "check_in/tickets",
}
TOKEN_FAILED = "token_unavailable"  # noqa: S105 - error_key of a synthetic 401 when no token can be had
RETRY_STATUSES = frozenset({500, 502, 503, 504})
KEY_FAULT_STATUSES = frozenset({400, 404, 409, 422})


@dataclass(frozen=True)
class Reply:
    """An answer, or the lack of one (status 0) after a network fault or timeout."""

    status: int
    error_key: str = ""
    error_message: str = ""
    retry_after: float | None = None
    body: bytes = b""
    expected: int = 204  # the success status of the request that got this answer

    @property
    def verdict(self) -> Verdict:
        return classify(self.status, self.error_key, expected=self.expected)

    @property
    def throttled(self) -> bool:
        return is_throttling(self.status, self.error_key)


def classify(status: int, error_key: str = "", *, expected: int = 204) -> Verdict:
    """What an answer means. Only the documented success status counts as success: a 200
    from a proxy or captive portal must never get keys reported ``undone``."""
    if status == expected:
        return Verdict.OK
    if status == 0 or status in RETRY_STATUSES:
        return Verdict.RETRY
    if status == 429:
        return Verdict.QUOTA if error_key == "quota_exceeded" else Verdict.RETRY
    if status == 401:
        return Verdict.AUTH
    if status == 403:
        return Verdict.RETRY if is_throttling(status, error_key) else Verdict.FORBIDDEN
    if status == 413:
        return Verdict.TOO_LARGE
    if status in KEY_FAULT_STATUSES:
        return Verdict.KEY_FAULT
    return Verdict.REFUSED


def is_throttling(status: int, error_key: str = "") -> bool:
    """Whether an answer says "too fast": 429 but the daily quota, or a 403 from the older
    gateway whose error key speaks of the request rate or QPS. Never a key's fault, nor a stop.
    """
    if status == 429:
        return error_key != "quota_exceeded"
    if status != 403 or not error_key:
        return False
    # "rate_limit", "requestRateExceeded", "QPS.exceeded", "throttled": the request rate.
    # Not "corporate_policy", nor "rate_plan_inactive" or "RateCard.NotAllowed" (a rate, but
    # not of requests: retrying those for minutes would help nobody).
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", error_key).lower()
    words = [w for w in re.split(r"[^a-z0-9]+", spaced) if w]
    squashed = "".join(words)
    return (
        "qps" in squashed
        or any(w.startswith("throttl") for w in words)
        or any(part in squashed for part in _RATE_PHRASES)
    )


#: How an error key says "too many requests per second" (squashed, lower case).
_RATE_PHRASES = (
    "ratelimit",
    "rateexceeded",
    "requestrate",
    "toomanyrequests",
    "overrate",
    "persecond",
)


#: Most characters of a body that is not JSON (an HTML error page) shown as its message.
_NON_JSON_TEXT = 200


def parse_error_body(
    body: bytes, redactor: Redactor | None = None, *, cut: bool = False
) -> tuple[str, str]:
    """``(error_key, error_message)`` from any error body the platform sends.

    Usually ``[{"error_key", "error_message"}]``; sometimes one such object; the OAuth server
    uses ``{"error", "error_description"}``; proxies send HTML or nothing. Both texts come
    back clean (see :meth:`Redactor.clean`): ``redactor``'s secrets replaced by ``***``,
    control characters escaped, at most MAX_SERVER_TEXT characters. ``cut``: the body was
    cut at the read limit (it is then no JSON), so it may end in the first part of a secret.
    """
    clean = (redactor or Redactor()).clean
    if not body:
        return "", ""
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # All of it decoded and cleaned before the cut: a cut must not leave half a secret.
        text = " ".join(body.decode("utf-8", "replace").split())
        return "", clean(text, _NON_JSON_TEXT, cut=cut)
    key, message = _error_fields(data)
    return clean(key, MAX_ERROR_KEY), clean(message, MAX_SERVER_TEXT)


def _error_fields(data: Any) -> tuple[str, str]:
    if isinstance(data, list) and data and isinstance(data[0], dict):
        keys = [_text(d.get("error_key", "")) for d in data if isinstance(d, dict)]
        messages = [_text(d.get("error_message", "")) for d in data if isinstance(d, dict)]
        return keys[0], "; ".join(m for m in messages if m)
    if isinstance(data, dict):
        key = data.get("error_key", data.get("error", ""))
        message = data.get("error_message", data.get("error_description", ""))
        return _text(key), _text(message)
    return "", ""


def _text(value: Any) -> str:
    # str() of a deeply nested list could itself recurse too deep; a server's odd value is
    # shown by its type then.
    try:
        return str(value)
    except RecursionError:
        return f"<{type(value).__name__}>"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), if usable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds)


# Printable ASCII other than the quote and the backslash: JSON strings that need no escape.
_PLAIN_JSON = re.compile(r"[ !#-\[\]-~]*")


def undo_body(keys: Sequence[str]) -> bytes:
    """The undo request's JSON body, byte for byte what ``json.dumps`` compact would give.

    Keys are nearly always plain ASCII, and joining them is several times cheaper than the
    json encoder: it shows at thousands of requests a second.
    """
    # Checked without the separators: a key holding '","' must not pass for two keys.
    if keys and _PLAIN_JSON.fullmatch("".join(keys)):
        return ('{"order_ticket_keys":["' + '","'.join(keys) + '"]}').encode()
    return json.dumps({"order_ticket_keys": list(keys)}, separators=(",", ":")).encode()
