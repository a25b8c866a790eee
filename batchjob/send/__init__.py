"""Send: requests to the API, paced at the rate the server grants, retried with backoff.

- :mod:`._transport`: the seam (a :class:`Transport` is anything with aiohttp-like
  ``request``); bodies are read with a bound.
- :mod:`._messages`: the undo body, and what an answer means (:func:`classify`, pure).
- :mod:`._pacing`: even, adaptive spacing of requests (see ``docs/pacing.md``).
- :mod:`._client`: one request with its tries (:class:`Call`), the request budget
  (:class:`RequestGate`) and the retry policy.

What the run stage may use:
"""

from batchjob.send._client import ApiClient, Call, CallResult, RequestGate, RetryPolicy
from batchjob.send._messages import TOKEN_FAILED, Reply, Verdict
from batchjob.send._pacing import AdaptivePacer, PacingSettings
from batchjob.send._transport import (
    MAX_SUCCESS_BODY,
    AiohttpTransport,
    RawResponse,
    Transport,
    TransportError,
    make_session,
)

__all__ = [
    "MAX_SUCCESS_BODY",
    "TOKEN_FAILED",
    "AdaptivePacer",
    "AiohttpTransport",
    "ApiClient",
    "Call",
    "CallResult",
    "PacingSettings",
    "RawResponse",
    "Reply",
    "RequestGate",
    "RetryPolicy",
    "Transport",
    "TransportError",
    "Verdict",
    "make_session",
]
