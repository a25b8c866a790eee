"""Pacing: requests spaced evenly at a rate that adapts to the server's 429 ``throttled``.

The per-second limit belongs to the API key, and other integrations may share that key, so the
rate actually left for us (the *granted* rate) can be lower than configured and can change
during a run. The pacer never goes above the configured rate and never bursts; within that it
has to find the granted rate and stay just under it. The design is shaped by the strictest
server we must survive, and the sandbox is one: a token bucket with no burst allowance, which
refuses a request that arrives a microsecond early. Against it, measured on loopback (see
``bench/``), the old "cut by the share of 429s, climb back to 97 %" loop reached 87 % of the
rate with 1.2 % of requests refused; the reasons below took it to 99 % with none.

* Space requests by when they probably *arrived*, not when they left. The bucket sees arrival
  times. If one request is delayed on its way (a busy event loop at either end, a descheduled
  process, a slow hop) and the next is not, they arrive less than an interval apart and the
  second is refused however evenly they were sent: that alone refused 2-3 % of requests paced
  at exactly the granted rate. A delay on the way there shows in the round trip, and the
  fastest recent round trip bounds how early the next request can arrive; so when an answer
  comes back before the next slot, that slot is held back by how much slower than the fastest
  this round trip was. Until enough round trips are known (the first ones pay for opening
  connections and cold code paths), the whole round trip is held. Holds only ever apply
  while the interval is longer than a round trip, which is when pacing, not the network, sets
  the pace, so they cost nothing at high rates and a fraction of a percent otherwise.

* Keep ``guard`` (0.5 %) of each interval spare, for what no round trip shows: the server
  reads its clock a little after the request arrived, by a varying amount. Without it, about
  one request in three hundred was still refused, by a few microseconds.

* Wake on time. aiolimiter's timer, like any event loop timer on epoll, fires up to 1 ms late
  (~0.5-1 ms on average: 1-2 % of throughput at 20/s). Every interval counts from the actual
  grant, so lateness never shortens an interval, but it is lost throughput. So the pacer
  sleeps until ``fine_wait`` (1 ms) before the bucket frees and then polls the bucket's own
  ``has_capacity`` for the rest: aiolimiter still decides every slot, it is only asked more
  often than its timer could. Lateness falls to ~0.05 ms for ~1 ms of polling per slot.

* Find the granted rate by bracketing it, not by a fixed cut and a blind climb. A throttled
  rate is an upper bound (the ceiling); a rate that got ``proven_after`` answers in a row
  without a 429 is a lower bound (proven). The next rate tried is their geometric midpoint, so
  a wrong guess costs one 429 and a fraction of a second, and the search narrows to within
  ``margin`` in a handful of steps instead of oscillating around the limit. A probe above the
  proven rate that is refused goes straight back to it. A 429 after a clean streak at the
  current rate means the limit is right here (or it was jitter): one ``margin`` step down.
  429s soon after a change, with nothing proven, mean we are well over: cut ``first_cut`` and
  twice as much each time in a row (10, 20, 40, 50 %), so a stray early 429 costs 10 % for a
  few seconds while "sending twice what is granted" is found in three answers.

* Probe above a settled ceiling rarely, then quickly if it gives. The other integration may
  go quiet, so a ceiling is not forever, but each probe above an unchanged one costs a 429.
  After ``cruise_answers`` unthrottled answers the ceiling is raised by ``first_step``; while
  raises keep succeeding the step doubles and the next raise follows at once, so a freed-up
  key is found within a few hundred requests; a refusal resets both, so a stable limit costs
  about one 429 in two hundred requests.

Only answers to requests sent after the last rate change count, so one decrease is never
doubled by the refusals that were already in flight.

Even spacing is aiolimiter's leaky bucket with capacity one request, so there is never a
burst. Its rate is fixed at construction; a rate change swaps in a new bucket right after a
request took its slot (under a lock), so the change neither bursts nor wastes a slot. A hold
(after a slow answer, or after a decrease, which must also space the slot already promised at
the old rate) is a fractional ``acquire`` on the same bucket, so the next interval counts from
the held moment.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from aiolimiter import AsyncLimiter

#: Called as on_change(old_rate, new_rate, reason) whenever the rate changes noticeably.
RateListener = Callable[[float, float, str], None]


@dataclass(frozen=True)
class PacingSettings:
    min_rate: float = 0.05  # requests/s; never slower, so a run always progresses
    margin: float = 0.01  # the search stops when proven and ceiling are this close (share)
    proven_after: int = 10  # answers in a row, none throttled, that prove a rate
    first_cut: float = 0.1  # share cut by a 429 before the rate is proven; doubles in a row
    backoff_floor: float = 0.5  # the most one decrease may cut (x0.5)
    cruise_answers: int = 300  # unthrottled answers at a settled rate before probing above it
    first_step: float = 0.02  # the first probe raises the ceiling this much; doubles on success
    rtt_samples: int = 16  # recent round trips whose fastest bounds an early arrival
    rtt_warmup: int = 8  # round trips needed before the fastest is trusted
    guard: float = 0.005  # share of each interval kept spare for jitter no round trip shows
    fine_wait: float = 0.001  # seconds before a slot spent polling the bucket, not sleeping
    report_change: float = 0.05  # on_change hears of changes of at least this share


class AdaptivePacer:
    """Grants send slots evenly spaced at :attr:`rate` requests per second."""

    def __init__(
        self,
        max_rate: float,
        settings: PacingSettings | None = None,
        *,
        on_change: RateListener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_rate <= 0:
            raise ValueError("max_rate must be positive")
        self.max_rate = max_rate
        self.settings = settings or PacingSettings()
        self._rate = max_rate
        self._limiter = AsyncLimiter(1, self._interval(max_rate))
        self._pending_rate: float | None = None
        self._lock = asyncio.Lock()
        self._clock = clock
        self._on_change = on_change
        self._reported_rate = max_rate
        self.throttled_count = 0
        # The bracket around the granted rate. None: not known yet.
        self._ceiling: float | None = None  # lowest rate recently throttled
        self._proven: float | None = None  # highest rate recently sustained
        self._step = self.settings.first_step
        # Answers to requests sent at the current rate (since the last change).
        self._epoch_start = float("-inf")
        self._epoch_ok = 0
        self._quick_cuts = 0  # decreases in a row with no rate proven in between
        # Holding the next slot back after a slow answer.
        self._rtts: deque[float] = deque(maxlen=self.settings.rtt_samples)
        self._last_grant = float("-inf")
        self._last_take = float("-inf")  # event loop time of the last take from the bucket
        self._hold_until = float("-inf")

    @property
    def rate(self) -> float:
        return self._pending_rate if self._pending_rate is not None else self._rate

    def _interval(self, rate: float) -> float:
        """Seconds between slots at ``rate``, with the guard kept spare."""
        return (1.0 + self.settings.guard) / rate

    async def acquire(self) -> float:
        """Wait for the next slot; returns the clock time at which it was granted."""
        async with self._lock:
            await self._take(1.0)
            # A hold is a partial slot on the same bucket, so the next full interval counts
            # from the held moment, not from when the bucket first let us through.
            hold = self._hold_until - self._clock()
            interval = self._interval(self._rate)
            while hold > 0:
                share = min(1.0, hold / interval)
                await self._take(share)
                hold -= share * interval
            if self._pending_rate is not None:
                self._rate, self._pending_rate = self._pending_rate, None
                # A fresh bucket is empty; fill it now so the next slot is a full interval
                # after this one, at the new rate.
                self._limiter = AsyncLimiter(1, self._interval(self._rate))
                await self._take(1.0)
            granted = self._clock()
            self._last_grant = granted
            return granted

    async def _take(self, amount: float) -> None:
        """``amount`` of the bucket, on time: sleep to just before it frees, then poll it."""
        limiter = self._limiter
        if not limiter.has_capacity(amount):
            loop = asyncio.get_running_loop()
            # After any take the bucket holds at most one slot, so ``amount`` is free by then.
            free_at = self._last_take + amount * self._interval(self._rate)
            coarse = free_at - loop.time() - self.settings.fine_wait
            if coarse > 0:
                await asyncio.sleep(coarse)
            # Bounded: should the estimate ever be wrong, aiolimiter's own timer takes over.
            deadline = free_at + self.settings.fine_wait
            while not limiter.has_capacity(amount) and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0)  # polling on purpose: no event says "the bucket drained"
        await limiter.acquire(amount)  # at once, unless polling gave up
        self._last_take = asyncio.get_running_loop().time()

    def on_answer(self, sent_at: float, *, throttled: bool) -> None:
        """Learn from one answer to a request that got its slot at ``sent_at``."""
        if throttled:
            self.throttled_count += 1
        if sent_at < self._epoch_start:
            return  # sent at an earlier rate: it says nothing about the current one
        now = self._clock()
        if not throttled:
            self._hold_after_slow_answer(sent_at, now - sent_at)
        if throttled:
            self._decrease()
        else:
            self._epoch_ok += 1
            self._maybe_increase()

    # --- spacing from the likely arrival ---------------------------------------------------

    def _hold_after_slow_answer(self, sent_at: float, rtt: float) -> None:
        rtts = self._rtts
        # Only the latest slot matters: an earlier request is not the next one's neighbour.
        if sent_at == self._last_grant:
            # The fastest recent round trip bounds how early the next request can arrive, so
            # holding by this one's excess over it keeps the two arrivals a full interval
            # apart. Until there are enough round trips to know the fastest (the first ones
            # also pay for opening connections and cold code paths), hold by all of it.
            fastest = min(rtts) if len(rtts) >= self.settings.rtt_warmup else 0.0
            interval = self._interval(self.rate)
            held = sent_at + interval + min(max(0.0, rtt - fastest), interval)
            self._hold_until = max(self._hold_until, held)
        rtts.append(rtt)

    # --- the bracket -----------------------------------------------------------------------

    def _decrease(self) -> None:
        s = self.settings
        current = self.rate
        previous_ceiling = self._ceiling
        self._ceiling = current
        self._step = s.first_step
        proven = self._proven
        if proven is not None and proven < current:
            # A probe above the proven rate was refused: go back to what worked.
            self._set(proven, "throttled")
            return
        self._proven = None
        if self._epoch_ok >= s.proven_after:
            # One refusal after a clean streak at this rate: the limit is right here (or it
            # was jitter). A step below is enough; a real drop refuses the next few at once
            # and gets the cuts below. Nor does a lone 429 lower the ceiling: 429s that do
            # not depend on our rate (another app's bursts) would otherwise ratchet it down
            # a step at a time, for good.
            if previous_ceiling is not None:
                self._ceiling = max(previous_ceiling, current)
            self._set(current * (1.0 - s.margin), "throttled")
            return
        # Refused before the rate was proven: cut, and cut harder each time in a row, so a
        # stray early 429 costs 10 % while "we send twice what is granted" is found in three.
        cut = min(1.0 - s.backoff_floor, s.first_cut * 2.0**self._quick_cuts)
        self._quick_cuts += 1
        self._set(current * (1.0 - cut), "throttled")

    def _maybe_increase(self) -> None:
        s = self.settings
        if self._epoch_ok < s.proven_after:
            return
        current = self.rate
        self._quick_cuts = 0
        if self._proven is None or current > self._proven:
            self._proven = current
        if current >= self.max_rate:
            return
        ceiling = min(self._ceiling or self.max_rate, self.max_rate)
        if ceiling - current > s.margin * ceiling:
            self._probe(math.sqrt(current * ceiling))
        elif self._step > s.first_step or self._epoch_ok >= s.cruise_answers:
            # Settled just under the ceiling for a while: the limit may have risen. When the
            # last raise went through without a 429 it probably has, so go on at once.
            self._ceiling = min(self.max_rate, max(ceiling, current) * (1.0 + self._step))
            self._step = min(1.0, self._step * 2)
            self._probe(math.sqrt(current * self._ceiling))

    def _probe(self, rate: float) -> None:
        # Within a search step of the configured rate, try that itself rather than creep up.
        if self.max_rate - rate <= self.settings.margin * self.max_rate:
            rate = self.max_rate
        self._set(rate, "probing")

    def _set(self, new: float, reason: str) -> None:
        new = min(self.max_rate, max(self.settings.min_rate, new))
        current = self.rate
        self._epoch_start = self._clock()
        self._epoch_ok = 0
        if new == current:
            return
        if new < current:
            # The slot already promised at the old rate must not come early for the new one.
            self._hold_until = max(self._hold_until, self._last_grant + self._interval(new))
        self._pending_rate = new
        # Report only changes worth a log line, not every small step of a search.
        reported = self._reported_rate
        if self._on_change is not None and abs(new - reported) >= self.settings.report_change * (
            max(reported, 1e-9)
        ):
            self._on_change(reported, new, reason)
            self._reported_rate = new
