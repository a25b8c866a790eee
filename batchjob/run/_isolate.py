"""Which keys go in each request: chunking, and finding the bad keys in a refused request.

The API refuses a whole request when one of its keys is bad (unknown ticket, say) and does not
say which. Requests are the scarce resource (4/s, 10,000/day), so finding the bad keys must
cost as few requests as possible. This is group testing: each request answers "all good" (204,
and then every key in it *is* undone) or "at least one bad" (400/404).

:class:`KeyIsolator` runs a variant of Hwang's generalised binary splitting, adapted to an
unknown and changing share of bad keys:

* Untested keys are sent in groups whose size follows the bad-key share seen so far:
  ``2 ** floor(log2((1 - p) / p))``, capped at the batch size. With no bad key seen, that is the
  batch size, so a clean run costs exactly ``ceil(keys / batch)`` requests.
* A refused group holds at least one bad key. It is split: the first part is sent. If it
  passes, the rest is known to hold a bad key and is split in turn *without being sent whole*
  (a refusal would tell us nothing new). If it is refused, the rest goes back among the untested
  keys, because it may well be clean.
* A known-bad group of one key is that bad key. Its error is the refusal of the smallest
  request that held it, all of whose other keys were then proven good. Unless that refusal
  may not be about the keys at all (``needs_proof``: the runner asks for proof of anything
  but a 404), in which case the key is sent alone once before it is blamed: a one-off 400, or
  a server refusing big requests with 400, must not get a good key reported ``failed``.

Everything here is pure and synchronous: the runner asks :meth:`KeyIsolator.next_group`, sends,
and reports back. Many groups may be in flight at once; they never share a key.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from batchjob.plan import Positions

F = TypeVar("F")
_EMPTY: Positions = np.empty(0, dtype=np.int64)


def chunk(positions: Positions, size: int) -> Iterator[Positions]:
    """Split ``positions`` into consecutive runs of at most ``size``; every key exactly once."""
    if size < 1:
        raise ValueError("size must be at least 1")
    for start in range(0, len(positions), size):
        yield positions[start : start + size]


def group_size_for(bad_share: float, max_batch: int) -> int:
    """Hwang's group size for a given share of bad keys, capped at ``max_batch``."""
    if bad_share <= 0.0:
        return max_batch
    if bad_share >= 0.5:
        return 1
    size = 1 << math.floor(math.log2((1.0 - bad_share) / bad_share))
    return max(1, min(max_batch, size))


@dataclass(frozen=True)
class Group:
    """Keys to send together in one request."""

    id: int
    positions: Positions


@dataclass(frozen=True)
class Resolution(Generic[F]):
    """What one answer settled: keys now undone, and bad keys each with the refusal to blame."""

    undone: Positions = field(default_factory=lambda: _EMPTY)
    bad: tuple[tuple[int, F], ...] = ()


@dataclass
class _InFlight(Generic[F]):
    tested: Positions
    # For a split of a known-bad group: the part held back, and the refusal that condemned
    # the whole. None for a group taken from the untested keys.
    rest: Positions | None = None
    parent_failure: F | None = None


class KeyIsolator(Generic[F]):
    """Plans the requests for one event's keys and learns from each answer."""

    def __init__(
        self,
        positions: Sequence[int] | Positions,
        max_batch: int,
        *,
        needs_proof: Callable[[F], bool] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_batch = max_batch
        self._needs_proof = needs_proof or (lambda _: False)
        # Single keys blamed by elimination on a refusal that might not be about keys.
        self._to_prove: deque[Positions] = deque()
        self._untested: deque[Positions] = deque()
        first = np.asarray(positions, dtype=np.int64)
        if len(first):
            self._untested.append(first)
        self._untested_count = len(first)
        self._suspects: deque[tuple[Positions, F]] = deque()
        self._in_flight: dict[int, _InFlight[F]] = {}
        self._next_id = 0
        self._good = 0
        self._bad = 0

    # --- state -------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return not (self._untested_count or self._suspects or self._to_prove or self._in_flight)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def bad_share(self) -> float:
        """Estimated share of bad keys: found ones, plus one per group known to hold one."""
        suspects = len(self._suspects) + sum(
            1 for f in self._in_flight.values() if f.rest is not None
        )
        bad = self._bad + suspects
        if bad == 0:
            return 0.0
        seen = (
            self._good
            + self._bad
            + sum(len(p) for p, _ in self._suspects)
            + sum(
                len(f.tested) + len(f.rest) for f in self._in_flight.values() if f.rest is not None
            )
        )
        return bad / max(seen, 1)

    # --- planning ----------------------------------------------------------------------

    def next_group(self) -> Group | None:
        """The next request to send, or None when nothing can be sent until an answer comes."""
        if self._to_prove:
            return self._launch(self._to_prove.popleft())
        if self._suspects:
            # Settle known-bad groups first: their keys are the furthest from an answer.
            positions, failure = self._suspects.popleft()
            # Never more than max_batch: a 413 on a half must not make the same half come back.
            half = min(len(positions) // 2, self.max_batch)
            return self._launch(positions[:half], rest=positions[half:], parent_failure=failure)
        if self._untested_count:
            size = group_size_for(self.bad_share(), self.max_batch)
            return self._launch(self._take_untested(size))
        return None

    def _launch(
        self, tested: Positions, *, rest: Positions | None = None, parent_failure: F | None = None
    ) -> Group:
        group = Group(self._next_id, tested)
        self._next_id += 1
        self._in_flight[group.id] = _InFlight(tested, rest, parent_failure)
        return group

    def _take_untested(self, size: int) -> Positions:
        parts: list[Positions] = []
        wanted = size
        while wanted and self._untested:
            head = self._untested[0]
            if len(head) <= wanted:
                parts.append(self._untested.popleft())
                wanted -= len(head)
            else:
                parts.append(head[:wanted])
                self._untested[0] = head[wanted:]
                wanted = 0
        taken = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self._untested_count -= len(taken)
        return taken

    def _return_untested(self, positions: Positions) -> None:
        if len(positions):
            # To the front: these keys were due already, and input order is kept roughly.
            self._untested.appendleft(positions)
            self._untested_count += len(positions)

    def _condemn(self, positions: Positions, failure: F) -> tuple[tuple[int, F], ...]:
        """A group known to hold a bad key: one key is the culprit, more need splitting."""
        if len(positions) == 1:
            self._bad += 1
            return ((int(positions[0]), failure),)
        self._suspects.append((positions, failure))
        return ()

    # --- learning ----------------------------------------------------------------------

    def record_ok(self, group_id: int) -> Resolution[F]:
        """The request was answered 204: every key in it is undone."""
        flight = self._in_flight.pop(group_id)
        self._good += len(flight.tested)
        bad: tuple[tuple[int, F], ...] = ()
        if flight.rest is not None and flight.parent_failure is not None:
            # The whole was refused and this part is clean, so the bad key is in the rest.
            if len(flight.rest) == 1 and self._needs_proof(flight.parent_failure):
                self._to_prove.append(flight.rest)
            else:
                bad = self._condemn(flight.rest, flight.parent_failure)
        return Resolution(undone=flight.tested, bad=bad)

    def record_refused(self, group_id: int, failure: F) -> Resolution[F]:
        """The request was refused for its keys (400/404): at least one of them is bad."""
        flight = self._in_flight.pop(group_id)
        bad = self._condemn(flight.tested, failure)
        if flight.rest is not None:
            # The bad key we knew of may be in the tested part: the rest is untested again.
            self._return_untested(flight.rest)
        return Resolution(bad=bad)

    def record_too_large(self, group_id: int) -> None:
        """The server refused the request's size (413): send smaller groups from now on."""
        flight = self._in_flight.pop(group_id)
        # Groups sent before an earlier 413 shrank the limit must not shrink it again.
        self.shrink_batch(len(flight.tested) // 2)
        if flight.rest is not None and flight.parent_failure is not None:
            self._suspects.appendleft(
                (np.concatenate([flight.tested, flight.rest]), flight.parent_failure)
            )
        else:
            self._return_untested(flight.tested)

    def shrink_batch(self, size: int) -> None:
        """Send at most ``size`` keys per request from now on (a server's size limit)."""
        self.max_batch = max(1, min(self.max_batch, size))

    def record_no_verdict(self, group_id: int) -> Positions:
        """The request got no usable answer (retries ran out, or it was cancelled).

        Returns its keys, which the caller reports; nothing is learned about them. The part
        held back from a split goes back among the untested keys: it may still be clean.
        """
        flight = self._in_flight.pop(group_id)
        if flight.rest is not None:
            self._return_untested(flight.rest)
        return flight.tested

    def leftovers(self) -> tuple[Positions, tuple[tuple[Positions, F], ...]]:
        """Keys not settled and not in flight, for a run that stops early.

        Returns the untested keys, and the groups known to hold a bad key with their refusal.
        Both are forgotten here, so the caller owns their outcome.
        """
        pending = [*self._untested, *self._to_prove]
        untested = np.concatenate(pending) if pending else _EMPTY
        suspects = tuple(self._suspects)
        self._to_prove.clear()
        self._untested.clear()
        self._untested_count = 0
        self._suspects.clear()
        return untested, suspects
