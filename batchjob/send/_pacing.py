"""Pacing: requests spaced evenly at a rate that adapts to the server's 429 ``throttled``.

The limit belongs to the API key, which other apps may share, so the rate left for us can be
lower than configured and can change. :class:`AdaptivePacer` never bursts, never exceeds the
configured rate, spaces requests by when they probably *arrive* (a slow round trip holds the
next slot back), brackets the granted rate between a ceiling (found over) and a proven rate,
recovers from a burst of 429s in bounded time, and tells "over the limit" from 429s that come
whatever the rate. The reasoning, and what it still cannot tell apart: ``docs/pacing.md``.
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
    proven_after: int = 10  # answers at a rate, with no sign of being over, that prove it
    proven_seconds: float = 3.0  # ... or this long at it, where answers are scarce,
    proven_min: int = 3  # ... with at least this many answers
    first_cut: float = 0.1  # share cut by a 429 before the rate is proven; doubles in a row
    backoff_floor: float = 0.5  # the most one decrease may cut (x0.5)
    cruise_answers: int = 300  # answers since a ceiling was set before probing above it
    recover_after: float = 30.0  # ... or this long, when that ceiling is under the last good
    collapse_floor: float = 1 / 16  # cuts in a row stop at this share of the last good rate
    floor_hold: float = 30.0  # seconds of refusals at that floor before it halves
    first_step: float = 0.02  # the first probe raises the ceiling this much; doubles on success
    rtt_samples: int = 16  # recent round trips whose fastest bounds an early arrival
    rtt_warmup: int = 8  # round trips needed before the fastest is trusted
    guard: float = 0.005  # share of each interval kept spare for jitter no round trip shows
    fine_wait: float = 0.001  # seconds before a slot spent polling the bucket, not sleeping
    report_change: float = 0.05  # on_change hears of changes of at least this share
    over_share: float = 0.5  # share of 429s when over a no-burst limit: every other request
    noise_window: int = 200  # recent answers, at rates shown to be under the limit, for noise
    noise_prior: float = 0.01  # the noise share assumed before any answer is known
    noise_prior_weight: float = 50.0  # ... and how many answers that assumption is worth
    noise_max: float = 0.25  # noise is never assumed higher, so a real excess still shows
    alarm_unproven: float = 3.0  # evidence (log-likelihood ratio) that a new rate is over
    alarm_proven: float = 4.5  # ... and that a rate already sustained is over after all
    credible_ceiling: float = 3.5  # evidence a ceiling needs, weighed again, to be kept


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
        self._ceiling_run: tuple[int, int] | None = None  # (429s, answers) that set it
        self._under_ceiling = 0  # answers since it was set
        self._ceiling_at = float("-inf")  # ... and when
        # The highest rate proven, kept through a burst of 429s that resets the bracket, so
        # the climb back has a target; dropped to what is proven once a probe under it fails.
        self._good: float | None = None
        # How low the cuts in a row may go, and since when the rate has been held there.
        self._floor: float | None = None
        self._floor_since = float("-inf")
        # Answers to requests sent at the current rate (since the last change).
        self._epoch_start = float("-inf")
        self._epoch_answers = 0
        self._epoch_proven = False
        # The evidence that the current rate is over the limit, not noise (a CUSUM), and the
        # answers since it was last zero: the run that would be blamed if it crossed a line.
        self._evidence = 0.0
        self._run = (0, 0)  # (429s, answers)
        # Answers at the current rate while it is not proven yet: noise only once it is.
        self._unproven: list[bool] = []
        # Answers that turned out not to be over the limit: their 429s are the noise.
        self._noise: deque[bool] = deque(maxlen=self.settings.noise_window)
        self._noise_throttled = 0
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
        self._epoch_answers += 1
        self._under_ceiling += 1
        proven = self._is_proven()
        # At a proven rate, look for a change (a CUSUM, floored at zero); at a new one, weigh
        # every answer since it began, so a 429 after a clean stretch counts for less than
        # one that came at once, as the refusals of a rate truly over the limit do.
        floor = 0.0 if proven else -self.settings.alarm_unproven
        self._evidence = max(floor, self._evidence + self._weight(throttled))
        over = self._evidence > 0.0
        self._run = (self._run[0] + throttled, self._run[1] + 1) if over else (0, 0)
        if proven:
            self._count_noise(throttled)
        else:
            self._unproven.append(throttled)
        if self._evidence >= self._alarm(proven):
            self._decrease()
        elif not throttled:
            self._maybe_increase()

    # --- telling "over the limit" from noise -----------------------------------------------

    def noise(self) -> float:
        """The estimated share of 429s that come whatever our rate."""
        s = self.settings
        throttled = self._noise_throttled + s.noise_prior * s.noise_prior_weight
        share = throttled / (len(self._noise) + s.noise_prior_weight)
        return min(s.noise_max, share)

    def _weight(self, throttled: bool, noise: float | None = None) -> float:
        """How much one answer says "over the limit" (> 0) against "only noise" (< 0)."""
        p = self.noise() if noise is None else noise
        q = self.settings.over_share
        return math.log(q / p) if throttled else math.log((1.0 - q) / (1.0 - p))

    def _is_proven(self) -> bool:
        return self._proven is not None and self.rate <= self._proven

    def _alarm(self, proven: bool) -> float:
        s = self.settings
        return s.alarm_proven if proven else s.alarm_unproven

    def _count_noise(self, throttled: bool) -> None:
        noise = self._noise
        if len(noise) == noise.maxlen:
            self._noise_throttled -= noise[0]
        noise.append(throttled)
        self._noise_throttled += throttled

    def _ceiling_evidence(self) -> float:
        """How strongly the run that set the ceiling reads as "over" with today's noise."""
        if self._ceiling_run is None:
            return math.inf
        throttled, answers = self._ceiling_run
        noise = self.noise()
        evidence = throttled * self._weight(True, noise)
        return evidence + (answers - throttled) * self._weight(False, noise)

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
        blamed = self._run
        self._step = s.first_step
        proven = self._proven
        if proven is not None and proven < current:
            # A probe above the proven rate was refused: go back to what worked. If it was
            # under the last good rate, that rate is not good any more.
            if self._good is not None and current <= self._good:
                self._good = proven
            self._set_ceiling(current, blamed)
            self._set(proven, "throttled")
            return
        self._proven = None
        if self._epoch_proven:
            # Over after all, at a rate that had been sustained: the limit is right here, or
            # it dropped. A step below is enough; a real drop is over again at once below and
            # gets the cuts below. The ceiling stays where it was: 429s that do not depend
            # on our rate and happen to bunch up would otherwise ratchet it down for good.
            if self._ceiling is None or self._ceiling < current:
                self._set_ceiling(current, blamed)
            self._set(current * (1.0 - s.margin), "throttled")
            return
        # Over before the rate was proven: cut, and cut harder each time in a row, so a
        # stray early 429 costs 10 % while "we send twice what is granted" is found in three.
        cut = min(1.0 - s.backoff_floor, s.first_cut * 2.0**self._quick_cuts)
        new = current * (1.0 - cut)
        # ... but not, on one run of refusals, below a floor under the last good rate. Every
        # answer at a rate may cut it, so the cuts go down by answers while the climb back
        # needs answers too; each one takes 1/rate seconds, so a 20 s burst of 429s (another
        # app hammering the shared key) cut 4/s to 0.05/s, where climbing back took hours.
        # Refusals at the floor re-start it (its own answers, not older ones, must show it is
        # over); only after ``floor_hold`` seconds of them does it halve, so a limit that
        # really fell that far is still followed, at one halving per ``floor_hold``.
        now = self._clock()
        if self._floor is None:
            self._floor = (self._good or self.max_rate) * s.collapse_floor
            self._floor_since = now  # already under it (proven there once): held from now
        if new < self._floor:
            if current > self._floor:
                new = self._floor
                self._floor_since = now
            elif now - self._floor_since < s.floor_hold:
                self._set(current, "throttled")  # held: a new epoch at the same rate
                return
            else:
                new = current * s.backoff_floor
                self._floor = new
                self._floor_since = now
        self._set_ceiling(current, blamed)
        self._quick_cuts += 1
        self._set(new, "throttled")

    def _long_enough(self) -> bool:
        """Whether the current rate has had answers enough to be proven, if nothing is over.

        Enough answers, or where answers are scarce (a rate cut low) enough time with a few:
        ``proven_after`` answers take 200 s at 0.05/s, and the climb back needs a proof at
        every step. At and above ``proven_after / proven_seconds`` per second it is answers.
        """
        s = self.settings
        answers = self._epoch_answers
        if answers >= s.proven_after:
            return True
        return answers >= s.proven_min and self._clock() - self._epoch_start >= s.proven_seconds

    def _set_ceiling(self, rate: float | None, blamed: tuple[int, int] | None) -> None:
        self._ceiling = rate
        self._ceiling_run = blamed
        self._under_ceiling = 0
        self._ceiling_at = self._clock()

    def _maybe_increase(self) -> None:
        s = self.settings
        if not self._long_enough() or self._evidence > 0.0:
            return
        self._evidence = 0.0
        current = self.rate
        self._quick_cuts = 0
        self._floor = None
        if self._good is None or current > self._good:
            self._good = current
        self._epoch_proven = True
        for throttled in self._unproven:
            self._count_noise(throttled)
        self._unproven.clear()
        if self._proven is None or current > self._proven:
            self._proven = current
        if current >= self.max_rate:
            return
        # The 429s that set the ceiling may be no more than the noise we now know of. Then
        # probe above it at once, without waiting for a cruise to end, but from a small step
        # that doubles while it goes through: 429s just under a real limit (timing jitter)
        # also read as noise, and must not send a probe far over it.
        doubted = self._ceiling is not None and self._ceiling_evidence() < s.credible_ceiling
        ceiling = min(self._ceiling or self.max_rate, self.max_rate)
        # A ceiling under the last good rate was set by a burst of 429s or by a limit that
        # dropped. Either way the cruise above it counts in seconds too: at a rate cut low,
        # ``cruise_answers`` would take hours. Then the climb heads for the last good rate
        # (bisecting towards it, as towards a ceiling), so how long it takes depends on how
        # far below that rate it fell in log terms, not on how few answers a low rate gets.
        good = self._good
        below_good = good is not None and max(ceiling, current) < good * (1.0 - s.margin)
        cruised = self._under_ceiling >= s.cruise_answers or (
            below_good and self._clock() - self._ceiling_at >= s.recover_after
        )
        if good is not None and below_good and cruised:
            self._set_ceiling(good, None)
            self._probe(math.sqrt(current * good))
        elif ceiling - current > s.margin * ceiling and not doubted:
            self._probe(math.sqrt(current * ceiling))
        elif doubted or self._step > s.first_step or cruised:
            # Settled just under the ceiling for a while: the limit may have risen. When the
            # last raise went through without a 429 it probably has, so go on at once. The
            # while counts every answer since the ceiling was set, not since the last change:
            # noise that now and then costs a margin step must not keep a ceiling for ever.
            raised = min(self.max_rate, max(ceiling, current) * (1.0 + self._step))
            self._set_ceiling(raised, None)
            self._step = min(1.0, self._step * 2)
            self._probe(math.sqrt(current * raised))

    def _probe(self, rate: float) -> None:
        # Within a search step of the configured rate, try that itself rather than creep up.
        if self.max_rate - rate <= self.settings.margin * self.max_rate:
            rate = self.max_rate
        self._set(rate, "probing")

    def _set(self, new: float, reason: str) -> None:
        new = min(self.max_rate, max(self.settings.min_rate, new))
        current = self.rate
        self._epoch_start = self._clock()
        self._epoch_answers = 0
        self._epoch_proven = False
        self._evidence = 0.0
        self._run = (0, 0)
        self._unproven.clear()  # never proven: neither the limit nor noise is known there
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
